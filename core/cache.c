/* nbdkit-qcow2: the table cache.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * A cache of fixed-size slices of on-disk tables (L2 tables, refcount
 * blocks), keyed by the slice's host offset.  The image has one instance
 * per table type so that each can be written back in its own order.
 *
 * Slices, not whole tables: with 64 KiB clusters an L2 table maps 512
 * MiB, and loading all 64 KiB of it to serve one random 4 KiB read is
 * what made an early L2 cache (kvmtool, 2011) slower than no cache.  A
 * 4 KiB slice maps 32 MiB with one small read.
 *
 *   hash[(off >> slice_bits) * golden >> shift] -> entry -> entry ...
 *   lru: head <-> most recent ... least recent <-> head
 *
 * Lookup is O(1) through the hash; eviction takes the least recently
 * used unpinned entry (entries in use by a caller are pinned).
 * cache_peek serves readers that hold img->lock shared: it cannot move
 * the entry in the list, so it sets the entry's referenced flag, and
 * eviction gives a referenced entry a second chance (moves it to the
 * front and clears the flag) instead of evicting it.  Dirty
 * entries are written back when evicted and on cache_flush; before any
 * dirty slice is written, the owner's before_write function runs (it
 * may refuse the write, and the slice stays dirty).  That is how the
 * image orders refcount blocks and data before the L2 slices that
 * depend on them and puts every write-back through the overlap check
 * (l2.c: l2_before_slice_write; refcount.c:
 * refcount_before_block_write); the cache itself knows nothing of
 * qcow2 and works on any io (cache.h).
 *
 * Slice buffers are allocated on first use, so a large cache costs
 * memory only as it fills and never more than its configured size.
 * With direct I/O they are aligned as the io wants buffers, so a whole
 * slice is read and written without a copy through io.c's bounce
 * buffer.
 *
 * Staging: a reader holding img->lock shared that misses must not take
 * the lock exclusively for every miss (on a metadata-bound workload,
 * with most reads missing, the lock flipping between shared and
 * exclusive cost more CPU than everything else).  Instead it reads the
 * slice into a staging slot, a small fixed pool beside the cache, maps
 * from it and marks it ready; when half the slots are ready, one reader
 * takes the lock exclusively and moves them all into the cache
 * (cache_stage_drain).  What a slot holds was read under the shared
 * lock, when the file had the slice's current contents (a slice that
 * differs from the file would be in the cache, dirty).  Until the drain
 * it may go stale: every change that could make it so (a slice marked
 * dirty, slices dropped, cache_stage_invalidate for L1 changes) bumps a
 * generation number, and a slot read under an older generation is
 * thrown away, as is one whose slice was cached meanwhile.  (A staged
 * L2 slice that turns out all zero is not kept at all: cluster.c
 * remembers it as one bit, see "Empty slices" there.)
 *
 * Write-back without the lock: the owner may write its dirty slices
 * back with its lock dropped, so that others go on changing the cache
 * meanwhile (l2.c does, for a guest flush).  cache_wb_begin, with the
 * lock held, copies every dirty slice aside, pins it (so it is neither
 * evicted nor dropped) and marks it clean: a change made afterwards
 * marks it dirty again, for a later write-back.  cache_wb_write then
 * writes the copies, with no lock held (it touches no entry, only the
 * copies, which nobody else uses), and cache_wb_end, with the lock held
 * again, unpins them, and on failure marks them dirty again.  Until
 * then the owner must not let anything else write those slices back
 * (a newer copy written first and the older one after would go back in
 * time): l2.c makes every other write-back wait for the end, so
 * meanwhile a miss evicts a clean unpinned slice if there is one
 * (victim) rather than write a dirty one back.  The copies are kept for
 * the next write-back; the owner bounds them.
 *
 * Locking: all functions are called with the owner's lock (the image's
 * img->lock) held exclusively,
 * except cache_peek, cache_stage_get, cache_stage_ready and
 * cache_stage_abort, which need it held at least shared (the staging
 * slots have their own mutex), and cache_wb_write, which needs no lock
 * (but an owner's write-back in progress).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include <pthread.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "cache.h"
#include "io.h"

/* Staging slots: at most this many, and at most STAGE_BYTES of them. */
#define STAGE_SLOTS 32
#define STAGE_BYTES (128 * 1024)

