/* nbdkit-qcow2: host file backends.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Two backends live here: the real file (positional I/O on an fd, safe
 * to call from many threads at once) and a growable memory file for the
 * unit tests and the fuzzer.  See io.h for the semantics both keep.
 *
 * The "file" may be a block device (a qcow2 on an LV): its size is the
 * device's, writes past it fail (ENOSPC, from the kernel; refcount.c
 * refuses to allocate there first), it is never reserved on, and its
 * file system is not looked at (the node's own is devtmpfs, which says
 * nothing about the device: taken for tmpfs it would refuse O_DIRECT).
 *
 * The file backend has three ways of using the page cache (io.h's
 * QCOW2_IO_* modes, the plugin's cache=):
 *
 *  buffered   plain pread/pwrite (cache=writeback, writethrough, unsafe)
 *  direct     O_DIRECT (cache=none, directsync; auto where it works)
 *  evict      buffered, and every range written is written back and
 *             dropped from the page cache a few writes later, and every
 *             range read at once (cache=auto without O_DIRECT)
 *
 * Direct I/O needs the offset, the length and the buffer aligned (the
 * logical block size: statx's STATX_DIOALIGN, else BLKSSZGET on a block
 * device, else probed with O_DIRECT reads of 512 then 4096 bytes).  The
 * callers above align nothing (an L1 entry is 8 bytes, a header field
 * less), so this file does:
 *
 *   aligned offset, length and buffer   straight to the file
 *   anything else                       through a per-thread bounce
 *                                       buffer, in chunks of BOUNCE_MAX
 *
 *   guest bytes:          |<------- count ------->|
 *   aligned blocks:   |.......|.......|.......|.......|
 *                     ^ head block read            ^ tail block read
 *                       (read-modify-write)          (read-modify-write)
 *
 * A write that does not cover its first or last block whole reads those
 * blocks, copies its bytes in and writes the blocks back.  Two such
 * writes into one block would lose each other's bytes, and so would an
 * aligned write landing between the read and the write back; so every
 * direct write holds the stripes (NR_STRIPES rwlocks, one per
 * STRIPE_SIZE of the file modulo NR_STRIPES) it touches: exclusively
 * for a read-modify-write, shared otherwise, so aligned writes never
 * wait for each other.  Stripes are taken in index order (no deadlock).
 * Reads take nothing: a block is only ever rewritten with its own bytes
 * or new ones.
 *
 * Reads past end of file still read zeroes: with O_DIRECT a read that
 * ends short of its length, or off a block boundary, hit the end of the
 * file.  A read-modify-write past the end of the file writes the rest
 * of its last block as zeroes, so the file may end on a block boundary
 * where a buffered write would have ended it exactly: the same bytes
 * read back.
 *
 * The same direct I/O code can run over another io instead of a file
 * (qcow2_io_direct_over): the unit tests put it over their crash
 * recorder and fault injector, behind a checker that fails misaligned
 * I/O with EINVAL as the kernel does, so that the crash and fault
 * suites exercise cache=none without a disk.  Only the bottom changes:
 * read_full and write_full call the lower io instead of pread/pwrite.
 *
 * Skipped flushes.  A flush that finds nothing written since the last
 * successful sync began returns at once: with cache=none every
 * fdatasync is a device cache flush, and core asks for many that have
 * nothing to do (a guest flush right after another, the final sync of
 * a flush whose ordering sync already covered everything).  Both
 * backends over a file (and the direct layer over another io, so that
 * the crash and fault suites see it) keep two counters:
 *
 *   write_gen   bumped when a modifying call returns (pwrite, truncate,
 *               preallocate, reserve), failed or not: a failed write
 *               may have landed in part, and must still be synced
 *   synced      1 + the write_gen a successful sync read BEFORE it
 *               began (0: none yet, so the first flush of an io always
 *               syncs, covering whatever was written before the open)
 *
 *   flush:  g = write_gen (acquire)
 *           synced >= g + 1 (acquire)  ->  return 0, no sync
 *           else sync; on success raise synced to g + 1 (release,
 *           never lowered: a slower flush that read an older g must
 *           not undo a newer one); on failure leave it
 *
 * Why it is safe: a flush must make durable every modifying call that
 * returned before the flush was called.  Such a call bumped write_gen
 * before it returned, so the flush reads g at least that high.  If it
 * syncs, the sync starts after its read, so after the call.  If it
 * skips, synced >= g + 1 was stored by a flush whose read saw g or
 * more, so its read came after the call's bump (which follows the
 * call's system call), its sync began after that, and it had completed
 * successfully before synced was raised.  The release bump / acquire
 * read and the release store / acquire load carry exactly those two
 * happens-before edges; a plain counter would not (the compiler and
 * CPU could move the read past the sync's start, and a skip could then
 * miss a write that completed just before the sync began).  A write
 * still in flight when a flush reads g was not acknowledged before the
 * flush, need not be covered, and bumps write_gen after it, so the
 * next flush syncs.  A failed sync raises nothing: the next flush
 * syncs again (and what Linux then reports after a failed fdatasync is
 * no worse than without the skip).  cache=unsafe's flush does nothing
 * as before; with evict, the drop from the page cache follows only a
 * real sync (a skipped one has nothing new to drop).
 *
 * The counters belong to one io object, so the skip is only as good
 * as the promise that everything core expects a flush of that io to
 * cover was written through it.  Core keeps it: the image and the
 * external data file are separate ios, and core flushes each (l2.c's
 * barrier and rw.c's qcow2_flush flush the data file's own io);
 * backing files and snapshot views are read-only ios; lock.c only
 * takes locks on the fd; nothing maps the file; a file written before
 * the io was opened (create.c's own io, another process) is covered by
 * the first flush, which always syncs.  Another io over the same file
 * that writes (none does) would have to be flushed itself.
 *
 * Early syncs.  A long stream of writes (a compressed conversion: rw.c
 * calls io_start_writeback every few MiB) would otherwise leave all its
 * data to the final flush, and on a disk with a volatile write cache
 * (a VM's virtual disk, most SSDs) that flush then waits for the cache
 * to take all of it: measured here, fdatasync cost 1.3-2 ms per MiB
 * written since the last one, even after the kernel has written
 * the pages (sync_file_range only starts that).  So io_start_writeback
 * also wakes one thread per file io that runs gen_flush with an
 * fdatasync of its own ("early sync"; a call while one runs queues at
 * most one more): the final flush then finds little left.  It orders nothing and
 * changes nothing about what a flush guarantees.  What it must not do
 * is hide an error: Linux reports a failed write-back to one fdatasync
 * per open file, which may be the early one.  So every fdatasync of
 * the file runs under sync_lock; an early sync that fails records its
 * errno (bg_error); the next flush of the io (a guest flush, or a sync
 * that orders metadata inside a request, which then fails), after its
 * own fdatasync, fails with it (once, like an fdatasync would); and
 * until then an early sync fails at once, without syncing, so that it
 * cannot raise 'synced' and let a flush skip past the error.  The
 * eviction of cache=auto waits for write-back with sync_file_range,
 * which reports errors the same way: it too runs under sync_lock and
 * keeps its error in bg_error.  The thread is started at the first
 * call, while serving (nbdkit forks for --run before that), and a
 * failure to start it only loses the hint.
 *
 * XXX nbdkit 1.32 hands the plugin malloc'd request buffers, 16-byte
 * aligned: with cache=none every data request goes through the bounce
 * buffer (one memcpy), and each nbdkit thread keeps up to BOUNCE_MAX.
 *
 * XXX A stream of aligned writes holding a stripe shared can keep a
 * read-modify-write of that stripe waiting (glibc's rwlocks prefer
 * readers); requests are bounded, so it waits, never forever.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <stdio.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <linux/fs.h>

#include <nbdkit-plugin.h>

#include "io.h"

/* ---- file backend ---- */

