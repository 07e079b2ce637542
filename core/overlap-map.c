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
 * compact list of runs) is from Max Reitz's 2014 qemu-devel series,
 * which was never merged; this is an independent implementation.  That
 * series estimated its memory at 40 * image_size / cluster_size^2
 * bytes: 5 bytes an L2 table of a fully allocated image, which is
 * about 4 bytes a run (refcount blocks are runs too).
 *
 * Windows.  The cluster space is cut into windows of 2^wbits clusters,
 * wbits = cluster_bits + 3, each cut into 64 sub-windows.  Metadata of
 * a fully allocated image is an L2 table every cluster_size/8 clusters
 * and a refcount block every cluster_size/2 (16-bit refcounts), so a
 * window holds about 80 runs and a sub-window about 1.25, whatever the
 * cluster size: the per-window cost is spread over the same number of
 * runs, and a query finds its run in one step.  512 byte clusters get
 * windows of 4096 clusters (sub-windows of 64), 64 KiB clusters windows
 * of 2^19 (32 GiB of file, sub-windows of 2^13).  When a sub-window
 * start needs more than 15 bits (cluster_bits >= 19) entries take 3
 * bytes anyway, and windows are 4 times bigger (wbits = cluster_bits
 * + 5: 2 MiB clusters, 2^26) to spread the fixed cost over ~320 runs.
 *
 * Only windows that hold some metadata exist.  They are found through
 * an open-addressing hash table keyed by the window number, because
 * host files are sparse and window numbers go up to 2^52: no flat array.
 *
 *   slots[hash (cluster >> wbits)]
 *     |
 *     +--> window 5: header | palette | index | entries
 *     +--> window 9: ...
 *
 * A window is one allocation, in a format that is the smallest for
 * what it holds (all little-endian, unaligned):
 *
 *   header     20 bytes: window number, allocation size, run count,
 *              the union of its types (the summary), the format
 *   palette    the distinct type sets of its runs, sorted, 2 bytes each
 *              (usually 2: OV_ACTIVE_L2 and OV_REFCOUNT_BLOCK)
 *   index      65 entries of ibytes (1, or 2 past 255 runs): entry k
 *              is the number of runs before sub-window k
 *   entries    one a run, ebytes each (1 to 8), sorted:
 *                start << (8*ebytes - sbits) | (length-1) << tbits | p
 *              start: relative to the run's sub-window (sbits bits);
 *              p: the run's palette index (tbits = log2 of the palette
 *              size, rounded up; 0 bits for one type set); the length
 *              gets the bits left, at least those of the longest run
 *
 * Runs never cross a sub-window edge (a longer range is cut there), so
 * a run's start and length fit sbits.  512 byte clusters with two type
 * sets take 1-byte entries (6 + 1 bits), 64 KiB clusters 2 bytes
 * (13 + 1), 2 MiB clusters 3 bytes (20 + 1).  A rare window with long
 * runs (the refcount table, the L1 table) or many type sets gets wider
 * entries, and only that window.
 *
 * Invariants (overlap_map_check verifies them for the unit test):
 * - A window exists iff some cluster in it has types != 0.
 * - Entries are sorted; runs are non-empty, disjoint, have types != 0,
 *   stay in their sub-window, and two runs that touch inside a
 *   sub-window have different types.  So the list is the unique list
 *   of runs maximal within sub-windows: adding a range next to a run
 *   of the same types extends that run, removing the middle splits it,
 *   and nruns counts those runs.
 * - The format is the smallest: the palette is exactly the type sets
 *   used; tbits, ibytes, lbits (bits of the longest length - 1) and
 *   ebytes = ceil ((sbits + tbits + lbits) / 8) are the least that
 *   hold them; the allocation is the glibc chunk size for that.  So
 *   memory depends only on what the map holds, not on its history
 *   (but for a shrinking realloc that failed, which keeps the bigger
 *   block, counted).
 * - The summary is the union of the palette.
 * - Coarse windows (wbits > 12: cluster_bits >= 10) hold at most 4096
 *   runs; fine windows hold at most one a cluster, so at most 4096.
 *
 * Regrain.  An update that would take a coarse window past 4096 runs
 * rebuilds the whole map with fine windows of 4096 clusters (and
 * sub-windows of 64) and starts again; the map stays fine.  Real images
 * get there only with metadata some 50 times denser than a fully
 * allocated image (heavy snapshot use, or a crafted file); it bounds
 * the cost of an update in every window.  There is no bitmap form: a
 * dense window is still smallest as a list of 1 or 2-byte entries (the
 * old uint16_t per cluster took 8 KiB a window).
 *
 * Costs (r = runs in a window, n = clusters asked):
 * - query: nothing if the range starts past the highest cluster ever
 *   added (m->hi: allocations at the end of the file, the usual case
 *   for new data).  Else for each window the range touches, one hash
 *   probe (usually one slot), the summary (no wanted type: done, the
 *   common case), then for each sub-window touched two index reads, a
 *   binary search if it has more than 4 runs (O(log r)), and a scan of
 *   its runs that start before the end of the range.  Entries are read
 *   with 8-byte loads, the code inlined for each entry size.  A range
 *   covering more windows than the table has slots walks the table
 *   instead.  The cost never depends on the image size or on how many
 *   windows exist.
 * - add/remove: two binary searches, then O(r) (the entries after the
 *   change move, the index entries after it are adjusted 8 at a time);
 *   adding a run of a known type set is a short path.  When the format
 *   changes, the window is rebuilt, O(r + palette).  r <= 4096.  A
 *   regrain is O(all runs), once.  Metadata changes are rare next to
 *   data writes.
 * - memory: what overlap_map_memory counts is everything malloc'd:
 *   72 bytes of map, 8 bytes a slot (load 3/8 to 3/4), and each window
 *   rounded up to 16k + 8 bytes (glibc's chunks; malloc adds 8 more):
 *     20 + 2 * type sets + ibytes * 65 + ebytes * runs
 *   About 2.3 bytes a run with 512 byte clusters (1-byte entries, 80
 *   runs a window: 2 * 2 + 65 + 20 + 8 of rounding + 16 of slots over
 *   80 runs), 3.6 with 64 KiB and 2 MiB clusters.  Against the 2014
 *   estimate (bench/overlap-bench.c, counted; with malloc's own 8 bytes
 *   a block in brackets): preallocated 1 GiB and 4 GiB images with 512
 *   byte clusters 0.58 (0.60), 1 TiB with 64 KiB clusters 0.89 (0.92),
 *   1 PiB with 2 MiB clusters 0.91 (0.92); the pathological layout with
 *   metadata in every third cluster 4.95 (1.13 bytes a run, but 17
 *   times the runs the estimate assumes).  Small images, with a handful of windows,
 *   pay the fixed costs and go above it (64 GiB with 64 KiB clusters:
 *   736 bytes, 1.15).  Removals shrink windows to their exact size at
 *   once, and the table when less than 1/8 full.
 *
 * A query never writes to the map.
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
 * optional step (shrinking) are ignored.  A regrain is all or nothing
 * too (the fine windows are built aside).  XXX An update spanning
 * several windows is not atomic: when window k fails, windows before k
 * keep the change.  The map is valid either way.  XXX Removal can fail
 * too (splitting a run, or a new format, needs memory); what is left
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
#include <endian.h>

#include "overlap.h"

#ifdef OVERLAP_MAP_FAULT_INJECTION
/* The unit test's allocator, which fails on demand and counts. */
extern void *fault_malloc (size_t size);
extern void *fault_calloc (size_t nmemb, size_t size);
extern void *fault_realloc (void *ptr, size_t size);
extern void fault_free (void *ptr);
#define malloc fault_malloc
#define calloc fault_calloc
#define realloc fault_realloc
#define free fault_free
#endif

/* Geometry, from cluster_bits (see the design comment): windows of
 * 2^(cluster_bits + WINDOW_EXTRA) clusters, or of 2^(cluster_bits +
 * WINDOW_EXTRA_BIG) when entries take 3 bytes anyway, each cut into
 * 2^SUB_BITS sub-windows.  bench/overlap-bench.c compares other values.
 */
#ifndef OVERLAP_WINDOW_EXTRA
#define OVERLAP_WINDOW_EXTRA 3
#endif
#ifndef OVERLAP_WINDOW_EXTRA_BIG
#define OVERLAP_WINDOW_EXTRA_BIG 5
#endif
#ifndef OVERLAP_SUB_BITS
#define OVERLAP_SUB_BITS 6
#endif
#define WINDOW_EXTRA OVERLAP_WINDOW_EXTRA
#define WINDOW_EXTRA_BIG OVERLAP_WINDOW_EXTRA_BIG
#define SUB_BITS OVERLAP_SUB_BITS
#define MIN_WINDOW_BITS 4
#define MAX_WINDOW_BITS 26
#define MIN_SUBWIN_BITS 2       /* clusters a sub-window, log2, at least */

/* Windows bigger than FINE_BITS are "coarse": their lists are capped at
 * RUNS_CAP runs, and a map whose coarse list would pass the cap is
 * rebuilt with windows of FINE_BITS (a "regrain").
 */
#define FINE_BITS 12
#define MAX_FINE_BITS 15        /* 2^15 runs still fit nruns */
#define RUNS_CAP 4096
#define MAX_RUNS_CAP 65535

_Static_assert (SUB_BITS >= 1 && SUB_BITS <= 8, "bad sub-window count");
_Static_assert (WINDOW_EXTRA <= 8 && WINDOW_EXTRA_BIG <= 8, "bad window size");
/* The biggest window: a coarse one of MAX_RUNS_CAP runs of 8 bytes, as
 * many type sets and a 2-byte index; its size must fit alloc16.
 */
_Static_assert (MAX_RUNS_CAP * 10 + 2 * ((1 << SUB_BITS) + 1) + 64
                < 16 * 65536, "windows too big for alloc16");

#define TYPES_MASK 0xffffu

/* A window: this header, then three arrays, unaligned:
 *
 *   uint16_t palette[npal]       the distinct type sets, sorted
 *   index[nsub + 1]              ibytes each, little-endian: runs
 *                                before sub-window 0, 1, ... nsub
 *   entry[nruns]                 ebytes each, little-endian, sorted:
 *     start << (8*ebytes - sbits) | (length - 1) << tbits | palette index
 *
 * start is relative to the run's sub-window, which a run never leaves;
 * the length gets whatever bits the others leave.
 */
struct window {
  uint64_t index;               /* first cluster >> wbits */
  uint16_t alloc16;             /* 16 * alloc16 + 8 bytes malloc'd */
  uint16_t nruns;               /* runs (maximal within sub-windows) */
  uint16_t types;               /* union of the palette */
  uint16_t npal;                /* type sets in the palette */
  uint8_t ebytes;               /* bytes an entry */
  uint8_t tbits;                /* bits of palette index */
  uint8_t lbits;                /* bits of the longest run's length - 1 */
  uint8_t ibytes;               /* bytes an index entry */
  uint8_t data[];
};

#define HDR offsetof (struct window, data)

/* load_entry reads the 8 bytes that end with the entry: the header is
 * always in front of the first one.
 */
_Static_assert (offsetof (struct window, data) >= 7, "header too small");

#define MIN_SLOT_BITS 2

struct overlap_map {
  struct window **slots;        /* NULL when there are no windows */
  size_t nslots;                /* 0 or a power of 2 */
  unsigned slot_bits;
  unsigned wbits;               /* clusters a window, log2 */
  unsigned sbits;               /* clusters a sub-window, log2 */
  unsigned nsub;                /* sub-windows a window */
  unsigned fine_bits;           /* wbits > fine_bits: coarse windows */
  unsigned runs_cap;            /* most runs of a coarse window */
  size_t nwindows;
  size_t bytes;                 /* sum of the windows' alloc */
  uint64_t hi;                  /* no cluster above holds types: an upper
                                 * bound, only raised (queries past the
                                 * last metadata, such as writes to
                                 * clusters just allocated at the end of
                                 * the file, stop here)
                                 */
  uint64_t regrains;            /* counters, for tests and benchmarks */
  uint64_t reencodes;
};

/* Runs, decoded: window-relative [start, end). */
struct run {
  uint32_t start;
  uint32_t end;
  uint16_t types;
};

/* A query scans a sub-window of up to SCAN_RUNS runs, and searches a
 * bigger one.
 */
#ifndef OVERLAP_SCAN_RUNS
#define OVERLAP_SCAN_RUNS 4
#endif
#define SCAN_RUNS OVERLAP_SCAN_RUNS

/* Updates decode and build their runs here when they fit. */
#define STACK_RUNS 32

/* Error code inside this file: the update would make a coarse list
 * longer than runs_cap.  Nothing was changed in that window.
 */
#define REGRAIN (-2)

static inline unsigned
nbits (uint64_t x)
{
  return x ? 64 - __builtin_clzll (x) : 0;
}

static inline bool
coarse (const struct overlap_map *m)
{
  return m->wbits > m->fine_bits;
}

static inline uint64_t
window_of (const struct overlap_map *m, uint64_t cluster)
{
  return cluster >> m->wbits;
}

static inline unsigned
offset_in_window (const struct overlap_map *m, uint64_t cluster)
{
  return cluster & ((UINT64_C (1) << m->wbits) - 1);
}

static inline unsigned
window_size (const struct overlap_map *m)
{
  return 1u << m->wbits;
}

static inline unsigned
nsub (const struct overlap_map *m)
{
  return m->nsub;
}

/* The sub-window bits for windows of wbits. */
static unsigned
sbits_for (unsigned wbits)
{
  return wbits >= SUB_BITS + MIN_SUBWIN_BITS ? wbits - SUB_BITS
    : MIN_SUBWIN_BITS;
}

/* The last cluster of [first, first+n), n > 0, cut at UINT64_MAX. */
static inline uint64_t
range_last (uint64_t first, uint64_t n)
{
  return n - 1 > UINT64_MAX - first ? UINT64_MAX : first + (n - 1);
}

/* glibc hands out chunks of 16k+8 usable bytes (at least 24): ask for
 * exactly that much, so that nothing is wasted that is not counted.
 */
static size_t
alloc_size (size_t need)
{
  if (need <= 24)
    return 24;
  return ((need + 8 + 15) & ~(size_t) 15) - 8;
}

/* The bytes malloc'd for w (always an alloc_size). */
static inline size_t
walloc (const struct window *w)
{
  return 16 * (size_t) w->alloc16 + 8;
}

static inline void
set_walloc (struct window *w, size_t size)
{
  w->alloc16 = (size - 8) / 16;
}

static inline unsigned
tbits_for (size_t npal)
{
  return npal <= 1 ? 0 : nbits (npal - 1);
}

static inline unsigned
ebytes_for (unsigned sbits, unsigned tbits, unsigned lbits)
{
  return (sbits + tbits + lbits + 7) / 8;
}

static inline unsigned
ibytes_for (size_t nruns)
{
  return nruns <= 255 ? 1 : 2;
}

static inline size_t
window_need (const struct overlap_map *m, size_t npal, unsigned ibytes,
             unsigned ebytes, size_t nruns)
{
  return HDR + 2 * npal + (size_t) ibytes * (nsub (m) + 1) +
    (size_t) ebytes * nruns;
}

/* The field layout of a window's entries. */
struct fmt {
  unsigned e;                   /* bytes */
  unsigned tb;                  /* palette index bits */
  unsigned sh;                  /* start is entry >> sh */
  uint64_t tmask, lmask;
};

static inline struct fmt
fmt_of (unsigned sbits, unsigned ebytes, unsigned tbits)
{
  struct fmt f;

  f.e = ebytes;
  f.tb = tbits;
  f.sh = 8 * ebytes - sbits;
  f.tmask = (UINT64_C (1) << tbits) - 1;
  f.lmask = (UINT64_C (1) << (f.sh - tbits)) - 1;
  return f;
}

static inline struct fmt
wfmt (const struct overlap_map *m, const struct window *w)
{
  return fmt_of (m->sbits, w->ebytes, w->tbits);
}

static inline const uint8_t *
cindex_of (const struct window *w)
{
  return w->data + 2 * (size_t) w->npal;
}

static inline const uint8_t *
centries (const struct overlap_map *m, const struct window *w)
{
  return cindex_of (w) + (size_t) w->ibytes * (nsub (m) + 1);
}

static inline uint8_t *
entries (const struct overlap_map *m, struct window *w)
{
  return (uint8_t *) centries (m, w);
}

static inline unsigned
pal_get (const struct window *w, size_t i)
{
  uint16_t t;

  memcpy (&t, w->data + 2 * i, 2);
  return t;
}

/* Runs before sub-window k, 0 <= k <= nsub, from an index of ib bytes
 * an entry.
 */
static inline __attribute__ ((always_inline)) size_t
cum_at (const uint8_t *index, unsigned k, const unsigned ib)
{
  const uint8_t *p = index + (size_t) k * ib;

  return ib == 1 ? p[0] : p[0] | (size_t) p[1] << 8;
}

static inline size_t
cum_get (const struct overlap_map *m, const struct window *w, unsigned k)
{
  (void) m;
  return cum_at (cindex_of (w), k, w->ibytes);
}

static inline void
cum_put (uint8_t *index, unsigned ibytes, unsigned k, size_t v)
{
  uint8_t *p = index + (size_t) k * ibytes;

  p[0] = v;
  if (ibytes == 2)
    p[1] = v >> 8;
}

/* The e-byte little-endian entry at p, read as the top of the 8 bytes
 * ending with it (which are all inside the window).
 */
static inline uint64_t
load_entry (const uint8_t *p, unsigned e)
{
  uint64_t v;

  memcpy (&v, p + e - 8, 8);
  return le64toh (v) >> (64 - 8 * e);
}

static inline void
store_entry (uint8_t *p, unsigned e, uint64_t v)
{
  unsigned i;

  for (i = 0; i < e; i++)
    p[i] = v >> (8 * i);
}

/* An entry for a run [start, start+len), start relative to its
 * sub-window.
 */
static inline uint64_t
encode (struct fmt f, unsigned start, unsigned len, unsigned idx)
{
  return (uint64_t) start << f.sh | (uint64_t) (len - 1) << f.tb | idx;
}

static inline unsigned
entry_start (struct fmt f, uint64_t v)
{
  return v >> f.sh;
}

static inline unsigned
entry_len (struct fmt f, uint64_t v)
{
  return ((v >> f.tb) & f.lmask) + 1;
}

static inline unsigned
entry_idx (struct fmt f, uint64_t v)
{
  return v & f.tmask;
}

/* Index of type set t in the sorted palette pal[0..npal), or -1. */
static long
pal_find (const uint8_t *pal, size_t npal, unsigned t)
{
  size_t lo = 0, hi = npal, mid;
  uint16_t v;

  while (lo < hi) {
    mid = (lo + hi) / 2;
    memcpy (&v, pal + 2 * mid, 2);
    if (v == t)
      return mid;
    if (v < t)
      lo = mid + 1;
    else
      hi = mid;
  }
  return -1;
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

  m->bytes -= walloc (*slot);
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

/* Free every window and the table. */
static void
free_windows (struct overlap_map *m)
{
  size_t i;

  for (i = 0; i < m->nslots; i++)
    free (m->slots[i]);
  free (m->slots);
  m->slots = NULL;
  m->nslots = 0;
  m->slot_bits = 0;
  m->nwindows = 0;
  m->bytes = 0;
}

/*----------------------------------------------------------------------
 * Searching a window.
 */

/* Index of the first of entries [first, last) of a sub-window whose
 * start is > x.  Written so that the compiler uses conditional moves:
 * the branches of a plain binary search are unpredictable.  Entries
 * sort by start, so whole entries are compared with the smallest entry
 * that starts after x.  Inlined with a constant entry size e (see
 * query_window) so that the loads are plain.
 */
static inline __attribute__ ((always_inline)) size_t
search_e (const uint8_t *ent, size_t first, size_t last, unsigned x,
          unsigned sbits, const unsigned e)
{
  size_t n = last - first, half, lo = first;
  uint64_t key;

  if (x + 1 >= 1u << sbits)
    return last;
  if (n == 0)
    return first;
  key = (uint64_t) (x + 1) << (8 * e - sbits);
  while (n > 1) {
    half = n / 2;
    lo = load_entry (ent + (lo + half) * e, e) < key ? lo + half : lo;
    n -= half;
  }
  return lo + (load_entry (ent + lo * e, e) < key);
}

/* The first of entries [first, last) of a sub-window whose end is > x. */
static inline __attribute__ ((always_inline)) size_t
end_search_e (const uint8_t *ent, size_t first, size_t last, unsigned x,
              unsigned sbits, struct fmt f, const unsigned e)
{
  size_t j = search_e (ent, first, last, x, sbits, e);
  uint64_t v;

  if (j == first)
    return j;
  v = load_entry (ent + (j - 1) * e, e);
  return entry_start (f, v) + entry_len (f, v) > x ? j - 1 : j;
}

/* Decode run i of w.  *k is its sub-window or one before: call with
 * increasing i.
 */
static inline struct run
decode_run (const struct overlap_map *m, const struct window *w,
            struct fmt f, size_t i, unsigned *k)
{
  uint64_t v;
  struct run r;

  while (i >= cum_get (m, w, *k + 1))
    (*k)++;
  v = load_entry (centries (m, w) + i * f.e, f.e);
  r.start = (*k << m->sbits) + entry_start (f, v);
  r.end = r.start + entry_len (f, v);
  r.types = pal_get (w, entry_idx (f, v));
  return r;
}

/*----------------------------------------------------------------------
 * Updating a window.
 */

/* Append [start, end) with types t to out, merging with the last run
 * unless a sub-window starts at 'start'.
 */
static void
emit (struct run *out, size_t *n, unsigned start, unsigned end, unsigned t,
      unsigned smask)
{
  if (t == 0)
    return;
  if (*n > 0 && out[*n - 1].end == start && out[*n - 1].types == t &&
      (start & smask) != 0) {
    out[*n - 1].end = end;
    return;
  }
  out[*n] = (struct run) { .start = start, .end = end, .types = t };
  (*n)++;
}

/* Write to out the runs replacing old[0..k): the k runs that overlap
 * [a, b) or touch it inside its sub-windows, with (types & ~clear) |
 * set applied inside [a, b).  The span rewritten starts at the first
 * old run or a, and ends at the last old run or b; runs outside it are
 * at least one cluster away, or across a sub-window edge, or keep the
 * types they had at the span's edge, so the result stays the list of
 * runs maximal within sub-windows.  Each old run and each gap becomes
 * at most one run per sub-window: at most 2k + 1 + (sub-window edges
 * inside [a, b)) runs come out.
 */
static size_t
rewrite (const struct run *old, size_t k, unsigned a, unsigned b,
         unsigned clear, unsigned set, unsigned sbits, struct run *out)
{
  unsigned pos = a, end = b, next, t, edge, smask = (1u << sbits) - 1;
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
    edge = (pos | smask) + 1;   /* runs stop at sub-window edges */
    if (next > edge)
      next = edge;
    emit (out, &n, pos, next, t, smask);
    pos = next;
  }
  return n;
}

static int
cmp_u16 (const void *a, const void *b)
{
  return (int) *(const uint16_t *) a - (int) *(const uint16_t *) b;
}

/* Sort and deduplicate; returns the new length. */
static size_t
sort_unique (uint16_t *a, size_t n)
{
  size_t i, j;

  if (n <= 1)
    return n;
  if (n <= 16) {
    for (i = 1; i < n; i++) {
      uint16_t x = a[i];
      for (j = i; j > 0 && a[j - 1] > x; j--)
        a[j] = a[j - 1];
      a[j] = x;
    }
  }
  else
    qsort (a, n, sizeof *a, cmp_u16);
  for (i = 1, j = 1; i < n; i++)
    if (a[i] != a[j - 1])
      a[j++] = a[i];
  return j;
}

/* Scan the runs of w outside [lo, hi): mark the palette entries they
 * use in used[] and return the bits of their longest length - 1.
 */
static unsigned
scan_outside (const struct overlap_map *m, const struct window *w,
              struct fmt f, size_t lo, size_t hi, uint8_t *used)
{
  const uint8_t *ent = centries (m, w);
  size_t i;
  unsigned lb = 0, b;
  uint64_t v;

  for (i = 0; i < w->nruns; i++) {
    if (i == lo && hi > lo) {
      i = hi - 1;
      continue;
    }
    v = load_entry (ent + i * f.e, f.e);
    used[entry_idx (f, v)] = 1;
    b = nbits (entry_len (f, v) - 1);
    if (b > lb)
      lb = b;
  }
  return lb;
}

/* Scratch space of an update: on the stack when small. */
#define NSCRATCH 6

struct scratch {
  void *p[NSCRATCH];
};

static void *
scratch_get (struct scratch *s, unsigned i, void *stack, size_t stack_bytes,
             size_t bytes)
{
  if (bytes <= stack_bytes)
    return stack;
  s->p[i] = malloc (bytes);
  return s->p[i];
}

static void
scratch_free (struct scratch *s)
{
  unsigned i;

  for (i = 0; i < NSCRATCH; i++)
    if (s->p[i] != NULL)
      free (s->p[i]);
}

/* What an update does to a window: runs [lo, lo+k) (all in
 * sub-windows ka..kb) become new[0..n).
 */
struct change {
  size_t lo, k, n;
  unsigned ka, kb;
  const struct run *new;
};

/* Write the sub-window index after the change, for sub-windows from
 * 'from' on, to 'index' (ibytes an entry).  May be w's own index.
 */
static void
write_index (const struct overlap_map *m, const struct window *w,
             const struct change *c, unsigned from,
             uint8_t *index, unsigned ibytes)
{
  unsigned K, nk = nsub (m);
  size_t j = 0, v;

  for (K = from; K <= nk; K++) {
    if (K <= c->ka)
      v = cum_get (m, w, K);
    else if (K <= c->kb) {
      while (j < c->n && c->new[j].start < (size_t) K << m->sbits)
        j++;
      v = c->lo + j;
    }
    else
      v = cum_get (m, w, K) + c->n - c->k;
    cum_put (index, ibytes, K, v);
  }
}

/* Add delta to the index entries of w from sub-window 'from' on (when
 * runs are added or removed in the one before).  A loop the compiler
 * can vectorize: this is most of the cost of appending a run.
 */
static void
shift_index (const struct overlap_map *m, struct window *w, unsigned from,
             size_t delta)
{
  uint8_t *index = w->data + 2 * (size_t) w->npal;
  unsigned K, nk = nsub (m);
  uint16_t v;

  if (w->ibytes == 1) {
    /* Eight entries at a time: no entry passes 255 or goes below 0
     * (those after the change count at least the runs removed), so no
     * carry or borrow crosses a byte.
     */
    bool down = (ptrdiff_t) delta < 0;
    uint64_t d8 = (down ? -delta : delta) * UINT64_C (0x0101010101010101);
    uint64_t x;

    for (K = from; K + 8 <= nk + 1; K += 8) {
      memcpy (&x, index + K, 8);
      x = down ? x - d8 : x + d8;
      memcpy (index + K, &x, 8);
    }
    for (; K <= nk; K++)
      index[K] += (uint8_t) delta;
  }
  else {
    for (K = from; K <= nk; K++) {
      v = index[2 * K] | index[2 * K + 1] << 8;
      v += delta;
      index[2 * K] = v;
      index[2 * K + 1] = v >> 8;
    }
  }
}

/* Apply the change in place: the palette, entry and index sizes do not
 * change.
 */
static int
splice (struct overlap_map *m, struct window **slot, const struct change *c,
        unsigned lbits)
{
  struct window *w = *slot;
  struct fmt f = wfmt (m, w);
  size_t count = w->nruns - c->k + c->n, tail = w->nruns - c->lo - c->k, i;
  size_t want = alloc_size (window_need (m, w->npal, w->ibytes, f.e, count));
  unsigned smask = (1u << m->sbits) - 1;
  uint8_t *e;

  if (want > walloc (w)) {
    w = realloc (w, want);
    if (w == NULL) {
      errno = ENOMEM;
      return -1;
    }
    m->bytes += want - walloc (w);
    set_walloc (w, want);
    *slot = w;
  }
  e = entries (m, w);
  memmove (e + (c->lo + c->n) * f.e, e + (c->lo + c->k) * f.e, tail * f.e);
  for (i = 0; i < c->n; i++)
    store_entry (e + (c->lo + i) * f.e, f.e,
                 encode (f, c->new[i].start & smask,
                         c->new[i].end - c->new[i].start,
                         pal_find (w->data, w->npal, c->new[i].types)));
  if (c->ka != c->kb)
    write_index (m, w, c, c->ka + 1, w->data + 2 * (size_t) w->npal,
                 w->ibytes);
  else if (c->n != c->k)
    shift_index (m, w, c->ka + 1, c->n - c->k);
  w->nruns = count;
  w->lbits = lbits;
  if (want < walloc (w)) {
    /* Optional: a failure keeps the bigger block, still counted. */
    struct window *sw = realloc (w, want);
    if (sw != NULL) {
      m->bytes -= walloc (sw) - want;
      set_walloc (sw, want);
      *slot = sw;
    }
  }
  return 0;
}

/* Copy entries [from, to) of w, re-encoded in format g, to e. */
static uint8_t *
copy_entries (const struct overlap_map *m, const struct window *w,
              size_t from, size_t to, uint8_t *e, struct fmt g,
              const uint16_t *remap)
{
  struct fmt f = wfmt (m, w);
  const uint8_t *ent = centries (m, w);
  size_t i;
  uint64_t v;

  for (i = from; i < to; i++, e += g.e) {
    v = load_entry (ent + i * f.e, f.e);
    store_entry (e, g.e, encode (g, entry_start (f, v), entry_len (f, v),
                                 remap[entry_idx (f, v)]));
  }
  return e;
}

/* Apply the change by building the window again, with palette
 * pal[0..npal) and the smallest entries and index.  remap has room for
 * the old palette.
 */
static int
rebuild (struct overlap_map *m, struct window **slot, const struct change *c,
         const uint16_t *pal, size_t npal, unsigned lbits, uint16_t *remap)
{
  struct window *w = *slot, *nw;
  size_t count = w->nruns - c->k + c->n, i;
  unsigned tbits = tbits_for (npal), types = 0;
  unsigned ebytes = ebytes_for (m->sbits, tbits, lbits);
  unsigned ibytes = ibytes_for (count);
  unsigned smask = (1u << m->sbits) - 1;
  size_t want = alloc_size (window_need (m, npal, ibytes, ebytes, count));
  struct fmt g = fmt_of (m->sbits, ebytes, tbits);
  uint8_t *e;
  long p;

  nw = malloc (want);
  if (nw == NULL) {
    errno = ENOMEM;
    return -1;
  }
  nw->index = w->index;
  set_walloc (nw, want);
  nw->nruns = count;
  nw->npal = npal;
  nw->ebytes = ebytes;
  nw->tbits = tbits;
  nw->lbits = lbits;
  nw->ibytes = ibytes;
  memcpy (nw->data, pal, 2 * npal);
  for (i = 0; i < npal; i++)
    types |= pal[i];
  nw->types = types;
  write_index (m, w, c, 0, nw->data + 2 * npal, ibytes);
  /* Where each old palette entry went.  The runs kept use only entries
   * that are still there.
   */
  for (i = 0; i < w->npal; i++) {
    p = pal_find (nw->data, npal, pal_get (w, i));
    remap[i] = p < 0 ? 0 : p;
  }
  e = copy_entries (m, w, 0, c->lo, entries (m, nw), g, remap);
  for (i = 0; i < c->n; i++, e += g.e)
    store_entry (e, g.e, encode (g, c->new[i].start & smask,
                                 c->new[i].end - c->new[i].start,
                                 pal_find (nw->data, npal,
                                           c->new[i].types)));
  copy_entries (m, w, c->lo + c->k, w->nruns, e, g, remap);
  m->bytes += want - walloc (w);
  m->reencodes++;
  free (w);
  *slot = nw;
  return 0;
}

/* Apply (types & ~clear) | set to [a, b) of the window in 'slot'.  All
 * or nothing: every allocation happens before the window is touched.
 */
static int
list_update (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set)
{
  struct window *w = *slot;
  struct fmt f = wfmt (m, w);
  const uint8_t *ent = centries (m, w);
  const unsigned sb = m->sbits, ssize = 1u << sb;
  struct run sold[STACK_RUNS], snew[2 * STACK_RUNS + 1], *old, *new;
  uint16_t snt[2 * STACK_RUNS + 1], spal[64], sremap[64], *nt, *pal, *remap;
  uint8_t sused[256], *used = NULL;
  struct scratch s;
  struct change c;
  size_t lo, hi, k, n, nnt, count, i, j, npal, first, last, room;
  unsigned ka = a >> sb, kb = (b - 1) >> sb, kk;
  unsigned maxold = 0, maxnew = 0, lb_new, lbits, t;
  bool gone = false, grow = false;
  int r = -1;

  memset (&s, 0, sizeof s);
  /* The runs that overlap [a, b) or touch it inside its sub-windows. */
  first = cum_get (m, w, ka);
  last = cum_get (m, w, ka + 1);
  lo = a & (ssize - 1) ?
    end_search_e (ent, first, last, (a & (ssize - 1)) - 1, sb, f, f.e) : first;
  first = cum_get (m, w, kb);
  last = cum_get (m, w, kb + 1);
  hi = b - (kb << sb) == ssize ? last :
    search_e (ent, first, last, b - (kb << sb), sb, f.e);
  k = hi - lo;

  /* The usual update: a run of a type set the window has, alone in
   * one sub-window, that fits the entries as they are.
   */
  if (k == 0 && clear == 0 && ka == kb) {
    struct run one = { .start = a, .end = b, .types = set };

    lbits = nbits (b - a - 1);
    if (lbits < w->lbits)
      lbits = w->lbits;
    count = w->nruns + 1;
    if (pal_find (w->data, w->npal, set) >= 0 &&
        ibytes_for (count) == w->ibytes &&
        ebytes_for (sb, w->tbits, lbits) == w->ebytes &&
        !(coarse (m) && count > m->runs_cap)) {
      c = (struct change) {
        .lo = lo, .k = 0, .n = 1, .ka = ka, .kb = kb, .new = &one,
      };
      return splice (m, slot, &c, lbits);
    }
  }

  room = 2 * k + 1 + (kb - ka);
  old = scratch_get (&s, 0, sold, sizeof sold, k * sizeof *old);
  new = scratch_get (&s, 1, snew, sizeof snew, room * sizeof *new);
  nt = scratch_get (&s, 2, snt, sizeof snt, room * sizeof *nt);
  if (old == NULL || new == NULL || nt == NULL)
    goto enomem;
  kk = ka;
  for (i = 0; i < k; i++) {
    old[i] = decode_run (m, w, f, lo + i, &kk);
    if (old[i].end - old[i].start > maxold)
      maxold = old[i].end - old[i].start;
  }
  n = rewrite (old, k, a, b, clear, set, sb, new);
  count = w->nruns - k + n;
  if (count == 0) {
    w->nruns = 0;               /* update_slot frees it */
    r = 0;
    goto out;
  }
  if (coarse (m) && count > m->runs_cap) {
    r = REGRAIN;
    goto out;
  }
  c = (struct change) {
    .lo = lo, .k = k, .n = n, .ka = ka, .kb = kb, .new = new,
  };

  /* The type sets of the new runs; whether one is new to the window;
   * whether a type set of the old runs is not among them (it may have
   * left the window).
   */
  for (i = 0; i < n; i++) {
    nt[i] = new[i].types;
    if (new[i].end - new[i].start > maxnew)
      maxnew = new[i].end - new[i].start;
  }
  nnt = sort_unique (nt, n);
  for (i = 0; i < k; i++)
    if (pal_find ((const uint8_t *) nt, nnt, old[i].types) < 0)
      gone = true;
  for (i = 0; i < nnt; i++)
    if (pal_find (w->data, w->npal, nt[i]) < 0)
      grow = true;

  /* The longest run.  Scan the rest of the window (and see which type
   * sets it uses) only if a type set may have left, or if the longest
   * run may have been one of the old runs.
   */
  lb_new = n ? nbits (maxnew - 1) : 0;
  lbits = w->lbits > lb_new ? w->lbits : lb_new;
  if (gone || (k > 0 && nbits (maxold - 1) == w->lbits && lb_new < w->lbits)) {
    used = scratch_get (&s, 3, sused, sizeof sused, w->npal);
    if (used == NULL)
      goto enomem;
    memset (used, 0, w->npal);
    lbits = scan_outside (m, w, f, lo, hi, used);
    if (lb_new > lbits)
      lbits = lb_new;
  }

  if (!grow && !gone && ibytes_for (count) == w->ibytes &&
      ebytes_for (sb, w->tbits, lbits) == w->ebytes) {
    r = splice (m, slot, &c, lbits);
    goto out;
  }

  /* A new palette: the old type sets still used outside the span (all
   * of them if none may have left), merged with the new runs' sets.
   */
  pal = scratch_get (&s, 4, spal, sizeof spal, (w->npal + nnt) * 2);
  remap = scratch_get (&s, 5, sremap, sizeof sremap, w->npal * 2);
  if (pal == NULL || remap == NULL)
    goto enomem;
  npal = 0;
  for (i = 0, j = 0; i < w->npal || j < nnt; ) {
    if (i < w->npal && gone && !used[i]) {
      i++;                      /* not used outside the span */
      continue;
    }
    if (j >= nnt || (i < w->npal && pal_get (w, i) < nt[j]))
      t = pal_get (w, i++);
    else if (i < w->npal && pal_get (w, i) == nt[j]) {
      t = nt[j++];
      i++;
    }
    else
      t = nt[j++];
    pal[npal++] = t;
  }
  r = rebuild (m, slot, &c, pal, npal, lbits, remap);
  goto out;

 enomem:
  errno = ENOMEM;
  r = -1;
 out:
  scratch_free (&s);
  return r;
}

/* A window for [a, b) with types, one run a sub-window. */
static int
new_window (struct overlap_map *m, uint64_t index,
            unsigned a, unsigned b, unsigned types)
{
  const unsigned sb = m->sbits, smask = (1u << sb) - 1;
  unsigned ka = a >> sb, kb = (b - 1) >> sb, K, lbits, ebytes, ibytes;
  size_t n = kb - ka + 1, want, i;
  unsigned maxlen = 0, s0, e0;
  struct fmt f;
  struct window *w;
  uint8_t *e;

  if (coarse (m) && n > m->runs_cap)
    return REGRAIN;
  for (K = ka; K <= kb; K++) {
    s0 = K == ka ? a : K << sb;
    e0 = K == kb ? b : (K + 1) << sb;
    if (e0 - s0 > maxlen)
      maxlen = e0 - s0;
  }
  lbits = nbits (maxlen - 1);
  ebytes = ebytes_for (sb, 0, lbits);
  ibytes = ibytes_for (n);
  want = alloc_size (window_need (m, 1, ibytes, ebytes, n));
  if (reserve_slot (m) == -1)
    return -1;
  w = malloc (want);
  if (w == NULL) {
    errno = ENOMEM;
    return -1;
  }
  w->index = index;
  set_walloc (w, want);
  w->nruns = n;
  w->types = types;
  w->npal = 1;
  w->ebytes = ebytes;
  w->tbits = 0;
  w->lbits = lbits;
  w->ibytes = ibytes;
  memcpy (w->data, &(uint16_t) { types }, 2);
  for (K = 0; K <= nsub (m); K++)
    cum_put (w->data + 2, ibytes, K,
             K <= ka ? 0 : K <= kb ? K - ka : n);
  f = fmt_of (sb, ebytes, 0);
  e = entries (m, w);
  for (K = ka, i = 0; K <= kb; K++, i++) {
    s0 = K == ka ? a : K << sb;
    e0 = K == kb ? b : (K + 1) << sb;
    store_entry (e + i * ebytes, ebytes, encode (f, s0 & smask, e0 - s0, 0));
  }
  *find_slot (m, index) = w;
  m->nwindows++;
  m->bytes += want;
  return 0;
}

/* Apply the update to [a, b) of the window in 'slot'. */
static int
update_slot (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set)
{
  int r;

  if (set == 0 && ((*slot)->types & clear) == 0)
    return 0;
  r = list_update (m, slot, a, b, clear, set);
  if (r != 0)
    return r;
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
  uint64_t fw = window_of (m, first), lw = window_of (m, last), index;
  size_t i = 0;
  unsigned a, b;
  int r;

  while (i < m->nslots) {
    struct window *w = m->slots[i];

    if (w != NULL && w->index >= fw && w->index <= lw) {
      index = w->index;
      a = index == fw ? offset_in_window (m, first) : 0;
      b = index == lw ? offset_in_window (m, last) + 1 : window_size (m);
      r = update_slot (m, &m->slots[i], a, b, clear, 0);
      if (r != 0)
        return r;
      if (m->slots[i] == NULL || m->slots[i]->index != index)
        continue;
    }
    i++;
  }
  return 0;
}

static int
update_range_once (struct overlap_map *m, uint64_t first, uint64_t last,
                   unsigned clear, unsigned set)
{
  uint64_t fw = window_of (m, first), lw = window_of (m, last), wi;
  unsigned a, b;
  int r = 0;

  if (set == 0 && m->nwindows == 0)
    return 0;
  if (set == 0 && lw - fw >= m->nslots)
    return remove_by_walk (m, first, last, clear);
  for (wi = fw; ; wi++) {
    a = wi == fw ? offset_in_window (m, first) : 0;
    b = wi == lw ? offset_in_window (m, last) + 1 : window_size (m);
    r = update_window (m, wi, a, b, clear, set);
    if (r != 0 || wi == lw)
      break;
  }
  return r;
}

static void
set_geometry (struct overlap_map *m, unsigned wbits)
{
  m->wbits = wbits;
  m->sbits = sbits_for (wbits);
  m->nsub = 1u << (wbits - m->sbits);
}

/* Coarse windows -> windows of fine_bits, all at once.  All or nothing:
 * the fine windows are built aside, then swapped in.
 */
static int
regrain (struct overlap_map *m)
{
  struct overlap_map fine = {
    .fine_bits = m->fine_bits, .runs_cap = m->runs_cap,
  };
  size_t i, j;
  unsigned k;

  set_geometry (&fine, m->fine_bits);
  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];
    struct fmt f;

    if (w == NULL)
      continue;
    f = wfmt (m, w);
    for (j = 0, k = 0; j < w->nruns; j++) {
      struct run r = decode_run (m, w, f, j, &k);
      uint64_t c = (w->index << m->wbits) + r.start;

      if (update_range_once (&fine, c, c + (r.end - r.start - 1), 0,
                             r.types) != 0) {
        free_windows (&fine);
        errno = ENOMEM;
        return -1;
      }
    }
  }
  free_windows (m);
  m->slots = fine.slots;
  m->nslots = fine.nslots;
  m->slot_bits = fine.slot_bits;
  m->nwindows = fine.nwindows;
  m->bytes = fine.bytes;
  set_geometry (m, fine.wbits);
  m->reencodes += fine.reencodes;
  m->regrains++;
  return 0;
}

