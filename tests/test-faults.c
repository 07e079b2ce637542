/* nbdkit-qcow2: host I/O errors at every step of a workload.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * A workload (allocating writes, COW over a snapshot or a backing file,
 * compressed writes, zero, trim, flushes, with caches small enough that
 * write-back happens inside requests) runs once without faults to count the host reads,
 * writes and flushes it makes.  Then it runs again for every index of
 * every kind, with the fault backend (core/io-test.c) failing that call:
 *
 *   EIO once; EIO once where the failed write still lands on disk;
 *   ENOSPC from that call on (a full disk) until the request has failed.
 *
 * For each run:
 *  - the request during which the fault fired fails with the injected
 *    errno (not another, and never silently succeeds), nothing crashes
 *    or asserts, and the image is not marked corrupt;
 *  - the fault is removed and the same request is retried: it and every
 *    later request succeed (the guest's view of the failed request's
 *    range is old or new data per byte until it is rewritten);
 *  - at the end qcow2_check finds no corruption, every byte reads back
 *    as the model says, qcow2_close succeeds, and the file reopened from
 *    scratch checks clean (leaks allowed) and reads back the same;
 *  - with ENOSPC, the live image has no leaks either: a full disk is not
 *    a crash, and a request that fails gives back what it allocated;
 *  - the host file runs over the crash recorder too: a few crash states
 *    of the run (any subset of the writes after a flush) check with no
 *    corruption, so the ordering rules hold on the error paths as well;
 *  - a sample of the final files passes `qemu-img check` (exit 0 or 3).
 *
 * The workloads named direct-* are the cache=none pass: the image is
 * opened with cfg.cache = none over core's direct I/O layer
 * (qcow2_io_direct_over: bounce buffers, read-modify-writes of partial
 * blocks), over an O_DIRECT checker (misaligned I/O fails with EINVAL),
 * over the fault backend: the faults hit the aligned block reads and
 * writes, including the reads of read-modify-writes.
 *
 * Environment: FAULT_TEST_ONLY=NAME runs one workload; FAULT_TEST_STEP=K
 * tries every K-th index only (default 1); FAULT_TEST_SEED;
 * FAULT_TEST_VERBOSE shows core's error messages (and faults that never
 * fired).
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <unistd.h>
#include <sys/wait.h>

#include "qcow2.h"
#include "io-test.h"
#include "testlib.h"

/* ---- random numbers (the workload is the same in every run) ---- */

/* ---- workloads ---- */

enum setup { PLAIN, BACKING_RAW, SNAPSHOT, DIRTY };

struct workload {
  const char *name;
  const char *opts;
  uint64_t size;
  enum setup setup;
  unsigned nops;
  uint64_t max_len;
  unsigned p_zero, p_trim, flush_every;
  uint64_t l2_cache, rc_cache;  /* bytes, 0 = default */
  uint32_t direct;              /* > 0: cache=none pass, this alignment */
  unsigned step;                /* > 1: only every step-th index (times
                                   FAULT_TEST_STEP) */
  bool compress;                /* compress=on, compressible data */
};

static const struct workload workloads[] = {
  { "plain-512", "cluster_size=512", 1 << 20, PLAIN,
    40, 6000, 10, 10, 5, 2048, 1024, 0, 0, false },
  { "grow-512-rc64", "cluster_size=512,refcount_bits=64", 4 << 20, PLAIN,
    30, 40000, 0, 10, 5, 2048, 1024, 0, 0, false },
  { "snapshot-64k", "cluster_size=65536", 2 << 20, SNAPSHOT,
    30, 100000, 15, 15, 4, 0, 0, 0, 0, false },
  { "backing-512-lazy", "cluster_size=512,lazy_refcounts=on", 1 << 20,
    BACKING_RAW, 40, 5000, 15, 15, 5, 2048, 0, 0, 0, false },
  { "extl2-64k", "cluster_size=65536,extended_l2=on", 2 << 20, PLAIN,
    30, 100000, 15, 15, 4, 0, 0, 0, 0, false },
  /* Left dirty by qemu-io (lazy refcounts, abort): the first write
   * repairs it, so faults hit the repair.
   */
  { "dirty-lazy-4k", "cluster_size=4096,lazy_refcounts=on", 1 << 20, DIRTY,
    20, 20000, 10, 10, 5, 0, 0, 0, 0, false },
  /* compress=on: streams placed, linked, abandoned and freed. */
  { "compress-4k", "cluster_size=4096", 1 << 20, PLAIN,
    30, 30000, 10, 10, 5, 2048, 1024, 0, 0, true },
  /* The cache=none pass, short: core over core/io.c's direct I/O layer
   * over an O_DIRECT checker (io-test.c) over the fault backend, which
   * so sees (and fails) the aligned blocks a disk would: the reads of
   * read-modify-writes too.  4096-byte blocks under 512-byte clusters
   * and slices: every metadata write is a read-modify-write.
   */
  { "direct-4k-512", "cluster_size=512", 1 << 20, PLAIN,
    16, 6000, 10, 10, 5, 2048, 1024, 4096, 3, false },
};

enum mode { EIO_ONCE, EIO_LANDS, ENOSPC_FULL, NR_MODES };
static const char *mode_name[] = { "EIO", "EIO+lands", "ENOSPC-full" };

