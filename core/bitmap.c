/* nbdkit-qcow2: persistent dirty bitmaps.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The qcow2 "Bitmaps" extension: a directory of named bitmaps, each a
 * table of clusters of bits, one bit per 'granularity' bytes of the
 * disk (bit j of byte i is granule 8i + j).  Backup tools keep one per
 * checkpoint: an enabled ('auto') bitmap gets the bits of every range
 * written, and the next incremental backup copies only those ranges.
 * This file keeps them the way QEMU does, so that QEMU's tools and
 * backup tools built on them go on working after we served the image:
 *
 *   open         load and check the directory and every bitmap table;
 *                no bits are read yet
 *   first write  the enabled bitmaps are marked in use on disk, synced
 *                before any guest data lands (bitmap_prepare_write)
 *   every write  rw.c sets the bits of every enabled bitmap over the
 *                whole request (bitmap_set), in memory
 *   clean close  the changed clusters of bits are written (in place,
 *                or into new clusters), then the tables, a sync, then
 *                the in-use flags are cleared (bitmap_store)
 *
 * So after a crash an enabled bitmap is marked in use: QEMU and the
 * backup tools then call it inconsistent and take a full backup, the
 * same rule as QEMU's.  It never looks consistent while missing writes.
 * A bitmap in use at open is left as it is (and not served); disabled
 * bitmaps are never changed.  A directory or table this file cannot
 * keep safely (anything unknown or inconsistent) is not kept at all:
 * the autoclear bit is cleared at the first write, as by any program
 * without bitmap support, which the spec makes QEMU read as "every
 * bitmap inconsistent".
 *
 * Memory: the tables (8 bytes per cluster of bits), and one cluster
 * per table entry whose range was written since open: at most the
 * bitmap's size (disk size / granularity / 8: 16 MiB for 8 TiB at 64
 * KiB).  Nothing is read at open but the directory and tables;
 * bitmap_extents reads the bits of a cluster not written since open
 * into a buffer of its own, not kept.
 *
 * Trust: what the directory and tables point at is written in place at
 * close, so at open (for a writable image) every such cluster must be
 * inside the file, of the kind the overlap map expects (the directory
 * and tables are in the map, data clusters must not be metadata), have
 * refcount 1 (unless the image was left dirty: its refcounts are
 * rebuilt before the first write, and judged then, by
 * bitmap_check_repaired) and be pointed at only once by all bitmaps
 * together.
 * Nothing read from the file is ever freed here.  XXX A data cluster
 * that a corrupt L2 table also points at is not detected (that takes
 * the full walk of check=); its refcount of 1 is already wrong then.
 *
 * Locking: bitmap_set runs with img->lock held shared or exclusively
 * (or not at all) and bitmap_extents with no lock: pages are installed
 * with compare-and-swap and bits set with atomic OR, and bits are only
 * ever added while the image is open.  Everything else needs img->lock
 * exclusively, or runs at open and close.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"
#include "overlap.h"
#include "walk.h"

/* Bits of one page (one cluster of bitmap data), log2. */
static inline unsigned
page_bits (const struct qcow2_image *img)
{
  return img->cluster_bits + 3;
}

/* Entries a bitmap of 'gran_bits' needs for this disk. */
static uint64_t
table_entries (const struct qcow2_image *img, unsigned gran_bits)
{
  uint64_t granules = (img->size >> gran_bits) +
    ((img->size & ((UINT64_C(1) << gran_bits) - 1)) != 0);

  return (granules + (UINT64_C(1) << page_bits (img)) - 1) >> page_bits (img);
}

/* Zeroed memory of whole cache lines to itself: what every write reads
 * (the bitmaps' array, tables, page pointers and flags) must not share
 * a line with anything that other threads write all the time, or each
 * read is a cache miss.
 */
#define LINE 64

static void *
calloc_lines (size_t n, size_t size)
{
  void *p;
  size_t len;

  if (size && n > (SIZE_MAX - LINE) / size) {
    errno = ENOMEM;
    return NULL;
  }
  len = (n * size + LINE - 1) & ~(size_t) (LINE - 1);
  if (len == 0)
    len = LINE;
  if ((errno = posix_memalign (&p, LINE, len)) != 0)
    return NULL;
  return memset (p, 0, len);
}

/* ---- loading and checking ----------------------------------------- */

