/* nbdkit-qcow2: the metadata overlap map, updates.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Everything that changes the map: overlap_map_add, overlap_map_remove
 * and overlap_map_free, every window's allocation, the table's growth
 * and shrinking, and the regrain.  The format, its invariants and what
 * each operation costs are in overlap-map.c's design comment; this file
 * keeps them true after every update.
 *
 * An update of a cluster range goes window by window
 * (update_range_once); in each window (list_update):
 *
 *   find_span     the runs [lo, hi) that overlap the range or touch it
 *                 inside its sub-windows (two binary searches)
 *   span_update   those runs, decoded, are rewritten (rewrite), then
 *   splice        if the palette, entry and index sizes stay: in place
 *   repalette     else a new palette, and the whole window again in its
 *   rebuild       new smallest format
 *
 * Adding a run of a type set the window has, alone in its sub-window
 * and fitting the entries as they are (fits_as_is: the usual case,
 * metadata allocated as an image grows) goes straight to splice.  An
 * update that would take a coarse window past runs_cap changes nothing
 * there and returns REGRAIN; update_range then rebuilds the map with
 * fine windows and does it all again (updates are idempotent).
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
 *
 * Locking: none.  Callers serialize updates (img->lock).
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

/* Updates decode and build their runs here when they fit. */
#define STACK_RUNS 32

/* Error code inside this file: the update would make a coarse list
 * longer than runs_cap.  Nothing was changed in that window.
 */
#define REGRAIN (-2)

/*----------------------------------------------------------------------
 * Growing and shrinking the table (find_slot is in
 * overlap-map-internal.h).
 */

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

/* The runs of w an update of [a, b) rewrites, [*lo, *hi): those that
 * overlap [a, b) or touch it inside its sub-windows.
 */
static void
find_span (const struct overlap_map *m, const struct window *w,
           unsigned a, unsigned b, size_t *lo, size_t *hi)
{
  struct fmt f = wfmt (m, w);
  const uint8_t *ent = centries (m, w);
  const unsigned sb = m->sbits, ssize = 1u << sb;
  unsigned ka = a >> sb, kb = (b - 1) >> sb;
  size_t first, last;

  first = cum_get (m, w, ka);
  last = cum_get (m, w, ka + 1);
  *lo = a & (ssize - 1) ?
    end_search_e (ent, first, last, (a & (ssize - 1)) - 1, sb, f, f.e) : first;
  first = cum_get (m, w, kb);
  last = cum_get (m, w, kb + 1);
  *hi = b - (kb << sb) == ssize ? last :
    search_e (ent, first, last, b - (kb << sb), sb, f.e);
}

/* The usual update: a run [a, b) of type set 'set', alone in one
 * sub-window (no run there overlaps or touches it).  True if the window
 * has that type set and the run fits the entries as they are, so that
 * splice can add it in place with *lbits.
 */
static bool
fits_as_is (const struct overlap_map *m, const struct window *w,
            unsigned a, unsigned b, unsigned set, unsigned *lbits)
{
  size_t count = w->nruns + 1;

  *lbits = nbits (b - a - 1);
  if (*lbits < w->lbits)
    *lbits = w->lbits;
  return pal_find (w->data, w->npal, set) >= 0 &&
    ibytes_for (count) == w->ibytes &&
    ebytes_for (m->sbits, w->tbits, *lbits) == w->ebytes &&
    !(coarse (m) && count > m->runs_cap);
}

/* Decode runs [lo, lo+k) of w, the first in sub-window ka or after, to
 * old[]; return the longest one's length (0 if k is 0).
 */
static unsigned
decode_span (const struct overlap_map *m, const struct window *w,
             size_t lo, size_t k, unsigned ka, struct run *old)
{
  struct fmt f = wfmt (m, w);
  unsigned kk = ka, maxold = 0;
  size_t i;

  for (i = 0; i < k; i++) {
    old[i] = decode_run (m, w, f, lo + i, &kk);
    if (old[i].end - old[i].start > maxold)
      maxold = old[i].end - old[i].start;
  }
  return maxold;
}

/* The type sets of the new runs of c: sorted and unique in nt[], their
 * number returned.  *gone: a type set of the old runs is not among them
 * (it may have left the window).  *grow: one of them is new to the
 * window.  *maxnew: the longest new run's length.
 */
