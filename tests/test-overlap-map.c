/* nbdkit-qcow2: unit test of core/overlap-map.c.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Every change goes to the map and to a naive model (a uint16_t per
 * cluster over a few segments of the cluster space), and the two are
 * compared cluster by cluster.  The map's own invariant checker runs
 * after every step.  Fixed cases first (merging, splitting, window
 * edges, several types a cluster, list <-> bitmap conversions, indexes
 * near 2^40, 2^47 and 2^64, the memory bound), then millions of random
 * operations.
 *
 * Environment: OVERLAP_TEST_SEED (default fixed, printed) and
 * OVERLAP_TEST_OPS (random operations, default 2000000) so a failure
 * reproduces and valgrind can run a short version; OVERLAP_TEST_ONLY
 * (fixed, faults or random) runs one part.
 *
 * Built with -DOVERLAP_MAP_FAULT_INJECTION (both files), it also makes
 * allocations fail and checks that the map stays valid and that each
 * window is updated all or nothing.  Built with -DOVERLAP_WINDOW_BITS=5
 * (both files), windows are 32 clusters and every path runs far more
 * often.
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
struct overlap_map_stats {
  unsigned window_bits;
  size_t windows;
  size_t bitmaps;
  size_t runs;
  uint64_t to_bitmap;
  uint64_t to_list;
};
extern int overlap_map_get_stats (const struct overlap_map *m,
                                  struct overlap_map_stats *st, size_t size);
extern const char *overlap_map_check (const struct overlap_map *m);

#define A OV_ACTIVE_L2
#define B OV_REFCOUNT_BLOCK
#define C OV_INACTIVE_L2

static uint64_t W;              /* clusters a window, from the map */
static size_t RUNS_MAX;         /* the most runs a list holds: 2W / 6 */

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

static struct overlap_map_stats
stats (const struct overlap_map *m)
{
  struct overlap_map_stats st;

  assert (overlap_map_get_stats (m, &st, sizeof st) == 0);
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
  md->m = overlap_map_new ();
  assert (md->m != NULL);
}

