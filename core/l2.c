/* nbdkit-qcow2: changing L1 and L2 tables.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Every change to the active L1 table and its L2 tables is made here:
 * an entry is changed through l2_get_entry / l2_put_entry (the slice
 * pinned in the L2 cache, its table made the active L1's own first), a
 * missing L2 table is allocated, one shared with a snapshot is copied
 * (cow_l2_table), and dirty L1 entries are written by l2_write_l1 (also
 * for check.c's repair of COPIED flags, through l2_set_l1).  The L2
 * cache writes dirty slices back through l2_before_slice_write.
 *
 * Reads spared (they are O_DIRECT reads with cache=none): the slices of
 * a table made here are known to be zeroes and get cluster.c's
 * empty-slice bit (table_set_empty), so no lookup or update reads them
 * back; and L1 entries are written in whole blocks of the direct I/O
 * alignment from the in-memory table (l2_write_l1), so io.c need not
 * read the block first.
 *
 * The write-ordering rules (write.c's comment lists them) that concern
 * metadata are enforced here, before any L2 slice or L1 entry reaches
 * the file (l2_barrier):
 *
 *  1. dirty refcount blocks are written first, so a refcount increment
 *     reaches the file before any entry that points at the cluster;
 *  2. guest data written since the last sync (img->need_sync) is synced
 *     first, so no entry points at unwritten data;
 *  4. the table's range passes the overlap check.
 *
 * Syncs per flush.  l2_write_back (and a guest flush's write-back
 * without the lock, below, in the same order) syncs the image file up
 * to twice:
 * the barrier's (refcount blocks and data made durable before the
 * first L2 slice or L1 entry that may point at them is written) and
 * the final one.  When the flush has L2 slices or L1 entries to write,
 * both are needed: with only the final sync, after all the writes, a
 * crash could keep a written L2 entry and lose the data or the
 * refcount increment it depends on (rules 1 and 2 broken), since the
 * disk may persist writes between two syncs in any order.  When it has
 * none, everything was written before the barrier's sync began, and
 * (unless requests wrote meanwhile) core/io.c skips the final sync as
 * it skips every sync with nothing written through the io since the
 * last successful one began ("Skipped flushes" there): so there is no
 * special case here, and
 * the second sync goes only where nothing depends on it.  (A flush
 * that finds nothing new at all costs no sync, for the same reason.)
 * The data file is an io of its own, synced by the barrier (and by
 * qcow2_flush) through that io.
 *
 * Write-back without the lock.  A guest flush (rw.c) would hold
 * img->lock exclusively through both syncs and every slice write, and
 * with cache=none each is a trip to the disk: no request could even
 * link its entries meanwhile.  So it runs in three parts:
 *
 *   begin (lock held)  write the dirty refcount blocks; take the dirty
 *                      L2 slices (cache.c copies them aside, pins them,
 *                      marks them clean), the dirty L1 entries (a
 *                      big-endian copy) and need_sync (cleared)
 *   run (lock dropped, io_lock shared)
 *                      sync if need_sync was set (the barrier); write
 *                      the copies and the L1 entries; sync
 *   end                whoever next holds the lock settles it: unpins
 *                      the slices and, if run failed, marks them and
 *                      the L1 entries dirty again and sets need_sync
 *
 * Requests go on meanwhile, and may change the very slices taken (they
 * are dirty again, for the next write-back).  But a request that must
 * write an L2 slice or L1 entry itself waits for run's end (both syncs)
 * in l2_write_back_wait, holding img->lock exclusively, so every other
 * request queues behind it: a miss in the L2 cache when every unpinned
 * slice is dirty (while a write-back is in progress the cache evicts a
 * clean slice when it has one: cache.c, victim), and a trim or zero
 * that has to commit its frees at once (too many pending, or a large
 * one: rw.c, flush_locked).  So does, rarely, the give-back of a failed
 * disk-space reservation (it takes io_lock exclusively, which run holds
 * shared).  Why the image stays consistent:
 *
 *  - rules 1 and 2 for what run writes: every entry in a copy was
 *    linked before begin, so its data was written and need_sync set
 *    before begin, and its refcount increment was in the refcount
 *    cache, which begin writes; run's first sync starts after all of
 *    that and completes before any copy is written.  Whatever changed
 *    after begin is not in the copies.
 *  - rules 1 and 2 for everything else: every other write of an L2
 *    slice or L1 entry (an eviction, another write-back, a repair, a
 *    bitmap table) first waits for run to end and settles it
 *    (l2_write_back_wait, from l2_barrier and l2_write_back); then
 *    need_sync is true if anything was written since run's first sync
 *    began that an entry may depend on: begin cleared it, every
 *    request that wrote data, a new table or a refcount block since
 *    set it again, and a failed run sets it again.  So its own barrier
 *    syncs what it must, as before.
 *  - no older copy over a newer slice: a slice taken is pinned, so not
 *    evicted; every other write-back waits for run; so nothing writes
 *    it between begin and the end of run, and the newer contents go
 *    after the copy, in a later write-back, after a sync.
 *  - rule 3: run holds io_lock shared, and frees are committed with it
 *    held exclusively (rw.c), so no table run writes is freed (and
 *    reused) before run is done; the flush commits its frees only
 *    after run's final sync, under the lock again, and only those that
 *    were pending at begin (img->pending_sealed: their entries were
 *    cleared before begin, so in the copies or written before).  A
 *    trim or zero during run clears entries that run does not write:
 *    its frees wait for a later write-back (and no later free extends
 *    a range that was pending at begin).  Any other commit (l2_write_
 *    back's callers) writes back and syncs everything first, so it
 *    commits them all.
 *  - rule 4: the overlap check of every slice taken and of the L1
 *    entries runs at begin, with the lock held (check_slice_write,
 *    l1_prepare); run writes later without it, and that is still safe
 *    because nothing checked at begin can have become something else
 *    by then: a table or cluster is freed (and so reused) only with
 *    io_lock held exclusively, which run holds shared.
 *  - rule 5: a guest flush reads done_gen and begins with img->lock
 *    held, so every request it must cover has its entries in the
 *    copies (or written by an eviction before), its data and
 *    refcounts written before run's syncs start; the flush returns
 *    after the final sync.  Guest flushes are serialized (rw.c:
 *    flush_lock), so only one write-back runs at a time.
 *  - a failure: the slices and entries are dirty again and need_sync
 *    set before anyone else can write one (settling comes before any
 *    other L2 or L1 write, and before l2_write_back looks for dirty
 *    slices), so nothing is lost and the next write-back syncs first.
 *
 * The copies are bounded (WB_MAX_BYTES, and half the L2 cache, since
 * pinned slices cannot make room for the requests that go on): past
 * that, the flush writes back with the lock held, as l2_write_back.
 *
 * And rule 3's guard: what an entry references is checked before it is
 * freed or copied from (l2_entry_host_range), so that a corrupt entry
 * pointing at metadata never hands that metadata to the allocator.
 *
 * Locking: everything here needs img->lock exclusively, but
 * l2_write_back_run and l2_write_back_end, which run without it; only
 * wb_lock is taken here (l2_write_back_wait, l2_write_back_end).
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

/* With img->lock held exclusively: wait until a guest flush's
 * write-back running with the lock dropped has ended, and settle it
 * (see "Write-back without the lock"): its slices unpinned and, if it
 * failed, its slices and L1 entries dirty again and need_sync set, so
 * that whatever comes next writes them again after a sync.  Every other
 * write of an L2 slice or L1 entry comes here first (l2_barrier,
 * l2_write_back).
 */
