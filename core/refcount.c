/* nbdkit-qcow2: refcounts.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The refcount table lives in memory (host byte order); refcount blocks
 * are read and updated in slices through the refcount cache, the same
 * cache code as L2 slices.  Entries of every width are supported
 * (refcount_order 0..6: 1 to 64 bits); sub-byte entries are packed
 * LSB first, wider ones are big-endian.
 *
 *   cluster -> table index = cluster >> rb_bits
 *           -> block index = cluster & (entries_per_block - 1)
 *           -> bit offset in block = block index << refcount_order
 *           -> slice = bit offset / 8 >> slice_bits
 *
 * Locking: none taken; every function needs img->lock exclusively.
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

int
refcount_load (struct qcow2_image *img)
{
  uint64_t i, n = ((uint64_t) img->reftable_clusters << img->cluster_bits) / 8;

  img->reftable = malloc (n * 8);
  if (img->reftable == NULL)
    return -1;
  if (io_pread (img->io, img->reftable, n * 8, img->reftable_offset) == -1) {
    nbdkit_error ("%s: reading refcount table: %m", img->name);
    return -1;
  }
  for (i = 0; i < n; i++)
    img->reftable[i] = be64toh (img->reftable[i]);
  img->reftable_entries = n;
  return 0;
}

/* Read entry 'idx' of a slice. */
static uint64_t
entry_get (const uint8_t *slice, uint64_t idx, uint32_t order)
{
  switch (order) {
  case 0: case 1: case 2: {
    uint64_t bit = idx << order;
    uint8_t mask = (1u << (1u << order)) - 1;
    return (slice[bit >> 3] >> (bit & 7)) & mask;
  }
  case 3:
    return slice[idx];
  case 4: {
    uint16_t v;
    memcpy (&v, slice + idx * 2, 2);
    return be16toh (v);
  }
  case 5: {
    uint32_t v;
    memcpy (&v, slice + idx * 4, 4);
    return be32toh (v);
  }
  default: {
    uint64_t v;
    memcpy (&v, slice + idx * 8, 8);
    return be64toh (v);
  }
  }
}

static void
entry_set (uint8_t *slice, uint64_t idx, uint32_t order, uint64_t val)
{
  switch (order) {
  case 0: case 1: case 2: {
    uint64_t bit = idx << order;
    uint8_t mask = ((1u << (1u << order)) - 1) << (bit & 7);
    slice[bit >> 3] = (slice[bit >> 3] & ~mask) |
                      ((val << (bit & 7)) & mask);
    break;
  }
  case 3:
    slice[idx] = val;
    break;
  case 4: {
    uint16_t v = htobe16 (val);
    memcpy (slice + idx * 2, &v, 2);
    break;
  }
  case 5: {
    uint32_t v = htobe32 (val);
    memcpy (slice + idx * 4, &v, 4);
    break;
  }
  default: {
    uint64_t v = htobe64 (val);
    memcpy (slice + idx * 8, &v, 8);
    break;
  }
  }
}

/* Locate the refcount slice of a cluster.  *rb_off is 0 if the cluster
 * has no refcount block (refcount 0).
 */
static int
locate (struct qcow2_image *img, uint64_t cluster, uint64_t *slice_off,
        uint64_t *idx_in_slice)
{
  uint64_t ti = cluster >> img->rb_bits;
  uint64_t bi = cluster & ((UINT64_C(1) << img->rb_bits) - 1);
  uint64_t rb, byte, slice_entries_bits;

  *slice_off = 0;
  if (ti >= img->reftable_entries)
    return 0;
  rb = img->reftable[ti] & RT_OFFSET_MASK;
  if (rb == 0)
    return 0;
  if (offset_into_cluster (img, rb) != 0)
    return header_mark_corrupt (img, "refcount block offset %#" PRIx64
                                " (refcount table entry %" PRIu64 ") is not "
                                "cluster aligned", rb, ti);
  if (rb >= img->host_end || img->host_end - rb < img->cluster_size)
    return header_mark_corrupt (img, "refcount block offset %#" PRIx64
                                " (refcount table entry %" PRIu64 ") is "
                                "beyond the end of the file (%#" PRIx64 ")",
                                rb, ti, img->host_end);
  byte = (bi << img->refcount_order) >> 3;
  /* Entries per slice = slice bytes * 8 >> order. */
  slice_entries_bits = img->slice_bits + 3 - img->refcount_order;
  *slice_off = rb + ((byte >> img->slice_bits) << img->slice_bits);
  *idx_in_slice = bi & ((UINT64_C(1) << slice_entries_bits) - 1);
  return 0;
}

