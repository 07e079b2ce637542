/* nbdkit-qcow2: io backends for testing: fault injection, crash recorder.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Neither backend is used by the plugin; they exist so that the unit
 * tests can run core against a file that fails or loses power.
 *
 * Fault injection wraps another io and counts the calls it passes on,
 * per kind (read, write, flush, truncate), from 0 at the wrap.  One
 * fault per kind can be armed: "call number n of this kind fails with
 * errno e", or, persistent, "every call from number n on fails" (a full
 * disk).  A failed write is by default not passed on at all; with
 * lands set it is passed on and then reported as failed, because a
 * real disk may well have written part or all of what it reports as an
 * error, and core must not assume otherwise.  Preallocate counts as a
 * truncate.
 *
 * The crash recorder wraps a memory io and appends every write,
 * truncate and completed flush to a log (with a copy of the data), in
 * the order they reached the memory io.  Reads see every write (the
 * page cache).  A crash state is what the disk might hold if power
 * failed after the first nr_ops logged ops were issued:
 *
 *   initial image
 *     + every write/truncate logged before the last flush that had
 *       *completed* within those nr_ops (a flush covers only the ops
 *       logged when it was called, not ones that raced with it)
 *     + any subset of the later writes/truncates, applied in log
 *       order, one of them optionally torn: only a 512-byte-aligned
 *       prefix of it reached the disk
 *
 * That is the POSIX promise (fdatasync is the only ordering) without
 * reordering within one write beyond the torn prefix.
 *
 *   index:  0 1 2 3 4            5 6 7            8 9
 *   log:    W W T W F(covers 4)  W W F(covers 7)  W W    <- crash after 10
 *           \------ on disk: ops 0..6 (all) ------/ \any/
 *                                                   subset
 *
 * A flush is logged when it returns, with the number of ops logged when
 * it was called: a write that raced with it (logged in between) stays
 * pending.  qcow2_close closes the recorder but keeps its log until
 * qcow2_recorder_free (in either order), so the tests can replay a run
 * after the image is closed.
 *
 * Materializing every state from the initial image costs the sum of
 * every write so far, per state; struct qcow2_replay keeps the stable
 * part as a running buffer that only moves forward, so enumerating
 * states in log order costs one copy of the image per state.
 *
 * The O_DIRECT checker wraps another io and refuses, with EINVAL as
 * Linux does for a file opened with O_DIRECT, every read or write whose
 * offset or length is not a multiple of the alignment or whose buffer
 * is not aligned to the buffer alignment, and counts them.  Put under
 * core's direct layer (qcow2_io_direct_over, core/io.c) it stands for
 * a disk that does cache=none: a misaligned request the layer lets
 * through fails the request, as it would on the disk.
 *
 * XXX The log keeps every byte ever written, in memory: fine for the
 * unit tests' megabytes, not for long runs.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#include <sched.h>

#include "io-test.h"

/* ---- O_DIRECT checker ---- */

struct dio_check_io {
  struct qcow2_io io;           /* must be first */
  struct qcow2_io *inner;
  uint32_t align, mem_align;
};

/* Over every checker of the process (atomics). */
static uint64_t dio_total_ops, dio_total_refused;

static bool
dio_ok (struct dio_check_io *d, const void *buf, size_t count,
        uint64_t offset)
{
  __atomic_add_fetch (&dio_total_ops, 1, __ATOMIC_RELAXED);
  if (((offset | count) & (d->align - 1)) == 0 &&
      ((uintptr_t) buf & (d->mem_align - 1)) == 0)
    return true;
  __atomic_add_fetch (&dio_total_refused, 1, __ATOMIC_RELAXED);
  errno = EINVAL;
  return false;
}

static int
dio_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  struct dio_check_io *d = (struct dio_check_io *) io;

  if (!dio_ok (d, buf, count, offset))
    return -1;
  /* Widen the window between the read and the write back of a
   * read-modify-write, where another thread's write could be lost.
   */
  sched_yield ();
  return io_pread (d->inner, buf, count, offset);
}

static int
dio_pwrite (struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  struct dio_check_io *d = (struct dio_check_io *) io;

  if (!dio_ok (d, buf, count, offset))
    return -1;
  return io_pwrite (d->inner, buf, count, offset);
}

static int
dio_flush (struct qcow2_io *io)
{
  return io_flush (((struct dio_check_io *) io)->inner);
}

static int64_t
dio_size (struct qcow2_io *io)
{
  return io_size (((struct dio_check_io *) io)->inner);
}