#define STRIPE_SHIFT 16                 /* 64 KiB of file per stripe */
#define NR_STRIPES 64                   /* one bit each in a uint64_t */
#define BOUNCE_MAX (UINT32_C(1) << 20)  /* bounce chunk */
#define BOUNCE_ALIGN 65536              /* largest alignment accepted */
#define EVICT_WINDOW 8                  /* written ranges kept cached */

struct range {
  uint64_t offset, count;
};

struct file_io {
  struct qcow2_io io;                   /* must be first */
  struct qcow2_io *lower;               /* direct over another io, or NULL */
  /* Flushes (see "Skipped flushes" above); atomics. */
  uint64_t write_gen;                   /* modifying calls returned */
  uint64_t synced;                      /* 1 + the write_gen a successful
                                           sync read before it began;
                                           0: no sync yet */
  pthread_rwlock_t stripes[NR_STRIPES]; /* direct only */
  pthread_mutex_t evict_lock;           /* evict only: the ring below */
  struct range recent[EVICT_WINDOW];
  unsigned recent_next;
  /* Early syncs (see "Early syncs" above). */
  pthread_mutex_t sync_lock;            /* held through every fdatasync */
  int bg_error;                         /* (sync_lock) errno of a failed
                                           early sync or eviction wait,
                                           not yet reported */
  pthread_mutex_t bg_lock;              /* the four below */
  pthread_cond_t bg_cond;
  pthread_t bg_thread;
  bool bg_started, bg_wanted, bg_stop;
};

/* -- per-thread bounce buffers -- */

struct bounce {
  void *buf;
  size_t size;
};

static pthread_key_t bounce_key;
static pthread_once_t bounce_once = PTHREAD_ONCE_INIT;
static bool bounce_key_ok;

static void
bounce_free (void *p)
{
  struct bounce *b = p;

  free (b->buf);
  free (b);
}

static void
bounce_key_init (void)
{
  bounce_key_ok = pthread_key_create (&bounce_key, bounce_free) == 0;
}

/* Threads that outlive the library (when nbdkit unloads the plugin)
 * must not call bounce_free in unmapped code: drop the key first.
 */
static void __attribute__ ((destructor))
bounce_key_fini (void)
{
  if (bounce_key_ok)
    pthread_key_delete (bounce_key);
}

