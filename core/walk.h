/* nbdkit-qcow2: one walk over all the metadata of an image (walk.c).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 */

#ifndef QCOW2_WALK_H
#define QCOW2_WALK_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_image;

/* What a range of the image file is. */
enum walk_kind {
  WALK_HEADER,                  /* the header cluster */
  WALK_ACTIVE_L1,
  WALK_ACTIVE_L2,
  WALK_REFCOUNT_TABLE,
  WALK_REFCOUNT_BLOCK,
  WALK_SNAPSHOT_TABLE,
  WALK_INACTIVE_L1,             /* a snapshot's L1 table */
  WALK_INACTIVE_L2,             /* an L2 table a snapshot's L1 points to */
  WALK_CRYPTO_HEADER,
  WALK_BITMAP_DIRECTORY,
  WALK_BITMAP_TABLE,
  /* Only with walk_ops.follow: what the tables above point to. */
  WALK_DATA,                    /* a standard cluster (active or snapshot) */
  WALK_COMPRESSED,              /* the 512-byte sectors of a compressed
                                 * cluster */
  WALK_BITMAP_DATA,             /* a cluster of bitmap data */
  WALK_NR_KINDS
};

struct walk_ops {
  /* [off, off + len) of the file is 'kind' (len > 0).  Return 0 to go
   * on, or -1 (with the error reported) to stop the walk.
   */
  int (*visit) (void *opaque, enum walk_kind kind, uint64_t off,
                uint64_t len);
  /* Optional.  With follow: the L2 table at 'off' (kind is
   * WALK_ACTIVE_L2 or WALK_INACTIVE_L2) was not followed because its
   * offset is not cluster aligned; the walk has logged why.
   */
  void (*bad) (void *opaque, enum walk_kind kind, uint64_t off);
  /* Also read every L2 table and bitmap table and visit what they point
   * to; see walk.c for what is then left out.
   */
  bool follow;
  const char *who;              /* prefix of messages: "check" */
};

/* One entry of the bitmap directory as it is on disk: walk.c reads
 * where its table is, and bitmap.c validates it.  'name' points into
 * the directory and is not terminated; 'len' is the whole entry, padded
 * to 8, which may run past the directory's end (bitmap_dir_entry does
 * not check it: the caller does before using the name).
 */
struct bitmap_dir_entry {
  uint64_t table_offset;        /* as on disk, reserved bits included */
  uint32_t table_size;          /* entries */
  uint32_t flags;
  uint8_t type, gran_bits;
  uint16_t name_size;
  uint32_t extra;               /* bytes of extra data */
  const char *name;
  uint64_t len;
};

extern bool bitmap_dir_entry (const uint8_t *dir, uint64_t size,
                              uint64_t pos, struct bitmap_dir_entry *e);

extern int walk_metadata (struct qcow2_image *img,
                          const struct walk_ops *ops, void *opaque);

#endif /* QCOW2_WALK_H */
