/* nbdkit-qcow2: the nbdkit plugin.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * A thin layer: parameters become a struct qcow2_config, callbacks
 * become core calls.  One struct qcow2_image is opened in .get_ready and
 * shared by every connection (two caches over one file would corrupt
 * it), so the thread model is PARALLEL and multi-conn is safe: every
 * connection sees every other's writes at once, and a flush on any of
 * them flushes all.
 *
 * Exports: "" is the active image; every internal snapshot is a
 * read-only export named after it (or its ID).  A snapshot's view is
 * opened on first use and shared by all connections to it.  With
 * snapshot=NAME the plugin serves that snapshot as its only export.
 * With top-layer=true every export shows the top image alone (core
 * does not open its backing file) and is read-only.
 *
 * Every persistent dirty bitmap that was consistent at open is also a
 * read-only export, "bitmap:NAME", over the active image: block status
 * is the bitmap (dirty = data, clean = hole+zero) and reads return the
 * active image's data in dirty ranges and zeroes in clean ones, so a
 * client that copies data extents copies exactly the dirty ranges.
 * Snapshot names may contain ':' too: an export name that starts with
 * "bitmap:" is always a bitmap, and a snapshot whose name starts so
 * (or is empty) is listed and found under its ID instead.
 *
 * Locks: the image is locked in .get_ready, as qemu-nbd locks it at
 * start: as a writer unless readonly=true or snapshot= (or the file is
 * not writable), so a second server on a busy image is refused at start
 * and the first keeps its writes.  nbdkit 1.32 tells a plugin about
 * `nbdkit -r` only per connection, too late for that choice, so
 * `nbdkit -r` alone still locks as a writer; readonly=true is the way
 * to lock only as a reader.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <time.h>
#include <assert.h>
#include <pthread.h>
#include <stdbool.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "../core/qcow2.h"

/* The callbacks pass nbdkit's request flags and extent types straight
 * through to core and back, so core's values must be nbdkit's.
 */
static_assert (QCOW2_F_MAY_TRIM == NBDKIT_FLAG_MAY_TRIM, "flag MAY_TRIM");
static_assert (QCOW2_F_FUA == NBDKIT_FLAG_FUA, "flag FUA");
static_assert (QCOW2_F_FAST_ZERO == NBDKIT_FLAG_FAST_ZERO, "flag FAST_ZERO");
static_assert (QCOW2_EXTENT_HOLE == NBDKIT_EXTENT_HOLE, "extent HOLE");
static_assert (QCOW2_EXTENT_ZERO == NBDKIT_EXTENT_ZERO, "extent ZERO");

static char *filename;
static char *file_arg;          /* file= as given; resolved once it exists */
static char *snapshot;          /* snapshot=: serve only this one */
static bool readonly_opt;       /* readonly=true */
static enum { CHECK_OFF, CHECK_REPORT, CHECK_REPAIR } check_mode;
static struct qcow2_config cfg = {
  .prealloc_size = QCOW2_PREALLOC_SIZE_DEFAULT,
};
static struct qcow2_image *img; /* the active image */

/* Snapshot views opened so far. */
static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;
static struct view {
  char *name;
  struct qcow2_image *img;
} *views;
static size_t nr_views;

/* create=true|force and the options of the new image. */
static bool create;
static bool create_given_opts;  /* some creation option was given */
static struct qcow2_create_options create_opts = {
  .size_from_backing_file = true,
};
static char *create_backing, *create_backing_format;

struct handle {
  struct qcow2_image *img;
  bool snapshot;
  bool writable;                /* active image, writable connection */
  bool bitmap;                  /* a bitmap export: img is the active */
  uint32_t bitmap_index;        /* image, bitmap_index its bitmap */
};

/* Export names of dirty bitmaps: BITMAP_PREFIX followed by the name. */
#define BITMAP_PREFIX "bitmap:"
#define BITMAP_PREFIX_LEN (sizeof BITMAP_PREFIX - 1)

