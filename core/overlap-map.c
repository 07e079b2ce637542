/* nbdkit-qcow2: the metadata overlap map.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Which host clusters hold metadata, and of which types (OV_* bits; a
 * cluster may carry several: an L2 table shared by the active L1 and a
 * snapshot is OV_ACTIVE_L2|OV_INACTIVE_L2).  overlap.c asks it before
 * every guest data write, so a query must cost the same on a 1 GB image
 * as on a 1 PB one.  QEMU's check walks the L1 and refcount tables on
 * every write instead, which makes metadata preallocation with small
 * clusters quadratic.  The idea used here (windows of clusters, each a
 * run list or a bitmap) is from Max Reitz's 2014 qemu-devel series,
 * which was never merged; this is an independent implementation.
 *
 * The cluster space is cut into windows of WINDOW_SIZE (4096) clusters.
 * Only windows that hold some metadata exist.  They are found through an
 * open-addressing hash table keyed by the window number, because host
 * files are sparse and window numbers go up to 2^52: no flat array.
 *
 *   slots[hash (cluster >> 12)]
 *     |
 *     +--> window 5 (list)    types = L2|RB (union, the summary)
 *     |      runs: [3,4) L2  [70,71) L2  [200,202) RB  ...
 *     |
 *     +--> window 9 (bitmap)  types = L2|RB
 *            uint16_t bitmap[4096]: 0 0 L2 0 RB RB 0 L2 ...
 *
 * A window is one allocation: a 16 byte header followed either by a
 * sorted list of runs (6 bytes each: start, end, types, relative to the
 * window) or, once the list would be bigger than that, by one uint16_t
 * per cluster (8 KiB).  Metadata is mostly scattered single clusters
 * (L2 tables, refcount blocks), so almost every window is a list.
 *
 * Invariants (overlap_map_check verifies them for the unit test):
 * - A window exists iff some cluster in it has types != 0.
 * - A run list is sorted; its runs are non-empty, disjoint, have types
 *   != 0, and two runs that touch have different types.  So the list is
 *   the unique list of maximal runs: adding a range next to a run of
 *   the same types extends that run, removing the middle splits it.
 * - w->nruns counts those maximal runs in both representations (a
 *   bitmap update recounts only the edges it touched); w->types is the
 *   exact union of the window's types.
 * - A list has at most RUNS_MAX runs (the bitmap's size in runs).  A
 *   bitmap that falls to RUNS_LOW runs goes back to a list; the gap
 *   stops a window at the threshold from flapping.
 *
 * Costs (W = WINDOW_SIZE, r = runs in a window, n = clusters asked):
 * - query: for each window the range touches, one hash probe (usually
 *   one slot), then the summary (no wanted type: done, which is the
 *   common case), then a binary search, O(log r) with r <= 1365, or a
 *   scan of the n clusters in a bitmap.  A range covering more windows
 *   than the table has slots walks the table instead.  The cost never
 *   depends on the image size or on how many windows exist.
 * - add/remove: O(log r + r) for a list (the tail moves), O(n) for a
 *   bitmap, O(W) for a conversion.  Metadata changes are rare next to
 *   data writes.
 * - memory (add-only; what overlap_map_memory counts, malloc's own
 *   overhead excluded): 16 bytes a window + 8 bytes a slot at load 3/8
 *   to 3/4 (at most 22 bytes a window) + 6 bytes a run, lists growing by
 *   a quarter.  Bound: 256 + 38 * windows + 8 * runs, at most 46 bytes a
 *   run when every run is alone in its window (64 KiB clusters) and
 *   about 7 when windows hold many runs (512 byte clusters, where
 *   memory matters).  After heavy removals lists shrink when less than
 *   40% full and the table when less than 1/8 full.  The 2014 estimate,
 *   40 * image_size / cluster_size^2, counted 4 byte entries with 8 bits
 *   of types and nothing per window; we need 11 bits of types, so 6 byte
 *   runs: a preallocated image with 512 byte clusters takes 1.8 times
 *   the estimate (bench/overlap-bench.c).
 *
 * No cache of expanded bitmaps, unlike the 2014 design: it expanded a
 * window to query it, so it needed an LRU; here a query reads the list
 * directly, and a window is a bitmap only when that is also the smaller
 * form.  So a query never writes to the map.
 *
 * Locking: none.  Callers serialize updates (img->lock); since queries
 * only read, concurrent queries under a read lock are safe.
 *
 * Types are stored in 16 bits: higher bits passed in are ignored.
 * Cluster numbers cover all of uint64_t; a range running past
 * UINT64_MAX is cut there.
 *
 * Errors: only ENOMEM.  An update of one window is all or nothing: every
 * allocation happens before the window is touched, and failures of the
 * optional steps (shrinking, bitmap -> list) are ignored.  XXX An update
 * spanning several windows is not atomic: when window k fails, windows
 * before k keep the change.  The map is valid either way.  XXX Removal
 * can fail too (splitting a run needs room for one more); what is left
 * behind is a type on a cluster that no longer has it, which can only
 * cause a false alarm, never a missed overlap.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>

#include "overlap.h"

#ifdef OVERLAP_MAP_FAULT_INJECTION
/* The unit test's allocator, which fails on demand. */
extern void *fault_malloc (size_t size);
extern void *fault_calloc (size_t nmemb, size_t size);
extern void *fault_realloc (void *ptr, size_t size);
#define malloc fault_malloc
#define calloc fault_calloc
#define realloc fault_realloc
#endif

