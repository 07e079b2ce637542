/* nbdkit-qcow2: crash consistency of the write path.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Each workload makes an image with qemu-img (512 B, 4 KiB or 64 KiB
 * clusters; lazy refcounts or not; a raw backing file; an internal
 * snapshot over data written by qemu-io; compressed clusters; writes
 * with compress=on; extended L2; compat 0.10; 1-bit refcounts; 64-bit refcounts so that the
 * refcount table grows; tiny caches so that slices are written back
 * inside requests), loads it into the crash recorder (core/io-test.c)
 * and runs a random guest workload through core: writes of every size
 * and alignment, zero (with and without may_trim), trim, FUA writes and
 * flushes, then close.  Three workloads send their requests from four
 * threads at once, into stripes that share clusters; there each host
 * flush takes 1 ms, so that requests run (and complete) during a guest
 * flush's write-back without the lock (core/l2.c).
 *
 * Then it replays crash states in log order, for every epoch between
 * two host flushes: the crash in order at every op (all earlier
 * writes landed), every subset of the pending writes when there are
 * few, random subsets when there are many, and random torn writes (a
 * 512-byte-aligned prefix landed).  When there are more states than
 * the budget, a random sample of them; but every state of an epoch that
 * writes the header (refcount table moved, dirty bit) is checked.  For
 * each state:
 *
 *  - it opens read-only, and qcow2_check finds no corruption and no
 *    reference outside the file (leaks are counted; a dirty image may
 *    have stale refcounts, which are counted, not failed);
 *  - every guest byte reads as it was when the last guest flush that
 *    had completed was called, or as one of the guest requests issued
 *    after it wrote it (a per-byte model: every request is modelled
 *    as "write these bytes", trim and zero as what the live image read
 *    back right after them; write data is random, so data from a stale
 *    or reused cluster shows up);
 *  - for a sample (the "follow-ups"): it opens writable, takes a write
 *    (a dirty image is repaired first; half of the clean ones with
 *    leaks get an explicit repair first) and a flush, and then checks
 *    with no corruption (and no leak, if it was repaired) and reads the
 *    write back.  When it was repaired, that run is crashed too: each of
 *    8 of its crash states checks clean unless still dirty (and then
 *    repairs cleanly on the next write), and no guest byte changed but
 *    the follow-up's write;
 *  - for a smaller sample: `qemu-img check` exits 0 or 3 on the crash
 *    state (2 = corruption = FAIL), and also on the state after the
 *    writable follow-up.
 *
 * A failing state is written to $CRASH_TEST_KEEP (default /tmp) as
 * crash-fail-WORKLOAD-N.qcow2 with a line describing it (the first 5
 * of each workload).
 *
 * The workloads named direct-* are the cache=none pass, short ones: the
 * image is opened with cfg.cache = none over core's direct I/O layer
 * (qcow2_io_direct_over: the bounce buffers, read-modify-writes of
 * partial blocks and stripes of core/io.c) over an O_DIRECT checker
 * (io-test.c: misaligned I/O fails with EINVAL) over the recorder, for
 * the workload and for every state opened after it; 4096-byte blocks
 * under 512-byte slices and clusters, so that every metadata write is a
 * read-modify-write (from four threads at once in one of them),
 * 512-byte blocks under compressed clusters, and 512-byte blocks under
 * 512-byte clusters (L1 and refcount table entries written as whole
 * blocks from memory).  Over the direct layer, flushes that find
 * nothing written since the last sync are skipped (core/io.c), so the
 * crash states check that skipping too.
 *
 * Environment: CRASH_TEST_SCALE (default 1) multiplies the workload
 * lengths and the state budget; CRASH_TEST_STATES (default: the scale)
 * multiplies the state budget alone (the sanitizer pass of .ci/run
 * checks fewer states than the plain pass: every kind of state is
 * still checked, and every state of a header epoch); CRASH_TEST_SEED
 * (default fixed, printed); CRASH_TEST_ONLY=NAME runs one workload;
 * CRASH_TEST_VERBOSE shows core's error messages.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <malloc.h>
#include <pthread.h>

#include "qcow2.h"
#include "io-test.h"
#include "testlib.h"

#define QCOW2_INCOMPAT_DIRTY   1
#define QCOW2_INCOMPAT_CORRUPT 2

/* ---- random numbers ---- */

static uint64_t rng_state;

/* Set while a workload with compress=on runs: its data compresses
 * (4 random bytes in 64, the rest one random value a request), so that
 * whole clusters are stored compressed, and stale data still shows.
 */
static bool compressible;

static void
rnd_fill (uint8_t *p, size_t n)
{
  uint8_t fill = rnd (&rng_state);
  size_t i;

  for (i = 0; i < n; i++)
    p[i] = !compressible || i % 64 < 4 ? rnd (&rng_state) : fill;
}

/* ---- workloads ---- */

enum setup { PLAIN, BACKING_RAW, SNAPSHOT, COMPRESSED, BITMAPS };

struct workload {
  const char *name;
  const char *opts;             /* qemu-img create -o */
  uint64_t size;                /* virtual disk size */
  enum setup setup;
  unsigned nops;                /* guest requests (times the scale) */
  uint64_t max_len;             /* longest write */
  unsigned p_zero, p_trim;      /* percent of requests */
  unsigned flush_every;         /* mean requests between flushes */
  bool sequential;              /* fill the disk from the start */
  uint64_t l2_cache;            /* cache bytes (slices of 512), 0 = default */
  unsigned threads;             /* > 0: requests from this many threads */
  uint64_t stripe;              /* with threads: bytes a stripe */
  uint32_t direct;              /* > 0: cache=none pass, this alignment */
  unsigned budget;              /* crash states (times the scale), 0 = 600 */
  bool compress;                /* compress=on, compressible data */
};