enum { SLOT_FREE, SLOT_BUSY, SLOT_READY };

struct stage_slot {
  uint64_t offset, gen;
  int state;
  void *data;
};

struct cache_entry {
  uint64_t offset;              /* host offset of the slice */
  struct cache_entry *hnext;    /* hash chain */
  struct cache_entry *prev, *next;   /* LRU list */
  uint32_t pins;
  bool referenced;              /* hit by cache_peek since last eviction */
  bool dirty;
  bool valid;                   /* in the hash */
  void *data;
};

struct wb_slice {
  struct cache_entry *e;
  uint64_t offset;
  void *copy;
};

struct cache {
  struct qcow2_io *io;
  const char *name;             /* the file, for messages */
  const char *what;             /* "L2", "refcount", for messages */
  cache_before_write_fn before_write;
  void *opaque;
  uint32_t slice_bits;
  uint32_t nr;                  /* capacity in entries */
  uint32_t used;                /* entries[0..used) have buffers */
  struct cache_entry *entries;
  struct cache_entry **hash;
  uint32_t hash_bits;
  struct cache_entry lru;       /* sentinel: next = most recent */
  uint32_t ndirty;
  uint64_t hits, misses;

  /* Write-back with the owner's lock dropped (see "Write-back without
   * the lock" above): the entries taken by cache_wb_begin, pinned, and
   * their copies.  Only the owner's one write-back in progress uses
   * these; the copies stay allocated for the next one.
   */
  struct wb_slice *wb;
  uint32_t nwb, wb_alloc;

  /* Staging (see the top of this file).  gen changes only with
   * img->lock held exclusively; the slots are guarded by stage_lock.
   */
  uint64_t gen;
  pthread_mutex_t stage_lock;
  unsigned nslots, nready;
  struct stage_slot slots[STAGE_SLOTS];
};

static uint32_t
hash_off (const struct cache *c, uint64_t off)
{
  return (uint32_t) (((off >> c->slice_bits) * UINT64_C(0x9e3779b97f4a7c15))
                     >> (64 - c->hash_bits));
}

static void
lru_unlink (struct cache_entry *e)
{
  e->prev->next = e->next;
  e->next->prev = e->prev;
}

static void
lru_push_front (struct cache *c, struct cache_entry *e)
{
  e->next = c->lru.next;
  e->prev = &c->lru;
  c->lru.next->prev = e;
  c->lru.next = e;
}

struct cache *
cache_create (struct qcow2_io *io, const char *name, const char *what,
              uint32_t slice_bits, uint64_t bytes,
              cache_before_write_fn before_write, void *opaque)
{
  struct cache *c = calloc (1, sizeof *c);
  uint64_t nr = bytes >> slice_bits;

  if (c == NULL)
    return NULL;
  if (nr < 16)                  /* enough for every pin one request holds */
    nr = 16;
  if (nr > (UINT32_C(1) << 24))
    nr = UINT32_C(1) << 24;
  c->io = io;
  c->name = name;
  c->what = what;
  c->before_write = before_write;
  c->opaque = opaque;
  c->slice_bits = slice_bits;
  c->nr = nr;
  c->hash_bits = 1;
  while ((UINT64_C(1) << c->hash_bits) < 2 * nr)
    c->hash_bits++;
  c->entries = calloc (nr, sizeof *c->entries);
  c->hash = calloc (UINT64_C(1) << c->hash_bits, sizeof *c->hash);
  if (!c->entries || !c->hash) {
    cache_destroy (c);
    return NULL;
  }
  c->lru.next = c->lru.prev = &c->lru;
  c->nslots = STAGE_BYTES >> slice_bits;
  if (c->nslots > STAGE_SLOTS)
    c->nslots = STAGE_SLOTS;
  if (c->nslots < 2)
    c->nslots = 2;
  pthread_mutex_init (&c->stage_lock, NULL);
  return c;
}

