/* nbdkit-qcow2: the request layer: every public I/O entry point.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * qcow2_pread, qcow2_pwrite, qcow2_zero, qcow2_trim, qcow2_flush,
 * qcow2_extents, qcow2_prefetch and qcow2_check split a request into
 * runs (cluster.c maps them) and decide, run by run, which locks it
 * holds.  This is the only file that takes or drops img->lock, io_lock,
 * inflight_lock or flush_lock; the files below it say which lock they
 * need and never change it (l2.c only waits, with img->lock held, on
 * its own wb_lock, for a flush's write-back running without img->lock).
 *
 *   img->lock (rwlock)   shared: look up mappings in the caches (the
 *                        fast paths of reads and in-place writes);
 *                        exclusive: anything that may change metadata
 *   io_lock (rwlock)     shared: guest data I/O done with img->lock
 *                        dropped; exclusive: freeing clusters (the
 *                        commit of deferred frees) or cutting the file
 *   inflight_lock        the list of allocating writes in flight
 *   flush_lock (mutex)   one guest flush at a time
 *
 * Lock order: flush_lock, img->lock, io_lock, inflight_lock.  Data I/O
 * takes io_lock shared before img->lock is dropped, so a cluster cannot
 * be freed between its mapping and the I/O (write.c, rule 3).
 *
 * A read maps each run with img->lock shared when the L2 slice is
 * cached or can be staged (cache.c), exclusively otherwise, and reads
 * the data with only io_lock held.  A write tries the shared fast path
 * first (a COPIED data cluster whose slice is cached: written in place,
 * in parallel with other writes); anything else takes img->lock
 * exclusively: in place once mapped, or as an allocating write
 * (write.c), whose data is written with img->lock dropped while its
 * guest range is "in flight" (struct inflight) and whose entries are
 * linked with the lock taken again.  Zero and trim hold it exclusively
 * throughout.  With detect-zeroes, a write's whole clusters of zeroes
 * become zero requests and the rest is written as above; the policy
 * options (detect-zeroes, discard, discard-no-unref) are applied here,
 * write.c only sees the flags that result.  With compress=on the whole
 * clusters of a write are compressed first, with no lock held (so
 * requests compress in parallel), then placed and linked like an
 * allocating write (write.c); what is not stored compressed (edges,
 * clusters that do not compress or hold data) is written as above.
 * Such writes usually fill a new image from end to end (a conversion,
 * a backup), and the whole image would only go to disk, and through
 * the disk's write cache, at the final flush, with the CPUs idle
 * meanwhile: so every WRITEBACK_KICK bytes of compressed clusters, the
 * kernel is asked to start writing the file back and an early sync is
 * started in the background (start_writeback; io.c "Early syncs"), and
 * the final flush finds little left to do.  This changes nothing about
 * what a flush guarantees, only when the disk starts working.
 * Deferred frees are committed here (flush_locked): at a flush, after
 * a request once too many are pending, and in the middle of a large
 * zero or trim.
 *
 * Every write, zero and trim first sets its range in the kept dirty
 * bitmaps (bitmap_set, in memory, no lock needed); the first one marks
 * them in use on disk (check_writable), and a clean close stores them
 * (rw_store_bitmaps).
 *
 * cache= (qcow2.h) changes two things here and nothing else:
 * writethrough and directsync treat every write, zero and trim as FUA
 * (a full qcow2_flush after it), and with unsafe the files' flush is a
 * no-op (io.c), so qcow2_flush still writes the cached metadata back
 * in order, into the page cache, but never waits for the disk.  So a
 * clean shutdown (qcow2_close) still leaves a consistent image, and so
 * does a killed server (the kernel has every write); a host crash may
 * not, as with QEMU's cache=unsafe, which ignores flushes altogether.
 * Direct I/O and its alignment are the io layer's business (io.c).
 *
 * Coalesced flushes.  A flush must make durable every write, zero and
 * trim that returned before it was called.  Each of those bumps
 * img->done_gen as it returns (release), after its data is written
 * and its metadata is in the caches, and before its own FUA flush.  A
 * flush reads done_gen (acquire) when it is called, then waits for
 * flush_lock (one guest flush at a time) and img->lock exclusively; if
 * a flush that completed meanwhile read a count at least as high under
 * that lock (img->flushed_gen, raised only on success), everything
 * this flush must cover was in the caches or written when that one
 * wrote back and synced, and it returns at once.  This is QEMU's flush
 * generation: a guest flush queued behind another gets the work of
 * that one, instead of syncing again for requests that returned after
 * it was called.  (io.c skips a sync with nothing written through an
 * io since the last one; this skips the whole write-back, and also
 * when requests that need not be covered wrote meanwhile.)  Close
 * flushes unconditionally.
 *
 * Flushes without the lock.  A guest flush writes back with img->lock
 * dropped (l2.c, "Write-back without the lock", says why that keeps the
 * image consistent): it takes the dirty metadata under the lock, syncs
 * and writes it with only io_lock held shared, so that no cluster is
 * freed meanwhile, and takes the lock again to settle and to commit the
 * deferred frees (whose decrements depend on the synced entries).
 * Requests go on meanwhile: allocating writes link their entries into
 * the cache, and a flush called then waits on flush_lock and covers
 * them next.  flush_lock comes before img->lock; the other callers of
 * flush_locked (a commit of many frees, a large trim, check) hold
 * img->lock and do not take it: their write-back waits for the
 * running one instead (l2.c).
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

/* From img->lock held to io_lock held shared, for data I/O. */
static void
lock_for_io (struct qcow2_image *img)
{
  pthread_rwlock_rdlock (&img->io_lock);
  pthread_rwlock_unlock (&img->lock);
}