static bool
is_bitmap_export (const char *name)
{
  return strncmp (name, BITMAP_PREFIX, BITMAP_PREFIX_LEN) == 0;
}

static void
qcow2_plugin_unload (void)
{
  size_t i;

  for (i = 0; i < nr_views; i++) {
    qcow2_close (views[i].img);
    free (views[i].name);
  }
  free (views);
  if (img && qcow2_close (img) == -1)
    nbdkit_error ("%s: errors while closing the image", filename);
  img = NULL;
  free (filename);
  free (file_arg);
  free (snapshot);
  free (create_backing);
  free (create_backing_format);
}

/* The shared view of a snapshot, opened on first use. */
static struct qcow2_image *
get_view (const char *name)
{
  struct qcow2_image *v = NULL;
  struct view *nv;
  size_t i;

  pthread_mutex_lock (&views_lock);
  for (i = 0; i < nr_views; i++)
    if (strcmp (views[i].name, name) == 0) {
      v = views[i].img;
      goto out;
    }
  nv = realloc (views, (nr_views + 1) * sizeof *views);
  if (nv == NULL) {
    nbdkit_error ("realloc: %m");
    goto out;
  }
  views = nv;
  v = qcow2_open_snapshot (img, name);
  if (v == NULL)
    goto out;
  views[nr_views].name = strdup (name);
  if (views[nr_views].name == NULL) {
    nbdkit_error ("strdup: %m");
    qcow2_close (v);
    v = NULL;
    goto out;
  }
  views[nr_views++].img = v;
 out:
  pthread_mutex_unlock (&views_lock);
  return v;
}

static int
parse_size (const char *value, uint64_t *out)
{
  int64_t r = nbdkit_parse_size (value);

  if (r == -1)
    return -1;
  *out = r;
  return 0;
}