void
cache_destroy (struct cache *c)
{
  uint32_t i;

  if (c == NULL)
    return;
  for (i = 0; i < c->used; i++)
    free (c->entries[i].data);
  for (i = 0; i < c->nslots; i++)
    free (c->slots[i].data);
  for (i = 0; i < c->wb_alloc; i++)
    free (c->wb[i].copy);
  free (c->wb);
  if (c->nslots)
    pthread_mutex_destroy (&c->stage_lock);
  free (c->entries);
  free (c->hash);
  free (c);
}

static struct cache_entry *
lookup (struct cache *c, uint64_t off)
{
  struct cache_entry *e;

  for (e = c->hash[hash_off (c, off)]; e; e = e->hnext)
    if (e->offset == off)
      return e;
  return NULL;
}

static void
hash_remove (struct cache *c, struct cache_entry *e)
{
  struct cache_entry **pp = &c->hash[hash_off (c, e->offset)];

  while (*pp != e)
    pp = &(*pp)->hnext;
  *pp = e->hnext;
  e->valid = false;
}

static int
write_back (struct cache *c, struct cache_entry *e)
{
  uint32_t len = UINT32_C(1) << c->slice_bits;

  if (c->before_write && c->before_write (c->opaque, e->offset, len) == -1)
    return -1;
  if (io_pwrite (c->io, e->data, len, e->offset) == -1) {
    nbdkit_error ("%s: writing %s slice at %#" PRIx64 ": %m", c->name,
                  c->what, e->offset);
    return -1;
  }
  e->dirty = false;
  c->ndirty--;
  return 0;
}

/* A slice buffer: aligned for direct I/O when the io does it, so that
 * whole slices go to the file without io.c's bounce buffer (a slice
 * smaller than the alignment is still a read-modify-write there).
 */
static void *
slice_alloc (struct cache *c)
{
  size_t len = (size_t) 1 << c->slice_bits;
  size_t a = c->io->direct ? c->io->mem_align : 0;
  void *p;

  if (a <= sizeof (void *))
    return malloc (len);
  if (a > len)
    a = len;
  if (posix_memalign (&p, a, len) != 0) {
    errno = ENOMEM;
    return NULL;
  }
  return p;
}

/* Take unpinned e out of the cache for reuse, written back first if
 * dirty.  NULL if that write fails.
 */
static struct cache_entry *
evict (struct cache *c, struct cache_entry *e)
{
  if (e->dirty && write_back (c, e) == -1)
    return NULL;
  lru_unlink (e);
  if (e->valid)
    hash_remove (c, e);
  return e;
}

/* Find an entry to reuse: a fresh one while the cache is filling, else
 * the least recently used one that nobody holds.  While a write-back
 * without the lock is in progress (nwb > 0), a clean one is preferred:
 * writing a dirty one back waits for that write-back's end (l2.c), its
 * syncs included, with the owner's lock held.
 */
static struct cache_entry *
victim (struct cache *c)
{
  struct cache_entry *e, *dirty = NULL;

  if (c->used < c->nr) {
    e = &c->entries[c->used];
    e->data = slice_alloc (c);
    if (e->data == NULL)
      return NULL;
    c->used++;
    return e;
  }
  e = c->lru.prev;
  while (e != &c->lru) {
    struct cache_entry *newer = e->prev;

    if (e->referenced) {
      /* Second chance: recently used by cache_peek.  It comes round
       * again, unreferenced, at the end of this walk, so the walk ends.
       */
      e->referenced = false;
      lru_unlink (e);
      lru_push_front (c, e);
    }
    else if (e->pins == 0) {
      if (e->dirty && c->nwb > 0) {
        if (dirty == NULL)
          dirty = e;
        e = newer;
        continue;
      }
      return evict (c, e);
    }
    e = newer;
  }
  if (dirty)                    /* no clean one: wait after all */
    return evict (c, dirty);
  nbdkit_error ("%s: table cache exhausted (all %" PRIu32 " entries in use)",
                c->name, c->nr);
  errno = ENOMEM;
  return NULL;
}