/* Has every cluster of [off, off+len) refcount 1? */
static bool
refcounts_one (struct qcow2_image *img, uint64_t off, uint64_t len)
{
  uint64_t c, first = off >> img->cluster_bits;
  uint64_t n = size_to_clusters (img, offset_into_cluster (img, off) + len);

  for (c = first; c < first + n; c++) {
    uint64_t v;
    if (refcount_get (img, c, &v) == -1 || v != 1)
      return false;
  }
  return true;
}

/* Is [off, off+len) of the file fit to be written in place as 'types'
 * (0: bitmap data)?  Inside the file, no other metadata there, and
 * every cluster with refcount 1.  Only asked of writable images (which
 * have the overlap map).
 */
static bool
ours_alone (struct qcow2_image *img, uint64_t off, uint64_t len,
            unsigned types)
{
  uint64_t first = off >> img->cluster_bits, hit;
  uint64_t n = size_to_clusters (img, offset_into_cluster (img, off) + len);

  if (off >= img->host_end || img->host_end - off < len)
    return false;
  if (img->overlap &&
      overlap_map_query (img->overlap, first, n, OV_ALL & ~types, &hit))
    return false;
  /* Left dirty (lazy refcounts), the refcounts may be stale until the
   * repair before the first write, which counts bitmap clusters too:
   * bitmap_check_repaired judges them then.
   */
  if (img->incompat & INCOMPAT_DIRTY)
    return true;
  return refcounts_one (img, off, len);
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

  return x < y ? -1 : x > y;
}

/* Read and check bitmap 'bm''s table.  -1 with a message: it cannot be
 * kept (or, for an I/O error, errno != EINVAL).  'owned' collects the
 * clusters it points at, for the duplicate check.
 */
static int
load_table (struct qcow2_image *img, struct bitmap *bm, uint64_t *owned,
            size_t *nr_owned)
{
  uint64_t len = (uint64_t) bm->table_size * 8, i;

  if (bm->table_offset == 0 || offset_into_cluster (img, bm->table_offset) ||
      bm->table_size != table_entries (img, bm->gran_bits) ||
      bm->table_offset >= img->host_end ||
      img->host_end - bm->table_offset < len) {
    nbdkit_error ("%s: bitmap '%s': table of %" PRIu32 " entries at %#"
                  PRIx64 " does not fit the disk or the file", img->name,
                  bm->name, bm->table_size, bm->table_offset);
    errno = EINVAL;
    return -1;
  }
  bm->table = calloc_lines (bm->table_size, 8);
  bm->pages = calloc_lines (bm->table_size, sizeof *bm->pages);
  bm->page_flags = calloc_lines (bm->table_size, 1);
  if (bm->table == NULL || bm->pages == NULL || bm->page_flags == NULL) {
    nbdkit_error ("%s: bitmap '%s': %m", img->name, bm->name);
    return -1;
  }
  if (io_pread (img->io, bm->table, len, bm->table_offset) == -1) {
    nbdkit_error ("%s: bitmap '%s': reading its table at %#" PRIx64 ": %m",
                  img->name, bm->name, bm->table_offset);
    return -1;
  }
  for (i = 0; i < bm->table_size; i++) {
    uint64_t e = be64toh (bm->table[i]), off = e & BTE_OFFSET_MASK;

    bm->table[i] = e;
    if ((e & BTE_RESERVED_MASK) || (off && (e & BTE_ALL_ONES)) ||
        offset_into_cluster (img, off) ||
        (off && (off >= img->host_end ||
                 img->host_end - off < img->cluster_size))) {
      nbdkit_error ("%s: bitmap '%s': table entry %" PRIu64 " (%#" PRIx64
                    ") is invalid", img->name, bm->name, i, e);
      errno = EINVAL;
      return -1;
    }
    if (off && !img->readonly) {
      if (!ours_alone (img, off, img->cluster_size, 0)) {
        nbdkit_error ("%s: bitmap '%s': data cluster %#" PRIx64 " is "
                      "metadata or shared", img->name, bm->name, off);
        errno = EINVAL;
        return -1;
      }
      owned[(*nr_owned)++] = off >> img->cluster_bits;
    }
  }
  if (!img->readonly) {
    if (!ours_alone (img, bm->table_offset, len, OV_BITMAP_TABLE)) {
      nbdkit_error ("%s: bitmap '%s': table at %#" PRIx64 " overlaps other "
                    "metadata or is shared", img->name, bm->name,
                    bm->table_offset);
      errno = EINVAL;
      return -1;
    }
    for (i = 0; i < size_to_clusters (img, len); i++)
      owned[(*nr_owned)++] = (bm->table_offset >> img->cluster_bits) + i;
  }
  return 0;
}

