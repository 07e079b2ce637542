/* nbdkit-qcow2: the metadata overlap check.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Every host write (guest data, COW, every metadata write-back) asks
 * overlap_check_write first: "does [off, off+len) touch metadata of a
 * type I am not writing on purpose?".  The answer comes from a map of
 * host clusters to metadata types (overlap-map.c), so its cost does not
 * depend on the size of the image or the number of snapshots, unlike
 * QEMU's check which walks the whole L1 table for every write.  That is
 * why the default here is "all" (QEMU defaults to "cached", which skips
 * inactive L2 tables).
 *
 * The map is built at open from tables already in memory (header, L1,
 * refcount table) plus the L2 and refcount block offsets they hold, the
 * snapshot table and every snapshot's L1 and L2 tables, and the bitmap
 * directory and tables; it is kept current by overlap_add/remove as the
 * allocator creates and frees metadata clusters.
 *
 * On a hit the write is refused with EIO, the image is marked corrupt
 * (header_mark_corrupt logs once and sets the corrupt bit) and every
 * later write fails; reads go on.
 *
 * Read-only images build no map: nothing is ever written.  Writable
 * ones always build it, whatever overlap-check says: the level chooses
 * which types each host write is checked against, but the allocator
 * (no cluster holding metadata is handed out, whatever its refcount)
 * and the frees (no L2 entry over metadata is freed, write.c) consult
 * the whole map at every level.  overlap-check=none switches off the
 * per-write check, not those guards.
 *
 * Locking: called with img->lock held exclusively; overlap_write_ok
 * needs it only shared.
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

static const char *const type_names[OV_NR_TYPES] = {
  "the image header", "the active L1 table", "an active L2 table",
  "the refcount table", "a refcount block", "the snapshot table",
  "an inactive L1 table", "an inactive L2 table", "the bitmap directory",
  "a bitmap table", "the encryption header",
};

const char *
overlap_type_name (unsigned types)
{
  unsigned i;

  for (i = 0; i < OV_NR_TYPES; i++)
    if (types & (1u << i))
      return type_names[i];
  return "metadata";
}

static unsigned
mode_mask (enum qcow2_overlap_mode mode)
{
  const unsigned constant = OV_MAIN_HEADER | OV_ACTIVE_L1 |
    OV_REFCOUNT_TABLE | OV_SNAPSHOT_TABLE | OV_BITMAP_DIRECTORY |
    OV_CRYPTO_HEADER;

  switch (mode) {
  case QCOW2_OVERLAP_NONE: return 0;
  case QCOW2_OVERLAP_CONSTANT: return constant;
  case QCOW2_OVERLAP_CACHED:
    return constant | OV_ACTIVE_L2 | OV_REFCOUNT_BLOCK | OV_INACTIVE_L1 |
      OV_BITMAP_TABLE;
  case QCOW2_OVERLAP_ALL:
  case QCOW2_OVERLAP_DEFAULT:
  default:
    return OV_ALL;
  }
}

int
overlap_add (struct qcow2_image *img, uint64_t off, uint64_t len,
             unsigned types)
{
  if (img->overlap == NULL || len == 0)
    return 0;
  if (overlap_map_add (img->overlap, off >> img->cluster_bits,
                       size_to_clusters (img, offset_into_cluster (img, off)
                                         + len), types) == -1) {
    nbdkit_error ("%s: overlap map: %m", img->name);
    return -1;
  }
  return 0;
}

void
overlap_remove (struct qcow2_image *img, uint64_t off, uint64_t len,
                unsigned types)
{
  if (img->overlap == NULL || len == 0)
    return;
  /* Removal can need memory to split a run; if it fails the map merely
   * stays more conservative than it needs to be.
   */
  overlap_map_remove (img->overlap, off >> img->cluster_bits,
                      size_to_clusters (img, offset_into_cluster (img, off)
                                        + len), types);
}

/* Add the L2 tables an L1 table points to. */
static int
add_l2_tables (struct qcow2_image *img, const uint64_t *l1, uint32_t n,
               unsigned type)
{
  uint32_t i;

  for (i = 0; i < n; i++) {
    uint64_t off = l1[i] & L1E_OFFSET_MASK;
    if (off && overlap_add (img, off, img->cluster_size, type) == -1)
      return -1;
  }
  return 0;
}

