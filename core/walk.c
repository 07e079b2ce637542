/* nbdkit-qcow2: one walk over all the metadata of an image.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Two users need to know what every host cluster of the file is: the
 * overlap map (overlap.c, built at open) records which clusters hold
 * metadata, and check.c recomputes every refcount from the references
 * (qemu-img check).  This file is the one walk they share; it keeps
 * nothing and tells its caller, through walk_ops.visit, each range and
 * what it is:
 *
 *   header cluster
 *   active L1 ------------> L2 tables ------> (data, compressed)
 *   refcount table -------> refcount blocks
 *   snapshot table -------> snapshot L1s --> L2 tables --> (data, ...)
 *   crypto header
 *   bitmap directory -----> bitmap tables --> (bitmap data)
 *
 * Two depths.  Without follow (the overlap map) it reads only what it
 * must to find metadata: each snapshot's L1 table and the bitmap
 * directory.  It then visits every structure as its parent describes
 * it, aligned or not, of any size: the map is to protect whatever a
 * table points at.  With follow (check) it also reads every L2 table
 * and bitmap table and visits what they point to (in parentheses
 * above), and it visits only what it follows:
 *
 *  - an L2 table whose offset is not cluster aligned is an error: it is
 *    logged, passed to walk_ops.bad, and neither visited nor read;
 *  - a bitmap table that is empty or has more than MAX_BITMAP_TABLE
 *    entries is skipped without a word (bitmaps are not ours to
 *    validate; qemu-img check judges them);
 *  - standard clusters are visited only without an external data file
 *    (with one, their offsets are in that file).
 *
 * Values read from the file are untrusted.  The tables the header
 * points to (L1, refcount table, snapshot table, bitmap directory) and
 * each snapshot's L1 table were checked against the file size and
 * their limits at open (header.c, snapshot.c).  What is read here
 * beyond them is bounded: one cluster per L2 table, the bitmap
 * directory (at most 64 MiB, header.c), at most MAX_BITMAP_TABLE
 * entries per bitmap table; directory entries are parsed only while a
 * whole fixed part remains.  Offsets found in L2 and bitmap tables are
 * passed on as they are: the users judge them (check.c counts those
 * past the end of the file as errors; the map records anything).
 *
 * The reads are raw io, not through the L2 cache: check.c flushes the
 * caches first, and the overlap map is built at open.
 *
 * Locking: img->lock held exclusively, or the image not yet shared.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"
#include "walk.h"


struct walk {
  struct qcow2_image *img;
  const struct walk_ops *ops;
  void *opaque;
  uint64_t *buf;                /* one cluster, with follow */
};

static int
visit (struct walk *w, enum walk_kind kind, uint64_t off, uint64_t len)
{
  if (len == 0)
    return 0;
  return w->ops->visit (w->opaque, kind, off, len);
}

/* Where the compressed cluster of L2 entry 'e' lives: whole sectors. */
static void
compressed_range (const struct qcow2_image *img, uint64_t e,
                  uint64_t *off, uint64_t *len)
{
  uint64_t first, end;

  l2e_compressed (img, e, &first, &end);
  *off = first & ~UINT64_C(511);
  *len = end - *off;
}

/* Visit the clusters the L2 table at 'l2' points to. */
static int
follow_l2 (struct walk *w, uint64_t l2)
{
  struct qcow2_image *img = w->img;
  uint64_t n = UINT64_C(1) << img->l2_bits, i, off, len;
  unsigned step = img->l2_entry_shift == 4 ? 2 : 1;

  if (io_pread (img->io, w->buf, img->cluster_size, l2) == -1) {
    nbdkit_error ("%s: %s: reading L2 table at %#" PRIx64 ": %m",
                  img->name, w->ops->who, l2);
    return -1;
  }
  for (i = 0; i < n; i++) {
    uint64_t e = be64toh (w->buf[i * step]);
    int r = 0;

    if (e & QCOW_OFLAG_COMPRESSED) {
      compressed_range (img, e, &off, &len);
      r = visit (w, WALK_COMPRESSED, off, len);
    }
    else if ((e & L2E_OFFSET_MASK) && !img->data_file_name)
      r = visit (w, WALK_DATA, e & L2E_OFFSET_MASK, img->cluster_size);
    if (r == -1)
      return -1;
  }
  return 0;
}