/* Parse the directory entry at *pos into bm (name and fields only). */
static int
parse_entry (struct qcow2_image *img, uint64_t *pos, struct bitmap *bm)
{
  uint64_t size = img->bitmap_dir_size;
  struct bitmap_dir_entry e;

  if (!bitmap_dir_entry (img->bitmap_dir, size, *pos, &e) ||
      size - *pos < e.len) {
    nbdkit_error ("%s: bitmap directory of %" PRIu64 " bytes is too short "
                  "for %" PRIu32 " bitmaps", img->name, size,
                  img->nb_bitmaps);
    errno = EINVAL;
    return -1;
  }
  bm->dir_pos = *pos;
  bm->table_offset = e.table_offset;
  bm->table_size = e.table_size;
  bm->flags = e.flags;
  bm->gran_bits = e.gran_bits;
  bm->name = strndup (e.name, e.name_size);
  if (bm->name == NULL) {
    nbdkit_error ("%s: bitmap directory: %m", img->name);
    return -1;
  }
  *pos += e.len;
  if (e.name_size == 0 || e.name_size > BME_MAX_NAME_SIZE ||
      strlen (bm->name) != e.name_size ||
      e.type != BME_TYPE_DIRTY_TRACKING ||
      (bm->flags & ~BME_FLAGS_KNOWN) ||
      bm->gran_bits < BME_MIN_GRANULARITY_BITS ||
      bm->gran_bits > BME_MAX_GRANULARITY_BITS ||
      (e.extra && !(bm->flags & BME_FLAG_EXTRA_COMPATIBLE)) ||
      bm->table_size == 0 || bm->table_size > MAX_BITMAP_TABLE) {
    nbdkit_error ("%s: bitmap '%s': unsupported or invalid directory entry "
                  "(type %u, flags %#" PRIx32 ", granularity bits %u, %"
                  PRIu32 " bytes of extra data, table of %" PRIu32
                  " entries)", img->name, bm->name, e.type, bm->flags,
                  bm->gran_bits, e.extra, bm->table_size);
    errno = EINVAL;
    return -1;
  }
  return 0;
}

/* Check names are unique and no cluster has two owners. */
static int
check_unique (struct qcow2_image *img, uint64_t *owned, size_t nr_owned)
{
  uint32_t i, j;
  size_t k;

  for (i = 0; i < img->nr_bitmaps; i++)
    for (j = i + 1; j < img->nr_bitmaps; j++)
      if (strcmp (img->bitmaps[i].name, img->bitmaps[j].name) == 0) {
        nbdkit_error ("%s: two bitmaps are named '%s'", img->name,
                      img->bitmaps[i].name);
        errno = EINVAL;
        return -1;
      }
  qsort (owned, nr_owned, sizeof *owned, cmp_u64);
  for (k = 1; k < nr_owned; k++)
    if (owned[k] == owned[k - 1]) {
      nbdkit_error ("%s: bitmap cluster %#" PRIx64 " is pointed at twice",
                    img->name, owned[k] << img->cluster_bits);
      errno = EINVAL;
      return -1;
    }
  return 0;
}