static char dir[256];
static uint64_t seed = 20260502;
static uint64_t step = 1;
static uint64_t runs, faults_fired, retried, leaky_runs, crash_states,
  qemu_checks, failures;
static bool verbose;

static uint8_t *
make_image (const struct workload *w, size_t *size)
{
  char path[512];

  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  unlink (path);
  switch (w->setup) {
  case PLAIN:
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    break;
  case BACKING_RAW: {
    uint64_t s = 77, i;
    uint8_t *b = malloc (w->size);
    char bpath[512];
    assert (b);
    for (i = 0; i < w->size; i++)
      b[i] = rnd (&s);
    snprintf (bpath, sizeof bpath, "%s/backing.raw", dir);
    write_file (bpath, b, w->size - w->size / 4);
    free (b);
    sys ("cd %s && qemu-img create -q -f qcow2 -o %s -b backing.raw -F raw "
         "disk.qcow2 %" PRIu64, dir, w->opts, w->size);
    break;
  }
  case DIRTY:
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    sys ("qemu-io -f qcow2 -c 'write -P 0x33 0 300k' -c 'write -P 0x44 600k 40k' "
         "-c abort %s >/dev/null 2>&1 || true", path);
    break;
  case SNAPSHOT:
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    sys ("qemu-io -f qcow2 -c 'write -P 0x5a 0 %" PRIu64 "' %s >/dev/null",
         w->size / 2, path);
    sys ("qemu-img snapshot -c snap1 %s", path);
    sys ("qemu-io -f qcow2 -c 'write -P 0x6b %" PRIu64 " 65536' %s "
         ">/dev/null", w->size / 4, path);
    break;
  }
  return read_file (path, size);
}

static struct qcow2_image *
open_io (const struct workload *w, struct qcow2_io *io, bool readonly)
{
  struct qcow2_config cfg = {
    .readonly = readonly, .no_locking = true,
    .l2_cache_size = w->l2_cache, .refcount_cache_size = w->rc_cache,
    .cache_entry_size = 512, .compress = w->compress,
  };

  if (w->direct) {
    io = qcow2_io_direct_over (qcow2_io_new_dio_check (io, w->direct,
                                                       w->direct),
                               w->direct, w->direct);
    assert (io);
    cfg.cache = QCOW2_CACHE_NONE;
  }
  return qcow2_open_io (io, "disk.qcow2", dir, &cfg);
}

/* ---- the guest model ---- */

/* Per byte: expected value; and whether the last request over it failed
 * (then 'alt' is also allowed), or several did (anything is).
 */
enum { EXACT, OLD_OR_ALT, ANY };
struct model {
  uint64_t size;
  uint8_t *expect, *alt, *state;
};

static void
model_ok (struct model *m, uint64_t off, const uint8_t *data, uint64_t len)
{
  memcpy (m->expect + off, data, len);
  memset (m->state + off, EXACT, len);
}

static void
model_failed (struct model *m, uint64_t off, const uint8_t *data,
              uint64_t len)
{
  uint64_t i;

  for (i = 0; i < len; i++) {
    if (m->state[off + i] == EXACT) {
      m->alt[off + i] = data[i];
      m->state[off + i] = OLD_OR_ALT;
    }
    else
      m->state[off + i] = ANY;
  }
}

/* Returns the first bad offset, or -1. */
static int64_t
model_compare (const struct model *m, const uint8_t *got)
{
  uint64_t i;

  for (i = 0; i < m->size; i++) {
    if (got[i] == m->expect[i])
      continue;
    if (m->state[i] == ANY ||
        (m->state[i] == OLD_OR_ALT && got[i] == m->alt[i]))
      continue;
    return i;
  }
  return -1;
}

/* ---- one run ---- */

struct fault {
  enum qcow2_fault_op op;       /* QCOW2_FAULT_NR_OPS: none */
  uint64_t at;
  enum mode mode;
};

struct result {
  uint64_t calls[QCOW2_FAULT_NR_OPS];
  bool fired;
};

static int
fail (const struct workload *w, const struct fault *f, const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "FAIL: %s: fault %s #%" PRIu64 " (%s): ", w->name,
           f->op == QCOW2_FAULT_READ ? "read" :
           f->op == QCOW2_FAULT_WRITE ? "write" :
           f->op == QCOW2_FAULT_FLUSH ? "flush" : "none",
           f->at, mode_name[f->mode]);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  failures++;
  return -1;
}

static bool
marked_corrupt (const uint8_t *b, size_t size)
{
  return header_incompat_bits (b, size) & 2;
}

/* A few crash states of the run must have no corruption. */
static int
check_crash_states (const struct workload *w, const struct fault *f,
                    struct qcow2_io *rec, uint64_t *s)
{
  size_t n = qcow2_recorder_nr_ops (rec), k;

