/* nbdkit-qcow2: unit test of core/overlap-map.c.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Every change goes to the map and to a naive model (a uint16_t per
 * cluster over a few segments of the cluster space), and the two are
 * compared cluster by cluster; the model also says how many runs and
 * windows the map must hold.  The map's own invariant checker (which
 * also checks that every window's format is the smallest) runs after
 * every step.  Fixed cases first (merging, splitting, window and
 * sub-window edges, several types a cluster, entry formats growing and
 * shrinking, the regrain of coarse windows, indexes near 2^40, 2^47
 * and 2^64, memory, and the 2014 bound on preallocated layouts), then
 * millions of random operations, for several cluster sizes (the window
 * size follows cluster_bits).
 *
 * Environment: OVERLAP_TEST_SEED (default fixed, printed) and
 * OVERLAP_TEST_OPS (random operations of the main configuration,
 * default 2000000; the others run a quarter or an eighth, see configs)
 * so a failure reproduces and valgrind can run a short version;
 * OVERLAP_TEST_ONLY (fixed, faults or random) runs one part;
 * OVERLAP_TEST_FAULT_STEP=K (default 1): the one-at-a-time allocation
 * failure scenarios fail each of the first 8 allocations of an
 * operation, then only every K-th and the last (the sanitizer pass in
 * CI uses 4: each try rebuilds and verifies a whole model).
 *
 * It is built with its own copy of the map (core/overlap-map.c and
 * overlap-map-update.c) and its test hooks (core/overlap-map-check.c:
 * overlap_map_check and overlap_map_tune, which the library leaves
 * out), compiled with OVERLAP_MAP_TEST_HOOKS.  As
 * test-overlap-map-faults, also built with
 * -DOVERLAP_MAP_FAULT_INJECTION (all the files), it makes allocations
 * fail (only that part runs, unless OVERLAP_TEST_ONLY says otherwise),
 * checks that the map stays valid and that each window is updated all
 * or nothing, and checks that overlap_map_memory is exactly what the
 * map has malloc'd and not freed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <time.h>

#undef NDEBUG
#include <assert.h>

#include "overlap.h"

/* Introspection, defined in overlap-map.c but not in overlap.h. */
extern const char *overlap_map_check (const struct overlap_map *m);
extern int overlap_map_tune (struct overlap_map *m, unsigned fine_bits,
                             unsigned runs_cap);

#define A OV_ACTIVE_L2
#define B OV_REFCOUNT_BLOCK
#define C OV_INACTIVE_L2

/* The configuration under test: maps are made with cluster_bits CB,
 * then tuned if TUNE_FINE is not 0.  W, SUB: clusters a window and a
 * sub-window of a new map.
 */
static unsigned CB;
static unsigned TUNE_FINE, TUNE_CAP;
static uint64_t W, SUB;

/* Deterministic PRNG (xorshift64*) so failures reproduce. */
static uint64_t rng_state;

static uint64_t
rng (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * UINT64_C (2685821657736338717);
}

/* 0 <= result < n */
static uint64_t
rnd (uint64_t n)
{
  return rng () % n;
}

static uint64_t
min64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

static struct overlap_map_stats
stats (const struct overlap_map *m)
{
  struct overlap_map_stats st;

  assert (overlap_map_get_stats (m, &st, sizeof st) == 0);
  assert (st.bytes == overlap_map_memory (m));
  return st;
}

static void
check (const struct overlap_map *m)
{
  const char *err = overlap_map_check (m);

  if (err) {
    fprintf (stderr, "overlap map invariant broken: %s\n", err);
    abort ();
  }
}

static struct overlap_map *
new_map (void)
{
  struct overlap_map *m = overlap_map_new (CB);

  assert (m != NULL);
  if (TUNE_FINE)
    assert (overlap_map_tune (m, TUNE_FINE, TUNE_CAP) == 0);
  return m;
}

/* Switch to the configuration (cluster_bits, and 0 or a tuning). */
static void
configure (unsigned cluster_bits, unsigned fine, unsigned cap)
{
  struct overlap_map *m;
  struct overlap_map_stats st;

  CB = cluster_bits;
  TUNE_FINE = fine;
  TUNE_CAP = cap;
  m = new_map ();
  st = stats (m);
  W = UINT64_C (1) << st.window_bits;
  SUB = UINT64_C (1) << st.sub_bits;
  overlap_map_free (m);
  printf ("\n=== cluster_bits %u: windows of %" PRIu64 " clusters, "
          "sub-windows of %" PRIu64, CB, W, SUB);
  if (fine)
    printf (", tuned: fine windows of %u clusters, at most %u runs "
            "a coarse window", 1u << fine, cap);
  printf (" ===\n");
}

/*----------------------------------------------------------------------
 * Counting the map's allocations (fault injection builds only): the
 * map's malloc, calloc, realloc and free come here.
 */

#ifdef OVERLAP_MAP_FAULT_INJECTION
static bool fail_now (void);

#define LIVE_BITS 20
static struct { void *p; size_t size; } live[1 << LIVE_BITS];
static size_t live_bytes;

static size_t
live_slot (void *p)
{
  size_t i = ((uintptr_t) p * UINT64_C (0x9e3779b97f4a7c15)) >> (64 - LIVE_BITS);

  while (live[i].p != NULL && live[i].p != p)
    i = (i + 1) & ((1 << LIVE_BITS) - 1);
  return i;
}

static void
live_add (void *p, size_t size)
{
  size_t i = live_slot (p);

  assert (live[i].p == NULL);
  live[i].p = p;
  live[i].size = size;
  live_bytes += size;
}

/* Remove p, keeping the probe chains (backward shift). */
static void
live_del (void *p)
{
  size_t mask = (1 << LIVE_BITS) - 1, hole = live_slot (p), j = hole, home;

  assert (live[hole].p == p);
  live_bytes -= live[hole].size;
  for (;;) {
    j = (j + 1) & mask;
    if (live[j].p == NULL)
      break;
    home = ((uintptr_t) live[j].p * UINT64_C (0x9e3779b97f4a7c15))
      >> (64 - LIVE_BITS);
    if (((j - home) & mask) >= ((j - hole) & mask)) {
      live[hole] = live[j];
      hole = j;
    }
  }
  live[hole].p = NULL;
}

void *
fault_malloc (size_t size)
{
  void *p;

  if (fail_now ())
    return NULL;
  p = malloc (size);
  if (p)
    live_add (p, size);
  return p;
}

void *
fault_calloc (size_t nmemb, size_t size)
{
  void *p;

  if (fail_now ())
    return NULL;
  p = calloc (nmemb, size);
  if (p)
    live_add (p, nmemb * size);
  return p;
}

void *
fault_realloc (void *ptr, size_t size)
{
  void *p;
  size_t old = 0;

  if (fail_now ())
    return NULL;
  /* Forget ptr first (the allocator may hand it out again at once). */
  if (ptr) {
    old = live[live_slot (ptr)].size;
    live_del (ptr);
  }
  p = realloc (ptr, size);
  if (p)
    live_add (p, size);
  else if (ptr)
    live_add (ptr, old);
  return p;
}

void
fault_free (void *ptr)
{
  if (ptr)
    live_del (ptr);
  free (ptr);
}
#endif /* OVERLAP_MAP_FAULT_INJECTION */

/* With the counting allocator, when m is the only map: what the map
 * says it uses is what it has allocated.
 */
static void
check_memory_honest (const struct overlap_map *m)
{
#ifdef OVERLAP_MAP_FAULT_INJECTION
  if (overlap_map_memory (m) != live_bytes) {
    fprintf (stderr, "overlap_map_memory %zu, but %zu bytes allocated\n",
             overlap_map_memory (m), live_bytes);
    abort ();
  }
#endif
}

/*----------------------------------------------------------------------
 * The model: segments of the cluster space with a uint16_t a cluster.
 * Changes must stay inside one segment.
 */

#define MAX_SEGS 8

struct seg {
  uint64_t base;
  uint64_t len;
  uint16_t *ref;
};

struct model {
  struct overlap_map *m;
  size_t nsegs;
  struct seg segs[MAX_SEGS];
};

static void
model_init (struct model *md)
{
  memset (md, 0, sizeof *md);
  md->m = new_map ();
}

static void
model_seg (struct model *md, uint64_t base, uint64_t len)
{
  struct seg *s = &md->segs[md->nsegs++];
  size_t k;

  assert (md->nsegs <= MAX_SEGS);
  assert (len > 0 && base + (len - 1) >= base);
  /* Segments may not touch: the run and window counts need a cluster
   * without metadata around each.
   */
  for (k = 0; k + 1 < md->nsegs; k++)
    assert (base > md->segs[k].base + md->segs[k].len ||
            base + len < md->segs[k].base);
  s->base = base;
  s->len = len;
  s->ref = calloc (len, sizeof (uint16_t));
  assert (s->ref != NULL);
}