/* 4096 clusters: a bitmap is 8 KiB (cheap to build and to drop), a list
 * has at most 1365 runs (binary search in 11 steps, a tail move of at
 * most 8 KiB), and positions fit in uint16_t with room for the end.
 * bench/overlap-bench.c compares other sizes.
 */
#ifndef OVERLAP_WINDOW_BITS
#define OVERLAP_WINDOW_BITS 12
#endif
#define WINDOW_BITS OVERLAP_WINDOW_BITS
#define WINDOW_SIZE (UINT32_C (1) << WINDOW_BITS)
#define WINDOW_MASK (WINDOW_SIZE - 1)

/* Run positions and run counts (up to WINDOW_SIZE) are uint16_t. */
_Static_assert (WINDOW_BITS >= 4 && WINDOW_BITS <= 15, "bad window size");

#define TYPES_MASK 0xffffu

struct run {
  uint16_t start;               /* window-relative, [start, end) */
  uint16_t end;
  uint16_t types;
};

/* A list longer than RUNS_MAX would be bigger than the bitmap. */
#define RUNS_MAX (WINDOW_SIZE * sizeof (uint16_t) / sizeof (struct run))
#define RUNS_LOW (RUNS_MAX / 2)

/* Updates build their new runs here when they fit. */
#define STACK_RUNS 64

struct window {
  uint64_t index;               /* first cluster >> WINDOW_BITS */
  uint16_t types;               /* union of all types in the window */
  uint16_t nruns;               /* maximal runs, in either form */
  uint16_t cap;                 /* runs allocated (lists only) */
  bool is_bitmap;
  struct run runs[];            /* or uint16_t[WINDOW_SIZE] if is_bitmap */
};

#define MIN_SLOT_BITS 4

struct overlap_map {
  struct window **slots;        /* NULL when there are no windows */
  size_t nslots;                /* 0 or a power of 2 */
  unsigned slot_bits;
  size_t nwindows;
  size_t bytes;                 /* sum of window allocations */
  uint64_t to_bitmap, to_list;  /* conversions, for tests and benchmarks */
};

static inline uint64_t
window_of (uint64_t cluster)
{
  return cluster >> WINDOW_BITS;
}

static inline unsigned
offset_in_window (uint64_t cluster)
{
  return cluster & WINDOW_MASK;
}

/* The last cluster of [first, first+n), n > 0, cut at UINT64_MAX. */
static inline uint64_t
range_last (uint64_t first, uint64_t n)
{
  return n - 1 > UINT64_MAX - first ? UINT64_MAX : first + (n - 1);
}