static int
dio_truncate (struct qcow2_io *io, uint64_t size)
{
  return io_truncate (((struct dio_check_io *) io)->inner, size);
}

static int
dio_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  return io_preallocate (((struct dio_check_io *) io)->inner, count, offset);
}

static void
dio_close (struct qcow2_io *io)
{
  struct dio_check_io *d = (struct dio_check_io *) io;

  io_close (d->inner);
  free (d);
}

static const struct qcow2_io_ops dio_ops = {
  .pread = dio_pread,
  .pwrite = dio_pwrite,
  .flush = dio_flush,
  .size = dio_size,
  .truncate = dio_truncate,
  .preallocate = dio_preallocate,
  .close = dio_close,
};

struct qcow2_io *
qcow2_io_new_dio_check (struct qcow2_io *inner, uint32_t align,
                        uint32_t mem_align)
{
  struct dio_check_io *d = calloc (1, sizeof *d);

  if (d == NULL) {
    io_close (inner);
    return NULL;
  }
  d->io.ops = &dio_ops;
  d->io.fd = -1;
  d->io.readonly = inner->readonly;
  d->inner = inner;
  d->align = align;
  d->mem_align = mem_align;
  return &d->io;
}

void
qcow2_io_dio_check_totals (uint64_t *ops, uint64_t *refused)
{
  *ops = __atomic_load_n (&dio_total_ops, __ATOMIC_RELAXED);
  *refused = __atomic_load_n (&dio_total_refused, __ATOMIC_RELAXED);
}

/* ---- fault injection ---- */

struct fault_arm {
  bool armed;
  bool persistent;              /* every call from 'at' on */
  uint64_t at;                  /* 0-based call number */
  int err;
};

struct fault_io {
  struct qcow2_io io;           /* must be first */
  struct qcow2_io *inner;
  pthread_mutex_t lock;
  bool lands;                   /* failed writes reach the inner io */
  struct fault_arm arm[QCOW2_FAULT_NR_OPS];
  struct qcow2_fault_stats stats;
};

/* Count a call of kind op; return the errno to fail it with, or 0. */
static int
fault_count (struct fault_io *f, enum qcow2_fault_op op)
{
  struct fault_arm *a = &f->arm[op];
  uint64_t n;
  int err = 0;

  pthread_mutex_lock (&f->lock);
  n = f->stats.calls[op]++;
  if (a->armed && (n == a->at || (a->persistent && n > a->at))) {
    err = a->err;
    f->stats.failed[op]++;
  }
  pthread_mutex_unlock (&f->lock);
  return err;
}

static int
fault_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  struct fault_io *f = (struct fault_io *) io;
  int err = fault_count (f, QCOW2_FAULT_READ);

  if (err) {
    errno = err;
    return -1;
  }
  return io_pread (f->inner, buf, count, offset);
}

static int
fault_pwrite (struct qcow2_io *io, const void *buf, size_t count,
              uint64_t offset)
{
  struct fault_io *f = (struct fault_io *) io;
  int err = fault_count (f, QCOW2_FAULT_WRITE);

  if (err) {
    if (f->lands)
      io_pwrite (f->inner, buf, count, offset);
    errno = err;
    return -1;
  }
  return io_pwrite (f->inner, buf, count, offset);
}

static int
fault_flush (struct qcow2_io *io)
{
  struct fault_io *f = (struct fault_io *) io;
  int err = fault_count (f, QCOW2_FAULT_FLUSH);

  if (err) {
    errno = err;
    return -1;
  }
  return io_flush (f->inner);
}

static int64_t
fault_size (struct qcow2_io *io)
{
  struct fault_io *f = (struct fault_io *) io;

  return io_size (f->inner);
}

static int
fault_truncate (struct qcow2_io *io, uint64_t size)
{
  struct fault_io *f = (struct fault_io *) io;
  int err = fault_count (f, QCOW2_FAULT_TRUNCATE);

  if (err) {
    errno = err;
    return -1;
  }
  return io_truncate (f->inner, size);
}

static int
fault_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  struct fault_io *f = (struct fault_io *) io;
  int err = fault_count (f, QCOW2_FAULT_TRUNCATE);

  if (err) {
    errno = err;
    return -1;
  }
  return io_preallocate (f->inner, count, offset);
}

static void
fault_close (struct qcow2_io *io)
{
  struct fault_io *f = (struct fault_io *) io;

  io_close (f->inner);
  pthread_mutex_destroy (&f->lock);
  free (f);
}