  for (k = 0; k < 3 && n > 0; k++) {
    struct qcow2_crash_state cs = { .torn = SIZE_MAX };
    size_t np, j;
    bool *keep, dirty;
    struct qcow2_io *io;
    struct qcow2_image *img;
    struct qcow2_check_result res;

    cs.nr_ops = 1 + rnd_below (s, n);
    np = qcow2_recorder_pending (rec, cs.nr_ops, NULL);
    keep = malloc (np + 1);
    assert (keep);
    for (j = 0; j < np; j++)
      keep[j] = rnd_below (s, 2);
    cs.keep = keep;
    {
      size_t size;
      uint8_t *b = qcow2_recorder_crash (rec, &cs, &size);
      assert (b);
      /* A dirty image may have stale refcounts until it is repaired. */
      dirty = header_incompat_bits (b, size) & 1;
      io = qcow2_io_new_memory (b, size);
      free (b);
    }
    free (keep);
    assert (io);
    crash_states++;
    img = open_io (w, io, true);
    if (img == NULL)
      return fail (w, f, "crash state after %zu ops does not open",
                   cs.nr_ops);
    if (qcow2_check (img, false, &res) == -1 ||
        (res.corruptions && !dirty) || res.errors) {
      qcow2_close (img);
      return fail (w, f, "crash state after %zu ops (%zu pending) is "
                   "corrupt", cs.nr_ops, np);
    }
    qcow2_close (img);
  }
  return 0;
}

enum call_kind { C_WRITE, C_ZERO, C_TRIM, C_FLUSH, C_READ, C_CHECK,
                 C_REPAIR };
static const char *call_name[] = {
  "write", "zero", "trim", "flush", "read", "check", "repair"
};

struct call {
  enum call_kind kind;
  uint8_t *buf;
  uint64_t len, off;
  unsigned flags;
  struct qcow2_check_result *cr;
};

static int
do_call (struct qcow2_image *img, const struct call *c)
{
  switch (c->kind) {
  case C_WRITE: return qcow2_pwrite (img, c->buf, c->len, c->off, c->flags);
  case C_ZERO: return qcow2_zero (img, c->len, c->off, c->flags);
  case C_TRIM: return qcow2_trim (img, c->len, c->off, c->flags);
  case C_FLUSH: return qcow2_flush (img);
  case C_READ: return qcow2_pread (img, c->buf, c->len, c->off);
  case C_CHECK: return qcow2_check (img, false, c->cr);
  case C_REPAIR: return qcow2_check (img, true, c->cr);
  }
  abort ();
}

static uint64_t
failed_total (struct qcow2_io *fio)
{
  struct qcow2_fault_stats st;
  int i;
  uint64_t n = 0;

  qcow2_io_fault_stats (fio, &st);
  for (i = 0; i < QCOW2_FAULT_NR_OPS; i++)
    n += st.failed[i];
  return n;
}

/* Make a call with the fault armed.  If the fault fires during it, the
 * call must fail with the injected errno; the fault is then removed
 * and, if retry, the call is made again and must succeed.  Returns 0
 * if the call (in the end) succeeded, 1 if it failed by the fault and
 * was not retried, -1 on a test failure.
 */
static int
guarded (const struct workload *w, const struct fault *f,
         struct qcow2_io *fio, struct qcow2_image *img,
         const struct call *c, bool retry, struct result *res,
         bool *fired)
{
  uint64_t before = failed_total (fio);
  int want = f->mode == ENOSPC_FULL && f->op != QCOW2_FAULT_READ
             ? ENOSPC : EIO;
  int rr;

  *fired = false;
  errno = 0;
  rr = do_call (img, c);
  if (failed_total (fio) == before) {
    if (rr == -1)
      return fail (w, f, "%s failed (%m) with no fault", call_name[c->kind]);
    return 0;
  }
  *fired = res->fired = true;
  faults_fired++;
  if (rr == 0)
    return fail (w, f, "%s succeeded although a host %s failed",
                 call_name[c->kind],
                 f->op == QCOW2_FAULT_FLUSH ? "flush" :
                 f->op == QCOW2_FAULT_READ ? "read" : "write");
  if (errno != want)
    return fail (w, f, "%s failed with %m, not %s", call_name[c->kind],
                 want == ENOSPC ? "ENOSPC" : "EIO");
  qcow2_io_fault_disarm (fio);
  if (!retry)
    return 1;
  retried++;
  if (do_call (img, c) == -1)
    return fail (w, f, "retried %s failed: %m", call_name[c->kind]);
  return 0;
}