static inline uint16_t *
bitmap (struct window *w)
{
  return (uint16_t *) w->runs;
}

static inline const uint16_t *
cbitmap (const struct window *w)
{
  return (const uint16_t *) w->runs;
}

static size_t
list_bytes (size_t cap)
{
  return offsetof (struct window, runs) + cap * sizeof (struct run);
}

static size_t
window_bytes (const struct window *w)
{
  if (w->is_bitmap)
    return offsetof (struct window, runs) + WINDOW_SIZE * sizeof (uint16_t);
  return list_bytes (w->cap);
}

/* Room for a list of n runs: a quarter spare, so appending one run at a
 * time reallocates O(log n) times.
 */
static size_t
target_cap (size_t n)
{
  size_t cap = n + n / 4;

  return cap > RUNS_MAX ? RUNS_MAX : cap;
}

/*----------------------------------------------------------------------
 * The table of windows: linear probing, Fibonacci hashing (consecutive
 * window numbers, the usual case, land in distinct slots), deletion by
 * shifting back the entries after the hole (no tombstones).
 */

static inline size_t
hash (const struct overlap_map *m, uint64_t index)
{
  return (index * UINT64_C (0x9e3779b97f4a7c15)) >> (64 - m->slot_bits);
}

/* The slot holding window 'index', or the empty slot where it would go.
 * Needs a table (nslots > 0), which always has an empty slot.
 */
static struct window **
find_slot (const struct overlap_map *m, uint64_t index)
{
  size_t mask = m->nslots - 1;
  size_t i = hash (m, index);

  while (m->slots[i] != NULL && m->slots[i]->index != index)
    i = (i + 1) & mask;
  return &m->slots[i];
}

static const struct window *
find_window (const struct overlap_map *m, uint64_t index)
{
  if (m->nwindows == 0)
    return NULL;
  return *find_slot (m, index);
}

static int
rehash (struct overlap_map *m, unsigned bits)
{
  struct window **old = m->slots;
  size_t oldn = m->nslots, i;
  struct window **slots;

  slots = calloc ((size_t) 1 << bits, sizeof *slots);
  if (slots == NULL) {
    errno = ENOMEM;
    return -1;
  }
  m->slots = slots;
  m->nslots = (size_t) 1 << bits;
  m->slot_bits = bits;
  for (i = 0; i < oldn; i++)
    if (old[i] != NULL)
      *find_slot (m, old[i]->index) = old[i];
  free (old);
  return 0;
}

/* Make room for one more window (keeping the load at most 3/4). */
static int
reserve_slot (struct overlap_map *m)
{
  if ((m->nwindows + 1) * 4 <= m->nslots * 3)
    return 0;
  return rehash (m, m->nslots ? m->slot_bits + 1 : MIN_SLOT_BITS);
}

/* Free the window in 'slot' and close the hole: an entry after it may
 * move into the hole if the hole is on its probe path (between its home
 * slot and where it sits).
 */
static void
delete_slot (struct overlap_map *m, struct window **slot)
{
  size_t mask = m->nslots - 1;
  size_t hole = slot - m->slots, j = hole, home;

  m->bytes -= window_bytes (*slot);
  free (*slot);
  m->nwindows--;
  for (;;) {
    j = (j + 1) & mask;
    if (m->slots[j] == NULL)
      break;
    home = hash (m, m->slots[j]->index);
    if (((j - home) & mask) >= ((j - hole) & mask)) {
      m->slots[hole] = m->slots[j];
      hole = j;
    }
  }
  m->slots[hole] = NULL;
}

/* After removals.  Not done inside delete_slot, so that walking the
 * table while deleting stays possible.  Failure keeps the big table.
 */
static void
maybe_shrink (struct overlap_map *m)
{
  unsigned bits = m->slot_bits;

  if (m->nwindows == 0) {
    free (m->slots);
    m->slots = NULL;
    m->nslots = 0;
    m->slot_bits = 0;
    return;
  }
  if (m->nwindows * 8 >= m->nslots)
    return;
  while (bits > MIN_SLOT_BITS && m->nwindows * 2 <= ((size_t) 1 << (bits - 1)))
    bits--;
  if (bits < m->slot_bits)
    rehash (m, bits);
}