/* Make e (just taken by victim, data filled) the slice at off. */
static void
insert (struct cache *c, struct cache_entry *e, uint64_t off, uint32_t pins)
{
  e->offset = off;
  e->pins = pins;
  e->referenced = false;
  e->dirty = false;
  e->valid = true;
  e->hnext = c->hash[hash_off (c, off)];
  c->hash[hash_off (c, off)] = e;
  lru_push_front (c, e);
}

void *
cache_get (struct cache *c, uint64_t off, bool fill, struct cache_entry **ep)
{
  struct cache_entry *e;
  size_t len = (size_t) 1 << c->slice_bits;

  /* Staged slices first, so that a slice is never cached twice.  (No
   * shared holder can stage now, so nready can be read.)
   */
  if (c->nready > 0)
    cache_stage_drain (c);
  e = lookup (c, off);
  if (e) {
    c->hits++;
    lru_unlink (e);
    lru_push_front (c, e);
    e->pins++;
    *ep = e;
    return e->data;
  }
  c->misses++;
  e = victim (c);
  if (e == NULL)
    return NULL;
  if (fill) {
    if (io_pread (c->io, e->data, len, off) == -1) {
      nbdkit_error ("%s: reading %s slice at %#" PRIx64 ": %m",
                    c->name, c->what, off);
      /* Leave the entry unused at the cold end of the list. */
      e->pins = 0;
      e->dirty = false;
      e->next = &c->lru;
      e->prev = c->lru.prev;
      c->lru.prev->next = e;
      c->lru.prev = e;
      return NULL;
    }
  }
  else
    memset (e->data, 0, len);
  insert (c, e, off, 1);
  *ep = e;
  return e->data;
}

/* Look only: the slice at off if it is cached, else NULL.  Safe with
 * img->lock held shared by several threads at once: it changes nothing
 * but the entry's referenced flag.  The data stays valid while the lock
 * is held (eviction needs it exclusively).
 */
const void *
cache_peek (struct cache *c, uint64_t off)
{
  struct cache_entry *e = lookup (c, off);

  if (e == NULL)
    return NULL;
  if (!__atomic_load_n (&e->referenced, __ATOMIC_RELAXED))
    __atomic_store_n (&e->referenced, true, __ATOMIC_RELAXED);
  return e->data;
}

/* Staging, with img->lock held at least shared: a free slot (its
 * buffer in *data and the generation now in *gen), or -1 if there is
 * none free.
 */
int
cache_stage_get (struct cache *c, void **data, uint64_t *gen)
{
  unsigned i;
  int r = -1;

  pthread_mutex_lock (&c->stage_lock);
  for (i = 0; i < c->nslots; i++) {
    struct stage_slot *s = &c->slots[i];
    if (s->state != SLOT_FREE)
      continue;
    if (s->data == NULL &&
        (s->data = slice_alloc (c)) == NULL)
      break;
    s->state = SLOT_BUSY;
    *data = s->data;
    r = i;
    break;
  }
  pthread_mutex_unlock (&c->stage_lock);
  *gen = c->gen;
  return r;
}

/* Slot i holds the slice at off, read under generation gen.  Returns
 * true when it is time to drain.
 */
bool
cache_stage_ready (struct cache *c, int i, uint64_t off, uint64_t gen)
{
  bool drain;

  pthread_mutex_lock (&c->stage_lock);
  c->slots[i].offset = off;
  c->slots[i].gen = gen;
  c->slots[i].state = SLOT_READY;
  c->nready++;
  c->misses++;
  drain = c->nready >= c->nslots / 2;
  pthread_mutex_unlock (&c->stage_lock);
  return drain;
}

void
cache_stage_abort (struct cache *c, int i)
{
  pthread_mutex_lock (&c->stage_lock);
  c->slots[i].state = SLOT_FREE;
  pthread_mutex_unlock (&c->stage_lock);
}

/* Every staged slice is stale (the L1 table changed). */
void
cache_stage_invalidate (struct cache *c)
{
  c->gen++;
}

/* With img->lock held exclusively: move the ready slots into the cache,
 * except stale ones and slices cached meanwhile.
 */
