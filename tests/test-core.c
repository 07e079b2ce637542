/* nbdkit-qcow2: unit tests of core without nbdkit.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Images are built by hand in memory (no binary images in the tree) and
 * opened through the memory io backend: reads of every cluster kind,
 * run merging, extents, header validation on corrupted headers, index
 * math, the table cache (hit, miss, LRU eviction, pinning, write-back,
 * staging, empty slices), in-flight writes, flushes that write back
 * with the image lock dropped, refcount entries of every
 * width, deferred frees, compressed writes (compress=on) and the
 * give-back of a failed reservation.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include <pthread.h>
#include <dlfcn.h>
#include <unistd.h>
#include <fcntl.h>

#include "internal.h"

extern char stub_last_error[];

static void
put_refcount (uint8_t *block, unsigned order, uint64_t idx, uint64_t v)
{
  unsigned bits = 1u << order;

  if (bits < 8) {
    uint64_t bit = idx * bits;
    block[bit / 8] |= v << (bit % 8);
  }
  else {
    unsigned bytes = bits / 8, i;
    for (i = 0; i < bytes; i++)
      block[idx * bytes + i] = v >> (8 * (bytes - 1 - i));
  }
}

/* Layout, in clusters: 0 header, 1 refcount table, 2 refcount block,
 * 3 L1, 4 L2, 5..7 data.  Guest clusters: 0 -> data 5 (0x11),
 * 1 -> zero flag, 2 -> unallocated, 3 -> data 6 (0x22), 4 -> data 7
 * (0x33, host-contiguous with 3), 5.. unallocated.  16 clusters big.
 */
#define NCLUSTERS 8
static uint8_t *
build (unsigned cb, unsigned order, size_t *size)
{
  size_t cs = (size_t) 1 << cb;
  uint8_t *b = calloc (NCLUSTERS, cs);
  uint8_t *l2 = b + 4 * cs;
  unsigned i;

  assert (b);
  memcpy (b, "QFI\xfb", 4);
  put_be32 (b + HDR_VERSION, 3);
  put_be32 (b + HDR_CLUSTER_BITS, cb);
  put_be64 (b + HDR_SIZE, 16 * cs);
  put_be32 (b + HDR_L1_SIZE, 1);
  put_be64 (b + HDR_L1_TABLE_OFFSET, 3 * cs);
  put_be64 (b + HDR_REFCOUNT_TABLE_OFFSET, cs);
  put_be32 (b + HDR_REFCOUNT_TABLE_CLUSTERS, 1);
  put_be32 (b + HDR_REFCOUNT_ORDER, order);
  put_be32 (b + HDR_HEADER_LENGTH, 112);
  put_be64 (b + cs, 2 * cs);
  for (i = 0; i < NCLUSTERS; i++)
    put_refcount (b + 2 * cs, order, i, 1);
  put_be64 (b + 3 * cs, (4 * cs) | QCOW_OFLAG_COPIED);
  put_be64 (l2 + 0, (5 * cs) | QCOW_OFLAG_COPIED);
  put_be64 (l2 + 8, QCOW_OFLAG_ZERO);
  put_be64 (l2 + 24, (6 * cs) | QCOW_OFLAG_COPIED);
  put_be64 (l2 + 32, (7 * cs) | QCOW_OFLAG_COPIED);
  memset (b + 5 * cs, 0x11, cs);
  memset (b + 6 * cs, 0x22, cs);
  memset (b + 7 * cs, 0x33, cs);
  *size = NCLUSTERS * cs;
  return b;
}

static struct qcow2_image *
open_buf (const uint8_t *b, size_t size)
{
  struct qcow2_config cfg = { .readonly = true };
  struct qcow2_io *io = qcow2_io_new_memory (b, size);

  assert (io);
  return qcow2_open_io (io, "test.qcow2", NULL, &cfg);
}

static bool
all_bytes (const uint8_t *p, size_t n, uint8_t v)
{
  size_t i;
  for (i = 0; i < n; i++)
    if (p[i] != v)
      return false;
  return true;
}

struct ext { uint64_t off, len; uint32_t type; };
static struct ext exts[64];
static int nexts;

static int
collect (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  assert (nexts < 64);
  if (nexts > 0 && exts[nexts-1].type == type &&
      exts[nexts-1].off + exts[nexts-1].len == offset)
    exts[nexts-1].len += length;
  else
    exts[nexts++] = (struct ext) { offset, length, type };
  return 0;
}

static void
test_reads (unsigned cb)
{
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  struct qcow2_image *img = open_buf (b, size);
  uint8_t *buf = malloc (16 * cs);
  struct mapping m;

  assert (img);
  assert (qcow2_get_size (img) == 16 * cs);
  assert (qcow2_pread (img, buf, 16 * cs, 0) == 0);
  assert (all_bytes (buf, cs, 0x11));
  assert (all_bytes (buf + cs, 2 * cs, 0));
  assert (all_bytes (buf + 3 * cs, cs, 0x22));
  assert (all_bytes (buf + 4 * cs, cs, 0x33));
  assert (all_bytes (buf + 5 * cs, 11 * cs, 0));

  /* Unaligned read across kinds. */
  assert (qcow2_pread (img, buf, cs + 2, cs / 2) == 0);
  assert (all_bytes (buf, cs / 2, 0x11));
  assert (all_bytes (buf + cs / 2, cs / 2 + 2, 0));

  /* Host-contiguous data clusters merge into one run. */
  assert (cluster_map (img, 3 * cs + 1, 4 * cs, &m) == 0);
  assert (m.kind == MAP_DATA);
  assert (m.host_offset == 6 * cs + 1);
  assert (m.length == 2 * cs - 1);
  assert (cluster_map (img, cs, 4 * cs, &m) == 0);
  assert (m.kind == MAP_ZERO && m.length == cs);
  assert (cluster_map (img, 2 * cs, 1, &m) == 0);
  assert (m.kind == MAP_UNALLOCATED && m.length == 1);

  nexts = 0;
  assert (qcow2_extents (img, 16 * cs, 0, false, collect, NULL) == 0);
  assert (nexts == 5);
  assert (exts[0].off == 0 && exts[0].len == cs && exts[0].type == 0);
  assert (exts[1].off == cs && exts[1].type == QCOW2_EXTENT_ZERO);
  assert (exts[2].off == 2 * cs &&
          exts[2].type == (QCOW2_EXTENT_HOLE|QCOW2_EXTENT_ZERO));
  assert (exts[3].off == 3 * cs && exts[3].len == 2 * cs &&
          exts[3].type == 0);
  assert (exts[4].off == 5 * cs && exts[4].len == 11 * cs);

  /* Reads beyond the disk are refused. */
  assert (qcow2_pread (img, buf, 2, 16 * cs - 1) == -1 && errno == EINVAL);

  qcow2_close (img);
  free (buf);
  free (b);
}

/* Corrupt one thing, expect open to fail with a message. */
static void
expect_refused (uint8_t *b, size_t size, const char *msg)
{
  struct qcow2_image *img;

  stub_last_error[0] = '\0';
  img = open_buf (b, size);
  if (img != NULL || strstr (stub_last_error, msg) == NULL) {
    fprintf (stderr, "expected refusal with '%s', got '%s'\n", msg,
             stub_last_error);
    abort ();
  }
}

static void
test_header_validation (void)
{
  const unsigned cb = 16;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b;

#define CASE(code, msg)                         \
  do {                                          \
    b = build (cb, 4, &size);                   \
    code;                                       \
    expect_refused (b, size, msg);              \
    free (b);                                   \
  } while (0)

  CASE (b[0] = 'X', "bad magic");
  CASE (put_be32 (b + HDR_VERSION, 4), "unsupported qcow2 version 4");
  CASE (put_be32 (b + HDR_VERSION, 1), "unsupported qcow2 version 1");
  CASE (put_be32 (b + HDR_CLUSTER_BITS, 8), "cluster_bits 8 out of range");
  CASE (put_be32 (b + HDR_CLUSTER_BITS, 22), "cluster_bits 22 out of range");
  CASE (put_be64 (b + HDR_L1_TABLE_OFFSET, 3 * cs + 8), "not cluster aligned");
  CASE (put_be64 (b + HDR_L1_TABLE_OFFSET, 100 * cs), "beyond end of file");
  CASE (put_be32 (b + HDR_L1_SIZE, 0x7fffffff), "L1 table is too large");
  CASE (put_be64 (b + HDR_SIZE, UINT64_C(1) << 40), "L1 table too small");
  CASE (put_be64 (b + HDR_SIZE, UINT64_MAX), "virtual size");
  CASE (put_be64 (b + HDR_REFCOUNT_TABLE_OFFSET, 100 * cs),
        "refcount table at");
  CASE (put_be64 (b + HDR_REFCOUNT_TABLE_OFFSET, 77), "refcount table offset");
  CASE (put_be32 (b + HDR_REFCOUNT_TABLE_CLUSTERS, 0),
        "refcount table is empty");
  CASE (put_be64 (b + HDR_INCOMPATIBLE_FEATURES, UINT64_C(1) << 5),
        "unknown incompatible feature bit(s) 5");
  CASE (put_be32 (b + HDR_CRYPT_METHOD, 1), "AES");
  CASE (put_be32 (b + HDR_CRYPT_METHOD, 2), "LUKS");
  CASE (put_be32 (b + HDR_REFCOUNT_ORDER, 7), "refcount_order 7");
  CASE (put_be32 (b + HDR_HEADER_LENGTH, 100), "header_length 100");
  CASE (put_be32 (b + HDR_HEADER_LENGTH, 108), "header_length 108");
  CASE (b[HDR_COMPRESSION_TYPE] = 1, "compression type");
  CASE ((put_be64 (b + HDR_INCOMPATIBLE_FEATURES, INCOMPAT_COMPRESSION),
         b[HDR_COMPRESSION_TYPE] = 7), "compression type");
  CASE (put_be64 (b + HDR_INCOMPATIBLE_FEATURES, INCOMPAT_DATA_FILE),
        "external data file");
  CASE ((put_be32 (b + 112, EXT_BACKING_FORMAT), put_be32 (b + 116, 0x100000)),
        "overruns the header area");
  CASE ((put_be64 (b + HDR_BACKING_FILE_OFFSET, 200),
         put_be32 (b + HDR_BACKING_FILE_SIZE, 5000)), "backing file name");
  CASE ((put_be32 (b + HDR_NB_SNAPSHOTS, 3),
         put_be64 (b + HDR_SNAPSHOTS_OFFSET, 50 * cs)), "snapshot table");
  size = 50;
  b = build (cb, 4, &size);
  expect_refused (b, 50, "file too short");
  free (b);
#undef CASE

  /* Named unknown feature from the image's feature table. */
  b = build (cb, 4, &size);
  put_be64 (b + HDR_INCOMPATIBLE_FEATURES, UINT64_C(1) << 9);
  put_be32 (b + 112, EXT_FEATURE_TABLE);
  put_be32 (b + 116, 48);
  b[120] = 0; b[121] = 9;
  memcpy (b + 122, "frobnicate", 10);
  expect_refused (b, size, "9 (frobnicate)");
  free (b);
}