/* The refcount cache's before_write (cache.h): rule 4. */
int
refcount_before_block_write (void *opaque, uint64_t off, uint32_t len)
{
  return overlap_check_write (opaque, off, len, OV_REFCOUNT_BLOCK);
}

int
refcount_get (struct qcow2_image *img, uint64_t cluster, uint64_t *val)
{
  uint64_t slice_off, idx;
  struct cache_entry *e;
  const uint8_t *slice;

  if (locate (img, cluster, &slice_off, &idx) == -1)
    return -1;
  if (slice_off == 0) {
    *val = 0;
    return 0;
  }
  slice = cache_get (img->rc_cache, slice_off, true, &e);
  if (slice == NULL)
    return -1;
  *val = entry_get (slice, idx, img->refcount_order);
  cache_put (img->rc_cache, e);
  return 0;
}

/* Set a refcount in a block that exists (the caller made sure). */
int
refcount_set (struct qcow2_image *img, uint64_t cluster, uint64_t val)
{
  uint64_t slice_off, idx;
  struct cache_entry *e;
  uint8_t *slice;

  if (locate (img, cluster, &slice_off, &idx) == -1)
    return -1;
  if (slice_off == 0) {
    errno = EIO;
    return -1;
  }
  slice = cache_get (img->rc_cache, slice_off, true, &e);
  if (slice == NULL)
    return -1;
  entry_set (slice, idx, img->refcount_order, val);
  cache_mark_dirty (img->rc_cache, e);
  cache_put (img->rc_cache, e);
  /* The host cluster compressed writes were filling is free now (its
   * last compressed cluster went, or an allocation was given back):
   * the allocator may hand it out whole, so stop filling it.
   */
  if (val == 0 && img->compress_next != 0 &&
      cluster == img->compress_next >> img->cluster_bits)
    img->compress_next = 0;
  return 0;
}

uint64_t
refcount_max (const struct qcow2_image *img)
{
  return img->refcount_order == 6 ? UINT64_MAX
    : (UINT64_C(1) << img->refcount_bits) - 1;
}

/* ---- allocation ---- */

static uint64_t
rb_entries (const struct qcow2_image *img)
{
  return UINT64_C(1) << img->rb_bits;
}

/* Is cluster c free by its refcount (0, or past the end of the file)?
 * The run found is then checked against the overlap map
 * (check_run_free).
 */
static int
cluster_is_free (struct qcow2_image *img, uint64_t c, bool *is_free)
{
  uint64_t v;

  /* Past the end of the file nothing can be in use: a refcount there is
   * a leak (or a hostile image); never let it push allocations out.
   */
  if (c >= img->host_end >> img->cluster_bits) {
    *is_free = true;
    return 0;
  }
  if (refcount_get (img, c, &v) == -1)
    return -1;
  *is_free = v == 0;
  return 0;
}

/* Clusters the refcounts call free but the map calls metadata: that is
 * refcount corruption, caught here before the allocator hands out (say)
 * a live L2 table.  One query for the whole run.
 */
static int
check_run_free (struct qcow2_image *img, uint64_t start, uint64_t n)
{
  uint64_t hit;
  unsigned t;

  if (img->overlap == NULL)
    return 0;
  t = overlap_map_query (img->overlap, start, n, OV_ALL, &hit);
  if (t)
    return header_mark_corrupt (img, "refcount of cluster %#" PRIx64
                                " is 0 but it holds %s",
                                hit << img->cluster_bits,
                                overlap_type_name (t));
  return 0;
}

/* A block device (a qcow2 on an LV) cannot grow: nothing may be
 * allocated at or past its last whole cluster.  Such an allocation
 * fails here with ENOSPC, before any refcount counts it or any table
 * points at it.  The size is read each time: the device may have been
 * extended since (lvextend).
 */
static int
check_device_end (struct qcow2_image *img, uint64_t end_cluster)
{
  int64_t size;

  if (!img->io->blockdev)
    return 0;
  size = io_size (img->io);
  if (size == -1) {
    nbdkit_error ("%s: size of the block device: %m", img->name);
    return -1;
  }
  if (end_cluster > ((uint64_t) size >> img->cluster_bits)) {
    nbdkit_error ("%s: the block device is full (%" PRIi64 " bytes)",
                  img->name, size);
    errno = ENOSPC;
    return -1;
  }
  return 0;
}