static int
run (const struct workload *w, const uint8_t *initial, size_t isize,
     const struct fault *f, struct result *res, bool qemu)
{
  struct qcow2_io *rec = qcow2_io_new_recorder (initial, isize);
  struct qcow2_io *fio = qcow2_io_new_fault (rec);
  struct qcow2_image *img = open_io (w, fio, false);
  struct qcow2_fault_stats st;
  struct qcow2_check_result cr;
  struct model m = { .size = w->size };
  uint64_t s = seed, i, cs;
  uint8_t *got = NULL, *data = NULL;
  /* Retry the failed request, or go on without it (as a guest that
   * gives up would): alternate with the index.
   */
  bool retry = (f->at & 1) == 0;
  bool fired, armed;
  int r = -1, g;
  int64_t bad;

  assert (fio);
  memset (res, 0, sizeof *res);
  runs++;
  if (img == NULL) {
    fail (w, f, "initial image does not open");
    qcow2_recorder_free (rec);
    return -1;
  }
  cs = qcow2_cluster_size (img);
  m.expect = malloc (w->size);
  m.alt = malloc (w->size);
  m.state = calloc (1, w->size);
  got = malloc (w->size);
  assert (m.expect && m.alt && m.state && got);
  assert (qcow2_pread (img, m.expect, w->size, 0) == 0);

  if (f->op != QCOW2_FAULT_NR_OPS) {
    qcow2_io_fault_set_lands (fio, f->mode == EIO_LANDS);
    qcow2_io_fault_arm (fio, f->op, f->at,
                        f->mode == ENOSPC_FULL ? ENOSPC : EIO,
                        f->mode == ENOSPC_FULL);
  }

  for (i = 0; i <= w->nops; i++) {
    unsigned dice = rnd_below (&s, 100);
    struct call c = { .kind = C_WRITE };
    uint64_t len = 1 + rnd_below (&s, w->max_len), off;

    if (i == w->nops)
      c.kind = C_FLUSH;         /* end with a flush */
    else if (dice < w->p_zero)
      c.kind = C_ZERO;
    else if (dice < w->p_zero + w->p_trim)
      c.kind = C_TRIM;
    if (len > w->size)
      len = w->size;
    off = rnd_below (&s, w->size - len + 1);
    if (rnd_below (&s, 2)) {
      off &= ~(cs - 1);
      len = (len + cs - 1) & ~(cs - 1);
      if (off + len > w->size)
        len = w->size - off;
    }
    if (c.kind == C_ZERO && rnd_below (&s, 2))
      c.flags |= QCOW2_F_MAY_TRIM;
    if (c.kind == C_WRITE && rnd_below (&s, 10) == 0)
      c.flags |= QCOW2_F_FUA;
    free (data);
    data = malloc (len);
    assert (data);
    if (c.kind == C_WRITE) {
      uint64_t j;
      uint8_t v = rnd (&s);
      /* compress=on: 4 random bytes in 64, so clusters compress. */
      for (j = 0; j < len; j++)
        data[j] = !w->compress || j % 64 < 4 ? rnd (&s) : v;
    }
    else
      memset (data, 0, len);
    c.buf = data;
    c.len = len;
    c.off = off;

    g = guarded (w, f, fio, img, &c, retry || i == w->nops, res, &fired);
    if (g == -1)
      goto out;
    if (c.kind == C_WRITE || c.kind == C_ZERO) {
      if (g == 1)
        model_failed (&m, off, data, len);
      else
        model_ok (&m, off, data, len);
    }
    else if (c.kind == C_TRIM) {
      /* Trim: whatever it reads as now (zeroes, backing data, or the
       * old data outside whole clusters) is what it must read as later.
       * A failed trim leaves old or new, which is not modelled: any.
       */
      struct call rd = { .kind = C_READ, .buf = got, .len = len,
                         .off = off };
      if (g == 1)
        memset (m.state + off, ANY, len);
      else {
        if (guarded (w, f, fio, img, &rd, true, res, &fired) == -1)
          goto out;
        model_ok (&m, off, got, len);
      }
    }
    if (rnd_below (&s, w->flush_every) == 0 && i < w->nops) {
      struct call fl = { .kind = C_FLUSH };
      if (guarded (w, f, fio, img, &fl, retry, res, &fired) == -1)
        goto out;
    }
  }

  /* The fault may still be armed for a call of the check or close. */
  {
    struct call ck = { .kind = C_CHECK, .cr = &cr };
    struct call rd = { .kind = C_READ, .buf = got, .len = w->size };
    if (guarded (w, f, fio, img, &ck, true, res, &fired) == -1)
      goto out;
    if (cr.corruptions || cr.errors) {
      fail (w, f, "live image: %" PRIu64 " corruptions, %" PRIu64
            " errors", cr.corruptions, cr.errors);
      goto out;
    }
    if (cr.leaks)
      leaky_runs++;
    if (cr.leaks && f->mode == ENOSPC_FULL) {
      fail (w, f, "live image: %" PRIu64 " leaked clusters after ENOSPC",
            cr.leaks);
      goto out;
    }
    if (guarded (w, f, fio, img, &rd, true, res, &fired) == -1)
      goto out;
  }
  bad = model_compare (&m, got);
  if (bad >= 0) {
    fail (w, f, "live image: guest byte %#" PRIx64 " reads %#x, "
          "expected %#x", bad, got[bad], m.expect[bad]);
    goto out;
  }

  /* Repair (frees the leaks the fault left) and allocate again, so
   * that leaked clusters are reused: nothing the failed request left
   * behind in memory may object.
   */
  {
    struct call rep = { .kind = C_REPAIR, .cr = &cr };
    unsigned k;
    if (guarded (w, f, fio, img, &rep, true, res, &fired) == -1)
      goto out;
    for (k = 0; k < 8; k++) {
      uint64_t len = 1 + rnd_below (&s, w->max_len < 20000 ? w->max_len
                                                          : 20000), j;
      struct call c = { .kind = C_WRITE, .len = len };
      if (len > w->size)
        len = c.len = w->size;
      c.off = rnd_below (&s, w->size - len + 1);
      free (data);
      data = c.buf = malloc (len);
      assert (data);
      for (j = 0; j < len; j++)
        data[j] = rnd (&s);
      if (guarded (w, f, fio, img, &c, true, res, &fired) == -1)
        goto out;
      model_ok (&m, c.off, data, len);
    }
    rep.kind = C_FLUSH;
    if (guarded (w, f, fio, img, &rep, true, res, &fired) == -1)
      goto out;
  }
  qcow2_io_fault_stats (fio, &st);
  memcpy (res->calls, st.calls, sizeof res->calls);
  armed = f->op != QCOW2_FAULT_NR_OPS && failed_total (fio) == 0;
  {
    /* Calls made by close, counted from the log (base run: none fail). */
    size_t k, n0 = qcow2_recorder_nr_ops (rec);
    r = qcow2_close (img);
    img = NULL;
    for (k = n0; k < qcow2_recorder_nr_ops (rec); k++)
      res->calls[qcow2_recorder_op (rec, k)->kind == QCOW2_REC_FLUSH
                 ? QCOW2_FAULT_FLUSH : QCOW2_FAULT_WRITE]++;
  }
  if (r == -1 && !armed) {
    fail (w, f, "close failed with no fault");
    goto out;
  }
  r = -1;

  /* The file alone, reopened: everything was flushed before close. */
  {
    struct qcow2_crash_state all = { .nr_ops = SIZE_MAX, .torn = SIZE_MAX };
    size_t n;
    uint8_t *b = qcow2_recorder_crash (rec, &all, &n);
    struct qcow2_image *again;

    assert (b);
    if (marked_corrupt (b, n)) {
      free (b);
      fail (w, f, "image marked corrupt");
      goto out;
    }
    if (qemu) {
      char path[512], cmd[1200];
      int st2;
      snprintf (path, sizeof path, "%s/final.qcow2", dir);
      write_file (path, b, n);
      snprintf (cmd, sizeof cmd, "qemu-img check -f qcow2 %s >%s/qc.log 2>&1",
                path, dir);
      st2 = system (cmd);
      qemu_checks++;
      if (!WIFEXITED (st2) ||
          (WEXITSTATUS (st2) != 0 && WEXITSTATUS (st2) != 3)) {
        snprintf (cmd, sizeof cmd, "cat %s/qc.log >&2", dir);
        if (system (cmd) != 0)
          perror ("cat");
        free (b);
        fail (w, f, "qemu-img check exit %d", WEXITSTATUS (st2));
        goto out;
      }
    }
    again = open_io (w, qcow2_io_new_memory (b, n), true);
    free (b);
    if (again == NULL) {
      fail (w, f, "final image does not open");
      goto out;
    }
    if (qcow2_check (again, false, &cr) == -1 || cr.corruptions ||
        cr.errors) {
      qcow2_close (again);
      fail (w, f, "final image: %" PRIu64 " corruptions", cr.corruptions);
      goto out;
    }
    if (qcow2_pread (again, got, w->size, 0) == -1) {
      qcow2_close (again);
      fail (w, f, "final image: read failed");
      goto out;
    }
    qcow2_close (again);
    bad = model_compare (&m, got);
    if (bad >= 0) {
      fail (w, f, "final image: guest byte %#" PRIx64 " reads %#x, "
            "expected %#x", bad, got[bad], m.expect[bad]);
      goto out;
    }
  }
  if (check_crash_states (w, f, rec, &s) == -1)
    goto out;
  r = 0;
 out:
  if (img)
    qcow2_close (img);
  qcow2_recorder_free (rec);
  free (m.expect);
  free (m.alt);
  free (m.state);
  free (got);
  free (data);
  return r;
}