static void
test_corrupt_l2 (void)
{
  const unsigned cb = 12;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  struct qcow2_image *img;
  uint8_t buf[16];

  put_be64 (b + 4 * cs + 24, (6 * cs + 512) | QCOW_OFLAG_COPIED);
  img = open_buf (b, size);
  assert (img);
  assert (qcow2_pread (img, buf, 16, 0) == 0);      /* good cluster */
  assert (qcow2_pread (img, buf, 16, 3 * cs) == -1 && errno == EIO);
  assert (strstr (stub_last_error, "not cluster aligned"));
  assert (qcow2_pread (img, buf, 16, 0) == 0);      /* reads go on */
  qcow2_close (img);
  free (b);
}

/* Regressions found by the fuzzer: tables pointing far past the end of
 * the file must be refused, never written (the memory backend would
 * happily grow to reach them).
 */
static struct qcow2_image *
open_rw (const uint8_t *b, size_t size)
{
  struct qcow2_config cfg = { 0 };
  struct qcow2_io *io = qcow2_io_new_memory (b, size);

  assert (io);
  return qcow2_open_io (io, "test.qcow2", NULL, &cfg);
}

static void
test_fuzz_regressions (void)
{
  const unsigned cb = 12;
  size_t size, memsize, cs = (size_t) 1 << cb;
  uint8_t *b, buf[512] = { 0 };
  struct qcow2_image *img;

  /* L1 entry pointing at an L2 table 1 TiB past the end of the file. */
  b = build (cb, 4, &size);
  put_be64 (b + 3 * cs, (UINT64_C(1) << 40) | QCOW_OFLAG_COPIED);
  img = open_rw (b, size);
  assert (img);
  assert (qcow2_pwrite (img, buf, 512, 0, 0) == -1 && errno == EIO);
  assert (strstr (stub_last_error, "beyond the end of the file"));
  assert (qcow2_pread (img, buf, 512, 0) == -1 && errno == EIO);
  qcow2_flush (img);
  assert (qcow2_io_memory_data (img->io, &memsize) && memsize == size);
  qcow2_close (img);
  free (b);

  /* A data cluster far past the end of the file, written in place. */
  b = build (cb, 4, &size);
  put_be64 (b + 4 * cs, (UINT64_C(1) << 40) | QCOW_OFLAG_COPIED);
  img = open_rw (b, size);
  assert (img);
  assert (qcow2_pwrite (img, buf, 512, 0, 0) == -1 && errno == EIO);
  assert (qcow2_io_memory_data (img->io, &memsize) && memsize == size);
  qcow2_close (img);
  free (b);

  /* Refcount block past the end of the file, then a dirty-image repair
   * and an allocating write.
   */
  b = build (cb, 4, &size);
  put_be64 (b + cs, UINT64_C(1) << 40);
  put_be64 (b + HDR_INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY);
  img = open_rw (b, size);
  assert (img);
  assert (qcow2_pwrite (img, buf, 512, 2 * cs, 0) == -1);
  qcow2_flush (img);
  assert (qcow2_io_memory_data (img->io, &memsize) && memsize == size);
  qcow2_close (img);
  free (b);

  /* Bitmap directory whose entries run past its end. */
  b = build (cb, 4, &size);
  put_be64 (b + HDR_AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
  put_be32 (b + 112, EXT_BITMAPS);
  put_be32 (b + 116, 24);
  put_be32 (b + 120, 5);                   /* nb_bitmaps */
  put_be64 (b + 128, 24);                  /* directory size */
  put_be64 (b + 136, 7 * cs);              /* directory offset */
  memset (b + 7 * cs, 0, cs);
  put_be32 (b + 7 * cs + 20, 0xfffffff0);  /* extra data size */
  img = open_rw (b, size);
  assert (img);
  assert (qcow2_pwrite (img, buf, 512, 2 * cs, 0) == 0);
  qcow2_close (img);
  free (b);
}

static void
test_index_math (void)
{
  struct qcow2_image img = { 0 };

  img.cluster_bits = 16;
  img.cluster_size = 65536;
  img.l2_bits = 13;                     /* 8192 entries */
  assert (l1_index (&img, 0) == 0);
  assert (l1_index (&img, (UINT64_C(512) << 20) - 1) == 0);
  assert (l1_index (&img, UINT64_C(512) << 20) == 1);
  assert (l2_index (&img, 65536 * 8191 + 5) == 8191);
  assert (l2_index (&img, 65536 * 8192) == 0);
  assert (offset_into_cluster (&img, 65537) == 1);
  assert (size_to_clusters (&img, 1) == 1);
  assert (size_to_clusters (&img, 65536) == 1);
  assert (size_to_clusters (&img, 65537) == 2);

  img.cluster_bits = 9;
  img.cluster_size = 512;
  img.l2_bits = 6;                      /* 64 entries: 32 KiB per table */
  assert (l1_index (&img, 32767) == 0 && l1_index (&img, 32768) == 1);
  assert (l2_index (&img, 32767) == 63);

  img.cluster_bits = 16;                /* extended L2: 4096 entries */
  img.l2_bits = 12;
  assert (l1_index (&img, UINT64_C(256) << 20) == 1);
}

static void
test_cache (void)
{
  const unsigned cb = 12;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  struct qcow2_image *img = open_buf (b, size);
  struct cache *c;
  struct cache_entry *e[17], *e2;
  uint64_t hits, misses;
  uint8_t *d;
  const uint8_t *mem;
  size_t memsize;
  int i;

  assert (img);
  c = cache_create (img->io, "test.qcow2", "L2", 9, 16 * 512, NULL, NULL);
  assert (cache_nr_entries (c) == 16);

  /* Miss then hit; contents come from the file. */
  d = cache_get (c, 5 * cs, true, &e[0]);
  assert (d && d[0] == 0x11);
  cache_put (c, e[0]);
  d = cache_get (c, 5 * cs, true, &e[0]);
  assert (d && d[0] == 0x11);
  cache_put (c, e[0]);
  cache_stats (c, &hits, &misses);
  assert (hits == 1 && misses == 1);

  /* Pin all 16 entries: the 17th get fails cleanly. */
  for (i = 0; i < 16; i++)
    assert (cache_get (c, (uint64_t) i * 512, true, &e[i]));
  assert (cache_get (c, 16 * 512, true, &e[16]) == NULL && errno == ENOMEM);
  for (i = 0; i < 16; i++)
    cache_put (c, e[i]);

  /* Touch slice 0 so slice 1 is least recently used, then evict it. */
  assert (cache_get (c, 0, true, &e2));
  cache_put (c, e2);
  assert (cache_get (c, 16 * 512, true, &e2));
  cache_put (c, e2);
  cache_stats (c, &hits, &misses);
  assert (cache_get (c, 0, true, &e2));              /* still there */
  cache_put (c, e2);
  assert (cache_get (c, 512, true, &e2));            /* was evicted */
  cache_put (c, e2);
  {
    uint64_t h2, m2;
    cache_stats (c, &h2, &m2);
    assert (h2 == hits + 1 && m2 == misses + 1);
  }

  /* Dirty slices are written back on flush, and on eviction. */
  d = cache_get (c, 7 * cs, true, &e2);
  d[3] = 0x99;
  cache_mark_dirty (c, e2);
  cache_put (c, e2);
  assert (cache_has_dirty (c));
  assert (cache_flush (c) == 0);
  assert (!cache_has_dirty (c));
  mem = qcow2_io_memory_data (img->io, &memsize);
  assert (mem[7 * cs + 3] == 0x99);

  d = cache_get (c, 7 * cs + 512, false, &e2);      /* no read: zeroed */
  assert (all_bytes (d, 512, 0));
  d[0] = 0x77;
  cache_mark_dirty (c, e2);
  cache_put (c, e2);
  for (i = 0; i < 40; i++) {                         /* force eviction */
    assert (cache_get (c, 0x100000 + (uint64_t) i * 512, true, &e2));
    cache_put (c, e2);
  }
  mem = qcow2_io_memory_data (img->io, &memsize);
  assert (mem[7 * cs + 512] == 0x77);

  /* cache_peek (readers holding img->lock shared) only looks: a miss
   * loads nothing, a hit moves nothing and counts nothing, but marks the
   * entry so that eviction gives it a second chance.
   */
  for (i = 0; i < 16; i++) {                 /* 0x200000 + 0 is oldest */
    assert (cache_get (c, 0x200000 + (uint64_t) i * 512, true, &e2));
    cache_put (c, e2);
  }
  cache_stats (c, &hits, &misses);
  assert (cache_peek (c, 0x300000) == NULL);
  mem = cache_peek (c, 5 * cs);
  assert (mem == NULL);                      /* evicted long ago */
  mem = cache_peek (c, 0x200000);
  assert (mem != NULL);
  {
    uint64_t h2, m2;
    cache_stats (c, &h2, &m2);
    assert (h2 == hits && m2 == misses);
  }
  assert (cache_get (c, 0x300000, true, &e2));  /* evicts one entry */
  cache_put (c, e2);
  assert (cache_peek (c, 0x200000) != NULL);        /* second chance */
  assert (cache_peek (c, 0x200000 + 512) == NULL);  /* evicted instead */
  assert (cache_peek (c, 0x300000) != NULL);
  /* Both are peeked now.  15 loads evict the 14 older slices, then
   * skip both (flags cleared) and take the first of the 15 loaded.
   */
  for (i = 0; i < 15; i++) {
    assert (cache_get (c, 0x400000 + (uint64_t) i * 512, true, &e2));
    cache_put (c, e2);
  }
  assert (cache_peek (c, 0x400000) == NULL);
  /* Not peeked since, they age normally: 14 more loads evict the 13
   * slices older than 0x200000, then 0x200000; 0x300000 is left.
   */
  for (i = 0; i < 14; i++) {
    assert (cache_get (c, 0x500000 + (uint64_t) i * 512, true, &e2));
    cache_put (c, e2);
  }
  assert (cache_peek (c, 0x200000) == NULL);
  assert (cache_peek (c, 0x300000) != NULL);

  cache_destroy (c);
  qcow2_close (img);
  free (b);
}

/* Staging (cache.c): a reader holding img->lock shared that misses maps
 * from a staged copy of the slice, which goes into the cache at the next
 * drain, unless it may be stale by then.
 */
/* While a write-back without the lock is in progress, a miss evicts a
 * clean slice rather than write a dirty one back (which would wait for
 * that write-back's end, l2.c); with only dirty ones left it writes one.
 */
static unsigned victim_writes;

static int
count_write (void *opaque, uint64_t off, uint32_t len)
{
  victim_writes++;
  return 0;
}

static void
test_cache_victim_during_wb (void)
{
  size_t size;
  uint8_t *b = build (12, 4, &size);
  struct qcow2_image *img = open_buf (b, size);
  struct cache *c;
  struct cache_entry *e;
  uint64_t i;

  assert (img);
  c = cache_create (img->io, "test.qcow2", "L2", 9, 16 * 512,
                    count_write, NULL);
  assert (c && cache_nr_entries (c) == 16);
  for (i = 0; i < 16; i++) {
    assert (cache_get (c, i * 512, true, &e));
    cache_put (c, e);
  }
  /* Slice 15 is taken by the write-back (pinned, clean). */
  assert (cache_get (c, 15 * 512, true, &e));
  cache_mark_dirty (c, e);
  cache_put (c, e);
  assert (cache_wb_begin (c, UINT64_MAX, NULL, NULL) == 1);
  /* Slices 0 and 1 dirty since, and the least recently used. */
  for (i = 0; i < 2; i++) {
    assert (cache_get (c, i * 512, true, &e));
    cache_mark_dirty (c, e);
    cache_put (c, e);
  }
  for (i = 2; i < 15; i++) {
    assert (cache_get (c, i * 512, true, &e));
    cache_put (c, e);
  }
  victim_writes = 0;
  assert (cache_get (c, 16 * 512, true, &e));
  cache_put (c, e);
  if (victim_writes != 0) {
    fprintf (stderr, "test_cache_victim_during_wb: a miss during a "
             "write-back wrote a dirty slice back (%u writes) although "
             "clean ones were free\n", victim_writes);
    abort ();
  }
  /* Every unpinned slice dirty: one is written back after all. */
  for (i = 0; i < 17; i++) {
    if (i == 2 || i == 15)      /* evicted; taken */
      continue;
    assert (cache_get (c, i * 512, true, &e));
    cache_mark_dirty (c, e);
    cache_put (c, e);
  }
  assert (cache_get (c, 17 * 512, true, &e));
  cache_put (c, e);
  assert (victim_writes == 1);
  cache_wb_end (c, true);
  cache_destroy (c);
  qcow2_close (img);
  free (b);
}

static void
test_stage (void)
{
  const unsigned cb = 12;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  struct qcow2_image *img = open_rw (b, size);
  struct cache *c;
  struct mapping m;
  uint64_t l2, hits, misses, m2;
  uint8_t *buf = malloc (cs);
  bool drain = false;
  int i;

  assert (img && buf);
  c = img->l2_cache;
  l2 = img->l1[0] & L1E_OFFSET_MASK;
  cache_drop (c, 0, UINT64_MAX / 2);
  assert (cache_peek (c, l2) == NULL);

  /* Without a drain pointer: the exclusive path is needed. */
  assert (cluster_map_cached (img, 3 * cs, cs, &m, NULL) == 1);
  /* With one: mapped from a staged copy; nothing cached yet. */
  cache_stats (c, &hits, &misses);
  assert (cluster_map_cached (img, 3 * cs, 2 * cs, &m, &drain) == 0);
  assert (m.kind == MAP_DATA && m.host_offset == 6 * cs &&
          m.length == 2 * cs);
  assert (!drain);
  assert (cache_peek (c, l2) == NULL);
  cache_stats (c, &hits, &m2);
  assert (m2 == misses + 1);
  cache_stage_drain (c);
  assert (cache_peek (c, l2) != NULL);

  /* A staged slice that may be stale (the L1 table changed) is
   * dropped at the drain.
   */
  cache_drop (c, 0, UINT64_MAX / 2);
  assert (cluster_map_cached (img, 0, cs, &m, &drain) == 0);
  cache_stage_invalidate (c);
  cache_stage_drain (c);
  assert (cache_peek (c, l2) == NULL);

  /* A write that changes the slice while a copy is staged: cache_get
   * takes the staged copy first, so the write changes the only cached
   * copy and every later mapping sees it.
   */
  assert (cluster_map_cached (img, 0, cs, &m, &drain) == 0);
  memset (buf, 0x5a, cs);
  assert (qcow2_pwrite (img, buf, cs, 2 * cs, 0) == 0);
  assert (cluster_map_cached (img, 2 * cs, cs, &m, &drain) == 0);
  assert (m.kind == MAP_DATA);
  for (i = 0; i < 64; i++) {             /* evict it (written back) */
    struct cache_entry *e;
    assert (cache_get (c, 0x100000 + (uint64_t) i * cs, true, &e));
    cache_put (c, e);
  }
  assert (cluster_map (img, 2 * cs, cs, &m) == 0 && m.kind == MAP_DATA);
  assert (cluster_map_cached (img, 2 * cs, cs, &m, &drain) == 0 &&
          m.kind == MAP_DATA);
  memset (buf, 0, cs);
  assert (qcow2_pread (img, buf, cs, 2 * cs) == 0);
  assert (all_bytes (buf, cs, 0x5a));

  /* Half the slots ready: the reader is told to drain. */
  cache_drop (c, 0, UINT64_MAX / 2);
  drain = false;
  for (i = 0; i < 64 && !drain; i++)
    assert (cluster_map_cached (img, 0, cs, &m, &drain) == 0);
  assert (drain && i > 1);

  qcow2_close (img);
  free (buf);
  free (b);
}

static bool
empty_bit (const struct qcow2_image *img, uint64_t g)
{
  return g < img->empty_nbits && (img->empty_slices[g / 64] >> (g % 64) & 1);
}

/* Empty L2 slices (cluster.c): a read that stages an all-zero slice
 * remembers it in a bit instead of caching it; a write into the slice
 * forgets it.  64 KiB clusters: 16 slices of 4 KiB per L2 table, each
 * mapping 32 MiB; slice 0 has the test image's entries, the rest are
 * zero.
 */
static void
test_empty_slices (void)
{
  const unsigned cb = 16;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  const uint64_t span = UINT64_C(32) << 20;
  struct qcow2_image *img;
  struct mapping m;
  uint64_t l2, hits, misses, m2;
  uint8_t buf[4096];
  bool drain = false;

  put_be64 (b + HDR_SIZE, 4 * span);
  img = open_rw (b, size);
  assert (img && img->empty_slices && img->empty_nbits == 16);
  l2 = img->l1[0] & L1E_OFFSET_MASK;

  /* A read of slice 1 stages it, finds it empty, and does not cache it;
   * slice 0 is not empty.
   */
  memset (buf, 0xee, sizeof buf);
  assert (qcow2_pread (img, buf, sizeof buf, span + 3 * cs) == 0);
  assert (all_bytes (buf, sizeof buf, 0));
  assert (empty_bit (img, 1) && !empty_bit (img, 2));
  assert (cache_peek (img->l2_cache, l2 + 4096) == NULL);
  assert (qcow2_pread (img, buf, sizeof buf, 0) == 0);
  assert (all_bytes (buf, sizeof buf, 0x11) && !empty_bit (img, 0));

  /* Later lookups in slice 1 are answered from the bit, on either
   * path, up to the slice's end, without the cache.
   */
  cache_stats (img->l2_cache, &hits, &misses);
  assert (cluster_map_cached (img, span + 100, 4 * span, &m, &drain) == 0);
  assert (m.kind == MAP_UNALLOCATED && m.length == span - 100 && !drain);
  assert (cluster_map (img, 2 * span - 512, 4096, &m) == 0);
  assert (m.kind == MAP_UNALLOCATED && m.length == 512);
  cache_stats (img->l2_cache, &hits, &m2);
  assert (m2 == misses);

  /* A write into the slice forgets it: the data is read back. */
  memset (buf, 0x77, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, span + 5 * cs, 0) == 0);
  assert (!empty_bit (img, 1));
  memset (buf, 0, sizeof buf);
  assert (qcow2_pread (img, buf, sizeof buf, span + 5 * cs) == 0);
  assert (all_bytes (buf, sizeof buf, 0x77));
  assert (cluster_map_cached (img, span, span, &m, &drain) == 0);
  assert (m.kind == MAP_UNALLOCATED && m.length == 5 * cs);

  /* A zero (zero flags, or trim) into an empty slice changes it too. */
  assert (qcow2_pread (img, buf, sizeof buf, 3 * span) == 0);
  assert (empty_bit (img, 3));
  assert (qcow2_zero (img, cs, 3 * span + cs, 0) == 0);
  assert (!empty_bit (img, 3));
  assert (cluster_map_cached (img, 3 * span + cs, cs, &m, &drain) == 0);
  assert (m.kind == MAP_ZERO);

  /* Forgetting everything (repair, snapshot views) clears every bit. */
  assert (qcow2_pread (img, buf, sizeof buf, 2 * span) == 0);
  assert (empty_bit (img, 2));
  cluster_empty_forget (img, 0, UINT64_MAX);
  assert (img->empty_slices[0] == 0);

  qcow2_close (img);
  free (b);
}

