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
 * The map is built at open by the metadata walk (walk.c, without
 * follow): the header cluster, the active L1 and its L2 tables, the
 * refcount table and blocks, the snapshot table and every snapshot's L1
 * and L2 tables, the crypto header, and the bitmap directory and
 * tables, each recorded as its parent describes it, even unaligned or
 * oversized (a conservative map refuses more writes, never fewer); the
 * walk reads only the snapshot L1 tables and the bitmap directory.
 * Guest data and bitmap data are not metadata and are not recorded.
 * The map is kept current by overlap_add/remove as the allocator
 * creates and frees metadata clusters.
 *
 * On a hit the write is refused with EIO, the image is marked corrupt
 * (header_mark_corrupt logs once and sets the corrupt bit) and every
 * later write fails; reads go on.
 *
 * Read-only images build no map: nothing is ever written.  Writable
 * ones always build it, whatever overlap-check says: the level chooses
 * which types each host write is checked against, but the allocator
 * (no cluster holding metadata is handed out, whatever its refcount)
 * and the frees (no L2 entry over metadata is freed, l2.c) consult
 * the whole map at every level.  overlap-check=none switches off the
 * per-write check, not those guards.
 *
 * Locking: called with img->lock held exclusively; overlap_write_ok
 * needs it only shared.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>

#include "internal.h"
#include "overlap.h"
#include "walk.h"

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

/* The overlap type of each kind of metadata the walk visits; 0 for
 * what it visits only with follow (data), which the map never asks for.
 */
static const unsigned walk_types[WALK_NR_KINDS] = {
  [WALK_HEADER] = OV_MAIN_HEADER,
  [WALK_ACTIVE_L1] = OV_ACTIVE_L1,
  [WALK_ACTIVE_L2] = OV_ACTIVE_L2,
  [WALK_REFCOUNT_TABLE] = OV_REFCOUNT_TABLE,
  [WALK_REFCOUNT_BLOCK] = OV_REFCOUNT_BLOCK,
  [WALK_SNAPSHOT_TABLE] = OV_SNAPSHOT_TABLE,
  [WALK_INACTIVE_L1] = OV_INACTIVE_L1,
  [WALK_INACTIVE_L2] = OV_INACTIVE_L2,
  [WALK_CRYPTO_HEADER] = OV_CRYPTO_HEADER,
  [WALK_BITMAP_DIRECTORY] = OV_BITMAP_DIRECTORY,
  [WALK_BITMAP_TABLE] = OV_BITMAP_TABLE,
};

static int
add_walked (void *opaque, enum walk_kind kind, uint64_t off, uint64_t len)
{
  struct qcow2_image *img = opaque;

  if (walk_types[kind] == 0)
    return 0;
  return overlap_add (img, off, len, walk_types[kind]);
}

int
overlap_build (struct qcow2_image *img)
{
  static const struct walk_ops ops = {
    .visit = add_walked, .follow = false, .who = "overlap map",
  };

  if (img->readonly)
    return 0;
  img->overlap = overlap_map_new (img->cluster_bits);
  if (img->overlap == NULL)
    return -1;
  if (walk_metadata (img, &ops, img) == -1)
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