/* Load every bitmap; -1 (errno EINVAL) when they cannot be kept. */
static int
load_all (struct qcow2_image *img)
{
  uint64_t pos = 0, *owned = NULL, cap, total = 0;
  size_t nr_owned = 0;
  uint32_t i;
  int r = -1;

  img->bitmap_dir = malloc (img->bitmap_dir_size);
  img->bitmaps = calloc_lines (img->nb_bitmaps, sizeof *img->bitmaps);
  if (img->bitmap_dir == NULL || img->bitmaps == NULL) {
    nbdkit_error ("%s: bitmap directory: %m", img->name);
    return -1;
  }
  if (io_pread (img->io, img->bitmap_dir, img->bitmap_dir_size,
                img->bitmap_dir_offset) == -1) {
    nbdkit_error ("%s: reading the bitmap directory at %#" PRIx64 ": %m",
                  img->name, img->bitmap_dir_offset);
    return -1;
  }
  if (!img->readonly &&
      !ours_alone (img, img->bitmap_dir_offset, img->bitmap_dir_size,
                   OV_BITMAP_DIRECTORY)) {
    nbdkit_error ("%s: the bitmap directory at %#" PRIx64 " overlaps other "
                  "metadata or is shared", img->name, img->bitmap_dir_offset);
    errno = EINVAL;
    return -1;
  }
  /* First the entries, so that the owned list can be sized. */
  cap = size_to_clusters (img, img->bitmap_dir_size);
  for (i = 0; i < img->nb_bitmaps; i++) {
    img->nr_bitmaps = i + 1;
    if (parse_entry (img, &pos, &img->bitmaps[i]) == -1)
      return -1;
    cap += img->bitmaps[i].table_size +
      size_to_clusters (img, (uint64_t) img->bitmaps[i].table_size * 8);
    total += img->bitmaps[i].table_size;
  }
  /* Tables are held in memory (17 bytes an entry, and a page each). */
  if (total > MAX_BITMAP_TABLE) {
    nbdkit_error ("%s: the bitmap tables have %" PRIu64 " entries in all, "
                  "more than %" PRIu32, img->name, total, MAX_BITMAP_TABLE);
    errno = EINVAL;
    return -1;
  }
  owned = malloc (cap * sizeof *owned);
  if (owned == NULL) {
    nbdkit_error ("%s: bitmaps: %m", img->name);
    return -1;
  }
  for (i = 0; i < img->bitmap_dir_size >> img->cluster_bits; i++)
    owned[nr_owned++] = (img->bitmap_dir_offset >> img->cluster_bits) + i;
  for (i = 0; i < img->nr_bitmaps; i++)
    if (load_table (img, &img->bitmaps[i], owned, &nr_owned) == -1)
      goto out;
  r = check_unique (img, owned, nr_owned);
 out:
  free (owned);
  return r;
}

/* At open (qcow2_open): load the bitmaps and decide which are kept. */
int
bitmap_load (struct qcow2_image *img)
{
  uint32_t i;

  if (img->nb_bitmaps == 0)
    return 0;
  if (!(img->autoclear & AUTOCLEAR_BITMAPS)) {
    /* A program without bitmap support wrote the image since. */
    nbdkit_debug ("%s: the bitmaps extension is stale (autoclear bit "
                  "clear): ignored", img->name);
    return 0;
  }
  if (offset_into_cluster (img, img->bitmap_dir_offset)) {
    nbdkit_error ("%s: the bitmap directory offset %#" PRIx64 " is not "
                  "cluster aligned", img->name, img->bitmap_dir_offset);
    goto cannot_keep;
  }
  /* Before anything is sized by it: every entry takes at least 32
   * bytes of the directory.
   */
  if (img->nb_bitmaps > BME_MAX_BITMAPS ||
      img->nb_bitmaps > img->bitmap_dir_size / BME_MIN_ENTRY_SIZE) {
    nbdkit_error ("%s: %" PRIu32 " bitmaps cannot fit a bitmap directory "
                  "of %" PRIu64 " bytes (or are more than %d)", img->name,
                  img->nb_bitmaps, img->bitmap_dir_size, BME_MAX_BITMAPS);
    goto cannot_keep;
  }
  if (load_all (img) == -1) {
    if (errno != EINVAL)
      return -1;
    goto cannot_keep;
  }
  for (i = 0; i < img->nr_bitmaps; i++) {
    struct bitmap *bm = &img->bitmaps[i];

    if (bm->flags & BME_FLAG_IN_USE)
      nbdkit_error ("%s: bitmap '%s' is in use (inconsistent: its writer "
                    "did not close the image): it is left as it is and "
                    "not served", img->name, bm->name);
    else if ((bm->flags & BME_FLAG_AUTO) && !img->readonly)
      bm->keep = true;
  }
  img->bitmaps_kept = !img->readonly;
  nbdkit_debug ("%s: %" PRIu32 " bitmaps loaded", img->name,
                img->nr_bitmaps);
  return 0;

 cannot_keep:
  bitmap_free (img);
  if (img->readonly)
    nbdkit_error ("%s: the bitmaps cannot be read: not served", img->name);
  else
    nbdkit_error ("%s: the bitmaps cannot be kept: the first write will mark "
                  "them all inconsistent (clear the autoclear bit), as any "
                  "program without bitmap support does", img->name);
  return 0;
}