void
l2_write_back_wait (struct qcow2_image *img)
{
  pthread_mutex_lock (&img->wb_lock);
  while (img->wb_state == WB_RUNNING)
    pthread_cond_wait (&img->wb_done, &img->wb_lock);
  if (img->wb_state == WB_ENDED) {
    cache_wb_end (img->l2_cache, !img->wb_failed);
    if (img->wb_l1) {
      if (img->wb_failed) {
        uint32_t lo = img->wb_l1_lo, hi = img->wb_l1_hi;
        if (!img->l1_dirty) {
          img->l1_dirty = true;
          img->l1_dirty_lo = lo;
          img->l1_dirty_hi = hi;
        }
        if (lo < img->l1_dirty_lo)
          img->l1_dirty_lo = lo;
        if (hi > img->l1_dirty_hi)
          img->l1_dirty_hi = hi;
      }
      free (img->wb_l1);
      img->wb_l1 = NULL;
    }
    if (img->wb_failed)
      img->need_sync = true;
    img->wb_state = WB_IDLE;
  }
  pthread_mutex_unlock (&img->wb_lock);
}

/* The barrier's sync: the data file (if separate), then the image. */
static int
sync_for_entries (struct qcow2_image *img)
{
  if (img->data_io != img->io && io_flush (img->data_io) == -1) {
    nbdkit_error ("%s: syncing data file: %m", img->name);
    return -1;
  }
  if (io_flush (img->io) == -1) {
    nbdkit_error ("%s: sync: %m", img->name);
    return -1;
  }
  return 0;
}