static void
model_free (struct model *md)
{
  size_t i;

  for (i = 0; i < md->nsegs; i++)
    free (md->segs[i].ref);
  overlap_map_free (md->m);
}

/* The segment holding all of [first, first+n). */
static struct seg *
seg_of (struct model *md, uint64_t first, uint64_t n)
{
  size_t i;

  for (i = 0; i < md->nsegs; i++) {
    struct seg *s = &md->segs[i];

    if (first >= s->base && first - s->base < s->len &&
        n <= s->len - (first - s->base))
      return s;
  }
  fprintf (stderr, "range %#" PRIx64 "+%" PRIu64 " not in the model\n",
           first, n);
  abort ();
}

static void
ref_apply (struct seg *s, uint64_t first, uint64_t n,
           unsigned clear, unsigned set)
{
  uint64_t i;

  for (i = first - s->base; i < first - s->base + n; i++)
    s->ref[i] = (s->ref[i] & ~clear) | set;
}

static void
model_add (struct model *md, uint64_t first, uint64_t n, unsigned t)
{
  assert (overlap_map_add (md->m, first, n, t) == 0);
  ref_apply (seg_of (md, first, n), first, n, 0, t);
}

static void
model_remove (struct model *md, uint64_t first, uint64_t n, unsigned t)
{
  assert (overlap_map_remove (md->m, first, n, t) == 0);
  ref_apply (seg_of (md, first, n), first, n, t, 0);
}

/* The map's answer for one cluster. */
static unsigned
map_get (struct overlap_map *m, uint64_t c)
{
  uint64_t hit = 0;
  unsigned t = overlap_map_query (m, c, 1, 0xffff, &hit);

  assert (t == 0 || hit == c);
  return t;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

  return x < y ? -1 : x > y;
}

/* The runs the map must hold: maximal runs of equal types inside
 * sub-windows.  And the windows.  With the map's geometry now (it
 * changes at a regrain).
 */
static void
model_counts (struct model *md, size_t *runs, size_t *windows)
{
  struct overlap_map_stats st = stats (md->m);
  uint64_t smask = (UINT64_C (1) << st.sub_bits) - 1, i, c, wi;
  uint64_t *wins = NULL;
  size_t k, nw = 0, cap = 0;

  *runs = *windows = 0;
  for (k = 0; k < md->nsegs; k++) {
    struct seg *s = &md->segs[k];

    for (i = 0; i < s->len; i++) {
      c = s->base + i;
      if (s->ref[i] == 0)
        continue;
      if (i == 0 || s->ref[i - 1] != s->ref[i] || (c & smask) == 0)
        (*runs)++;
      wi = c >> st.window_bits;
      if (nw == 0 || wins[nw - 1] != wi) {
        if (nw == cap) {
          cap = cap ? 2 * cap : 64;
          wins = realloc (wins, cap * sizeof *wins);
          assert (wins != NULL);
        }
        wins[nw++] = wi;
      }
    }
  }
  if (nw > 0) {
    qsort (wins, nw, sizeof *wins, cmp_u64);
    *windows = 1;
    for (k = 1; k < nw; k++)
      *windows += wins[k] != wins[k - 1];
  }
  free (wins);
}

static void
expect_counts (struct model *md)
{
  struct overlap_map_stats st = stats (md->m);
  size_t runs, windows;

  model_counts (md, &runs, &windows);
  if (st.runs != runs || st.windows != windows) {
    fprintf (stderr, "map has %zu runs in %zu windows, the model says "
             "%zu in %zu\n", st.runs, st.windows, runs, windows);
    abort ();
  }
}

/* The map holds the runs the model says; and n of them if the test's
 * ranges fit in sub-windows at least min_sub clusters long.
 */
static void
expect_runs (struct model *md, size_t n, uint64_t min_sub)
{
  struct overlap_map_stats st = stats (md->m);

  expect_counts (md);
  /* Literally, if no regrain changed the geometry. */
  if (UINT64_C (1) << st.sub_bits == SUB && SUB >= min_sub && st.runs != n) {
    fprintf (stderr, "%zu runs, expected %zu\n", stats (md->m).runs, n);
    abort ();
  }
}

/* What the model says a query of [first, last] should return.  The
 * range may cover several segments.
 */
static unsigned
model_answer (struct model *md, uint64_t first, uint64_t last,
              unsigned mask, uint64_t *hit)
{
  uint64_t best = UINT64_MAX, lo, hi, i;
  unsigned t = 0;
  size_t k;

  for (k = 0; k < md->nsegs; k++) {
    struct seg *s = &md->segs[k];
    uint64_t slast = s->base + (s->len - 1);

    if (last < s->base || first > slast)
      continue;
    lo = first > s->base ? first - s->base : 0;
    hi = last < slast ? last - s->base : s->len - 1;
    for (i = lo; i <= hi; i++) {
      if ((s->ref[i] & mask) == 0)
        continue;
      if (s->base + i < best)
        best = s->base + i;
      t |= s->ref[i] & mask;
    }
  }
  *hit = best;
  return t;
}

/* Compare one query; n must not run past UINT64_MAX. */
static void
model_query (struct model *md, uint64_t first, uint64_t n, unsigned mask)
{
  uint64_t want_hit, hit = 12345;
  unsigned want, got;

  want = model_answer (md, first, first + (n - 1), mask, &want_hit);
  got = overlap_map_query (md->m, first, n, mask, &hit);
  if (got != want || (want && hit != want_hit)) {
    fprintf (stderr, "query %#" PRIx64 "+%" PRIu64 " mask %#x: "
             "got %#x hit %#" PRIx64 ", want %#x hit %#" PRIx64 "\n",
             first, n, mask, got, hit, want, want_hit);
    abort ();
  }
  if (want == 0)
    assert (hit == 12345);      /* untouched without a hit */
}

/* Everything: invariants, counts, each cluster, and the whole space
 * at once.
 */
static void
model_verify (struct model *md)
{
  size_t k;
  uint64_t i, hit, want_hit;
  unsigned got, want;

  check (md->m);
  check_memory_honest (md->m);
  expect_counts (md);
  for (k = 0; k < md->nsegs; k++) {
    struct seg *s = &md->segs[k];

    for (i = 0; i < s->len; i++) {
      got = map_get (md->m, s->base + i);
      if (got != s->ref[i]) {
        fprintf (stderr, "cluster %#" PRIx64 ": map %#x, model %#x\n",
                 s->base + i, got, s->ref[i]);
        abort ();
      }
    }
  }
  /* Nothing outside the segments (n = UINT64_MAX misses the last
   * cluster, so ask for it separately).
   */
  want = model_answer (md, 0, UINT64_MAX, OV_ALL, &want_hit);
  got = overlap_map_query (md->m, 0, UINT64_MAX, OV_ALL, &hit);
  got |= overlap_map_query (md->m, UINT64_MAX, 1, OV_ALL, want ? NULL : &hit);
  assert (got == want);
  if (want)
    assert (hit == want_hit);
}

/*----------------------------------------------------------------------
 * Fixed cases.
 */

/* The map holds the windows the model says, and n of them if windows
 * are at least min_w clusters.
 */
static void
expect_windows (struct model *md, size_t n, uint64_t min_w)
{
  expect_counts (md);
  if ((UINT64_C (1) << stats (md->m).window_bits) == W && W >= min_w &&
      stats (md->m).windows != n) {
    fprintf (stderr, "%zu windows, expected %zu\n", stats (md->m).windows, n);
    abort ();
  }
}

/* Positions up to 1024 in these three: runs counted literally when
 * sub-windows are at least that long.
 */
#define BIG 1024

static void
test_basic (void)
{
  struct model md;
  size_t empty;
  uint64_t hit;

  printf ("basic\n");
  model_init (&md);
  model_seg (&md, 0, 4 * W > BIG ? 4 * W : BIG);
  empty = overlap_map_memory (md.m);
  assert (overlap_map_query (md.m, 0, UINT64_MAX, OV_ALL, &hit) == 0);
  assert (overlap_map_remove (md.m, 0, 100, OV_ALL) == 0);

  model_add (&md, 10, 10, A);
  expect_windows (&md, 1, BIG);
  expect_runs (&md, 1, BIG);
  model_query (&md, 0, 10, OV_ALL);
  model_query (&md, 5, 6, OV_ALL);
  model_query (&md, 19, 1, OV_ALL);
  model_query (&md, 20, 100, OV_ALL);
  model_query (&md, 0, 100, B);
  assert (overlap_map_query (md.m, 0, 100, OV_ALL, NULL) == A);
  assert (overlap_map_query (md.m, 10, 0, OV_ALL, &hit) == 0);
  assert (overlap_map_query (md.m, 10, 1, 0, &hit) == 0);
  model_verify (&md);

  /* No-ops. */
  model_add (&md, 30, 0, A);
  model_add (&md, 30, 5, 0);
  model_remove (&md, 30, 5, A);
  model_remove (&md, 10, 10, B);
  expect_windows (&md, 1, BIG);
  expect_runs (&md, 1, BIG);
  model_verify (&md);

  model_remove (&md, 10, 10, A);
  assert (stats (md.m).windows == 0);
  assert (overlap_map_memory (md.m) == empty);
  model_verify (&md);
  model_free (&md);
}