static const struct workload workloads[] = {
  { "alloc-64k", "cluster_size=65536", 8 << 20, PLAIN,
    60, 200000, 0, 0, 4, false, 0, 0, 0, 0, 0, false },
  { "alloc-512", "cluster_size=512", 2 << 20, PLAIN,
    120, 20000, 0, 0, 5, false, 0, 0, 0, 0, 0, false },
  { "lazy-64k", "cluster_size=65536,lazy_refcounts=on", 8 << 20, PLAIN,
    60, 200000, 10, 10, 4, false, 0, 0, 0, 0, 0, false },
  { "lazy-512", "cluster_size=512,lazy_refcounts=on", 2 << 20, PLAIN,
    120, 20000, 10, 10, 5, false, 0, 0, 0, 0, 0, false },
  { "zero-trim-64k", "cluster_size=65536", 4 << 20, PLAIN,
    80, 150000, 25, 25, 4, false, 0, 0, 0, 0, 0, false },
  { "zero-trim-512", "cluster_size=512", 1 << 20, PLAIN,
    120, 8000, 25, 25, 5, false, 0, 0, 0, 0, 0, false },
  { "backing-64k", "cluster_size=65536", 4 << 20, BACKING_RAW,
    60, 100000, 15, 15, 4, false, 0, 0, 0, 0, 0, false },
  { "backing-512", "cluster_size=512", 1 << 20, BACKING_RAW,
    100, 6000, 15, 15, 5, false, 0, 0, 0, 0, 0, false },
  { "backing-v2-512", "cluster_size=512,compat=0.10", 1 << 20, BACKING_RAW,
    100, 6000, 15, 15, 5, false, 0, 0, 0, 0, 0, false },
  { "snapshot-64k", "cluster_size=65536", 4 << 20, SNAPSHOT,
    60, 100000, 15, 15, 4, false, 0, 0, 0, 0, 0, false },
  { "snapshot-512-lazy", "cluster_size=512,lazy_refcounts=on", 1 << 20,
    SNAPSHOT, 100, 6000, 15, 15, 5, false, 0, 0, 0, 0, 0, false },
  { "reftable-grow-512", "cluster_size=512,refcount_bits=64", 8 << 20, PLAIN,
    150, 65536, 0, 5, 6, true, 0, 0, 0, 0, 0, false },
  { "l2-alloc-512", "cluster_size=512", 16 << 20, PLAIN,
    150, 1024, 0, 0, 8, false, 0, 0, 0, 0, 0, false },
  { "extl2-64k", "cluster_size=65536,extended_l2=on", 4 << 20, PLAIN,
    80, 100000, 15, 15, 4, false, 0, 0, 0, 0, 0, false },
  { "compressed-64k", "cluster_size=65536", 4 << 20, COMPRESSED,
    60, 100000, 15, 15, 4, false, 0, 0, 0, 0, 0, false },
  /* compress=on: compressed clusters written, packed, rewritten and
   * freed; 2-bit refcounts cap the streams a host cluster holds.
   */
  { "compress-on-64k", "cluster_size=65536", 4 << 20, COMPRESSED,
    60, 200000, 15, 15, 4, false, 0, 0, 0, 0, 0, true },
  { "compress-on-512-rc2", "cluster_size=512,refcount_bits=2", 1 << 20,
    PLAIN, 120, 8000, 10, 10, 5, false, 0, 0, 0, 0, 0, true },
  { "rc1-512", "cluster_size=512,refcount_bits=1", 2 << 20, PLAIN,
    120, 8000, 15, 15, 5, false, 0, 0, 0, 0, 0, false },
  /* Tiny caches: slices are evicted (and written back) inside requests. */
  { "small-cache-512", "cluster_size=512", 4 << 20, PLAIN,
    150, 8000, 10, 10, 8, false, 2048, 0, 0, 0, 0, false },
  { "small-cache-snap-lazy", "cluster_size=4096,lazy_refcounts=on", 4 << 20,
    SNAPSHOT, 100, 30000, 15, 15, 6, false, 2048, 0, 0, 0, 0, false },
  /* 4 threads at once, each in its own stripes; the stripes are not
   * cluster aligned, so neighbours share clusters.  A flush after each
   * round of requests.
   */
  { "threads-512", "cluster_size=512", 2 << 20, PLAIN,
    200, 3000, 10, 10, 2, false, 0, 4, 1300, 0, 0, false },
  { "threads-64k-snap", "cluster_size=65536", 4 << 20, SNAPSHOT,
    120, 70000, 10, 10, 2, false, 0, 4, 50000, 0, 0, false },
  { "threads-4k-backing", "cluster_size=4096", 2 << 20, BACKING_RAW,
    160, 9000, 10, 10, 2, false, 4096, 4, 7000, 0, 0, false },
  { "threads-4k-compress", "cluster_size=4096", 2 << 20, PLAIN,
    160, 20000, 10, 10, 2, false, 0, 4, 9000, 0, 0, true },
  /* The cache=none pass, short: core over core/io.c's direct I/O layer
   * (bounce buffers, read-modify-writes of partial blocks, stripes)
   * over an O_DIRECT checker over the recorder, so the host writes
   * logged are the aligned blocks a disk would get.  4096-byte blocks
   * under 512-byte L2 and refcount slices, and under 512-byte clusters
   * (whose header, L1 and refcount tables share the first block): every
   * metadata write is a read-modify-write.
   */
  { "direct-4k-slices-512", "cluster_size=4096", 2 << 20, PLAIN,
    50, 12000, 15, 15, 5, false, 2048, 0, 0, 4096, 150, false },
  { "direct-4k-threads-512", "cluster_size=512", 1 << 20, PLAIN,
    64, 3000, 10, 10, 2, false, 0, 4, 1300, 4096, 150, false },
  { "direct-512-compressed", "cluster_size=65536", 2 << 20, COMPRESSED,
    30, 100000, 15, 15, 4, false, 0, 0, 0, 512, 100, false },
  /* 512-byte blocks under 512-byte clusters: the L1 table (64
   * entries) and the refcount table are one block each, so the L1 and
   * refcount table entries core changes are written as whole blocks
   * from memory (l2.c, refcount.c: io_widen_write), with no read.
   */
  { "direct-512-l1", "cluster_size=512", 2 << 20, PLAIN,
    50, 12000, 10, 10, 4, false, 0, 0, 0, 512, 100, false },
  /* Persistent dirty bitmaps (make_image: bitmap_*). */
  { "bitmaps-64k", "cluster_size=65536,lazy_refcounts=on", 4 << 20, BITMAPS,
    60, 100000, 15, 15, 4, false, 0, 0, 0, 0, 0, false },
  { "bitmaps-512", "cluster_size=512", 4 << 20, BITMAPS,
    100, 6000, 15, 15, 5, false, 0, 0, 0, 0, 0, false },
};

/* A guest request, modelled as "write data over [off, off+len)". */
enum gkind { G_WRITE, G_ZERO, G_TRIM, G_FLUSH };
struct gop {
  enum gkind kind;
  uint64_t off, len;
  uint8_t *data;                /* what it left (trim: as read back) */
  size_t rec_start, rec_end;    /* recorder ops before / after it */
  uint64_t seq_start, seq_end;  /* tick () when it began and returned */
};

struct run {
  const struct workload *w;
  char dir[256];                /* temp dir with the image(s) */
  struct qcow2_io *rec;
  uint8_t *initial_guest;
  struct gop *gops;
  size_t nr_gops;
  /* Crash checking, in log order. */
  uint8_t *durable;             /* guest contents as of gdur */
  size_t gdur;                  /* gops [0, gdur) are applied */
  uint8_t *got;
  /* Counts. */
  uint64_t states, leaky, dirty_stale, followups, nested, qemu_checks,
    failures, header_epochs, repairs;
};

static uint64_t total_states, total_leaky, total_dirty_stale,
  total_followups, total_nested, total_qemu_checks, total_failures;
static uint64_t total_inside_flush;     /* threaded: requests that ran
                                           wholly inside a guest flush */
static double scale = 1;
static double states_scale = 1;
static const char *keep_dir = "/tmp";

/* BITMAPS: qemu-img adds b0 (64 KiB granularity), b1 (512 bytes: two
 * table entries with 512-byte clusters) and bdis; qemu-io writes
 * bitmap_pre (QEMU sets their bits in all three), then bdis is
 * disabled.  check_bitmaps says what every crash state must show.
 */
static const struct { const char *name; uint64_t gran; bool enabled; }
  bitmap_list[] = {
  { "b0", 65536, true }, { "b1", 512, true }, { "bdis", 65536, false },
};
static const uint64_t bitmap_pre[][2] = {       /* offset, length */
  { 65536, 100000 }, { 1 << 20, 4096 },
};