static void
test_workload (const struct workload *w)
{
  size_t isize;
  uint8_t *initial = make_image (w, &isize);
  struct fault none = { .op = QCOW2_FAULT_NR_OPS };
  struct result base, res;
  uint64_t before_runs = runs, before_fail = failures, before_fired =
    faults_fired;
  enum qcow2_fault_op op;
  enum mode mode;
  unsigned nqemu = 0;

  if (run (w, initial, isize, &none, &base, true) == -1) {
    fprintf (stderr, "%s: the workload fails without faults\n", w->name);
    exit (1);
  }
  for (op = QCOW2_FAULT_READ; op <= QCOW2_FAULT_FLUSH; op++)
    for (mode = 0; mode < NR_MODES; mode++) {
      uint64_t at;
      if ((op != QCOW2_FAULT_WRITE && mode == EIO_LANDS) ||
          (op == QCOW2_FAULT_READ && mode == ENOSPC_FULL))
        continue;
      for (at = 0; at < base.calls[op]; at += step * (w->step ? w->step : 1)) {
        struct fault f = { .op = op, .at = at, .mode = mode };
        bool qemu = (at % 37) == 5 && nqemu < 40;
        if (qemu)
          nqemu++;
        if (run (w, initial, isize, &f, &res, qemu) == 0 && !res.fired &&
            verbose)
          fprintf (stderr, "%s: fault %d #%" PRIu64 " never fired\n",
                   w->name, op, at);
      }
    }
  printf ("%-18s %4" PRIu64 " reads %4" PRIu64 " writes %3" PRIu64
          " flushes: %5" PRIu64 " runs, %5" PRIu64 " faults fired, %"
          PRIu64 " failures\n", w->name, base.calls[QCOW2_FAULT_READ],
          base.calls[QCOW2_FAULT_WRITE], base.calls[QCOW2_FAULT_FLUSH],
          runs - before_runs, faults_fired - before_fired,
          failures - before_fail);
  fflush (stdout);
  free (initial);
}

