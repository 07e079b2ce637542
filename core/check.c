/* nbdkit-qcow2: consistency check and refcount repair.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Recompute every cluster's reference count from the metadata that
 * points at it (header, L1 and L2 tables of the active disk and of every
 * snapshot, refcount table and blocks, snapshot table, bitmap directory,
 * tables and data) and compare with the refcounts on disk, like
 * `qemu-img check`:
 *
 *   on disk > computed: leak (space wasted, harmless)
 *   on disk < computed: corruption (a cluster in use could be reused)
 *
 * The references come from the metadata walk that also builds the
 * overlap map (walk.c, with follow: every L2 and bitmap table is read).
 * An L2 table offset that is not cluster aligned counts as an error,
 * and so does a reference past the end of the file (inc).
 *
 * Repair writes the computed counts over the stored ones (creating
 * refcount blocks where a used range has none), then fixes the COPIED
 * flags of the active L1 and L2 tables.  check_repair_dirty runs it
 * before the first write (called by the write path, so a read-only
 * server never changes the file) for images whose dirty bit says
 * refcounts may be stale (lazy refcounts, or a crash while the bit was
 * set), and with check=repair at start.
 *
 * Memory: one 32-bit counter per host cluster of the file.
 *
 * Locking: none taken; img->lock is held exclusively (rw.c takes it for
 * qcow2_check and for the write that runs check_repair_dirty).
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

#define MAX_CHECK_CLUSTERS (UINT64_C(1) << 28)

struct counts {
  uint32_t *ref;
  uint64_t n;                   /* clusters in the array */
  uint64_t errors;              /* references outside the file etc. */
};

static void
inc (struct qcow2_image *img, struct counts *c, uint64_t off, uint64_t len)
{
  uint64_t first, last, i;

  if (len == 0)
    return;
  first = off >> img->cluster_bits;
  last = (off + len - 1) >> img->cluster_bits;
  for (i = first; i <= last; i++) {
    if (i >= c->n) {
      nbdkit_debug ("%s: check: reference to %#" PRIx64 " beyond end of "
                    "file", img->name, i << img->cluster_bits);
      c->errors++;
      continue;
    }
    if (c->ref[i] < UINT32_MAX)
      c->ref[i]++;
  }
}

/* What compute passes through the walk to its callbacks. */
struct count_walk {
  struct qcow2_image *img;
  struct counts *c;
};

static int
count_visit (void *opaque, enum walk_kind kind, uint64_t off, uint64_t len)
{
  struct count_walk *cw = opaque;

  /* XXX The crypto header has never been counted here (qemu-img check
   * counts it); only unencrypted images are opened, where a crypto
   * header extension is stray.
   */
  if (kind == WALK_CRYPTO_HEADER)
    return 0;
  inc (cw->img, cw->c, off, len);
  return 0;
}

/* An L2 table that could not be followed: walk.c has logged why. */
static void
count_bad (void *opaque, enum walk_kind kind, uint64_t off)
{
  struct count_walk *cw = opaque;

  cw->c->errors++;
}

/* Count the references to every cluster: the metadata and everything
 * it points at (walk.c).
 */
static int
compute (struct qcow2_image *img, struct counts *c)
{
  static const struct walk_ops ops = {
    .visit = count_visit, .bad = count_bad, .follow = true, .who = "check",
  };
  struct count_walk cw = { .img = img, .c = c };

  return walk_metadata (img, &ops, &cw);
}

/* Compare the COPIED flags of the active tables with the stored
 * refcounts (COPIED must be set exactly when the refcount is 1; after a
 * repair the stored refcounts are the computed ones), count the
 * mismatches as corruption, as qemu-img check does, and with repair
 * rewrite them.
 */