/* Write the whole reftable (host order in memory) to 'off'. */
static int
write_reftable (struct qcow2_image *img, const uint64_t *table,
                uint64_t entries, uint64_t off, uint64_t bytes)
{
  uint64_t *be = calloc (1, bytes);
  uint64_t i;
  int r;

  if (be == NULL)
    return -1;
  for (i = 0; i < entries; i++)
    be[i] = htobe64 (table[i]);
  r = overlap_check_write (img, off, bytes, OV_REFCOUNT_TABLE);
  if (r == 0 && (r = io_pwrite (img->io, be, bytes, off)) == -1)
    nbdkit_error ("%s: writing refcount table: %m", img->name);
  free (be);
  return r;
}

/* Grow the refcount table so it has an entry 'ti'.  The new table and
 * the refcount blocks that count it go past everything counted so far,
 * where nothing lives; they describe themselves.  Order: new blocks and
 * table written and synced, then the header switched and synced, then
 * the old table freed.
 */
static int
grow_reftable (struct qcow2_image *img, uint64_t ti)
{
  uint64_t epb = rb_entries (img), cs = img->cluster_size;
  uint64_t old_entries = img->reftable_entries;
  uint64_t start = old_entries * epb;    /* first cluster never counted */
  uint64_t entries = old_entries + old_entries / 2 + 1;
  uint64_t nt, nb, first_ti, i, *table = NULL;
  uint8_t *block = NULL;
  int r = -1;

  /* (On a block device host_end is the device's end: what lies past
   * the counted clusters is only the device's unused rest.)
   */
  if (start < (img->host_end >> img->cluster_bits) && !img->io->blockdev)
    start = img->host_end >> img->cluster_bits;
  if (entries <= ti)
    entries = ti + 1;
  first_ti = start / epb;
  for (;;) {
    nt = (entries * 8 + cs - 1) / cs;
    nb = 1;
    while (((start + nt + nb - 1) / epb) - first_ti + 1 > nb)
      nb++;
    if ((start + nt + nb - 1) / epb < entries)
      break;
    entries = (start + nt + nb - 1) / epb + 1;
  }
  entries = nt * cs / 8;
  if (nt * cs > MAX_REFTABLE_BYTES) {
    nbdkit_error ("%s: refcount table would exceed %" PRIu64 " bytes",
                  img->name, MAX_REFTABLE_BYTES);
    errno = EFBIG;
    return -1;
  }
  if (check_device_end (img, start + nt + nb) == -1)
    return -1;

  table = calloc (entries, 8);
  block = malloc (cs);
  if (table == NULL || block == NULL)
    goto out;
  memcpy (table, img->reftable, old_entries * 8);

  /* The new blocks, each counting the clusters of [start, start+nt+nb)
   * that fall in its range.
   */
  for (i = 0; i < nb; i++) {
    uint64_t bti = first_ti + i, c;
    uint64_t boff = (start + nt + i) << img->cluster_bits;

    memset (block, 0, cs);
    for (c = start; c < start + nt + nb; c++)
      if (c / epb == bti)
        entry_set (block, c % epb, img->refcount_order, 1);
    if (overlap_check_write (img, boff, cs, OV_REFCOUNT_BLOCK) == -1)
      goto out;
    if (io_pwrite (img->io, block, cs, boff) == -1) {
      nbdkit_error ("%s: writing refcount block: %m", img->name);
      goto out;
    }
    table[bti] = boff;
  }
  if (write_reftable (img, table, entries, start << img->cluster_bits,
                      nt * cs) == -1 ||
      io_flush (img->io) == -1)
    goto out;

  /* Switch the header. */
  {
    uint8_t hdr[12];
    uint64_t off = htobe64 (start << img->cluster_bits);
    uint32_t n = htobe32 (nt);
    memcpy (hdr, &off, 8);
    memcpy (hdr + 8, &n, 4);
    if (overlap_check_write (img, HDR_REFCOUNT_TABLE_OFFSET, 12,
                             OV_MAIN_HEADER) == -1)
      goto out;
    if (io_pwrite (img->io, hdr, 12, HDR_REFCOUNT_TABLE_OFFSET) == -1 ||
        io_flush (img->io) == -1) {
      nbdkit_error ("%s: updating refcount table pointer: %m", img->name);
      goto out;
    }
  }
  nbdkit_debug ("%s: refcount table grown to %" PRIu64 " entries at %#"
                PRIx64, img->name, entries, start << img->cluster_bits);

  /* The old table is garbage now: free it (deferred like every free). */
  {
    uint64_t old_off = img->reftable_offset;
    uint64_t old_n = img->reftable_clusters;
    free (img->reftable);
    img->reftable = table;
    table = NULL;
    img->reftable_entries = entries;
    img->reftable_offset = start << img->cluster_bits;
    img->reftable_clusters = nt;
    if (img->host_end < (start + nt + nb) << img->cluster_bits)
      img->host_end = (start + nt + nb) << img->cluster_bits;
    /* The map learns of the new structures once they are in use. */
    overlap_remove (img, old_off, old_n * cs, OV_REFCOUNT_TABLE);
    if (overlap_add (img, start << img->cluster_bits, nt * cs,
                     OV_REFCOUNT_TABLE) == -1 ||
        overlap_add (img, (start + nt) << img->cluster_bits, nb * cs,
                     OV_REFCOUNT_BLOCK) == -1)
      goto out;
    if (refcount_free_later (img, old_off, old_n) == -1)
      goto out;
  }
  r = 0;
 out:
  free (table);
  free (block);
  return r;
}