static void
fail_flush (enum qcow2_fault_op op, uint64_t at, const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "flush-commit: %s fault #%" PRIu64 ": ",
           op == QCOW2_FAULT_READ ? "read" : op == QCOW2_FAULT_WRITE
           ? "write" : "no", at);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  failures++;
}

/* ---- faults inside the flush that commits deferred frees ---- */

/* Clusters shared with a snapshot are trimmed (every 4th 64 KiB of an
 * 8 MiB image with 512-byte clusters), so the flush that follows writes
 * the L2 tables and then applies some 4,000 refcount decrements through
 * a refcount cache far smaller than the refcount blocks: it reads and
 * writes them as it goes.  Fail the i-th host read (or write) of that
 * flush, once; a second flush must succeed, and the image must then be
 * exactly consistent: no refcount applied twice (the snapshot's
 * clusters would reach 0 and be handed out again), none lost.  Rewrite
 * the trimmed ranges and flush again, so that a cluster wrongly freed
 * would be overwritten, then check the live image and the file.
 */
#define FC_SIZE (8 << 20)

static uint64_t
flush_commit_run (const uint8_t *initial, size_t isize, enum qcow2_fault_op op,
                  uint64_t at, bool *fired)
{
  struct qcow2_io *fio = qcow2_io_new_fault (qcow2_io_new_memory (initial,
                                                                  isize));
  struct qcow2_config cfg = {
    .no_locking = true, .l2_cache_size = 4096,
    .refcount_cache_size = 4096, .cache_entry_size = 512,
  };
  struct qcow2_image *img;
  struct qcow2_fault_stats st0, st;
  struct qcow2_check_result cr;
  static uint8_t buf[65536], got[FC_SIZE];
  uint64_t off, calls;
  int r;

  assert (fio);
  img = qcow2_open_io (fio, "disk.qcow2", dir, &cfg);
  assert (img);
  for (off = 0; off < FC_SIZE; off += 4 * 65536)
    assert (qcow2_trim (img, 65536, off, 0) == 0);
  qcow2_io_fault_stats (fio, &st0);
  if (op != QCOW2_FAULT_NR_OPS)
    qcow2_io_fault_arm (fio, op, st0.calls[op] + at, EIO, false);
  r = qcow2_flush (img);
  qcow2_io_fault_disarm (fio);
  qcow2_io_fault_stats (fio, &st);
  *fired = st.failed[QCOW2_FAULT_READ] + st.failed[QCOW2_FAULT_WRITE] > 0;
  calls = op == QCOW2_FAULT_NR_OPS ? 0 : st.calls[op] - st0.calls[op];
  if (*fired && (r != -1 || errno != EIO))
    fail_flush (op, at, "flush with a failed host I/O returned %d (%m)", r);
  if (!*fired && r != 0)
    fail_flush (op, at, "flush failed with no fault (%m)");
  /* The second flush, then the same check the client would see. */
  if (qcow2_flush (img) == -1)
    fail_flush (op, at, "second flush failed (%m)");
  if (qcow2_check (img, false, &cr) == -1 || cr.corruptions || cr.errors)
    fail_flush (op, at, "after the second flush: %" PRIu64 " corruptions, %"
                PRIu64 " errors", cr.corruptions, cr.errors);
  memset (buf, 0xc3, sizeof buf);
  for (off = 0; off < FC_SIZE; off += 4 * 65536)
    assert (qcow2_pwrite (img, buf, sizeof buf, off, 0) == 0);
  if (qcow2_flush (img) == -1)
    fail_flush (op, at, "flush after the rewrites failed (%m)");
  if (qcow2_check (img, false, &cr) == -1 || cr.corruptions || cr.errors ||
      cr.leaks)
    fail_flush (op, at, "after the rewrites: %" PRIu64 " corruptions, %"
                PRIu64 " errors, %" PRIu64 " leaks", cr.corruptions,
                cr.errors, cr.leaks);
  assert (qcow2_pread (img, got, FC_SIZE, 0) == 0);
  for (off = 0; off < FC_SIZE; off++) {
    uint8_t want = (off & (4 * 65536 - 1)) < 65536 ? 0xc3 : 0x5a;
    if (off >= FC_SIZE / 2 && (off & (4 * 65536 - 1)) >= 65536)
      want = 0;
    if (off >= FC_SIZE / 4 && off < FC_SIZE / 4 + 65536 &&
        (off & (4 * 65536 - 1)) >= 65536)
      want = 0x6b;
    if (got[off] != want) {
      fail_flush (op, at, "guest byte %#" PRIx64 " reads %#x, expected %#x",
                  off, got[off], want);
      break;
    }
  }
  assert (qcow2_close (img) == 0);
  return calls;
}