/* Rules 1 and 2: before an L2 slice or L1 entry is written (and a
 * bitmap table, bitmap.c).
 */
int
l2_barrier (struct qcow2_image *img)
{
  l2_write_back_wait (img);
  if (cache_flush (img->rc_cache) == -1)
    return -1;
  if (img->need_sync) {
    if (sync_for_entries (img) == -1)
      return -1;
    img->need_sync = false;
  }
  return 0;
}

/* The L2 cache's before_write (cache.h): rules 1 and 2, then rule 4. */
int
l2_before_slice_write (void *opaque, uint64_t off, uint32_t len)
{
  struct qcow2_image *img = opaque;

  if (l2_barrier (img) == -1)
    return -1;
  return overlap_check_write (img, off, len, OV_ACTIVE_L2);
}

/* Rule 4 alone, for the slices a write-back without the lock takes
 * (the ordering is l2_write_back_run's).
 */
static int
check_slice_write (void *opaque, uint64_t off, uint32_t len)
{
  return overlap_check_write (opaque, off, len, OV_ACTIVE_L2);
}

/* The dirty L1 entries as they are to be written: *be (malloc'd) holds
 * entries [*lo, *hi] big-endian, which pass the overlap check.  With
 * direct I/O the entries written are widened to whole blocks of the
 * io's alignment inside the table (io_widen_write): img->l1 holds the
 * whole table, the entries around the dirty ones as they are on disk,
 * so writing them again changes nothing and spares io.c reading the
 * block first.  The overlap check covers exactly what is written (all
 * of it inside the L1 table).
 */
static int
l1_prepare (struct qcow2_image *img, uint64_t **bep, uint32_t *lop,
            uint32_t *hip)
{
  uint32_t lo = img->l1_dirty_lo, hi = img->l1_dirty_hi, i;
  uint64_t *be, start, end;

  start = img->l1_offset + (uint64_t) lo * 8;
  end = img->l1_offset + ((uint64_t) hi + 1) * 8;
  if ((img->l1_offset & 7) == 0) {
    io_widen_write (img->io, &start, &end, img->l1_offset,
                    img->l1_offset + (uint64_t) img->l1_size * 8);
    lo = (start - img->l1_offset) / 8;
    hi = (end - img->l1_offset) / 8 - 1;
  }
  if (overlap_check_write (img, img->l1_offset + (uint64_t) lo * 8,
                           (uint64_t) (hi - lo + 1) * 8, OV_ACTIVE_L1) == -1)
    return -1;
  be = malloc ((size_t) (hi - lo + 1) * 8);
  if (be == NULL)
    return -1;
  for (i = lo; i <= hi; i++)
    be[i - lo] = htobe64 (img->l1[i]);
  *bep = be;
  *lop = lo;
  *hip = hi;
  return 0;
}

/* Write the dirty L1 entries (after rules 1 and 2; see l1_prepare). */
int
l2_write_l1 (struct qcow2_image *img)
{
  uint32_t lo, hi;
  uint64_t *be;
  int r;

  if (!img->l1_dirty)
    return 0;
  if (l2_barrier (img) == -1 || l1_prepare (img, &be, &lo, &hi) == -1)
    return -1;
  r = io_pwrite (img->io, be, (size_t) (hi - lo + 1) * 8,
                 img->l1_offset + (uint64_t) lo * 8);
  if (r == -1)
    nbdkit_error ("%s: writing L1 table: %m", img->name);
  free (be);
  if (r == 0)
    img->l1_dirty = false;
  return r;
}

