/* nbdkit-qcow2: the write path: allocating writes, zero, trim, flush.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The rules every change here keeps (DESIGN.md), and how:
 *
 *  1. A refcount increment reaches the file before any L1/L2 entry that
 *     points at the cluster: new clusters are counted in the refcount
 *     cache; before any dirty L2 slice or L1 entry is written,
 *     write_before_l2_slice (the L2 cache's before_write) writes the
 *     dirty refcount blocks and syncs.
 *  2. Guest data (and COW) is written before the L2 entry that maps it:
 *     the data is written at once (need_sync is set), the L2 entry only
 *     goes to the cache; the same hook syncs before L2 write-back.
 *  3. An L1/L2 entry is cleared and written before the refcount
 *     decrement that frees its cluster: frees are deferred
 *     (refcount_free_later) and applied only after the metadata is
 *     written and synced, with io_lock held exclusively so that no
 *     cluster is freed while a read or write to it is in flight.
 *     What an entry references is checked before it is freed or copied
 *     from, and before the write allocates anything (entry_host_range):
 *     a range over metadata the overlap map knows of, or past the end
 *     of the file, marks the image corrupt and nothing is freed.
 *  4. Every host write passes overlap_check_write first.
 *  5. After qcow2_flush (or a FUA write) returns, everything
 *     acknowledged before it is on stable storage.
 *  6. So after a crash, refcounts can only be too high (leaks), never
 *     too low, and no entry points at unwritten data.
 *  7. Corruption is sticky (header_mark_corrupt): writes fail with EIO.
 *
 * Writes to clusters the image owns alone (COPIED, refcount 1) are done
 * in place, outside img->lock, under the shared io_lock; when the L2
 * slice is cached their mapping and checks need img->lock only shared
 * (write_in_place_cached), so overwrites do not serialize.  Everything
 * else (unallocated, zero, compressed, shared with a snapshot, backing
 * data) is an allocating write under img->lock: new clusters are
 * allocated contiguously for the whole run, the untouched head and tail
 * are copied from the old contents into the same buffer, and the run is
 * written with one host write.  A guest write drops the lock for that
 * host write (the clusters are not linked yet, so nothing else can
 * reach them) and takes it again to link them; meanwhile its guest
 * range is "in flight" and other writes, zeroes and trims that touch
 * its clusters wait (struct inflight).  With extended L2 entries only
 * the touched subclusters of a cluster are written and marked
 * allocated, under the lock.
 *
 * L2 tables shared with a snapshot (refcount > 1) are copied before
 * they are changed; the copy gets refcount 1 and COPIED flags
 * recomputed from the refcounts.
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

/* Frees pile up until the next flush; past this many clusters a write
 * flushes by itself so that freed space is reused.
 */
#define MAX_PENDING_FREES 8192

/* One request may free clusters scattered all over the file (a trim of
 * a disk written in random order): past this many ranges of them (64
 * KiB of list), it commits them before going on.
 */
#define MAX_PENDING_RANGES 4096

/* Rules 1 and 2: before an L2 slice or L1 entry is written. */
static int
write_barrier (struct qcow2_image *img)
{
  if (cache_flush (img->rc_cache) == -1)
    return -1;
  if (img->need_sync) {
    if (img->data_io != img->io && io_flush (img->data_io) == -1) {
      nbdkit_error ("%s: syncing data file: %m", img->name);
      return -1;
    }
    if (io_flush (img->io) == -1) {
      nbdkit_error ("%s: sync: %m", img->name);
      return -1;
    }
    img->need_sync = false;
  }
  return 0;
}

/* The L2 cache's before_write (cache.h): rules 1 and 2, then rule 4. */
int
write_before_l2_slice (void *opaque, uint64_t off, uint32_t len)
{
  struct qcow2_image *img = opaque;

  if (write_barrier (img) == -1)
    return -1;
  return overlap_check_write (img, off, len, OV_ACTIVE_L2);
}