/* Make disk.qcow2 (and backing.raw) in r->dir. */
static void
make_image (struct run *r)
{
  const struct workload *w = r->w;
  char path[512];

  snprintf (path, sizeof path, "%s/disk.qcow2", r->dir);
  switch (w->setup) {
  case PLAIN:
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    break;
  case BACKING_RAW: {
    char bpath[512];
    uint8_t *b = malloc (w->size);
    assert (b);
    rnd_fill (b, w->size);
    /* Some zero stretches, and a backing file shorter than the disk. */
    memset (b + w->size / 4, 0, w->size / 8);
    snprintf (bpath, sizeof bpath, "%s/backing.raw", r->dir);
    write_file (bpath, b, w->size - w->size / 8 - 512);
    free (b);
    sys ("cd %s && qemu-img create -q -f qcow2 -o %s -b backing.raw -F raw "
         "disk.qcow2 %" PRIu64, r->dir, w->opts, w->size);
    break;
  }
  case COMPRESSED: {
    char rpath[512];
    uint8_t *b = malloc (w->size);
    uint64_t i;
    assert (b);
    /* Compressible, and different in every cluster. */
    for (i = 0; i < w->size; i++)
      b[i] = (i % 7 == 0) ? rnd (&rng_state) : (uint8_t) (i >> 12);
    memset (b + w->size / 2, 0, w->size / 8);
    snprintf (rpath, sizeof rpath, "%s/data.raw", r->dir);
    write_file (rpath, b, w->size);
    free (b);
    sys ("qemu-img convert -c -f raw -O qcow2 -o %s %s %s",
         w->opts, rpath, path);
    break;
  }
  case BITMAPS: {
    size_t i;
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    for (i = 0; i < sizeof bitmap_list / sizeof bitmap_list[0]; i++)
      sys ("qemu-img bitmap --add -g %" PRIu64 " %s %s",
           bitmap_list[i].gran, path, bitmap_list[i].name);
    for (i = 0; i < sizeof bitmap_pre / sizeof bitmap_pre[0]; i++)
      sys ("qemu-io -f qcow2 -c 'write -P 0x3c %" PRIu64 " %" PRIu64 "' "
           "%s >/dev/null", bitmap_pre[i][0], bitmap_pre[i][1], path);
    sys ("qemu-img bitmap --disable %s bdis", path);
    break;
  }
  case SNAPSHOT: {
    uint64_t cs = strstr (w->opts, "cluster_size=512,") ? 512
      : strstr (w->opts, "cluster_size=4096,") ? 4096 : 65536;
    sys ("qemu-img create -q -f qcow2 -o %s %s %" PRIu64,
         w->opts, path, w->size);
    /* Data in the first half, a snapshot, then some of it rewritten so
     * that both shared and unshared clusters and L2 tables exist.
     */
    sys ("qemu-io -f qcow2 -c 'write -P 0x5a 0 %" PRIu64 "' "
         "-c 'write -P 0x6b %" PRIu64 " %" PRIu64 "' %s >/dev/null",
         w->size / 2, w->size / 2 + cs, 3 * cs, path);
    sys ("qemu-img snapshot -c snap1 %s", path);
    sys ("qemu-io -f qcow2 -c 'write -P 0x7c %" PRIu64 " %" PRIu64 "' "
         "-c 'write -z %" PRIu64 " %" PRIu64 "' %s >/dev/null",
         w->size / 8, 4 * cs, w->size / 4, 2 * cs, path);
    break;
  }
  }
}

static struct qcow2_image *
open_mem (struct run *r, struct qcow2_io *io, bool readonly)
{
  struct qcow2_config cfg = { .readonly = readonly, .no_locking = true,
                              .compress = r->w->compress };

  if (r->w->direct) {
    uint32_t a = r->w->direct;
    io = qcow2_io_direct_over (qcow2_io_new_dio_check (io, a, a), a, a);
    assert (io);
    cfg.cache = QCOW2_CACHE_NONE;
  }
  if (r->w->l2_cache) {
    cfg.l2_cache_size = r->w->l2_cache;
    cfg.refcount_cache_size = r->w->l2_cache;
    cfg.cache_entry_size = 512;
  }
  return qcow2_open_io (io, "disk.qcow2", r->dir, &cfg);
}

/* ---- the workload ---- */

/* A clock for "did this request return before that flush began?".
 * r->gops is kept in order of seq_end: then the requests a flush makes
 * durable (seq_end < the flush's seq_start) are a prefix of it.
 */
static uint64_t clock_ticks;

static uint64_t
tick (void)
{
  return __atomic_add_fetch (&clock_ticks, 1, __ATOMIC_SEQ_CST);
}

static struct gop *
new_gop (struct run *r, enum gkind kind, uint64_t off, uint64_t len,
         uint8_t *data)
{
  struct gop *g;

  r->gops = realloc (r->gops, (r->nr_gops + 1) * sizeof *r->gops);
  assert (r->gops);
  g = &r->gops[r->nr_gops++];
  g->kind = kind;
  g->off = off;
  g->len = len;
  g->data = data;
  return g;
}

/* A request made by the main thread, which has just returned. */
static void
add_gop (struct run *r, enum gkind kind, uint64_t off, uint64_t len,
         uint8_t *data, size_t start)
{
  struct gop *g = new_gop (r, kind, off, len, data);

  g->rec_start = start;
  g->rec_end = qcow2_recorder_nr_ops (r->rec);
  g->seq_start = g->seq_end = tick ();
}

static void
pick_range (struct run *r, uint64_t *off, uint64_t *len, uint64_t *seq)
{
  const struct workload *w = r->w;
  uint64_t l = 1 + rnd_below (&rng_state, w->max_len), o;

  if (rnd_below (&rng_state, 2))
    l = (l + 511) & ~UINT64_C(511);
  if (l > w->size)
    l = w->size;
  if (w->sequential) {
    o = *seq;
    if (o + l > w->size)
      o = *seq = 0;
    *seq += l;
  }
  else {
    o = rnd_below (&rng_state, w->size - l + 1);
    if (rnd_below (&rng_state, 2))
      o &= ~UINT64_C(511);
  }
  *off = o;
  *len = l;
}

/* Threaded workloads: a request made by one thread. */
struct treq {
  struct qcow2_image *img;
  struct qcow2_io *rec;
  enum gkind kind;
  uint64_t off, len;            /* flush: off = microseconds to wait */
  unsigned flags;
  uint8_t *data;
  size_t rec_start, rec_end;
  uint64_t seq_start, seq_end;
};

struct tjob {
  pthread_t tid;
  struct treq *reqs;
  size_t n;
};

static void *
thread_run (void *arg)
{
  struct tjob *j = arg;
  size_t i;

  for (i = 0; i < j->n; i++) {
    struct treq *q = &j->reqs[i];
    if (q->kind == G_FLUSH)
      usleep (q->off);
    q->rec_start = qcow2_recorder_nr_ops (q->rec);
    q->seq_start = tick ();
    switch (q->kind) {
    case G_WRITE:
      assert (qcow2_pwrite (q->img, q->data, q->len, q->off, q->flags) == 0);
      break;
    case G_ZERO:
      assert (qcow2_zero (q->img, q->len, q->off, q->flags) == 0);
      break;
    case G_TRIM:
      /* Only whole clusters inside the range change, and they are all
       * this thread's: the read back is stable.
       */
      assert (qcow2_trim (q->img, q->len, q->off, 0) == 0);
      assert (qcow2_pread (q->img, q->data, q->len, q->off) == 0);
      break;
    case G_FLUSH:
      assert (qcow2_flush (q->img) == 0);
      break;
    }
    q->seq_end = tick ();
    q->rec_end = qcow2_recorder_nr_ops (q->rec);
  }
  return NULL;
}

static int
cmp_seq_end (const void *a, const void *b)
{
  const struct treq *x = *(struct treq * const *) a;
  const struct treq *y = *(struct treq * const *) b;

  return x->seq_end < y->seq_end ? -1 : x->seq_end > y->seq_end;
}

/* Rounds of requests from w->threads threads at once, and one more
 * thread that flushes twice at random moments among them; then, often,
 * a flush after the round.
 */