/* A reservation of disk space failed (refcount.c: reserve_ahead, with
 * img->lock held exclusively): give back at once whatever it took, by
 * truncating the file to its own size, with io_lock held exclusively,
 * as that would cut short a data write extending the file meanwhile.
 * image.c installs this as img->give_back_reservation.
 */
void
rw_give_back_reservation (struct qcow2_image *img)
{
  pthread_rwlock_wrlock (&img->io_lock);
  refcount_give_back_reservation (img);
  pthread_rwlock_unlock (&img->io_lock);
}

/* Apply the deferred frees with io_lock held exclusively (rule 3), once
 * the metadata that referenced them is written and synced, and, if
 * write, write the refcount blocks and sync.  A guest flush does not
 * (write false): the decrements stay dirty in the refcount cache and
 * go to the file with the next write-back's refcount blocks, before its
 * barrier's sync (l2.c), or at close.  That spares a third sync per
 * flush after a trim, and it is safe: until the decrements reach the
 * file, a crash finds the refcounts too high (a leak, rule 6), never
 * too low; a freed cluster used again meanwhile is counted 1 in the
 * file all along, and nothing on disk points at it any more (the
 * entries were cleared and synced before the commit).  A flush need
 * not make frees durable (rule 5 is about what the guest reads).  A
 * clean close, a check and a commit inside a request (many frees, a
 * large trim) write them at once.
 */
static int
commit_frees (struct qcow2_image *img, size_t limit, bool write)
{
  int r;

  if (img->nr_pending == 0 || limit == 0)
    return 0;
  pthread_rwlock_wrlock (&img->io_lock);
  r = refcount_commit_frees (img, limit);
  pthread_rwlock_unlock (&img->io_lock);
  if (r == -1 || !write)
    return r;
  return refcount_write_back (img);
}

/* Write everything back in order and sync (l2.c), then commit the
 * deferred frees and write them, all with img->lock held.
 */
static int
flush_locked (struct qcow2_image *img)
{
  if (l2_write_back (img) == -1)
    return -1;
  return commit_frees (img, SIZE_MAX, true);
}

/* A write, zero or trim returns (see "Coalesced flushes"). */
static inline void
request_done (struct qcow2_image *img)
{
  __atomic_add_fetch (&img->done_gen, 1, __ATOMIC_RELEASE);
}

