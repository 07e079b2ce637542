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
 * Files.  This one is the read side: the queries overlap.c makes
 * before every write, the statistics, and overlap_map_new (the
 * geometry below).  overlap-map-update.c changes the map: adding and
 * removing ranges, the window formats, the table's growth and
 * shrinking, the regrain, and overlap_map_free.  overlap-map-internal.h
 * holds what they share (the structures, the entry format, the
 * searches), all macros and static inline functions, so the query path
 * compiles as it did in one file.  overlap-map-check.c is the unit
 * test's self-check (overlap_map_check, overlap_map_tune), never in
 * the library.
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
 * Errors: a query cannot fail; overlap_map_new and the updates fail
 * only with ENOMEM (see overlap-map-update.c for what is left behind).
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
#include "overlap-map-internal.h"

/* A query scans a sub-window of up to SCAN_RUNS runs, and searches a
 * bigger one.
 */
#ifndef OVERLAP_SCAN_RUNS
#define OVERLAP_SCAN_RUNS 4
#endif
#define SCAN_RUNS OVERLAP_SCAN_RUNS

/*----------------------------------------------------------------------
 * Queries.
 */

static const struct window *
find_window (const struct overlap_map *m, uint64_t index)
{
  if (m->nwindows == 0)
    return NULL;
  return *find_slot (m, index);
}

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