/* In-flight allocating writes (write.c): a write whose data is being
 * written with img->lock dropped holds up other changes to its
 * clusters.  A gate io holds the first write at or past gate_from until
 * the test opens it.
 */
struct gate_io {
  struct qcow2_io io;             /* must be first */
  struct qcow2_io *inner;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint64_t gate_from;
  bool armed, held, open;
  /* The same for the first flush once flush_armed; it then fails with
   * EIO if flush_fail.
   */
  bool flush_armed, flush_held, flush_open, flush_fail;
  unsigned flushes;               /* calls that reached inner */
  bool keep_inner;                /* close leaves inner to the test */
};

static int
gate_pread (struct qcow2_io *io, void *buf, size_t n, uint64_t off)
{
  return io_pread (((struct gate_io *) io)->inner, buf, n, off);
}

static int
gate_pwrite (struct qcow2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct gate_io *g = (struct gate_io *) io;

  pthread_mutex_lock (&g->mu);
  if (g->armed && off >= g->gate_from) {
    g->armed = false;
    g->held = true;
    pthread_cond_broadcast (&g->cv);
    while (!g->open)
      pthread_cond_wait (&g->cv, &g->mu);
  }
  pthread_mutex_unlock (&g->mu);
  return io_pwrite (g->inner, buf, n, off);
}