static int
maybe_commit (struct qcow2_image *img)
{
  if (img->pending_clusters > MAX_PENDING_FREES)
    return flush_locked (img);
  return 0;
}

/* ---- reads -------------------------------------------------------- */

/* Map the first run of [offset, offset+count) with img->lock held only
 * for the mapping: shared when the L2 slice is cached, empty or can be
 * staged, exclusively otherwise.  With io and a run of data, io_lock is
 * taken shared before img->lock is dropped (the caller releases it
 * after its I/O).  When *drain is set, the caller, once it holds no
 * lock, calls drain.
 */
static int
map_run_locking (struct qcow2_image *img, uint64_t offset, uint64_t count,
                 struct mapping *m, bool io, bool *drain)
{
  int r;

  pthread_rwlock_rdlock (&img->lock);
  r = cluster_map_cached (img, offset, count, m, drain);
  if (r == 1) {
    pthread_rwlock_unlock (&img->lock);
    pthread_rwlock_wrlock (&img->lock);
    r = cluster_map (img, offset, count, m);
  }
  if (r == 0 && io && (m->kind == MAP_DATA || m->kind == MAP_COMPRESSED)) {
    lock_for_io (img);
    return 0;
  }
  pthread_rwlock_unlock (&img->lock);
  return r;
}

/* Move the slices staged by readers into the cache. */
static void
drain (struct qcow2_image *img)
{
  pthread_rwlock_wrlock (&img->lock);
  cache_stage_drain (img->l2_cache);
  pthread_rwlock_unlock (&img->lock);
}

int
qcow2_pread (struct qcow2_image *img, void *buf, uint64_t count,
             uint64_t offset)
{
  uint8_t *p = buf;

  if (image_check_range (img, count, offset, "request") == -1)
    return -1;
  while (count > 0) {
    struct mapping m;
    bool drain_now = false;
    int r;

    if (map_run_locking (img, offset, count, &m, true, &drain_now) == -1)
      return -1;
    r = cluster_read_run (img, p, &m, offset);
    if (m.kind == MAP_DATA || m.kind == MAP_COMPRESSED)
      pthread_rwlock_unlock (&img->io_lock);
    if (r == -1)
      return -1;
    /* Only now, with no lock held (io_lock comes after img->lock). */
    if (drain_now)
      drain (img);
    p += m.length;
    offset += m.length;
    count -= m.length;
  }
  return 0;
}

int
qcow2_prefetch (struct qcow2_image *img, uint64_t count, uint64_t offset)
{
  int r = 0;

  if (image_check_range (img, count, offset, "request") == -1)
    return -1;
  pthread_rwlock_wrlock (&img->lock);
  while (count > 0) {
    struct mapping m;
    if (cluster_map (img, offset, count, &m) == -1) {
      r = -1;
      break;
    }
    offset += m.length;
    count -= m.length;
  }
  pthread_rwlock_unlock (&img->lock);
  return r;
}

/* What a mapping kind looks like to an NBD client. */
static uint32_t
extent_type (const struct mapping *m)
{
  switch (m->kind) {
  case MAP_DATA:
  case MAP_COMPRESSED:
    return 0;
  case MAP_ZERO:
    return QCOW2_EXTENT_ZERO;
  case MAP_UNALLOCATED:
    /* Without a backing file: a hole that reads as zeroes.  With one:
     * whatever the backing file says there (see qcow2_extents).
     */
    return QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
  }
  abort ();
}

int
qcow2_extents (struct qcow2_image *img, uint64_t count, uint64_t offset,
               bool req_one, qcow2_extent_fn fn, void *opaque)
{
  if (image_check_range (img, count, offset, "request") == -1)
    return -1;
  while (count > 0) {
    struct mapping m;
    bool drain_now = false;
    int r;

    r = map_run_locking (img, offset, count, &m, false, &drain_now);
    if (drain_now)
      drain (img);
    if (r == -1)
      return -1;

    if (m.kind == MAP_UNALLOCATED && offset < img->backing_size) {
      /* Ask the backing file about the part it covers; past its end,
       * zeroes.
       */
      uint64_t n = min_u64 (m.length, img->backing_size - offset);
      if (img->backing) {
        if (qcow2_extents (img->backing, n, offset, req_one, fn,
                           opaque) == -1)
          return -1;
      }
      else if (fn (opaque, offset, n, 0) == -1)   /* raw: data */
        return -1;
      m.length = n;
    }
    else if (fn (opaque, offset, m.length, extent_type (&m)) == -1)
      return -1;
    offset += m.length;
    count -= m.length;
    if (req_one)
      break;
  }
  return 0;
}