static const struct qcow2_io_ops fault_ops = {
  .pread = fault_pread,
  .pwrite = fault_pwrite,
  .flush = fault_flush,
  .size = fault_size,
  .truncate = fault_truncate,
  .preallocate = fault_preallocate,
  .close = fault_close,
};

struct qcow2_io *
qcow2_io_new_fault (struct qcow2_io *inner)
{
  struct fault_io *f = calloc (1, sizeof *f);

  if (f == NULL) {
    io_close (inner);
    return NULL;
  }
  f->io.ops = &fault_ops;
  f->io.fd = -1;
  f->io.readonly = inner->readonly;
  f->inner = inner;
  pthread_mutex_init (&f->lock, NULL);
  return &f->io;
}

void
qcow2_io_fault_arm (struct qcow2_io *io, enum qcow2_fault_op op,
                    uint64_t at, int err, bool persistent)
{
  struct fault_io *f = (struct fault_io *) io;

  pthread_mutex_lock (&f->lock);
  f->arm[op].armed = true;
  f->arm[op].at = at;
  f->arm[op].err = err;
  f->arm[op].persistent = persistent;
  pthread_mutex_unlock (&f->lock);
}

void
qcow2_io_fault_disarm (struct qcow2_io *io)
{
  struct fault_io *f = (struct fault_io *) io;
  int i;

  pthread_mutex_lock (&f->lock);
  for (i = 0; i < QCOW2_FAULT_NR_OPS; i++)
    f->arm[i].armed = false;
  pthread_mutex_unlock (&f->lock);
}

void
qcow2_io_fault_set_lands (struct qcow2_io *io, bool lands)
{
  struct fault_io *f = (struct fault_io *) io;

  f->lands = lands;
}

void
qcow2_io_fault_stats (struct qcow2_io *io, struct qcow2_fault_stats *stats)
{
  struct fault_io *f = (struct fault_io *) io;

  pthread_mutex_lock (&f->lock);
  *stats = f->stats;
  pthread_mutex_unlock (&f->lock);
}

/* ---- crash recorder ---- */

struct rec_io {
  struct qcow2_io io;           /* must be first */
  struct qcow2_io *mem;         /* the live contents */
  pthread_mutex_t lock;         /* orders mem and the log together */
  uint8_t *initial;
  size_t initial_size;
  struct qcow2_rec_op *ops;
  size_t nr_ops, alloc_ops;
  bool closed;                  /* io_close was called (by core) */
  bool freed;                   /* qcow2_recorder_free was called */
  unsigned flush_delay_us;      /* a flush takes this long, at least */
};

/* Append an op (lock held).  data is copied. */
static int
rec_log (struct rec_io *r, enum qcow2_rec_kind kind, uint64_t offset,
         uint64_t len, const void *data, size_t covers)
{
  struct qcow2_rec_op *op;

  if (r->nr_ops == r->alloc_ops) {
    size_t n = r->alloc_ops ? r->alloc_ops * 2 : 256;
    struct qcow2_rec_op *p = realloc (r->ops, n * sizeof *p);
    if (p == NULL)
      return -1;
    r->ops = p;
    r->alloc_ops = n;
  }
  op = &r->ops[r->nr_ops];
  op->kind = kind;
  op->offset = offset;
  op->len = len;
  op->covers = covers;
  op->data = NULL;
  if (data) {
    uint8_t *copy = malloc (len ? len : 1);
    if (copy == NULL)
      return -1;
    memcpy (copy, data, len);
    op->data = copy;
  }
  r->nr_ops++;
  return 0;
}

static int
rec_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  struct rec_io *r = (struct rec_io *) io;

  return io_pread (r->mem, buf, count, offset);
}

static int
rec_pwrite (struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  struct rec_io *r = (struct rec_io *) io;
  int ret;

  pthread_mutex_lock (&r->lock);
  ret = io_pwrite (r->mem, buf, count, offset);
  if (ret == 0)
    ret = rec_log (r, QCOW2_REC_WRITE, offset, count, buf, 0);
  pthread_mutex_unlock (&r->lock);
  return ret;
}

static int
rec_flush (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;
  size_t covers;
  int ret;

  pthread_mutex_lock (&r->lock);
  covers = r->nr_ops;
  pthread_mutex_unlock (&r->lock);
  /* Ops logged from here until the flush is logged raced with it. */
  if (r->flush_delay_us)
    usleep (r->flush_delay_us);
  ret = io_flush (r->mem);
  if (ret == 0) {
    pthread_mutex_lock (&r->lock);
    ret = rec_log (r, QCOW2_REC_FLUSH, 0, 0, NULL, covers);
    pthread_mutex_unlock (&r->lock);
  }
  return ret;
}