static int
add_bitmaps (struct qcow2_image *img)
{
  uint8_t *dir;
  uint64_t pos = 0;
  uint32_t i;
  int r = -1;

  if (img->nb_bitmaps == 0 || img->bitmap_dir_size == 0)
    return 0;
  if (overlap_add (img, img->bitmap_dir_offset, img->bitmap_dir_size,
                   OV_BITMAP_DIRECTORY) == -1)
    return -1;
  dir = malloc (img->bitmap_dir_size);
  if (dir == NULL)
    return -1;
  if (io_pread (img->io, dir, img->bitmap_dir_size,
                img->bitmap_dir_offset) == -1)
    goto out;
  for (i = 0; i < img->nb_bitmaps; i++) {
    uint64_t table_off, table_len;
    uint32_t table_size, extra;
    uint16_t name_size;

    if (pos >= img->bitmap_dir_size || img->bitmap_dir_size - pos < 24)
      break;                    /* bitmaps are not ours to validate */
    memcpy (&table_off, dir + pos, 8);
    memcpy (&table_size, dir + pos + 8, 4);
    memcpy (&name_size, dir + pos + 18, 2);
    memcpy (&extra, dir + pos + 20, 4);
    table_off = be64toh (table_off) & L1E_OFFSET_MASK;
    table_len = (uint64_t) be32toh (table_size) * 8;
    if (table_off && overlap_add (img, table_off, table_len,
                                  OV_BITMAP_TABLE) == -1)
      goto out;
    pos += round_up_pow2 (24 + (uint64_t) be32toh (extra) +
                          be16toh (name_size), 8);
  }
  r = 0;
 out:
  free (dir);
  return r;
}

int
overlap_build (struct qcow2_image *img)
{
  uint64_t i;
  uint32_t s;

  if (img->readonly)
    return 0;
  img->overlap = overlap_map_new (img->cluster_bits);
  if (img->overlap == NULL)
    return -1;

  /* The header cluster holds the extensions and the backing file name. */
  if (overlap_add (img, 0, img->cluster_size, OV_MAIN_HEADER) == -1 ||
      overlap_add (img, img->l1_offset, (uint64_t) img->l1_size * 8,
                   OV_ACTIVE_L1) == -1 ||
      add_l2_tables (img, img->l1, img->l1_size, OV_ACTIVE_L2) == -1 ||
      overlap_add (img, img->reftable_offset,
                   (uint64_t) img->reftable_clusters << img->cluster_bits,
                   OV_REFCOUNT_TABLE) == -1)
    return -1;
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t off = img->reftable[i] & RT_OFFSET_MASK;
    if (off && overlap_add (img, off, img->cluster_size,
                            OV_REFCOUNT_BLOCK) == -1)
      return -1;
  }
  if (img->nb_snapshots &&
      overlap_add (img, img->snapshots_offset, img->snapshots_size,
                   OV_SNAPSHOT_TABLE) == -1)
    return -1;
  for (s = 0; s < img->nb_snapshots; s++) {
    const struct snapshot *sn = &img->snapshots[s];
    uint64_t *l1;
    int r;

    if (overlap_add (img, sn->l1_offset, (uint64_t) sn->l1_size * 8,
                     OV_INACTIVE_L1) == -1)
      return -1;
    l1 = snapshot_read_l1 (img, sn);
    if (l1 == NULL)
      return -1;
    r = add_l2_tables (img, l1, sn->l1_size, OV_INACTIVE_L2);
    free (l1);
    if (r == -1)
      return -1;
  }
  if (img->crypto_length &&
      overlap_add (img, img->crypto_offset, img->crypto_length,
                   OV_CRYPTO_HEADER) == -1)
    return -1;
  if (add_bitmaps (img) == -1)
    return -1;
  nbdkit_debug ("%s: overlap map built: %zu bytes", img->name,
                overlap_map_memory (img->overlap));
  return 0;
}

void
overlap_free (struct qcow2_image *img)
{
  struct overlap_map_stats st;

  if (img->overlap != NULL &&
      overlap_map_get_stats (img->overlap, &st, sizeof st) == 0)
    nbdkit_debug ("%s: overlap map at close: %zu bytes, %zu runs, "
                  "%zu windows", img->name, st.bytes, st.runs, st.windows);
  overlap_map_free (img->overlap);
  img->overlap = NULL;
}

bool
overlap_write_ok (struct qcow2_image *img, uint64_t off, uint64_t len,
                  unsigned types)
{
  unsigned mask = mode_mask (img->cfg.overlap_check) & ~types;
  uint64_t hit, first, n;

  if (img->overlap == NULL || mask == 0 || len == 0)
    return true;
  first = off >> img->cluster_bits;
  n = ((off + len - 1) >> img->cluster_bits) - first + 1;
  return overlap_map_query (img->overlap, first, n, mask, &hit) == 0;
}

int
overlap_check_write (struct qcow2_image *img, uint64_t off, uint64_t len,
                     unsigned types)
{
  unsigned mask = mode_mask (img->cfg.overlap_check) & ~types;
  uint64_t hit, first, n;
  unsigned found;

  if (img->overlap == NULL || mask == 0 || len == 0)
    return 0;
  first = off >> img->cluster_bits;
  n = ((off + len - 1) >> img->cluster_bits) - first + 1;
  found = overlap_map_query (img->overlap, first, n, mask, &hit);
  if (found == 0)
    return 0;
  return header_mark_corrupt (img, "preventing invalid write of %" PRIu64
                              " bytes at %#" PRIx64 " as %s: it overlaps "
                              "%s at %#" PRIx64, len, off,
                              types ? overlap_type_name (types)
                                    : "guest data",
                              overlap_type_name (found),
                              hit << img->cluster_bits);
}