/* Write refcount table entry ti as v (img->reftable still has the old
 * value).  With direct I/O the write is widened to whole blocks of the
 * io's alignment inside the table (io_widen_write), taken from
 * img->reftable, which holds the whole table as it is on disk, so that
 * io.c need not read the block first; the overlap check covers exactly
 * what is written.  (One exception: an entry whose write failed but
 * landed all the same is 0 in memory; a later widened write puts the 0
 * back.  That is safe: the block it pointed at counted only itself and
 * was never used.)
 */
static int
write_reftable_entry (struct qcow2_image *img, uint64_t ti, uint64_t v)
{
  uint64_t start = img->reftable_offset + ti * 8, end = start + 8;
  uint64_t first, n, i, *be;
  int r = -1;

  if ((img->reftable_offset & 7) == 0)
    io_widen_write (img->io, &start, &end, img->reftable_offset,
                    img->reftable_offset + img->reftable_entries * 8);
  first = (start - img->reftable_offset) / 8;
  n = (end - start) / 8;
  be = malloc (n * 8);
  if (be == NULL)
    return -1;
  for (i = 0; i < n; i++)
    be[i] = htobe64 (first + i == ti ? v : img->reftable[first + i]);
  if (overlap_check_write (img, start, n * 8, OV_REFCOUNT_TABLE) == 0) {
    r = io_pwrite (img->io, be, n * 8, start);
    if (r == -1)
      nbdkit_error ("%s: writing refcount table entry: %m", img->name);
  }
  free (be);
  return r;
}

/* Create the refcount block for table index ti at free cluster 'b'.
 * If b lies in the range the block counts, the block counts itself;
 * otherwise b's own (existing) block counts it.  The block is written
 * and synced before the table points at it.
 */
static int
create_refblock (struct qcow2_image *img, uint64_t ti, uint64_t b)
{
  uint64_t epb = rb_entries (img), cs = img->cluster_size;
  uint64_t boff = b << img->cluster_bits;
  bool self = (b >> img->rb_bits) == ti;
  uint8_t *block;
  int r = -1;

  block = calloc (1, cs);
  if (block == NULL)
    return -1;
  if (self)
    entry_set (block, b - ti * epb, img->refcount_order, 1);
  else if (refcount_set (img, b, 1) == -1)
    goto out;
  if (overlap_check_write (img, boff, cs, OV_REFCOUNT_BLOCK) == -1)
    goto out;
  /* The counting block (if not this one) must be on disk too. */
  if ((!self && cache_flush (img->rc_cache) == -1) ||
      io_pwrite (img->io, block, cs, boff) == -1 || io_flush (img->io) == -1) {
    nbdkit_error ("%s: writing new refcount block: %m", img->name);
    /* Nothing points at b yet.  (Not so once the table entry is being
     * written: a failed write may have landed.)
     */
    if (!self)
      refcount_unalloc (img, boff, 1);
    goto out;
  }
  if (write_reftable_entry (img, ti, boff) == -1)
    goto out;
  img->reftable[ti] = boff;
  img->need_sync = true;
  if (img->host_end < boff + cs)
    img->host_end = boff + cs;
  if (overlap_add (img, boff, cs, OV_REFCOUNT_BLOCK) == -1)
    goto out;
  r = 0;
 out:
  free (block);
  return r;
}

