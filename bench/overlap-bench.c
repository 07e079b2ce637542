/* nbdkit-qcow2: micro-benchmark of core/overlap-map.c (not run by make check).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Builds the overlap map of a synthetic image laid out roughly the way
 * qemu-img lays out a preallocated one (header, refcount table,
 * L1 table, then an L2 table before each run of data clusters it maps,
 * and a refcount block each time allocation passes the end of the last
 * one), then times queries of small random ranges, as the checker does
 * before every guest write.  Reports ns an add and a query, and the
 * map's memory next to the 2014 estimate of 40 * image_size /
 * cluster_size^2 (image_size: the file's), as a ratio: both what
 * overlap_map_memory counts (everything the map malloc'd) and what the
 * heap really gave out (malloc_usable_size plus glibc's 8-byte chunk
 * header of every block, counted by taking over malloc: see heap_used).
 *
 * Layouts: 512 byte clusters (1 and 4 GiB), 64 KiB (1 TiB, and a small
 * 64 GiB image where the map's fixed costs show), 2 MiB (1 PiB, and
 * 64 TiB), and a pathological one with metadata in every third cluster.
 *
 *   gcc -std=gnu11 -O2 -I core bench/overlap-bench.c core/overlap-map.c \
 *     core/overlap-map-update.c -o /tmp/overlap-bench &&
 *     /tmp/overlap-bench [queries [layout]]
 *
 * Add -DOVERLAP_WINDOW_EXTRA=n, -DOVERLAP_WINDOW_EXTRA_BIG=n or
 * -DOVERLAP_SUB_BITS=n to try another geometry (see
 * overlap-map-internal.h).
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <inttypes.h>
#include <time.h>
#include <errno.h>

#undef NDEBUG
#include <assert.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "overlap.h"

struct layout {
  const char *name;
  unsigned cluster_bits;
  uint64_t guest_size;
  unsigned refcount_bits;
  unsigned meta_every;          /* 0, or: extra metadata every n clusters */
};

static const struct layout layouts[] = {
  { "1 GiB, 512 B clusters", 9, UINT64_C (1) << 30, 16, 0 },
  { "4 GiB, 512 B clusters", 9, UINT64_C (1) << 32, 16, 0 },
  { "1 TiB, 64 KiB clusters", 16, UINT64_C (1) << 40, 16, 0 },
  /* Pathological: metadata in one cluster of three. */
  { "1 GiB, 512 B, 1/3 metadata", 9, UINT64_C (1) << 30, 16, 3 },
  { "64 GiB, 64 KiB clusters", 16, UINT64_C (1) << 36, 16, 0 },
  { "1 PiB, 2 MiB clusters", 21, UINT64_C (1) << 50, 16, 0 },
  { "64 TiB, 2 MiB clusters", 21, UINT64_C (1) << 46, 16, 0 },
};

static uint64_t rng_state = 0x2545f4914f6cdd1d;

static uint64_t
rng (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * UINT64_C (2685821657736338717);
}

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* What the heap really gives out: every block's malloc_usable_size plus
 * the 8-byte chunk header glibc puts in front of it, kept up to date by
 * taking over malloc and friends (the map's and everyone else's; only
 * the difference around building a map is used).  mallinfo2 is no good
 * for this: blocks freed to the thread cache still count as in use.
 */
#ifdef __GLIBC__
extern void *__libc_malloc (size_t size);
extern void *__libc_calloc (size_t nmemb, size_t size);
extern void *__libc_realloc (void *ptr, size_t size);
extern void *__libc_memalign (size_t align, size_t size);
extern void __libc_free (void *ptr);

static size_t heap_live;

static size_t
block (void *p)
{
  return p ? malloc_usable_size (p) + 8 : 0;
}

void *
malloc (size_t size)
{
  void *p = __libc_malloc (size);

  heap_live += block (p);
  return p;
}

void *
calloc (size_t nmemb, size_t size)
{
  void *p = __libc_calloc (nmemb, size);

  heap_live += block (p);
  return p;
}

void *
realloc (void *ptr, size_t size)
{
  size_t old = block (ptr);
  void *p = __libc_realloc (ptr, size);

  if (p != NULL || size == 0)
    heap_live += block (p) - old;
  return p;
}

void *
memalign (size_t align, size_t size)
{
  void *p = __libc_memalign (align, size);

  heap_live += block (p);
  return p;
}

