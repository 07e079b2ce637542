/* nbdkit-qcow2: the metadata overlap map and check.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * overlap_map_*: a pure data structure (overlap-map.c: its design and
 * queries; overlap-map-update.c: its updates) mapping host cluster
 * indexes to a bitmask of the metadata types stored there.
 * overlap_*: the image-level glue (overlap.c): building the map at open,
 * keeping it current, and checking every host write against it.
 */

#ifndef QCOW2_OVERLAP_H
#define QCOW2_OVERLAP_H

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

struct qcow2_image;
struct overlap_map;

/* Metadata types (bits; a cluster may carry several, e.g. an L2 table
 * shared by the active L1 and a snapshot).
 */
#define OV_MAIN_HEADER       (1u << 0)
#define OV_ACTIVE_L1         (1u << 1)
#define OV_ACTIVE_L2         (1u << 2)
#define OV_REFCOUNT_TABLE    (1u << 3)
#define OV_REFCOUNT_BLOCK    (1u << 4)
#define OV_SNAPSHOT_TABLE    (1u << 5)
#define OV_INACTIVE_L1       (1u << 6)
#define OV_INACTIVE_L2       (1u << 7)
#define OV_BITMAP_DIRECTORY  (1u << 8)
#define OV_BITMAP_TABLE      (1u << 9)
#define OV_CRYPTO_HEADER     (1u << 10)
#define OV_NR_TYPES          11
#define OV_ALL               ((1u << OV_NR_TYPES) - 1)

/* Pure map.  The window size follows cluster_bits (overlap-map.c). */
extern struct overlap_map *overlap_map_new (unsigned cluster_bits);
extern void overlap_map_free (struct overlap_map *m);
/* OR 'types' into clusters [first, first+n).  -1 on ENOMEM. */
extern int overlap_map_add (struct overlap_map *m, uint64_t first,
                            uint64_t n, unsigned types);
/* Clear 'types' from clusters [first, first+n).  -1 on ENOMEM. */
extern int overlap_map_remove (struct overlap_map *m, uint64_t first,
                               uint64_t n, unsigned types);
/* Union of the types in [first, first+n) that intersect 'mask'; if any,
 * *hit is set to the first cluster carrying one of them.
 */
extern unsigned overlap_map_query (struct overlap_map *m, uint64_t first,
                                   uint64_t n, unsigned mask, uint64_t *hit);
/* Bytes of memory the map uses now: everything it malloc'd. */
extern size_t overlap_map_memory (const struct overlap_map *m);

/* What the map holds, for debug output, tests and benchmarks.  'size'
 * is sizeof *st (catches a stale caller); -1 with EINVAL otherwise.
 */
struct overlap_map_stats {
  unsigned window_bits;         /* clusters a window, log2, now */
  unsigned sub_bits;            /* clusters a sub-window, log2 */
  unsigned fine_bits;           /* the window size after a regrain */
  size_t windows;
  size_t runs;                  /* runs (maximal within sub-windows) */
  size_t type_sets;             /* palette entries, all windows */
  size_t entry_bytes;           /* bytes of run entries, all windows */
  size_t index_bytes;           /* bytes of sub-window indexes */
  unsigned max_entry;           /* the largest entry, bytes */
  size_t bytes;                 /* overlap_map_memory */
  uint64_t regrains;            /* coarse -> fine windows, so far */
  uint64_t reencodes;           /* windows rebuilt in a new format */
};
extern int overlap_map_get_stats (const struct overlap_map *m,
                                  struct overlap_map_stats *st, size_t size);

/* Image glue (overlap.c), called with img->lock held. */
extern int overlap_build (struct qcow2_image *img);
extern void overlap_free (struct qcow2_image *img);
/* Before writing [off, off+len) on purpose as 'types' (0 for guest
 * data): -1 with errno EIO, and the image marked corrupt, on a hit.
 */
extern int overlap_check_write (struct qcow2_image *img, uint64_t off,
                                uint64_t len, unsigned types);
/* The same check changing nothing, with img->lock held at least shared:
 * true if overlap_check_write would let the write through.
 */
extern bool overlap_write_ok (struct qcow2_image *img, uint64_t off,
                              uint64_t len, unsigned types);
/* Keep the map current as metadata clusters come and go. */
extern int overlap_add (struct qcow2_image *img, uint64_t off,
                        uint64_t len, unsigned types);
extern void overlap_remove (struct qcow2_image *img, uint64_t off,
                            uint64_t len, unsigned types);
extern const char *overlap_type_name (unsigned types);

#endif /* QCOW2_OVERLAP_H */