/* ---- writes ------------------------------------------------------- */

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

/* May the image be written?  With img->lock held exclusively. */
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
  if ((img->incompat & INCOMPAT_DIRTY) && !img->dirty_written) {
    if (check_repair_dirty (img) == -1)
      return -1;
    bitmap_check_repaired (img);
  }
  if (header_prepare_write (img) == -1)
    return -1;
  return bitmap_prepare_write (img);
}

/* Write p to the COPIED data run m in place, with img->lock held
 * (shared or exclusive): the lock is dropped before the data I/O,
 * which runs under the shared io_lock (rule 3 keeps the cluster ours).
 * Returns m->length, or -1.
 */
static int64_t
write_in_place (struct qcow2_image *img, const uint8_t *p,
                const struct mapping *m)
{
  int r;

  lock_for_io (img);
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
      !bitmap_write_ready (img) ||
      cluster_map_cached (img, offset, count, &m, NULL) != 0 ||
      m.kind != MAP_DATA || !m.copied ||
      (img->data_io == img->io &&
       (m.host_offset >= img->host_end ||
        img->host_end - m.host_offset < m.length ||
        !overlap_write_ok (img, m.host_offset, m.length, 0)))) {
    pthread_rwlock_unlock (&img->lock);
    return 0;
  }
  return write_in_place (img, p, &m);
}

/* An allocating write (write.c), with img->lock held exclusively:
 * plan, write the data with the lock dropped and the guest range in
 * flight, link.  Returns the bytes of the request it covered, with
 * the lock held again, or -1.
 */
static int64_t
write_allocating (struct qcow2_image *img, const uint8_t *buf,
                  uint64_t offset, const struct mapping *m)
{
  uint64_t cs = img->cluster_size;
  struct write_plan p;
  struct inflight f;
  int r;

  r = write_plan (img, buf, offset, m, &p);
  if (r == -1)
    return -1;
  if (r == 1)
    return p.consumed;
  if (write_data_check (img, p.host, p.len) == -1) {
    write_abandon (img, &p);
    return -1;
  }
  inflight_add (img, &f, p.c0, p.c0 + p.n * cs);
  lock_for_io (img);
  r = io_pwrite (img->data_io, p.src, p.len, p.host);
  pthread_rwlock_unlock (&img->io_lock);
  pthread_rwlock_wrlock (&img->lock);
  if (r == -1)
    nbdkit_error ("%s: writing data at %#" PRIx64 ": %m", img->name, p.host);
  else {
    img->need_sync = true;
    if (img->corrupt) {         /* marked while the lock was dropped */
      errno = EIO;
      r = -1;
    }
  }
  /* Still in flight (no other request touches these guest clusters)
   * and holding img->lock: the clusters not linked are ours alone.
   */
  if (r == -1)
    write_abandon (img, &p);
  else
    r = write_link (img, &p);
  inflight_remove (img, &f);
  return r == -1 ? -1 : (int64_t) p.consumed;
}

/* Write guest [offset, offset+count) from buf as data, run by run. */
static int
write_data (struct qcow2_image *img, const uint8_t *p, uint64_t count,
            uint64_t offset)
{
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
      if (write_data_check (img, m.host_offset, m.length) == -1)
        goto err;
      n = write_in_place (img, p, &m);
      if (n == -1)
        return -1;
    }
    else {
      n = write_allocating (img, p, offset, &m);
      if (n == -1 || maybe_commit (img) == -1)
        goto err;
      pthread_rwlock_unlock (&img->lock);
    }
  next:
    p += n;
    offset += n;
    count -= n;
  }
  return 0;

 err:
  pthread_rwlock_unlock (&img->lock);
  return -1;
}