static void
test_flush_commit (void)
{
  struct workload w = { "flush-commit", "cluster_size=512", FC_SIZE,
                        SNAPSHOT, 0, 0, 0, 0, 0, 0, 0, 0, 0, false };
  size_t isize;
  uint8_t *initial = make_image (&w, &isize);
  uint64_t n[QCOW2_FAULT_NR_OPS] = { 0 }, at, before = failures, nruns = 0;
  enum qcow2_fault_op op;
  bool fired;

  for (op = QCOW2_FAULT_READ; op <= QCOW2_FAULT_WRITE; op++) {
    n[op] = flush_commit_run (initial, isize, op, UINT64_MAX / 2, &fired);
    for (at = 0; at < n[op] && failures - before < 5; at += step) {
      flush_commit_run (initial, isize, op, at, &fired);
      nruns++;
      assert (fired);
      faults_fired++;
    }
  }
  printf ("%-18s %4" PRIu64 " reads %4" PRIu64 " writes in the flush: %5"
          PRIu64 " runs, %" PRIu64 " failures\n", "flush-commit",
          n[QCOW2_FAULT_READ], n[QCOW2_FAULT_WRITE], nruns,
          failures - before);
  runs += nruns;
  free (initial);
}

/* The fault backend itself. */
static void
test_backend (void)
{
  uint8_t z[4096] = { 0 }, b[16], c[16];
  struct qcow2_io *fio = qcow2_io_new_fault (qcow2_io_new_memory (z, 4096));
  struct qcow2_fault_stats st;

  assert (fio);
  memset (b, 1, sizeof b);
  qcow2_io_fault_arm (fio, QCOW2_FAULT_WRITE, 1, EIO, false);
  assert (io_pwrite (fio, b, 16, 0) == 0);
  memset (b, 2, sizeof b);
  errno = 0;
  assert (io_pwrite (fio, b, 16, 0) == -1 && errno == EIO);
  assert (io_pread (fio, c, 16, 0) == 0 && c[0] == 1);   /* did not land */
  assert (io_pwrite (fio, b, 16, 0) == 0);
  assert (io_pread (fio, c, 16, 0) == 0 && c[0] == 2);
  qcow2_io_fault_stats (fio, &st);
  assert (st.calls[QCOW2_FAULT_WRITE] == 3);
  assert (st.failed[QCOW2_FAULT_WRITE] == 1);
  assert (st.calls[QCOW2_FAULT_READ] == 2);

  /* A full disk: every flush from the 2nd on, until disarmed. */
  qcow2_io_fault_arm (fio, QCOW2_FAULT_FLUSH, 1, ENOSPC, true);
  assert (io_flush (fio) == 0);
  assert (io_flush (fio) == -1 && errno == ENOSPC);
  assert (io_flush (fio) == -1 && errno == ENOSPC);
  qcow2_io_fault_disarm (fio);
  assert (io_flush (fio) == 0);

  /* A failed write that lands anyway. */
  qcow2_io_fault_set_lands (fio, true);
  qcow2_io_fault_arm (fio, QCOW2_FAULT_WRITE, 3, EIO, false);
  memset (b, 3, sizeof b);
  assert (io_pwrite (fio, b, 16, 0) == -1 && errno == EIO);
  assert (io_pread (fio, c, 16, 0) == 0 && c[0] == 3);

  qcow2_io_fault_arm (fio, QCOW2_FAULT_READ, 4, EIO, false);
  assert (io_pread (fio, c, 16, 0) == 0);
  assert (io_pread (fio, c, 16, 0) == -1 && errno == EIO);
  assert (io_truncate (fio, 8192) == 0 && io_size (fio) == 8192);
  qcow2_io_fault_arm (fio, QCOW2_FAULT_TRUNCATE, 1, ENOSPC, false);
  assert (io_truncate (fio, 0) == -1 && errno == ENOSPC);
  qcow2_io_fault_stats (fio, &st);
  assert (st.failed[QCOW2_FAULT_READ] == 1 &&
          st.failed[QCOW2_FAULT_TRUNCATE] == 1 &&
          st.failed[QCOW2_FAULT_FLUSH] == 2 &&
          st.failed[QCOW2_FAULT_WRITE] == 2);
  io_close (fio);
}

/* ---- syncs and reads a flush costs with cache=none ---- */

/* The host syncs and reads the calls between two stat snapshots made. */
static uint64_t
delta (struct qcow2_io *fio, struct qcow2_fault_stats *prev,
       enum qcow2_fault_op op)
{
  struct qcow2_fault_stats st;
  uint64_t n;

  qcow2_io_fault_stats (fio, &st);
  n = st.calls[op] - prev->calls[op];
  *prev = st;
  return n;
}

/* core/io.c skips a sync when nothing was written through the io since
 * the last successful one began, and l2.c writes the L1 entries it
 * changes in whole blocks of the direct I/O alignment taken from the
 * in-memory table, so that io.c need not read them first.  Over the
 * direct layer (4096-byte blocks) over the fault backend, which counts
 * what reaches the "disk", in a 256 GiB image with 64 KiB clusters (a
 * 4096-byte L1 table):
 *  - flush, flush, flush with nothing written: no sync after the first;
 *  - an allocating write (new L2 table: L1 entry, L2 slice, refcount
 *    slice, data), then flush: two syncs (the ordering one before the
 *    L2 slice and L1 entry are written, and the final one), and no
 *    read (no read-modify-write of the L1 block);
 *  - a flush after it: none; an in-place rewrite then flush: one;
 *  - an allocating write into another slice of the new L2 table: no
 *    read (the table was made zeroes here).
 */