static int
fix_copied (struct qcow2_image *img, const struct counts *c, bool repair,
            bool clear_only, uint64_t *bad)
{
  uint64_t *buf = malloc (img->cluster_size);
  uint64_t n = UINT64_C(1) << img->l2_bits, j, rc;
  unsigned step = img->l2_entry_shift == 4 ? 2 : 1;
  uint32_t i;
  bool l1_changed = false;
  int r = -1;

  if (buf == NULL)
    return -1;
  for (i = 0; i < img->l1_size; i++) {
    uint64_t l2 = img->l1[i] & L1E_OFFSET_MASK, want;
    bool changed = false;
    if (l2 == 0 || offset_into_cluster (img, l2) ||
        (l2 >> img->cluster_bits) >= c->n)
      continue;
    if (clear_only)
      rc = c->ref[l2 >> img->cluster_bits];
    else if (refcount_get (img, l2 >> img->cluster_bits, &rc) == -1)
      goto out;
    want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
    if ((img->l1[i] & QCOW_OFLAG_COPIED) != want &&
        (!clear_only || want == 0)) {
      if (!clear_only)
        (*bad)++;
      if (repair) {
        l2_set_l1 (img, i, (img->l1[i] & ~QCOW_OFLAG_COPIED) | want);
        l1_changed = true;
      }
    }
    if (io_pread (img->io, buf, img->cluster_size, l2) == -1)
      goto out;
    for (j = 0; j < n; j++) {
      uint64_t e = be64toh (buf[j * step]), host = e & L2E_OFFSET_MASK;
      if ((e & QCOW_OFLAG_COMPRESSED) || host == 0 || img->data_file_name ||
          (host >> img->cluster_bits) >= c->n)
        continue;
      if (clear_only)
        rc = c->ref[host >> img->cluster_bits];
      else if (refcount_get (img, host >> img->cluster_bits, &rc) == -1)
        goto out;
      want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
      if ((e & QCOW_OFLAG_COPIED) != want && (!clear_only || want == 0)) {
        if (!clear_only)
          (*bad)++;
        buf[j * step] = htobe64 ((e & ~QCOW_OFLAG_COPIED) | want);
        changed = true;
      }
    }
    if (changed && repair) {
      if (overlap_check_write (img, l2, img->cluster_size,
                               OV_ACTIVE_L2) == -1 ||
          io_pwrite (img->io, buf, img->cluster_size, l2) == -1)
        goto out;
    }
  }
  if (l1_changed && l2_write_l1 (img) == -1)
    goto out;
  r = 0;
 out:
  free (buf);
  return r;
}

int
check_image (struct qcow2_image *img, bool repair,
             struct qcow2_check_result *res)
{
  struct counts c = { 0 };
  int64_t fs = io_size (img->io);
  uint64_t i;
  int r = -1;

  memset (res, 0, sizeof *res);
  if (fs == -1)
    return -1;
  c.n = round_up_pow2 (fs, img->cluster_size) >> img->cluster_bits;
  if (c.n > MAX_CHECK_CLUSTERS) {
    nbdkit_error ("%s: check: image file too large to check (%" PRIu64
                  " clusters)", img->name, c.n);
    errno = EFBIG;
    return -1;
  }
  c.ref = calloc (c.n ? c.n : 1, sizeof *c.ref);
  if (c.ref == NULL)
    return -1;
  if (compute (img, &c) == -1)
    goto out;
  res->errors = c.errors;
  /* First step of a repair (see below): clear COPIED flags that the new
   * refcounts will make wrong, before any refcount reaches the disk.
   */
  if (repair && (fix_copied (img, &c, true, true, NULL) == -1 ||
                 io_flush (img->io) == -1))
    goto out;