/*----------------------------------------------------------------------
 * Run lists.
 */

/* Index of the first run with end > x.  Written so that the compiler
 * uses conditional moves: the branches of a plain binary search are
 * unpredictable, and a query searches a different window each time.
 */
static size_t
first_end_above (const struct window *w, unsigned x)
{
  const struct run *base = w->runs;
  size_t n = w->nruns, half;

  if (n == 0)
    return 0;
  while (n > 1) {
    half = n / 2;
    base = base[half].end <= x ? base + half : base;
    n -= half;
  }
  return (base - w->runs) + (base->end <= x);
}

/* Index of the first run with start > x. */
static size_t
first_start_above (const struct window *w, unsigned x)
{
  const struct run *base = w->runs;
  size_t n = w->nruns, half;

  if (n == 0)
    return 0;
  while (n > 1) {
    half = n / 2;
    base = base[half].start <= x ? base + half : base;
    n -= half;
  }
  return (base - w->runs) + (base->start <= x);
}

/* Append [start, end) with types t to out, merging with the last run. */
static void
emit (struct run *out, size_t *n, unsigned start, unsigned end, unsigned t)
{
  if (t == 0)
    return;
  if (*n > 0 && out[*n - 1].end == start && out[*n - 1].types == t) {
    out[*n - 1].end = end;
    return;
  }
  out[*n] = (struct run) { .start = start, .end = end, .types = t };
  (*n)++;
}

/* Write to out the runs replacing old[0..k): the k runs that overlap
 * or touch [a, b), with (types & ~clear) | set applied inside [a, b).
 * The span rewritten starts at the first old run or a, and ends at the
 * last old run or b; runs outside it are at least one cluster away or
 * keep the types they had at the span's edge, so the result stays the
 * list of maximal runs.  At most 2k+1 runs come out (each old run and
 * each gap becomes at most one run).
 */
static size_t
rewrite (const struct run *old, size_t k, unsigned a, unsigned b,
         unsigned clear, unsigned set, struct run *out)
{
  unsigned pos = a, end = b, next, t;
  size_t i = 0, n = 0;

  if (k > 0) {
    if (old[0].start < pos)
      pos = old[0].start;
    if (old[k - 1].end > end)
      end = old[k - 1].end;
  }
  while (pos < end) {
    while (i < k && old[i].end <= pos)
      i++;
    if (i < k && old[i].start <= pos) {
      t = old[i].types;
      next = old[i].end;
    }
    else {
      t = 0;
      next = i < k ? old[i].start : end;
    }
    if (pos < a && next > a)
      next = a;
    if (pos >= a && pos < b) {
      if (next > b)
        next = b;
      t = (t & ~clear) | set;
    }
    emit (out, &n, pos, next, t);
    pos = next;
  }
  return n;
}

/* Resize a list window; failure leaves it as it was. */
static int
resize_list (struct overlap_map *m, struct window **slot, size_t cap)
{
  struct window *w;

  w = realloc (*slot, list_bytes (cap));
  if (w == NULL) {
    errno = ENOMEM;
    return -1;
  }
  m->bytes += list_bytes (cap) - list_bytes (w->cap);
  w->cap = cap;
  *slot = w;
  return 0;
}

static unsigned
list_union (const struct window *w)
{
  unsigned t = 0;
  size_t i;

  for (i = 0; i < w->nruns; i++)
    t |= w->runs[i].types;
  return t;
}