static void
run_threaded (struct run *r, struct qcow2_image *img)
{
  const struct workload *w = r->w;
  unsigned t, nt = w->threads, per = 4;
  unsigned rounds = w->nops * scale / (nt * per), k;
  uint64_t nstripes = w->size / w->stripe;
  struct tjob *jobs = calloc (nt + 1, sizeof *jobs);
  struct treq **all = malloc ((nt * per + 2) * sizeof *all);
  size_t i, n;

  assert (jobs && all && nstripes >= nt);
  qcow2_recorder_set_flush_delay (r->rec, 1000);
  for (k = 0; k < rounds; k++) {
    size_t start;
    jobs[nt].n = 2;
    jobs[nt].reqs = calloc (2, sizeof (struct treq));
    assert (jobs[nt].reqs);
    for (i = 0; i < 2; i++) {
      jobs[nt].reqs[i].img = img;
      jobs[nt].reqs[i].rec = r->rec;
      jobs[nt].reqs[i].kind = G_FLUSH;
      jobs[nt].reqs[i].off = rnd_below (&rng_state, 3000);
    }
    for (t = 0; t < nt; t++) {
      jobs[t].n = per;
      jobs[t].reqs = calloc (per, sizeof (struct treq));
      assert (jobs[t].reqs);
      for (i = 0; i < per; i++) {
        struct treq *q = &jobs[t].reqs[i];
        uint64_t st = rnd_below (&rng_state, nstripes / nt) * nt + t;
        unsigned dice = rnd_below (&rng_state, 100);
        uint64_t a = rnd_below (&rng_state, w->stripe);
        uint64_t b = rnd_below (&rng_state, w->stripe);
        if (a > b) {
          uint64_t x = a; a = b; b = x;
        }
        q->img = img;
        q->rec = r->rec;
        q->off = st * w->stripe + a;
        q->len = b - a + 1;
        q->data = malloc (q->len);
        assert (q->data);
        if (dice < w->p_zero) {
          q->kind = G_ZERO;
          q->flags = rnd_below (&rng_state, 2) ? QCOW2_F_MAY_TRIM : 0;
          memset (q->data, 0, q->len);
        }
        else if (dice < w->p_zero + w->p_trim)
          q->kind = G_TRIM;
        else {
          q->kind = G_WRITE;
          rnd_fill (q->data, q->len);
        }
      }
    }
    for (t = 0; t <= nt; t++)
      assert (pthread_create (&jobs[t].tid, NULL, thread_run, &jobs[t]) == 0);
    for (t = 0; t <= nt; t++)
      assert (pthread_join (jobs[t].tid, NULL) == 0);
    for (n = 0, t = 0; t <= nt; t++)
      for (i = 0; i < jobs[t].n; i++)
        all[n++] = &jobs[t].reqs[i];
    qsort (all, n, sizeof *all, cmp_seq_end);
    for (i = 0; i < n; i++) {
      size_t f;
      if (all[i]->kind == G_FLUSH)
        continue;
      for (f = 0; f < n; f++)
        if (all[f]->kind == G_FLUSH &&
            all[f]->seq_start < all[i]->seq_start &&
            all[i]->seq_end < all[f]->seq_end) {
          total_inside_flush++;
          break;
        }
    }
    for (i = 0; i < n; i++) {
      struct treq *q = all[i];
      struct gop *g = new_gop (r, q->kind, q->kind == G_FLUSH ? 0 : q->off,
                               q->len, q->data);
      g->rec_start = q->rec_start;
      g->rec_end = q->rec_end;
      g->seq_start = q->seq_start;
      g->seq_end = q->seq_end;
    }
    for (t = 0; t <= nt; t++)
      free (jobs[t].reqs);
    if (rnd_below (&rng_state, w->flush_every) == 0) {
      start = qcow2_recorder_nr_ops (r->rec);
      assert (qcow2_flush (img) == 0);
      add_gop (r, G_FLUSH, 0, 0, NULL, start);
    }
  }
  free (jobs);
  free (all);
  qcow2_recorder_set_flush_delay (r->rec, 0);
  {
    size_t start = qcow2_recorder_nr_ops (r->rec);
    assert (qcow2_close (img) == 0);
    add_gop (r, G_FLUSH, 0, 0, NULL, start);
  }
}

static void
run_workload (struct run *r, struct qcow2_image *img)
{
  const struct workload *w = r->w;
  unsigned n = w->nops * scale, i;
  uint64_t seq = 0;

  if (w->threads) {
    run_threaded (r, img);
    return;
  }

  for (i = 0; i < n; i++) {
    uint64_t off, len;
    unsigned dice = rnd_below (&rng_state, 100);
    size_t start = qcow2_recorder_nr_ops (r->rec);
    uint8_t *data;

    pick_range (r, &off, &len, &seq);
    data = malloc (len);
    assert (data);
    if (dice < w->p_zero) {
      unsigned flags = rnd_below (&rng_state, 2) ? QCOW2_F_MAY_TRIM : 0;
      assert (qcow2_zero (img, len, off, flags) == 0);
      memset (data, 0, len);
      add_gop (r, G_ZERO, off, len, data, start);
    }
    else if (dice < w->p_zero + w->p_trim) {
      assert (qcow2_trim (img, len, off, 0) == 0);
      assert (qcow2_pread (img, data, len, off) == 0);
      add_gop (r, G_TRIM, off, len, data, start);
    }
    else {
      bool fua = rnd_below (&rng_state, 20) == 0;
      rnd_fill (data, len);
      assert (qcow2_pwrite (img, data, len, off,
                            fua ? QCOW2_F_FUA : 0) == 0);
      add_gop (r, G_WRITE, off, len, data, start);
      if (fua)
        add_gop (r, G_FLUSH, 0, 0, NULL, start);
    }
    if (rnd_below (&rng_state, w->flush_every) == 0) {
      start = qcow2_recorder_nr_ops (r->rec);
      assert (qcow2_flush (img) == 0);
      add_gop (r, G_FLUSH, 0, 0, NULL, start);
    }
  }
  /* A clean close is a flush too (and clears the dirty bit). */
  {
    size_t start = qcow2_recorder_nr_ops (r->rec);
    assert (qcow2_close (img) == 0);
    add_gop (r, G_FLUSH, 0, 0, NULL, start);
  }
}

static bool chance (double p);

/* ---- checking one crash state ---- */

/* Bring r->durable up to date for a crash at T: every request that
 * returned before a guest flush that had returned by T began.
 */
static void
advance_durable (struct run *r, size_t T)
{
  uint64_t fseq = 0;
  size_t i;

  for (i = r->gdur; i < r->nr_gops; i++)
    if (r->gops[i].kind == G_FLUSH && r->gops[i].rec_end <= T &&
        r->gops[i].seq_start > fseq)
      fseq = r->gops[i].seq_start;
  for (; r->gdur < r->nr_gops && r->gops[r->gdur].seq_end < fseq;
       r->gdur++) {
    const struct gop *g = &r->gops[r->gdur];
    if (g->kind != G_FLUSH)
      memcpy (r->durable + g->off, g->data, g->len);
  }
}

/* May guest byte b read as v after a crash at T? */
static bool
byte_ok (struct run *r, size_t T, uint64_t b, uint8_t v)
{
  size_t i;

  if (r->durable[b] == v)
    return true;
  for (i = r->gdur; i < r->nr_gops; i++) {
    const struct gop *g = &r->gops[i];
    if (g->rec_start < T && g->kind != G_FLUSH &&
        b >= g->off && b < g->off + g->len &&
        g->data[b - g->off] == v)
      return true;
  }
  return false;
}