/* This thread's bounce buffer, of at least size bytes (<= BOUNCE_MAX).
 * Allocated once per thread at the largest size asked, freed when the
 * thread exits: no allocation per request.
 */
static void *
bounce_get (size_t size)
{
  struct bounce *b;
  void *p;
  int r;

  pthread_once (&bounce_once, bounce_key_init);
  if (!bounce_key_ok) {
    errno = ENOMEM;
    return NULL;
  }
  b = pthread_getspecific (bounce_key);
  if (b == NULL) {
    b = calloc (1, sizeof *b);
    if (b == NULL)
      return NULL;
    if (pthread_setspecific (bounce_key, b) != 0) {
      free (b);
      errno = ENOMEM;
      return NULL;
    }
  }
  if (b->size >= size)
    return b->buf;
  /* Grow to the next power of 2: few reallocations per thread. */
  {
    size_t n = 4096;
    while (n < size)
      n *= 2;
    size = n;
  }
  r = posix_memalign (&p, BOUNCE_ALIGN, size);
  if (r != 0) {
    errno = r;
    return NULL;
  }
  free (b->buf);
  b->buf = p;
  b->size = size;
  return p;
}

/* -- stripes -- */

static uint64_t
stripe_mask (uint64_t offset, uint64_t count)
{
  uint64_t first = offset >> STRIPE_SHIFT;
  uint64_t last = (offset + count - 1) >> STRIPE_SHIFT;
  uint64_t mask = 0, i;

  if (last - first + 1 >= NR_STRIPES)
    return UINT64_MAX;
  for (i = first; i <= last; i++)
    mask |= UINT64_C(1) << (i % NR_STRIPES);
  return mask;
}

static void
stripes_lock (struct file_io *f, uint64_t mask, bool excl)
{
  unsigned i;

  for (i = 0; i < NR_STRIPES; i++) {
    if (mask & (UINT64_C(1) << i)) {
      if (excl)
        pthread_rwlock_wrlock (&f->stripes[i]);
      else
        pthread_rwlock_rdlock (&f->stripes[i]);
    }
  }
}

static void
stripes_unlock (struct file_io *f, uint64_t mask)
{
  unsigned i;

  for (i = 0; i < NR_STRIPES; i++)
    if (mask & (UINT64_C(1) << i))
      pthread_rwlock_unlock (&f->stripes[i]);
}

/* -- plain positional I/O -- */

static inline bool
is_aligned (const struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  return ((offset | count) & (io->align - 1)) == 0 &&
    ((uintptr_t) buf & (io->mem_align - 1)) == 0;
}

/* One positional read or write: of the file, or, for the direct layer
 * over another io, a whole one of that io (which reads zeroes past its
 * end itself).
 */
static ssize_t
sys_pread (struct qcow2_io *io, void *p, size_t count, uint64_t offset)
{
  struct file_io *f = (struct file_io *) io;

  if (f->lower)
    return io_pread (f->lower, p, count, offset) == -1 ? -1 : (ssize_t) count;
  return pread (io->fd, p, count, offset);
}

static ssize_t
sys_pwrite (struct qcow2_io *io, const void *p, size_t count,
            uint64_t offset)
{
  struct file_io *f = (struct file_io *) io;

  if (f->lower)
    return io_pwrite (f->lower, p, count, offset) == -1 ? -1 : (ssize_t) count;
  return pwrite (io->fd, p, count, offset);
}

/* Read the whole buffer, zeroes past end of file.  With O_DIRECT a
 * read that ends off a block boundary ended at end of file: retrying
 * the rest there would fail (EINVAL), and it is all zeroes.
 */
static int
read_full (struct qcow2_io *io, char *p, size_t count, uint64_t offset)
{
  while (count > 0) {
    ssize_t r = sys_pread (io, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0)                 /* past end of file */
      break;
    p += r;
    count -= r;
    offset += r;
    if (io->direct && (r & (io->align - 1)))
      break;
  }
  memset (p, 0, count);
  return 0;
}