static int64_t
rec_size (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;

  return io_size (r->mem);
}

static int
rec_truncate (struct qcow2_io *io, uint64_t size)
{
  struct rec_io *r = (struct rec_io *) io;
  int ret;

  pthread_mutex_lock (&r->lock);
  ret = io_truncate (r->mem, size);
  if (ret == 0)
    ret = rec_log (r, QCOW2_REC_TRUNCATE, size, 0, NULL, 0);
  pthread_mutex_unlock (&r->lock);
  return ret;
}

static void
rec_free (struct rec_io *r)
{
  size_t i;

  for (i = 0; i < r->nr_ops; i++)
    free ((void *) r->ops[i].data);
  free (r->ops);
  free (r->initial);
  io_close (r->mem);
  pthread_mutex_destroy (&r->lock);
  free (r);
}

/* The recorder outlives qcow2_close (which closes its io): closing
 * only marks it, and qcow2_recorder_free frees it.  A recorder freed
 * first and closed later is freed at close.
 */
static void
rec_close (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;

  r->closed = true;
  if (r->freed)
    rec_free (r);
}

static const struct qcow2_io_ops rec_ops = {
  .pread = rec_pread,
  .pwrite = rec_pwrite,
  .flush = rec_flush,
  .size = rec_size,
  .truncate = rec_truncate,
  .close = rec_close,
};

struct qcow2_io *
qcow2_io_new_recorder (const void *data, size_t size)
{
  struct rec_io *r = calloc (1, sizeof *r);

  if (r == NULL)
    return NULL;
  r->io.ops = &rec_ops;
  r->io.fd = -1;
  pthread_mutex_init (&r->lock, NULL);
  r->mem = qcow2_io_new_memory (data, size);
  r->initial = malloc (size ? size : 1);
  if (r->mem == NULL || r->initial == NULL) {
    io_close (r->mem);
    free (r->initial);
    pthread_mutex_destroy (&r->lock);
    free (r);
    return NULL;
  }
  if (size)
    memcpy (r->initial, data, size);
  r->initial_size = size;
  return &r->io;
}

void
qcow2_recorder_set_flush_delay (struct qcow2_io *io, unsigned us)
{
  struct rec_io *r = (struct rec_io *) io;

  r->flush_delay_us = us;
}

void
qcow2_recorder_free (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;

  if (r == NULL)
    return;
  r->freed = true;
  if (r->closed)
    rec_free (r);
}

size_t
qcow2_recorder_nr_ops (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;
  size_t n;

  pthread_mutex_lock (&r->lock);
  n = r->nr_ops;
  pthread_mutex_unlock (&r->lock);
  return n;
}

const struct qcow2_rec_op *
qcow2_recorder_op (struct qcow2_io *io, size_t i)
{
  struct rec_io *r = (struct rec_io *) io;

  return i < r->nr_ops ? &r->ops[i] : NULL;
}

size_t
qcow2_recorder_stable (struct qcow2_io *io, size_t nr_ops)
{
  struct rec_io *r = (struct rec_io *) io;
  size_t i, stable = 0;

  if (nr_ops > r->nr_ops)
    nr_ops = r->nr_ops;
  for (i = 0; i < nr_ops; i++)
    if (r->ops[i].kind == QCOW2_REC_FLUSH && r->ops[i].covers > stable)
      stable = r->ops[i].covers;
  return stable;
}

size_t
qcow2_recorder_pending (struct qcow2_io *io, size_t nr_ops,
                        size_t *pending)
{
  struct rec_io *r = (struct rec_io *) io;
  size_t i, n = 0;

  if (nr_ops > r->nr_ops)
    nr_ops = r->nr_ops;
  for (i = qcow2_recorder_stable (io, nr_ops); i < nr_ops; i++)
    if (r->ops[i].kind != QCOW2_REC_FLUSH) {
      if (pending)
        pending[n] = i;
      n++;
    }
  return n;
}

/* ---- replay ---- */

struct qcow2_replay {
  struct rec_io *rec;
  uint8_t *data;                /* the image after ops [0, pos) */
  size_t size, alloc;
  size_t pos;
};