static void
describe (struct run *r, const struct qcow2_crash_state *cs, size_t np,
          const uint8_t *img, size_t size, const char *why)
{
  char path[512];
  size_t j;

  /* The first few of each workload are described and kept. */
  if (r->failures >= 5) {
    r->failures++;
    return;
  }
  snprintf (path, sizeof path, "%s/crash-fail-%s-%" PRIu64 ".qcow2",
            keep_dir, r->w->name, r->failures);
  write_file (path, img, size);
  fprintf (stderr, "FAIL: %s: %s: crash after %zu of %zu ops "
           "(stable %zu, %zu pending, kept:", r->w->name, why, cs->nr_ops,
           qcow2_recorder_nr_ops (r->rec),
           qcow2_recorder_stable (r->rec, cs->nr_ops), np);
  for (j = 0; j < np; j++)
    if (cs->keep && cs->keep[j])
      fprintf (stderr, " %zu", j);
  if (cs->torn != SIZE_MAX)
    fprintf (stderr, "; torn %zu at %" PRIu64, cs->torn, cs->torn_len);
  fprintf (stderr, ") -> %s\n", path);
  r->failures++;
}

/* qemu-img check: 0 clean, 3 leaks; anything else fails. */
static int
qemu_check (struct run *r, const uint8_t *img, size_t size)
{
  char path[512], cmd[1200];
  int st;

  snprintf (path, sizeof path, "%s/state.qcow2", r->dir);
  write_file (path, img, size);
  snprintf (cmd, sizeof cmd, "qemu-img check -f qcow2 %s >%s/qcheck.log 2>&1",
            path, r->dir);
  st = system (cmd);
  r->qemu_checks++;
  if (WIFEXITED (st) &&
      (WEXITSTATUS (st) == 0 || WEXITSTATUS (st) == 3))
    return 0;
  snprintf (cmd, sizeof cmd, "cat %s/qcheck.log >&2", r->dir);
  if (system (cmd) != 0)
    perror ("cat");
  return -1;
}

/* The contents of a recorder after everything it was given. */
static uint8_t *
rec_live (struct qcow2_io *rec, size_t *size)
{
  struct qcow2_crash_state cs = { .nr_ops = SIZE_MAX, .torn = SIZE_MAX };
  size_t np = qcow2_recorder_pending (rec, SIZE_MAX, NULL);
  bool *keep = malloc (np + 1);
  uint8_t *b;

  assert (keep);
  memset (keep, 1, np + 1);
  cs.keep = keep;
  b = qcow2_recorder_crash (rec, &cs, size);
  assert (b);
  free (keep);
  return b;
}

/* A crash during the follow-up (for a dirty image: during its repair):
 * no corruption unless still dirty, and every byte is as the original
 * crash state read (r->got) or as the follow-up wrote it.
 */
static int
crash_followup (struct run *r, struct qcow2_io *rec, const uint8_t *data,
                uint64_t off, uint64_t len)
{
  size_t n = qcow2_recorder_nr_ops (rec), k, j, np, size;
  uint8_t *buf = malloc (r->w->size);

  assert (buf);
  for (k = 0; k < 8; k++) {
    struct qcow2_crash_state cs = { .torn = SIZE_MAX };
    struct qcow2_image *img;
    struct qcow2_check_result res;
    uint8_t *state;
    bool *keep, dirty;
    uint64_t b;

    cs.nr_ops = 1 + rnd_below (&rng_state, n);
    np = qcow2_recorder_pending (rec, cs.nr_ops, NULL);
    keep = malloc (np + 1);
    assert (keep);
    for (j = 0; j < np; j++)
      keep[j] = rnd_below (&rng_state, 2);
    cs.keep = keep;
    state = qcow2_recorder_crash (rec, &cs, &size);
    free (keep);
    assert (state);
    r->nested++;
    dirty = header_incompat_bits (state, size) & QCOW2_INCOMPAT_DIRTY;
    img = open_mem (r, qcow2_io_new_memory (state, size), !dirty);
    free (state);
    if (img == NULL ||
        qcow2_check (img, false, &res) == -1 ||
        res.errors || (res.corruptions && !dirty) ||
        qcow2_pread (img, buf, r->w->size, 0) == -1) {
      fprintf (stderr, "follow-up crash after %zu of %zu ops (%zu pending): "
               "open, check or read failed\n", cs.nr_ops, n, np);
      qcow2_close (img);
      free (buf);
      return -1;
    }
    if (dirty) {
      /* Still dirty: the next write repairs it (again), and then it is
       * clean.  The write puts back what is there.
       */
      uint64_t at = rnd_below (&rng_state, r->w->size - 512);
      if (qcow2_pwrite (img, buf + at, 512, at, 0) == -1 ||
          qcow2_flush (img) == -1 ||
          qcow2_check (img, false, &res) == -1 ||
          res.corruptions || res.leaks || res.errors) {
        fprintf (stderr, "follow-up crash after %zu of %zu ops: the dirty "
                 "state does not repair cleanly\n", cs.nr_ops, n);
        qcow2_close (img);
        free (buf);
        return -1;
      }
    }
    qcow2_close (img);
    for (b = 0; b < r->w->size; b++)
      if (buf[b] != r->got[b] &&
          !(b >= off && b < off + len && buf[b] == data[b - off])) {
        fprintf (stderr, "follow-up crash after %zu of %zu ops: guest byte "
                 "%#" PRIx64 " changed\n", cs.nr_ops, n, b);
        free (buf);
        return -1;
      }
  }
  free (buf);
  return 0;
}

/* Open writable (a dirty image is repaired), write, flush, check, read
 * back; for a dirty image, also crash during all that.  With repair, a
 * clean image with leaks is repaired explicitly first (as the plugin's
 * check=repair does), and then it is crashed too.
 */
static int
followup (struct run *r, const uint8_t *state, size_t size, bool dirty,
          bool repair, bool qemu)
{
  struct qcow2_io *rec = qcow2_io_new_recorder (state, size);
  struct qcow2_image *img;
  struct qcow2_check_result res;
  uint64_t len = 1 + rnd_below (&rng_state,
                                r->w->max_len < 70000 ? r->w->max_len : 70000);
  uint64_t off = rnd_below (&rng_state, r->w->size - len + 1);
  uint8_t *data = malloc (len), *back = malloc (len), *now;
  size_t now_size;
  int ret = -1;

  assert (rec && data && back);
  img = open_mem (r, rec, false);
  if (img == NULL)
    goto out;
  if (repair) {
    if (qcow2_check (img, true, &res) == -1 || res.errors) {
      fprintf (stderr, "follow-up: explicit repair failed: %m\n");
      qcow2_close (img);
      goto out;
    }
    r->repairs++;
  }
  rnd_fill (data, len);
  if (qcow2_pwrite (img, data, len, off, 0) == -1 ||
      qcow2_flush (img) == -1 ||
      qcow2_check (img, false, &res) == -1) {
    fprintf (stderr, "follow-up: write/flush/check failed: %m\n");
    qcow2_close (img);
    goto out;
  }
  if (res.corruptions || res.errors || ((dirty || repair) && res.leaks)) {
    fprintf (stderr, "follow-up: check after the write%s: %" PRIu64
             " corruptions, %" PRIu64 " leaks, %" PRIu64 " errors\n",
             dirty ? " (and repair)" : "", res.corruptions, res.leaks,
             res.errors);
    qcow2_close (img);
    goto out;
  }
  if (qcow2_pread (img, back, len, off) == -1 ||
      memcmp (data, back, len) != 0) {
    fprintf (stderr, "follow-up: write does not read back\n");
    qcow2_close (img);
    goto out;
  }
  if (qemu) {
    now = rec_live (rec, &now_size);
    if (qemu_check (r, now, now_size) == -1) {
      free (now);
      qcow2_close (img);
      goto out;
    }
    free (now);
  }
  if (qcow2_close (img) == -1)
    goto out;
  if ((dirty || repair) && crash_followup (r, rec, data, off, len) == -1)
    goto out;
  r->followups++;
  ret = 0;
 out:
  qcow2_recorder_free (rec);
  free (data);
  free (back);
  return ret;
}