static int
update_range (struct overlap_map *m, uint64_t first, uint64_t n,
              unsigned clear, unsigned set)
{
  uint64_t last;
  int r;

  if (n == 0 || (clear | set) == 0 || (set == 0 && m->nwindows == 0))
    return 0;
  last = range_last (first, n);
  /* Updates are idempotent: after a regrain, do it all again. */
  while ((r = update_range_once (m, first, last, clear, set)) == REGRAIN) {
    if (regrain (m) == -1) {
      r = -1;
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

/* The query of [ra, rb) in sub-window k of w, with a constant entry
 * and index entry sizes: find the first run starting after ra (a scan
 * of whole entries, or a binary search if there are more than
 * SCAN_RUNS), look at the one before it (it may cover ra), then at
 * those that start before rb.  *pos is relative to the window.
 */
static inline __attribute__ ((always_inline)) unsigned
query_sub (const struct overlap_map *m, const struct window *w,
           unsigned k, unsigned ra, unsigned rb, unsigned mask,
           unsigned *pos, const unsigned e, const unsigned ib)
{
  const unsigned sb = m->sbits, tb = w->tbits, sh = 8 * e - sb;
  const uint64_t tmask = (UINT64_C (1) << tb) - 1;
  const uint64_t lmask = (UINT64_C (1) << (sh - tb)) - 1;
  const uint8_t *index = cindex_of (w);
  const uint8_t *ent = index + (size_t) ib * (m->nsub + 1);
  size_t first = cum_at (index, k, ib), last = cum_at (index, k + 1, ib), i;
  unsigned t = 0, rt, st;
  uint64_t v, key;

  if (first == last)
    return 0;
  if (last - first > SCAN_RUNS)
    i = search_e (ent, first, last, ra, sb, e);
  else if (ra + 1 >= 1u << sb)
    i = last;
  else {
    key = (uint64_t) (ra + 1) << sh;
    for (i = first; i < last && load_entry (ent + i * e, e) < key; i++)
      ;
  }
  if (i > first) {
    v = load_entry (ent + (i - 1) * e, e);
    st = v >> sh;
    if (st + ((v >> tb) & lmask) + 1 > ra) {
      rt = pal_get (w, v & tmask) & mask;
      if (rt != 0) {
        t = rt;
        *pos = (k << sb) + ra;
      }
    }
  }
  for (; i < last; i++) {
    v = load_entry (ent + i * e, e);
    st = v >> sh;
    if (st >= rb)
      break;
    rt = pal_get (w, v & tmask) & mask;
    if (rt == 0)
      continue;
    if (t == 0)
      *pos = (k << sb) + st;
    t |= rt;
  }
  return t;
}

/* The query of [a, b) in w, sub-window by sub-window. */
static inline __attribute__ ((always_inline)) unsigned
query_e (const struct overlap_map *m, const struct window *w,
         unsigned a, unsigned b, unsigned mask, unsigned *pos,
         const unsigned e, const unsigned ib)
{
  const unsigned sb = m->sbits, smask = (1u << sb) - 1;
  unsigned k = a >> sb, kb = (b - 1) >> sb, t, p = 0;

  if (k == kb)                  /* the usual case */
    return query_sub (m, w, k, a & smask, b - (k << sb), mask, pos, e, ib);
  t = query_sub (m, w, k, a & smask, smask + 1, mask, pos, e, ib);
  for (k++; k < kb; k++) {
    if (t == 0)
      t = query_sub (m, w, k, 0, smask + 1, mask, pos, e, ib);
    else
      t |= query_sub (m, w, k, 0, smask + 1, mask, &p, e, ib);
  }
  if (t == 0)
    return query_sub (m, w, kb, 0, b - (kb << sb), mask, pos, e, ib);
  return t | query_sub (m, w, kb, 0, b - (kb << sb), mask, &p, e, ib);
}

static inline __attribute__ ((always_inline)) unsigned
query_window (const struct overlap_map *m, const struct window *w,
              unsigned a, unsigned b, unsigned mask, unsigned *pos)
{
  if ((w->types & mask) == 0)
    return 0;
  switch (w->ebytes << 2 | w->ibytes) {
  case 1 << 2 | 1: return query_e (m, w, a, b, mask, pos, 1, 1);
  case 1 << 2 | 2: return query_e (m, w, a, b, mask, pos, 1, 2);
  case 2 << 2 | 1: return query_e (m, w, a, b, mask, pos, 2, 1);
  case 2 << 2 | 2: return query_e (m, w, a, b, mask, pos, 2, 2);
  case 3 << 2 | 1: return query_e (m, w, a, b, mask, pos, 3, 1);
  case 3 << 2 | 2: return query_e (m, w, a, b, mask, pos, 3, 2);
  default:
    return w->ibytes == 1 ? query_e (m, w, a, b, mask, pos, w->ebytes, 1)
      : query_e (m, w, a, b, mask, pos, w->ebytes, 2);
  }
}

/* The same, not inlined: for the rarer queries over several windows. */
static unsigned
query_window_call (const struct overlap_map *m, const struct window *w,
                   unsigned a, unsigned b, unsigned mask, unsigned *pos)
{
  return query_window (m, w, a, b, mask, pos);
}

/* A query over more windows than there are slots: walk the table. */
static unsigned
query_by_walk (const struct overlap_map *m, uint64_t first, uint64_t last,
               unsigned mask, uint64_t *hit)
{
  uint64_t fw = window_of (m, first), lw = window_of (m, last), c;
  uint64_t best = UINT64_MAX;
  unsigned a, b, t, pos = 0, types = 0;
  size_t i;

  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];

    if (w == NULL || w->index < fw || w->index > lw)
      continue;
    a = w->index == fw ? offset_in_window (m, first) : 0;
    b = w->index == lw ? offset_in_window (m, last) + 1 : window_size (m);
    t = query_window_call (m, w, a, b, mask, &pos);
    if (t == 0)
      continue;
    c = (w->index << m->wbits) | pos;
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
overlap_map_new (unsigned cluster_bits)
{
  struct overlap_map *m = calloc (1, sizeof *m);
  unsigned wbits;

  if (m == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  cluster_bits = cluster_bits > 30 ? 30 : cluster_bits;
  wbits = cluster_bits + WINDOW_EXTRA;
  /* Sub-window starts past 15 bits: 3-byte entries, so bigger windows
   * to spread their fixed cost over more runs.
   */
  if (wbits >= SUB_BITS + 16)
    wbits = cluster_bits + WINDOW_EXTRA_BIG;
  if (wbits < MIN_WINDOW_BITS)
    wbits = MIN_WINDOW_BITS;
  if (wbits > MAX_WINDOW_BITS)
    wbits = MAX_WINDOW_BITS;
  set_geometry (m, wbits);
  m->fine_bits = FINE_BITS;
  m->runs_cap = RUNS_CAP;
  return m;
}

void
overlap_map_free (struct overlap_map *m)
{
  if (m == NULL)
    return;
  free_windows (m);
  free (m);
}

int
overlap_map_add (struct overlap_map *m, uint64_t first, uint64_t n,
                 unsigned types)
{
  if (n > 0 && (types & TYPES_MASK) && range_last (first, n) > m->hi)
    m->hi = range_last (first, n);
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
  if (n == 0 || mask == 0 || m->nwindows == 0 || first > m->hi)
    return 0;
  last = range_last (first, n);
  fw = window_of (m, first);
  lw = window_of (m, last);
  if (fw == lw) {               /* the usual case */
    w = *find_slot (m, fw);
    if (w == NULL)
      return 0;
    t = query_window (m, w, offset_in_window (m, first),
                      offset_in_window (m, last) + 1, mask, &pos);
    if (t != 0 && hit)
      *hit = (fw << m->wbits) | pos;
    return t;
  }
  if (lw - fw >= m->nslots)
    return query_by_walk (m, first, last, mask, hit);
  for (wi = fw; ; wi++) {
    w = find_window (m, wi);
    if (w != NULL) {
      a = wi == fw ? offset_in_window (m, first) : 0;
      b = wi == lw ? offset_in_window (m, last) + 1 : window_size (m);
      t = query_window_call (m, w, a, b, mask, &pos);
      if (t != 0 && types == 0 && hit)
        *hit = (wi << m->wbits) | pos;
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
  st->window_bits = m->wbits;
  st->sub_bits = m->sbits;
  st->fine_bits = m->fine_bits;
  st->windows = m->nwindows;
  st->bytes = overlap_map_memory (m);
  st->regrains = m->regrains;
  st->reencodes = m->reencodes;
  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];

    if (w == NULL)
      continue;
    st->runs += w->nruns;
    st->type_sets += w->npal;
    st->entry_bytes += (size_t) w->nruns * w->ebytes;
    st->index_bytes += (size_t) w->ibytes * (nsub (m) + 1);
    if (w->ebytes > st->max_entry)
      st->max_entry = w->ebytes;
  }
  return 0;
}

/*----------------------------------------------------------------------
 * For tests/test-overlap-map.c only, which declares these itself and
 * compiles this file with OVERLAP_MAP_TEST_HOOKS: not in the library.
 */

#ifdef OVERLAP_MAP_TEST_HOOKS

extern int overlap_map_tune (struct overlap_map *m, unsigned fine_bits,
                             unsigned runs_cap);
extern const char *overlap_map_check (const struct overlap_map *m);

/* Smaller fine windows and a smaller cap, so that the unit test
 * reaches the regrain with little data.  Empty maps only.
 */
int
overlap_map_tune (struct overlap_map *m, unsigned fine_bits,
                  unsigned runs_cap)
{
  if (m->nwindows != 0 || m->regrains != 0 ||
      fine_bits < MIN_WINDOW_BITS || fine_bits > MAX_FINE_BITS ||
      runs_cap == 0 || runs_cap > MAX_RUNS_CAP) {
    errno = EINVAL;
    return -1;
  }
  m->fine_bits = fine_bits;
  m->runs_cap = runs_cap;
  return 0;
}

static const char *
check_window (const struct overlap_map *m, const struct window *w)
{
  const unsigned ssize = 1u << m->sbits;
  struct fmt f;
  struct run r, prev = { 0, 0, 0 };
  uint64_t used[65536 / 64];    /* no malloc: the tests make it fail */
  size_t i, need;
  unsigned types = 0, maxlen = 0, K, k = 0, pk = 0;
  uint64_t v;
  const char *err = NULL;

  if (w->nruns == 0)
    return "window: empty window kept";
  if (m->wbits < 64 && (w->index >> (63 - m->wbits) >> 1) != 0)
    return "window: index out of range";
  if (coarse (m) && w->nruns > m->runs_cap)
    return "window: coarse list over the cap";
  if (!coarse (m) && w->nruns > window_size (m))
    return "window: more runs than clusters";
  if (w->npal == 0 || w->npal > w->nruns)
    return "palette: bad size";
  for (i = 0; i < w->npal; i++) {
    if (pal_get (w, i) == 0)
      return "palette: empty type set";
    if (i > 0 && pal_get (w, i) <= pal_get (w, i - 1))
      return "palette: unsorted or repeated";
    types |= pal_get (w, i);
  }
  if (types != w->types)
    return "window: summary is not the union of the palette";
  if (w->tbits != tbits_for (w->npal))
    return "format: palette index bits not minimal";
  if (w->ibytes != ibytes_for (w->nruns))
    return "format: index entry size not minimal";
  if (w->ebytes < 1 || w->ebytes > 8 ||
      8u * w->ebytes < m->sbits + w->tbits)
    return "format: bad entry size";
  if (cum_get (m, w, 0) != 0 || cum_get (m, w, nsub (m)) != w->nruns)
    return "index: does not start at 0 or end at nruns";
  for (K = 1; K <= nsub (m); K++)
    if (cum_get (m, w, K) < cum_get (m, w, K - 1))
      return "index: decreasing";
  f = wfmt (m, w);
  memset (used, 0, (w->npal + 63) / 64 * 8);
  for (i = 0; i < w->nruns && err == NULL; i++) {
    v = load_entry (centries (m, w) + i * f.e, f.e);
    if (entry_idx (f, v) >= w->npal) {
      err = "list: palette index out of range";
      break;
    }
    used[entry_idx (f, v) / 64] |= UINT64_C (1) << entry_idx (f, v) % 64;
    if (entry_start (f, v) + entry_len (f, v) > ssize) {
      err = "list: run crosses a sub-window edge";
      break;
    }
    r = decode_run (m, w, f, i, &k);
    if (i > 0 && r.start < prev.end)
      err = "list: runs unsorted or overlapping";
    else if (i > 0 && k == pk && r.start == prev.end &&
             r.types == prev.types)
      err = "list: touching runs with equal types not merged";
    if (r.end - r.start > maxlen)
      maxlen = r.end - r.start;
    prev = r;
    pk = k;
  }
  for (i = 0; i < w->npal && err == NULL; i++)
    if (!(used[i / 64] >> i % 64 & 1))
      err = "palette: type set used by no run";
  if (err)
    return err;
  if (w->lbits != nbits (maxlen - 1))
    return "format: lbits is not the longest run's";
  if (w->ebytes != ebytes_for (m->sbits, w->tbits, w->lbits))
    return "format: entry size not minimal";
  need = alloc_size (window_need (m, w->npal, w->ibytes, w->ebytes,
                                  w->nruns));
  if (walloc (w) < need)
    return "window: allocation too small";
#ifndef OVERLAP_MAP_FAULT_INJECTION
  /* With fault injection, a shrinking realloc may fail. */
  if (walloc (w) != need)
    return "window: allocation not the exact size";
#endif
  return NULL;
}

/* NULL if the map is sound, else what is wrong with it. */
const char *
overlap_map_check (const struct overlap_map *m)
{
  size_t i, n = 0, bytes = 0;
  const char *err;

  if (m->wbits < MIN_WINDOW_BITS || m->wbits > MAX_WINDOW_BITS ||
      m->sbits != sbits_for (m->wbits))
    return "map: bad window size";
  if (m->regrains && m->wbits != m->fine_bits)
    return "map: regrained, but not to fine windows";
  if (m->nslots == 0)
    return m->nwindows == 0 && m->bytes == 0 ? NULL : "no table, but windows";
  if (m->nslots != (size_t) 1 << m->slot_bits ||
      m->slot_bits < MIN_SLOT_BITS ||
      m->nwindows * 4 > m->nslots * 3)
    return "table: bad size or overloaded";
  for (i = 0; i < m->nslots; i++) {
    const struct window *w = m->slots[i];

    if (w == NULL)
      continue;
    n++;
    bytes += walloc (w);
    if (*find_slot (m, w->index) != w)
      return "table: window not found from its hash";
    err = check_window (m, w);
    if (err)
      return err;
  }
  if (n != m->nwindows)
    return "table: nwindows is wrong";
  if (bytes != m->bytes)
    return "table: byte count is wrong";
  return NULL;
}

#endif /* OVERLAP_MAP_TEST_HOOKS */