/* compress=on: after this many bytes of compressed clusters written,
 * start the image file's write-back (see the top of the file).  4 MiB
 * is about 20 MiB of text-like guest data; each call costs a system
 * call that only queues the dirty pages.
 */
#define WRITEBACK_KICK (UINT64_C(4) << 20)

/* Ask the kernel to start writing the image file's dirty pages to disk,
 * and start an early sync, without waiting for either (the whole file:
 * the pages already clean or under write-back are skipped; io.c
 * decides what applies: nothing with cache=unsafe or the tests' memory
 * files, only the early sync with direct I/O or eviction).
 */
static void
start_writeback (struct qcow2_image *img)
{
  io_start_writeback (img->io);
}

/* compress=on: one plan of batch b (write.c) from cluster i on, with
 * img->lock held exclusively: placed, written with the lock dropped
 * and the guest clusters in flight, linked.  Returns the clusters it
 * covered, 0 if the lock was dropped to wait (plan again), -1.  With
 * *normal set, those clusters are for the caller to write as data;
 * with *kick set, the caller calls start_writeback once it holds no
 * lock.
 */
static int64_t
write_compressed_step (struct qcow2_image *img,
                       const struct compressed_batch *b, uint64_t i,
                       bool *normal, bool *kick)
{
  uint64_t cs = img->cluster_size;
  struct compressed_plan p;
  struct inflight f;
  int r;

  *normal = false;
  *kick = false;
  if (inflight_wait (img, b->c0 + i * cs, (b->n - i) * cs))
    return 0;
  r = write_compressed_plan (img, b, i, &p);
  if (r == -1)
    return -1;
  if (r == 1) {
    *normal = true;
    return p.n;
  }
  if (write_data_check (img, p.host, p.len) == -1) {
    write_compressed_abandon (img, b, &p);
    return -1;
  }
  inflight_add (img, &f, b->c0 + i * cs, b->c0 + (i + p.n) * cs);
  lock_for_io (img);
  r = io_pwrite (img->io, b->out + b->pos[i], p.len, p.host);
  pthread_rwlock_unlock (&img->io_lock);
  pthread_rwlock_wrlock (&img->lock);
  if (r == -1)
    nbdkit_error ("%s: writing compressed data at %#" PRIx64 ": %m",
                  img->name, p.host);
  else {
    img->need_sync = true;
    if (img->corrupt) {
      errno = EIO;
      r = -1;
    }
  }
  if (r == -1)
    write_compressed_abandon (img, b, &p);
  else
    r = write_compressed_link (img, b, &p);
  inflight_remove (img, &f);
  if (r == 0) {
    img->compress_unkicked += p.len;
    if (img->compress_unkicked >= WRITEBACK_KICK) {
      img->compress_unkicked = 0;
      *kick = true;
    }
    r = maybe_commit (img);
  }
  return r == -1 ? -1 : (int64_t) p.n;
}

/* compress=on: the whole clusters of guest [offset, offset+count) are
 * compressed here, in the calling thread with no lock held, a batch of
 * up to 1 MiB at a time, then placed (write.c) under img->lock; the
 * partial clusters at the edges, and clusters that do not compress or
 * hold data already, are written the normal way.
 */
#define COMPRESS_BATCH (UINT64_C(1) << 20)