/* The extents callback of is_dirty: all of it dirty? */
static int
all_dirty (void *opaque, uint64_t off, uint64_t len, uint32_t type)
{
  if (type != 0)
    *(bool *) opaque = false;
  return 0;
}

/* Is guest [off, off+len) all dirty in bitmap i? */
static bool
is_dirty (struct qcow2_image *img, uint32_t i, uint64_t off, uint64_t len)
{
  bool dirty = true;

  assert (qcow2_bitmap_extents (img, i, len, off, false, all_dirty,
                                &dirty) == 0);
  return dirty;
}

/* The bitmap rule in a crash state (BITMAPS): an enabled bitmap not in
 * use covers every request that had returned by the crash (a request
 * returns only after the first write marked it in use, so this holds
 * only once the close stored it) and every guest byte that changed;
 * the disabled one is not in use and still has exactly its bits.
 * With any bit of the qemu-io writes lost, it fails too.
 */
static int
check_bitmaps (struct run *r, struct qcow2_image *img,
               const struct qcow2_crash_state *cs)
{
  uint64_t gsize = r->w->size, b;
  uint32_t i;
  size_t g, k;

  assert (qcow2_nr_bitmaps (img) == 3);
  for (i = 0; i < 3; i++) {
    struct qcow2_bitmap_info info;

    assert (qcow2_bitmap_info (img, i, &info) == 0);
    assert (strcmp (info.name, bitmap_list[i].name) == 0);
    if (info.in_use) {
      if (!bitmap_list[i].enabled) {
        fprintf (stderr, "the disabled bitmap is in use\n");
        return -1;
      }
      continue;
    }
    for (k = 0; k < sizeof bitmap_pre / sizeof bitmap_pre[0]; k++)
      if (!is_dirty (img, i, bitmap_pre[k][0], bitmap_pre[k][1])) {
        fprintf (stderr, "bitmap %s lost the bits set before\n", info.name);
        return -1;
      }
    if (!bitmap_list[i].enabled) {
      /* Nothing else: the clean parts between and around. */
      if (is_dirty (img, i, 0, 65536) || is_dirty (img, i, 2 << 20, 65536)) {
        fprintf (stderr, "the disabled bitmap changed\n");
        return -1;
      }
      continue;
    }
    for (g = 0; g < r->nr_gops; g++) {
      const struct gop *op = &r->gops[g];
      if (op->kind != G_FLUSH && op->rec_end <= cs->nr_ops &&
          !is_dirty (img, i, op->off, op->len)) {
        fprintf (stderr, "bitmap %s: request [%#" PRIx64 ", +%" PRIu64
                 ") returned but is clean\n", info.name, op->off, op->len);
        return -1;
      }
    }
    for (b = 0; b < gsize; b++)
      if (r->got[b] != r->initial_guest[b] && !is_dirty (img, i, b, 1)) {
        fprintf (stderr, "bitmap %s: guest byte %#" PRIx64 " changed but "
                 "is clean\n", info.name, b);
        return -1;
      }
  }
  return 0;
}

static void
check_state (struct run *r, struct qcow2_replay *rp,
             const struct qcow2_crash_state *cs, size_t np,
             bool do_followup, bool do_qemu)
{
  size_t size;
  uint8_t *state = qcow2_replay_crash (rp, cs, &size);
  uint64_t inc, b, gsize = r->w->size;
  struct qcow2_image *img;
  struct qcow2_check_result res;
  bool dirty;

  assert (state);
  r->states++;
  advance_durable (r, cs->nr_ops);
  inc = header_incompat_bits (state, size);
  dirty = inc & QCOW2_INCOMPAT_DIRTY;
  if (inc & QCOW2_INCOMPAT_CORRUPT) {
    describe (r, cs, np, state, size, "marked corrupt");
    goto out;
  }
  if (dirty && !strstr (r->w->opts, "lazy_refcounts=on")) {
    describe (r, cs, np, state, size, "dirty without lazy refcounts");
    goto out;
  }
  img = open_mem (r, qcow2_io_new_memory (state, size), true);
  if (img == NULL) {
    describe (r, cs, np, state, size, "does not open");
    goto out;
  }
  if (qcow2_check (img, false, &res) == -1) {
    describe (r, cs, np, state, size, "check fails");
    qcow2_close (img);
    goto out;
  }
  if (res.errors || (res.corruptions && !dirty)) {
    fprintf (stderr, "check: %" PRIu64 " corruptions, %" PRIu64 " errors\n",
             res.corruptions, res.errors);
    describe (r, cs, np, state, size, "corrupt");
    qcow2_close (img);
    goto out;
  }
  if (res.corruptions)
    r->dirty_stale++;
  if (res.leaks)
    r->leaky++;
  if (qcow2_pread (img, r->got, gsize, 0) == -1) {
    describe (r, cs, np, state, size, "read fails");
    qcow2_close (img);
    goto out;
  }
  if (r->w->setup == BITMAPS && check_bitmaps (r, img, cs) == -1) {
    describe (r, cs, np, state, size, "bitmaps");
    qcow2_close (img);
    goto out;
  }
  qcow2_close (img);
  for (b = 0; b < gsize; b += 4096) {
    uint64_t n = gsize - b < 4096 ? gsize - b : 4096, e;
    if (memcmp (r->got + b, r->durable + b, n) == 0)
      continue;
    for (e = b; e < b + n; e++)
      if (r->got[e] != r->durable[e] &&
          !byte_ok (r, cs->nr_ops, e, r->got[e])) {
        fprintf (stderr, "guest byte %#" PRIx64 " reads %#x, durable %#x\n",
                 e, r->got[e], r->durable[e]);
        describe (r, cs, np, state, size, "acknowledged data lost");
        goto out;
      }
  }
  if (do_qemu && qemu_check (r, state, size) == -1) {
    describe (r, cs, np, state, size, "qemu-img check");
    goto out;
  }
  if (do_followup &&
      followup (r, state, size, dirty, !dirty && res.leaks && chance (0.5),
                do_qemu) == -1)
    describe (r, cs, np, state, size, "write after the crash");
 out:
  free (state);
}

/* ---- enumerating crash states ---- */

#define ENUM_MAX_PENDING 8      /* all 2^n subsets up to this */
#define RANDOM_SUBSETS 24
#define TORN_SUBSETS 12

/* The crash points that end an epoch: every flush record, and the end. */
static size_t
epoch_ends (struct run *r, size_t **ends)
{
  size_t n = qcow2_recorder_nr_ops (r->rec), i, k = 0;

  *ends = malloc ((n + 1) * sizeof **ends);
  assert (*ends);
  for (i = 0; i < n; i++)
    if (qcow2_recorder_op (r->rec, i)->kind == QCOW2_REC_FLUSH)
      (*ends)[k++] = i;
  (*ends)[k++] = n;
  return k;
}

static uint64_t
states_in_epoch (struct run *r, size_t prev_end, size_t end)
{
  size_t np = qcow2_recorder_pending (r->rec, end, NULL);
  uint64_t n = end - prev_end;          /* in-order crash points */

  if (np <= ENUM_MAX_PENDING)
    n += UINT64_C(1) << np;
  else
    n += RANDOM_SUBSETS;
  return n + TORN_SUBSETS;
}

/* Sampling: each candidate state is checked with probability p. */
struct sampler {
  double p;
  double p_followup, p_qemu;
};

static bool
chance (double p)
{
  return (rnd (&rng_state) >> 11) * (1.0 / 9007199254740992.0) < p;
}