static void
test_merge (void)
{
  struct model md;

  printf ("merge and split\n");
  model_init (&md);
  model_seg (&md, 0, 2 * W > BIG ? 2 * W : BIG);

  model_add (&md, 100, 10, A);
  model_add (&md, 110, 10, A);              /* touches after */
  expect_runs (&md, 1, BIG);
  model_add (&md, 90, 10, A);               /* touches before */
  expect_runs (&md, 1, BIG);
  model_add (&md, 121, 5, A);               /* one cluster apart */
  expect_runs (&md, 2, BIG);
  model_add (&md, 120, 1, A);               /* fills the gap */
  expect_runs (&md, 1, BIG);
  model_add (&md, 80, 100, A);              /* overlaps both ends */
  expect_runs (&md, 1, BIG);
  model_add (&md, 95, 10, A);               /* inside */
  expect_runs (&md, 1, BIG);
  model_verify (&md);

  model_add (&md, 130, 1, B);               /* 80..130 A, 130 AB, 131..180 A */
  expect_runs (&md, 3, BIG);
  model_remove (&md, 130, 1, B);            /* merges back */
  expect_runs (&md, 1, BIG);
  model_remove (&md, 150, 1, A);            /* splits */
  expect_runs (&md, 2, BIG);
  model_query (&md, 150, 1, OV_ALL);
  model_query (&md, 149, 3, OV_ALL);
  model_query (&md, 150, 2, OV_ALL);
  model_remove (&md, 150, 1, A);            /* again: nothing */
  expect_runs (&md, 2, BIG);
  model_verify (&md);

  /* 80..120 A, 120..150 AB, 150 B, 151..160 AB, 160..180 A */
  model_add (&md, 120, 40, B);
  expect_runs (&md, 5, BIG);
  model_verify (&md);
  model_remove (&md, 0, 1000, A);           /* 120..160 B, one run */
  expect_runs (&md, 1, BIG);
  model_verify (&md);

  /* Adding the same types over different neighbours. */
  model_add (&md, 200, 10, A);
  model_add (&md, 210, 10, B);
  model_add (&md, 220, 10, A);
  expect_runs (&md, 4, BIG);
  /* 200..210 A, 210..220 AB, 220..230 A */
  model_add (&md, 205, 20, A);
  expect_runs (&md, 4, BIG);
  model_remove (&md, 210, 10, B);           /* 200..230 A */
  expect_runs (&md, 2, BIG);
  model_verify (&md);

  model_remove (&md, 0, md.segs[0].len, OV_ALL);
  assert (stats (md.m).windows == 0);
  model_verify (&md);
  model_free (&md);
}

static void
test_types (void)
{
  struct model md;
  unsigned i;

  printf ("several types a cluster\n");
  model_init (&md);
  model_seg (&md, 0, W > BIG ? W : BIG);

  /* An L2 table shared by the active L1 and a snapshot. */
  model_add (&md, 50, 1, OV_ACTIVE_L2);
  model_add (&md, 50, 1, OV_INACTIVE_L2);
  expect_runs (&md, 1, 1);
  assert (stats (md.m).type_sets == 1);
  assert (map_get (md.m, 50) == (OV_ACTIVE_L2 | OV_INACTIVE_L2));
  model_remove (&md, 50, 1, OV_ACTIVE_L2);
  assert (overlap_map_query (md.m, 50, 1, OV_ACTIVE_L2, NULL) == 0);
  assert (overlap_map_query (md.m, 50, 1, OV_ALL, NULL) == OV_INACTIVE_L2);

  /* The union of a range; the hit is the first cluster with a type in
   * the mask, not the first with any type.
   */
  model_add (&md, 60, 1, OV_REFCOUNT_BLOCK);
  model_query (&md, 40, 30, OV_ALL);
  model_query (&md, 40, 30, OV_REFCOUNT_BLOCK);
  model_query (&md, 40, 30, OV_INACTIVE_L2 | OV_MAIN_HEADER);

  /* Every type on one cluster, then off one at a time. */
  for (i = 0; i < OV_NR_TYPES; i++)
    model_add (&md, 100, 1, 1u << i);
  assert (map_get (md.m, 100) == OV_ALL);
  for (i = 0; i < OV_NR_TYPES; i++) {
    model_remove (&md, 100, 1, 1u << i);
    model_query (&md, 100, 1, OV_ALL);
    model_query (&md, 100, 1, 1u << i);
    check (md.m);
  }
  assert (map_get (md.m, 100) == 0);

  /* Bits above 15 are not stored. */
  assert (overlap_map_add (md.m, 200, 1, 1u << 20) == 0);
  assert (map_get (md.m, 200) == 0);
  model_verify (&md);
  model_free (&md);
}

static void
test_window_edges (void)
{
  struct model md;
  uint64_t nsub = W / SUB;

  printf ("window edges\n");
  model_init (&md);
  model_seg (&md, 0, 4 * W);

  model_add (&md, W - 5, 5, A);             /* ends exactly at an edge */
  expect_windows (&md, 1, 1);
  model_query (&md, W - 1, 2, OV_ALL);
  model_query (&md, W, 1, OV_ALL);
  model_add (&md, W, 5, A);                 /* starts exactly at it */
  expect_windows (&md, 2, 1);
  expect_runs (&md, 2, 8);                  /* runs stop at edges */
  model_query (&md, W - 1, 2, OV_ALL);
  model_query (&md, W, 1, OV_ALL);
  model_verify (&md);
  model_remove (&md, W - 1, 2, A);          /* two clusters over the edge */
  model_verify (&md);
  model_remove (&md, W - 5, 10, A);
  assert (stats (md.m).windows == 0);

  /* One cluster: the last of a window, and the first of the next. */
  model_add (&md, 2 * W - 1, 1, B);
  model_query (&md, W, 2 * W, OV_ALL);
  model_query (&md, 2 * W - 2, 3, OV_ALL);
  model_query (&md, 0, 4 * W, B);
  model_remove (&md, 2 * W - 1, 1, B);
  model_add (&md, 2 * W, 1, B);
  model_query (&md, W, 2 * W, OV_ALL);
  model_query (&md, 2 * W - 2, 3, OV_ALL);
  model_query (&md, 2 * W - 1, 1, OV_ALL);
  model_remove (&md, 2 * W, 1, B);
  assert (stats (md.m).windows == 0);

  /* Spanning three windows: a run a sub-window in the middle one. */
  model_add (&md, W - 3, W + 6, A);
  expect_windows (&md, 3, 1);
  expect_runs (&md, 2 + nsub, 4);
  model_query (&md, W - 4, 1, OV_ALL);
  model_query (&md, W - 3, 1, OV_ALL);
  model_query (&md, 2 * W + 2, 1, OV_ALL);
  model_query (&md, 2 * W + 3, 1, OV_ALL);
  model_query (&md, 0, 4 * W, OV_ALL);
  model_verify (&md);

  model_remove (&md, W, W, A);              /* exactly the middle window */
  expect_windows (&md, 2, 1);
  model_query (&md, W, W, OV_ALL);
  model_query (&md, W - 1, W + 2, OV_ALL);
  model_query (&md, W, W + 3, OV_ALL);
  model_verify (&md);

  model_add (&md, 0, 3 * W, B);             /* whole windows */
  expect_windows (&md, 3, 1);
  model_verify (&md);
  model_remove (&md, 1, 3 * W - 2, A | B);  /* leaves the first and last */
  expect_windows (&md, 2, 1);
  expect_runs (&md, 2, 1);
  model_query (&md, 0, 3 * W, OV_ALL);
  model_query (&md, 1, 3 * W - 1, OV_ALL);
  model_verify (&md);

  model_remove (&md, 0, 4 * W, OV_ALL);
  assert (stats (md.m).windows == 0);
  model_free (&md);
}