static int
gate_flush (struct qcow2_io *io)
{
  struct gate_io *g = (struct gate_io *) io;
  bool fail = false;

  pthread_mutex_lock (&g->mu);
  if (g->flush_armed) {
    g->flush_armed = false;
    g->flush_held = true;
    pthread_cond_broadcast (&g->cv);
    while (!g->flush_open)
      pthread_cond_wait (&g->cv, &g->mu);
    fail = g->flush_fail;
  }
  pthread_mutex_unlock (&g->mu);
  if (fail) {
    errno = EIO;
    return -1;
  }
  __atomic_add_fetch (&g->flushes, 1, __ATOMIC_RELAXED);
  return io_flush (g->inner);
}

static int64_t
gate_size (struct qcow2_io *io)
{
  return io_size (((struct gate_io *) io)->inner);
}

static int
gate_truncate (struct qcow2_io *io, uint64_t size)
{
  struct qcow2_io *in = ((struct gate_io *) io)->inner;
  return io_truncate (in, size);
}

static void
gate_close (struct qcow2_io *io)
{
  struct gate_io *g = (struct gate_io *) io;

  if (!g->keep_inner)
    io_close (g->inner);
  pthread_mutex_destroy (&g->mu);
  pthread_cond_destroy (&g->cv);
  free (g);
}

static const struct qcow2_io_ops gate_ops = {
  .pread = gate_pread, .pwrite = gate_pwrite, .flush = gate_flush,
  .size = gate_size, .truncate = gate_truncate, .close = gate_close,
};

struct inflight_job {
  struct qcow2_image *img;
  uint64_t off, len;
  bool zero;
  int r;
};

static void *
inflight_job (void *arg)
{
  struct inflight_job *j = arg;
  uint8_t buf[1024];

  if (j->zero)
    j->r = qcow2_zero (j->img, j->len, j->off, 0);
  else {
    memset (buf, 0xaa, sizeof buf);
    j->r = qcow2_pwrite (j->img, buf, j->len, j->off, 0);
  }
  return NULL;
}

static void
test_inflight (void)
{
  const unsigned cb = 12;
  size_t size, cs = (size_t) 1 << cb;
  uint8_t *b = build (cb, 4, &size);
  struct gate_io *g = calloc (1, sizeof *g);
  struct qcow2_config cfg = { 0 };
  struct qcow2_image *img;
  struct inflight_job w, z;
  pthread_t tw, tz;
  uint8_t *buf = malloc (cs);

  /* Guest cluster 0 (0x11) shared, as with a snapshot: refcount 2, no
   * COPIED flag, so a write to part of it copies the rest.
   */
  assert (g && buf);
  put_be64 (b + 4 * cs, 5 * cs);
  put_refcount (b + 2 * cs, 4, 5, 2);
  g->inner = qcow2_io_new_memory (b, size);
  assert (g->inner);
  g->io.ops = &gate_ops;
  g->io.fd = -1;
  pthread_mutex_init (&g->mu, NULL);
  pthread_cond_init (&g->cv, NULL);
  g->gate_from = NCLUSTERS * cs;        /* new clusters: past the end */
  g->armed = true;
  img = qcow2_open_io (&g->io, "test.qcow2", NULL, &cfg);
  assert (img);

  /* The write of [0, 1 KiB) copies cluster 0 to a new cluster and is
   * held in its data write, lock dropped.  A zero of [2, 3 KiB) of the
   * same cluster meanwhile must wait: done from the old mapping, it
   * would copy cluster 0 on its own and one of the two would be lost.
   */
  w = (struct inflight_job) { img, 0, 1024, false, -1 };
  z = (struct inflight_job) { img, 2048, 1024, true, -1 };
  assert (pthread_create (&tw, NULL, inflight_job, &w) == 0);
  pthread_mutex_lock (&g->mu);
  while (!g->held)
    pthread_cond_wait (&g->cv, &g->mu);
  pthread_mutex_unlock (&g->mu);
  assert (pthread_create (&tz, NULL, inflight_job, &z) == 0);
  usleep (200000);                      /* time to get it wrong */
  pthread_mutex_lock (&g->mu);
  g->open = true;
  pthread_cond_broadcast (&g->cv);
  pthread_mutex_unlock (&g->mu);
  assert (pthread_join (tw, NULL) == 0 && pthread_join (tz, NULL) == 0);
  assert (w.r == 0 && z.r == 0);

  assert (qcow2_pread (img, buf, cs, 0) == 0);
  assert (all_bytes (buf, 1024, 0xaa));
  assert (all_bytes (buf + 1024, 1024, 0x11));
  if (!all_bytes (buf + 2048, 1024, 0)) {
    fprintf (stderr, "test_inflight: the zero of [2048, 3072) was lost "
             "(reads %#x)\n", buf[2048]);
    abort ();
  }
  assert (all_bytes (buf + 3072, cs - 3072, 0x11));

  qcow2_close (img);
  free (buf);
  free (b);
}

/* A guest flush writes back and syncs with img->lock dropped (l2.c,
 * "Write-back without the lock"): held in its first sync, it must not
 * hold up an allocating write into the very L2 slice it is writing
 * back, and that write must reach the file at the next flush; and a
 * write-back that failed must leave its slices dirty, written by the
 * next flush.
 */
struct flush_job {
  struct qcow2_image *img;
  int r;
  bool done;
};

static void *
flush_job (void *arg)
{
  struct flush_job *j = arg;

  j->r = qcow2_flush (j->img);
  __atomic_store_n (&j->done, true, __ATOMIC_RELEASE);
  return NULL;
}

static void *
write_job (void *arg)
{
  struct flush_job *j = arg;
  uint8_t buf[512];

  memset (buf, 0x77, sizeof buf);
  j->r = qcow2_pwrite (j->img, buf, sizeof buf, 9 * 4096, 0);
  __atomic_store_n (&j->done, true, __ATOMIC_RELEASE);
  return NULL;
}

static struct gate_io *
gate_new (const uint8_t *b, size_t size)
{
  struct gate_io *g = calloc (1, sizeof *g);

  assert (g);
  g->inner = qcow2_io_new_memory (b, size);
  assert (g->inner);
  g->io.ops = &gate_ops;
  g->io.fd = -1;
  pthread_mutex_init (&g->mu, NULL);
  pthread_cond_init (&g->cv, NULL);
  return g;
}

/* Hold the next flush; wait until it is held. */
static void
gate_hold_flush (struct gate_io *g, bool fail, pthread_t *t,
                 struct flush_job *j)
{
  pthread_mutex_lock (&g->mu);
  g->flush_armed = true;
  g->flush_held = g->flush_open = false;
  g->flush_fail = fail;
  pthread_mutex_unlock (&g->mu);
  assert (pthread_create (t, NULL, flush_job, j) == 0);
  pthread_mutex_lock (&g->mu);
  while (!g->flush_held)
    pthread_cond_wait (&g->cv, &g->mu);
  pthread_mutex_unlock (&g->mu);
}