void
bitmap_free (struct qcow2_image *img)
{
  uint32_t i, j;

  for (i = 0; i < img->nr_bitmaps; i++) {
    struct bitmap *bm = &img->bitmaps[i];

    if (bm->pages)
      for (j = 0; j < bm->table_size; j++)
        free (bm->pages[j]);
    free (bm->pages);
    free (bm->page_flags);
    free (bm->table);
    free (bm->name);
  }
  free (img->bitmaps);
  free (img->bitmap_dir);
  img->bitmaps = NULL;
  img->bitmap_dir = NULL;
  img->nr_bitmaps = 0;
}

/* After the repair of an image left dirty (check_repair_dirty, before
 * header_prepare_write): its refcounts are true now, so the bitmap
 * clusters are judged by them as ours_alone does at open.  One shared
 * (a corrupt L2 entry pointing at it gets refcount 2) means the bitmaps
 * cannot be kept: the autoclear bit is then cleared.  They are not
 * freed (bitmap_set and bitmap_extents may be running without the
 * lock), only marked lost.
 */
void
bitmap_check_repaired (struct qcow2_image *img)
{
  uint32_t i;
  uint64_t j;
  bool ok = true;

  if (!img->bitmaps_kept)
    return;
  ok = refcounts_one (img, img->bitmap_dir_offset, img->bitmap_dir_size);
  for (i = 0; ok && i < img->nr_bitmaps; i++) {
    struct bitmap *bm = &img->bitmaps[i];

    ok = refcounts_one (img, bm->table_offset, (uint64_t) bm->table_size * 8);
    for (j = 0; ok && j < bm->table_size; j++)
      if (bm->table[j] & BTE_OFFSET_MASK)
        ok = refcounts_one (img, bm->table[j] & BTE_OFFSET_MASK,
                            img->cluster_size);
  }
  if (ok)
    return;
  nbdkit_error ("%s: after the repair of the dirty image a bitmap cluster "
                "is shared (or its refcount unreadable): the bitmaps cannot "
                "be kept: this write marks them all inconsistent (clears "
                "the autoclear bit)", img->name);
  for (i = 0; i < img->nr_bitmaps; i++)
    __atomic_store_n (&img->bitmaps[i].lost, true, __ATOMIC_RELAXED);
  img->bitmaps_kept = false;
}

/* ---- the in-use flags --------------------------------------------- */

/* Write every bitmap's flags into the directory (in place: only flag
 * words change, each inside one sector) and sync.
 */
static int
write_directory (struct qcow2_image *img)
{
  uint32_t i;

  for (i = 0; i < img->nr_bitmaps; i++)
    put_be32 (img->bitmap_dir + img->bitmaps[i].dir_pos + BME_FLAGS,
              img->bitmaps[i].flags);
  if (overlap_check_write (img, img->bitmap_dir_offset, img->bitmap_dir_size,
                           OV_BITMAP_DIRECTORY) == -1)
    return -1;
  if (io_pwrite (img->io, img->bitmap_dir, img->bitmap_dir_size,
                 img->bitmap_dir_offset) == -1 ||
      io_flush (img->io) == -1) {
    nbdkit_error ("%s: writing the bitmap directory: %m", img->name);
    return -1;
  }
  return 0;
}

/* Before the first change to the image: the kept bitmaps in use on
 * disk, synced.  header_prepare_write has run (the autoclear bit kept).
 */
int
bitmap_prepare_write (struct qcow2_image *img)
{
  uint32_t i;
  bool change = false;

  if (bitmap_write_ready (img))
    return 0;
  for (i = 0; i < img->nr_bitmaps; i++)
    if (img->bitmaps[i].keep) {
      img->bitmaps[i].flags |= BME_FLAG_IN_USE;
      change = true;
    }
  if (change && write_directory (img) == -1)
    return -1;
  img->bitmaps_marked = true;
  return 0;
}

/* ---- setting bits ------------------------------------------------- */