static int
write_compressed (struct qcow2_image *img, const uint8_t *buf,
                  uint64_t count, uint64_t offset)
{
  uint64_t cs = img->cluster_size, end = offset + count, a, b, c;

  write_whole_clusters (img, count, offset, &a, &b);
  if (a >= b)
    return write_data (img, buf, count, offset);
  if (write_data (img, buf, a - offset, offset) == -1)
    return -1;
  for (c = a; c < b; ) {
    uint64_t n = min_u64 (b - c, COMPRESS_BATCH > cs ? COMPRESS_BATCH : cs);
    uint64_t len = min_u64 (n, end - c), i = 0;
    struct compressed_batch cb;

    if (write_compress_batch (img, buf + (c - offset), c, len, &cb) == -1)
      return -1;
    while (i < cb.n) {
      bool normal, kick = false;
      int64_t k;

      pthread_rwlock_wrlock (&img->lock);
      if (check_writable (img) == -1) {
        pthread_rwlock_unlock (&img->lock);
        k = -1;
      }
      else if ((k = write_compressed_step (img, &cb, i, &normal,
                                           &kick)) != 0)
        pthread_rwlock_unlock (&img->lock);
      if (kick)
        start_writeback (img);
      if (k > 0 && normal &&
          write_data (img, buf + (c - offset) + i * cs,
                      min_u64 (k * cs, len - i * cs), c + i * cs) == -1)
        k = -1;
      if (k == -1) {
        write_compress_batch_free (&cb);
        return -1;
      }
      i += k;
    }
    write_compress_batch_free (&cb);
    c += n;
  }
  return end > b ? write_data (img, buf + (b - offset), end - b, b) : 0;
}

/* Guest data, compressed where it can be with compress=on. */
static int
write_payload (struct qcow2_image *img, const uint8_t *buf, uint64_t count,
               uint64_t offset)
{
  if (img->cfg.compress && !img->data_file_name)
    return write_compressed (img, buf, count, offset);
  return write_data (img, buf, count, offset);
}

static int zero_range (struct qcow2_image *img, uint64_t count,
                       uint64_t offset, unsigned flags);

/* The flags a zero request is carried out with: discard-no-unref
 * takes away the client's permission to free clusters.  (discard=ignore
 * does not: QEMU 7.2 with discard=ignore still frees clusters for a
 * write-zeroes that may unmap, and so does the plugin.)
 */
static unsigned
zero_flags (const struct qcow2_image *img, unsigned flags)
{
  if (img->cfg.discard_no_unref)
    flags &= ~QCOW2_F_MAY_TRIM;
  return flags;
}

/* detect-zeroes: the runs of whole clusters of the write that are all
 * zeroes become zero requests (metadata only), the rest is written as
 * data.  Only called when the image can zero whole clusters by
 * metadata with these flags (write_zero_by_metadata), so the scan is
 * never wasted on an image that would write the zeroes anyway.  The
 * partial last cluster of the disk counts as whole.
 */
static int
write_detect_zeroes (struct qcow2_image *img, const uint8_t *buf,
                     uint64_t count, uint64_t offset, unsigned zflags)
{
  uint64_t cs = img->cluster_size, end = offset + count, a, b, c, pos;

  write_whole_clusters (img, count, offset, &a, &b);
  b = min_u64 (b, end);
  pos = offset;                 /* written up to here */
  for (c = a; c < b; ) {
    uint64_t z = c;
    while (z < b && is_zero (buf + (z - offset), min_u64 (cs, b - z)))
      z = min_u64 (z + cs, b);
    if (z == c) {
      c = min_u64 (c + cs, b);
      continue;
    }
    if (write_payload (img, buf + (pos - offset), c - pos, pos) == -1 ||
        zero_range (img, z - c, c, zflags) == -1)
      return -1;
    pos = c = z;
  }
  return write_payload (img, buf + (pos - offset), end - pos, pos);
}

int
qcow2_pwrite (struct qcow2_image *img, const void *buf, uint64_t count,
              uint64_t offset, unsigned flags)
{
  unsigned zflags = 0;
  int r;

  if (image_check_range (img, count, offset, "write") == -1)
    return -1;
  bitmap_set (img, offset, count);
  if (img->cfg.detect_zeroes == QCOW2_DETECT_ZEROES_UNMAP)
    zflags = zero_flags (img, QCOW2_F_MAY_TRIM);
  if (img->cfg.detect_zeroes != QCOW2_DETECT_ZEROES_OFF &&
      write_zero_by_metadata (img, zflags & QCOW2_F_MAY_TRIM))
    r = write_detect_zeroes (img, buf, count, offset, zflags);
  else
    r = write_payload (img, buf, count, offset);
  request_done (img);
  if (r == 0 && ((flags & QCOW2_F_FUA) || cache_write_through (&img->cfg)))
    return qcow2_flush (img);
  return r;
}