/* Runs never cross a sub-window edge, and do not merge across one. */
static void
test_subwindows (void)
{
  struct model md;
  uint64_t nsub = W / SUB, i;
  size_t mem0, mem1;

  printf ("sub-window edges (%" PRIu64 " sub-windows of %" PRIu64 ")\n",
          nsub, SUB);
  model_init (&md);
  model_seg (&md, 0, 2 * W);

  model_add (&md, SUB - 2, 4, A);           /* over the first edge */
  expect_runs (&md, 2, 1);
  model_query (&md, SUB - 1, 2, OV_ALL);
  model_query (&md, SUB, 1, OV_ALL);
  model_remove (&md, SUB, 1, A);            /* the second part shrinks */
  expect_runs (&md, 2, 1);
  model_remove (&md, SUB - 1, 1, A);
  expect_runs (&md, 2, 1);
  model_add (&md, SUB - 1, 2, A);           /* and fills again */
  expect_runs (&md, 2, 1);
  model_verify (&md);
  model_remove (&md, SUB - 2, 4, A);
  assert (stats (md.m).windows == 0);

  /* Touching runs of the same types on both sides of an edge stay two;
   * the same types inside one sub-window merge.
   */
  model_add (&md, SUB - 1, 1, B);
  model_add (&md, SUB, 1, B);
  expect_runs (&md, 2, 1);
  model_add (&md, SUB + 1, 1, B);
  expect_runs (&md, 2, 1);
  model_verify (&md);
  model_remove (&md, 0, 2 * W, OV_ALL);

  /* A whole window: one run a sub-window, all of the longest length.
   * Then the same over two windows, but for a cluster at each end.
   */
  model_add (&md, 0, W, C);
  expect_runs (&md, nsub, 1);
  expect_windows (&md, 1, 1);
  model_verify (&md);
  model_add (&md, 1, 2 * W - 2, A);
  expect_runs (&md, 2 * nsub + 1, 1);
  model_verify (&md);
  for (i = 0; i < 200; i++)
    model_query (&md, rnd (2 * W), 1 + rnd (2 * SUB), i & 1 ? OV_ALL : A);
  /* Removing a sub-window's run from the middle touches one entry. */
  model_remove (&md, SUB, SUB, OV_ALL);
  expect_runs (&md, 2 * nsub, 1);
  model_remove (&md, 0, 2 * W, OV_ALL);
  assert (stats (md.m).windows == 0);

  /* A range over every sub-window of an existing window, in one step. */
  model_add (&md, W + SUB / 2, 1, B);
  mem0 = overlap_map_memory (md.m);
  model_add (&md, W, W, A);
  expect_runs (&md, nsub + 2, 1);
  model_verify (&md);
  model_remove (&md, W, W, A);
  mem1 = overlap_map_memory (md.m);
  assert (mem1 == mem0);                    /* the same content */
  model_verify (&md);
  model_free (&md);
}

static unsigned
bits_of (uint64_t x)
{
  return x ? 64 - __builtin_clzll (x) : 0;
}

/* The smallest entry for runs of at most maxlen clusters with npal type
 * sets: start in the sub-window, length - 1, palette index.
 */
static unsigned
want_entry (unsigned sub_bits, size_t npal, uint64_t maxlen)
{
  unsigned tb = npal <= 1 ? 0 : bits_of (npal - 1);

  return (sub_bits + tb + bits_of (maxlen - 1) + 7) / 8;
}

/* The entry format follows the window's content, both ways: longer
 * runs, more type sets, more runs (the index), and back.
 */
static void
test_formats (void)
{
  struct model md;
  struct overlap_map_stats st;
  unsigned sb, t, k, ntypes;
  uint64_t len, i, nsub = W / SUB;
  size_t mem_one, mem, re;

  printf ("entry formats\n");
  model_init (&md);
  model_seg (&md, 0, 2 * W);
  sb = stats (md.m).sub_bits;

  model_add (&md, 0, 1, A);
  st = stats (md.m);
  assert (st.type_sets == 1 && st.max_entry == want_entry (sb, 1, 1));
  assert (st.index_bytes == nsub + 1);
  mem_one = overlap_map_memory (md.m);

  /* Lengths: a run at the start of sub-window 1 of every length 2^k
   * and 2^k + 1 up to the sub-window (as added, and as left by cutting
   * its first half).
   */
  for (k = 1; (UINT64_C (1) << k) <= SUB; k++) {
    for (len = (UINT64_C (1) << k); len <= (UINT64_C (1) << k) + 1; len++) {
      if (len > SUB)
        break;
      re = stats (md.m).reencodes;
      model_add (&md, SUB, len, A);
      st = stats (md.m);
      assert (st.max_entry == want_entry (sb, 1, len));
      /* A new format is a rebuild; the same one is not. */
      assert ((st.reencodes > re) ==
              (want_entry (sb, 1, len) != want_entry (sb, 1, 1)));
      check (md.m);
      model_remove (&md, SUB, len / 2, A);
      assert (stats (md.m).max_entry == want_entry (sb, 1, len - len / 2));
      check (md.m);
      model_remove (&md, SUB, SUB, A);
      assert (overlap_map_memory (md.m) == mem_one);
    }
  }
  model_verify (&md);

  /* Splitting the longest run in two shortens the entries. */
  len = SUB < 64 ? SUB : 64;
  model_add (&md, SUB, len, A);
  model_remove (&md, SUB + len / 2, 1, A);
  assert (stats (md.m).max_entry == want_entry (sb, 1, len / 2));
  model_remove (&md, SUB, len, A);
  assert (overlap_map_memory (md.m) == mem_one);

  /* Type sets: one cluster of each of 1, 2, 3 ... more distinct sets
   * (a palette index of 0, 1, 2, 2, 3 ... bits), then off again.
   */
  ntypes = W / 2 - 2 < 40 ? W / 2 - 2 : 40;
  for (t = 1; t <= ntypes; t++) {
    model_add (&md, 2 * t, 1, 0x8000 | t);
    st = stats (md.m);
    assert (st.type_sets == t + 1);
    assert (st.max_entry == want_entry (sb, t + 1, 1));
    check (md.m);
  }
  model_verify (&md);
  for (t = ntypes; t >= 1; t--) {
    model_remove (&md, 2 * t, 1, 0xffff);
    st = stats (md.m);
    assert (st.type_sets == t);
    assert (st.max_entry == want_entry (sb, t, 1));
    check (md.m);
  }
  assert (overlap_map_memory (md.m) == mem_one);

  /* A type set leaves when its last run does, not before. */
  model_add (&md, 10, 1, A);                /* A at 0, 10, 20 */
  model_add (&md, 20, 1, A);
  model_add (&md, 30, 1, B);
  assert (stats (md.m).type_sets == 2);
  model_add (&md, 10, 1, B);                /* A|B at 10 */
  assert (stats (md.m).type_sets == 3);
  model_add (&md, 20, 1, B);
  model_add (&md, 0, 1, B);                 /* no A alone any more */
  assert (stats (md.m).type_sets == 2);
  model_remove (&md, 0, 40, A);             /* B alone */
  assert (stats (md.m).type_sets == 1);
  model_verify (&md);
  model_remove (&md, 0, 2 * W, OV_ALL);
  assert (stats (md.m).windows == 0);

  /* The index: one byte an entry up to 255 runs, two from 256 on. */
  if (W >= 512) {
    for (i = 0; i < 255; i++)
      model_add (&md, 2 * i, 1, A);
    st = stats (md.m);
    assert (st.runs == 255 && st.index_bytes == nsub + 1);
    mem = overlap_map_memory (md.m);
    model_add (&md, 2 * 255, 1, A);
    st = stats (md.m);
    assert (st.runs == 256 && st.index_bytes == 2 * (nsub + 1));
    assert (overlap_map_memory (md.m) > mem);
    model_verify (&md);
    model_remove (&md, 2 * 255, 1, A);
    assert (stats (md.m).index_bytes == nsub + 1);
    assert (overlap_map_memory (md.m) == mem);
    /* Runs over every sub-window at once, in and out. */
    model_add (&md, 1, W - 2, B);
    model_verify (&md);
    model_remove (&md, 1, W - 2, B);
    assert (overlap_map_memory (md.m) == mem);
    model_verify (&md);
  }

  /* Many type sets in one window, enough for two-byte palette indexes
   * and the widest entries.
   */
  for (i = 0; i < W && i < 4096; i++)
    model_add (&md, W + i, 1, 1 + i % OV_ALL);
  model_verify (&md);
  k = stats (md.m).max_entry;
  printf ("  %zu type sets in a window: %u byte entries\n",
          stats (md.m).type_sets, k);
  model_remove (&md, 0, 2 * W, OV_ALL);
  assert (stats (md.m).windows == 0);
  model_free (&md);
}