/* Change L1 entry i (written by l2_write_l1), forgetting what the
 * caches know of the old L2 table.
 */
void
l2_set_l1 (struct qcow2_image *img, uint64_t i, uint64_t v)
{
  img->l1[i] = v;
  cache_stage_invalidate (img->l2_cache);
  cluster_empty_forget (img, i << (img->cluster_bits + img->l2_bits),
                        UINT64_C(1) << (img->cluster_bits + img->l2_bits));
  if (!img->l1_dirty) {
    img->l1_dirty = true;
    img->l1_dirty_lo = img->l1_dirty_hi = i;
  }
  if (i < img->l1_dirty_lo)
    img->l1_dirty_lo = i;
  if (i > img->l1_dirty_hi)
    img->l1_dirty_hi = i;
}

/* The host clusters [*first, *first + *n) that L2 entry e (of guest
 * offset guest) holds a reference to (*n = 0: none), checked before
 * the entry is freed or copied away from.  'bound' is the end of the
 * file as it was before this request allocated anything: an entry read
 * before the allocation cannot legitimately point at the new clusters.
 * A range that is not cluster aligned, reaches past bound, or touches
 * the header or metadata the overlap map knows of is corruption:
 * freeing it would hand the metadata to the allocator, and the next
 * allocating write would put guest data over it.  Nothing is freed
 * then; the image is marked corrupt.  A compressed entry's sector
 * field gives at most two clusters of bytes, so its range is at most
 * three clusters.
 */
int
l2_entry_host_range (struct qcow2_image *img, uint64_t e, uint64_t guest,
                  uint64_t bound, uint64_t *first, uint64_t *n)
{
  uint64_t off, end, hit;
  unsigned t = 0;

  *first = *n = 0;
  if (img->data_file_name)
    return 0;                   /* data clusters are not refcounted */
  if (e & QCOW_OFLAG_COMPRESSED)
    l2e_compressed (img, e, &off, &end);
  else {
    off = e & L2E_OFFSET_MASK;
    if (off == 0)
      return 0;
    if (offset_into_cluster (img, off) != 0)
      return header_mark_corrupt (img, "data cluster offset %#" PRIx64
                                  " for guest offset %#" PRIx64 " is not "
                                  "cluster aligned", off, guest);
    end = off + img->cluster_size;
  }
  if (end > bound)
    return header_mark_corrupt (img, "L2 entry %#" PRIx64 " for guest "
                                "offset %#" PRIx64 " reaches past the end "
                                "of the file (%#" PRIx64 ")", e, guest,
                                bound);
  *first = off >> img->cluster_bits;
  *n = ((end - 1) >> img->cluster_bits) - *first + 1;
  if (*first == 0 ||
      (img->overlap &&
       (t = overlap_map_query (img->overlap, *first, *n, OV_ALL, &hit)))) {
    *n = 0;
    return header_mark_corrupt (img, "L2 entry %#" PRIx64 " for guest "
                                "offset %#" PRIx64 " points at %s",
                                e, guest, t ? overlap_type_name (t)
                                : overlap_type_name (OV_MAIN_HEADER));
  }
  return 0;
}

/* Free (deferred) what entry e references, after the same checks. */
int
l2_free_entry_later (struct qcow2_image *img, uint64_t e, uint64_t guest,
                  uint64_t bound)
{
  uint64_t first, n;

  if (l2_entry_host_range (img, e, guest, bound, &first, &n) == -1)
    return -1;
  return refcount_free_later (img, first << img->cluster_bits, n);
}