/* Put new[0..n) in place of runs [lo, lo+k). */
static int
splice (struct overlap_map *m, struct window **slot, size_t lo, size_t k,
        const struct run *new, size_t n)
{
  struct window *w = *slot;
  size_t count = w->nruns - k + n;
  size_t tail = w->nruns - lo - k;

  if (count > w->cap) {
    if (resize_list (m, slot, target_cap (count)) == -1)
      return -1;
    w = *slot;
  }
  memmove (&w->runs[lo + n], &w->runs[lo + k], tail * sizeof (struct run));
  memcpy (&w->runs[lo], new, n * sizeof (struct run));
  w->nruns = count;
  if (count > 0 && w->cap > 2 * target_cap (count) + 2)
    resize_list (m, slot, target_cap (count));
  return 0;
}

/*----------------------------------------------------------------------
 * Bitmaps, and conversions.
 */

/* How many runs start in [from, to). */
static unsigned
count_starts (const uint16_t *bm, unsigned from, unsigned to)
{
  unsigned i, n = 0;

  for (i = from; i < to; i++)
    if (bm[i] != 0 && (i == 0 || bm[i - 1] != bm[i]))
      n++;
  return n;
}

static int
to_bitmap (struct overlap_map *m, struct window **slot)
{
  struct window *w = *slot, *b;
  uint16_t *bm;
  size_t i;
  unsigned j;

  b = malloc (offsetof (struct window, runs) + WINDOW_SIZE * sizeof (uint16_t));
  if (b == NULL) {
    errno = ENOMEM;
    return -1;
  }
  *b = *w;
  b->cap = 0;
  b->is_bitmap = true;
  bm = bitmap (b);
  memset (bm, 0, WINDOW_SIZE * sizeof (uint16_t));
  for (i = 0; i < w->nruns; i++)
    for (j = w->runs[i].start; j < w->runs[i].end; j++)
      bm[j] = w->runs[i].types;
  m->bytes += window_bytes (b) - window_bytes (w);
  m->to_bitmap++;
  free (w);
  *slot = b;
  return 0;
}

/* Optional: on failure the window stays a (valid) bitmap. */
static void
to_list (struct overlap_map *m, struct window **slot)
{
  struct window *b = *slot, *w;
  const uint16_t *bm = bitmap (b);
  size_t cap = target_cap (b->nruns), n = 0;
  unsigned i = 0, j;

  w = malloc (list_bytes (cap));
  if (w == NULL)
    return;
  *w = *b;
  w->cap = cap;
  w->is_bitmap = false;
  while (i < WINDOW_SIZE) {
    if (bm[i] == 0) {
      i++;
      continue;
    }
    for (j = i + 1; j < WINDOW_SIZE && bm[j] == bm[i]; j++)
      ;
    w->runs[n++] = (struct run) { .start = i, .end = j, .types = bm[i] };
    i = j;
  }
  m->bytes += window_bytes (w) - window_bytes (b);
  m->to_list++;
  free (b);
  *slot = w;
}

static unsigned
bitmap_union (const uint16_t *bm)
{
  unsigned i, t = 0;

  for (i = 0; i < WINDOW_SIZE; i++)
    t |= bm[i];
  return t;
}

/* Cannot fail. */
static void
bitmap_update (struct overlap_map *m, struct window **slot,
               unsigned a, unsigned b, unsigned clear, unsigned set)
{
  struct window *w = *slot;
  uint16_t *bm = bitmap (w);
  /* Whether a run starts at i depends on clusters i-1 and i, so the
   * starts that can change are those in [a, b].
   */
  unsigned edge = b < WINDOW_SIZE ? b + 1 : WINDOW_SIZE;
  unsigned before = count_starts (bm, a, edge), i;

  for (i = a; i < b; i++)
    bm[i] = (bm[i] & ~clear) | set;
  w->nruns = w->nruns - before + count_starts (bm, a, edge);
  w->types = clear ? bitmap_union (bm) : w->types | set;
  if (w->nruns > 0 && w->nruns <= RUNS_LOW)
    to_list (m, slot);
}

/*----------------------------------------------------------------------
 * Updates.
 */