/* Coarse windows: past the cap, the map switches to fine windows. */
static void
test_regrain (void)
{
  struct model md;
  struct overlap_map_stats st;
  uint64_t i, cap, fine_w, far;

  model_init (&md);
  st = stats (md.m);
  if (st.window_bits <= st.fine_bits) {
    printf ("regrain: skipped, windows are not coarse\n");
    model_free (&md);
    return;
  }
  cap = TUNE_FINE ? TUNE_CAP : 4096;
  fine_w = UINT64_C (1) << st.fine_bits;
  printf ("regrain (at %" PRIu64 " runs, to windows of %" PRIu64 ")\n",
          cap, fine_w);
  assert (2 * cap + 8 <= W);
  far = UINT64_C (1) << 40;
  model_seg (&md, 0, 2 * cap + 2 * W);
  model_seg (&md, far, 2 * SUB);

  /* Exactly the cap: still coarse. */
  model_add (&md, far + SUB - 1, 3, C);     /* another window, 2 runs */
  for (i = 0; i < cap; i++)
    model_add (&md, 2 * i, 1, i % 3 ? A : B);
  st = stats (md.m);
  assert (st.regrains == 0 && st.runs == cap + 2);
  model_verify (&md);
  /* One more: every window is redone with fine windows. */
  model_add (&md, 2 * cap, 1, A);
  st = stats (md.m);
  assert (st.regrains == 1 && st.window_bits == st.fine_bits);
  model_verify (&md);
  /* And it stays so, down to nothing. */
  model_remove (&md, 0, 2 * cap + 2 * W, OV_ALL);
  model_verify (&md);
  model_remove (&md, far, 2 * SUB, OV_ALL);
  assert (stats (md.m).windows == 0 && stats (md.m).regrains == 1);
  model_free (&md);

  /* A removal that splits a run at the cap. */
  model_init (&md);
  model_seg (&md, 0, 2 * cap + 2 * W);
  for (i = 0; i < cap - 1; i++)
    model_add (&md, 2 * i, 1, A);
  far = (2 * cap + SUB - 1) / SUB * SUB;    /* a sub-window of its own */
  model_add (&md, far, 3, B);
  assert (stats (md.m).runs == cap);
  model_remove (&md, far + 1, 1, B);
  st = stats (md.m);
  assert (st.regrains == 1 && st.runs == cap + 1);
  model_verify (&md);
  model_free (&md);

  /* A range that needs more than the cap in one new window. */
  if (W / SUB > cap) {
    model_init (&md);
    model_seg (&md, 0, W);
    model_add (&md, 0, W, A);
    assert (stats (md.m).regrains == 1);
    model_verify (&md);
    model_free (&md);
  }
}

static void
test_huge (void)
{
  struct model md;
  const uint64_t T40 = UINT64_C (1) << 40, T47 = UINT64_C (1) << 47;
  uint64_t hit, first, last;

  printf ("huge sparse indexes\n");
  model_init (&md);
  model_seg (&md, T40 - 2 * W, 4 * W);
  model_seg (&md, T47, 2 * W);
  model_seg (&md, UINT64_MAX - (2 * W - 1), 2 * W);

  model_add (&md, T40, 1, A);
  model_add (&md, T40 - 1, 1, A);           /* other side of an edge */
  model_add (&md, T47 + 5, 3, B);
  model_add (&md, UINT64_MAX, 1, OV_MAIN_HEADER);
  expect_windows (&md, 4, 1);
  assert (overlap_map_memory (md.m) < 1024);
  model_verify (&md);

  /* A range running past the top is cut at UINT64_MAX. */
  assert (overlap_map_add (md.m, UINT64_MAX - 2, 100, C) == 0);
  ref_apply (seg_of (&md, UINT64_MAX - 2, 3), UINT64_MAX - 2, 3, 0, C);
  model_verify (&md);
  assert (overlap_map_query (md.m, UINT64_MAX - 1, 50, OV_ALL, &hit)
          == (C | OV_MAIN_HEADER) && hit == UINT64_MAX - 1);

  /* Ranges wider than the table walk the table. */
  model_query (&md, 0, UINT64_MAX, OV_ALL);
  model_query (&md, T40, UINT64_MAX - T40, OV_ALL);
  model_query (&md, T40 + 1, T47, OV_ALL);
  model_query (&md, T40 + 1, T47, OV_MAIN_HEADER | C);
  model_query (&md, 1, T40 - 2, OV_ALL);

  /* Removal over everything but the last cluster, by walking. */
  assert (overlap_map_remove (md.m, 0, UINT64_MAX, OV_ALL) == 0);
  assert (stats (md.m).windows == 1);
  assert (overlap_map_query (md.m, 0, UINT64_MAX, OV_ALL, &hit) == 0);
  assert (map_get (md.m, UINT64_MAX) == (C | OV_MAIN_HEADER));
  assert (overlap_map_remove (md.m, UINT64_MAX, 1, OV_ALL) == 0);
  assert (stats (md.m).windows == 0);
  check (md.m);

  /* Partial walks: only windows inside the range change. */
  model_free (&md);
  model_init (&md);
  model_seg (&md, 0, 64 * W);
  model_seg (&md, T40, 64 * W);
  for (hit = 0; hit < 64; hit++) {
    model_add (&md, hit * W + hit % (W - 8), 3, A);
    model_add (&md, T40 + hit * W + 2 * hit % (W - 8), 5, B);
  }
  /* From inside window 17's run to somewhere in the far window 17. */
  first = 17 * W + 17 % (W - 8) + 1;
  last = first + T40 - 1;
  assert (overlap_map_remove (md.m, first, T40, A | B) == 0);
  ref_apply (seg_of (&md, first, 64 * W - first), first, 64 * W - first,
             A | B, 0);
  ref_apply (seg_of (&md, T40, last - T40 + 1), T40, last - T40 + 1, A | B, 0);
  model_verify (&md);
  model_free (&md);
}

/* What a window may cost besides its entries: the header and malloc's
 * 16-byte steps (40), its share of the table at a load of 3/8 or more
 * (22), or 1/8 after removals (64).
 */
static size_t
memory_bound (struct overlap_map_stats st, size_t per_window)
{
  return 160 + per_window * st.windows + st.index_bytes + 2 * st.type_sets +
    st.entry_bytes;
}

/* One metadata cluster every 'every' clusters over 'span' clusters. */
static void
memory_pattern (uint64_t every, uint64_t span, bool mixed)
{
  struct overlap_map *m = new_map ();
  struct overlap_map_stats st;
  size_t mem, empty;
  uint64_t c;

  empty = overlap_map_memory (m);
  for (c = 0; c < span; c += every)
    assert (overlap_map_add (m, c, 1,
                             mixed && c % (4 * every) == 0 ? B : A) == 0);
  st = stats (m);
  mem = overlap_map_memory (m);
  printf ("  one in %7" PRIu64 ": %7zu runs %5zu windows %9zu bytes, "
          "%5.2f a run, entries of %u bytes\n",
          every, st.runs, st.windows, mem, (double) mem / st.runs,
          st.max_entry);
  assert (mem <= memory_bound (st, 40 + 22));
  /* One or two type sets, runs of one cluster (every > 1), three, or
   * whole sub-windows: the smallest entries.
   */
  assert (st.max_entry ==
          want_entry (st.sub_bits, mixed ? 2 : 1,
                      every > 1 ? 1 : mixed ? 3 : UINT64_C (1) << st.sub_bits));
  check (m);
  check_memory_honest (m);

  /* Remove 7/8 of it: the lists and the table shrink, and what is
   * left still answers.
   */
  assert (overlap_map_remove (m, 0, span / 8 * 7, OV_ALL) == 0);
  for (c = span / 8 * 7; c < span; c += every)
    if (c / every % 8)
      assert (overlap_map_remove (m, c, 1, OV_ALL) == 0);
  check (m);
  check_memory_honest (m);
  st = stats (m);
  assert (overlap_map_memory (m) <= memory_bound (st, 40 + 64));
  assert (overlap_map_query (m, 0, span / 8 * 7, OV_ALL, NULL) == 0);
  assert (overlap_map_query (m, span / 8 * 7, span, OV_ALL, NULL) != 0);

  /* All gone: back to the empty size. */
  assert (overlap_map_remove (m, 0, span, OV_ALL) == 0);
  assert (stats (m).windows == 0);
  assert (overlap_map_memory (m) == empty);
  overlap_map_free (m);
}

static void
test_memory (void)
{
  static const uint64_t every[] = {
    1, 2, 3, 5, 65, 257, 4095, 4096, 4097, 65537, 1 << 20
  };
  size_t i, empty;
  struct overlap_map *m = new_map ();

  printf ("memory\n");
  empty = overlap_map_memory (m);
  assert (empty <= 256);
  overlap_map_free (m);
  for (i = 0; i < sizeof every / sizeof every[0]; i++)
    memory_pattern (every[i], every[i] < 4096 ? 1 << 19 : every[i] << 11,
                    true);
  /* Contiguous: one run a sub-window. */
  memory_pattern (1, 1 << 19, false);
}

/*----------------------------------------------------------------------
 * The 2014 bound: 40 * image_size / cluster_size^2 bytes, on images laid
 * out the way qemu-img preallocates them (as bench/overlap-bench.c):
 * header, refcount table, L1 table, then an L2 table before each run
 * of data clusters it maps, and a refcount block whenever allocation
 * passes the end of the last one.
 */