static void
test_flush_syncs (void)
{
  struct workload w = { "flush-syncs", "cluster_size=65536",
                        UINT64_C(256) << 30, PLAIN,
                        0, 0, 0, 0, 0, 0, 0, 0, 0, false };
  struct qcow2_config cfg = { .no_locking = true,
                              .cache = QCOW2_CACHE_NONE };
  size_t isize;
  uint8_t *initial = make_image (&w, &isize);
  struct qcow2_io *fio = qcow2_io_new_fault (qcow2_io_new_memory (initial,
                                                                  isize));
  struct qcow2_io *io;
  struct qcow2_image *img;
  struct qcow2_fault_stats st;
  static uint8_t buf[4096];
  uint64_t n[8], r;

  assert (fio);
  io = qcow2_io_direct_over (qcow2_io_new_dio_check (fio, 4096, 4096),
                             4096, 4096);
  assert (io);
  img = qcow2_open_io (io, "disk.qcow2", dir, &cfg);
  assert (img);
  qcow2_io_fault_stats (fio, &st);
  assert (qcow2_flush (img) == 0);
  n[0] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  assert (qcow2_flush (img) == 0);
  n[1] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  assert (qcow2_flush (img) == 0);
  n[2] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  memset (buf, 0x5c, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, UINT64_C(3) << 30, 0) == 0);
  delta (fio, &st, QCOW2_FAULT_READ);
  assert (qcow2_flush (img) == 0);
  r = st.calls[QCOW2_FAULT_READ];
  n[3] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  r = st.calls[QCOW2_FAULT_READ] - r;
  assert (qcow2_flush (img) == 0);
  n[4] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  assert (qcow2_pwrite (img, buf, sizeof buf, UINT64_C(3) << 30, 0) == 0);
  assert (qcow2_flush (img) == 0);
  n[5] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  assert (qcow2_flush (img) == 0);
  n[6] = delta (fio, &st, QCOW2_FAULT_FLUSH);
  /* An allocating write into another slice of that L2 table (32 MiB
   * on): the table was made here, all zeroes, so neither the lookup
   * nor the update of the entry reads the slice (l2.c:
   * table_set_empty, slice_known_empty).
   */
  delta (fio, &st, QCOW2_FAULT_READ);
  assert (qcow2_pwrite (img, buf, sizeof buf,
                        (UINT64_C(3) << 30) + (32 << 20), 0) == 0);
  n[7] = delta (fio, &st, QCOW2_FAULT_READ);
  printf ("%-18s syncs: flush x3 %" PRIu64 " %" PRIu64 " %" PRIu64
          ", allocating write + flush %" PRIu64 " (%" PRIu64 " reads), "
          "flush %" PRIu64 ", rewrite + flush %" PRIu64 ", flush %" PRIu64
          "; reads of a write into an empty slice %" PRIu64 "\n",
          w.name, n[0], n[1], n[2], n[3], r, n[4], n[5], n[6], n[7]);
  if (n[0] != 1 || n[1] != 0 || n[2] != 0 || n[3] != 2 || r != 0 ||
      n[4] != 0 || n[5] != 1 || n[6] != 0 || n[7] != 0) {
    fprintf (stderr, "flush-syncs: expected syncs 1 0 0, 2 (0 reads), "
             "0, 1, 0; 0 reads\n");
    failures++;
  }
  assert (qcow2_close (img) == 0);
  free (initial);
}

int
main (void)
{
  const char *only = getenv ("FAULT_TEST_ONLY");
  size_t i;

  if (getenv ("FAULT_TEST_STEP"))
    step = strtoull (getenv ("FAULT_TEST_STEP"), NULL, 0);
  if (step == 0)
    step = 1;
  if (getenv ("FAULT_TEST_SEED"))
    seed = strtoull (getenv ("FAULT_TEST_SEED"), NULL, 0);
  verbose = getenv ("FAULT_TEST_VERBOSE") != NULL;
  if (system ("qemu-img --version >/dev/null 2>&1") != 0) {
    fprintf (stderr, "test-faults: qemu-img is required\n");
    return 1;
  }
  /* The injected errors are reported by core on every run (shown with
   * FAULT_TEST_VERBOSE).
   */
  if (!verbose)
    setenv ("QCOW2_QUIET", "1", 0);
  snprintf (dir, sizeof dir, "%s/faults-XXXXXX",
            getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp");
  assert (mkdtemp (dir));
  printf ("test-faults: seed %" PRIu64 ", every %" PRIu64 ". index\n",
          seed, step);
  test_backend ();
  if (!only || strcmp (only, "flush-commit") == 0)
    test_flush_commit ();
  if (!only || strcmp (only, "flush-syncs") == 0)
    test_flush_syncs ();
  for (i = 0; i < sizeof workloads / sizeof workloads[0]; i++) {
    if (only && strcmp (only, workloads[i].name) != 0)
      continue;
    test_workload (&workloads[i]);
  }
  printf ("test-faults: %" PRIu64 " runs, %" PRIu64 " faults fired, %"
          PRIu64 " retries, %" PRIu64 " runs with leaks, %" PRIu64
          " crash states, %" PRIu64 " qemu-img checks, %" PRIu64
          " failures\n", runs, faults_fired, retried, leaky_runs,
          crash_states, qemu_checks, failures);
  sys ("rm -rf %s", dir);
  return failures ? 1 : 0;
}