static void
model_seg (struct model *md, uint64_t base, uint64_t len)
{
  struct seg *s = &md->segs[md->nsegs++];

  assert (md->nsegs <= MAX_SEGS);
  assert (len > 0 && base + (len - 1) >= base);
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

/* Everything: invariants, each cluster, and the whole space at once. */
static void
model_verify (struct model *md)
{
  size_t k;
  uint64_t i, hit, want_hit;
  unsigned got, want;

  check (md->m);
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

static void
test_basic (void)
{
  struct model md;
  size_t empty;
  uint64_t hit;

  printf ("basic\n");
  model_init (&md);
  model_seg (&md, 0, 4 * W);
  empty = overlap_map_memory (md.m);
  assert (overlap_map_query (md.m, 0, UINT64_MAX, OV_ALL, &hit) == 0);
  assert (overlap_map_remove (md.m, 0, 100, OV_ALL) == 0);

  model_add (&md, 10, 10, A);
  assert (stats (md.m).windows == 1 && stats (md.m).runs == 1);
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
  assert (stats (md.m).windows == 1 && stats (md.m).runs == 1);
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
  model_seg (&md, 0, 2 * W);

  model_add (&md, 100, 10, A);
  model_add (&md, 110, 10, A);              /* touches after */
  assert (stats (md.m).runs == 1);
  model_add (&md, 90, 10, A);               /* touches before */
  assert (stats (md.m).runs == 1);
  model_add (&md, 121, 5, A);               /* one cluster apart */
  assert (stats (md.m).runs == 2);
  model_add (&md, 120, 1, A);               /* fills the gap */
  assert (stats (md.m).runs == 1);
  model_add (&md, 80, 100, A);              /* overlaps both ends */
  assert (stats (md.m).runs == 1);
  model_add (&md, 95, 10, A);               /* inside */
  assert (stats (md.m).runs == 1);
  model_verify (&md);

  model_add (&md, 130, 1, B);               /* 80..130 A, 130 AB, 131..180 A */
  assert (stats (md.m).runs == 3);
  model_remove (&md, 130, 1, B);            /* merges back */
  assert (stats (md.m).runs == 1);
  model_remove (&md, 150, 1, A);            /* splits */
  assert (stats (md.m).runs == 2);
  model_query (&md, 150, 1, OV_ALL);
  model_query (&md, 149, 3, OV_ALL);
  model_query (&md, 150, 2, OV_ALL);
  model_remove (&md, 150, 1, A);            /* again: nothing */
  assert (stats (md.m).runs == 2);
  model_verify (&md);

  /* 80..120 A, 120..150 AB, 150 B, 151..160 AB, 160..180 A */
  model_add (&md, 120, 40, B);
  assert (stats (md.m).runs == 5);
  model_verify (&md);
  model_remove (&md, 0, 1000, A);           /* 120..160 B, one run */
  assert (stats (md.m).runs == 1);
  model_verify (&md);

  /* Adding the same types over different neighbours. */
  model_add (&md, 200, 10, A);
  model_add (&md, 210, 10, B);
  model_add (&md, 220, 10, A);
  assert (stats (md.m).runs == 4);
  /* 200..210 A, 210..220 AB, 220..230 A */
  model_add (&md, 205, 20, A);
  assert (stats (md.m).runs == 4);
  model_remove (&md, 210, 10, B);           /* 200..230 A */
  assert (stats (md.m).runs == 2);
  model_verify (&md);

  model_remove (&md, 0, 2 * W, OV_ALL);
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
  model_seg (&md, 0, W);

  /* An L2 table shared by the active L1 and a snapshot. */
  model_add (&md, 50, 1, OV_ACTIVE_L2);
  model_add (&md, 50, 1, OV_INACTIVE_L2);
  assert (stats (md.m).runs == 1);
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

  printf ("window edges (%" PRIu64 " clusters a window)\n", W);
  model_init (&md);
  model_seg (&md, 0, 4 * W);

  model_add (&md, W - 5, 5, A);             /* ends exactly at an edge */
  assert (stats (md.m).windows == 1);
  model_query (&md, W - 1, 2, OV_ALL);
  model_query (&md, W, 1, OV_ALL);
  model_add (&md, W, 5, A);                 /* starts exactly at it */
  assert (stats (md.m).windows == 2);
  assert (stats (md.m).runs == 2);          /* runs stop at edges */
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

  /* Spanning three windows. */
  model_add (&md, W - 3, W + 6, A);
  assert (stats (md.m).windows == 3);
  assert (stats (md.m).runs == 3);
  model_query (&md, W - 4, 1, OV_ALL);
  model_query (&md, W - 3, 1, OV_ALL);
  model_query (&md, 2 * W + 2, 1, OV_ALL);
  model_query (&md, 2 * W + 3, 1, OV_ALL);
  model_query (&md, 0, 4 * W, OV_ALL);
  model_verify (&md);

  model_remove (&md, W, W, A);              /* exactly the middle window */
  assert (stats (md.m).windows == 2);
  model_query (&md, W, W, OV_ALL);
  model_query (&md, W - 1, W + 2, OV_ALL);
  model_query (&md, W, W + 3, OV_ALL);
  model_verify (&md);

  model_add (&md, 0, 3 * W, B);             /* whole windows */
  assert (stats (md.m).windows == 3);
  model_verify (&md);
  model_remove (&md, 1, 3 * W - 2, A | B);  /* leaves the first and last */
  assert (stats (md.m).windows == 2);
  model_query (&md, 0, 3 * W, OV_ALL);
  model_query (&md, 1, 3 * W - 1, OV_ALL);
  model_verify (&md);

  model_remove (&md, 0, 4 * W, OV_ALL);
  assert (stats (md.m).windows == 0);
  model_free (&md);
}

static void
test_conversions (void)
{
  struct model md;
  struct overlap_map_stats st;
  uint64_t i;
  size_t runs_low = RUNS_MAX / 2;

  printf ("list <-> bitmap\n");
  model_init (&md);
  model_seg (&md, 0, 2 * W);

  /* One cluster in two: the list outgrows the bitmap. */
  for (i = 0; i < W; i += 2) {
    model_add (&md, i, 1, A);
    st = stats (md.m);
    assert (st.runs == i / 2 + 1);
    assert (st.bitmaps == (st.runs > RUNS_MAX));
    if (i % 64 == 0)
      check (md.m);
  }
  assert (stats (md.m).to_bitmap == 1);
  model_verify (&md);
  for (i = 0; i < 200; i++)
    model_query (&md, rnd (W), 1 + rnd (64), i & 1 ? OV_ALL : B);

  model_add (&md, 0, W, C);                 /* AC C AC C ...: W runs */
  assert (stats (md.m).runs == W && stats (md.m).bitmaps == 1);
  model_verify (&md);
  model_remove (&md, 0, W, A);              /* all C: one run */
  st = stats (md.m);
  assert (st.runs == 1 && st.bitmaps == 0 && st.to_list == 1);
  model_verify (&md);
  model_remove (&md, 0, W, C);
  assert (stats (md.m).windows == 0);

  /* One update that takes a list far past the threshold:
   * A at every 4th cluster (W/4 runs, a list), then B everywhere.
   */
  for (i = 0; i < W; i += 4)
    model_add (&md, W + i, 1, A);
  assert (stats (md.m).bitmaps == 0 && stats (md.m).runs == W / 4);
  model_add (&md, W, W, B);
  st = stats (md.m);
  assert (st.bitmaps == 1 && st.runs == W / 2 && st.to_bitmap == 2);
  model_verify (&md);

  /* Back to W/4 runs: more than RUNS_LOW, so still a bitmap. */
  model_remove (&md, W, W, B);
  st = stats (md.m);
  assert (st.runs == W / 4 && st.bitmaps == 1);
  assert (W / 4 > runs_low);
  model_verify (&md);

  /* Removing runs from the end one at a time: a list again exactly
   * when there are RUNS_LOW left.
   */
  for (i = W - 4; ; i -= 4) {
    model_remove (&md, W + i, 1, A);
    st = stats (md.m);
    assert (st.runs == i / 4);
    assert (st.bitmaps == (st.runs > runs_low));
    if (st.runs <= runs_low)
      break;
  }
  assert (st.to_list == 2);
  model_verify (&md);

  /* A bitmap emptied by one removal is freed. */
  model_add (&md, 0, W, B);
  for (i = 0; i < W; i += 2)
    model_add (&md, i, 1, A);
  assert (stats (md.m).bitmaps == 1);
  model_remove (&md, 0, W, A | B);
  assert (stats (md.m).bitmaps == 0);
  model_verify (&md);
  model_free (&md);
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
  assert (stats (md.m).windows == 4);
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

/* One metadata cluster every 'every' clusters over 'span' clusters.
 * The bound from overlap-map.c: 256 + 38 bytes a window + 8 bytes a
 * run, so at most 46 bytes a run.
 */
static void
memory_pattern (uint64_t every, uint64_t span, bool mixed)
{
  struct overlap_map *m = overlap_map_new ();
  struct overlap_map_stats st;
  size_t mem, empty;
  uint64_t c;

  assert (m != NULL);
  empty = overlap_map_memory (m);
  for (c = 0; c < span; c += every)
    assert (overlap_map_add (m, c, 1,
                             mixed && c % (4 * every) == 0 ? B : A) == 0);
  st = stats (m);
  mem = overlap_map_memory (m);
  printf ("  one in %7" PRIu64 ": %7zu runs %5zu windows (%4zu bitmaps) "
          "%9zu bytes, %5.1f a run\n",
          every, st.runs, st.windows, st.bitmaps, mem,
          (double) mem / st.runs);
  assert (mem <= 256 + 38 * st.windows + 8 * st.runs);
  assert (mem <= 256 + 46 * st.runs);
  check (m);

  /* Remove 7/8 of it: the lists and the table shrink, the table keeps
   * free slots, and what is left still answers.
   */
  assert (overlap_map_remove (m, 0, span / 8 * 7, OV_ALL) == 0);
  for (c = span / 8 * 7; c < span; c += every)
    if (c / every % 8)
      assert (overlap_map_remove (m, c, 1, OV_ALL) == 0);
  check (m);
  /* Lists at least 40% full, the table at least 1/8: 96 bytes a
   * window, 16 a run.
   */
  st = stats (m);
  assert (overlap_map_memory (m) <= 256 + 96 * st.windows + 16 * st.runs);
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
  struct overlap_map *m = overlap_map_new ();

  printf ("memory bound\n");
  empty = overlap_map_memory (m);
  assert (empty <= 256);
  overlap_map_free (m);
  for (i = 0; i < sizeof every / sizeof every[0]; i++)
    memory_pattern (every[i], every[i] < 4096 ? 1 << 19 : every[i] << 11,
                    true);
  /* Contiguous: one run a window. */
  memory_pattern (1, 1 << 19, false);
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

void *
fault_malloc (size_t size)
{
  return fail_now () ? NULL : malloc (size);
}

void *
fault_calloc (size_t nmemb, size_t size)
{
  return fail_now () ? NULL : calloc (nmemb, size);
}

void *
fault_realloc (void *ptr, size_t size)
{
  return fail_now () ? NULL : realloc (ptr, size);
}

/* After an operation that may have failed: each window is all old or
 * all new, the new ones come first, and an operation on one window
 * that failed changed nothing.  Then the model takes the map's word.
 */
static void
settle (struct model *md, int r, bool add, uint64_t first, uint64_t n,
        unsigned t, const uint16_t *before)
{
  struct seg *s = seg_of (md, first, n);
  uint64_t i;
  unsigned old, new, got;
  bool single = (first + n - 1) / W == first / W;
  bool saw_new = false, saw_old = false, any_old = false;

  assert (r == 0 || (r == -1 && errno == ENOMEM));
  for (i = first; i < first + n; i++) {
    if (i == first || i % W == 0)
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
    assert (!(any_old && saw_new));     /* a prefix of windows */
    any_old |= saw_old;
    s->ref[i - s->base] = got;
  }
  if (r == 0 || single)
    assert (r == -1 ? !saw_new : !any_old);
}

/* Build a state, then run one operation with allocation 1, 2, 3 ...
 * failing, until it runs without reaching the failing allocation.
 * 'setup' builds the same state every time.
 */
static void
fault_scenario (const char *name, void (*setup) (struct model *),
                bool add, uint64_t first, uint64_t n, unsigned t)
{
  struct model md;
  uint16_t *before = malloc (n * sizeof (uint16_t));
  struct seg *s;
  uint64_t k, i, failed = 0;
  int r;

  assert (before != NULL);
  for (k = 1; ; k++) {
    model_init (&md);
    setup (&md);
    model_verify (&md);
    s = seg_of (&md, first, n);
    for (i = 0; i < n; i++)
      before[i] = s->ref[first - s->base + i];
    fault_count = 0;
    fault_at = k;
    errno = 0;
    r = add ? overlap_map_add (md.m, first, n, t)
      : overlap_map_remove (md.m, first, n, t);
    fault_at = 0;
    check (md.m);
    failed += r == -1;
    settle (&md, r, add, first, n, t, before);
    model_verify (&md);
    model_free (&md);
    if (fault_count < k)
      break;
  }
  printf ("  %-34s %2" PRIu64 " allocations, %2" PRIu64 " failures "
          "seen by the caller\n", name, k - 1, failed);
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

/* One window of one run. */
static void
setup_one_run (struct model *md)
{
  model_seg (md, 0, 64 * W);
  model_add (md, W + 10, 100, A);
}

/* A list just below the bitmap threshold. */
static void
setup_full_list (struct model *md)
{
  uint64_t i;

  model_seg (md, 0, 64 * W);
  for (i = 0; i < RUNS_MAX; i++)
    model_add (md, W + 2 * i, 1, A);
}

/* A bitmap just above the list threshold. */
static void
setup_small_bitmap (struct model *md)
{
  uint64_t i;

  setup_full_list (md);
  model_add (md, W + 2 * RUNS_MAX, 1, A);
  assert (stats (md->m).bitmaps == 1);
  for (i = RUNS_MAX; i > RUNS_MAX / 2; i--)
    model_remove (md, W + 2 * i, 1, A);
  assert (stats (md->m).bitmaps == 1);
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

static void
test_fault_scenarios (void)
{
  printf ("allocation failures, one at a time\n");
  fault_scenario ("first window", setup_empty, true, 5, 3, A);
  fault_scenario ("table growth", setup_12_windows, true, 40 * W, 1, B);
  fault_scenario ("split by removal", setup_one_run, false, W + 50, 1, A);
  fault_scenario ("list growth", setup_one_run, true, W + 200, 1, B);
  fault_scenario ("rewrite of many runs", setup_lists, true, W, W, B);
  fault_scenario ("list -> bitmap", setup_full_list, true, W + 4000 % W, 1,
                  B);
  fault_scenario ("bitmap -> list", setup_small_bitmap, false, W, 2, A);
  fault_scenario ("list shrink", setup_lists, false, W, 250, A);
  fault_scenario ("table shrink", setup_40_windows, false, 0, 36 * W, A);
  fault_scenario ("add over 5 windows", setup_lists, true, W + 1, 5 * W, B);
  fault_scenario ("add over 8 windows, 3 new", setup_lists, true, 50,
                  8 * W, C);
}

static void
test_faults (uint64_t nops)
{
  struct model md;
  struct overlap_map_stats st;
  struct seg *s;
  uint64_t op, first, n, hot = 0, failures = 0;
  uint16_t *before = malloc (3 * W * sizeof (uint16_t));
  unsigned t;
  bool add, fill = true;
  int r;

  printf ("allocation failures\n");
  assert (before != NULL);
  model_init (&md);
  model_seg (&md, 0, 64 * W);
  s = &md.segs[0];
  fault_one_in = 8;
  for (op = 0; op < nops; op++) {
    /* As in test_random: fill and drain a hot window so that the
     * conversions fail too; elsewhere, windows come and go so that the
     * table grows and shrinks.
     */
    if (op % 10000 == 0) {
      fill = op / 10000 % 2 == 0;
      if (fill)
        hot = rnd (64) * W;
    }
    if (rnd (2)) {
      n = 1 + rnd (3);
      first = hot + rnd (W - n + 1);
    }
    else {
      n = rnd (5) ? 1 + rnd (8) : 1 + rnd (3 * W);
      first = rnd (64 * W - n + 1);
    }
    t = 1u << rnd (8);
    add = rnd (4) < (fill ? 3 : 1);
    memcpy (before, &s->ref[first], n * sizeof (uint16_t));
    errno = 0;
    r = add ? overlap_map_add (md.m, first, n, t)
      : overlap_map_remove (md.m, first, n, t);
    if (op % 64 == 0)
      check (md.m);
    failures += r == -1;
    settle (&md, r, add, first, n, t, before);
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
          " allocations failed; %" PRIu64 " list->bitmap, %" PRIu64
          " bitmap->list\n", nops, failures, faults,
          st.to_bitmap, st.to_list);
  assert (failures > 0);
  if (W <= 4096)
    assert (st.to_bitmap > 0 && st.to_list > 0);
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

static uint64_t
random_len (uint64_t max)
{
  uint64_t r = rnd (1000), n;

  if (r < 600)
    n = 1 + rnd (8);
  else if (r < 900)
    n = 1 + rnd (256);
  else if (r < 995)
    n = 1 + rnd (2 * W);
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

static void
test_random (uint64_t seed, uint64_t nops)
{
  struct model md;
  struct overlap_map_stats st;
  uint64_t op, first, n, hot = 0, counts[3] = { 0, 0, 0 };
  unsigned add_pct = 0, remove_pct = 0;
  bool fill = true;
  struct seg *s;
  clock_t start = clock ();

  printf ("random: %" PRIu64 " operations, seed %" PRIu64 "\n", nops, seed);
  rng_state = seed ? seed : 1;
  model_init (&md);
  model_seg (&md, 0, 200000);
  model_seg (&md, (UINT64_C (1) << 40) - 3000, 3 * W);
  model_seg (&md, (UINT64_C (1) << 47) + 12345, 2 * W);
  model_seg (&md, UINT64_MAX - (3 * W - 1), 3 * W);

  for (op = 0; op < nops; op++) {
    /* Phases: fill a hot window where half the operations land, then
     * drain it, so that windows cross the list/bitmap threshold both
     * ways.
     */
    if (op % 25000 == 0) {
      fill = op / 25000 % 2 == 0;
      add_pct = fill ? 50 : 15;
      remove_pct = fill ? 15 : 50;
      if (fill)
        hot = rnd (200000 / W) * W;
    }
    if (rnd (2)) {
      s = &md.segs[0];
      n = fill || rnd (8) ? 1 + rnd (4) : random_len (W);
      first = hot + rnd (W - n + 1);
    }
    else {
      s = &md.segs[rnd (10) < 7 ? 0 : 1 + rnd (md.nsegs - 1)];
      n = random_len (s->len);
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
  printf ("  %" PRIu64 " adds, %" PRIu64 " removes, %" PRIu64 " queries "
          "in %.1f s\n", counts[0], counts[1], counts[2],
          (double) (clock () - start) / CLOCKS_PER_SEC);
  printf ("  end: %zu windows (%zu bitmaps), %zu runs, %zu bytes; "
          "%" PRIu64 " list->bitmap, %" PRIu64 " bitmap->list\n",
          st.windows, st.bitmaps, st.runs, overlap_map_memory (md.m),
          st.to_bitmap, st.to_list);
  /* The phases are tuned to cross the thresholds of windows up to 4096. */
  if (nops >= 200000 && W <= 4096)
    assert (st.to_bitmap > 0 && st.to_list > 0);
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

  return only == NULL || *only == '\0' || strcmp (only, part) == 0;
}

int
main (void)
{
  struct overlap_map *m = overlap_map_new ();
  uint64_t seed = env_u64 ("OVERLAP_TEST_SEED", 20260101);
  uint64_t nops = env_u64 ("OVERLAP_TEST_OPS", 2000000);

  setvbuf (stdout, NULL, _IOLBF, 0);
  assert (m != NULL);
  W = UINT64_C (1) << stats (m).window_bits;
  RUNS_MAX = 2 * W / 6;
  overlap_map_free (m);
  rng_state = seed ? seed : 1;

  if (want ("fixed")) {
    /* These place ranges anywhere in [0, 512) and count windows. */
    if (W >= 512) {
      test_basic ();
      test_merge ();
      test_types ();
    }
    else
      printf ("basic, merge, types: skipped, windows smaller than 512\n");
    test_window_edges ();
    test_conversions ();
    test_huge ();
    test_memory ();
  }
#ifdef OVERLAP_MAP_FAULT_INJECTION
  if (want ("faults")) {
    test_fault_scenarios ();
    test_faults (nops / 20 + 1000);
  }
#else
  printf ("allocation failures: not built in "
          "(needs -DOVERLAP_MAP_FAULT_INJECTION)\n");
#endif
  if (want ("random"))
    test_random (seed, nops);
  printf ("ok\n");
  return 0;
}