static int
buf_reserve (uint8_t **data, size_t *alloc, uint64_t end)
{
  size_t n;
  uint8_t *p;

  if (end <= *alloc)
    return 0;
  if (end > SIZE_MAX / 2) {
    errno = EFBIG;
    return -1;
  }
  n = *alloc ? *alloc : 4096;
  while (n < end)
    n *= 2;
  p = realloc (*data, n);
  if (p == NULL)
    return -1;
  memset (p + *alloc, 0, n - *alloc);
  *data = p;
  *alloc = n;
  return 0;
}

/* Apply op (only its first 'len' bytes if a write) to a buffer. */
static int
apply (const struct qcow2_rec_op *op, uint64_t len, uint8_t **data,
       size_t *size, size_t *alloc)
{
  switch (op->kind) {
  case QCOW2_REC_WRITE:
    if (len > op->len)
      len = op->len;
    if (len == 0)
      return 0;
    if (buf_reserve (data, alloc, op->offset + len) == -1)
      return -1;
    memcpy (*data + op->offset, op->data, len);
    if (op->offset + len > *size)
      *size = op->offset + len;
    return 0;
  case QCOW2_REC_TRUNCATE:
    if (buf_reserve (data, alloc, op->offset) == -1)
      return -1;
    if (op->offset < *size)
      memset (*data + op->offset, 0, *size - op->offset);
    *size = op->offset;
    return 0;
  case QCOW2_REC_FLUSH:
    return 0;
  }
  abort ();
}

struct qcow2_replay *
qcow2_replay_new (struct qcow2_io *io)
{
  struct rec_io *r = (struct rec_io *) io;
  struct qcow2_replay *rp = calloc (1, sizeof *rp);

  if (rp == NULL)
    return NULL;
  rp->rec = r;
  if (buf_reserve (&rp->data, &rp->alloc, r->initial_size) == -1) {
    free (rp);
    return NULL;
  }
  memcpy (rp->data, r->initial, r->initial_size);
  rp->size = r->initial_size;
  return rp;
}

void
qcow2_replay_free (struct qcow2_replay *rp)
{
  if (rp) {
    free (rp->data);
    free (rp);
  }
}

uint8_t *
qcow2_replay_crash (struct qcow2_replay *rp,
                    const struct qcow2_crash_state *cs, size_t *size_r)
{
  struct qcow2_io *io = &rp->rec->io;
  size_t stable = qcow2_recorder_stable (io, cs->nr_ops);
  size_t nr_ops = cs->nr_ops < rp->rec->nr_ops ? cs->nr_ops
                                                : rp->rec->nr_ops;
  size_t i, j, size, alloc;
  uint8_t *out;

  if (stable < rp->pos) {
    errno = EINVAL;             /* the running buffer never goes back */
    return NULL;
  }
  for (; rp->pos < stable; rp->pos++)
    if (apply (&rp->rec->ops[rp->pos], UINT64_MAX, &rp->data, &rp->size,
               &rp->alloc) == -1)
      return NULL;

  alloc = rp->size ? rp->size : 1;
  out = malloc (alloc);
  if (out == NULL)
    return NULL;
  memcpy (out, rp->data, rp->size);
  size = rp->size;
  for (i = stable, j = 0; i < nr_ops; i++) {
    const struct qcow2_rec_op *op = &rp->rec->ops[i];
    uint64_t len = UINT64_MAX;
    if (op->kind == QCOW2_REC_FLUSH)
      continue;
    if (cs->keep && cs->keep[j]) {
      if (j == cs->torn)
        len = cs->torn_len & ~UINT64_C(511);
      if (apply (op, len, &out, &size, &alloc) == -1) {
        free (out);
        return NULL;
      }
    }
    j++;
  }
  *size_r = size;
  return out;
}

uint8_t *
qcow2_recorder_crash (struct qcow2_io *io,
                      const struct qcow2_crash_state *cs, size_t *size)
{
  struct qcow2_replay *rp = qcow2_replay_new (io);
  uint8_t *out;

  if (rp == NULL)
    return NULL;
  out = qcow2_replay_crash (rp, cs, size);
  qcow2_replay_free (rp);
  return out;
}

struct qcow2_io *
qcow2_recorder_crash_io (struct qcow2_io *io,
                         const struct qcow2_crash_state *cs)
{
  size_t size;
  uint8_t *buf = qcow2_recorder_crash (io, cs, &size);
  struct qcow2_io *m;

  if (buf == NULL)
    return NULL;
  m = qcow2_io_new_memory (buf, size);
  free (buf);
  return m;
}