/* The L2 tables of an L1 table (already in host byte order). */
static int
walk_l1 (struct walk *w, const uint64_t *l1, uint32_t n,
         enum walk_kind kind)
{
  struct qcow2_image *img = w->img;
  uint32_t i;

  for (i = 0; i < n; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK;

    if (l2 == 0)
      continue;
    if (w->ops->follow && offset_into_cluster (img, l2)) {
      nbdkit_error ("%s: %s: L2 table offset %#" PRIx64 " is not "
                    "cluster aligned", img->name, w->ops->who, l2);
      if (w->ops->bad)
        w->ops->bad (w->opaque, kind, l2);
      continue;
    }
    if (visit (w, kind, l2, img->cluster_size) == -1 ||
        (w->ops->follow && follow_l2 (w, l2) == -1))
      return -1;
  }
  return 0;
}

static int
walk_refcounts (struct walk *w)
{
  struct qcow2_image *img = w->img;
  uint64_t i;

  if (visit (w, WALK_REFCOUNT_TABLE, img->reftable_offset,
             (uint64_t) img->reftable_clusters << img->cluster_bits) == -1)
    return -1;
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t off = img->reftable[i] & RT_OFFSET_MASK;
    if (off && visit (w, WALK_REFCOUNT_BLOCK, off, img->cluster_size) == -1)
      return -1;
  }
  return 0;
}

static int
walk_snapshots (struct walk *w)
{
  struct qcow2_image *img = w->img;
  uint32_t s;

  if (img->nb_snapshots &&
      visit (w, WALK_SNAPSHOT_TABLE, img->snapshots_offset,
             img->snapshots_size) == -1)
    return -1;
  for (s = 0; s < img->nb_snapshots; s++) {
    const struct snapshot *sn = &img->snapshots[s];
    uint64_t *l1;
    int r;

    if (visit (w, WALK_INACTIVE_L1, sn->l1_offset,
               (uint64_t) sn->l1_size * 8) == -1)
      return -1;
    l1 = snapshot_read_l1 (img, sn);
    if (l1 == NULL)
      return -1;
    r = walk_l1 (w, l1, sn->l1_size, WALK_INACTIVE_L2);
    free (l1);
    if (r == -1)
      return -1;
  }
  return 0;
}

/* The fixed part of the directory entry at 'pos' into e; false when
 * not even that is left.
 */
bool
bitmap_dir_entry (const uint8_t *dir, uint64_t size, uint64_t pos,
                  struct bitmap_dir_entry *e)
{
  const uint8_t *p;

  if (pos >= size || size - pos < BME_FIXED_SIZE)
    return false;
  p = dir + pos;
  e->table_offset = get_be64 (p + BME_TABLE_OFFSET);
  e->table_size = get_be32 (p + BME_TABLE_SIZE);
  e->flags = get_be32 (p + BME_FLAGS);
  e->type = p[BME_TYPE];
  e->gran_bits = p[BME_GRANULARITY_BITS];
  e->name_size = get_be16 (p + BME_NAME_SIZE);
  e->extra = get_be32 (p + BME_EXTRA_DATA_SIZE);
  e->name = (const char *) p + BME_FIXED_SIZE + e->extra;
  e->len = round_up_pow2 (BME_FIXED_SIZE + (uint64_t) e->extra +
                          e->name_size, 8);
  return true;
}