static int
write_full (struct qcow2_io *io, const char *p, size_t count,
            uint64_t offset)
{
  while (count > 0) {
    ssize_t r = sys_pwrite (io, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    /* A short direct write off a block boundary cannot be continued
     * (EINVAL); it stopped for want of space.
     */
    if (io->direct && (r & (io->align - 1))) {
      errno = ENOSPC;
      return -1;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

/* -- direct I/O through the bounce buffer -- */

static inline uint64_t
align_down (uint64_t x, uint32_t a)
{
  return x & ~(uint64_t) (a - 1);
}

static inline uint64_t
align_up (uint64_t x, uint32_t a)
{
  return align_down (x + a - 1, a);
}

static int
direct_pread (struct qcow2_io *io, char *p, size_t count, uint64_t offset)
{
  uint32_t a = io->align;

  while (count > 0) {
    uint64_t start = align_down (offset, a);
    size_t skip = offset - start;
    size_t n = count < BOUNCE_MAX - skip ? count : BOUNCE_MAX - skip;
    size_t len = align_up (skip + n, a);
    char *b = bounce_get (len);

    if (b == NULL || read_full (io, b, len, start) == -1)
      return -1;
    memcpy (p, b + skip, n);
    p += n;
    count -= n;
    offset += n;
  }
  return 0;
}

/* One chunk: [start, start+len) covers the caller's n bytes at skip. */
static int
direct_pwrite_chunk (struct file_io *f, const char *p, size_t n,
                     uint64_t start, size_t skip, size_t len)
{
  struct qcow2_io *io = &f->io;
  uint32_t a = io->align;
  bool head = skip != 0, tail = ((skip + n) & (a - 1)) != 0;
  uint64_t mask = stripe_mask (start, len);
  char *b = bounce_get (len);
  int r = -1;

  if (b == NULL)
    return -1;
  stripes_lock (f, mask, head || tail);
  if (head && read_full (io, b, a, start) == -1)
    goto out;
  if (tail && (len > a || !head) &&
      read_full (io, b + len - a, a, start + len - a) == -1)
    goto out;
  memcpy (b + skip, p, n);
  r = write_full (io, b, len, start);
 out:
  stripes_unlock (f, mask);
  return r;
}

static int
direct_pwrite (struct file_io *f, const char *p, size_t count,
               uint64_t offset)
{
  struct qcow2_io *io = &f->io;
  uint32_t a = io->align;

  if (is_aligned (io, p, count, offset)) {
    uint64_t mask = stripe_mask (offset, count);
    int r;

    stripes_lock (f, mask, false);
    r = write_full (io, p, count, offset);
    stripes_unlock (f, mask);
    return r;
  }
  while (count > 0) {
    uint64_t start = align_down (offset, a);
    size_t skip = offset - start;
    size_t n = count < BOUNCE_MAX - skip ? count : BOUNCE_MAX - skip;

    if (direct_pwrite_chunk (f, p, n, start, skip,
                             align_up (skip + n, a)) == -1)
      return -1;
    p += n;
    count -= n;
    offset += n;
  }
  return 0;
}


/* -- eviction (cache=auto without O_DIRECT) -- */

/* Waiting for write-back reports (and consumes, for this open file) a
 * write-back error as fdatasync does: so it runs under sync_lock, and
 * an error is kept for the next flush to report (see "Early syncs").
 */
static void
evict_range (struct file_io *f, struct range r)
{
  if (r.count == 0)
    return;
  pthread_mutex_lock (&f->sync_lock);
  if (sync_file_range (f->io.fd, r.offset, r.count,
                       SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                       SYNC_FILE_RANGE_WAIT_AFTER) == -1 &&
      f->bg_error == 0)
    f->bg_error = errno;
  pthread_mutex_unlock (&f->sync_lock);
  posix_fadvise (f->io.fd, r.offset, r.count, POSIX_FADV_DONTNEED);
}

/* Start writing the range back now, and drop the range written
 * EVICT_WINDOW writes ago, whose write back has had time to finish:
 * waiting for this one would make every write synchronous.
 */
static void
evict_written (struct file_io *f, uint64_t offset, uint64_t count)
{
  struct range old;

  sync_file_range (f->io.fd, offset, count, SYNC_FILE_RANGE_WRITE);
  pthread_mutex_lock (&f->evict_lock);
  old = f->recent[f->recent_next];
  f->recent[f->recent_next] = (struct range) { offset, count };
  f->recent_next = (f->recent_next + 1) % EVICT_WINDOW;
  pthread_mutex_unlock (&f->evict_lock);
  evict_range (f, old);
}

/* After a flush everything written is clean: drop it all. */
static void
evict_all (struct file_io *f)
{
  struct range all[EVICT_WINDOW];
  unsigned i;

  pthread_mutex_lock (&f->evict_lock);
  memcpy (all, f->recent, sizeof all);
  memset (f->recent, 0, sizeof f->recent);
  pthread_mutex_unlock (&f->evict_lock);
  for (i = 0; i < EVICT_WINDOW; i++)
    evict_range (f, all[i]);
}

/* -- write generation (see "Skipped flushes" above) -- */

/* A modifying call returned (failed or not). */
static inline void
gen_bump (struct qcow2_io *io)
{
  __atomic_add_fetch (&((struct file_io *) io)->write_gen, 1,
                      __ATOMIC_RELEASE);
}

/* Flush with sync, unless nothing was written since the last
 * successful sync began.
 */
static int
gen_flush (struct qcow2_io *io, int (*sync) (struct qcow2_io *))
{
  struct file_io *f = (struct file_io *) io;
  uint64_t g = __atomic_load_n (&f->write_gen, __ATOMIC_ACQUIRE);
  uint64_t s = __atomic_load_n (&f->synced, __ATOMIC_ACQUIRE);

  if (s >= g + 1)
    return 0;
  if (sync (io) == -1)
    return -1;
  while (s < g + 1 &&
         !__atomic_compare_exchange_n (&f->synced, &s, g + 1, false,
                                       __ATOMIC_RELEASE, __ATOMIC_RELAXED))
    ;
  return 0;
}

/* -- the ops -- */

static int
file_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  int r;

  if (io->direct) {
    if (is_aligned (io, buf, count, offset))
      return read_full (io, buf, count, offset);
    return direct_pread (io, buf, count, offset);
  }
  r = read_full (io, buf, count, offset);
  if (r == 0 && io->evict)
    posix_fadvise (io->fd, offset, count, POSIX_FADV_DONTNEED);
  return r;
}

static int
file_pwrite (struct qcow2_io *io, const void *buf, size_t count,
             uint64_t offset)
{
  struct file_io *f = (struct file_io *) io;
  int r;

  if (count == 0)
    return 0;
  if (io->direct)
    r = direct_pwrite (f, buf, count, offset);
  else {
    r = write_full (io, buf, count, offset);
    if (r == 0 && io->evict)
      evict_written (f, offset, count);
  }
  gen_bump (io);
  return r;
}

/* fdatasync, serialized with the early syncs.  A flush (report) also
 * reports an early sync's failure, once; an early sync after one that
 * failed syncs nothing and fails too, so that 'synced' is not raised
 * past the failure before a flush has reported it (a later fdatasync
 * would return 0: Linux reports a write-back error once per file).
 */
static int
sync_file (struct file_io *f, bool report)
{
  int r = 0, err = 0;

  pthread_mutex_lock (&f->sync_lock);
  if (!report && f->bg_error)
    err = f->bg_error;
  else if (fdatasync (f->io.fd) == -1)
    err = errno;
  else if (report)
    err = f->bg_error;
  if (err) {
    r = -1;
    f->bg_error = report ? 0 : err;
  }
  pthread_mutex_unlock (&f->sync_lock);
  if (r == -1) {
    errno = err;
    return -1;
  }
  if (f->io.evict)
    evict_all (f);
  return 0;
}

static int
file_sync (struct qcow2_io *io)
{
  return sync_file ((struct file_io *) io, true);
}

static int
early_sync (struct qcow2_io *io)
{
  return sync_file ((struct file_io *) io, false);
}

static void *
early_sync_thread (void *vp)
{
  struct file_io *f = vp;

  pthread_mutex_lock (&f->bg_lock);
  for (;;) {
    while (!f->bg_wanted && !f->bg_stop)
      pthread_cond_wait (&f->bg_cond, &f->bg_lock);
    if (f->bg_stop)
      break;
    f->bg_wanted = false;
    pthread_mutex_unlock (&f->bg_lock);
    gen_flush (&f->io, early_sync);
    pthread_mutex_lock (&f->bg_lock);
  }
  pthread_mutex_unlock (&f->bg_lock);
  return NULL;
}

static int
file_flush (struct qcow2_io *io)
{
  if (io->no_sync)
    return 0;
  return gen_flush (io, file_sync);
}

static int64_t
file_size (struct qcow2_io *io)
{
  struct stat st;

  if (fstat (io->fd, &st) == -1)
    return -1;
  if (S_ISBLK (st.st_mode)) {
    off_t end = lseek (io->fd, 0, SEEK_END);
    return end;
  }
  return st.st_size;
}

static int
file_truncate (struct qcow2_io *io, uint64_t size)
{
  int r = ftruncate (io->fd, size);

  gen_bump (io);
  return r;
}

static int
file_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  int r = posix_fallocate (io->fd, offset, count);

  gen_bump (io);
  if (r != 0 && r != EOPNOTSUPP && r != EINVAL) {
    errno = r;
    return -1;
  }
  return 0;
}

/* On a disk file system the reserved range is unwritten extents, which
 * cost nothing until written and keep the file contiguous.  tmpfs has
 * no layout to keep and allocates (and clears) memory pages for the
 * whole range, including the parts of clusters a small write never
 * touches: measured there, 4 KiB allocating writes ran at half speed
 * with it.  So none on tmpfs or ramfs.
 *
 * A reservation is only worth having while space is plentiful: it must
 * never take the last free space, which the data (ours or anybody's)
 * needs.  So none unless RESERVE_FREE_FACTOR times as much is free.
 * fallocate can still fail part way (ENOSPC, when the space goes
 * meanwhile), and ext4 then keeps the blocks it had allocated: the
 * caller gives them back.
 *
 * A block device is never reserved on: it has its blocks already, and
 * cannot grow (fallocate KEEP_SIZE would fail there, EOPNOTSUPP, and
 * free space checked below would be that of /dev).
 */
#define RESERVE_FREE_FACTOR 4

static int
file_reserve (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  if (io->in_memory_fs || io->blockdev) {
    errno = EOPNOTSUPP;
    return -1;
  }
#ifdef FALLOC_FL_KEEP_SIZE
  {
    struct statvfs fs;
    if (fstatvfs (io->fd, &fs) == 0 &&
        (uint64_t) fs.f_bavail * fs.f_frsize / RESERVE_FREE_FACTOR < count) {
      errno = ENOSPC;
      return -1;
    }
  }
  {
    int r = fallocate (io->fd, FALLOC_FL_KEEP_SIZE, offset, count);

    gen_bump (io);
    return r;
  }
#else
  errno = EOPNOTSUPP;
  return -1;
#endif
}

static void
file_close (struct qcow2_io *io)
{
  struct file_io *f = (struct file_io *) io;
  unsigned i;

  pthread_mutex_lock (&f->bg_lock);
  f->bg_stop = true;
  pthread_cond_signal (&f->bg_cond);
  pthread_mutex_unlock (&f->bg_lock);
  if (f->bg_started)
    pthread_join (f->bg_thread, NULL);
  close (io->fd);
  for (i = 0; i < NR_STRIPES; i++)
    pthread_rwlock_destroy (&f->stripes[i]);
  pthread_mutex_destroy (&f->evict_lock);
  pthread_mutex_destroy (&f->sync_lock);
  pthread_mutex_destroy (&f->bg_lock);
  pthread_cond_destroy (&f->bg_cond);
  free (f);
}

static const struct qcow2_io_ops file_ops = {
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .size = file_size,
  .truncate = file_truncate,
  .preallocate = file_preallocate,
  .reserve = file_reserve,
  .close = file_close,
};

void
io_start_writeback (struct qcow2_io *io)
{
  struct file_io *f = (struct file_io *) io;

  if (io->ops != &file_ops || io->no_sync)
    return;
  if (!io->direct && !io->evict)
    sync_file_range (io->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
  pthread_mutex_lock (&f->bg_lock);
  if (!f->bg_started && !f->bg_stop)
    f->bg_started = pthread_create (&f->bg_thread, NULL, early_sync_thread,
                                    f) == 0;
  if (f->bg_started) {
    f->bg_wanted = true;
    pthread_cond_signal (&f->bg_cond);
  }
  pthread_mutex_unlock (&f->bg_lock);
}

struct qcow2_io *
qcow2_io_from_fd (int fd, bool readonly)
{
  struct file_io *f = calloc (1, sizeof *f);
  struct qcow2_io *io = &f->io;
  unsigned i;

  if (f == NULL)
    return NULL;
  for (i = 0; i < NR_STRIPES; i++)
    pthread_rwlock_init (&f->stripes[i], NULL);
  pthread_mutex_init (&f->evict_lock, NULL);
  pthread_mutex_init (&f->sync_lock, NULL);
  pthread_mutex_init (&f->bg_lock, NULL);
  pthread_cond_init (&f->bg_cond, NULL);
  io->ops = &file_ops;
  io->fd = fd;
  io->readonly = readonly;
  /* A block device node's own file system (devtmpfs: tmpfs) says
   * nothing about the device.
   */
  {
    struct stat st;
    io->blockdev = fstat (fd, &st) == 0 && S_ISBLK (st.st_mode);
  }
  if (!io->blockdev) {
    struct statfs fs;
    if (fstatfs (fd, &fs) == 0 &&
        (fs.f_type == 0x01021994 /* TMPFS_MAGIC */ ||
         fs.f_type == 0x858458f6 /* RAMFS_MAGIC */))
      io->in_memory_fs = true;
  }
  return io;
}

/* A name for the file system behind fd, for messages. */
static const char *
fs_name (int fd, char *buf, size_t n)
{
  static const struct { unsigned long magic; const char *name; } fss[] = {
    { 0x01021994, "tmpfs" }, { 0x858458f6, "ramfs" },
    { 0x794c7630, "overlayfs" }, { 0xef53, "ext4" },
    { 0x58465342, "xfs" }, { 0x9123683e, "btrfs" },
    { 0x6969, "nfs" }, { 0x65735546, "fuse" },
    { 0x2fc12fc1, "zfs" }, { 0x01021997, "9p" },
  };
  struct statfs fs;
  size_t i;

  if (fstatfs (fd, &fs) == -1)
    return "unknown";
  for (i = 0; i < sizeof fss / sizeof fss[0]; i++)
    if ((unsigned long) fs.f_type == fss[i].magic)
      return fss[i].name;
  snprintf (buf, n, "type %#lx", (unsigned long) fs.f_type);
  return buf;
}

/* Probe with O_DIRECT reads at offset 0 (fd already has O_DIRECT): the
 * smallest of 512 and 4096 that the file system accepts.  0: neither.
 * An empty file reads nothing and proves nothing: 4096 then, which
 * serves every device with blocks of 4096 bytes or fewer.
 */
static int64_t
probe_align (int fd)
{
  static const uint32_t sizes[] = { 512, 4096 };
  void *buf;
  size_t i;
  int64_t r = 0;

  if (posix_memalign (&buf, BOUNCE_ALIGN, 4096) != 0) {
    errno = ENOMEM;
    return -1;
  }
  for (i = 0; i < 2; i++) {
    ssize_t n = pread (fd, buf, sizes[i], 0);
    if (n > 0) {
      r = sizes[i];
      break;
    }
    if (n == 0) {
      r = 4096;
      break;
    }
    if (errno != EINVAL) {
      r = -1;
      break;
    }
  }
  free (buf);
  return r;
}

/* The alignment direct I/O on fd needs (offset and length, *mem_align
 * for the buffer); 0 if the file system does no direct I/O.
 */
static int64_t
query_align (int fd, uint32_t *mem_align)
{
  struct stat st;
  int64_t a;

#ifdef STATX_DIOALIGN
  {
    struct statx sx;
    if (statx (fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
        (sx.stx_mask & STATX_DIOALIGN)) {
      *mem_align = sx.stx_dio_mem_align;
      return sx.stx_dio_offset_align;
    }
  }
#endif
  if (fstat (fd, &st) == 0 && S_ISBLK (st.st_mode)) {
    int ss;
    if (ioctl (fd, BLKSSZGET, &ss) == 0 && ss > 0) {
      *mem_align = ss;
      return ss;
    }
  }
  a = probe_align (fd);
  *mem_align = a > 0 ? a : 0;
  return a;
}

static inline bool
valid_align (uint64_t a)
{
  return a > 0 && a <= BOUNCE_ALIGN && (a & (a - 1)) == 0;
}

/* Switch io to O_DIRECT, or explain why not: 0 done, 1 not possible
 * here (*why says why), -1 error.
 */
static int
try_direct (struct qcow2_io *io, char *why, size_t n)
{
  char fsbuf[32];
  int fl = fcntl (io->fd, F_GETFL);
  int64_t a;
  uint32_t ma = 0;

  /* tmpfs accepts O_DIRECT since Linux 6.6, but the file is the page
   * cache: nothing would be kept out of memory.
   */
  if (io->in_memory_fs || fl == -1 ||
      fcntl (io->fd, F_SETFL, fl | O_DIRECT) == -1) {
    snprintf (why, n, "the %s file system has no direct I/O (O_DIRECT)",
              fs_name (io->fd, fsbuf, sizeof fsbuf));
    return 1;
  }
  a = query_align (io->fd, &ma);
  if (a == -1)
    return -1;
  if (ma == 0)
    ma = a;
  /* The bounce buffer's blocks are at multiples of a from an address
   * aligned to BOUNCE_ALIGN: they are only aligned for ma if a is a
   * multiple of it.  A coarser offset alignment is always allowed.
   */
  if (a > 0 && ma > a)
    a = ma;
  if (!valid_align (a) || !valid_align (ma)) {
    fcntl (io->fd, F_SETFL, fl);
    if (a == 0)
      snprintf (why, n, "the %s file system refuses direct I/O "
                "(O_DIRECT) of 512 and 4096 bytes",
                fs_name (io->fd, fsbuf, sizeof fsbuf));
    else
      snprintf (why, n, "direct I/O alignment %" PRIi64 " (buffers %"
                PRIu32 ") is not supported", a, ma);
    return 1;
  }
  io->direct = true;
  io->align = a;
  io->mem_align = ma;
  return 0;
}

static int
set_mode (struct qcow2_io *io, const char *path, unsigned mode)
{
  char why[128];
  int r;

  io->no_sync = (mode & QCOW2_IO_NO_SYNC) != 0;
  if (!(mode & (QCOW2_IO_DIRECT | QCOW2_IO_AUTO)))
    return 0;
  r = try_direct (io, why, sizeof why);
  if (r == -1) {
    nbdkit_error ("%s: probing for direct I/O: %m", path);
    return -1;
  }
  if (r == 0) {
    nbdkit_debug ("%s: cache: direct I/O (O_DIRECT), alignment %" PRIu32
                  ", buffers %" PRIu32, path, io->align, io->mem_align);
    return 0;
  }
  if (mode & QCOW2_IO_DIRECT) {
    nbdkit_error ("%s: cache=none and cache=directsync need direct I/O, "
                  "but %s; use cache=auto, which serves it buffered and "
                  "drops written data from the page cache", path, why);
    errno = EINVAL;
    return -1;
  }
  io->evict = true;
  nbdkit_debug ("%s: cache: buffered with eviction from the page cache, "
                "because %s", path, why);
  return 0;
}

struct qcow2_io *
qcow2_io_open_file_mode (const char *path, bool readonly, unsigned mode)
{
  int fd = open (path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  struct qcow2_io *io;
  int e;

  if (fd == -1)
    return NULL;
  io = qcow2_io_from_fd (fd, readonly);
  if (io == NULL) {
    e = errno;
    close (fd);
    errno = e;
    return NULL;
  }
  if (set_mode (io, path, mode) == -1) {
    e = errno;
    io_close (io);
    errno = e;
    return NULL;
  }
  return io;
}

struct qcow2_io *
qcow2_io_open_file (const char *path, bool readonly)
{
  return qcow2_io_open_file_mode (path, readonly, 0);
}

/* ---- the direct layer over another io (for the tests) ---- */

static int
over_sync (struct qcow2_io *io)
{
  return io_flush (((struct file_io *) io)->lower);
}

static int
over_flush (struct qcow2_io *io)
{
  return gen_flush (io, over_sync);
}

static int64_t
over_size (struct qcow2_io *io)
{
  return io_size (((struct file_io *) io)->lower);
}

static int
over_truncate (struct qcow2_io *io, uint64_t size)
{
  int r = io_truncate (((struct file_io *) io)->lower, size);

  gen_bump (io);
  return r;
}

static int
over_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  int r = io_preallocate (((struct file_io *) io)->lower, count, offset);

  gen_bump (io);
  return r;
}

static int
over_reserve (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  int r = io_reserve (((struct file_io *) io)->lower, count, offset);

  gen_bump (io);
  return r;
}

static void
over_close (struct qcow2_io *io)
{
  struct file_io *f = (struct file_io *) io;
  unsigned i;

  io_close (f->lower);
  for (i = 0; i < NR_STRIPES; i++)
    pthread_rwlock_destroy (&f->stripes[i]);
  pthread_mutex_destroy (&f->evict_lock);
  free (f);
}

static const struct qcow2_io_ops over_ops = {
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = over_flush,
  .size = over_size,
  .truncate = over_truncate,
  .preallocate = over_preallocate,
  .reserve = over_reserve,
  .close = over_close,
};

struct qcow2_io *
qcow2_io_direct_over (struct qcow2_io *lower, uint32_t align,
                      uint32_t mem_align)
{
  struct file_io *f;
  unsigned i;

  if (!valid_align (align) || !valid_align (mem_align) || mem_align > align) {
    io_close (lower);
    errno = EINVAL;
    return NULL;
  }
  f = calloc (1, sizeof *f);
  if (f == NULL) {
    io_close (lower);
    return NULL;
  }
  for (i = 0; i < NR_STRIPES; i++)
    pthread_rwlock_init (&f->stripes[i], NULL);
  pthread_mutex_init (&f->evict_lock, NULL);
  f->lower = lower;
  f->io.ops = &over_ops;
  f->io.fd = io_fd (lower);
  f->io.readonly = lower->readonly;
  f->io.in_memory_fs = lower->in_memory_fs;
  f->io.direct = true;
  f->io.align = align;
  f->io.mem_align = mem_align;
  return &f->io;
}

/* ---- memory backend ---- */

struct mem_io {
  struct qcow2_io io;           /* must be first */
  pthread_mutex_t lock;
  uint8_t *data;
  size_t size, alloc;
};

static int
mem_reserve (struct mem_io *m, uint64_t end)
{
  if (end > SIZE_MAX / 2) {
    errno = EFBIG;
    return -1;
  }
  if (end > m->alloc) {
    size_t n = m->alloc ? m->alloc : 4096;
    uint8_t *p;
    while (n < end)
      n *= 2;
    p = realloc (m->data, n);
    if (p == NULL)
      return -1;
    memset (p + m->alloc, 0, n - m->alloc);
    m->data = p;
    m->alloc = n;
  }
  return 0;
}

static int
mem_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;
  size_t n = 0;

  pthread_mutex_lock (&m->lock);
  if (offset < m->size)
    n = count < m->size - offset ? count : m->size - offset;
  if (n)
    memcpy (buf, m->data + offset, n);
  memset ((char *) buf + n, 0, count - n);
  pthread_mutex_unlock (&m->lock);
  return 0;
}

static int
mem_pwrite (struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (offset + count < offset || mem_reserve (m, offset + count) == -1)
    r = -1;
  else {
    memcpy (m->data + offset, buf, count);
    if (offset + count > m->size)
      m->size = offset + count;
  }
  pthread_mutex_unlock (&m->lock);
  if (r == -1 && errno == 0)
    errno = EFBIG;
  return r;
}

static int
mem_flush (struct qcow2_io *io)
{
  return 0;
}

static int64_t
mem_size (struct qcow2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;
  int64_t r;

  pthread_mutex_lock (&m->lock);
  r = m->size;
  pthread_mutex_unlock (&m->lock);
  return r;
}

static int
mem_truncate (struct qcow2_io *io, uint64_t size)
{
  struct mem_io *m = (struct mem_io *) io;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (size > m->size) {
    if (mem_reserve (m, size) == -1)
      r = -1;
  }
  else
    memset (m->data + size, 0, m->size - size);
  if (r == 0)
    m->size = size;
  pthread_mutex_unlock (&m->lock);
  return r;
}

static void
mem_close (struct qcow2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;

  pthread_mutex_destroy (&m->lock);
  free (m->data);
  free (m);
}

static const struct qcow2_io_ops mem_ops = {
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .flush = mem_flush,
  .size = mem_size,
  .truncate = mem_truncate,
  .close = mem_close,
};

struct qcow2_io *
qcow2_io_new_memory (const void *data, size_t size)
{
  struct mem_io *m = calloc (1, sizeof *m);

  if (m == NULL)
    return NULL;
  m->io.ops = &mem_ops;
  m->io.fd = -1;
  pthread_mutex_init (&m->lock, NULL);
  if (mem_reserve (m, size) == -1) {
    free (m);
    return NULL;
  }
  if (size)
    memcpy (m->data, data, size);
  m->size = size;
  return &m->io;
}

const uint8_t *
qcow2_io_memory_data (struct qcow2_io *io, size_t *size)
{
  struct mem_io *m = (struct mem_io *) io;

  *size = m->size;
  return m->data;
}