/* Copy a shared L2 table (refcount > 1) so the active L1 owns it. */
static int
cow_l2_table (struct qcow2_image *img, uint64_t l1i, uint64_t old)
{
  uint64_t cs = img->cluster_size, n = cs >> img->l2_entry_shift, i;
  uint64_t *t = malloc (cs);
  int64_t new;
  int r = -1;

  if (t == NULL)
    return -1;
  /* Dirty slices of a shared table cannot exist (we never change one),
   * so the file has its current contents.
   */
  if (io_pread (img->io, t, cs, old) == -1) {
    nbdkit_error ("%s: reading L2 table: %m", img->name);
    goto out;
  }
  for (i = 0; i < n; i++) {
    uint64_t *ep = &t[i << (img->l2_entry_shift - 3)];
    uint64_t e = be64toh (*ep), host = e & L2E_OFFSET_MASK, rc;
    if ((e & QCOW_OFLAG_COMPRESSED) || host == 0 || img->data_file_name)
      continue;
    if (refcount_get (img, host >> img->cluster_bits, &rc) == -1)
      goto out;
    e = rc == 1 ? (e | QCOW_OFLAG_COPIED) : (e & ~QCOW_OFLAG_COPIED);
    *ep = htobe64 (e);
  }
  new = refcount_alloc (img, 1);
  if (new == -1)
    goto out;
  /* The map learns of a new table only once it is written, so a failed
   * write leaves no phantom table in the map, and the cluster, which
   * nothing points at, is given back.
   */
  if (overlap_check_write (img, new, cs, OV_ACTIVE_L2) == -1)
    goto out;
  if (io_pwrite (img->io, t, cs, new) == -1) {
    nbdkit_error ("%s: writing L2 table copy: %m", img->name);
    refcount_unalloc (img, new, 1);
    goto out;
  }
  if (overlap_add (img, new, cs, OV_ACTIVE_L2) == -1)
    goto out;
  img->need_sync = true;
  overlap_remove (img, old, cs, OV_ACTIVE_L2);
  l2_set_l1 (img, l1i, (uint64_t) new | QCOW_OFLAG_COPIED);
  r = refcount_free_later (img, old, 1);
 out:
  free (t);
  return r;
}

/* Make the L2 table for guest offset exist and belong to the active L1
 * alone; return its offset and whether it is brand new (all zero).
 */
static int
l2_for_write (struct qcow2_image *img, uint64_t guest, uint64_t *l2,
              bool *fresh)
{
  uint64_t l1i = l1_index (img, guest), e, off, rc;
  uint64_t cs = img->cluster_size;

  *fresh = false;
  e = img->l1[l1i];
  off = e & L1E_OFFSET_MASK;
  if (off == 0) {
    int64_t new = refcount_alloc (img, 1);
    void *zero;
    if (new == -1)
      return -1;
    if (overlap_check_write (img, new, cs, OV_ACTIVE_L2) == -1)
      return -1;
    /* Until the map and the L1 table know of it, nothing points at the
     * new table: a failure gives it back.
     */
    zero = calloc (1, cs);
    if (zero == NULL) {
      refcount_unalloc (img, new, 1);
      return -1;
    }
    if (io_pwrite (img->io, zero, cs, new) == -1) {
      nbdkit_error ("%s: writing new L2 table: %m", img->name);
      free (zero);
      refcount_unalloc (img, new, 1);
      return -1;
    }
    free (zero);
    if (overlap_add (img, new, cs, OV_ACTIVE_L2) == -1)
      return -1;
    cache_drop (img->l2_cache, new, cs);
    img->need_sync = true;
    l2_set_l1 (img, l1i, (uint64_t) new | QCOW_OFLAG_COPIED);
    *l2 = new;
    *fresh = true;
    return 0;
  }
  if (offset_into_cluster (img, off) != 0)
    return header_mark_corrupt (img, "L2 table offset %#" PRIx64
                                " is not cluster aligned", off);
  /* An L1 entry pointing at other metadata would make every later L2
   * update a write over it: refuse now, before the guest write is
   * acknowledged, not at the next flush.
   */
  if (overlap_check_write (img, off, cs,
                           (e & QCOW_OFLAG_COPIED) ? OV_ACTIVE_L2
                           : OV_ACTIVE_L2 | OV_INACTIVE_L2) == -1)
    return -1;
  if (!(e & QCOW_OFLAG_COPIED)) {
    if (refcount_get (img, off >> img->cluster_bits, &rc) == -1)
      return -1;
    if (rc == 0)
      return header_mark_corrupt (img, "L2 table at %#" PRIx64
                                  " has refcount 0", off);
    if (rc > 1) {
      if (cow_l2_table (img, l1i, off) == -1)
        return -1;
      *l2 = img->l1[l1i] & L1E_OFFSET_MASK;
      return 0;
    }
    l2_set_l1 (img, l1i, off | QCOW_OFLAG_COPIED);
  }
  *l2 = off;
  return 0;
}