  for (i = 0; i < c.n; i++) {
    uint64_t v;
    if (refcount_get (img, i, &v) == -1)
      goto out;
    if (v > c.ref[i])
      res->leaks++;
    else if (v < c.ref[i])
      res->corruptions++;
    else
      continue;
    if (!repair)
      continue;
    /* XXX A used cluster in a range with no refcount block (or past
     * the refcount table) would need new refcount metadata; refuse.
     */
    if ((i >> img->rb_bits) >= img->reftable_entries ||
        !(img->reftable[i >> img->rb_bits] & RT_OFFSET_MASK)) {
      nbdkit_error ("%s: check: cannot repair: cluster %#" PRIx64
                    " has no refcount block", img->name,
                    i << img->cluster_bits);
      errno = ENOTSUP;
      goto out;
    }
    if (refcount_set (img, i, c.ref[i] > refcount_max (img)
                      ? refcount_max (img) : c.ref[i]) == -1)
      goto out;
    res->repaired++;
  }
  /* Refcounts of clusters past the end of the file: a crash can leave
   * a refcount for a cluster whose write never extended the file.
   * Nothing can reference them: leaks.
   */
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t first = i << img->rb_bits, j, v;
    if (!(img->reftable[i] & RT_OFFSET_MASK) ||
        first + (UINT64_C(1) << img->rb_bits) <= c.n)
      continue;
    for (j = first > c.n ? first : c.n;
         j < first + (UINT64_C(1) << img->rb_bits); j++) {
      if (refcount_get (img, j, &v) == -1)
        goto out;
      if (v == 0)
        continue;
      res->leaks++;
      if (repair) {
        if (refcount_set (img, j, 0) == -1)
          goto out;
        res->repaired++;
      }
    }
  }

  /* Order, so that every intermediate state is consistent even without
   * a dirty bit (v2): clear COPIED flags that will be wrong, sync; write
   * the refcounts, sync; then set the COPIED flags that are now right.
   */
  if (repair && (cache_flush (img->rc_cache) == -1 ||
                 io_flush (img->io) == -1))
    goto out;
  if (fix_copied (img, &c, repair, false, &res->corruptions) == -1)
    goto out;
  if (repair) {
    if (io_flush (img->io) == -1)
      goto out;
    img->free_hint = 0;
  }
  r = 0;
 out:
  free (c.ref);
  return r;
}

/* qcow2_check (rw.c) with img->lock held exclusively and the caches
 * written back: check, and with repair fix, the image.
 */
int
check_run (struct qcow2_image *img, bool repair,
           struct qcow2_check_result *res)
{
  bool set_dirty = false;
  int r = 0;

  /* A repair rewrites refcounts and COPIED flags in two steps; the
   * dirty bit makes a crash between them recoverable (v3 only).
   */
  if (repair && img->version >= 3 && !(img->incompat & INCOMPAT_DIRTY)) {
    img->incompat |= INCOMPAT_DIRTY;
    r = header_write_features (img);
    if (r == 0)
      r = io_flush (img->io);
    if (r == 0)
      set_dirty = true;
  }
  if (r == 0)
    r = check_image (img, repair, res);
  if (r == 0 && repair)
    cluster_forget_all (img);
  if (r == 0 && set_dirty && !img->dirty_written) {
    img->incompat &= ~INCOMPAT_DIRTY;
    r = header_write_features (img);
    if (r == 0)
      r = io_flush (img->io);
  }
  return r;
}

/* The dirty bit says refcounts may be stale (lazy refcounts, or a crash
 * while they were being updated lazily): rebuild them before the first
 * write.  This waits for a write so that a read-only server never
 * changes the file.  The L2 cache is emptied because the repair rewrites
 * COPIED flags on disk.
 */
int
check_repair_dirty (struct qcow2_image *img)
{
  struct qcow2_check_result res;

  if (check_image (img, true, &res) == -1) {
    /* A host I/O error (EIO, ENOSPC) is passed on and the repair is
     * tried again by the next write (the dirty bit is still set).  A
     * repair that cannot succeed leaves the image read-only.
     */
    if (errno == ENOTSUP || errno == EFBIG || img->corrupt) {
      nbdkit_error ("%s: image was not closed cleanly (dirty bit set) and "
                    "could not be repaired: it stays read-only (repair it "
                    "with 'qemu-img check -r all')", img->name);
      img->readonly = true;
      errno = EROFS;
    }
    return -1;
  }
  cluster_forget_all (img);
  nbdkit_debug ("%s: dirty image repaired: %" PRIu64 " leaked and %" PRIu64
                " missing references fixed", img->name, res.leaks,
                res.corruptions);
  img->incompat &= ~INCOMPAT_DIRTY;
  if (header_write_features (img) == -1 || io_flush (img->io) == -1)
    return -1;
  return 0;
}