/* Make sure cluster c has a refcount block.  With no block, nothing in
 * its range is counted, so all of it is free unless the overlap map
 * knows of metadata there: the block goes at the first such cluster.
 */
static int
ensure_refblock (struct qcow2_image *img, uint64_t c)
{
  uint64_t ti = c >> img->rb_bits, epb = rb_entries (img), b;

  if (ti >= img->reftable_entries && grow_reftable (img, ti) == -1)
    return -1;
  if (img->reftable[ti] & RT_OFFSET_MASK)
    return 0;
  for (b = ti * epb; b < (ti + 1) * epb; b++) {
    uint64_t hit;
    if (!img->overlap ||
        overlap_map_query (img->overlap, b, 1, OV_ALL, &hit) == 0)
      break;
  }
  if (b == (ti + 1) * epb) {
    errno = ENOSPC;
    return -1;
  }
  return create_refblock (img, ti, b);
}

/* Grow the file in large steps: keep disk blocks reserved (without
 * changing the file size, so fresh clusters still read as zeroes past
 * EOF) ahead of the last allocated cluster, instead of letting the
 * file system allocate one cluster at a time.  The step is
 * cfg.prealloc_size (prealloc-size=, 0: no reservations): when an
 * allocation reaches past the reserved range, the range is extended to
 * the next multiple of the step at least one step beyond the new end
 * (so one to two steps ahead, then used up as the file grows: one
 * fallocate per step of growth).  qcow2_close gives back what was not
 * used (img->reserved).  Never on tmpfs nor on a block device (io.c).
 *
 * A reservation that fails (short of space: see io.c) may have taken
 * part of the range all the same, and that must not stay taken while
 * writes, ours or anybody's, get ENOSPC: it is given back at once, by
 * truncating the file to its own size (punching a hole would do
 * nothing: ext4 ignores holes punched past the end of the file).  A
 * data write running with img->lock dropped could be extending the
 * file meanwhile, and the truncate would cut it short, so that is done
 * with io_lock held exclusively, which every such write holds shared:
 * by rw.c, the only file that takes locks, through the hook
 * img->give_back_reservation.  The next step tries again.
 */
static void
reserve_ahead (struct qcow2_image *img)
{
  uint64_t from, to, step = img->cfg.prealloc_size;
  int r;

  if (step == 0 || img->host_end <= img->reserved_end)
    return;
  from = img->reserved_end > img->host_end - img->cluster_size
    ? img->reserved_end : img->host_end - img->cluster_size;
  to = (img->host_end + 2 * step - 1) / step * step;
  r = io_reserve (img->io, to - from, from);
  if (r == -1 && (errno == EOPNOTSUPP || errno == ENOSYS)) {
    img->reserved_end = UINT64_MAX;     /* not supported: stop trying */
    return;
  }
  img->reserved_end = to;
  img->reserved = true;
  if (r == -1)
    img->give_back_reservation (img);
}

/* With img->lock and io_lock held exclusively (rw.c's
 * rw_give_back_reservation): give back what a failed reservation took.
 */
void
refcount_give_back_reservation (struct qcow2_image *img)
{
  int64_t size;
  int e = errno;

  size = io_size (img->io);
  if (size == -1 || io_truncate (img->io, size) == -1)
    nbdkit_debug ("%s: giving back a failed reservation: %m", img->name);
  errno = e;
}

/* Allocate n contiguous clusters with refcount 1; returns the host
 * offset of the first.  The search starts at the free hint, so it never
 * rescans the used part of the file; it ends at the first run long
 * enough, which past the end of the file always exists.  A run that
 * reaches into a range with no refcount block gets that block at its
 * own start (and the search goes on just after it), so that sequential
 * allocations stay contiguous.
 */