/* Does cluster.c's empty-slice bit say the slice mapping guest is all
 * zero in the file (see "Empty slices" there)?  The bit is cleared
 * before any change to the slice or its L1 entry, so while it is set
 * the file holds the slice's current contents: zeroes.
 */
static bool
slice_known_empty (const struct qcow2_image *img, uint64_t guest)
{
  uint64_t g = guest >> (img->cluster_bits + img->slice_bits -
                         img->l2_entry_shift);

  return g < img->empty_nbits &&
    (__atomic_load_n (&img->empty_slices[g / 64], __ATOMIC_RELAXED) >>
     (g % 64) & 1);
}

/* A brand new L2 table, the one mapping guest (zeroes in the file,
 * none of it cached): set the empty bit of each of its slices but
 * guest's own, which the caller is about to change, so that neither
 * lookups nor l2_get_entry read them back from the file (the same
 * promise as a bit set by a reader: the file holds the slice's current
 * contents, zeroes; the bit is cleared before any change).  With
 * cache=none that is a 4 KiB O_DIRECT read saved per first write into
 * each other slice of the table.
 */
static void
table_set_empty (struct qcow2_image *img, uint64_t guest)
{
  unsigned span = img->cluster_bits + img->slice_bits - img->l2_entry_shift;
  unsigned per_table = img->cluster_bits - img->slice_bits;
  uint64_t mine = guest >> span;
  uint64_t g0 = mine >> per_table << per_table, g;

  for (g = g0; g < g0 + (UINT64_C(1) << per_table); g++)
    if (g != mine && g < img->empty_nbits)
      __atomic_fetch_or (&img->empty_slices[g / 64],
                         UINT64_C(1) << (g % 64), __ATOMIC_RELAXED);
}

/* Pin the slice holding guest's L2 entry.  A slice not cached is read
 * from the file, unless it is known to be zeroes there: a brand new
 * table, or a slice whose empty bit is set (by a lookup that read it
 * and found it empty, or by table_set_empty) and whose table
 * l2_for_write left where it was.
 */
int
l2_get_entry (struct qcow2_image *img, uint64_t guest, struct l2_ref *ref)
{
  uint64_t l2 = 0, idx = l2_index (img, guest), l1i = l1_index (img, guest);
  uint32_t slice_size = UINT32_C(1) << img->slice_bits;
  uint64_t per_slice = slice_size >> img->l2_entry_shift;
  uint64_t table = img->l1[l1i] & L1E_OFFSET_MASK;
  bool fresh, empty = table != 0 && slice_known_empty (img, guest);

  cluster_empty_forget (img, guest, 1);    /* the caller changes it */
  if (l2_for_write (img, guest, &l2, &fresh) == -1)
    return -1;
  if (l2 != table)
    empty = false;
  if (fresh)
    table_set_empty (img, guest);
  ref->slice = cache_get (img->l2_cache, l2 + (idx / per_slice) * slice_size,
                          !fresh && !empty, &ref->ce);
  if (ref->slice == NULL)
    return -1;
  ref->entry = &ref->slice[(idx % per_slice) << (img->l2_entry_shift - 3)];
  return 0;
}

void
l2_put_entry (struct qcow2_image *img, struct l2_ref *ref, bool dirty)
{
  if (dirty)
    cache_mark_dirty (img->l2_cache, ref->ce);
  cache_put (img->l2_cache, ref->ce);
}

/* Check the entries of guest clusters [c0, c0 + n*cs) that an
 * allocating write will free, before it allocates or copies anything
 * (l2_entry_host_range; the link checks them again, against the same
 * bound, before it frees them).
 */
int
l2_check_old_entries (struct qcow2_image *img, uint64_t c0, uint64_t n)
{
  uint64_t cs = img->cluster_size, i = 0, first, nc;
  uint64_t per_slice = (UINT64_C(1) << img->slice_bits) >> img->l2_entry_shift;
  struct l2_ref ref;

  while (i < n) {
    uint64_t left = per_slice - l2_index (img, c0 + i * cs) % per_slice;
    if (l2_get_entry (img, c0 + i * cs, &ref) == -1)
      return -1;
    for (; left > 0 && i < n;
         left--, i++, ref.entry += 1u << (img->l2_entry_shift - 3)) {
      if (l2_entry_host_range (img, be64toh (ref.entry[0]), c0 + i * cs,
                            img->host_end, &first, &nc) == -1) {
        l2_put_entry (img, &ref, false);
        return -1;
      }
    }
    l2_put_entry (img, &ref, false);
  }
  return 0;
}