static void
maybe_check (struct run *r, struct qcow2_replay *rp, struct sampler *s,
             const struct qcow2_crash_state *cs, size_t np)
{
  if (!chance (s->p))
    return;
  check_state (r, rp, cs, np, chance (s->p_followup), chance (s->p_qemu));
}

static void
crash_epoch (struct run *r, struct qcow2_replay *rp, struct sampler *s,
             size_t prev_end, size_t end)
{
  size_t *pending, np, T, j, k;
  bool *keep;
  double saved_p;
  struct qcow2_crash_state cs = { .torn = SIZE_MAX };

  np = qcow2_recorder_pending (r->rec, end, NULL);
  pending = malloc ((np + 1) * sizeof *pending);
  keep = malloc (np + 1);
  assert (pending && keep);
  qcow2_recorder_pending (r->rec, end, pending);

  /* Epochs that rewrite the header (refcount table moved, dirty bit,
   * autoclear bits) are rare and interesting: check all their states.
   * Not so in the cache=none pass, where every write into the first
   * block (with 512-byte clusters: the L1 and refcount tables too)
   * rewrites the header with its own bytes.
   */
  saved_p = s->p;
  for (j = 0; j < np && !r->w->direct; j++) {
    const struct qcow2_rec_op *op = qcow2_recorder_op (r->rec, pending[j]);
    if (op->kind == QCOW2_REC_WRITE && op->offset < 512) {
      s->p = 1;
      r->header_epochs++;
      break;
    }
  }

  /* In order: the crash after each op, everything before it landed. */
  for (T = prev_end + 1; T <= end; T++) {
    size_t n = qcow2_recorder_pending (r->rec, T, NULL);
    memset (keep, 1, np + 1);
    cs.nr_ops = T;
    cs.keep = keep;
    maybe_check (r, rp, s, &cs, n);
  }
  cs.nr_ops = end;
  /* Out of order: subsets of what is pending at the end of the epoch. */
  if (np <= ENUM_MAX_PENDING) {
    uint64_t m;
    for (m = 0; m < (UINT64_C(1) << np); m++) {
      for (j = 0; j < np; j++)
        keep[j] = (m >> j) & 1;
      maybe_check (r, rp, s, &cs, np);
    }
  }
  else {
    for (k = 0; k < RANDOM_SUBSETS; k++) {
      unsigned pct = 10 + rnd_below (&rng_state, 81);
      for (j = 0; j < np; j++)
        keep[j] = rnd_below (&rng_state, 100) < pct;
      maybe_check (r, rp, s, &cs, np);
    }
  }
  /* Torn: one landed write of more than a sector is cut short. */
  for (k = 0; k < TORN_SUBSETS && np > 0; k++) {
    size_t t = rnd_below (&rng_state, np);
    const struct qcow2_rec_op *op = qcow2_recorder_op (r->rec, pending[t]);
    if (op->kind != QCOW2_REC_WRITE || op->len <= 512)
      continue;
    for (j = 0; j < np; j++)
      keep[j] = rnd_below (&rng_state, 2);
    keep[t] = true;
    cs.torn = t;
    cs.torn_len = 512 * (1 + rnd_below (&rng_state, (op->len - 1) / 512));
    maybe_check (r, rp, s, &cs, np);
    cs.torn = SIZE_MAX;
  }
  s->p = saved_p;
  free (pending);
  free (keep);
}