static int
set_string (char **p, const char *value)
{
  free (*p);
  *p = strdup (value);
  if (*p == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

/* Parameters of create=: 1 if 'key' is one, 0 if not, -1 on error. */
static int
config_create (const char *key, const char *value)
{
  struct qcow2_create_options *o = &create_opts;
  uint64_t v;
  int r;

  if (strcmp (key, "create") == 0) {
    o->overwrite = strcmp (value, "force") == 0;
    if (o->overwrite)
      create = true;
    else if ((r = nbdkit_parse_bool (value)) == -1)
      return -1;
    else
      create = r;
    return 1;
  }
  if (strcmp (key, "size") == 0) {
    if (parse_size (value, &o->size) == -1)
      return -1;
    o->size_from_backing_file = false;
  }
  else if (strcmp (key, "cluster-size") == 0) {
    if (parse_size (value, &v) == -1)
      return -1;
    if (v == 0 || v > UINT32_MAX) {   /* 0 would mean the default */
      nbdkit_error ("cluster-size must be a power of 2 between 512 and 2M");
      return -1;
    }
    o->cluster_size = v;
  }
  else if (strcmp (key, "refcount-bits") == 0) {
    if (nbdkit_parse_uint32_t (key, value, &o->refcount_bits) == -1)
      return -1;
    if (o->refcount_bits == 0) {
      nbdkit_error ("refcount-bits must be a power of 2 from 1 to 64");
      return -1;
    }
  }
  else if (strcmp (key, "extended-l2") == 0) {
    if ((r = nbdkit_parse_bool (value)) == -1)
      return -1;
    o->extended_l2 = r;
  }
  else if (strcmp (key, "compat") == 0) {
    if (strcmp (value, "0.10") == 0 || strcmp (value, "v2") == 0)
      o->version = 2;
    else if (strcmp (value, "1.1") == 0 || strcmp (value, "v3") == 0)
      o->version = 3;
    else {
      nbdkit_error ("compat must be 0.10 or 1.1");
      return -1;
    }
  }
  else if (strcmp (key, "compression-type") == 0) {
    if (strcmp (value, "zlib") == 0)
      o->zstd = false;
    else if (strcmp (value, "zstd") == 0)
      o->zstd = true;
    else {
      nbdkit_error ("compression-type must be zlib or zstd");
      return -1;
    }
  }
  else if (strcmp (key, "backing") == 0) {
    if (set_string (&create_backing, value) == -1)
      return -1;
    o->backing_file = create_backing;
  }
  else if (strcmp (key, "backing-format") == 0) {
    if (set_string (&create_backing_format, value) == -1)
      return -1;
    o->backing_format = create_backing_format;
  }
  else if (strcmp (key, "preallocation") == 0) {
    if (strcmp (value, "off") == 0)
      o->preallocation = QCOW2_PREALLOC_OFF;
    else if (strcmp (value, "metadata") == 0)
      o->preallocation = QCOW2_PREALLOC_METADATA;
    else if (strcmp (value, "falloc") == 0)
      o->preallocation = QCOW2_PREALLOC_FALLOC;
    else if (strcmp (value, "full") == 0)
      o->preallocation = QCOW2_PREALLOC_FULL;
    else {
      nbdkit_error ("preallocation must be off, metadata, falloc or full");
      return -1;
    }
  }
  else
    return 0;
  create_given_opts = true;
  return 1;
}

/* cache=: qemu-nbd's names, and auto. */
static int
parse_cache (const char *value)
{
  static const struct { const char *name; enum qcow2_cache_mode mode; }
  modes[] = {
    { "writeback", QCOW2_CACHE_WRITEBACK },
    { "none", QCOW2_CACHE_NONE },
    { "writethrough", QCOW2_CACHE_WRITETHROUGH },
    { "directsync", QCOW2_CACHE_DIRECTSYNC },
    { "unsafe", QCOW2_CACHE_UNSAFE },
    { "auto", QCOW2_CACHE_AUTO },
  };
  size_t i;

  for (i = 0; i < sizeof modes / sizeof modes[0]; i++) {
    if (strcmp (value, modes[i].name) == 0) {
      cfg.cache = modes[i].mode;
      return 0;
    }
  }
  nbdkit_error ("cache must be writeback, none, writethrough, directsync, "
                "unsafe or auto");
  return -1;
}

static int
qcow2_plugin_config (const char *key, const char *value)
{
  int c;

  if (strcmp (key, "file") == 0) {
    /* Made absolute in .config_complete: it may not exist yet. */
    if (set_string (&file_arg, value) == -1)
      return -1;
  }
  else if ((c = config_create (key, value)) != 0)
    return c == 1 ? 0 : -1;
  else if (strcmp (key, "readonly") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    readonly_opt = r;
  }
  else if (strcmp (key, "snapshot") == 0) {
    if (set_string (&snapshot, value) == -1)
      return -1;
  }
  else if (strcmp (key, "l2-cache-size") == 0)
    return parse_size (value, &cfg.l2_cache_size);
  else if (strcmp (key, "refcount-cache-size") == 0)
    return parse_size (value, &cfg.refcount_cache_size);
  else if (strcmp (key, "cache-entry-size") == 0) {
    uint64_t v;
    if (parse_size (value, &v) == -1)
      return -1;
    if (v < 512 || v > (2 << 20) || (v & (v - 1))) {
      nbdkit_error ("cache-entry-size must be a power of 2 between 512 "
                    "and 2M");
      return -1;
    }
    cfg.cache_entry_size = v;
  }
  else if (strcmp (key, "overlap-check") == 0) {
    if (strcmp (value, "none") == 0)
      cfg.overlap_check = QCOW2_OVERLAP_NONE;
    else if (strcmp (value, "constant") == 0)
      cfg.overlap_check = QCOW2_OVERLAP_CONSTANT;
    else if (strcmp (value, "cached") == 0)
      cfg.overlap_check = QCOW2_OVERLAP_CACHED;
    else if (strcmp (value, "all") == 0)
      cfg.overlap_check = QCOW2_OVERLAP_ALL;
    else {
      nbdkit_error ("overlap-check must be none, constant, cached or all");
      return -1;
    }
  }
  else if (strcmp (key, "check") == 0) {
    if (strcmp (value, "off") == 0)
      check_mode = CHECK_OFF;
    else if (strcmp (value, "report") == 0)
      check_mode = CHECK_REPORT;
    else if (strcmp (value, "repair") == 0)
      check_mode = CHECK_REPAIR;
    else {
      nbdkit_error ("check must be off, report or repair");
      return -1;
    }
  }
  else if (strcmp (key, "detect-zeroes") == 0) {
    if (strcmp (value, "off") == 0)
      cfg.detect_zeroes = QCOW2_DETECT_ZEROES_OFF;
    else if (strcmp (value, "on") == 0)
      cfg.detect_zeroes = QCOW2_DETECT_ZEROES_ON;
    else if (strcmp (value, "unmap") == 0)
      cfg.detect_zeroes = QCOW2_DETECT_ZEROES_UNMAP;
    else {
      nbdkit_error ("detect-zeroes must be off, on or unmap");
      return -1;
    }
  }
  else if (strcmp (key, "discard") == 0) {
    if (strcmp (value, "unmap") == 0 || strcmp (value, "on") == 0)
      cfg.discard_ignore = false;
    else if (strcmp (value, "ignore") == 0 || strcmp (value, "off") == 0)
      cfg.discard_ignore = true;
    else {
      nbdkit_error ("discard must be unmap or ignore");
      return -1;
    }
  }
  else if (strcmp (key, "discard-no-unref") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    cfg.discard_no_unref = r;
  }
  else if (strcmp (key, "compress") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    cfg.compress = r;
  }
  else if (strcmp (key, "prealloc-size") == 0) {
    uint64_t v;
    if (parse_size (value, &v) == -1)
      return -1;
    if (v > QCOW2_PREALLOC_SIZE_MAX) {
      nbdkit_error ("prealloc-size must be at most %" PRIu64 " (1T): %s",
                    QCOW2_PREALLOC_SIZE_MAX, value);
      return -1;
    }
    cfg.prealloc_size = v;
  }
  else if (strcmp (key, "locking") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    cfg.no_locking = !r;
  }
  else if (strcmp (key, "cache") == 0)
    return parse_cache (value);
  else if (strcmp (key, "top-layer") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    cfg.top_layer = r;
  }
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_config_complete (void)
{
  if (file_arg == NULL) {
    nbdkit_error ("you must supply the file=<IMAGE> parameter");
    return -1;
  }
  if (create_given_opts && !create) {
    nbdkit_error ("size, cluster-size, refcount-bits, extended-l2, compat, "
                  "compression-type, backing, backing-format and "
                  "preallocation are only used with create=true");
    return -1;
  }
  /* Create the image now, before .get_ready opens it (and before
   * nbdkit changes directory), so relative names mean what they say.
   */
  if (create) {
    create_opts.no_locking = cfg.no_locking;
    if (qcow2_create (file_arg, &create_opts) == -1)
      return -1;
  }
  /* As qemu-nbd refuses it: unmap needs the permission to discard. */
  if (cfg.detect_zeroes == QCOW2_DETECT_ZEROES_UNMAP && cfg.discard_ignore) {
    nbdkit_error ("detect-zeroes=unmap needs discard=unmap");
    return -1;
  }
  filename = nbdkit_realpath (file_arg);
  if (filename == NULL)
    return -1;
  /* top-layer=true is read-only (core forces it too): say so once. */
  if (cfg.top_layer && !readonly_opt)
    nbdkit_debug ("top-layer=true: serving the image read-only");
  cfg.readonly = readonly_opt || snapshot != NULL || cfg.top_layer;
  return 0;
}

#define qcow2_plugin_config_help \
  "file=<IMAGE>                 (required) The qcow2 image to serve.\n" \
  "readonly=true|false          Open and lock the image read-only, sharing\n" \
  "                             it with QEMU's readers (default false).\n" \
  "snapshot=<NAME|ID>           Serve this internal snapshot (read-only).\n" \
  "top-layer=true|false         Serve only the top image of the backing\n" \
  "                             chain, read-only: unallocated clusters\n" \
  "                             read as zeroes (holes); default false.\n" \
  "l2-cache-size=<SIZE>         L2 table cache size (default: whole disk,\n" \
  "                             at most 32M).\n" \
  "refcount-cache-size=<SIZE>   Refcount block cache size (default 256K).\n" \
  "cache-entry-size=<SIZE>      Cache slice size (default 4K or the\n" \
  "                             cluster size if smaller).\n" \
  "overlap-check=none|constant|cached|all\n" \
  "                             Metadata overlap checks (default all).\n" \
  "locking=on|off               QEMU-compatible image locking (default on).\n" \
  "prealloc-size=<SIZE>         Disk reserved ahead as the file grows, in\n" \
  "                             steps of SIZE (default 0: none).\n" \
  "cache=writeback|none|writethrough|directsync|unsafe|auto\n" \
  "                             Host page cache use (default writeback).\n" \
  "check=off|report|repair      Check refcounts at start (default off).\n" \
  "detect-zeroes=off|on|unmap   Store written zero clusters as zero\n" \
  "                             clusters (unmap: freeing them); default off.\n" \
  "discard=unmap|ignore         Honour or ignore trims (default unmap).\n" \
  "discard-no-unref=on|off      Trims and zeroes keep clusters allocated\n" \
  "                             (default off).\n" \
  "compress=on|off              Store written whole clusters compressed\n" \
  "                             (the image's compression type; default off).\n" \
  "create=true|force            Create the image first (force: replace an\n" \
  "                             existing file).  With create:\n" \
  "  size=<SIZE>                Virtual size (default: backing file's).\n" \
  "  cluster-size=<SIZE>        Cluster size (default 64K).\n" \
  "  refcount-bits=1..64        Refcount width (default 16).\n" \
  "  extended-l2=on|off         Extended L2 entries (default off).\n" \
  "  compat=0.10|1.1            qcow2 version 2 or 3 (default 1.1).\n" \
  "  compression-type=zlib|zstd Compression type (default zlib).\n" \
  "  backing=<FILE>             Backing file, stored as given.\n" \
  "  backing-format=qcow2|raw   Format of the backing file.\n" \
  "  preallocation=off|metadata|falloc|full"

static void
qcow2_plugin_dump_plugin (void)
{
  printf ("qcow2_zstd=%s\n", qcow2_have_zstd () ? "yes" : "no");
  printf ("qcow2_write=yes\n");
  printf ("qcow2_overlap_check=all\n");
  printf ("qcow2_create=yes\n");
  printf ("qcow2_compress=yes\n");
  printf ("qcow2_prealloc_size=%" PRIu64 "\n", QCOW2_PREALLOC_SIZE_DEFAULT);
  printf ("qcow2_cache=writeback,none,writethrough,directsync,unsafe,"
          "auto\n");
  printf ("qcow2_top_layer=yes\n");
  printf ("qcow2_bitmap_exports=yes\n");
}

/* check=report|repair: like qemu-img check [-r all] at start.  Repair
 * needs a writable image (so the writer's locks); leaks are repaired,
 * corruption too.
 */
static int
run_check (void)
{
  struct qcow2_check_result res;
  bool repair = check_mode == CHECK_REPAIR;

  if (repair && qcow2_is_readonly (img)) {
    nbdkit_error ("%s: check=repair needs a writable image", filename);
    return -1;
  }
  if (qcow2_check (img, repair, &res) == -1)
    return -1;
  if (res.corruptions || res.leaks || res.errors)
    nbdkit_error ("%s: check: %" PRIu64 " corruptions, %" PRIu64 " leaked "
                  "clusters, %" PRIu64 " references outside the file%s",
                  filename, res.corruptions, res.leaks, res.errors,
                  repair ? "; repaired" : "");
  else
    nbdkit_debug ("%s: check: no errors", filename);
  /* Served anyway: reads of valid data work, and writes stop at the
   * first sign of corruption.
   */
  return 0;
}

static int
qcow2_plugin_get_ready (void)
{
  img = qcow2_open (filename, &cfg);
  if (img == NULL)
    return -1;
  if (check_mode != CHECK_OFF && run_check () == -1)
    return -1;
  /* Open the one snapshot now so that a bad name fails at start. */
  if (snapshot && get_view (snapshot) == NULL)
    return -1;
  return 0;
}

/* The bitmaps that can be served, as "bitmap:NAME" exports. */
static int
list_bitmaps (struct nbdkit_exports *exports)
{
  uint32_t i, n = qcow2_nr_bitmaps (img);

  for (i = 0; i < n; i++) {
    struct qcow2_bitmap_info info;
    char *ename, desc[256];
    int r;

    if (qcow2_bitmap_info (img, i, &info) == -1)
      return -1;
    if (info.in_use)            /* inconsistent: not served */
      continue;
    if (asprintf (&ename, "%s%s", BITMAP_PREFIX, info.name) == -1) {
      nbdkit_error ("asprintf: %m");
      return -1;
    }
    snprintf (desc, sizeof desc, "dirty bitmap, granularity %" PRIu64
              ", %s (read-only): dirty ranges are data, clean ranges "
              "read as zeroes", info.granularity,
              info.enabled ? "enabled" : "disabled");
    r = nbdkit_add_export (exports, ename, desc);
    free (ename);
    if (r == -1)
      return -1;
  }
  return 0;
}

static int
qcow2_plugin_list_exports (int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  uint32_t i, n = qcow2_nr_snapshots (img);
  const char *ename;

  if (snapshot)
    return nbdkit_add_export (exports, snapshot, "internal snapshot");
  if (nbdkit_add_export (exports, "",
                         cfg.top_layer ? "active image, top layer only "
                         "(read-only)" : "active image") == -1)
    return -1;
  for (i = 0; i < n; i++) {
    struct qcow2_snapshot_info info;
    char desc[256], date[64];
    time_t t;
    struct tm tm;

    if (qcow2_snapshot_info (img, i, &info) == -1)
      return -1;
    t = info.date_sec;
    strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S",
              gmtime_r (&t, &tm));
    snprintf (desc, sizeof desc, "snapshot ID %s, taken %s UTC, "
              "size %" PRIu64 " (read-only)", info.id, date, info.size);
    /* Names the active image or a bitmap export has: the ID instead. */
    ename = info.name;
    if (*ename == '\0' || is_bitmap_export (ename)) {
      ename = info.id;
      if (*ename == '\0' || is_bitmap_export (ename))
        continue;               /* only snapshot= can serve it */
    }
    if (nbdkit_add_export (exports, ename, desc) == -1)
      return -1;
  }
  return list_bitmaps (exports);
}

static const char *
qcow2_plugin_default_export (int readonly, int is_tls)
{
  return snapshot ? snapshot : "";
}

/* The index of the bitmap an export names; refused if it was in use
 * (inconsistent) at open, as qemu-nbd -B refuses it.
 */
static int
find_bitmap (const char *name, uint32_t *index)
{
  uint32_t i, n = qcow2_nr_bitmaps (img);

  for (i = 0; i < n; i++) {
    struct qcow2_bitmap_info info;

    if (qcow2_bitmap_info (img, i, &info) == -1)
      return -1;
    if (strcmp (info.name, name) != 0)
      continue;
    if (info.in_use) {
      nbdkit_error ("%s: bitmap '%s' is inconsistent and cannot be "
                    "served: it was in use when the image was opened (its "
                    "last writer did not close the image cleanly), so it "
                    "may miss writes; take a full backup and start a new "
                    "bitmap (qemu-img bitmap --remove, then --add)",
                    filename, name);
      errno = EINVAL;
      return -1;
    }
    *index = i;
    return 0;
  }
  nbdkit_error ("%s: no bitmap named '%s'", filename, name);
  errno = ENOENT;
  return -1;
}

static void *
qcow2_plugin_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  struct handle *h = calloc (1, sizeof *h);

  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (name == NULL)
    name = "";
  if (snapshot && *name && strcmp (name, snapshot) != 0) {
    nbdkit_error ("only snapshot '%s' is served (snapshot= was given)",
                  snapshot);
    free (h);
    return NULL;
  }
  if (!snapshot && is_bitmap_export (name)) {
    if (find_bitmap (name + BITMAP_PREFIX_LEN, &h->bitmap_index) == -1) {
      free (h);
      return NULL;
    }
    h->img = img;
    h->bitmap = true;
  }
  else if (snapshot || *name) {
    h->img = get_view (snapshot ? snapshot : name);
    h->snapshot = true;
  }
  else {
    /* A writable image holds the writer's locks since .get_ready. */
    h->img = img;
    h->writable = !readonly && !qcow2_is_readonly (img);
  }
  if (h->img == NULL) {
    free (h);
    return NULL;
  }
  return h;
}

static void
qcow2_plugin_close (void *handle)
{
  free (handle);
}

static int64_t
qcow2_plugin_get_size (void *handle)
{
  struct handle *h = handle;
  return qcow2_get_size (h->img);
}

static int
qcow2_plugin_can_write (void *handle)
{
  struct handle *h = handle;
  return h->writable && !qcow2_is_readonly (h->img);
}

static int
qcow2_plugin_can_flush (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_fua (void *handle)
{
  return NBDKIT_FUA_NATIVE;
}

static int
qcow2_plugin_can_trim (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_zero (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_fast_zero (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_multi_conn (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_extents (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_cache (void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum,
                         uint32_t *preferred, uint32_t *maximum)
{
  struct handle *h = handle;
  uint32_t cs = qcow2_cluster_size (h->img);

  *minimum = 1;
  *preferred = cs < 4096 ? 4096 : cs;
  *maximum = 0xffffffff;
  return 0;
}

/* A read of a bitmap export: the bitmap's runs over the request
 * first, then the active image's data in the dirty ones and zeroes in
 * the clean ones (the clean ones are reported as zero).  The runs are
 * collected before anything is read: qcow2_bitmap_extents may hold
 * the image's lock while it calls back.
 */
struct bitmap_runs {
  struct bitmap_run { uint64_t offset, length; bool dirty; } *v;
  size_t n, cap;
};

static int
add_bitmap_run (void *opaque, uint64_t offset, uint64_t length,
                uint32_t type)
{
  struct bitmap_runs *r = opaque;
  bool dirty = (type & QCOW2_EXTENT_HOLE) == 0;
  struct bitmap_run *last = r->n ? &r->v[r->n - 1] : NULL;

  if (last && last->dirty == dirty && last->offset + last->length == offset) {
    last->length += length;
    return 0;
  }
  if (r->n == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 16;
    struct bitmap_run *v = realloc (r->v, cap * sizeof *v);
    if (v == NULL) {
      nbdkit_error ("realloc: %m");
      return -1;
    }
    r->v = v;
    r->cap = cap;
  }
  r->v[r->n++] = (struct bitmap_run) { offset, length, dirty };
  return 0;
}

static int
bitmap_pread (struct handle *h, void *buf, uint32_t count, uint64_t offset)
{
  struct bitmap_runs r = { NULL, 0, 0 };
  uint64_t pos = offset, end = offset + count;
  size_t i;
  int ret = -1;

  if (qcow2_bitmap_extents (h->img, h->bitmap_index, count, offset, false,
                            add_bitmap_run, &r) == -1)
    goto out;
  for (i = 0; i < r.n && pos < end; i++) {
    uint64_t len;
    char *p = (char *) buf + (pos - offset);

    if (r.v[i].offset != pos || r.v[i].length == 0)
      break;
    len = r.v[i].length < end - pos ? r.v[i].length : end - pos;
    if (!r.v[i].dirty)
      memset (p, 0, len);
    else if (qcow2_pread (h->img, p, len, pos) == -1)
      goto out;
    pos += len;
  }
  if (pos != end) {
    nbdkit_error ("%s: bitmap export: the bitmap does not describe [%"
                  PRIu64 ", %" PRIu64 ") (stopped at %" PRIu64 ")",
                  filename, offset, end, pos);
    errno = EIO;
    goto out;
  }
  ret = 0;
 out:
  free (r.v);
  return ret;
}

static int
qcow2_plugin_pread (void *handle, void *buf, uint32_t count,
                    uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;

  if (h->bitmap)
    return bitmap_pread (h, buf, count, offset);
  return qcow2_pread (h->img, buf, count, offset);
}

static int
qcow2_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  return qcow2_pwrite (h->img, buf, count, offset, flags & NBDKIT_FLAG_FUA);
}

static int
qcow2_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  struct handle *h = handle;
  return qcow2_zero (h->img, count, offset,
                     flags & (NBDKIT_FLAG_MAY_TRIM | NBDKIT_FLAG_FUA |
                              NBDKIT_FLAG_FAST_ZERO));
}

static int
qcow2_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  struct handle *h = handle;
  return qcow2_trim (h->img, count, offset, flags & NBDKIT_FLAG_FUA);
}

static int
qcow2_plugin_flush (void *handle, uint32_t flags)
{
  struct handle *h = handle;
  return qcow2_flush (h->img);
}

static int
qcow2_plugin_cache (void *handle, uint32_t count, uint64_t offset,
                    uint32_t flags)
{
  struct handle *h = handle;
  return qcow2_prefetch (h->img, count, offset);
}

/* nbdkit 1.32 aborts on extents of 4 GiB or more: clip them. */
static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct nbdkit_extents *extents = opaque;
  const uint64_t max = UINT64_C(0x80000000);

  while (length > 0) {
    uint64_t n = length < max ? length : max;
    if (nbdkit_add_extent (extents, offset, n, type) == -1)
      return -1;
    offset += n;
    length -= n;
  }
  return 0;
}

static int
qcow2_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                      uint32_t flags, struct nbdkit_extents *extents)
{
  struct handle *h = handle;
  bool req_one = (flags & NBDKIT_FLAG_REQ_ONE) != 0;

  if (h->bitmap)
    return qcow2_bitmap_extents (h->img, h->bitmap_index, count, offset,
                                 req_one, add_extent, extents);
  return qcow2_extents (h->img, count, offset, req_one, add_extent,
                        extents);
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static struct nbdkit_plugin plugin = {
  .name               = "qcow2",
  .longname           = "nbdkit qcow2 plugin",
  .version            = PACKAGE_VERSION,
  .unload             = qcow2_plugin_unload,
  .config             = qcow2_plugin_config,
  .config_complete    = qcow2_plugin_config_complete,
  .config_help        = qcow2_plugin_config_help,
  .magic_config_key   = "file",
  .dump_plugin        = qcow2_plugin_dump_plugin,
  .get_ready          = qcow2_plugin_get_ready,
  .list_exports       = qcow2_plugin_list_exports,
  .default_export     = qcow2_plugin_default_export,
  .open               = qcow2_plugin_open,
  .close              = qcow2_plugin_close,
  .get_size           = qcow2_plugin_get_size,
  .can_write          = qcow2_plugin_can_write,
  .can_flush          = qcow2_plugin_can_flush,
  .can_fua            = qcow2_plugin_can_fua,
  .can_trim           = qcow2_plugin_can_trim,
  .can_zero           = qcow2_plugin_can_zero,
  .can_fast_zero      = qcow2_plugin_can_fast_zero,
  .can_multi_conn     = qcow2_plugin_can_multi_conn,
  .can_extents        = qcow2_plugin_can_extents,
  .can_cache          = qcow2_plugin_can_cache,
  .block_size         = qcow2_plugin_block_size,
  .pread              = qcow2_plugin_pread,
  .pwrite             = qcow2_plugin_pwrite,
  .zero               = qcow2_plugin_zero,
  .trim               = qcow2_plugin_trim,
  .flush              = qcow2_plugin_flush,
  .cache              = qcow2_plugin_cache,
  .extents            = qcow2_plugin_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