/* Page j of bm, made (empty, not loaded) if missing; NULL on ENOMEM. */
static uint64_t *
get_page (struct qcow2_image *img, struct bitmap *bm, uint64_t j)
{
  uint64_t *p = __atomic_load_n (&bm->pages[j], __ATOMIC_ACQUIRE), *expect;

  if (p)
    return p;
  p = calloc (1, img->cluster_size);
  if (p == NULL)
    return NULL;
  expect = NULL;
  if (__atomic_compare_exchange_n (&bm->pages[j], &expect, p, false,
                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    return p;
  free (p);
  return expect;
}

/* Set bits [a, b) of a page; true if any was clear.  Bits are in
 * little-endian order in the file, so words are kept as on disk.
 */
static bool
set_bits (uint64_t *w, uint64_t a, uint64_t b)
{
  bool changed = false;

  while (a < b) {
    uint64_t i = a >> 6, lo = a & 63, hi = b - (a & ~UINT64_C(63));
    uint64_t mask = ~UINT64_C(0) << lo;

    if (hi < 64)
      mask &= (UINT64_C(1) << hi) - 1;
    mask = htole64 (mask);
    if ((__atomic_load_n (&w[i], __ATOMIC_RELAXED) & mask) != mask) {
      __atomic_fetch_or (&w[i], mask, __ATOMIC_RELAXED);
      changed = true;
    }
    a = (i + 1) << 6;
  }
  return changed;
}

static void
set_range (struct qcow2_image *img, struct bitmap *bm, uint64_t offset,
           uint64_t count)
{
  unsigned pb = page_bits (img);
  uint64_t g = offset >> bm->gran_bits;
  uint64_t end = ((offset + count - 1) >> bm->gran_bits) + 1;

  while (g < end) {
    uint64_t j = g >> pb, base = j << pb, n = min_u64 (end, base + (UINT64_C(1) << pb));
    uint64_t *page;

    if ((bm->table[j] & BTE_ALL_ONES) && !(bm->table[j] & BTE_OFFSET_MASK)) {
      g = n;                    /* all ones already */
      continue;
    }
    page = get_page (img, bm, j);
    if (page == NULL) {
      /* The bits cannot be recorded: the bitmap stays in use on disk. */
      if (!__atomic_exchange_n (&bm->lost, true, __ATOMIC_RELAXED))
        nbdkit_error ("%s: bitmap '%s': out of memory: it will be left "
                      "inconsistent", img->name, bm->name);
      return;
    }
    if (set_bits (page, g - base, n - base) &&
        !(__atomic_load_n (&bm->page_flags[j], __ATOMIC_RELAXED) &
          PAGE_DIRTY))
      __atomic_fetch_or (&bm->page_flags[j], PAGE_DIRTY, __ATOMIC_RELAXED);
    g = n;
  }
}

/* Guest [offset, offset+count) is about to change: set its bits in
 * every kept bitmap.
 */
void
bitmap_set (struct qcow2_image *img, uint64_t offset, uint64_t count)
{
  uint32_t i;

  if (count == 0)
    return;
  for (i = 0; i < img->nr_bitmaps; i++)
    if (img->bitmaps[i].keep)
      set_range (img, &img->bitmaps[i], offset, count);
}

/* ---- reading bits back -------------------------------------------- */

/* Page j with the bits on disk merged in; NULL with a message. */
static uint64_t *
get_loaded_page (struct qcow2_image *img, struct bitmap *bm, uint64_t j)
{
  uint64_t e = bm->table[j], off = e & BTE_OFFSET_MASK, *page, *disk, k;
  uint64_t words = img->cluster_size / 8;

  page = get_page (img, bm, j);
  if (page == NULL) {
    nbdkit_error ("%s: bitmap '%s': %m", img->name, bm->name);
    return NULL;
  }
  if (__atomic_load_n (&bm->page_flags[j], __ATOMIC_ACQUIRE) & PAGE_LOADED)
    return page;
  if (off) {
    disk = malloc (img->cluster_size);
    if (disk == NULL) {
      nbdkit_error ("%s: bitmap '%s': %m", img->name, bm->name);
      return NULL;
    }
    if (io_pread (img->io, disk, img->cluster_size, off) == -1) {
      nbdkit_error ("%s: bitmap '%s': reading bits at %#" PRIx64 ": %m",
                    img->name, bm->name, off);
      free (disk);
      return NULL;
    }
    for (k = 0; k < words; k++)
      if (disk[k])
        __atomic_fetch_or (&page[k], disk[k], __ATOMIC_RELAXED);
    free (disk);
  }
  else if (e & BTE_ALL_ONES)
    for (k = 0; k < words; k++)
      __atomic_store_n (&page[k], ~UINT64_C(0), __ATOMIC_RELAXED);
  __atomic_fetch_or (&bm->page_flags[j], PAGE_LOADED, __ATOMIC_RELEASE);
  return page;
}

static inline bool
test_bit (const uint64_t *w, uint64_t b)
{
  return le64toh (__atomic_load_n (&w[b >> 6], __ATOMIC_RELAXED)) >>
    (b & 63) & 1;
}

/* From granule g of a page, the first granule whose bit differs from
 * g's, at most 'end'.
 */
static uint64_t
run_end (const uint64_t *w, uint64_t g, uint64_t end)
{
  bool v = test_bit (w, g);

  for (g++; g < end; g++) {
    uint64_t word;

    if ((g & 63) == 0 && end - g >= 64) {
      word = __atomic_load_n (&w[g >> 6], __ATOMIC_RELAXED);
      if (word == (v ? ~UINT64_C(0) : 0)) {
        g += 63;
        continue;
      }
    }
    if (test_bit (w, g) != v)
      break;
  }
  return g;
}

int
bitmap_extents (struct qcow2_image *img, uint32_t i, uint64_t count,
                uint64_t offset, bool req_one, qcow2_extent_fn fn,
                void *opaque)
{
  struct bitmap *bm;
  unsigned pb = page_bits (img);
  uint64_t end = offset + count, pos = offset;
  uint64_t run_start = offset, scratch_j = UINT64_MAX, *scratch = NULL;
  int run_type = -1, r = -1;

  if (i >= img->nr_bitmaps ||
      ((img->bitmaps[i].flags & BME_FLAG_IN_USE) && !img->bitmaps[i].keep) ||
      img->bitmaps[i].lost) {
    nbdkit_error ("%s: bitmap %" PRIu32 " does not exist or is inconsistent",
                  img->name, i);
    errno = EINVAL;
    return -1;
  }
  bm = &img->bitmaps[i];
  while (pos < end) {
    uint64_t g = pos >> bm->gran_bits, j = g >> pb, base = j << pb;
    uint64_t gend = min_u64 (base + (UINT64_C(1) << pb),
                             ((end - 1) >> bm->gran_bits) + 1);
    uint64_t next, e = bm->table[j], off = e & BTE_OFFSET_MASK;
    uint64_t *page = __atomic_load_n (&bm->pages[j], __ATOMIC_ACQUIRE);
    int type;

    if (page == NULL && off == 0) {
      /* Nothing set since open: the table entry says it all. */
      type = (e & BTE_ALL_ONES) ? 0 : QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      next = gend;
    }
    else {
      if (page == NULL) {
        /* Bits on disk only: read, not kept, so that memory stays
         * bounded by what was written since open (a hostile table may
         * point every entry at one cluster).
         */
        if (scratch == NULL &&
            (scratch = malloc (img->cluster_size)) == NULL) {
          nbdkit_error ("%s: bitmap '%s': %m", img->name, bm->name);
          goto out;
        }
        if (scratch_j != j) {
          scratch_j = UINT64_MAX;
          if (io_pread (img->io, scratch, img->cluster_size, off) == -1) {
            nbdkit_error ("%s: bitmap '%s': reading bits at %#" PRIx64
                          ": %m", img->name, bm->name, off);
            goto out;
          }
          scratch_j = j;
        }
        page = scratch;
      }
      else if ((page = get_loaded_page (img, bm, j)) == NULL)
        goto out;
      type = test_bit (page, g - base) ? 0
                                        : QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      next = base + run_end (page, g - base, gend - base);
    }
    /* Granules to bytes (no overflow: next <= end's granule + 1). */
    next = min_u64 (next << bm->gran_bits, end);
    if (run_type != -1 && type != run_type) {
      if (fn (opaque, run_start, pos - run_start, run_type) == -1)
        goto out;
      if (req_one) {
        r = 0;
        goto out;
      }
      run_start = pos;
    }
    run_type = type;
    pos = next;
  }
  if (run_type != -1 && fn (opaque, run_start, end - run_start,
                            run_type) == -1)
    goto out;
  r = 0;
 out:
  free (scratch);
  return r;
}

/* ---- storing at close --------------------------------------------- */

/* Write the changed pages of bm, then its table if entries changed. */
static int
store_one (struct qcow2_image *img, struct bitmap *bm)
{
  uint64_t j, *be;
  uint64_t len = (uint64_t) bm->table_size * 8;
  bool table_changed = false;
  int r;

  for (j = 0; j < bm->table_size; j++) {
    uint64_t off = bm->table[j] & BTE_OFFSET_MASK, *page;
    int64_t new_off;

    if (!(bm->page_flags[j] & PAGE_DIRTY) ||
        (!off && (bm->table[j] & BTE_ALL_ONES)))
      continue;
    page = get_loaded_page (img, bm, j);
    if (page == NULL)
      return -1;
    if (off == 0) {
      new_off = refcount_alloc (img, 1);
      if (new_off == -1)
        return -1;
      off = new_off;
      bm->table[j] = off;
      table_changed = true;
    }
    if (overlap_check_write (img, off, img->cluster_size, 0) == -1)
      return -1;
    if (io_pwrite (img->io, page, img->cluster_size, off) == -1) {
      nbdkit_error ("%s: bitmap '%s': writing bits at %#" PRIx64 ": %m",
                    img->name, bm->name, off);
      return -1;
    }
    img->need_sync = true;
  }
  if (!table_changed)
    return 0;
  /* Refcounts of the new clusters and the bits themselves on disk
   * before the table points at them.
   */
  if (l2_barrier (img) == -1)
    return -1;
  be = malloc (len);
  if (be == NULL) {
    nbdkit_error ("%s: bitmap '%s': %m", img->name, bm->name);
    return -1;
  }
  for (j = 0; j < bm->table_size; j++)
    be[j] = htobe64 (bm->table[j]);
  r = overlap_check_write (img, bm->table_offset, len, OV_BITMAP_TABLE);
  if (r == 0 && (r = io_pwrite (img->io, be, len, bm->table_offset)) == -1)
    nbdkit_error ("%s: bitmap '%s': writing its table at %#" PRIx64 ": %m",
                  img->name, bm->name, bm->table_offset);
  free (be);
  return r;
}

/* At a clean close, everything else written back: store the kept
 * bitmaps and clear their in-use flags.  A bitmap that cannot be
 * stored stays in use on disk (inconsistent), which is the truth.
 */
int
bitmap_store (struct qcow2_image *img)
{
  uint32_t i;
  int r = 0;

  if (!img->bitmaps_marked || img->corrupt)
    return 0;
  for (i = 0; i < img->nr_bitmaps; i++) {
    struct bitmap *bm = &img->bitmaps[i];

    if (!bm->keep || bm->lost)
      continue;
    if (store_one (img, bm) == -1) {
      bm->lost = true;
      r = -1;
    }
  }
  /* Everything the tables point at, and the tables, on disk first. */
  if (refcount_write_back (img) == -1 || io_flush (img->io) == -1) {
    nbdkit_error ("%s: storing bitmaps: %m", img->name);
    return -1;
  }
  for (i = 0; i < img->nr_bitmaps; i++)
    if (img->bitmaps[i].keep && !img->bitmaps[i].lost)
      img->bitmaps[i].flags &= ~BME_FLAG_IN_USE;
  if (write_directory (img) == -1)
    return -1;
  img->bitmaps_marked = false;
  return r;
}

/* ---- public ------------------------------------------------------- */

uint32_t
qcow2_nr_bitmaps (struct qcow2_image *img)
{
  return img->nr_bitmaps;
}

int
qcow2_bitmap_info (struct qcow2_image *img, uint32_t i,
                   struct qcow2_bitmap_info *info)
{
  const struct bitmap *bm;

  if (i >= img->nr_bitmaps) {
    errno = EINVAL;
    return -1;
  }
  bm = &img->bitmaps[i];
  info->name = bm->name;
  info->granularity = UINT64_C(1) << bm->gran_bits;
  info->enabled = bm->flags & BME_FLAG_AUTO;
  info->in_use = (bm->flags & BME_FLAG_IN_USE) && !bm->keep;
  return 0;
}