/* Write the L2 cache's dirty slices and the dirty L1 entries back, in
 * order (rules 1 and 2 first), and sync, all with img->lock held.
 */
int
l2_write_back (struct qcow2_image *img)
{
  /* Before the loop over the dirty slices: a failed write-back without
   * the lock may make more of them dirty.
   */
  l2_write_back_wait (img);
  if (l2_barrier (img) == -1 ||
      cache_flush (img->l2_cache) == -1 ||
      l2_write_l1 (img) == -1)
    return -1;
  if (io_flush (img->io) == -1) {
    nbdkit_error ("%s: sync: %m", img->name);
    return -1;
  }
  return 0;
}

/* A guest flush's write-back without the lock, first part, with
 * img->lock held exclusively: write the dirty refcount blocks, take
 * the dirty L2 slices and L1 entries (copies) and the need for the
 * barrier's sync.  Returns 1: taken, the caller drops the lock (keeping
 * io_lock shared) and calls l2_write_back_run, then l2_write_back_end;
 * 0: done here with the lock held (l2_write_back: too many dirty
 * slices to copy); -1: error.
 */
#define WB_MAX_BYTES (UINT64_C(4) << 20)

int
l2_write_back_begin (struct qcow2_image *img)
{
  uint32_t lo = 0, hi = 0;
  uint64_t *be = NULL;
  int r;

  l2_write_back_wait (img);     /* (none runs: flushes are serialized) */
  if (cache_flush (img->rc_cache) == -1)
    return -1;
  if (img->l1_dirty && l1_prepare (img, &be, &lo, &hi) == -1)
    return -1;
  r = cache_wb_begin (img->l2_cache, WB_MAX_BYTES, check_slice_write, img);
  if (r != 1) {
    free (be);
    return r == 0 ? l2_write_back (img) : -1;
  }
  img->wb_l1 = be;
  if (be) {
    img->wb_l1_off = img->l1_offset + (uint64_t) lo * 8;
    img->wb_l1_len = (uint64_t) (hi - lo + 1) * 8;
    img->wb_l1_lo = img->l1_dirty_lo;
    img->wb_l1_hi = img->l1_dirty_hi;
    img->l1_dirty = false;
  }
  img->wb_sync_first = img->need_sync;
  img->need_sync = false;
  img->pending_sealed = img->nr_pending;
  pthread_mutex_lock (&img->wb_lock);
  img->wb_state = WB_RUNNING;
  img->wb_failed = false;
  pthread_mutex_unlock (&img->wb_lock);
  return 1;
}

/* Second part, with img->lock dropped (io_lock held shared, so that no
 * cluster is freed meanwhile): the barrier's sync, the copies, the
 * final sync.
 */
int
l2_write_back_run (struct qcow2_image *img)
{
  if (img->wb_sync_first && sync_for_entries (img) == -1)
    return -1;
  if (cache_wb_write (img->l2_cache) == -1)
    return -1;
  if (img->wb_l1 &&
      io_pwrite (img->io, img->wb_l1, img->wb_l1_len, img->wb_l1_off) == -1) {
    nbdkit_error ("%s: writing L1 table: %m", img->name);
    return -1;
  }
  if (io_flush (img->io) == -1) {
    nbdkit_error ("%s: sync: %m", img->name);
    return -1;
  }
  return 0;
}

/* Third part, with no lock held: the unlocked part returned r.  Whoever
 * next holds img->lock settles it (l2_write_back_wait).
 */
void
l2_write_back_end (struct qcow2_image *img, int r)
{
  pthread_mutex_lock (&img->wb_lock);
  img->wb_state = WB_ENDED;
  img->wb_failed = r == -1;
  pthread_cond_broadcast (&img->wb_done);
  pthread_mutex_unlock (&img->wb_lock);
}