static int
list_update (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set)
{
  struct window *w = *slot;
  struct run stack[STACK_RUNS], *new = stack;
  size_t lo, hi, n;
  int r;

  /* The runs that overlap or touch [a, b). */
  lo = a > 0 ? first_end_above (w, a - 1) : 0;
  hi = first_start_above (w, b);
  if (2 * (hi - lo) + 1 > STACK_RUNS) {
    new = malloc ((2 * (hi - lo) + 1) * sizeof *new);
    if (new == NULL) {
      errno = ENOMEM;
      return -1;
    }
  }
  n = rewrite (&w->runs[lo], hi - lo, a, b, clear, set, new);
  if (w->nruns - (hi - lo) + n <= RUNS_MAX) {
    r = splice (m, slot, lo, hi - lo, new, n);
    if (r == 0)
      (*slot)->types = clear ? list_union (*slot) : (*slot)->types | set;
  }
  else if ((r = to_bitmap (m, slot)) == 0)
    bitmap_update (m, slot, a, b, clear, set);
  if (new != stack)
    free (new);
  return r;
}

static int
new_window (struct overlap_map *m, uint64_t index,
            unsigned a, unsigned b, unsigned types)
{
  struct window *w;

  if (reserve_slot (m) == -1)
    return -1;
  w = malloc (list_bytes (1));
  if (w == NULL) {
    errno = ENOMEM;
    return -1;
  }
  w->index = index;
  w->types = types;
  w->nruns = 1;
  w->cap = 1;
  w->is_bitmap = false;
  w->runs[0] = (struct run) { .start = a, .end = b, .types = types };
  *find_slot (m, index) = w;
  m->nwindows++;
  m->bytes += list_bytes (1);
  return 0;
}

/* Apply the update to [a, b) of the window in 'slot'. */
static int
update_slot (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set)
{
  if (set == 0 && ((*slot)->types & clear) == 0)
    return 0;
  if ((*slot)->is_bitmap)
    bitmap_update (m, slot, a, b, clear, set);
  else if (list_update (m, slot, a, b, clear, set) == -1)
    return -1;
  if ((*slot)->nruns == 0)
    delete_slot (m, slot);
  return 0;
}

static int
update_window (struct overlap_map *m, uint64_t index,
               unsigned a, unsigned b, unsigned clear, unsigned set)
{
  struct window **slot = NULL;

  if (m->nslots > 0)
    slot = find_slot (m, index);
  if (slot == NULL || *slot == NULL)
    return set ? new_window (m, index, a, b, set) : 0;
  return update_slot (m, slot, a, b, clear, set);
}

/* A removal over more windows than there are slots: walk the table.  A
 * deletion may shift a later window into slot i (look at it again) or a
 * wrapped-around one past i (seen twice, which is harmless).
 */
static int
remove_by_walk (struct overlap_map *m, uint64_t first, uint64_t last,
                unsigned clear)
{
  uint64_t fw = window_of (first), lw = window_of (last), index;
  size_t i = 0;
  unsigned a, b;

  while (i < m->nslots) {
    struct window *w = m->slots[i];

    if (w != NULL && w->index >= fw && w->index <= lw) {
      index = w->index;
      a = index == fw ? offset_in_window (first) : 0;
      b = index == lw ? offset_in_window (last) + 1 : WINDOW_SIZE;
      if (update_slot (m, &m->slots[i], a, b, clear, 0) == -1)
        return -1;
      if (m->slots[i] == NULL || m->slots[i]->index != index)
        continue;
    }
    i++;
  }
  return 0;
}

static int
update_range (struct overlap_map *m, uint64_t first, uint64_t n,
              unsigned clear, unsigned set)
{
  uint64_t last, fw, lw, wi;
  unsigned a, b;
  int r = 0;

  if (n == 0 || (clear | set) == 0 || (set == 0 && m->nwindows == 0))
    return 0;
  last = range_last (first, n);
  fw = window_of (first);
  lw = window_of (last);
  if (set == 0 && lw - fw >= m->nslots)
    r = remove_by_walk (m, first, last, clear);
  else {
    for (wi = fw; ; wi++) {
      a = wi == fw ? offset_in_window (first) : 0;
      b = wi == lw ? offset_in_window (last) + 1 : WINDOW_SIZE;
      r = update_window (m, wi, a, b, clear, set);
      if (r == -1 || wi == lw)
        break;
    }
  }
  if (clear)
    maybe_shrink (m);
  return r;
}