static int
write_l1 (struct qcow2_image *img)
{
  uint32_t lo = img->l1_dirty_lo, hi = img->l1_dirty_hi, i;
  uint64_t *be;
  int r = -1;

  if (!img->l1_dirty)
    return 0;
  if (write_barrier (img) == -1)
    return -1;
  be = malloc ((size_t) (hi - lo + 1) * 8);
  if (be == NULL)
    return -1;
  for (i = lo; i <= hi; i++)
    be[i - lo] = htobe64 (img->l1[i]);
  if (overlap_check_write (img, img->l1_offset + (uint64_t) lo * 8,
                           (uint64_t) (hi - lo + 1) * 8, OV_ACTIVE_L1) == 0) {
    r = io_pwrite (img->io, be, (size_t) (hi - lo + 1) * 8,
                   img->l1_offset + (uint64_t) lo * 8);
    if (r == -1)
      nbdkit_error ("%s: writing L1 table: %m", img->name);
  }
  free (be);
  if (r == 0)
    img->l1_dirty = false;
  return r;
}

static void
l1_set (struct qcow2_image *img, uint64_t i, uint64_t v)
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

/* Write everything back in order and sync; then apply deferred frees. */
int
write_flush_locked (struct qcow2_image *img)
{
  if (write_barrier (img) == -1 ||
      cache_flush (img->l2_cache) == -1 ||
      write_l1 (img) == -1)
    return -1;
  if (io_flush (img->io) == -1) {
    nbdkit_error ("%s: sync: %m", img->name);
    return -1;
  }
  if (img->nr_pending > 0) {
    int r;
    pthread_rwlock_wrlock (&img->io_lock);
    r = refcount_commit_frees (img);
    pthread_rwlock_unlock (&img->io_lock);
    /* The decrements could wait for the next flush (until then a crash
     * only leaks), but a clean close must not leak: write them now.
     */
    if (r == -1 || cache_flush (img->rc_cache) == -1)
      return -1;
    if (io_flush (img->io) == -1) {
      nbdkit_error ("%s: sync: %m", img->name);
      return -1;
    }
  }
  return 0;
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
static int
entry_host_range (struct qcow2_image *img, uint64_t e, uint64_t guest,
                  uint64_t bound, uint64_t *first, uint64_t *n)
{
  uint64_t off, end, hit;
  unsigned t = 0;

  *first = *n = 0;
  if (img->data_file_name)
    return 0;                   /* data clusters are not refcounted */
  if (e & QCOW_OFLAG_COMPRESSED) {
    unsigned x = 62 - (img->cluster_bits - 8);
    uint64_t sectors = ((e & L2E_COMPRESSED_MASK) >> x) + 1;
    off = e & ((UINT64_C(1) << x) - 1);
    end = (off & ~UINT64_C(511)) + sectors * 512;  /* < 2^63: no overflow */
  }
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
static int
free_entry_later (struct qcow2_image *img, uint64_t e, uint64_t guest,
                  uint64_t bound)
{
  uint64_t first, n;

  if (entry_host_range (img, e, guest, bound, &first, &n) == -1)
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
  l1_set (img, l1i, (uint64_t) new | QCOW_OFLAG_COPIED);
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
    l1_set (img, l1i, (uint64_t) new | QCOW_OFLAG_COPIED);
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
    l1_set (img, l1i, off | QCOW_OFLAG_COPIED);
  }
  *l2 = off;
  return 0;
}

/* Pinned slice + the entry pointer for a guest cluster. */
struct l2_ref {
  struct cache_entry *ce;
  uint64_t *slice;
  uint64_t *entry;              /* first word of the entry */
};

static int
get_entry (struct qcow2_image *img, uint64_t guest, struct l2_ref *ref)
{
  uint64_t l2 = 0, idx = l2_index (img, guest);
  uint32_t slice_size = UINT32_C(1) << img->slice_bits;
  uint64_t per_slice = slice_size >> img->l2_entry_shift;
  bool fresh;

  cluster_empty_forget (img, guest, 1);    /* the caller changes it */
  if (l2_for_write (img, guest, &l2, &fresh) == -1)
    return -1;
  ref->slice = cache_get (img->l2_cache, l2 + (idx / per_slice) * slice_size,
                          !fresh, &ref->ce);
  if (ref->slice == NULL)
    return -1;
  ref->entry = &ref->slice[(idx % per_slice) << (img->l2_entry_shift - 3)];
  return 0;
}

static void
put_entry (struct qcow2_image *img, struct l2_ref *ref, bool dirty)
{
  if (dirty)
    cache_mark_dirty (img->l2_cache, ref->ce);
  cache_put (img->l2_cache, ref->ce);
}

/* Check the entries of guest clusters [c0, c0 + n*cs) that an
 * allocating write will free, before it allocates or copies anything
 * (entry_host_range; the link checks them again, against the same
 * bound, before it frees them).
 */
static int
check_old_entries (struct qcow2_image *img, uint64_t c0, uint64_t n)
{
  uint64_t cs = img->cluster_size, i = 0, first, nc;
  uint64_t per_slice = (UINT64_C(1) << img->slice_bits) >> img->l2_entry_shift;
  struct l2_ref ref;

  while (i < n) {
    uint64_t left = per_slice - l2_index (img, c0 + i * cs) % per_slice;
    if (get_entry (img, c0 + i * cs, &ref) == -1)
      return -1;
    for (; left > 0 && i < n;
         left--, i++, ref.entry += 1u << (img->l2_entry_shift - 3)) {
      if (entry_host_range (img, be64toh (ref.entry[0]), c0 + i * cs,
                            img->host_end, &first, &nc) == -1) {
        put_entry (img, &ref, false);
        return -1;
      }
    }
    put_entry (img, &ref, false);
  }
  return 0;
}

/* Before writing guest data at host [host, host+len) of the image file:
 * the overlap check, and a bound (an entry pointing far past the end of
 * the file is corruption, not a reason to grow it).
 */
static int
data_check (struct qcow2_image *img, uint64_t host, uint64_t len)
{
  if (img->data_io != img->io)
    return 0;
  if (host >= img->host_end || img->host_end - host < len)
    return header_mark_corrupt (img, "data cluster at %#" PRIx64 " is "
                                "beyond the end of the file (%#" PRIx64 ")",
                                host, img->host_end);
  return overlap_check_write (img, host, len, 0);
}

/* Write buf to host [host, host+len) of the data file. */
static int
data_write (struct qcow2_image *img, const void *buf, uint64_t len,
            uint64_t host)
{
  if (data_check (img, host, len) == -1)
    return -1;
  if (io_pwrite (img->data_io, buf, len, host) == -1) {
    nbdkit_error ("%s: writing data at %#" PRIx64 ": %m", img->name, host);
    return -1;
  }
  img->need_sync = true;
  return 0;
}

/* Is host offset at or past the end of the data file (so reads there
 * return zeroes)?  Asked of the file itself, never of a cached size.
 */
static bool
past_eof (struct qcow2_image *img, uint64_t host)
{
  int64_t size = io_size (img->data_io);

  return size != -1 && host >= (uint64_t) size;
}

/* Guest ranges in flight (struct inflight): clusters that an allocating
 * write has taken from the allocator and is filling with img->lock
 * dropped, before it links them.  Anything else that would change the
 * same guest clusters meanwhile (a write to another part of one of
 * them, a zero, a trim) would work from the old mapping and one of the
 * two would be lost, so it waits.  Reads need not: until the link they
 * see the old contents, which is a valid answer for a read racing a
 * write.
 */
static bool
inflight_overlaps (const struct qcow2_image *img, uint64_t a, uint64_t b)
{
  const struct inflight *f;

  for (f = img->inflight; f != NULL; f = f->next)
    if (f->start < b && a < f->end)
      return true;
  return false;
}

/* With img->lock held exclusively: if guest [off, off+len) shares a
 * cluster with a range in flight, drop the lock, wait until it has
 * gone, and return true (the caller starts again); else false.
 */
static bool
inflight_wait (struct qcow2_image *img, uint64_t off, uint64_t len)
{
  uint64_t cs = img->cluster_size;
  uint64_t a = off & ~(cs - 1), b = round_up_pow2 (off + len, cs);

  if (img->inflight == NULL || !inflight_overlaps (img, a, b))
    return false;
  pthread_mutex_lock (&img->inflight_lock);
  pthread_rwlock_unlock (&img->lock);
  while (inflight_overlaps (img, a, b))
    pthread_cond_wait (&img->inflight_done, &img->inflight_lock);
  pthread_mutex_unlock (&img->inflight_lock);
  return true;
}

static void
inflight_add (struct qcow2_image *img, struct inflight *f, uint64_t a,
              uint64_t b)
{
  f->start = a;
  f->end = b;
  pthread_mutex_lock (&img->inflight_lock);
  f->next = img->inflight;
  img->inflight = f;
  pthread_mutex_unlock (&img->inflight_lock);
}

static void
inflight_remove (struct qcow2_image *img, struct inflight *f)
{
  struct inflight **pp;

  pthread_mutex_lock (&img->inflight_lock);
  for (pp = &img->inflight; *pp != f; pp = &(*pp)->next)
    ;
  *pp = f->next;
  pthread_cond_broadcast (&img->inflight_done);
  pthread_mutex_unlock (&img->inflight_lock);
}

/* Allocating write of whole clusters [c0, c0 + n*cs) all of one kind
 * (standard L2 entries), with the guest data at [off, off+len) inside;
 * with old, the clusters may have entries to free (not unallocated).
 * With unlock, img->lock is dropped while the data is written (and
 * taken again, exclusively, to link it): nothing can reach clusters
 * not yet linked, and the guest range is marked in flight.  On failure
 * the clusters not linked yet are given back (refcount_unalloc).
 */
static int
alloc_clusters (struct qcow2_image *img, const uint8_t *buf, uint64_t off,
                uint64_t len, uint64_t c0, uint64_t n, bool edges_zero,
                bool old, bool unlock)
{
  uint64_t cs = img->cluster_size, i, wlen, whost, bound, linked = 0;
  uint8_t *data = NULL;
  const uint8_t *src;
  struct inflight f;
  bool in_flight = false;
  int64_t host;
  struct l2_ref ref;
  int r = -1, w;

  if (old && check_old_entries (img, c0, n) == -1)
    return -1;
  bound = img->host_end;
  if (img->data_file_name)
    host = c0;                  /* external data: host offset = guest */
  else if ((host = refcount_alloc (img, n)) == -1)
    return -1;
  /* Clusters past the end of the file already read as zeroes: when the
   * head and tail are zeroes too (known from the kind of the run, or
   * checked), write only the guest data (a 4 KiB write into a fresh
   * 64 KiB cluster writes 4 KiB, not 64, and builds no padding).
   */
  src = buf;
  wlen = len;
  whost = host + (off - c0);
  if (!(edges_zero && past_eof (img, host))) {
    data = malloc (n * cs);
    if (data == NULL)
      goto out;
    /* Head and tail keep what the guest saw before (rule 2: one write). */
    if (edges_zero) {
      memset (data, 0, off - c0);
      memset (data + (off + len - c0), 0, c0 + n * cs - off - len);
    }
    else {
      if (off > c0 && cluster_read (img, data, off - c0, c0, true) == -1)
        goto out;
      if (off + len < c0 + n * cs &&
          cluster_read (img, data + (off + len - c0), c0 + n * cs - off - len,
                        off + len, true) == -1)
        goto out;
    }
    if (edges_zero || !past_eof (img, host) || !is_zero (data, off - c0) ||
        !is_zero (data + (off + len - c0), c0 + n * cs - off - len)) {
      memcpy (data + (off - c0), buf, len);
      src = data;
      wlen = n * cs;
      whost = host;
    }
  }

  if (!unlock) {
    if (data_write (img, src, wlen, whost) == -1)
      goto out;
  }
  else {
    if (data_check (img, whost, wlen) == -1)
      goto out;
    inflight_add (img, &f, c0, c0 + n * cs);
    in_flight = true;
    pthread_rwlock_rdlock (&img->io_lock);
    pthread_rwlock_unlock (&img->lock);
    w = io_pwrite (img->data_io, src, wlen, whost);
    pthread_rwlock_unlock (&img->io_lock);
    pthread_rwlock_wrlock (&img->lock);
    if (w == -1) {
      nbdkit_error ("%s: writing data at %#" PRIx64 ": %m", img->name,
                    whost);
      goto out;
    }
    img->need_sync = true;
    if (img->corrupt) {         /* marked while the lock was dropped */
      errno = EIO;
      goto out;
    }
  }

  /* Link the entries, one slice lookup per slice, not per cluster. */
  for (i = 0; i < n; ) {
    uint64_t per_slice = (UINT64_C(1) << img->slice_bits) >> img->l2_entry_shift;
    uint64_t left = per_slice - l2_index (img, c0 + i * cs) % per_slice;
    if (get_entry (img, c0 + i * cs, &ref) == -1)
      goto out;
    for (; left > 0 && i < n;
         left--, i++, ref.entry += 1u << (img->l2_entry_shift - 3)) {
      if (free_entry_later (img, be64toh (ref.entry[0]), c0 + i * cs,
                            bound) == -1) {
        put_entry (img, &ref, true);
        goto out;
      }
      ref.entry[0] = htobe64 ((host + i * cs) | QCOW_OFLAG_COPIED);
      linked = i + 1;
    }
    put_entry (img, &ref, true);
  }
  r = 0;
 out:
  /* Still in flight (no other request touches these guest clusters)
   * and holding img->lock: the unlinked clusters are ours alone.
   */
  if (r == -1 && !img->data_file_name && linked < n)
    refcount_unalloc (img, host + linked * cs, n - linked);
  if (in_flight)
    inflight_remove (img, &f);
  free (data);
  return r;
}

/* Extended L2: write [off, off+len) inside one cluster.  A cluster
 * allocated here is given back if the write fails before it is linked.
 */
static int
write_subclusters (struct qcow2_image *img, const uint8_t *buf, uint64_t off,
                   uint64_t len)
{
  uint64_t cs = img->cluster_size, c0 = off & ~(cs - 1);
  uint64_t scs = UINT64_C(1) << img->subcluster_bits;
  unsigned s0 = (off - c0) >> img->subcluster_bits;
  unsigned s1 = (off + len - 1 - c0) >> img->subcluster_bits;
  uint64_t a = c0 + s0 * scs, b = c0 + (s1 + 1) * scs;
  uint64_t e, bm, host, touched, first, nfree;
  struct l2_ref ref;
  uint8_t *data = NULL;
  bool fresh = false;           /* host allocated here, not linked yet */
  int r = -1;

  if (get_entry (img, c0, &ref) == -1)
    return -1;
  e = be64toh (ref.entry[0]);
  bm = be64toh (ref.entry[1]);
  host = e & L2E_OFFSET_MASK;
  put_entry (img, &ref, false);

  if ((e & QCOW_OFLAG_COMPRESSED) ||
      (host && !(e & QCOW_OFLAG_COPIED) && !img->data_file_name)) {
    /* Compressed or shared: copy the whole cluster, after checking
     * what the entry will free (before anything is allocated).
     */
    if (entry_host_range (img, e, c0, img->host_end, &first, &nfree) == -1)
      return -1;
    data = malloc (cs);
    if (data == NULL)
      return -1;
    if (cluster_read (img, data, cs, c0, true) == -1)
      goto out;
    memcpy (data + (off - c0), buf, len);
    if (img->data_file_name)
      host = c0;
    else if ((int64_t) (host = refcount_alloc (img, 1)) == -1)
      goto out;
    else
      fresh = true;
    if (data_write (img, data, cs, host) == -1)
      goto out;
    if (get_entry (img, c0, &ref) == -1)
      goto out;
    ref.entry[0] = htobe64 (host | QCOW_OFLAG_COPIED);
    ref.entry[1] = htobe64 (SC_ALLOC_MASK);
    put_entry (img, &ref, true);
    fresh = false;
    r = refcount_free_later (img, first << img->cluster_bits, nfree);
    goto out;
  }

  data = malloc (b - a);
  if (data == NULL)
    return -1;
  if (off > a && cluster_read (img, data, off - a, a, true) == -1)
    goto out;
  if (off + len < b &&
      cluster_read (img, data + (off + len - a), b - off - len, off + len,
                    true) == -1)
    goto out;
  memcpy (data + (off - a), buf, len);
  if (host == 0 && !(img->data_file_name && (e & QCOW_OFLAG_COPIED))) {
    if (img->data_file_name)
      host = c0;
    else if ((int64_t) (host = refcount_alloc (img, 1)) == -1)
      goto out;
    else
      fresh = true;
  }
  if (data_write (img, data, b - a, host + (a - c0)) == -1)
    goto out;
  touched = ((UINT64_C(1) << (s1 + 1)) - 1) & ~((UINT64_C(1) << s0) - 1);
  if (get_entry (img, c0, &ref) == -1)
    goto out;
  ref.entry[0] = htobe64 (host | QCOW_OFLAG_COPIED);
  bm = (bm | touched) & ~(touched << 32);
  ref.entry[1] = htobe64 (bm);
  put_entry (img, &ref, true);
  fresh = false;
  r = 0;
 out:
  if (fresh)
    refcount_unalloc (img, host, 1);
  free (data);
  return r;
}

/* Write one run (as cluster_map describes it) that cannot be written in
 * place; unlock as for alloc_clusters.  Returns bytes consumed.
 */
static int64_t
write_run_locked (struct qcow2_image *img, const uint8_t *buf, uint64_t off,
                  const struct mapping *m, bool unlock)
{
  uint64_t cs = img->cluster_size, c0, c1, len = m->length;
  bool edges_zero;

  if (img->ext_l2) {
    uint64_t n = min_u64 (len, cs - offset_into_cluster (img, off));
    if (write_subclusters (img, buf, off, n) == -1)
      return -1;
    return n;
  }
  c0 = off & ~(cs - 1);
  c1 = round_up_pow2 (off + len, cs);
  /* For standard entries the kind is per cluster, so the head and tail
   * of the run's clusters are of the run's kind: zero flag, or
   * unallocated with nothing behind it.
   */
  edges_zero = m->kind == MAP_ZERO ||
    (m->kind == MAP_UNALLOCATED && c0 >= img->backing_size);
  if (alloc_clusters (img, buf, off, len, c0, (c1 - c0) / cs,
                      edges_zero, m->kind != MAP_UNALLOCATED, unlock) == -1)
    return -1;
  return len;
}

static int
check_writable (struct qcow2_image *img)
{
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  if (img->corrupt) {
    errno = EIO;
    return -1;
  }
  if ((img->incompat & INCOMPAT_DIRTY) && !img->dirty_written &&
      check_repair_dirty (img) == -1)
    return -1;
  return header_prepare_write (img);
}

/* Write with img->lock held throughout (used by zero's fallback). */
static int
write_locked (struct qcow2_image *img, const uint8_t *buf, uint64_t count,
              uint64_t offset)
{
  while (count > 0) {
    struct mapping m;
    int64_t n;

    if (cluster_map (img, offset, count, &m) == -1)
      return -1;
    if (m.kind == MAP_DATA && m.copied) {
      if (data_write (img, buf, m.length, m.host_offset) == -1)
        return -1;
      n = m.length;
    }
    else if ((n = write_run_locked (img, buf, offset, &m, false)) == -1)
      return -1;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

static int
maybe_commit (struct qcow2_image *img)
{
  if (img->pending_clusters > MAX_PENDING_FREES)
    return write_flush_locked (img);
  return 0;
}

/* Write p to the COPIED data run m in place, with img->lock held
 * (shared or exclusive): the lock is dropped before the data I/O, which
 * runs under the shared io_lock (rule 3 keeps the cluster ours).
 * Returns m->length, or -1.
 */
static int64_t
write_in_place_unlock (struct qcow2_image *img, const uint8_t *p,
                       const struct mapping *m)
{
  int r;

  pthread_rwlock_rdlock (&img->io_lock);
  pthread_rwlock_unlock (&img->lock);
  r = io_pwrite (img->data_io, p, m->length, m->host_offset);
  pthread_rwlock_unlock (&img->io_lock);
  if (r == -1) {
    nbdkit_error ("%s: writing data at %#" PRIx64 ": %m", img->name,
                  m->host_offset);
    return -1;
  }
  return m->length;
}

/* The fast path of an in-place write: with img->lock held shared, map
 * [offset, offset+count) and check it.  Returns the length written, 0
 * if the exclusive path is needed (slice not cached, not a COPIED data
 * cluster, header not yet prepared, anything to report), -1 on an I/O
 * error.  Drops img->lock.
 */
static int64_t
write_in_place_cached (struct qcow2_image *img, const uint8_t *p,
                       uint64_t count, uint64_t offset)
{
  struct mapping m;

  if (img->readonly || img->corrupt || !header_write_ready (img) ||
      cluster_map_cached (img, offset, count, &m, NULL) != 0 ||
      m.kind != MAP_DATA || !m.copied ||
      (img->data_io == img->io &&
       (m.host_offset >= img->host_end ||
        img->host_end - m.host_offset < m.length ||
        !overlap_write_ok (img, m.host_offset, m.length, 0)))) {
    pthread_rwlock_unlock (&img->lock);
    return 0;
  }
  return write_in_place_unlock (img, p, &m);
}

/* The whole clusters [*a, *b) inside guest [offset, offset+count); the
 * partial last cluster of the disk counts as whole.
 */
static void
whole_clusters (const struct qcow2_image *img, uint64_t count,
                uint64_t offset, uint64_t *a, uint64_t *b)
{
  uint64_t cs = img->cluster_size;

  *a = round_up_pow2 (offset, cs);
  *b = (offset + count) & ~(cs - 1);
  if (offset + count == img->size)
    *b = round_up_pow2 (img->size, cs);
}

/* The start of a zero or trim: the range checked, img->lock held
 * exclusively with no write in flight over the range, the image
 * writable.  On -1 no lock is held.
 */
static int
change_begin (struct qcow2_image *img, uint64_t count, uint64_t offset,
              const char *what)
{
  if (image_check_range (img, count, offset, what) == -1)
    return -1;
  do
    pthread_rwlock_wrlock (&img->lock);
  while (inflight_wait (img, offset, count));
  if (check_writable (img) == -1) {
    pthread_rwlock_unlock (&img->lock);
    return -1;
  }
  return 0;
}

/* The end of a zero or trim that returned r: commit frees if many are
 * pending, drop the lock, flush for FUA.
 */
static int
change_end (struct qcow2_image *img, int r, unsigned flags)
{
  if (r == 0)
    r = maybe_commit (img);
  pthread_rwlock_unlock (&img->lock);
  if (r == 0 && (flags & QCOW2_F_FUA))
    return qcow2_flush (img);
  return r;
}

int
qcow2_pwrite (struct qcow2_image *img, const void *buf, uint64_t count,
              uint64_t offset, unsigned flags)
{
  const uint8_t *p = buf;

  if (image_check_range (img, count, offset, "write") == -1)
    return -1;
  while (count > 0) {
    struct mapping m;
    int64_t n;

    pthread_rwlock_rdlock (&img->lock);
    n = write_in_place_cached (img, p, count, offset);
    if (n == -1)
      return -1;
    if (n > 0)
      goto next;

    pthread_rwlock_wrlock (&img->lock);
    if (check_writable (img) == -1 ||
        cluster_map (img, offset, count, &m) == -1)
      goto err;
    if (inflight_wait (img, offset, m.length))
      continue;                 /* lock dropped: map again */
    if (m.kind == MAP_DATA && m.copied) {
      if (data_check (img, m.host_offset, m.length) == -1)
        goto err;
      n = write_in_place_unlock (img, p, &m);
      if (n == -1)
        return -1;
    }
    else {
      n = write_run_locked (img, p, offset, &m, true);
      if (n == -1 || maybe_commit (img) == -1)
        goto err;
      pthread_rwlock_unlock (&img->lock);
    }
  next:
    p += n;
    offset += n;
    count -= n;
  }
  if (flags & QCOW2_F_FUA)
    return qcow2_flush (img);
  return 0;

 err:
  pthread_rwlock_unlock (&img->lock);
  return -1;
}

int
qcow2_flush (struct qcow2_image *img)
{
  int r;

  if (img->readonly)
    return 0;
  pthread_rwlock_wrlock (&img->lock);
  r = write_flush_locked (img);
  if (r == 0 && img->data_io != img->io && io_flush (img->data_io) == -1) {
    nbdkit_error ("%s: syncing data file: %m", img->name);
    r = -1;
  }
  pthread_rwlock_unlock (&img->lock);
  return r;
}

/* Does guest [off, off+len) already read as zeroes? */
static int
reads_as_zero (struct qcow2_image *img, uint64_t off, uint64_t len,
               bool *zero)
{
  *zero = true;
  while (len > 0) {
    struct mapping m;
    if (cluster_map (img, off, len, &m) == -1)
      return -1;
    if (m.kind == MAP_DATA || m.kind == MAP_COMPRESSED ||
        (m.kind == MAP_UNALLOCATED && off < img->backing_size)) {
      *zero = false;
      return 0;
    }
    off += m.length;
    len -= m.length;
  }
  return 0;
}

/* Would zeroing [off, off+len) need real zeroes written?  (Errors count
 * as yes: the real request will report them.)
 */
static bool
slow_zero (struct qcow2_image *img, uint64_t off, uint64_t len)
{
  bool zero;

  if (len == 0)
    return false;
  return reads_as_zero (img, off, len, &zero) == -1 || !zero;
}

/* Write real zeroes (the fallback). */
static int
write_zeroes (struct qcow2_image *img, uint64_t off, uint64_t len,
              unsigned flags)
{
  static const uint8_t zeroes[65536];
  bool zero;

  if (reads_as_zero (img, off, len, &zero) == -1)
    return -1;
  if (zero)
    return 0;
  if (flags & QCOW2_F_FAST_ZERO) {
    errno = ENOTSUP;
    return -1;
  }
  while (len > 0) {
    uint64_t n = min_u64 (len, sizeof zeroes);
    if (write_locked (img, zeroes, n, off) == -1)
      return -1;
    off += n;
    len -= n;
  }
  return 0;
}

/* Change whole clusters [c0, c0+n*cs): trim discards them (they read
 * as the backing file, or zeroes without one; v3 images with a backing
 * file get the zero flag instead, as QEMU does), zero makes them read as
 * zeroes.  Host clusters are freed unless zeroing without may_trim, which
 * keeps them allocated (preallocated zero clusters).
 */
static int
zero_clusters (struct qcow2_image *img, uint64_t c0, uint64_t n, bool trim,
               bool may_trim)
{
  uint64_t cs = img->cluster_size, i;

  for (i = 0; i < n; i++) {
    struct l2_ref ref;
    uint64_t g = c0 + i * cs, e, host, ne;
    bool backing = img->backing_name != NULL && g < img->backing_size;
    bool want_zero = !trim || (backing && img->version >= 3);
    bool keep;

    /* No L2 table: unallocated, which reads as zero without backing. */
    if ((img->l1[l1_index (img, g)] & L1E_OFFSET_MASK) == 0 &&
        (!want_zero || !backing))
      continue;
    if (img->nr_pending >= MAX_PENDING_RANGES &&
        write_flush_locked (img) == -1)
      return -1;
    if (get_entry (img, g, &ref) == -1)
      return -1;
    e = be64toh (ref.entry[0]);
    host = e & L2E_OFFSET_MASK;
    keep = !trim && !may_trim && host && (e & QCOW_OFLAG_COPIED) &&
           !(e & QCOW_OFLAG_COMPRESSED);
    if (!keep && free_entry_later (img, e, g, img->host_end) == -1) {
      put_entry (img, &ref, false);
      return -1;
    }
    ne = keep ? (host | QCOW_OFLAG_COPIED) : 0;
    if (want_zero && !img->ext_l2)
      ne |= QCOW_OFLAG_ZERO;
    ref.entry[0] = htobe64 (ne);
    if (img->ext_l2)
      ref.entry[1] = htobe64 (want_zero ? SC_ZERO_MASK : 0);
    put_entry (img, &ref, true);
  }
  return 0;
}

int
qcow2_zero (struct qcow2_image *img, uint64_t count, uint64_t offset,
            unsigned flags)
{
  uint64_t cs = img->cluster_size, a, b;
  bool meta = img->version >= 3 && !(img->autoclear & AUTOCLEAR_DATA_FILE_RAW);
  int r = -1;

  if (change_begin (img, count, offset, "zero") == -1)
    return -1;
  /* Whole clusters [a, b) change metadata; the ragged edges (and
   * everything on v2 or raw external data) get real zeroes.
   */
  whole_clusters (img, count, offset, &a, &b);
  /* A fast zero that would need real zeroes anywhere fails before it
   * changes anything.
   */
  if ((flags & QCOW2_F_FAST_ZERO) &&
      (((!meta || a >= b) && slow_zero (img, offset, count)) ||
       (meta && a < b && (slow_zero (img, offset, a - offset) ||
                          (offset + count > b &&
                           slow_zero (img, b, offset + count - b)))))) {
    errno = ENOTSUP;
    goto out;
  }
  if (!meta || a >= b) {
    if (!meta && !img->backing_name && !img->data_file_name &&
        (flags & QCOW2_F_MAY_TRIM) && a < b) {
      /* v2 without a backing file: a discarded cluster reads as zero. */
      if (write_zeroes (img, offset, a - offset, flags) == -1 ||
          zero_clusters (img, a, (b - a) / cs, true, true) == -1 ||
          write_zeroes (img, b, offset + count - min_u64 (b, offset + count),
                        flags) == -1)
        goto out;
    }
    else if (write_zeroes (img, offset, count, flags) == -1)
      goto out;
  }
  else {
    if (write_zeroes (img, offset, a - offset, flags) == -1 ||
        zero_clusters (img, a, (b - a) / cs, false,
                       (flags & QCOW2_F_MAY_TRIM) != 0) == -1 ||
        (offset + count > b &&
         write_zeroes (img, b, offset + count - b, flags) == -1))
      goto out;
  }
  r = 0;
 out:
  return change_end (img, r, flags);
}

int
qcow2_trim (struct qcow2_image *img, uint64_t count, uint64_t offset,
            unsigned flags)
{
  uint64_t cs = img->cluster_size, a, b;
  int r = 0;

  if (change_begin (img, count, offset, "trim") == -1)
    return -1;
  /* Trim is advisory: only whole clusters, and nothing with an external
   * data file (whose contents must stay as they are when raw).
   */
  whole_clusters (img, count, offset, &a, &b);
  if (a < b && !img->data_file_name)
    r = zero_clusters (img, a, (b - a) / cs, true, true);
  return change_end (img, r, flags);
}