struct layout_run {
  uint64_t first, n;
  unsigned types;
};

struct layout {
  struct overlap_map *m;
  uint64_t next, refblock_end, per_refblock;
  struct layout_run *runs;      /* what was added, in order */
  size_t nruns, cap;
};

static void
layout_add (struct layout *l, uint64_t c, uint64_t n, unsigned types)
{
  assert (overlap_map_add (l->m, c, n, types) == 0);
  if (l->nruns == l->cap) {
    l->cap = l->cap ? 2 * l->cap : 1024;
    l->runs = realloc (l->runs, l->cap * sizeof *l->runs);
    assert (l->runs != NULL);
  }
  assert (l->nruns == 0 ||
          l->runs[l->nruns - 1].first + l->runs[l->nruns - 1].n <= c);
  l->runs[l->nruns++] = (struct layout_run) { c, n, types };
}

/* What a query of [c, c+n) must say, from the runs added. */
static unsigned
layout_answer (const struct layout *l, uint64_t c, uint64_t n, uint64_t *hit)
{
  size_t lo = 0, hi = l->nruns, mid;
  unsigned t = 0;

  /* The first run ending after c. */
  while (lo < hi) {
    mid = (lo + hi) / 2;
    if (l->runs[mid].first + l->runs[mid].n <= c)
      lo = mid + 1;
    else
      hi = mid;
  }
  for (; lo < l->nruns && l->runs[lo].first < c + n; lo++) {
    if (t == 0)
      *hit = l->runs[lo].first > c ? l->runs[lo].first : c;
    t |= l->runs[lo].types;
  }
  return t;
}

/* Ask the map about every run, its edges, and random ranges. */
static void
layout_verify (const struct layout *l)
{
  uint64_t c, n, hit = 0, want_hit = 0, i;
  unsigned t, want;

  for (i = 0; i < l->nruns + 20000; i++) {
    if (i < l->nruns) {
      const struct layout_run *r = &l->runs[i];
      c = r->first - (i % 3 == 0 && r->first > 0);
      n = i % 3 == 1 ? 1 : r->n + 1;
    }
    else {
      n = 1 + rnd (64);
      c = rnd (l->next);
    }
    want = layout_answer (l, c, n, &want_hit);
    t = overlap_map_query (l->m, c, n, OV_ALL, &hit);
    if (t != want || (t && hit != want_hit)) {
      fprintf (stderr, "layout query %#" PRIx64 "+%" PRIu64 ": got %#x "
               "at %#" PRIx64 ", want %#x at %#" PRIx64 "\n",
               c, n, t, hit, want, want_hit);
      abort ();
    }
  }
}

static uint64_t
layout_alloc (struct layout *l, uint64_t n, unsigned types)
{
  uint64_t c = l->next, chunk;

  if (types == 0) {             /* data: refcount blocks among it */
    while (n > 0) {
      while (l->next >= l->refblock_end) {
        layout_add (l, l->next++, 1, OV_REFCOUNT_BLOCK);
        l->refblock_end += l->per_refblock;
      }
      chunk = min64 (n, l->refblock_end - l->next);
      l->next += chunk;
      n -= chunk;
    }
    return c;
  }
  while (l->next + n > l->refblock_end) {
    layout_add (l, l->next++, 1, OV_REFCOUNT_BLOCK);
    l->refblock_end += l->per_refblock;
  }
  c = l->next;
  l->next += n;
  layout_add (l, c, n, types);
  return c;
}

/* The map of a preallocated image; returns the file's clusters.  The
 * map is checked against what was added.
 */
static uint64_t
preallocated (struct overlap_map *m, unsigned cluster_bits, uint64_t guest)
{
  uint64_t cs = UINT64_C (1) << cluster_bits;
  uint64_t guest_clusters = guest >> cluster_bits, l2_entries = cs / 8;
  uint64_t nl2 = (guest_clusters + l2_entries - 1) / l2_entries, i, rt;
  struct layout l = { .m = m, .per_refblock = cs * 8 / 16 };

  layout_add (&l, 0, 1, OV_MAIN_HEADER);
  rt = (guest_clusters + nl2) * 2 / l.per_refblock * 8 / cs + 1;
  layout_add (&l, 1, rt, OV_REFCOUNT_TABLE);
  l.next = 1 + rt;
  layout_alloc (&l, (nl2 * 8 + cs - 1) / cs, OV_ACTIVE_L1);
  for (i = 0; i < nl2; i++) {
    layout_alloc (&l, 1, OV_ACTIVE_L2);
    layout_alloc (&l, l2_entries, 0);
  }
  check (m);
  layout_verify (&l);
  free (l.runs);
  return l.next;
}

static void
bound_case (unsigned cluster_bits, uint64_t guest, const char *name)
{
  struct overlap_map *m = overlap_map_new (cluster_bits);
  struct overlap_map_stats st;
  uint64_t host, cs = UINT64_C (1) << cluster_bits;
  double bound;
  size_t mem;

  assert (m != NULL);
  host = preallocated (m, cluster_bits, guest);
  check (m);
  check_memory_honest (m);
  st = stats (m);
  mem = overlap_map_memory (m);
  /* 40 * IS / CS^2, IS = host clusters * CS */
  bound = 40.0 * (double) host / (double) cs;
  printf ("  %-24s %7zu runs %5zu windows: %8zu bytes, bound %8.0f "
          "(ratio %.2f)\n", name, st.runs, st.windows, mem, bound,
          mem / bound);
  if (mem > bound) {
    fprintf (stderr, "%s: the overlap map takes %zu bytes, more than the "
             "2014 bound of %.0f\n", name, mem, bound);
    abort ();
  }
  overlap_map_free (m);
}

static void
test_bound (void)
{
  printf ("the 2014 bound, preallocated images\n");
  bound_case (9, UINT64_C (1) << 30, "1 GiB, 512 B clusters");
  bound_case (9, UINT64_C (1) << 32, "4 GiB, 512 B clusters");
  bound_case (16, UINT64_C (1) << 40, "1 TiB, 64 KiB clusters");
  bound_case (16, UINT64_C (1) << 44, "16 TiB, 64 KiB clusters");
  bound_case (21, UINT64_C (1) << 50, "1 PiB, 2 MiB clusters");
}

/*----------------------------------------------------------------------
 * Allocation failures.
 */

#ifdef OVERLAP_MAP_FAULT_INJECTION
/* Two modes: fail allocation number fault_at (counting from when it
 * was set), or fail one in fault_one_in at random.
 */
static unsigned fault_one_in;
static uint64_t fault_at, fault_count;
static uint64_t fault_state = 42, faults;

static bool
fail_now (void)
{
  fault_count++;
  if (fault_at)
    return fault_count == fault_at ? (faults++, true) : false;
  if (fault_one_in == 0)
    return false;
  fault_state = fault_state * UINT64_C (6364136223846793005) + 1;
  if ((fault_state >> 33) % fault_one_in)
    return false;
  faults++;
  return true;
}

/* The unit of all or nothing: a window, or, when a regrain may happen
 * in the middle of an operation (which then starts again on the fine
 * windows), a fine window.
 */
static uint64_t
atomic_unit (const struct overlap_map *m)
{
  struct overlap_map_stats st = stats (m);

  return UINT64_C (1) << (st.window_bits < st.fine_bits ? st.window_bits
                          : st.fine_bits);
}

/* After an operation that may have failed: each unit is all old or
 * all new, the new ones come first, and an operation on one unit that
 * failed changed nothing.  Then the model takes the map's word.
 */
static void
settle (struct model *md, int r, bool add, uint64_t first, uint64_t n,
        unsigned t, const uint16_t *before, uint64_t unit)
{
  struct seg *s = seg_of (md, first, n);
  uint64_t i;
  unsigned old, new, got;
  bool single = (first + n - 1) / unit == first / unit;
  bool saw_new = false, saw_old = false, any_old = false;

  assert (r == 0 || (r == -1 && errno == ENOMEM));
  for (i = first; i < first + n; i++) {
    if (i == first || i % unit == 0)
      saw_new = saw_old = false;
    old = before[i - first];
    new = add ? old | t : old & ~t;
    got = map_get (md->m, i);
    assert (got == new || got == old);
    if (old != new) {
      saw_new |= got == new;
      saw_old |= got == old;
    }
    assert (!(saw_new && saw_old));     /* all or nothing */
    assert (!(any_old && saw_new));     /* a prefix of units */
    any_old |= saw_old;
    s->ref[i - s->base] = got;
  }
  if (r == 0 || single)
    assert (r == -1 ? !saw_new : !any_old);
}

/* OVERLAP_TEST_FAULT_STEP, see the top. */
static uint64_t fault_step = 1;

/* The allocation to fail after allocation k, of total. */
static uint64_t
next_fault (uint64_t k, uint64_t total)
{
  if (fault_step == 1 || k < 8)
    return k + 1;
  if (k >= total || k + fault_step < total)
    return k + fault_step;
  return total;
}