/* Write back and sync everything, unless a flush that completed since
 * 'seen' was read covered it (coalesce; see "Coalesced flushes").  The
 * write-back's syncs and writes run with img->lock dropped, when l2.c
 * can (see "Flushes without the lock").
 */
static int
flush_image (struct qcow2_image *img, bool coalesce, uint64_t seen)
{
  uint64_t g;
  int r;

  pthread_mutex_lock (&img->flush_lock);
  pthread_rwlock_wrlock (&img->lock);
  if (coalesce && img->flushed_gen > seen) {
    pthread_rwlock_unlock (&img->lock);
    pthread_mutex_unlock (&img->flush_lock);
    return 0;
  }
  g = __atomic_load_n (&img->done_gen, __ATOMIC_ACQUIRE);
  r = l2_write_back_begin (img);
  if (r == 1) {
    lock_for_io (img);
    r = l2_write_back_run (img);
    if (r == 0 && img->data_io != img->io && io_flush (img->data_io) == -1) {
      nbdkit_error ("%s: syncing data file: %m", img->name);
      r = -1;
    }
    pthread_rwlock_unlock (&img->io_lock);
    l2_write_back_end (img, r);
    pthread_rwlock_wrlock (&img->lock);
    l2_write_back_wait (img);
    /* Only the frees pending when it began: an entry cleared since
     * (by a trim or zero meanwhile) was not in the copies written.
     */
    if (r == 0)
      r = commit_frees (img, img->pending_sealed, !coalesce);
  }
  else if (r == 0) {
    r = commit_frees (img, SIZE_MAX, !coalesce);
    if (r == 0 && img->data_io != img->io && io_flush (img->data_io) == -1) {
      nbdkit_error ("%s: syncing data file: %m", img->name);
      r = -1;
    }
  }
  /* Flushes are serialized (flush_lock), so g never goes down here. */
  if (r == 0)
    img->flushed_gen = g + 1;
  pthread_rwlock_unlock (&img->lock);
  pthread_mutex_unlock (&img->flush_lock);
  return r;
}

int
qcow2_flush (struct qcow2_image *img)
{
  if (img->readonly)
    return 0;
  return flush_image (img, true,
                      __atomic_load_n (&img->done_gen, __ATOMIC_ACQUIRE));
}

/* At close: no skipping. */
int
rw_flush_all (struct qcow2_image *img)
{
  return img->readonly ? 0 : flush_image (img, false, 0);
}

/* ---- zero and trim ------------------------------------------------ */

/* The start of a zero or trim over a range the caller checked:
 * img->lock held exclusively with no write in flight over the range,
 * the image writable.  On -1 no lock is held.
 */
static int
change_begin (struct qcow2_image *img, uint64_t count, uint64_t offset)
{
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
  request_done (img);
  if (r == 0 && ((flags & QCOW2_F_FUA) || cache_write_through (&img->cfg)))
    return qcow2_flush (img);
  return r;
}

/* zero_clusters over guest [a, b), committing the frees whenever it
 * stops because too many are pending.
 */
static int
change_clusters (struct qcow2_image *img, uint64_t a, uint64_t b,
                 bool trim, bool may_trim)
{
  uint64_t cs = img->cluster_size;

  while (a < b) {
    int64_t n = zero_clusters (img, a, (b - a) / cs, trim, may_trim);
    if (n == -1)
      return -1;
    a += n * cs;
    if (a < b) {
      if (flush_locked (img) == -1)
        return -1;
      /* The commit empties the list, so the next call goes on. */
      if (n == 0 && img->nr_pending > 0) {
        nbdkit_error ("%s: deferred frees were not committed", img->name);
        errno = EIO;
        return -1;
      }
    }
  }
  return 0;
}