void
cache_stage_drain (struct cache *c)
{
  unsigned i;

  pthread_mutex_lock (&c->stage_lock);
  for (i = 0; i < c->nslots && c->nready > 0; i++) {
    struct stage_slot *s = &c->slots[i];
    struct cache_entry *e;

    if (s->state != SLOT_READY)
      continue;
    s->state = SLOT_FREE;
    c->nready--;
    if (s->gen != c->gen || lookup (c, s->offset) != NULL)
      continue;
    /* Errors (a failed write-back of a dirty victim) only cost the
     * slice: a later miss reads it again.
     */
    e = victim (c);
    if (e == NULL)
      continue;
    memcpy (e->data, s->data, (size_t) 1 << c->slice_bits);
    insert (c, e, s->offset, 0);
  }
  pthread_mutex_unlock (&c->stage_lock);
}

void
cache_put (struct cache *c, struct cache_entry *e)
{
  e->pins--;
}

void
cache_mark_dirty (struct cache *c, struct cache_entry *e)
{
  c->gen++;
  if (!e->dirty) {
    e->dirty = true;
    c->ndirty++;
  }
}

bool
cache_has_dirty (struct cache *c)
{
  return c->ndirty > 0;
}

int
cache_flush (struct cache *c)
{
  uint32_t i;

  if (c->ndirty == 0)
    return 0;
  for (i = 0; i < c->used; i++) {
    struct cache_entry *e = &c->entries[i];
    if (e->valid && e->dirty && write_back (c, e) == -1)
      return -1;
  }
  return 0;
}

/* Write-back without the lock (see the top of this file), with the
 * lock held: take every dirty slice, if their copies fit in max_bytes.
 * check (may be NULL) runs for each first, as before_write does for a
 * write-back (without the ordering, which is the owner's business
 * here); if one refuses, nothing is taken and -1 is returned.  Returns
 * 1 when taken (maybe none: nothing was dirty), 0 when there are more
 * than max_bytes of them, they fill more than half the cache or memory
 * for the copies cannot be had (nothing taken: write them back the
 * usual way, which needs no copies), -1 when check refused.
 */
int
cache_wb_begin (struct cache *c, uint64_t max_bytes,
                cache_before_write_fn check, void *opaque)
{
  size_t len = (size_t) 1 << c->slice_bits;
  uint32_t i, n = 0;

  if (c->nwb != 0) {            /* one write-back at a time */
    errno = EBUSY;
    return -1;
  }
  /* Pinned, they cannot make room: leave at least half the cache to
   * the requests that go on meanwhile.
   */
  if ((uint64_t) c->ndirty * len > max_bytes || c->ndirty > c->nr / 2)
    return 0;
  if (c->ndirty > c->wb_alloc) {
    struct wb_slice *w = realloc (c->wb, c->ndirty * sizeof *w);
    if (w == NULL)
      return 0;                 /* no room for copies: the usual way */
    memset (w + c->wb_alloc, 0, (c->ndirty - c->wb_alloc) * sizeof *w);
    c->wb = w;
    c->wb_alloc = c->ndirty;
  }
  for (i = 0; i < c->used && n < c->ndirty; i++) {
    struct cache_entry *e = &c->entries[i];
    if (!e->valid || !e->dirty)
      continue;
    if (check && check (opaque, e->offset, len) == -1)
      return -1;
    if (c->wb[n].copy == NULL && (c->wb[n].copy = slice_alloc (c)) == NULL)
      return 0;                 /* (the copies made are kept for later) */
    c->wb[n].e = e;
    c->wb[n].offset = e->offset;
    n++;
  }
  /* Nothing can fail from here on. */
  for (i = 0; i < n; i++) {
    struct cache_entry *e = c->wb[i].e;
    memcpy (c->wb[i].copy, e->data, len);
    e->pins++;
    e->dirty = false;
  }
  c->ndirty -= n;
  c->nwb = n;
  return 1;
}

/* With no lock held: write the copies taken by cache_wb_begin, those
 * from i on in steps of 'step'.
 */
struct wb_job {
  struct cache *c;
  uint32_t first, step;
  int r, err;
};