/* Build a state, then run one operation with allocation 1, 2, 3 ...
 * failing, until it runs without reaching the failing allocation.
 * 'setup' builds the same state every time (no allocation fails in
 * it, and the map is deterministic), so the whole model is compared
 * with it the first time only; then the map's invariants and counts.
 * After the first 8, only every fault_step-th allocation fails, and
 * the last one (a run without failures counts them first).
 */
static void
fault_scenario (const char *name, void (*setup) (struct model *),
                bool add, uint64_t first, uint64_t n, unsigned t)
{
  struct model md;
  uint16_t *before = malloc (n * sizeof (uint16_t));
  struct seg *s;
  uint64_t k, i, failed = 0, unit, regrains = 0, allocs, total = 0, tries = 0;
  int r;

  assert (before != NULL);
  if (fault_step > 1) {
    /* How many allocations the operation makes when none fails. */
    model_init (&md);
    setup (&md);
    fault_count = 0;
    assert ((add ? overlap_map_add (md.m, first, n, t)
             : overlap_map_remove (md.m, first, n, t)) == 0);
    total = fault_count;
    model_free (&md);
  }
  for (k = 1; ; k = next_fault (k, total)) {
    tries++;
    model_init (&md);
    setup (&md);
    if (k == 1)
      model_verify (&md);
    else {
      check (md.m);
      expect_counts (&md);
    }
    s = seg_of (&md, first, n);
    for (i = 0; i < n; i++)
      before[i] = s->ref[first - s->base + i];
    unit = atomic_unit (md.m);
    regrains = stats (md.m).regrains;
    fault_count = 0;
    fault_at = k;
    errno = 0;
    r = add ? overlap_map_add (md.m, first, n, t)
      : overlap_map_remove (md.m, first, n, t);
    fault_at = 0;
    allocs = fault_count;
    check (md.m);
    failed += r == -1;
    settle (&md, r, add, first, n, t, before, unit);
    model_verify (&md);
    regrains = stats (md.m).regrains - regrains;
    model_free (&md);
    if (allocs < k)
      break;
  }
  printf ("  %-34s %3" PRIu64 " allocations, %3" PRIu64 " failures "
          "seen by the caller%s", name, allocs, failed,
          regrains ? ", a regrain" : "");
  if (tries - 1 < allocs)
    printf (" (%" PRIu64 " of them failed, step %" PRIu64 ")",
            tries - 1, fault_step);
  printf ("\n");
  free (before);
}

static void
setup_empty (struct model *md)
{
  model_seg (md, 0, 64 * W);
}

/* 12 windows: the 13th needs a bigger table. */
static void
setup_12_windows (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  for (i = 0; i < 12; i++)
    model_add (md, i * 2 * W + i, 2, A);
}

/* 40 windows: removing most of them shrinks the table. */
static void
setup_40_windows (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  for (i = 0; i < 40; i++)
    model_add (md, i * W + i, 2, A);
}

/* One window of one run (or a few, over sub-windows). */
static void
setup_one_run (struct model *md)
{
  model_seg (md, 0, 64 * W);
  model_add (md, W + 10, 100, A);
}

/* One window of one cluster. */
static void
setup_one_cluster (struct model *md)
{
  model_seg (md, 0, 64 * W);
  model_add (md, W + 10, 1, A);
}

/* 255 runs in a window: one more needs two-byte index entries. */
static void
setup_255_runs (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  for (i = 0; i < 255; i++)
    model_add (md, W + 2 * i, 1, A);
}

/* A list of 100 runs in each of windows 1 to 5. */
static void
setup_lists (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  for (i = 0; i < 500; i++)
    model_add (md, W + i / 100 * W + i % 100 * 3, 1, A);
}

/* A run of each of two type sets. */
static void
setup_two_types (struct model *md)
{
  model_seg (md, 0, 64 * W);
  model_add (md, W + 10, 100, A);
  model_add (md, W + 300, 1, B);
}

/* A coarse window at the cap (tuned configurations): single clusters
 * and a run of 3 at the start of the next sub-window.
 */
static uint64_t cap_run;

static void
setup_at_cap (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  model_add (md, 5 * W + 7, 1, C);
  for (i = 0; i + 1 < TUNE_CAP; i++)
    model_add (md, W + 2 * i, 1, i % 2 ? A : B);
  model_add (md, cap_run, 3, A);
  assert (stats (md->m).regrains == 0);
}

static void
test_fault_scenarios (void)
{
  printf ("allocation failures, one at a time\n");
  fault_scenario ("first window", setup_empty, true, 5, 3, A);
  fault_scenario ("table growth", setup_12_windows, true, 40 * W, 1, B);
  fault_scenario ("split by removal", setup_one_run, false, W + 50, 1, A);
  fault_scenario ("list growth", setup_one_run, true, W + 200, 1, A);
  fault_scenario ("new type set (rebuild)", setup_one_run, true, W + 200, 1,
                  B);
  fault_scenario ("longer run (rebuild)", setup_one_cluster, true, W + 20,
                  3, A);
  fault_scenario ("rewrite of many runs", setup_lists, true, W, W, B);
  fault_scenario ("list shrink", setup_lists, false, W, 250, A);
  fault_scenario ("type set leaves (rebuild)", setup_two_types, false,
                  W + 300, 1, B);
  fault_scenario ("table shrink", setup_40_windows, false, 0, 36 * W, A);
  fault_scenario ("add over 5 windows", setup_lists, true, W + 1, 5 * W, B);
  fault_scenario ("add over 8 windows, 3 new", setup_lists, true, 50,
                  8 * W, C);
  if (W >= 1024)
    fault_scenario ("256th run (wider index)", setup_255_runs, true,
                    W + 600, 1, A);
  if (TUNE_FINE) {
    cap_run = W + (2 * TUNE_CAP + SUB - 1) / SUB * SUB;
    fault_scenario ("past the cap (regrain)", setup_at_cap, true,
                    W + 2 * TUNE_CAP - 1, 1, A);
    fault_scenario ("split at the cap (regrain)", setup_at_cap, false,
                    cap_run + 1, 1, A);
  }
}

static void
test_faults (uint64_t nops)
{
  struct model md;
  struct overlap_map_stats st;
  struct seg *s;
  uint64_t op, first, n, hot = 0, failures = 0, U = min64 (W, 4096);
  uint16_t *before = malloc (3 * U * sizeof (uint16_t));
  unsigned t;
  bool add, fill = true;
  int r;

  printf ("allocation failures\n");
  assert (before != NULL);
  model_init (&md);
  model_seg (&md, 0, 64 * U);
  s = &md.segs[0];
  fault_one_in = 8;
  for (op = 0; op < nops; op++) {
    uint64_t unit = atomic_unit (md.m);

    /* As in test_random: fill and drain a hot region so that the
     * formats change both ways; elsewhere, windows come and go so that
     * the table grows and shrinks.
     */
    if (op % 10000 == 0) {
      fill = op / 10000 % 2 == 0;
      if (fill)
        hot = rnd (64) * U;
    }
    if (rnd (2)) {
      n = 1 + rnd (3);
      first = hot + rnd (U - n + 1);
    }
    else {
      n = rnd (5) ? 1 + rnd (8) : 1 + rnd (3 * U);
      first = rnd (64 * U - n + 1);
    }
    t = 1u << rnd (8);
    add = rnd (4) < (fill ? 3 : 1);
    memcpy (before, &s->ref[first], n * sizeof (uint16_t));
    errno = 0;
    r = add ? overlap_map_add (md.m, first, n, t)
      : overlap_map_remove (md.m, first, n, t);
    if (op % 64 == 0) {
      check (md.m);
      check_memory_honest (md.m);
    }
    failures += r == -1;
    settle (&md, r, add, first, n, t, before, unit);
    if (op % 16384 == 0) {
      fault_one_in = 0;
      model_verify (&md);
      fault_one_in = 8;
    }
  }
  fault_one_in = 0;
  model_verify (&md);
  st = stats (md.m);
  printf ("  %" PRIu64 " operations, %" PRIu64 " failed, %" PRIu64
          " allocations failed; %" PRIu64 " rebuilds, %" PRIu64
          " regrains\n", nops, failures, faults, st.reencodes, st.regrains);
  assert (failures > 0);
  free (before);
  model_free (&md);
}
#endif /* OVERLAP_MAP_FAULT_INJECTION */

/*----------------------------------------------------------------------
 * Random operations against the model.
 */

/* Mostly one type, as the image does, sometimes several. */
static unsigned
random_types (void)
{
  uint64_t r = rnd (10);

  if (r < 7)
    return 1u << rnd (OV_NR_TYPES);
  if (r < 9)
    return (1u << rnd (OV_NR_TYPES)) | (1u << rnd (OV_NR_TYPES));
  return 1 + rnd (OV_ALL);
}

