/* nbdkit-qcow2: the overlap map's self-check, for the unit test.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * overlap_map_check verifies the invariants of overlap-map.c's design
 * comment, window by window; overlap_map_tune makes the fine windows
 * and the run cap smaller, so that the unit test reaches the regrain
 * with little data.  tests/test-overlap-map.c declares both itself.
 * Built only into the unit tests, with OVERLAP_MAP_TEST_HOOKS: not in
 * the library.  It allocates nothing (the -faults test makes malloc
 * fail).
 */

#ifndef OVERLAP_MAP_TEST_HOOKS
#error "test code: build it into the unit test with -DOVERLAP_MAP_TEST_HOOKS"
#endif

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

/* The window's header, palette, format and index. */
static const char *
check_header (const struct overlap_map *m, const struct window *w)
{
  size_t i;
  unsigned types = 0, K;

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
  return NULL;
}

/* The window's runs, and that each palette entry is used by one; the
 * longest run's length goes to *maxlen.  The header is sound.
 */
static const char *
check_runs (const struct overlap_map *m, const struct window *w,
            unsigned *maxlen)
{
  const unsigned ssize = 1u << m->sbits;
  struct fmt f = wfmt (m, w);
  struct run r, prev = { 0, 0, 0 };
  uint64_t used[65536 / 64];    /* no malloc: the tests make it fail */
  size_t i;
  unsigned k = 0, pk = 0;
  uint64_t v;
  const char *err = NULL;

  *maxlen = 0;
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
    if (r.end - r.start > *maxlen)
      *maxlen = r.end - r.start;
    prev = r;
    pk = k;
  }
  for (i = 0; i < w->npal && err == NULL; i++)
    if (!(used[i / 64] >> i % 64 & 1))
      err = "palette: type set used by no run";
  return err;
}

static const char *
check_window (const struct overlap_map *m, const struct window *w)
{
  size_t need;
  unsigned maxlen;
  const char *err;

  err = check_header (m, w);
  if (err == NULL)
    err = check_runs (m, w, &maxlen);
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