static size_t
new_type_sets (const struct window *w, const struct change *c,
               const struct run *old, uint16_t *nt, unsigned *maxnew,
               bool *gone, bool *grow)
{
  size_t i, nnt;
  unsigned max = 0;

  for (i = 0; i < c->n; i++) {
    nt[i] = c->new[i].types;
    if (c->new[i].end - c->new[i].start > max)
      max = c->new[i].end - c->new[i].start;
  }
  *maxnew = max;
  nnt = sort_unique (nt, c->n);
  *gone = false;
  for (i = 0; i < c->k; i++)
    if (pal_find ((const uint8_t *) nt, nnt, old[i].types) < 0)
      *gone = true;
  *grow = false;
  for (i = 0; i < nnt; i++)
    if (pal_find (w->data, w->npal, nt[i]) < 0)
      *grow = true;
  return nnt;
}

/* Apply the change with a new palette, then rebuild the window: the
 * old type sets still used outside the span (all of them if used is
 * NULL: none may have left), merged with the new runs' sets nt[0..nnt).
 * Scratch space comes from s (slots 4 and 5), which the caller frees.
 */
static int
repalette (struct overlap_map *m, struct window **slot,
           const struct change *c, struct scratch *s, const uint16_t *nt,
           size_t nnt, const uint8_t *used, unsigned lbits)
{
  const struct window *w = *slot;
  uint16_t spal[64], sremap[64], *pal, *remap;
  size_t i, j, npal = 0;
  unsigned t;

  pal = scratch_get (s, 4, spal, sizeof spal, (w->npal + nnt) * 2);
  remap = scratch_get (s, 5, sremap, sizeof sremap, w->npal * 2);
  if (pal == NULL || remap == NULL) {
    errno = ENOMEM;
    return -1;
  }
  for (i = 0, j = 0; i < w->npal || j < nnt; ) {
    if (i < w->npal && used != NULL && !used[i]) {
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
  return rebuild (m, slot, c, pal, npal, lbits, remap);
}

/* Apply (types & ~clear) | set to [a, b) of the window in 'slot', whose
 * runs [lo, hi) it rewrites: decode them, rewrite them, then splice the
 * new runs in if the format stays, else build the window again.
 */
static int
span_update (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set,
             size_t lo, size_t hi)
{
  struct window *w = *slot;
  struct fmt f = wfmt (m, w);
  const unsigned sb = m->sbits;
  struct run sold[STACK_RUNS], snew[2 * STACK_RUNS + 1], *old, *new;
  uint16_t snt[2 * STACK_RUNS + 1], *nt;
  uint8_t sused[256], *used = NULL;
  struct scratch s;
  struct change c;
  size_t k = hi - lo, n, nnt, count, room;
  unsigned ka = a >> sb, kb = (b - 1) >> sb;
  unsigned maxold, maxnew, lb_new, lbits;
  bool gone, grow;
  int r = -1;

  memset (&s, 0, sizeof s);
  room = 2 * k + 1 + (kb - ka);
  old = scratch_get (&s, 0, sold, sizeof sold, k * sizeof *old);
  new = scratch_get (&s, 1, snew, sizeof snew, room * sizeof *new);
  nt = scratch_get (&s, 2, snt, sizeof snt, room * sizeof *nt);
  if (old == NULL || new == NULL || nt == NULL)
    goto enomem;
  maxold = decode_span (m, w, lo, k, ka, old);
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
  nnt = new_type_sets (w, &c, old, nt, &maxnew, &gone, &grow);

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
      ebytes_for (sb, w->tbits, lbits) == w->ebytes)
    r = splice (m, slot, &c, lbits);
  else
    r = repalette (m, slot, &c, &s, nt, nnt, gone ? used : NULL, lbits);
  goto out;

 enomem:
  errno = ENOMEM;
  r = -1;
 out:
  scratch_free (&s);
  return r;
}

/* Apply (types & ~clear) | set to [a, b) of the window in 'slot'.  All
 * or nothing: every allocation happens before the window is touched.
 */
static int
list_update (struct overlap_map *m, struct window **slot,
             unsigned a, unsigned b, unsigned clear, unsigned set)
{
  const unsigned sb = m->sbits;
  unsigned ka = a >> sb, kb = (b - 1) >> sb, lbits;
  size_t lo, hi;

  find_span (m, *slot, a, b, &lo, &hi);
  if (lo == hi && clear == 0 && ka == kb &&
      fits_as_is (m, *slot, a, b, set, &lbits)) {
    struct run one = { .start = a, .end = b, .types = set };
    struct change c = {
      .lo = lo, .k = 0, .n = 1, .ka = ka, .kb = kb, .new = &one,
    };

    return splice (m, slot, &c, lbits);
  }
  return span_update (m, slot, a, b, clear, set, lo, hi);
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
 * The API (overlap.h).
 */

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