void *
aligned_alloc (size_t align, size_t size)
{
  return memalign (align, size);
}

int
posix_memalign (void **pp, size_t align, size_t size)
{
  *pp = memalign (align, size);
  return *pp ? 0 : ENOMEM;
}

void
free (void *ptr)
{
  heap_live -= block (ptr);
  __libc_free (ptr);
}

static size_t
heap_used (void)
{
  return heap_live;
}
#else
static size_t
heap_used (void)
{
  return 0;
}
#endif

/* The allocator of the synthetic image. */
struct add_op {
  uint64_t first, n;
  unsigned types;
};

struct image {
  struct overlap_map *m;
  unsigned cluster_bits;
  uint64_t next;                /* next free host cluster */
  uint64_t refblock_end;        /* clusters covered by refcount blocks */
  uint64_t per_refblock;
  struct add_op *log;           /* every add, to replay and time them */
  size_t nadds, cap;
};

static void
add (struct image *img, uint64_t c, uint64_t n, unsigned types)
{
  if (img->nadds == img->cap) {
    img->cap = img->cap ? 2 * img->cap : 1024;
    img->log = realloc (img->log, img->cap * sizeof *img->log);
    assert (img->log != NULL);
  }
  img->log[img->nadds++] = (struct add_op) { c, n, types };
}

/* Build the map from the log: the time of the adds alone. */
static double
replay (struct image *img)
{
  double t = now ();
  size_t i;

  img->m = overlap_map_new (img->cluster_bits);
  assert (img->m != NULL);
  for (i = 0; i < img->nadds; i++) {
    if (overlap_map_add (img->m, img->log[i].first, img->log[i].n,
                         img->log[i].types) == -1) {
      perror ("overlap_map_add");
      exit (EXIT_FAILURE);
    }
  }
  return now () - t;
}

/* Allocate n clusters, first a refcount block if they pass the end of
 * what the refcount blocks cover.
 */
static uint64_t
alloc (struct image *img, uint64_t n, unsigned types)
{
  uint64_t c;

  if (types == 0) {
    /* Data: as if one cluster at a time, so a refcount block may land
     * among them.
     */
    c = img->next;
    while (n > 0) {
      uint64_t chunk;

      while (img->next >= img->refblock_end) {
        add (img, img->next, 1, OV_REFCOUNT_BLOCK);
        img->next++;
        img->refblock_end += img->per_refblock;
      }
      chunk = img->refblock_end - img->next;
      if (chunk > n)
        chunk = n;
      img->next += chunk;
      n -= chunk;
    }
    return c;
  }
  while (img->next + n > img->refblock_end) {
    add (img, img->next, 1, OV_REFCOUNT_BLOCK);
    img->next++;
    img->refblock_end += img->per_refblock;
  }
  c = img->next;
  img->next += n;
  if (types)
    add (img, c, n, types);
  return c;
}

static uint64_t
build (const struct layout *l, struct image *img)
{
  uint64_t cs = UINT64_C (1) << l->cluster_bits;
  uint64_t guest_clusters = l->guest_size >> l->cluster_bits;
  uint64_t l2_entries = cs / 8;
  uint64_t nl2 = (guest_clusters + l2_entries - 1) / l2_entries;
  uint64_t l1_clusters = (nl2 * 8 + cs - 1) / cs;
  uint64_t i, j;

  memset (img, 0, sizeof *img);
  img->cluster_bits = l->cluster_bits;
  img->per_refblock = cs * 8 / l->refcount_bits;
  img->refblock_end = 0;
  /* Header, then a refcount table big enough for the whole file. */
  add (img, 0, 1, OV_MAIN_HEADER);
  img->next = 1;
  i = (guest_clusters + nl2) * 2 / img->per_refblock * 8 / cs + 1;
  add (img, img->next, i, OV_REFCOUNT_TABLE);
  img->next += i;
  alloc (img, l1_clusters, OV_ACTIVE_L1);
  for (i = 0; i < nl2; i++) {
    alloc (img, 1, OV_ACTIVE_L2);
    if (l->meta_every == 0) {
      /* The data clusters an L2 table maps, at once. */
      alloc (img, l2_entries, 0);
      continue;
    }
    for (j = 0; j < l2_entries; j++) {
      if (j % (l->meta_every - 1) == 0)
        alloc (img, 1, OV_INACTIVE_L2);
      alloc (img, 1, 0);
    }
  }
  return img->next;
}