/* Visit the clusters of bitmap data a bitmap table points to. */
static int
follow_bitmap_table (struct walk *w, const struct bitmap_dir_entry *e)
{
  struct qcow2_image *img = w->img;
  size_t len = (size_t) e->table_size * 8;
  uint64_t *t = malloc (len);
  uint32_t j;
  int r = -1;

  if (t == NULL) {
    nbdkit_error ("%s: %s: bitmap table at %#" PRIx64 ": %m", img->name,
                  w->ops->who, e->table_offset);
    return -1;
  }
  if (io_pread (img->io, t, len, e->table_offset) == -1) {
    nbdkit_error ("%s: %s: reading bitmap table at %#" PRIx64 ": %m",
                  img->name, w->ops->who, e->table_offset);
    goto out;
  }
  for (j = 0; j < e->table_size; j++) {
    uint64_t off = be64toh (t[j]) & L1E_OFFSET_MASK;
    if (off && visit (w, WALK_BITMAP_DATA, off, img->cluster_size) == -1)
      goto out;
  }
  r = 0;
 out:
  free (t);
  return r;
}

static int
walk_bitmap_entry (struct walk *w, const struct bitmap_dir_entry *e)
{
  uint64_t len = (uint64_t) e->table_size * 8;

  if (e->table_offset == 0)
    return 0;
  if (!w->ops->follow)
    return visit (w, WALK_BITMAP_TABLE, e->table_offset, len);
  if (e->table_size == 0 || e->table_size > MAX_BITMAP_TABLE)
    return 0;
  if (visit (w, WALK_BITMAP_TABLE, e->table_offset, len) == -1)
    return -1;
  return follow_bitmap_table (w, e);
}

static int
walk_bitmaps (struct walk *w)
{
  struct qcow2_image *img = w->img;
  struct bitmap_dir_entry e;
  uint8_t *dir;
  uint64_t pos = 0;
  uint32_t i;
  int r = -1;

  if (img->nb_bitmaps == 0 || img->bitmap_dir_size == 0)
    return 0;
  if (visit (w, WALK_BITMAP_DIRECTORY, img->bitmap_dir_offset,
             img->bitmap_dir_size) == -1)
    return -1;
  dir = malloc (img->bitmap_dir_size);
  if (dir == NULL) {
    nbdkit_error ("%s: %s: bitmap directory: %m", img->name, w->ops->who);
    return -1;
  }
  if (io_pread (img->io, dir, img->bitmap_dir_size,
                img->bitmap_dir_offset) == -1) {
    nbdkit_error ("%s: %s: reading the bitmap directory at %#" PRIx64
                  ": %m", img->name, w->ops->who, img->bitmap_dir_offset);
    goto out;
  }
  for (i = 0; i < img->nb_bitmaps &&
         bitmap_dir_entry (dir, img->bitmap_dir_size, pos, &e); i++) {
    e.table_offset &= L1E_OFFSET_MASK;
    if (walk_bitmap_entry (w, &e) == -1)
      goto out;
    pos += e.len;
  }
  r = 0;
 out:
  free (dir);
  return r;
}

static int
walk_all (struct walk *w)
{
  struct qcow2_image *img = w->img;

  /* The header cluster holds the extensions and the backing file name. */
  if (visit (w, WALK_HEADER, 0, img->cluster_size) == -1 ||
      visit (w, WALK_ACTIVE_L1, img->l1_offset,
             (uint64_t) img->l1_size * 8) == -1 ||
      walk_l1 (w, img->l1, img->l1_size, WALK_ACTIVE_L2) == -1 ||
      walk_refcounts (w) == -1 ||
      walk_snapshots (w) == -1 ||
      visit (w, WALK_CRYPTO_HEADER, img->crypto_offset,
             img->crypto_length) == -1 ||
      walk_bitmaps (w) == -1)
    return -1;
  return 0;
}

int
walk_metadata (struct qcow2_image *img, const struct walk_ops *ops,
               void *opaque)
{
  struct walk w = { .img = img, .ops = ops, .opaque = opaque };
  int r;

  if (ops->follow) {
    w.buf = malloc (img->cluster_size);
    if (w.buf == NULL) {
      nbdkit_error ("%s: %s: %m", img->name, ops->who);
      return -1;
    }
  }
  r = walk_all (&w);
  free (w.buf);
  return r;
}