static void *
wb_write_some (void *arg)
{
  struct wb_job *j = arg;
  struct cache *c = j->c;
  size_t len = (size_t) 1 << c->slice_bits;
  uint32_t i;

  j->r = 0;
  for (i = j->first; i < c->nwb; i += j->step) {
    if (io_pwrite (c->io, c->wb[i].copy, len, c->wb[i].offset) == -1) {
      nbdkit_error ("%s: writing %s slice at %#" PRIx64 ": %m", c->name,
                    c->what, c->wb[i].offset);
      j->r = -1;
      j->err = errno;
      break;
    }
  }
  return NULL;
}

/* With no lock held: write the copies taken by cache_wb_begin.  With
 * direct I/O each write waits for the disk, and the slices of a
 * write-back are scattered (one per table written to): up to
 * WB_THREADS threads write them at once.  They are all written between
 * the same two syncs (the owner's), so their order never mattered.
 */
#define WB_THREADS 4
#define WB_PER_THREAD 8         /* fewer slices: fewer threads */

int
cache_wb_write (struct cache *c)
{
  struct wb_job jobs[WB_THREADS];
  pthread_t t[WB_THREADS];
  bool started[WB_THREADS] = { false };
  uint32_t n = 1, i;
  int r = 0;

  if (c->io->direct)
    n = c->nwb / WB_PER_THREAD;
  if (n > WB_THREADS)
    n = WB_THREADS;
  if (n < 1)
    n = 1;
  for (i = 0; i < n; i++)
    jobs[i] = (struct wb_job) { c, i, n, 0, 0 };
  for (i = 1; i < n; i++)
    started[i] = pthread_create (&t[i], NULL, wb_write_some, &jobs[i]) == 0;
  /* This thread writes its share, and any share no thread took. */
  for (i = 0; i < n; i++)
    if (i == 0 || !started[i])
      wb_write_some (&jobs[i]);
  for (i = 1; i < n; i++)
    if (started[i])
      pthread_join (t[i], NULL);
  for (i = 0; i < n && r == 0; i++)
    if (jobs[i].r == -1) {
      errno = jobs[i].err;
      r = -1;
    }
  return r;
}

/* With the lock held again: the write-back is over; ok says whether
 * every copy was written (if not, the slices are dirty again).
 */
void
cache_wb_end (struct cache *c, bool ok)
{
  uint32_t i;

  for (i = 0; i < c->nwb; i++) {
    struct cache_entry *e = c->wb[i].e;
    e->pins--;
    if (!ok && !e->dirty) {
      e->dirty = true;
      c->ndirty++;
    }
  }
  c->nwb = 0;
}

/* Forget slices in [off, off+len): their clusters were freed.  Any
 * dirty contents are discarded, which is what the caller wants.
 */
static void
drop_entry (struct cache *c, struct cache_entry *e)
{
  if (e->dirty) {
    e->dirty = false;
    c->ndirty--;
  }
  hash_remove (c, e);
  lru_unlink (e);
  /* Move to the cold end so it is reused first. */
  e->next = &c->lru;
  e->prev = c->lru.prev;
  c->lru.prev->next = e;
  c->lru.prev = e;
}

void
cache_drop (struct cache *c, uint64_t off, uint64_t len)
{
  uint64_t slices = len >> c->slice_bits;
  uint32_t i;

  c->gen++;
  /* A cluster or two (a freed or new table): look each slice up. */
  if (slices <= 64) {
    uint64_t s;
    for (s = 0; s < slices; s++) {
      struct cache_entry *e = lookup (c, off + (s << c->slice_bits));
      if (e && e->pins == 0)
        drop_entry (c, e);
    }
    return;
  }
  for (i = 0; i < c->used; i++) {
    struct cache_entry *e = &c->entries[i];
    if (e->valid && e->offset >= off && e->offset - off < len &&
        e->pins == 0)
      drop_entry (c, e);
  }
}

uint32_t
cache_nr_entries (struct cache *c)
{
  return c->nr;
}

void
cache_stats (struct cache *c, uint64_t *hits, uint64_t *misses)
{
  *hits = c->hits;
  *misses = c->misses;
}