int64_t
refcount_alloc (struct qcow2_image *img, uint64_t n)
{
  uint64_t c, run, start = 0, i;

 again:
  run = 0;
  for (c = img->free_hint; run < n; c++) {
    bool is_free;

    if (c >= (MAX_HOST_OFFSET >> img->cluster_bits)) {
      nbdkit_error ("%s: image file is full", img->name);
      errno = ENOSPC;
      return -1;
    }
    if (cluster_is_free (img, c, &is_free) == -1)
      return -1;
    if (!is_free) {
      if (run == 0 && c == img->free_hint)
        img->free_hint = c + 1;
      run = 0;
      continue;
    }
    if (run == 0)
      start = c;
    run++;
  }
  if (check_device_end (img, start + n) == -1)
    return -1;

  for (i = start; i < start + n;
       i = ((i >> img->rb_bits) + 1) << img->rb_bits) {
    uint64_t ti = i >> img->rb_bits;
    if (ti >= img->reftable_entries) {
      if (grow_reftable (img, ti) == -1)
        return -1;
      goto again;
    }
    if (!(img->reftable[ti] & RT_OFFSET_MASK)) {
      uint64_t ts = start >> img->rb_bits;
      /* start's own range first, so the new block can be counted. */
      if (!(img->reftable[ts] & RT_OFFSET_MASK))
        ti = ts;
      if (create_refblock (img, ti, start) == -1)
        return -1;
      goto again;
    }
  }

  if (check_run_free (img, start, n) == -1)
    return -1;
  for (i = start; i < start + n; i++)
    if (refcount_set (img, i, 1) == -1) {
      /* (A dirty slice written back to make room can fail.) */
      refcount_unalloc (img, start << img->cluster_bits, i - start);
      return -1;
    }
  if (start == img->free_hint)
    img->free_hint = start + n;
  if (img->host_end < (start + n) << img->cluster_bits)
    img->host_end = (start + n) << img->cluster_bits;
  reserve_ahead (img);
  return start << img->cluster_bits;
}

/* Undo refcount_alloc for clusters [off, off + n clusters) that were
 * never linked from a table nor added to the overlap map.  Nothing on
 * disk points at them, so no ordering rule asks for a deferral (rule 3
 * is about entries that did point at a cluster), and nobody but the
 * allocating thread, which holds img->lock, knows of them, so no I/O
 * to them is in flight: its own write has returned.  The decrement
 * goes to the refcount cache like any other.  So a failed allocating
 * write leaks nothing; only a crash can (the increment may be on disk).
 * Best effort: a refcount slice that cannot be read, or a dirty one
 * that must make room and cannot be written, leaves the rest leaked.
 * errno is kept (the caller is reporting the error that got it here),
 * and a corrupt image is left as it is.
 */
void
refcount_unalloc (struct qcow2_image *img, uint64_t off, uint64_t n)
{
  uint64_t c = off >> img->cluster_bits, i;
  int saved_errno = errno;

  if (img->corrupt)
    return;
  for (i = 0; i < n; i++)
    if (refcount_update (img, c + i, -1) == -1) {
      nbdkit_debug ("%s: %" PRIu64 " clusters at %#" PRIx64 " leaked",
                    img->name, n - i, (c + i) << img->cluster_bits);
      break;
    }
  errno = saved_errno;
}

/* Add 'delta' (+1 / -1) to the refcount of one cluster. */
int
refcount_update (struct qcow2_image *img, uint64_t c, int delta)
{
  uint64_t v;

  if (refcount_get (img, c, &v) == -1)
    return -1;
  if ((delta < 0 && v == 0) || (delta > 0 && v == refcount_max (img)))
    return header_mark_corrupt (img, "refcount of cluster %#" PRIx64
                                " would %s", c << img->cluster_bits,
                                delta < 0 ? "drop below 0" : "overflow");
  if (delta > 0 && ensure_refblock (img, c) == -1)
    return -1;
  if (refcount_set (img, c, v + delta) == -1)
    return -1;
  if (v + delta == 0 && c < img->free_hint)
    img->free_hint = c;
  return 0;
}

/* ---- deferred frees ----
 *
 * Frees are deferred: the entry that referenced the clusters must be on
 * disk first (rule 3), and nobody may still be doing I/O to them.  They
 * are kept as ranges of host clusters, a range extended when the next
 * free continues it (a trim of a run of clusters is one range), and
 * applied by refcount_commit_frees after the metadata is synced.
 *
 * The commit is idempotent under failure: a decrement is taken off the
 * list in the same step that applies it to the cached refcount block,
 * so the list always holds exactly the decrements not yet made, and
 * the cache (which keeps a slice dirty until it is written) holds the
 * ones made.  A failed commit (a refcount block that cannot be read, a
 * dirty one that cannot be written back to make room) leaves both
 * true, and the next flush goes on from where this one stopped; it
 * never applies a decrement twice.
 */