/*----------------------------------------------------------------------
 * Queries.
 */

static unsigned
query_list (const struct window *w, unsigned a, unsigned b,
            unsigned mask, unsigned *pos)
{
  size_t i;
  unsigned t = 0;

  for (i = first_end_above (w, a);
       i < w->nruns && w->runs[i].start < b; i++) {
    if ((w->runs[i].types & mask) == 0)
      continue;
    if (t == 0)
      *pos = w->runs[i].start > a ? w->runs[i].start : a;
    t |= w->runs[i].types & mask;
  }
  return t;
}

static unsigned
query_bitmap (const struct window *w, unsigned a, unsigned b,
              unsigned mask, unsigned *pos)
{
  const uint16_t *bm = cbitmap (w);
  unsigned i, t = 0;

  for (i = a; i < b && (bm[i] & mask) == 0; i++)
    ;
  if (i == b)
    return 0;
  *pos = i;
  for (; i < b; i++)            /* no early exit: vectorizes */
    t |= bm[i];
  return t & mask;
}

static unsigned
query_window (const struct window *w, unsigned a, unsigned b,
              unsigned mask, unsigned *pos)
{
  if ((w->types & mask) == 0)
    return 0;
  if (w->is_bitmap)
    return query_bitmap (w, a, b, mask, pos);
  return query_list (w, a, b, mask, pos);
}

/* A query over more windows than there are slots: walk the table. */
static unsigned
query_by_walk (const struct overlap_map *m, uint64_t first, uint64_t last,
               unsigned mask, uint64_t *hit)
{
  uint64_t fw = window_of (first), lw = window_of (last), c;
  uint64_t best = UINT64_MAX;
  unsigned a, b, t, pos = 0, types = 0;
  size_t i;

  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];

    if (w == NULL || w->index < fw || w->index > lw)
      continue;
    a = w->index == fw ? offset_in_window (first) : 0;
    b = w->index == lw ? offset_in_window (last) + 1 : WINDOW_SIZE;
    t = query_window (w, a, b, mask, &pos);
    if (t == 0)
      continue;
    c = (w->index << WINDOW_BITS) | pos;
    if (types == 0 || c < best)
      best = c;
    types |= t;
  }
  if (types && hit)
    *hit = best;
  return types;
}

/*----------------------------------------------------------------------
 * The API (overlap.h).
 */

struct overlap_map *
overlap_map_new (void)
{
  struct overlap_map *m = calloc (1, sizeof *m);

  if (m == NULL)
    errno = ENOMEM;
  return m;
}

void
overlap_map_free (struct overlap_map *m)
{
  size_t i;

  if (m == NULL)
    return;
  for (i = 0; i < m->nslots; i++)
    free (m->slots[i]);
  free (m->slots);
  free (m);
}

int
overlap_map_add (struct overlap_map *m, uint64_t first, uint64_t n,
                 unsigned types)
{
  return update_range (m, first, n, 0, types & TYPES_MASK);
}

int
overlap_map_remove (struct overlap_map *m, uint64_t first, uint64_t n,
                    unsigned types)
{
  return update_range (m, first, n, types & TYPES_MASK, 0);
}

unsigned
overlap_map_query (struct overlap_map *m, uint64_t first, uint64_t n,
                   unsigned mask, uint64_t *hit)
{
  uint64_t last, fw, lw, wi;
  const struct window *w;
  unsigned a, b, t, pos = 0, types = 0;

  mask &= TYPES_MASK;
  if (n == 0 || mask == 0 || m->nwindows == 0)
    return 0;
  last = range_last (first, n);
  fw = window_of (first);
  lw = window_of (last);
  if (lw - fw >= m->nslots)
    return query_by_walk (m, first, last, mask, hit);
  for (wi = fw; ; wi++) {
    w = find_window (m, wi);
    if (w != NULL) {
      a = wi == fw ? offset_in_window (first) : 0;
      b = wi == lw ? offset_in_window (last) + 1 : WINDOW_SIZE;
      t = query_window (w, a, b, mask, &pos);
      if (t != 0 && types == 0 && hit)
        *hit = (wi << WINDOW_BITS) | pos;
      types |= t;
    }
    if (wi == lw)
      break;
  }
  return types;
}