/* Zero guest [offset, offset+count), checked by the caller, with flags
 * as they are.
 */
static int
zero_range (struct qcow2_image *img, uint64_t count, uint64_t offset,
            unsigned flags)
{
  uint64_t a, b, end = offset + count;
  bool trim, may_trim;
  int r = -1;

  if (change_begin (img, count, offset) == -1)
    return -1;
  if (write_zero_plan (img, count, offset, flags, &a, &b, &trim,
                       &may_trim) == 0 &&
      write_zero_edge (img, offset, a - offset, flags) == 0 &&
      change_clusters (img, a, b, trim, may_trim) == 0 &&
      (end <= b || write_zero_edge (img, b, end - b, flags) == 0))
    r = 0;
  return change_end (img, r, flags);
}

int
qcow2_zero (struct qcow2_image *img, uint64_t count, uint64_t offset,
            unsigned flags)
{
  if (image_check_range (img, count, offset, "zero") == -1)
    return -1;
  bitmap_set (img, offset, count);
  return zero_range (img, count, offset, zero_flags (img, flags));
}

int
qcow2_trim (struct qcow2_image *img, uint64_t count, uint64_t offset,
            unsigned flags)
{
  uint64_t a, b;
  int r = 0;

  if (image_check_range (img, count, offset, "trim") == -1)
    return -1;
  /* discard=ignore, or discard-no-unref on v2, which has no way to
   * keep a cluster allocated and make it read as zero: the trim
   * succeeds and changes nothing (trim is advisory), so no bitmap
   * changes either (QEMU's rule).
   */
  if (img->cfg.discard_ignore ||
      (img->cfg.discard_no_unref && img->version < 3)) {
    if (img->readonly) {
      errno = EROFS;
      return -1;
    }
    return 0;
  }
  bitmap_set (img, offset, count);
  if (change_begin (img, count, offset) == -1)
    return -1;
  /* Trim is advisory: only whole clusters (with extended L2 entries,
   * whole subclusters), and nothing with an external data file (whose
   * contents must stay as they are when raw).
   */
  write_whole_clusters (img, count, offset, &a, &b);
  if (img->data_file_name)
    ;
  else if (a >= b)
    r = write_trim_edge (img, offset, count);
  else if (write_trim_edge (img, offset, a - offset) == -1 ||
           change_clusters (img, a, b, true, true) == -1 ||
           (offset + count > b &&
            write_trim_edge (img, b, offset + count - b) == -1))
    r = -1;
  return change_end (img, r, flags);
}

/* ---- bitmaps ------------------------------------------------------ */

/* At a clean close, after the last flush: store the bitmaps (bitmap.c
 * writes back and syncs the refcounts of what it allocated; it frees
 * nothing and touches no L2 table, so nothing is left to write).
 */
int
rw_store_bitmaps (struct qcow2_image *img)
{
  int r;

  pthread_rwlock_wrlock (&img->lock);
  r = bitmap_store (img);
  pthread_rwlock_unlock (&img->lock);
  return r;
}

/* No image lock: bitmap.c's pages are changed atomically. */
int
qcow2_bitmap_extents (struct qcow2_image *img, uint32_t i, uint64_t count,
                      uint64_t offset, bool req_one, qcow2_extent_fn fn,
                      void *opaque)
{
  if (image_check_range (img, count, offset, "request") == -1)
    return -1;
  return bitmap_extents (img, i, count, offset, req_one, fn, opaque);
}

/* ---- check -------------------------------------------------------- */

int
qcow2_check (struct qcow2_image *img, bool repair,
             struct qcow2_check_result *res)
{
  int r;

  if (repair && img->readonly) {
    errno = EROFS;
    return -1;
  }
  pthread_rwlock_wrlock (&img->lock);
  /* Metadata still in the caches is part of the image. */
  r = img->readonly ? 0 : flush_locked (img);
  if (r == 0)
    r = check_run (img, repair, res);
  pthread_rwlock_unlock (&img->lock);
  if (repair)
    request_done (img);
  return r;
}