int
refcount_free_later (struct qcow2_image *img, uint64_t off, uint64_t n)
{
  uint64_t c = off >> img->cluster_bits;
  struct pending_free *last;

  if (n == 0)
    return 0;
  /* (A sealed range is not extended: see pending_sealed.) */
  last = img->nr_pending > img->pending_sealed
    ? &img->pending[img->nr_pending - 1] : NULL;
  if (last && last->cluster + last->n == c) {
    last->n += n;
    img->pending_clusters += n;
    return 0;
  }
  if (img->nr_pending == img->pending_alloc) {
    size_t na = img->pending_alloc ? img->pending_alloc * 2 : 64;
    struct pending_free *p = realloc (img->pending, na * sizeof *p);
    if (p == NULL)
      return -1;
    img->pending = p;
    img->pending_alloc = na;
  }
  img->pending[img->nr_pending].cluster = c;
  img->pending[img->nr_pending].n = n;
  img->nr_pending++;
  img->pending_clusters += n;
  return 0;
}

/* Decrement one cluster's refcount for a deferred free: -1 on an I/O
 * error (nothing changed; try again later), 0 when done, 1 when it must
 * not be done (the image is marked corrupt; the cluster is leaked, which
 * is safe).  A cluster that would become free while the overlap map
 * still records metadata there is refused: every legitimate free of a
 * table takes it out of the map first, so this is an entry that points
 * at metadata, and freeing it would let guest data overwrite it.
 */
static int
commit_one (struct qcow2_image *img, uint64_t c)
{
  uint64_t v, hit;
  unsigned t;

  if (refcount_get (img, c, &v) == -1)
    return -1;
  if (v == 0) {
    header_mark_corrupt (img, "refcount of cluster %#" PRIx64 " would drop "
                         "below 0", c << img->cluster_bits);
    return 1;
  }
  if (v == 1 && img->overlap &&
      (t = overlap_map_query (img->overlap, c, 1, OV_ALL, &hit)) != 0) {
    header_mark_corrupt (img, "freeing cluster %#" PRIx64 ", which holds %s",
                         c << img->cluster_bits, overlap_type_name (t));
    return 1;
  }
  /* The slice is cached now (just read), so this cannot fail half way. */
  if (refcount_set (img, c, v - 1) == -1)
    return -1;
  if (v == 1) {
    if (c < img->free_hint)
      img->free_hint = c;
    cache_drop (img->l2_cache, c << img->cluster_bits, img->cluster_size);
  }
  return 0;
}

/* Apply the first 'limit' ranges of deferred frees (see above; all of
 * them when limit >= nr_pending).  Freed clusters that held tables are
 * forgotten by the L2 cache.  The list's memory is given back after a
 * large commit.
 */
int
refcount_commit_frees (struct qcow2_image *img, size_t limit)
{
  size_t i = 0;
  int r = 0;

  while (i < img->nr_pending && i < limit) {
    struct pending_free *p = &img->pending[i];

    if (p->n == 0) {
      i++;
      continue;
    }
    r = commit_one (img, p->cluster);
    if (r == -1)
      break;
    p->cluster++;
    p->n--;
    img->pending_clusters--;
    r = 0;
  }
  /* Keep what is left (after an error) at the front. */
  memmove (img->pending, img->pending + i,
           (img->nr_pending - i) * sizeof *img->pending);
  img->nr_pending -= i;
  img->pending_sealed = img->pending_sealed > i ? img->pending_sealed - i : 0;
  if (img->nr_pending == 0 && img->pending_alloc > 64) {
    free (img->pending);
    img->pending = NULL;
    img->pending_alloc = 0;
  }
  return r;
}

/* Write the dirty refcount blocks and sync. */
int
refcount_write_back (struct qcow2_image *img)
{
  if (cache_flush (img->rc_cache) == -1)
    return -1;
  if (io_flush (img->io) == -1) {
    nbdkit_error ("%s: sync: %m", img->name);
    return -1;
  }
  return 0;
}