enum pattern { RANDOM, RANDOM_MISS, SEQUENTIAL };

/* 'nq' queries of 1 to 8 clusters: at random, at random among ranges
 * with no metadata, or one after the other through the file (a guest
 * writing sequentially).
 */
static double
time_queries (struct overlap_map *m, uint64_t host_clusters, uint64_t nq,
              enum pattern p, uint64_t *hits)
{
  enum { BATCH = 1 << 20 };
  uint64_t *first = malloc (BATCH * sizeof *first);
  uint8_t *len = malloc (BATCH);
  uint64_t i, hit, h = 0;
  double t, best = 1e9;
  unsigned rep;

  assert (first && len);
  for (i = 0; i < BATCH; i++) {
    do {
      len[i] = 1 + rng () % 8;
      if (p == SEQUENTIAL)
        first[i] = i == 0 ? 0 : (first[i - 1] + len[i - 1]) % host_clusters;
      else
        first[i] = rng () % (host_clusters - len[i]);
    } while (p == RANDOM_MISS &&
             overlap_map_query (m, first[i], len[i], OV_ALL, &hit));
  }
  for (rep = 0; rep < 3; rep++) {
    h = 0;
    t = now ();
    for (i = 0; i < nq; i++) {
      uint64_t k = i & (BATCH - 1);

      h += overlap_map_query (m, first[k], len[k], OV_ALL, &hit) != 0;
    }
    t = now () - t;
    if (t < best)
      best = t;
  }
  *hits = h;
  free (first);
  free (len);
  return best * 1e9 / nq;
}

int
main (int argc, char *argv[])
{
  uint64_t nq = argc > 1 ? strtoull (argv[1], NULL, 0) : 10000000;
  int only = argc > 2 ? atoi (argv[2]) : -1;     /* one layout */
  size_t i;

  printf ("%" PRIu64 " queries of 1-8 clusters, mask OV_ALL, best of 3\n",
          nq);
  for (i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
    const struct layout *l = &layouts[i];
    struct image img;
    struct overlap_map_stats st;
    uint64_t host, hits, cs = UINT64_C (1) << l->cluster_bits;
    size_t heap0, mem, heap;
    double t, ns, bound;

    if (only >= 0 && (size_t) only != i)
      continue;
    host = build (l, &img);
    heap0 = heap_used ();
    t = replay (&img);
    mem = overlap_map_memory (img.m);
    heap = heap_used () - heap0;
    assert (overlap_map_get_stats (img.m, &st, sizeof st) == 0);
    /* IS = file size = host clusters * CS. */
    bound = 40.0 * (double) (host * cs) / (double) (cs * cs);

    printf ("\n%s (windows of %" PRIu64 " clusters%s)\n", l->name,
            UINT64_C (1) << st.window_bits,
            st.regrains ? ", regrained" : "");
    printf ("  file %.2f GiB, %" PRIu64 " clusters; %zu adds in %.3f s "
            "(%.0f ns an add)\n",
            (double) (host * cs) / (1 << 30), host, img.nadds, t,
            t * 1e9 / img.nadds);
    printf ("  %zu runs in %zu windows, %.2f type sets a window, "
            "entries of %.2f bytes (at most %u)\n",
            st.runs, st.windows, (double) st.type_sets / st.windows,
            (double) st.entry_bytes / st.runs, st.max_entry);
    printf ("  2014 bound 40*IS/CS^2 = %.0f bytes\n", bound);
    printf ("  memory: %zu bytes counted (%.2f a run, ratio %.2f); "
            "%zu heap with malloc's overhead (ratio %.2f)\n",
            mem, (double) mem / st.runs, mem / bound, heap, heap / bound);
    ns = time_queries (img.m, host, nq, RANDOM, &hits);
    printf ("  random ranges: %.1f ns/query (%.1f%% hit)\n",
            ns, 100.0 * hits / nq);
    ns = time_queries (img.m, host, nq, RANDOM_MISS, &hits);
    printf ("  random ranges with no metadata: %.1f ns/query\n", ns);
    ns = time_queries (img.m, host, nq, SEQUENTIAL, &hits);
    printf ("  sequential ranges: %.1f ns/query (%.1f%% hit)\n",
            ns, 100.0 * hits / nq);
    overlap_map_free (img.m);
    free (img.log);
  }
  return 0;
}
