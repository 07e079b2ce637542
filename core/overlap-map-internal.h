/* nbdkit-qcow2: the overlap map's private header.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * What overlap-map.c (queries), overlap-map-update.c (updates) and
 * overlap-map-check.c (the unit test's self-check) share; nothing else
 * includes it.  overlap-map.c's design comment explains the structures.
 * Only macros, structures and static inline functions: the query path
 * must inline as it did when the map was one file (search_e and
 * load_entry with a constant entry size, find_slot without a call).
 */

#ifndef QCOW2_OVERLAP_MAP_INTERNAL_H
#define QCOW2_OVERLAP_MAP_INTERNAL_H

#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>
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
static inline unsigned
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
static inline size_t
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
static inline long
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
 * shifting back the entries after the hole (no tombstones: see
 * delete_slot in overlap-map-update.c).
 */

static inline size_t
hash (const struct overlap_map *m, uint64_t index)
{
  return (index * UINT64_C (0x9e3779b97f4a7c15)) >> (64 - m->slot_bits);
}

/* The slot holding window 'index', or the empty slot where it would go.
 * Needs a table (nslots > 0), which always has an empty slot.
 */
static inline struct window **
find_slot (const struct overlap_map *m, uint64_t index)
{
  size_t mask = m->nslots - 1;
  size_t i = hash (m, index);

  while (m->slots[i] != NULL && m->slots[i]->index != index)
    i = (i + 1) & mask;
  return &m->slots[i];
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
/* Windows of 2^wbits clusters. */
static inline void
set_geometry (struct overlap_map *m, unsigned wbits)
{
  m->wbits = wbits;
  m->sbits = sbits_for (wbits);
  m->nsub = 1u << (wbits - m->sbits);
}

#endif /* QCOW2_OVERLAP_MAP_INTERNAL_H */