size_t
overlap_map_memory (const struct overlap_map *m)
{
  return sizeof *m + m->nslots * sizeof *m->slots + m->bytes;
}

/*----------------------------------------------------------------------
 * Introspection for tests/test-overlap-map.c and bench/overlap-bench.c,
 * which declare these themselves: the image never needs them.  The
 * size argument catches a stale copy of the struct.
 */

struct overlap_map_stats {
  unsigned window_bits;
  size_t windows;
  size_t bitmaps;               /* windows held as bitmaps */
  size_t runs;                  /* maximal runs, all windows */
  uint64_t to_bitmap;           /* conversions so far */
  uint64_t to_list;
};

extern int overlap_map_get_stats (const struct overlap_map *m,
                                  struct overlap_map_stats *st, size_t size);
extern const char *overlap_map_check (const struct overlap_map *m);

int
overlap_map_get_stats (const struct overlap_map *m,
                       struct overlap_map_stats *st, size_t size)
{
  size_t i;

  if (size != sizeof *st) {
    errno = EINVAL;
    return -1;
  }
  memset (st, 0, sizeof *st);
  st->window_bits = WINDOW_BITS;
  st->windows = m->nwindows;
  st->to_bitmap = m->to_bitmap;
  st->to_list = m->to_list;
  for (i = 0; i < m->nslots; i++) {
    if (m->slots[i] == NULL)
      continue;
    st->bitmaps += m->slots[i]->is_bitmap;
    st->runs += m->slots[i]->nruns;
  }
  return 0;
}

static const char *
check_list (const struct window *w)
{
  size_t i;

  if (w->nruns > w->cap || w->cap > RUNS_MAX)
    return "list: bad nruns or cap";
  for (i = 0; i < w->nruns; i++) {
    const struct run *r = &w->runs[i];

    if (r->start >= r->end || r->end > WINDOW_SIZE || r->types == 0)
      return "list: empty, out of window or typeless run";
    if (i > 0 && r->start < r[-1].end)
      return "list: runs unsorted or overlapping";
    if (i > 0 && r->start == r[-1].end && r->types == r[-1].types)
      return "list: touching runs with equal types not merged";
  }
  if (w->types != list_union (w))
    return "list: summary is not the union of the runs";
  return NULL;
}

static const char *
check_bitmap (const struct window *w)
{
  const uint16_t *bm = cbitmap (w);

  if (w->nruns != count_starts (bm, 0, WINDOW_SIZE))
    return "bitmap: nruns is not the number of runs";
  if (w->types != bitmap_union (bm))
    return "bitmap: summary is not the union of the types";
  return NULL;
}

/* NULL if the map is sound, else what is wrong with it. */
const char *
overlap_map_check (const struct overlap_map *m)
{
  size_t i, n = 0, bytes = 0;
  const char *err;

  if (m->nslots == 0)
    return m->nwindows == 0 && m->bytes == 0 ? NULL : "no table, but windows";
  if (m->nslots != (size_t) 1 << m->slot_bits ||
      m->nwindows * 4 > m->nslots * 3)
    return "table: bad size or overloaded";
  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];

    if (w == NULL)
      continue;
    n++;
    bytes += window_bytes (w);
    if (*find_slot (m, w->index) != w)
      return "table: window not found from its hash";
    if (w->nruns == 0)
      return "window: empty window kept";
    err = w->is_bitmap ? check_bitmap (w) : check_list (w);
    if (err)
      return err;
  }
  if (n != m->nwindows)
    return "table: nwindows is wrong";
  if (bytes != m->bytes)
    return "table: byte count is wrong";
  return NULL;
}