/* U: the scale of "a window" for the random ranges (windows may be
 * far bigger than the model can follow cluster by cluster).
 */
static uint64_t
random_len (uint64_t max, uint64_t U)
{
  uint64_t r = rnd (1000), n;

  if (r < 600)
    n = 1 + rnd (8);
  else if (r < 900)
    n = 1 + rnd (256);
  else if (r < 995)
    n = 1 + rnd (2 * U);
  else
    n = 1 + rnd (max);
  return n < max ? n : max;
}

/* Remove type t from a range that starts near 'first' and may run
 * over several segments and far beyond.
 */
static void
remove_wide (struct model *md, uint64_t first, unsigned t)
{
  uint64_t n, last, lo, hi;
  size_t k;

  first = first > (UINT64_C (1) << 41) ? first - rnd (UINT64_C (1) << 41)
    : rnd (first + 1);
  n = first == UINT64_MAX ? 1 : 1 + rnd (UINT64_MAX - first);
  last = first + (n - 1);
  assert (overlap_map_remove (md->m, first, n, t) == 0);
  for (k = 0; k < md->nsegs; k++) {
    struct seg *s = &md->segs[k];
    uint64_t slast = s->base + (s->len - 1);

    if (last < s->base || first > slast)
      continue;
    lo = first > s->base ? first : s->base;
    hi = last < slast ? last : slast;
    ref_apply (s, lo, hi - lo + 1, t, 0);
  }
}

/* Segments: the start, and around window edges near 2^40, 2^47 and
 * the top.  Each crosses at least one window edge.
 */
static void
random_segments (struct model *md, uint64_t U)
{
  uint64_t len = W <= 65536 ? 3 * W : W + 4 * U;

  model_seg (md, 0, 200000);
  model_seg (md, (UINT64_C (1) << 40) - 3000, len);
  model_seg (md, (UINT64_C (1) << 47) + 12345, len);
  model_seg (md, UINT64_MAX - (len - 1), len);
}

/* nops operations; with reset_every, a new map (and model) that often,
 * so that a tuned configuration regrains again and again.
 */
static void
test_random (uint64_t seed, uint64_t nops, uint64_t reset_every)
{
  struct model md;
  struct overlap_map_stats st;
  uint64_t op, first, n, hot = 0, counts[3] = { 0, 0, 0 };
  uint64_t U = min64 (W, 4096), regrains = 0, reencodes = 0, resets = 0;
  unsigned add_pct = 0, remove_pct = 0;
  bool fill = true;
  struct seg *s;
  clock_t start = clock ();

  printf ("random: %" PRIu64 " operations, seed %" PRIu64 "\n", nops, seed);
  rng_state = seed ? seed : 1;
  model_init (&md);
  random_segments (&md, U);

  for (op = 0; op < nops; op++) {
    if (reset_every && op > 0 && op % reset_every == 0) {
      model_verify (&md);
      st = stats (md.m);
      regrains += st.regrains;
      reencodes += st.reencodes;
      resets++;
      model_free (&md);
      model_init (&md);
      random_segments (&md, U);
    }
    /* Phases: fill a hot region where half the operations land, then
     * drain it, so that windows get dense and the formats change both
     * ways.
     */
    if (op % 25000 == 0) {
      fill = op / 25000 % 2 == 0;
      add_pct = fill ? 50 : 15;
      remove_pct = fill ? 15 : 50;
      if (fill)
        hot = rnd (200000 / U) * U;
    }
    if (rnd (2)) {
      s = &md.segs[0];
      n = fill || rnd (8) ? 1 + rnd (4) : random_len (U, U);
      first = hot + rnd (U - n + 1);
    }
    else {
      s = &md.segs[rnd (10) < 7 ? 0 : 1 + rnd (md.nsegs - 1)];
      n = random_len (s->len, U);
      first = s->base + rnd (s->len - n + 1);
    }

    uint64_t r = rnd (100);
    if (r < add_pct) {
      model_add (&md, first, n, random_types ());
      counts[0]++;
    }
    else if (r < add_pct + remove_pct) {
      if (rnd (5000) == 0)              /* wide: may walk the table */
        remove_wide (&md, first, 1u << rnd (OV_NR_TYPES));
      else
        model_remove (&md, first, n,
                      rnd (fill ? 4 : 2) ? random_types () : OV_ALL);
      counts[1]++;
    }
    else {
      unsigned mask = rnd (2) ? OV_ALL : random_types ();

      if (rnd (1000) == 0) {          /* wide: may walk the table */
        first = first > (UINT64_C (1) << 41) ? first - rnd (UINT64_C (1) << 41)
          : rnd (first + 1);
        n = first == UINT64_MAX ? 1 : 1 + rnd (UINT64_MAX - first);
      }
      model_query (&md, first, n, mask);
      counts[2]++;
    }
    if (op % 8192 == 0)
      check (md.m);
    if (op % 500000 == 0)
      model_verify (&md);
  }
  model_verify (&md);
  st = stats (md.m);
  regrains += st.regrains;
  reencodes += st.reencodes;
  printf ("  %" PRIu64 " adds, %" PRIu64 " removes, %" PRIu64 " queries "
          "in %.1f s\n", counts[0], counts[1], counts[2],
          (double) (clock () - start) / CLOCKS_PER_SEC);
  printf ("  end: %zu windows of %" PRIu64 " clusters, %zu runs, %zu bytes; "
          "%" PRIu64 " rebuilds, %" PRIu64 " regrains in %" PRIu64
          " maps\n", st.windows, UINT64_C (1) << st.window_bits, st.runs,
          overlap_map_memory (md.m), reencodes, regrains, resets + 1);
  if (nops >= 100000) {
    assert (reencodes > 0);
    if (TUNE_FINE)
      assert (regrains > 1);
  }
  model_free (&md);
}

static uint64_t
env_u64 (const char *name, uint64_t def)
{
  const char *s = getenv (name);

  return s && *s ? strtoull (s, NULL, 0) : def;
}

/* OVERLAP_TEST_ONLY=random (or fixed, faults) runs just that part. */
static bool
want (const char *part)
{
  const char *only = getenv ("OVERLAP_TEST_ONLY");

#ifdef OVERLAP_MAP_FAULT_INJECTION
  /* test-overlap-map runs the rest; this build adds the faults. */
  if (only == NULL)
    only = "faults";
#endif
  return only == NULL || *only == '\0' || strcmp (only, part) == 0;
}

/* The configurations: 512 byte clusters (fine windows of 4096), the
 * smallest windows (many edges), 64 KiB clusters (coarse windows of
 * 2^19 clusters), and 512 byte clusters tuned to regrain from windows
 * of 4096 at 16 runs to windows of 32.
 */
static const struct config {
  unsigned cluster_bits, fine, cap;
  unsigned ops_div;             /* a share of OVERLAP_TEST_OPS */
  uint64_t reset_every;
} configs[] = {
  { 9, 0, 0, 1, 0 },
  { 2, 0, 0, 4, 0 },
  { 16, 0, 0, 8, 40000 },
  { 9, 5, 16, 4, 20000 },
};

int
main (void)
{
  uint64_t seed = env_u64 ("OVERLAP_TEST_SEED", 20260101);
  uint64_t nops = env_u64 ("OVERLAP_TEST_OPS", 2000000);
  size_t i;

#ifdef OVERLAP_MAP_FAULT_INJECTION
  fault_step = env_u64 ("OVERLAP_TEST_FAULT_STEP", 1);
  if (fault_step == 0)
    fault_step = 1;
#endif

  setvbuf (stdout, NULL, _IOLBF, 0);
  rng_state = seed ? seed : 1;

  if (want ("fixed")) {
    configure (9, 0, 0);
    test_bound ();
  }
  for (i = 0; i < sizeof configs / sizeof configs[0]; i++) {
    const struct config *c = &configs[i];

    configure (c->cluster_bits, c->fine, c->cap);
    rng_state = seed ? seed : 1;
    if (want ("fixed")) {
      test_basic ();
      test_merge ();
      test_types ();
      test_window_edges ();
      test_subwindows ();
      if (!TUNE_FINE) {
        test_formats ();
        test_memory ();
      }
      test_regrain ();
      test_huge ();
    }
#ifdef OVERLAP_MAP_FAULT_INJECTION
    if (want ("faults") && (c->cluster_bits == 9 || c->cluster_bits == 2)) {
      test_fault_scenarios ();
      test_faults (nops / c->ops_div / 20 + 1000);
    }
#else
    if (i == 0)
      printf ("allocation failures: not built in "
              "(needs -DOVERLAP_MAP_FAULT_INJECTION)\n");
#endif
    if (want ("random"))
      test_random (seed, nops / c->ops_div, c->reset_every);
  }
  printf ("ok\n");
  return 0;
}