static void
test_workload (const struct workload *w)
{
  struct run r = { .w = w };
  char path[512];
  uint8_t *file;
  size_t size, *ends, nends, i;
  struct qcow2_image *img;
  struct qcow2_replay *rp;
  struct sampler s;
  uint64_t candidates = 0,
    budget = (w->budget ? w->budget : 600) * states_scale;
  time_t t0 = time (NULL);
  uint8_t file0[512];

  snprintf (r.dir, sizeof r.dir, "%s/crash-XXXXXX",
            getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp");
  assert (mkdtemp (r.dir));
  make_image (&r);
  snprintf (path, sizeof path, "%s/disk.qcow2", r.dir);
  file = read_file (path, &size);
  r.rec = qcow2_io_new_recorder (file, size);
  assert (r.rec);
  memcpy (file0, file, sizeof file0);
  free (file);

  img = open_mem (&r, r.rec, false);
  assert (img);
  assert (qcow2_get_size (img) == w->size);
  r.initial_guest = malloc (w->size);
  r.durable = malloc (w->size);
  r.got = malloc (w->size);
  assert (r.initial_guest && r.durable && r.got);
  assert (qcow2_pread (img, r.initial_guest, w->size, 0) == 0);
  memcpy (r.durable, r.initial_guest, w->size);
  compressible = w->compress;
  run_workload (&r, img);
  compressible = false;
  if (w->compress) {
    /* The point of the workload: it wrote compressed clusters (with
     * PLAIN, all of them are its own).
     */
    size_t n;
    uint8_t *now = rec_live (r.rec, &n);
    char live[512];
    snprintf (live, sizeof live, "%s/live.qcow2", r.dir);
    write_file (live, now, n);
    free (now);
    sys ("qemu-img check --output=json %s | "
         "grep '\"compressed-clusters\": [1-9]' | sed 's/^ */%s: at the end: /'",
         live, w->name);
  }
  if (strncmp (w->name, "reftable-grow", 13) == 0) {
    /* The point of the workload: the refcount table moved and grew. */
    size_t n;
    uint8_t *now = rec_live (r.rec, &n);
    uint32_t before, after;
    memcpy (&before, file0 + 56, 4);
    memcpy (&after, now + 56, 4);
    size_t k, hw = 0;
    for (k = 0; k < qcow2_recorder_nr_ops (r.rec); k++) {
      const struct qcow2_rec_op *op = qcow2_recorder_op (r.rec, k);
      if (op->kind == QCOW2_REC_WRITE && op->offset < 512)
        hw++;
    }
    printf ("%s: refcount table %" PRIu32 " -> %" PRIu32 " clusters, "
            "%zu header writes\n",
            w->name, be32toh (before), be32toh (after), hw);
    assert (be32toh (after) > be32toh (before));
    free (now);
  }

  nends = epoch_ends (&r, &ends);
  for (i = 0; i < nends; i++)
    candidates += states_in_epoch (&r, i ? ends[i - 1] : 0, ends[i]);
  s.p = candidates > budget ? (double) budget / candidates : 1;
  s.p_followup = 0.1;
  s.p_qemu = 12.0 * scale / (600 * scale);  /* about 12 per 600 states */

  rp = qcow2_replay_new (r.rec);
  assert (rp);
  for (i = 0; i < nends; i++)
    crash_epoch (&r, rp, &s, i ? ends[i - 1] : 0, ends[i]);
  /* Always: the final state and one qemu-img check of it. */
  {
    struct qcow2_crash_state cs = { .nr_ops = SIZE_MAX, .torn = SIZE_MAX };
    check_state (&r, rp, &cs, 0, true, true);
  }

  printf ("%-21s %3zu requests, %4zu host writes+flushes (%3zu flushes): "
          "%4" PRIu64 " states of %5" PRIu64 ", %3" PRIu64 " leaky, %"
          PRIu64 " dirty+stale, %3" PRIu64 " follow-ups (%2" PRIu64
          " repairs, +%3" PRIu64 " crashes in them), %2" PRIu64
          " qemu-img, %" PRIu64
          " header epochs, %" PRIu64 " failures, %lds\n",
          w->name, r.nr_gops, qcow2_recorder_nr_ops (r.rec), nends - 1,
          r.states, candidates, r.leaky, r.dirty_stale, r.followups,
          r.repairs, r.nested, r.qemu_checks, r.header_epochs, r.failures,
          (long) (time (NULL) - t0));
  fflush (stdout);
  total_states += r.states;
  total_leaky += r.leaky;
  total_dirty_stale += r.dirty_stale;
  total_followups += r.followups;
  total_nested += r.nested;
  total_qemu_checks += r.qemu_checks;
  total_failures += r.failures;

  qcow2_replay_free (rp);
  qcow2_recorder_free (r.rec);
  for (i = 0; i < r.nr_gops; i++)
    free (r.gops[i].data);
  free (r.gops);
  free (ends);
  free (r.initial_guest);
  free (r.durable);
  free (r.got);
  sys ("rm -rf %s", r.dir);
}

/* The recorder itself: which bytes a crash state holds. */
static void
test_recorder (void)
{
  uint8_t init[1024], buf[1024], one = 'E', *st;
  struct qcow2_io *rec;
  struct qcow2_replay *rp;
  struct qcow2_crash_state cs = { .nr_ops = 6, .torn = SIZE_MAX };
  bool keep[3];
  size_t size, pend[3];

  memset (init, 'A', sizeof init);
  rec = qcow2_io_new_recorder (init, sizeof init);
  assert (rec);
  memset (buf, 'B', 512);
  assert (io_pwrite (rec, buf, 512, 0) == 0);             /* op 0 */
  memset (buf, 'C', 1024);
  assert (io_pwrite (rec, buf, 1024, 1024) == 0);         /* op 1 */
  assert (io_flush (rec) == 0);                           /* op 2 */
  memset (buf, 'D', 1024);
  assert (io_pwrite (rec, buf, 1024, 0) == 0);            /* op 3 */
  assert (io_truncate (rec, 1536) == 0);                  /* op 4 */
  assert (io_pwrite (rec, &one, 1, 4096) == 0);           /* op 5 */
  assert (io_size (rec) == 4097);
  assert (io_pread (rec, buf, 8, 0) == 0 && buf[0] == 'D');
  assert (qcow2_recorder_nr_ops (rec) == 6);
  assert (qcow2_recorder_stable (rec, 2) == 0);
  assert (qcow2_recorder_stable (rec, 3) == 2);
  assert (qcow2_recorder_stable (rec, 6) == 2);
  assert (qcow2_recorder_pending (rec, 6, pend) == 3);
  assert (pend[0] == 3 && pend[1] == 4 && pend[2] == 5);
  assert (qcow2_recorder_pending (rec, 2, NULL) == 2);

  /* Nothing pending landed: the state at the flush. */
  rp = qcow2_replay_new (rec);
  assert (rp);
  cs.keep = NULL;
  st = qcow2_replay_crash (rp, &cs, &size);
  assert (st && size == 2048);
  assert (st[0] == 'B' && st[511] == 'B' && st[512] == 'A' &&
          st[1023] == 'A' && st[1024] == 'C' && st[2047] == 'C');
  free (st);
  /* Op 3 torn after one sector; the truncate and op 5 landed. */
  keep[0] = keep[1] = keep[2] = true;
  cs.keep = keep;
  cs.torn = 0;
  cs.torn_len = 700;                    /* rounded down to 512 */
  st = qcow2_replay_crash (rp, &cs, &size);
  assert (st && size == 4097);
  assert (st[0] == 'D' && st[511] == 'D' && st[512] == 'A' &&
          st[1024] == 'C' && st[1535] == 'C' && st[1536] == 0 &&
          st[4095] == 0 && st[4096] == 'E');
  free (st);
  /* Only op 5. */
  keep[0] = keep[1] = false;
  cs.torn = SIZE_MAX;
  st = qcow2_replay_crash (rp, &cs, &size);
  assert (st && size == 4097 && st[0] == 'B' && st[2047] == 'C' &&
          st[2048] == 0 && st[4096] == 'E');
  free (st);
  /* The running buffer only goes forward... */
  cs.nr_ops = 1;
  assert (qcow2_replay_crash (rp, &cs, &size) == NULL && errno == EINVAL);
  qcow2_replay_free (rp);
  /* ...but a fresh one can go anywhere: after op 0 only, pending. */
  cs.keep = NULL;
  st = qcow2_recorder_crash (rec, &cs, &size);
  assert (st && size == 1024 && st[0] == 'A');
  free (st);
  keep[0] = true;
  cs.keep = keep;
  st = qcow2_recorder_crash (rec, &cs, &size);
  assert (st && size == 1024 && st[0] == 'B' && st[512] == 'A');
  free (st);
  /* A closed recorder keeps its log until it is freed. */
  io_close (rec);
  assert (qcow2_recorder_nr_ops (rec) == 6);
  qcow2_recorder_free (rec);
}

int
main (void)
{
  const char *only = getenv ("CRASH_TEST_ONLY");
  uint64_t seed = 20260501;
  size_t i;
  bool direct = false;
  uint64_t dio_ops, dio_refused;

  if (getenv ("CRASH_TEST_SCALE"))
    scale = atof (getenv ("CRASH_TEST_SCALE"));
  if (scale <= 0)
    scale = 1;
  states_scale = scale;
  if (getenv ("CRASH_TEST_STATES"))
    states_scale = atof (getenv ("CRASH_TEST_STATES"));
  if (states_scale <= 0)
    states_scale = scale;
  if (getenv ("CRASH_TEST_SEED"))
    seed = strtoull (getenv ("CRASH_TEST_SEED"), NULL, 0);
  if (getenv ("CRASH_TEST_KEEP"))
    keep_dir = getenv ("CRASH_TEST_KEEP");
  if (system ("qemu-img --version >/dev/null 2>&1") != 0 ||
      system ("qemu-io --version >/dev/null 2>&1") != 0) {
    fprintf (stderr, "test-crash: qemu-img and qemu-io are required "
             "(apt-get install qemu-utils)\n");
    return 1;
  }
  /* Errors from the states that are expected to fail to open would
   * flood the log; a failure is described by this test anyway.
   */
  if (getenv ("CRASH_TEST_VERBOSE") == NULL)
    setenv ("QCOW2_QUIET", "1", 0);
  /* Every state allocates a few image-sized buffers: keep them in the
   * heap instead of fresh (page-faulting) mmaps.
   */
  mallopt (M_MMAP_THRESHOLD, 256 << 20);
  mallopt (M_TRIM_THRESHOLD, 512 << 20);
  printf ("test-crash: seed %" PRIu64 ", scale %g, states %g\n",
          seed, scale, states_scale);
  test_recorder ();
  for (i = 0; i < sizeof workloads / sizeof workloads[0]; i++) {
    if (only && strcmp (only, workloads[i].name) != 0)
      continue;
    rng_state = seed + i;
    test_workload (&workloads[i]);
    direct |= workloads[i].direct > 0;
  }
  /* A misaligned request would have failed its guest request already;
   * and the direct workloads did go through the checker.
   */
  qcow2_io_dio_check_totals (&dio_ops, &dio_refused);
  if (direct) {
    printf ("test-crash: cache=none pass: %" PRIu64 " aligned reads and "
            "writes under the direct I/O layer, %" PRIu64 " refused\n",
            dio_ops, dio_refused);
    assert (dio_ops > 0 && dio_refused == 0);
  }
  printf ("test-crash: %" PRIu64 " crash states checked, %" PRIu64
          " with leaks, %" PRIu64 " dirty with stale refcounts, %" PRIu64
          " writable follow-ups (%" PRIu64 " crash states during them), %"
          PRIu64 " qemu-img checks, %" PRIu64 " failures\n",
          total_states, total_leaky, total_dirty_stale, total_followups,
          total_nested, total_qemu_checks, total_failures);
  printf ("test-crash: %" PRIu64 " requests of the threaded workloads "
          "ran wholly inside a guest flush\n", total_inside_flush);
  return total_failures ? 1 : 0;
}