static void
gate_open_flush (struct gate_io *g)
{
  pthread_mutex_lock (&g->mu);
  g->flush_open = true;
  pthread_cond_broadcast (&g->cv);
  pthread_mutex_unlock (&g->mu);
}

/* The file as it is now, opened read-only: guest cluster c reads v? */
static bool
file_cluster_is (struct gate_io *g, uint64_t c, size_t len, uint8_t v)
{
  size_t size;
  const uint8_t *d = qcow2_io_memory_data (g->inner, &size);
  uint8_t *copy = malloc (size), *buf = malloc (len);
  struct qcow2_image *ro;
  bool ok;

  assert (copy && buf);
  memcpy (copy, d, size);
  ro = open_buf (copy, size);
  assert (ro);
  assert (qcow2_pread (ro, buf, len, c * 4096) == 0);
  ok = all_bytes (buf, len, v);
  qcow2_close (ro);
  free (buf);
  free (copy);
  return ok;
}

/* The image the flush tests use (build (12, 4)), opened over a gate
 * io; *b is its buffer, for the caller to free.
 */
static struct qcow2_image *
open_gated (uint8_t **b, struct gate_io **g)
{
  struct qcow2_config cfg = { 0 };
  struct qcow2_image *img;
  size_t size;

  *b = build (12, 4, &size);
  *g = gate_new (*b, size);
  img = qcow2_open_io (&(*g)->io, "test.qcow2", NULL, &cfg);
  assert (img);
  return img;
}

static void
test_flush_unlocked (void)
{
  uint8_t *b;
  struct gate_io *g;
  struct qcow2_image *img;
  struct flush_job f = { 0 }, w = { 0 };
  pthread_t tf, tw;
  uint8_t buf[512];
  int i;

  img = open_gated (&b, &g);
  f.img = w.img = img;

  /* Guest cluster 8: allocated, its L2 slice dirty; the flush is held
   * in its first sync, after it took the slice.
   */
  memset (buf, 0x55, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 8 * 4096, 0) == 0);
  gate_hold_flush (g, false, &tf, &f);
  assert (pthread_create (&tw, NULL, write_job, &w) == 0);
  for (i = 0; i < 200 && !__atomic_load_n (&w.done, __ATOMIC_ACQUIRE); i++)
    usleep (10000);
  if (!__atomic_load_n (&w.done, __ATOMIC_ACQUIRE)) {
    fprintf (stderr, "test_flush_unlocked: an allocating write waited 2 s "
             "for a flush held in its sync\n");
    abort ();
  }
  assert (w.r == 0);
  assert (!f.done);
  gate_open_flush (g);
  assert (pthread_join (tf, NULL) == 0 && pthread_join (tw, NULL) == 0);
  assert (f.r == 0);
  /* The flush covered cluster 8; cluster 9's link, made in the slice
   * being written back, goes with the next one.
   */
  assert (file_cluster_is (g, 8, 512, 0x55));
  assert (qcow2_flush (img) == 0);
  if (!file_cluster_is (g, 9, 512, 0x77)) {
    fprintf (stderr, "test_flush_unlocked: a write linked during a flush's "
             "write-back was not written by the next flush\n");
    abort ();
  }

  /* A write-back that fails (its first sync) leaves the slice dirty:
   * the next flush writes it.
   */
  memset (buf, 0x66, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 10 * 4096, 0) == 0);
  f.done = false;
  gate_hold_flush (g, true, &tf, &f);
  gate_open_flush (g);
  assert (pthread_join (tf, NULL) == 0);
  assert (f.r == -1);
  assert (qcow2_flush (img) == 0);
  if (!file_cluster_is (g, 10, 512, 0x66)) {
    fprintf (stderr, "test_flush_unlocked: after a failed flush, the next "
             "one did not write the entries back\n");
    abort ();
  }

  qcow2_close (img);
  free (b);
}

/* A guest flush commits the frees of a trim but leaves the decrements
 * in the refcount cache for the next write-back or close (rw.c:
 * commit_frees): one sync (the final one; the trim wrote no data, so
 * no barrier sync), not a second one for the refcount blocks.  Close
 * writes them, and those of the frees it commits itself: the file
 * checks with no leak.
 */
static void
test_flush_frees (void)
{
  size_t size;
  uint8_t *b;
  struct gate_io *g;
  struct qcow2_check_result cr;
  struct qcow2_image *img;
  struct qcow2_io *inner;
  unsigned before;
  const uint8_t *d;

  img = open_gated (&b, &g);
  inner = g->inner;
  g->keep_inner = true;
  assert (qcow2_trim (img, 4096, 0, 0) == 0);   /* frees data cluster 5 */
  before = g->flushes;
  assert (qcow2_flush (img) == 0);
  if (g->flushes - before != 1) {
    fprintf (stderr, "test_flush_frees: a flush after a trim synced %u "
             "times (want 1)\n", g->flushes - before);
    abort ();
  }
  assert (img->nr_pending == 0);
  /* Frees committed by close itself are written too. */
  assert (qcow2_trim (img, 4096, 3 * 4096, 0) == 0);   /* data 6 */
  qcow2_close (img);

  d = qcow2_io_memory_data (inner, &size);
  img = open_buf (d, size);
  assert (img);
  assert (qcow2_check (img, false, &cr) == 0);
  if (cr.leaks != 0 || cr.corruptions != 0) {
    fprintf (stderr, "test_flush_frees: after close: %" PRIu64 " leaks, %"
             PRIu64 " corruptions\n", cr.leaks, cr.corruptions);
    abort ();
  }
  qcow2_close (img);
  io_close (inner);
  free (b);
}

/* A trim during a flush's write-back without the lock: the entry it
 * clears is not in the copies being written, so that flush must not
 * commit its free (the file would still point at a cluster counted
 * free); the next flush does.
 */
static void
test_flush_trim_during (void)
{
  uint8_t *b;
  struct gate_io *g;
  struct qcow2_image *img;
  struct flush_job f = { 0 };
  pthread_t tf;
  uint8_t buf[512];
  uint64_t v;

  img = open_gated (&b, &g);
  f.img = img;
  memset (buf, 0x55, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 8 * 4096, 0) == 0);
  gate_hold_flush (g, false, &tf, &f);
  assert (qcow2_trim (img, 4096, 0, 0) == 0);   /* frees data cluster 5 */
  gate_open_flush (g);
  assert (pthread_join (tf, NULL) == 0);
  assert (f.r == 0);
  assert (refcount_get (img, 5, &v) == 0);
  if (v != 1) {
    fprintf (stderr, "test_flush_trim_during: the flush committed the free "
             "of a trim made during its write-back (refcount %" PRIu64
             ")\n", v);
    abort ();
  }
  assert (qcow2_flush (img) == 0);
  assert (refcount_get (img, 5, &v) == 0 && v == 0);
  qcow2_close (img);
  free (b);
}

/* A free during a held write-back that continues a sealed pending range
 * (host-contiguous with it) must not extend it: the flush commits only
 * the sealed ranges, and the later trim's entry was cleared after the
 * copies were taken.
 */
static void
test_flush_sealed_extend (void)
{
  uint8_t *b;
  struct gate_io *g;
  struct qcow2_image *img;
  struct flush_job f = { 0 };
  pthread_t tf;
  uint8_t buf[512];
  uint64_t v6, v7;

  img = open_gated (&b, &g);
  f.img = img;
  assert (qcow2_trim (img, 4096, 3 * 4096, 0) == 0);   /* data 6 pending */
  memset (buf, 0x55, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 8 * 4096, 0) == 0);
  gate_hold_flush (g, false, &tf, &f);
  assert (qcow2_trim (img, 4096, 4 * 4096, 0) == 0);   /* data 7 */
  gate_open_flush (g);
  assert (pthread_join (tf, NULL) == 0);
  assert (f.r == 0);
  assert (refcount_get (img, 6, &v6) == 0 && refcount_get (img, 7, &v7) == 0);
  if (v6 != 0 || v7 != 1) {
    fprintf (stderr, "test_flush_sealed_extend: after the flush, refcount "
             "of cluster 6 = %" PRIu64 " (want 0), cluster 7 = %" PRIu64
             " (want 1: a free during the write-back extended a sealed "
             "range)\n", v6, v7);
    abort ();
  }
  assert (qcow2_flush (img) == 0);
  assert (refcount_get (img, 7, &v7) == 0 && v7 == 0);
  qcow2_close (img);
  free (b);
}

/* The write-back's worker threads (direct I/O, >= 16 dirty slices): the
 * data reaches the file; a failure in one worker's slice fails the
 * flush, and the next flush writes every slice again.
 */
static uint64_t wbt_fail_off = UINT64_MAX;
static pthread_t wbt_main;
static unsigned wbt_other_thread_writes;

static int
wbt_pwrite (struct qcow2_io *io, const void *buf, size_t n, uint64_t off)
{
  uint64_t want = off;

  if (!pthread_equal (pthread_self (), wbt_main))
    __atomic_add_fetch (&wbt_other_thread_writes, 1, __ATOMIC_RELAXED);
  if (__atomic_compare_exchange_n (&wbt_fail_off, &want, UINT64_MAX, false,
                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    errno = EIO;
    return -1;
  }
  return gate_pwrite (io, buf, n, off);
}

static const struct qcow2_io_ops wbt_ops = {
  .pread = gate_pread, .pwrite = wbt_pwrite, .flush = gate_flush,
  .size = gate_size, .truncate = gate_truncate, .close = gate_close,
};

/* A new 4 MiB image with 512-byte clusters, in memory. */
static uint8_t *
create_512 (size_t *size)
{
  struct qcow2_create_options co = { .size = 4 << 20, .cluster_size = 512 };
  char dir[] = "/tmp/test-core-XXXXXX", path[64];
  uint8_t *b;
  FILE *fp;

  assert (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  assert (qcow2_create (path, &co) == 0);
  fp = fopen (path, "r");
  assert (fp);
  b = malloc (1 << 20);
  assert (b);
  *size = fread (b, 1, 1 << 20, fp);
  fclose (fp);
  unlink (path);
  rmdir (dir);
  return b;
}

static void
test_flush_wb_threads (void)
{
  struct qcow2_config cfg = { 0 };
  struct qcow2_image *img, *ro;
  struct qcow2_io *inner, *dio;
  struct gate_io *g;
  uint8_t buf[512], *b, *copy;
  const uint8_t *d;
  size_t size, msize;
  uint64_t i, t7;
  int r;

  b = create_512 (&size);

  wbt_main = pthread_self ();
  g = gate_new (b, size);
  g->io.ops = &wbt_ops;
  g->keep_inner = true;
  inner = g->inner;
  dio = qcow2_io_direct_over (&g->io, 512, 512);
  assert (dio);
  img = qcow2_open_io (dio, "test.qcow2", NULL, &cfg);
  assert (img);
  /* One cluster in each of 40 L2 tables (64 entries each). */
  for (i = 0; i < 40; i++) {
    memset (buf, 0x10 + i, sizeof buf);
    assert (qcow2_pwrite (img, buf, sizeof buf, i * 64 * 512, 0) == 0);
  }
  assert (qcow2_flush (img) == 0);
  /* Dirty all 40 again (new clusters), fail table 7's slice (written
   * by a worker thread: slices are dealt out round robin).
   */
  for (i = 0; i < 40; i++) {
    memset (buf, 0x60 + i, sizeof buf);
    assert (qcow2_pwrite (img, buf, sizeof buf, (i * 64 + 1) * 512, 0) == 0);
  }
  t7 = img->l1[7] & L1E_OFFSET_MASK;
  __atomic_store_n (&wbt_other_thread_writes, 0, __ATOMIC_RELAXED);
  __atomic_store_n (&wbt_fail_off, t7, __ATOMIC_RELEASE);
  r = qcow2_flush (img);
  if (__atomic_load_n (&wbt_fail_off, __ATOMIC_ACQUIRE) != UINT64_MAX) {
    fprintf (stderr, "test_flush_wb_threads: table 7's slice at %#" PRIx64
             " was never written\n", t7);
    abort ();
  }
  if (wbt_other_thread_writes == 0) {
    fprintf (stderr, "test_flush_wb_threads: no write-back worker thread "
             "wrote anything\n");
    abort ();
  }
  if (r != -1) {
    fprintf (stderr, "test_flush_wb_threads: a flush whose slice write "
             "failed returned %d (want -1)\n", r);
    abort ();
  }
  assert (qcow2_flush (img) == 0);
  d = qcow2_io_memory_data (inner, &msize);
  copy = malloc (msize);
  assert (copy);
  memcpy (copy, d, msize);
  ro = open_buf (copy, msize);
  assert (ro);
  for (i = 0; i < 40; i++) {
    assert (qcow2_pread (ro, buf, 512, (i * 64 + 1) * 512) == 0);
    if (!all_bytes (buf, 512, 0x60 + i)) {
      fprintf (stderr, "test_flush_wb_threads: table %" PRIu64 "'s new "
               "entry is not in the file after the second flush\n", i);
      abort ();
    }
  }
  qcow2_close (ro);
  free (copy);
  qcow2_close (img);
  io_close (inner);
  free (b);
}

/* No memory for the write-back's copies: a guest flush writes back
 * with the lock held instead of failing.  The copies of slices of a
 * direct io come from posix_memalign (cache.c: slice_alloc), which
 * this program replaces so that the next call may fail.
 */
static int memalign_fail;       /* calls left to fail */

int
posix_memalign (void **p, size_t a, size_t n)
{
  static int (*real) (void **, size_t, size_t);

  if (__atomic_load_n (&memalign_fail, __ATOMIC_ACQUIRE) > 0 &&
      __atomic_sub_fetch (&memalign_fail, 1, __ATOMIC_ACQ_REL) >= 0)
    return ENOMEM;
  if (real == NULL)
    real = (int (*) (void **, size_t, size_t))
      dlsym (RTLD_NEXT, "posix_memalign");
  assert (real);
  return real (p, a, n);
}

/* Early syncs (io.c): an error of the background fdatasync that
 * io_start_writeback starts must be reported by the next flush, even
 * though the flush's own fdatasync then succeeds (Linux reports a
 * write-back error to one fdatasync only), and a later early sync must
 * not hide it.  This program replaces fdatasync so that the calls on
 * one fd can be counted and made to fail.
 */
static int fdatasync_fd = -1;   /* the fd watched, or -1 */
static unsigned fdatasync_calls; /* calls on it */
static int fdatasync_fail;      /* calls on it left to fail */

int
fdatasync (int fd)
{
  static int (*real) (int);

  if (fd == __atomic_load_n (&fdatasync_fd, __ATOMIC_ACQUIRE)) {
    __atomic_add_fetch (&fdatasync_calls, 1, __ATOMIC_ACQ_REL);
    if (__atomic_load_n (&fdatasync_fail, __ATOMIC_ACQUIRE) > 0 &&
        __atomic_sub_fetch (&fdatasync_fail, 1, __ATOMIC_ACQ_REL) >= 0) {
      errno = EIO;
      return -1;
    }
  }
  if (real == NULL)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "fdatasync");
  assert (real);
  return real (fd);
}

/* Wait up to ms milliseconds for fdatasync_calls to reach n. */
static bool
wait_fdatasync_calls (unsigned n, unsigned ms)
{
  while (__atomic_load_n (&fdatasync_calls, __ATOMIC_ACQUIRE) < n) {
    if (ms-- == 0)
      return false;
    usleep (1000);
  }
  return true;
}

static void
test_early_sync_error (void)
{
  struct qcow2_create_options co = { .size = 4 << 20, .cluster_size = 512 };
  struct qcow2_config cfg = { 0 };
  char dir[] = "/tmp/test-core-XXXXXX", path[64];
  struct qcow2_image *img;
  struct qcow2_io *io;
  uint8_t buf[512];
  int fd, r;

  assert (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  assert (qcow2_create (path, &co) == 0);
  fd = open (path, O_RDWR | O_CLOEXEC);
  assert (fd >= 0);
  io = qcow2_io_from_fd (fd, false);
  assert (io);
  img = qcow2_open_io (io, path, NULL, &cfg);
  assert (img);
  memset (buf, 0x5a, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 0, 0) == 0);
  assert (qcow2_flush (img) == 0);

  /* An early sync that fails. */
  assert (qcow2_pwrite (img, buf, sizeof buf, 512, 0) == 0);
  __atomic_store_n (&fdatasync_fail, 1, __ATOMIC_RELEASE);
  __atomic_store_n (&fdatasync_fd, fd, __ATOMIC_RELEASE);
  io_start_writeback (io);
  if (!wait_fdatasync_calls (1, 5000)) {
    fprintf (stderr, "test_early_sync_error: io_start_writeback started "
             "no fdatasync\n");
    abort ();
  }
  /* Another early sync, which would succeed: it must not sync (and
   * mark everything synced) before a flush has reported the error.
   */
  assert (qcow2_pwrite (img, buf, sizeof buf, 1024, 0) == 0);
  io_start_writeback (io);
  if (wait_fdatasync_calls (2, 300)) {
    fprintf (stderr, "test_early_sync_error: an early sync ran after "
             "one had failed, before a flush reported it\n");
    abort ();
  }
  errno = 0;
  r = qcow2_flush (img);
  if (r != -1 || errno != EIO) {
    fprintf (stderr, "test_early_sync_error: the flush after a failed "
             "early sync returned %d (%m), want -1 (EIO)\n", r);
    abort ();
  }
  /* Reported once, as by fdatasync itself: the next flush syncs. */
  if (qcow2_flush (img) != 0) {
    fprintf (stderr, "test_early_sync_error: the flush after the one "
             "that reported the error failed: %m\n");
    abort ();
  }
  __atomic_store_n (&fdatasync_fd, -1, __ATOMIC_RELEASE);
  assert (qcow2_close (img) == 0);
  unlink (path);
  rmdir (dir);
}

static void
test_flush_wb_enomem (void)
{
  struct qcow2_config cfg = { 0 };
  struct qcow2_image *img, *ro;
  struct qcow2_io *inner, *dio;
  struct gate_io *g;
  uint8_t buf[512], *b, *copy;
  const uint8_t *d;
  size_t size, msize;
  int r;

  /* Valgrind puts its own posix_memalign in place of this one: then
   * no failure can be made, and the test says so and is skipped.
   */
  __atomic_store_n (&memalign_fail, 1, __ATOMIC_RELEASE);
  if (posix_memalign ((void **) &b, 512, 512) == 0) {
    free (b);
    __atomic_store_n (&memalign_fail, 0, __ATOMIC_RELEASE);
    printf ("test_flush_wb_enomem: skipped: posix_memalign cannot be "
            "replaced here (valgrind?)\n");
    return;
  }
  b = create_512 (&size);
  g = gate_new (b, size);
  g->keep_inner = true;
  inner = g->inner;
  dio = qcow2_io_direct_over (&g->io, 512, 512);
  assert (dio);
  img = qcow2_open_io (dio, "test.qcow2", NULL, &cfg);
  assert (img);
  memset (buf, 0x3c, sizeof buf);
  assert (qcow2_pwrite (img, buf, sizeof buf, 5 * 512, 0) == 0);
  __atomic_store_n (&memalign_fail, 1, __ATOMIC_RELEASE);
  r = qcow2_flush (img);
  if (__atomic_load_n (&memalign_fail, __ATOMIC_ACQUIRE) != 0) {
    fprintf (stderr, "test_flush_wb_enomem: the flush allocated no "
             "copy\n");
    abort ();
  }
  if (r != 0) {
    fprintf (stderr, "test_flush_wb_enomem: a flush with no memory for "
             "the write-back's copies failed: %m\n");
    abort ();
  }
  /* That flush's data is in the file. */
  d = qcow2_io_memory_data (inner, &msize);
  copy = malloc (msize);
  assert (copy);
  memcpy (copy, d, msize);
  ro = open_buf (copy, msize);
  assert (ro);
  assert (qcow2_pread (ro, buf, 512, 5 * 512) == 0);
  assert (all_bytes (buf, 512, 0x3c));
  qcow2_close (ro);
  free (copy);
  qcow2_close (img);
  io_close (inner);
  free (b);
}

static void
test_refcount_widths (void)
{
  unsigned order;

  for (order = 0; order <= 6; order++) {
    size_t size;
    uint8_t *b = build (12, order, &size);
    struct qcow2_image *img = open_buf (b, size);
    uint64_t v, c;

    assert (img);
    for (c = 0; c < NCLUSTERS; c++) {
      assert (refcount_get (img, c, &v) == 0);
      assert (v == 1);
    }
    assert (refcount_get (img, NCLUSTERS, &v) == 0 && v == 0);
    assert (refcount_get (img, UINT64_C(1) << 40, &v) == 0 && v == 0);
    assert (refcount_set (img, 9, refcount_max (img)) == 0);
    assert (refcount_get (img, 9, &v) == 0 && v == refcount_max (img));
    assert (refcount_get (img, 8, &v) == 0 && v == 0);
    assert (refcount_get (img, 10, &v) == 0 && v == 0);
    assert (refcount_get (img, 7, &v) == 0 && v == 1);
    qcow2_close (img);
    free (b);
  }
}

/* Deferred frees are kept as ranges, merged when a free continues the
 * last one; a request that frees clusters scattered over the file
 * commits them once the list holds MAX_PENDING_RANGES ranges, instead of
 * growing it by one entry a cluster; and the list's memory is given
 * back after a commit.  512-byte clusters, 4 MiB disk.
 */
static void
test_pending_frees (void)
{
  struct qcow2_create_options co = { .size = 4 << 20, .cluster_size = 512 };
  const uint64_t n = (4 << 20) / 512;
  char dir[] = "/tmp/test-core-XXXXXX", path[64];
  struct qcow2_check_result cr;
  struct qcow2_image *img;
  uint8_t buf[512], *b;
  uint64_t i;
  size_t size;
  FILE *fp;

  assert (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  assert (qcow2_create (path, &co) == 0);
  fp = fopen (path, "r");
  assert (fp);
  b = malloc (1 << 20);
  assert (b);
  size = fread (b, 1, 1 << 20, fp);
  assert (size > 0);
  fclose (fp);
  unlink (path);
  rmdir (dir);

  /* Sequential: the host clusters of a 3 MiB run of guest data are in
   * few runs, and the trim of it is as few ranges.
   */
  img = open_rw (b, size);
  assert (img);
  memset (buf, 0x42, sizeof buf);
  for (i = 0; i < n; i++)
    assert (qcow2_pwrite (img, buf, sizeof buf, i * 512, 0) == 0);
  assert (qcow2_flush (img) == 0);
  assert (qcow2_trim (img, 3 << 20, 0, 0) == 0);
  assert (img->pending_clusters == 6144);
  assert (img->nr_pending < 200);
  assert (qcow2_flush (img) == 0);
  assert (img->nr_pending == 0 && img->pending_clusters == 0);
  assert (qcow2_close (img) == 0);

  /* Scattered: written in a permuted order (i * 1021 mod n), so no two
   * guest neighbours are host neighbours.
   */
  img = open_rw (b, size);
  assert (img);
  for (i = 0; i < n; i++)
    assert (qcow2_pwrite (img, buf, sizeof buf, (i * 1021 % n) * 512,
                          0) == 0);
  assert (qcow2_flush (img) == 0);
  assert (qcow2_trim (img, 3 << 20, 0, 0) == 0);
  assert (img->nr_pending <= 4096 && img->pending_alloc <= 4096);
  assert (qcow2_trim (img, 1 << 20, 3 << 20, 0) == 0);
  assert (qcow2_flush (img) == 0);
  assert (img->nr_pending == 0 && img->pending == NULL);
  assert (qcow2_check (img, false, &cr) == 0);
  assert (cr.corruptions == 0 && cr.leaks == 0 && cr.errors == 0);
  assert (qcow2_close (img) == 0);
  free (b);
}

/* A new image made by qcow2_create, in memory, writable, with cfg. */
static struct qcow2_image *
create_mem (const struct qcow2_create_options *co,
            const struct qcow2_config *cfg)
{
  char dir[] = "/tmp/test-core-XXXXXX", path[64];
  struct qcow2_io *io;
  uint8_t *b;
  size_t size;
  FILE *fp;

  assert (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  assert (qcow2_create (path, co) == 0);
  fp = fopen (path, "r");
  assert (fp);
  b = malloc (1 << 20);
  assert (b);
  size = fread (b, 1, 1 << 20, fp);
  assert (size > 0);
  fclose (fp);
  unlink (path);
  rmdir (dir);
  io = qcow2_io_new_memory (b, size);
  free (b);
  assert (io);
  return qcow2_open_io (io, "test.qcow2", NULL, cfg);
}

/* Guest cluster g's mapping kind (and host offset). */
static enum map_kind
kind_of (struct qcow2_image *img, uint64_t g, uint64_t *host)
{
  struct mapping m;

  pthread_rwlock_wrlock (&img->lock);
  assert (cluster_map (img, g, img->cluster_size, &m) == 0);
  pthread_rwlock_unlock (&img->lock);
  if (host)
    *host = m.host_offset;
  return m.kind;
}

static void
fill_text (uint8_t *p, size_t n, unsigned seed)
{
  size_t i;

  for (i = 0; i < n; i++)
    p[i] = "compressed cluster "[(i + seed) % 19] ^ (i % 997 == 0 ? seed : 0);
}

static void
fill_random (uint8_t *p, size_t n, uint64_t *st)
{
  size_t i;

  for (i = 0; i < n; i++) {
    *st = *st * 6364136223846793005u + 1442695040888963407u;
    p[i] = *st >> 56;
  }
}

static void
check_clean (struct qcow2_image *img)
{
  struct qcow2_check_result cr;

  assert (qcow2_check (img, false, &cr) == 0);
  assert (cr.corruptions == 0 && cr.leaks == 0 && cr.errors == 0);
}

/* compress=on (write.c): whole clusters become compressed clusters
 * packed back to back into shared host clusters, whose refcounts count
 * their streams (the check agrees); a piece of one is copied out to a
 * normal cluster; a cluster that does not compress is written normally.
 * And a host cluster whose last stream was freed, then handed out by
 * the allocator as a normal data cluster, is never filled further.
 * For both codecs and refcounts of 16, 2 and 1 bits.
 */
static void
test_compressed_writes (bool zstd, uint32_t refcount_bits)
{
  struct qcow2_create_options co = {
    .size = 4 << 20, .zstd = zstd, .refcount_bits = refcount_bits,
  };
  struct qcow2_config cfg = { .compress = true };
  const uint64_t cs = 65536;
  uint8_t *buf = malloc (8 * cs), *rd = malloc (8 * cs), *rnd = malloc (cs);
  uint64_t st = 42, i, h[8], g1;
  struct qcow2_image *img;

  assert (buf && rd && rnd);
  img = create_mem (&co, &cfg);
  assert (img);
  for (i = 0; i < 8; i++)
    fill_text (buf + i * cs, cs, i + 1);
  assert (qcow2_pwrite (img, buf, 8 * cs, 0, 0) == 0);
  for (i = 0; i < 8; i++) {
    assert (kind_of (img, i * cs, &h[i]) == MAP_COMPRESSED);
    /* Back to back: each stream starts in the host cluster the one
     * before it ended in (or the next), unless 1-bit refcounts.
     */
    if (i > 0 && refcount_bits != 1)
      assert (h[i] > h[i - 1] && (h[i] >> 16) - (h[i - 1] >> 16) <= 1);
  }
  /* Text compresses ~100:1: with 16-bit refcounts all eight streams
   * share one host cluster (or two); 2-bit refcounts take at most 3
   * streams a cluster (3 + 3 + 2), 1-bit ones one.
   */
  if (refcount_bits == 16)
    assert ((h[7] >> 16) - (h[0] >> 16) <= 1);
  else
    assert ((h[7] >> 16) - (h[0] >> 16) == (refcount_bits == 2 ? 2 : 7));
  assert (qcow2_pread (img, rd, 8 * cs, 0) == 0);
  assert (memcmp (rd, buf, 8 * cs) == 0);
  check_clean (img);

  /* A piece of cluster 1: copied out of the stream; random data:
   * written normally; text again over cluster 3: compressed again.
   */
  memset (buf + cs + 100, 0xee, 3000);
  assert (qcow2_pwrite (img, buf + cs + 100, 3000, cs + 100, 0) == 0);
  assert (kind_of (img, cs, NULL) == MAP_DATA);
  fill_random (buf + 2 * cs, cs, &st);
  assert (qcow2_pwrite (img, buf + 2 * cs, cs, 2 * cs, 0) == 0);
  assert (kind_of (img, 2 * cs, NULL) == MAP_DATA);
  fill_text (buf + 3 * cs, cs, 99);
  assert (qcow2_pwrite (img, buf + 3 * cs, cs, 3 * cs, 0) == 0);
  assert (kind_of (img, 3 * cs, NULL) == MAP_COMPRESSED);
  /* Text over a normal cluster: rewritten in place, not compressed. */
  fill_text (buf + cs, cs, 7);
  assert (qcow2_pwrite (img, buf + cs, cs, cs, 0) == 0);
  assert (kind_of (img, cs, NULL) == MAP_DATA);
  assert (qcow2_flush (img) == 0);
  assert (qcow2_pread (img, rd, 8 * cs, 0) == 0);
  assert (memcmp (rd, buf, 8 * cs) == 0);
  check_clean (img);
  assert (qcow2_close (img) == 0);

  /* The host cluster being filled is freed and reused whole. */
  img = create_mem (&co, &cfg);
  assert (img);
  fill_text (buf, cs, 1);
  assert (qcow2_pwrite (img, buf, cs, 0, 0) == 0);
  assert (kind_of (img, 0, &h[0]) == MAP_COMPRESSED);
  fill_random (buf, cs, &st);
  assert (qcow2_pwrite (img, buf, cs, 0, 0) == 0);      /* frees it */
  assert (qcow2_flush (img) == 0);
  fill_random (buf + cs, cs, &st);
  assert (qcow2_pwrite (img, buf + cs, cs, cs, 0) == 0);
  assert (kind_of (img, cs, &g1) == MAP_DATA);
  assert (g1 == (h[0] & ~(cs - 1)));    /* the allocator gave it out */
  fill_text (buf + 2 * cs, cs, 2);
  assert (qcow2_pwrite (img, buf + 2 * cs, cs, 2 * cs, 0) == 0);
  assert (kind_of (img, 2 * cs, &h[1]) == MAP_COMPRESSED);
  assert ((h[1] & ~(cs - 1)) != g1);
  assert (qcow2_pread (img, rd, 3 * cs, 0) == 0);
  assert (memcmp (rd, buf, 3 * cs) == 0);
  check_clean (img);
  assert (qcow2_close (img) == 0);
  free (buf);
  free (rd);
  free (rnd);
}

/* A reservation of disk space that fails (refcount.c: reserve_ahead)
 * may have taken part of its range; it is given back (the file
 * truncated to its own size) before anything more is written, also on
 * the paths that write under img->lock: the subclusters of extended L2
 * entries and the real zeroes of a v2 zero.  The io below fails every
 * reservation and counts writes made while one is not given back.
 */
struct resv_io {
  struct qcow2_io io;             /* must be first */
  struct qcow2_io *inner;
  bool fail, held;
  unsigned fails, writes_held;
  unsigned calls;                 /* reservations asked for */
  uint64_t end;                   /* the end of the last one */
};

static int
resv_pread (struct qcow2_io *io, void *buf, size_t n, uint64_t off)
{
  return io_pread (((struct resv_io *) io)->inner, buf, n, off);
}

static int
resv_pwrite (struct qcow2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct resv_io *r = (struct resv_io *) io;

  if (r->held)
    r->writes_held++;
  return io_pwrite (r->inner, buf, n, off);
}

static int
resv_flush (struct qcow2_io *io)
{
  return io_flush (((struct resv_io *) io)->inner);
}

static int64_t
resv_size (struct qcow2_io *io)
{
  return io_size (((struct resv_io *) io)->inner);
}

static int
resv_truncate (struct qcow2_io *io, uint64_t size)
{
  struct resv_io *r = (struct resv_io *) io;

  r->held = false;
  return io_truncate (r->inner, size);
}

static int
resv_reserve (struct qcow2_io *io, uint64_t count, uint64_t off)
{
  struct resv_io *r = (struct resv_io *) io;

  r->calls++;
  r->end = off + count;
  if (!r->fail)
    return 0;
  r->fails++;
  r->held = true;
  errno = ENOSPC;
  return -1;
}

static void
resv_close (struct qcow2_io *io)
{
  io_close (((struct resv_io *) io)->inner);
  free (io);
}

static const struct qcow2_io_ops resv_ops = {
  .pread = resv_pread, .pwrite = resv_pwrite, .flush = resv_flush,
  .size = resv_size, .truncate = resv_truncate, .reserve = resv_reserve,
  .close = resv_close,
};

/* A new image made with co (at most 1 MiB of file), in memory under a
 * resv_io, opened with cfg.
 */
static struct qcow2_image *
open_resv (const char *name, struct qcow2_create_options co,
           const struct qcow2_config *cfg, struct resv_io **rp)
{
  char dir[] = "/tmp/test-core-XXXXXX", path[64];
  static uint8_t file[1 << 20];
  struct resv_io *r = calloc (1, sizeof *r);
  struct qcow2_image *img;
  size_t size;
  FILE *fp;

  assert (r && mkdtemp (dir));
  snprintf (path, sizeof path, "%s/disk.qcow2", dir);
  co.overwrite = co.no_locking = true;
  assert (qcow2_create (path, &co) == 0);
  fp = fopen (path, "r");
  assert (fp);
  size = fread (file, 1, sizeof file, fp);
  assert (size > 0);
  fclose (fp);
  unlink (path);
  rmdir (dir);
  r->inner = qcow2_io_new_memory (file, size);
  assert (r->inner);
  r->io.ops = &resv_ops;
  r->io.fd = -1;
  img = qcow2_open_io (&r->io, name, NULL, cfg);
  assert (img);
  *rp = r;
  return img;
}

static void
reservation_case (const struct qcow2_create_options *co0, bool zero)
{
  struct qcow2_config cfg = { .prealloc_size = 8 << 20 };
  static uint8_t buf[65536];
  struct resv_io *r;
  struct qcow2_image *img;
  struct qcow2_check_result cr;
  uint64_t i;

  img = open_resv ("resv.qcow2", *co0, &cfg, &r);

  memset (buf, 0x5a, sizeof buf);
  if (!zero) {
    r->fail = true;
    assert (qcow2_pwrite (img, buf, 4096, 8192, 0) == 0);
  }
  else {
    /* Fill up to just below the reservation's end, then zero a range
     * of data and unallocated clusters: on v2 real zeroes, written
     * under the lock into clusters allocated there.
     */
    for (i = 0; i == 0 || img->host_end + 4 * 65536 <= img->reserved_end;
         i++)
      assert (qcow2_pwrite (img, buf, sizeof buf, i * 65536, 0) == 0);
    r->fail = true;
    assert (qcow2_zero (img, 8 * 65536, (i - 1) * 65536, 0) == 0);
  }
  assert (r->fails > 0);
  assert (r->writes_held == 0);
  r->fail = false;
  assert (qcow2_check (img, false, &cr) == 0);
  assert (cr.corruptions == 0 && cr.errors == 0);
  assert (qcow2_close (img) == 0);
}

/* prealloc_size is honoured: with 0 nothing is ever reserved; with S,
 * each reservation ends at a multiple of S, one to two S past the end
 * of the allocated clusters, and one is asked for per S of growth.
 */
static void
prealloc_case (uint64_t step)
{
  struct qcow2_create_options co = { .size = 64 << 20 };
  struct qcow2_config cfg = { .prealloc_size = step };
  static uint8_t buf[65536];
  struct resv_io *r;
  struct qcow2_image *img;
  uint64_t i, n = 40 << 20 >> 16;

  img = open_resv ("prealloc.qcow2", co, &cfg, &r);
  memset (buf, 0x5a, sizeof buf);
  for (i = 0; i < n; i++) {
    assert (qcow2_pwrite (img, buf, sizeof buf, i * 65536, 0) == 0);
    if (step == 0)
      continue;
    assert (r->calls > 0);
    assert (r->end % step == 0);
    assert (r->end >= img->host_end && r->end - img->host_end < 2 * step);
  }
  if (step == 0)
    assert (r->calls == 0);
  else
    assert (r->calls <= (40 << 20) / step + 2);
  assert (qcow2_close (img) == 0);
}

static void
test_prealloc_size (void)
{
  prealloc_case (0);
  prealloc_case (1 << 20);
  prealloc_case (3 << 20);
  prealloc_case (16 << 20);
}

static void
test_failed_reservation (void)
{
  struct qcow2_create_options std = { .size = 64 << 20 };
  struct qcow2_create_options ext = { .size = 64 << 20, .extended_l2 = true };
  struct qcow2_create_options v2 = { .size = 64 << 20, .version = 2 };

  reservation_case (&std, false);
  reservation_case (&ext, false);
  reservation_case (&v2, true);
}

int
main (void)
{
  test_index_math ();
  test_reads (9);
  test_reads (12);
  test_reads (16);
  test_reads (21);
  test_header_validation ();
  test_corrupt_l2 ();
  test_cache ();
  test_cache_victim_during_wb ();
  test_stage ();
  test_empty_slices ();
  test_inflight ();
  test_flush_unlocked ();
  test_flush_frees ();
  test_flush_trim_during ();
  test_flush_sealed_extend ();
  test_flush_wb_threads ();
  test_flush_wb_enomem ();
  test_early_sync_error ();
  test_refcount_widths ();
  test_pending_frees ();
  test_compressed_writes (false, 16);
  if (qcow2_have_zstd ())
    test_compressed_writes (true, 16);
  test_compressed_writes (false, 2);
  test_compressed_writes (false, 1);
  test_failed_reservation ();
  test_prealloc_size ();
  test_fuzz_regressions ();
  printf ("test-core: all passed\n");
  return 0;
}
