/* nbdkit-qcow2: unit test of core/compress.c.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Round trips for both codecs on random, zero and text-like buffers,
 * then the cases a qcow2 reader meets: trailing bytes after the stream
 * (the rest of the last 512-byte sector, possibly the next cluster's
 * stream), truncated and corrupted input, output buffers of the wrong
 * size, and streams made the way QEMU makes them (raw deflate with a
 * 4 KiB window, windowBits -12; a zstd frame from the streaming API).
 * Interoperability with qemu-img itself is tested by the shell tests.
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
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#define ZLIB_CONST 1
#include <zlib.h>
#ifdef HAVE_LIBZSTD
#include <zstd.h>
#endif

#undef NDEBUG
#include <assert.h>

#include "internal.h"

typedef int (*compress_fn) (const void *, size_t, void *, size_t *);
typedef int (*decompress_fn) (const void *, size_t, void *, size_t);
/* A reference writer: the stream's length. */
typedef size_t (*fresh_fn) (const void *, size_t, void *, size_t);

struct codec {
  const char *name;
  compress_fn compress;
  decompress_fn decompress;
};

static const size_t sizes[] = { 512, 4096, 65536, 2 * 1024 * 1024 };
enum fill { FILL_RANDOM, FILL_ZERO, FILL_TEXT, NR_FILLS };
static const char *fill_names[] = { "random", "zero", "text" };

/* Deterministic PRNG (xorshift64*) so failures reproduce. */
static uint64_t rng_state = UINT64_C (0x9e3779b97f4a7c15);

static uint64_t
rng (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * UINT64_C (2685821657736338717);
}

static void
fill_random (void *buf, size_t len)
{
  unsigned char *p = buf;
  size_t i;

  for (i = 0; i < len; ++i)
    p[i] = rng () >> 56;
}

static void
fill_buffer (unsigned char *buf, size_t len, enum fill fill)
{
  static const char *words[] = {
    "the ", "qcow2 ", "cluster ", "refcount ", "table ", "of ",
    "L2 ", "slice ", "is ", "written ", "\n", "0x10000 ", "and ",
  };
  size_t i, n;

  switch (fill) {
  case FILL_RANDOM:
    fill_random (buf, len);
    break;
  case FILL_ZERO:
    memset (buf, 0, len);
    break;
  case FILL_TEXT:
    for (i = 0; i < len; i += n) {
      const char *w = words[rng () % (sizeof words / sizeof words[0])];
      n = strlen (w);
      if (n > len - i)
        n = len - i;
      memcpy (&buf[i], w, n);
    }
    break;
  default:
    abort ();
  }
}

static void *
xmalloc (size_t len)
{
  void *p = malloc (len);

  assert (p != NULL);
  return p;
}

/* Room for the compressed form of any input (both libraries' bounds
 * are far below this).
 */
static size_t
capacity (size_t len)
{
  return len + len / 8 + 1024;
}

static size_t
compress_ok (const struct codec *c, const void *in, size_t len,
             void *out, size_t cap)
{
  size_t clen = cap;

  assert (c->compress (in, len, out, &clen) == 0);
  assert (clen > 0 && clen <= cap);
  return clen;
}

static void
expect_fail (const struct codec *c, const void *in, size_t in_len,
             void *out, size_t out_len, const char *what)
{
  int r;

  errno = 0;
  r = c->decompress (in, in_len, out, out_len);
  if (r != -1 || errno != EIO) {
    fprintf (stderr, "%s: %s: expected EIO, got r=%d errno=%d\n",
             c->name, what, r, errno);
    exit (EXIT_FAILURE);
  }
}

/* Everything that can be checked with one input buffer. */
static void
test_buffer (const struct codec *c, const unsigned char *orig, size_t len,
             enum fill fill)
{
  size_t cap = capacity (len);
  unsigned char *comp = xmalloc (2 * cap);
  unsigned char *out = xmalloc (len + 512);
  size_t clen, padded, i;

  /* Round trip. */
  clen = compress_ok (c, orig, len, comp, cap);
  memset (out, 0xaa, len);
  assert (c->decompress (comp, clen, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);
  if (fill != FILL_RANDOM)
    assert (clen < len);

  /* The rest of the last sector is garbage: random bytes up to the
   * next 512 boundary plus one more sector.
   */
  padded = (clen + 511) / 512 * 512 + 512;
  fill_random (&comp[clen], padded - clen);
  memset (out, 0xaa, len);
  assert (c->decompress (comp, padded, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);

  /* The next cluster's stream starts right after this one. */
  {
    size_t clen2 = compress_ok (c, orig, len, &comp[clen], 2 * cap - clen);
    assert (c->decompress (comp, clen + clen2, out, len) == 0);
    assert (memcmp (out, orig, len) == 0);
    assert (c->decompress (&comp[clen], clen2, out, len) == 0);
    assert (memcmp (out, orig, len) == 0);
    /* Never run on into the next stream to fill a larger buffer. */
    expect_fail (c, comp, clen + clen2, out, len + 1, "next stream");
  }

  /* Output buffer smaller than the stream's content: stop at a full
   * buffer, as QEMU's reader does.
   */
  memset (out, 0xaa, len);
  assert (c->decompress (comp, clen, out, len / 2) == 0);
  assert (memcmp (out, orig, len / 2) == 0);

  /* Output buffer larger than the content: short output is an error,
   * with or without trailing garbage to misread.
   */
  expect_fail (c, comp, clen, out, len + 1, "out_len + 1");
  expect_fail (c, comp, clen, out, len + 512, "out_len + 512");

  /* Truncated input. */
  expect_fail (c, comp, 0, out, len, "empty input");
  expect_fail (c, comp, clen / 2, out, len, "half the input");
  expect_fail (c, comp, 1, out, len, "one byte of input");

  /* Random corruption must never crash; when it is caught it is EIO.
   * (Neither codec as qcow2 uses it has a checksum, so some corruptions
   * decode to wrong data of the right length.)
   */
  for (i = 0; i < 64; ++i) {
    unsigned char *bad = xmalloc (clen);
    size_t j, nflips = 1 + rng () % 8;
    int r;

    memcpy (bad, comp, clen);
    for (j = 0; j < nflips; ++j)
      bad[rng () % clen] ^= 1 + rng () % 255;
    errno = 0;
    r = c->decompress (bad, clen, out, len);
    assert (r == 0 || (r == -1 && errno == EIO));
    free (bad);
  }

  /* Too small for the compressed form: ENOSPC, and the exact size
   * fits.
   */
  {
    size_t small = clen - 1;

    errno = 0;
    assert (c->compress (orig, len, comp, &small) == -1);
    assert (errno == ENOSPC);
    small = 1;
    errno = 0;
    assert (c->compress (orig, len, comp, &small) == -1);
    assert (errno == ENOSPC);
    small = clen;
    assert (c->compress (orig, len, comp, &small) == 0);
    assert (small == clen);
  }

  /* The caller's rule "store uncompressed unless it shrinks": random
   * data never fits in len - 1 bytes.
   */
  if (fill == FILL_RANDOM) {
    size_t small = len - 1;

    errno = 0;
    assert (c->compress (orig, len, comp, &small) == -1);
    assert (errno == ENOSPC);
  }

  free (comp);
  free (out);
}

static void
test_codec (const struct codec *c)
{
  size_t i;
  enum fill f;

  for (i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) {
    unsigned char *orig = xmalloc (sizes[i]);

    for (f = 0; f < NR_FILLS; ++f) {
      fill_buffer (orig, sizes[i], f);
      test_buffer (c, orig, sizes[i], f);
      printf ("%s: %s %zu: ok\n", c->name, fill_names[f], sizes[i]);
    }
    free (orig);
  }
}

/* Deflate-specific corruption that must be caught: block type 3 is
 * reserved.  The first byte holds BFINAL (bit 0) and BTYPE (bits 1-2).
 */
static void
test_deflate_bad_block_type (const struct codec *c)
{
  unsigned char orig[4096], comp[8192], out[4096];
  size_t clen;

  fill_buffer (orig, sizeof orig, FILL_TEXT);
  clen = compress_ok (c, orig, sizeof orig, comp, sizeof comp);
  comp[0] |= 0x06;
  expect_fail (c, comp, clen, out, sizeof out, "reserved block type");
}

/* Deflate with the given raw window, the reference writer for the
 * QEMU-compatibility checks below.
 */
static size_t
zlib_deflate (const void *in, size_t len, void *out, size_t cap,
              int level, int window_bits, int mem_level)
{
  z_stream strm = { 0 };

  assert (deflateInit2 (&strm, level, Z_DEFLATED,
                        window_bits, mem_level, Z_DEFAULT_STRATEGY) == Z_OK);
  strm.next_in = in;
  strm.avail_in = len;
  strm.next_out = out;
  strm.avail_out = cap;
  assert (deflate (&strm, Z_FINISH) == Z_STREAM_END);
  deflateEnd (&strm);
  return cap - strm.avail_out;
}

/* Inflate a raw stream as a strict reader with a 4 KiB window would:
 * into out in pieces of 512 bytes, so that zlib copies what it produces
 * into its 4 KiB window and rejects references further back ("invalid
 * distance too far back"), which it does not check when one call
 * fills a buffer holding everything.  0, or -1 if the stream needs a
 * larger window, is bad, or does not fill out exactly.
 */
static int
inflate_small_window (const void *in, size_t len, void *out, size_t out_len)
{
  z_stream strm = { 0 };
  unsigned char *p = out;
  int r = Z_OK;

  assert (inflateInit2 (&strm, -12) == Z_OK);
  strm.next_in = in;
  strm.avail_in = len;
  strm.next_out = p;
  while (r == Z_OK && strm.next_out < p + out_len) {
    size_t left = p + out_len - strm.next_out;
    strm.avail_out = left < 512 ? left : 512;
    r = inflate (&strm, Z_NO_FLUSH);
  }
  inflateEnd (&strm);
  return (r == Z_OK || r == Z_STREAM_END) && strm.next_out == p + out_len
    ? 0 : -1;
}

/* The window checks.  The data is an 8 KiB random block repeated four
 * times: a 32 KiB window finds the repeats (8 KiB back), a 4 KiB window
 * cannot, so the compressed size tells which window a writer used.
 */
static void
test_deflate_window (const struct codec *c)
{
  const size_t len = 32768, block = 8192;
  unsigned char *orig = xmalloc (len);
  unsigned char *comp = xmalloc (capacity (len));
  unsigned char *ref = xmalloc (capacity (len));
  unsigned char *out = xmalloc (len);
  size_t i, clen, rlen;

  fill_random (orig, block);
  for (i = block; i < len; i += block)
    memcpy (&orig[i], orig, block);

  /* A stream made exactly as QEMU makes it (windowBits -12, memLevel 9)
   * is read back.
   */
  rlen = zlib_deflate (orig, len, ref, capacity (len), 6, -12, 9);
  assert (rlen > len - len / 8);    /* no 8 KiB matches in a 4 KiB window */
  fill_random (&ref[rlen], 512);
  assert (c->decompress (ref, rlen + 512, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);

  /* Our writer uses QEMU's window: byte for byte the stream zlib makes
   * with windowBits -12 (and our level and memLevel, 5 and 7; QEMU's 6
   * and 9 only change how matches are searched for), and a reader with
   * a 4 KiB window reads it, as QEMU (inflateInit2 -12) does.
   */
  rlen = zlib_deflate (orig, len, ref, capacity (len), 5, -12, 7);
  clen = capacity (len);
  assert (c->compress (orig, len, comp, &clen) == 0);
  assert (clen == rlen);
  assert (memcmp (comp, ref, clen) == 0);
  assert (inflate_small_window (comp, clen, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);

  /* A stream with a 32 KiB window (references 8 KiB back) is read too:
   * the reader's window is the largest raw deflate allows.
   */
  rlen = zlib_deflate (orig, len, ref, capacity (len), 6, -15, 8);
  assert (rlen < len / 2);
  assert (c->decompress (ref, rlen, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);
  /* ... which a strict 4 KiB reader refuses (so it tells). */
  assert (inflate_small_window (ref, rlen, out, len) == -1);

  /* Same checks on every size and fill of the main test. */
  for (i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) {
    size_t sz = sizes[i];
    unsigned char *in = xmalloc (sz);
    unsigned char *a = xmalloc (capacity (sz)), *b = xmalloc (capacity (sz));
    enum fill f;

    for (f = 0; f < NR_FILLS; ++f) {
      fill_buffer (in, sz, f);
      rlen = zlib_deflate (in, sz, a, capacity (sz), 5, -12, 7);
      clen = capacity (sz);
      assert (c->compress (in, sz, b, &clen) == 0);
      assert (clen == rlen && memcmp (a, b, clen) == 0);
      assert (inflate_small_window (b, clen, a, sz) == 0);
      assert (memcmp (a, in, sz) == 0);
    }
    free (in);
    free (a);
    free (b);
  }

  printf ("deflate: windowBits -12 streams: ok\n");
  free (orig);
  free (comp);
  free (ref);
  free (out);
}

#ifdef HAVE_LIBZSTD
/* A frame written with the streaming API in one ZSTD_e_end call, the
 * way QEMU writes a cluster, and one with no content size in its
 * header (ZSTD_compressStream + ZSTD_endStream), are both read.
 */
static void
test_zstd_stream_frames (const struct codec *c)
{
  const size_t len = 65536;
  unsigned char *orig = xmalloc (len);
  unsigned char *comp = xmalloc (capacity (len) + 512);
  unsigned char *out = xmalloc (len);
  ZSTD_CCtx *cctx = ZSTD_createCCtx ();
  ZSTD_CStream *cs = ZSTD_createCStream ();
  ZSTD_inBuffer ib;
  ZSTD_outBuffer ob;

  assert (cctx != NULL && cs != NULL);
  fill_buffer (orig, len, FILL_TEXT);

  ib = (ZSTD_inBuffer) { .src = orig, .size = len, .pos = 0 };
  ob = (ZSTD_outBuffer) { .dst = comp, .size = capacity (len), .pos = 0 };
  assert (ZSTD_compressStream2 (cctx, &ob, &ib, ZSTD_e_end) == 0);
  fill_random (&comp[ob.pos], 512);
  assert (c->decompress (comp, ob.pos + 512, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);

  assert (!ZSTD_isError (ZSTD_initCStream (cs, 3)));
  ib = (ZSTD_inBuffer) { .src = orig, .size = len, .pos = 0 };
  ob = (ZSTD_outBuffer) { .dst = comp, .size = capacity (len), .pos = 0 };
  assert (!ZSTD_isError (ZSTD_compressStream (cs, &ob, &ib)));
  assert (ib.pos == len);
  assert (ZSTD_endStream (cs, &ob) == 0);
  assert (ZSTD_getFrameContentSize (comp, ob.pos) ==
          ZSTD_CONTENTSIZE_UNKNOWN);
  fill_random (&comp[ob.pos], 512);
  assert (c->decompress (comp, ob.pos + 512, out, len) == 0);
  assert (memcmp (out, orig, len) == 0);

  /* A corrupt magic number is always caught. */
  comp[0] ^= 0xff;
  expect_fail (c, comp, ob.pos, out, len, "bad zstd magic");

  printf ("zstd: streaming frames: ok\n");
  ZSTD_freeCCtx (cctx);
  ZSTD_freeCStream (cs);
  free (orig);
  free (comp);
  free (out);
}
#endif

/* compress_cluster: the image's type picks the codec (the stream
 * decodes with that codec's decompressor), the room given is a hard
 * limit (random data does not fit in a cluster less one byte: ENOSPC),
 * and an unknown type is ENOTSUP.
 */
static void
test_compress_cluster (void)
{
  const size_t cs = 65536;
  unsigned char *in = xmalloc (cs), *out = xmalloc (cs), *back = xmalloc (cs);
  size_t len;

  fill_buffer (in, cs, FILL_TEXT);
  len = cs - 1;
  assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, out, &len) == 0);
  assert (len > 0 && len < cs / 2);
  assert (compress_inflate (out, len, back, cs) == 0);
  assert (memcmp (in, back, cs) == 0);
#ifdef HAVE_LIBZSTD
  len = cs - 1;
  assert (compress_cluster (COMPRESSION_ZSTD, in, cs, out, &len) == 0);
  assert (compress_zstd_decompress (out, len, back, cs) == 0);
  assert (memcmp (in, back, cs) == 0);
  assert (compress_inflate (out, len, back, cs) == -1);  /* not deflate */
#endif
  fill_buffer (in, cs, FILL_RANDOM);
  len = cs - 1;
  errno = 0;
  assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, out, &len) == -1);
  assert (errno == ENOSPC);
  len = cs - 1;
  errno = 0;
  assert (compress_cluster (7, in, cs, out, &len) == -1);
  assert (errno == ENOTSUP);
  free (in);
  free (out);
  free (back);
  printf ("compress_cluster: ok\n");
}

/* Compressors are pooled (compress.c): a stream made by a reused
 * compressor, after others and after one that failed with ENOSPC half
 * way through, is byte for byte the stream of a fresh one, and
 * sequential calls make at most one compressor.
 */
static void
test_pool_reuse (const struct codec *c, fresh_fn fresh)
{
  const size_t len = 65536;
  unsigned char *text = xmalloc (len), *rnd = xmalloc (len);
  unsigned char *ref = xmalloc (capacity (len)), *out = xmalloc (capacity (len));
  size_t rlen, clen, i;
  struct compress_stats before, after;

  fill_buffer (text, len, FILL_TEXT);
  fill_buffer (rnd, len, FILL_RANDOM);
  rlen = fresh (text, len, ref, capacity (len));
  compress_stats (&before);
  for (i = 0; i < 100; i++) {
    size_t small = len / 2;

    clen = capacity (len);
    assert (c->compress (rnd, len, out, &clen) == 0);
    errno = 0;
    assert (c->compress (rnd, len, out, &small) == -1);  /* half way */
    assert (errno == ENOSPC);
    clen = capacity (len);
    assert (c->compress (text, len, out, &clen) == 0);
    assert (clen == rlen && memcmp (out, ref, clen) == 0);
  }
  compress_stats (&after);
  if (after.created - before.created > 1) {
    fprintf (stderr, "%s: 300 sequential calls made %" PRIu64
             " compressors\n", c->name, after.created - before.created);
    exit (EXIT_FAILURE);
  }
  printf ("%s: pooled compressors: ok\n", c->name);
  free (text);
  free (rnd);
  free (ref);
  free (out);
}

/* Compressors stay on their core (compress.c): two threads, each
 * pinned to a core of its own, compress at the same time until two
 * compressors exist (the threads overlapped).  Then they make short
 * calls, mostly apart, so that both compressors are often idle: each
 * thread must get the one last used on its core, taking at most one
 * from the other core (when both were last used on the same one);
 * reused last in, first out, a thread takes whichever was put back
 * last: 350-390 of the 400 calls took the other core's.  Runs first,
 * on an empty pool.  Skipped when the test cannot pin threads to two
 * cores, or the threads never overlapped.
 */
struct core_thread {
  const struct codec *c;
  const unsigned char *text;
  int core;
  bool pinned;
  pthread_barrier_t *barrier;
};

#define CORE_TEXT 65536

static void *
core_thread (void *arg)
{
  struct core_thread *t = arg;
  unsigned char *out = xmalloc (capacity (CORE_TEXT));
  struct compress_stats st;
  cpu_set_t one;
  unsigned i;

  CPU_ZERO (&one);
  CPU_SET (t->core, &one);
  t->pinned = pthread_setaffinity_np (pthread_self (), sizeof one,
                                      &one) == 0 &&
    sched_getcpu () == t->core;
  for (i = 0; i < 200; i++) {           /* until two compressors exist */
    compress_ok (t->c, t->text, CORE_TEXT, out, capacity (CORE_TEXT));
    compress_stats (&st);
    if (st.created >= 2)                /* the pool was empty */
      break;
  }
  pthread_barrier_wait (t->barrier);    /* main counts the moves so far */
  pthread_barrier_wait (t->barrier);
  for (i = 0; i < 200; i++) {           /* short calls, mostly apart */
    compress_ok (t->c, t->text, 4096, out, capacity (4096));
    usleep (50);
  }
  free (out);
  return NULL;
}

static void
test_pool_cores (const struct codec *c)
{
  unsigned char *text = xmalloc (CORE_TEXT);
  struct compress_stats before, mid, after;
  struct core_thread t[2];
  pthread_t th[2];
  pthread_barrier_t barrier;
  cpu_set_t mask;
  int cores[2], n = 0, i;

  if (sched_getaffinity (0, sizeof mask, &mask) == 0)
    for (i = 0; i < CPU_SETSIZE && n < 2; i++)
      if (CPU_ISSET (i, &mask))
        cores[n++] = i;
  if (n < 2) {
    printf ("%s: compressors stay on their core: skipped (fewer than "
            "two cores)\n", c->name);
    free (text);
    return;
  }
  fill_buffer (text, CORE_TEXT, FILL_TEXT);
  compress_stats (&before);
  assert (before.created == 0 && before.max >= 2);
  assert (pthread_barrier_init (&barrier, NULL, 3) == 0);
  for (i = 0; i < 2; i++) {
    t[i] = (struct core_thread) {
      .c = c, .text = text, .core = cores[i], .barrier = &barrier,
    };
    assert (pthread_create (&th[i], NULL, core_thread, &t[i]) == 0);
  }
  pthread_barrier_wait (&barrier);
  compress_stats (&mid);
  pthread_barrier_wait (&barrier);
  for (i = 0; i < 2; i++)
    assert (pthread_join (th[i], NULL) == 0);
  pthread_barrier_destroy (&barrier);
  compress_stats (&after);
  free (text);
  if (!t[0].pinned || !t[1].pinned || mid.created < 2) {
    printf ("%s: compressors stay on their core: skipped (%s)\n", c->name,
            !t[0].pinned || !t[1].pinned ? "cannot pin to two cores"
            : "the threads never overlapped");
    return;
  }
  if (after.moved - mid.moved > 1) {
    fprintf (stderr, "%s: 400 calls on 2 cores took %" PRIu64
             " compressors last used on the other core (want at most 1)\n",
             c->name, after.moved - mid.moved);
    exit (EXIT_FAILURE);
  }
  printf ("%s: compressors stay on their core: ok (%" PRIu64 " moved)\n",
          c->name, after.moved - mid.moved);
}

/* Many threads at once: every stream decodes to its own input (no
 * compressor is shared by two threads), and no more compressors exist
 * than the pool allows (the rest waited).
 */
struct pool_thread {
  const struct codec *c;
  unsigned id;
  const unsigned char *text, *rnd;      /* made before, by main */
};

#define POOL_THREADS 12
#define POOL_ROUNDS 40

static void *
pool_thread (void *arg)
{
  const struct pool_thread *t = arg;
  const size_t len = 16384;
  unsigned char *in = xmalloc (len), *out = xmalloc (capacity (len));
  unsigned char *back = xmalloc (len);
  unsigned i;

  for (i = 0; i < POOL_ROUNDS; i++) {
    size_t clen = capacity (len);

    memcpy (in, i % 3 == 0 ? t->rnd : t->text, len);
    memcpy (in, &t->id, sizeof t->id);      /* no two inputs alike */
    memcpy (in + sizeof t->id, &i, sizeof i);
    assert (t->c->compress (in, len, out, &clen) == 0);
    assert (t->c->decompress (out, clen, back, len) == 0);
    assert (memcmp (in, back, len) == 0);
  }
  free (in);
  free (out);
  free (back);
  return NULL;
}

static void
test_pool_threads (const struct codec *c)
{
  pthread_t th[POOL_THREADS];
  struct pool_thread t[POOL_THREADS];
  struct compress_stats before, after;
  unsigned char *text = xmalloc (16384), *rnd = xmalloc (16384);
  unsigned i;

  fill_buffer (text, 16384, FILL_TEXT);
  fill_buffer (rnd, 16384, FILL_RANDOM);
  compress_stats (&before);
  for (i = 0; i < POOL_THREADS; i++) {
    t[i] = (struct pool_thread) {
      .c = c, .id = i, .text = text, .rnd = rnd,
    };
    assert (pthread_create (&th[i], NULL, pool_thread, &t[i]) == 0);
  }
  for (i = 0; i < POOL_THREADS; i++)
    assert (pthread_join (th[i], NULL) == 0);
  compress_stats (&after);
  if (after.created - before.created > after.max) {
    fprintf (stderr, "%s: %u threads made %" PRIu64 " compressors, "
             "more than the pool's %u\n",
             c->name, POOL_THREADS, after.created - before.created,
             after.max);
    exit (EXIT_FAILURE);
  }
  if (after.decoders_created - before.decoders_created > after.max) {
    fprintf (stderr, "%s: %u threads made %" PRIu64 " decoders, "
             "more than the pool's %u\n",
             c->name, POOL_THREADS,
             after.decoders_created - before.decoders_created, after.max);
    exit (EXIT_FAILURE);
  }
  printf ("%s: %u threads, %" PRIu64 " new compressors, %" PRIu64
          " new decoders (at most %u): ok\n",
          c->name, POOL_THREADS, after.created - before.created,
          after.decoders_created - before.decoders_created, after.max);
  free (text);
  free (rnd);
}

#ifdef HAVE_LIBZSTD
/* zstd decompression contexts are pooled (compress.c): sequential
 * decodes, good ones and ones that stop half way through a frame
 * (truncated input, corrupted blocks), make at most one context, and
 * a context reused after a failure decodes the next frame right.
 */
static void
test_zstd_decode_pool (void)
{
  const size_t len = 65536;
  unsigned char *text = xmalloc (len), *comp = xmalloc (capacity (len));
  unsigned char *bad = xmalloc (capacity (len)), *back = xmalloc (len);
  struct compress_stats before, after;
  size_t clen = capacity (len), i;

  fill_buffer (text, len, FILL_TEXT);
  assert (compress_zstd_compress (text, len, comp, &clen) == 0);
  memcpy (bad, comp, clen);
  for (i = clen / 2; i < clen; i++)
    bad[i] ^= 0x5a;
  compress_stats (&before);
  for (i = 0; i < 100; i++) {
    errno = 0;
    assert (compress_zstd_decompress (comp, clen / 2, back, len) == -1);
    assert (errno == EIO);
    assert (compress_zstd_decompress (comp, clen, back, len) == 0);
    assert (memcmp (back, text, len) == 0);
    /* Fails, or decodes to garbage (a frame has no checksum). */
    (void) compress_zstd_decompress (bad, clen, back, len);
    assert (compress_zstd_decompress (comp, clen, back, len) == 0);
    assert (memcmp (back, text, len) == 0);
  }
  compress_stats (&after);
  if (after.decoders_created - before.decoders_created > 1) {
    fprintf (stderr, "zstd: 400 sequential decodes made %" PRIu64
             " decoders\n", after.decoders_created - before.decoders_created);
    exit (EXIT_FAILURE);
  }
  printf ("zstd: pooled decoders: ok\n");
  free (text);
  free (comp);
  free (bad);
  free (back);
}

/* Deflate is skipped for clusters zstd -1 cannot shrink (compress.c:
 * deflate_hopeless): random data is ENOSPC without deflating, but
 * data that looks random byte by byte and still compresses (a random
 * 3001-byte block repeated) is deflated, and so are text, and any call
 * with room for the whole input.
 */
static void
test_deflate_skip (void)
{
  const size_t cs = 65536;
  unsigned char *in = xmalloc (cs), *out = xmalloc (cs);
  unsigned char *back = xmalloc (cs);
  struct compress_stats st0, st;
  size_t len, i;

  compress_stats (&st0);
  fill_buffer (in, cs, FILL_RANDOM);
  len = cs - 1;
  errno = 0;
  assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, out, &len) == -1);
  assert (errno == ENOSPC);
  compress_stats (&st);
  if (st.deflate_skipped != st0.deflate_skipped + 1) {
    fprintf (stderr, "deflate: a random cluster was deflated\n");
    exit (EXIT_FAILURE);
  }

  /* Room for more than the input: deflated (into stored blocks). */
  {
    unsigned char *big = xmalloc (capacity (cs));

    len = capacity (cs);
    assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, big, &len) == 0);
    assert (len > cs);
    compress_stats (&st);
    assert (st.deflate_skipped == st0.deflate_skipped + 1);
    free (big);
  }

  /* Uniform bytes, even in the sample, but copies of one 3001-byte
   * block (within deflate's 4 KiB window).
   */
  for (i = 3001; i < cs; i += 3001)
    memcpy (&in[i], in, i + 3001 <= cs ? 3001 : cs - i);
  len = cs - 1;
  assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, out, &len) == 0);
  assert (len < cs / 8);
  assert (compress_inflate (out, len, back, cs) == 0);
  assert (memcmp (in, back, cs) == 0);

  fill_buffer (in, cs, FILL_TEXT);
  len = cs - 1;
  assert (compress_cluster (COMPRESSION_DEFLATE, in, cs, out, &len) == 0);
  compress_stats (&st);
  if (st.deflate_skipped != st0.deflate_skipped + 1) {
    fprintf (stderr, "deflate: a compressible cluster was skipped\n");
    exit (EXIT_FAILURE);
  }
  free (in);
  free (out);
  free (back);
  printf ("deflate: hopeless clusters skipped: ok\n");
}
#endif

/* The reference writers for test_pool_reuse: a new stream each time,
 * as QEMU does (deflate: with our level and memLevel).
 */
static size_t
fresh_deflate (const void *in, size_t len, void *out, size_t cap)
{
  return zlib_deflate (in, len, out, cap, 5, -12, 7);
}

#ifdef HAVE_LIBZSTD
static size_t
fresh_zstd (const void *in, size_t len, void *out, size_t cap)
{
  ZSTD_CCtx *cctx = ZSTD_createCCtx ();
  ZSTD_inBuffer ib = { .src = in, .size = len, .pos = 0 };
  ZSTD_outBuffer ob = { .dst = out, .size = cap, .pos = 0 };

  assert (cctx != NULL);
  assert (ZSTD_compressStream2 (cctx, &ob, &ib, ZSTD_e_end) == 0);
  ZSTD_freeCCtx (cctx);
  return ob.pos;
}
#endif

int
main (void)
{
  const struct codec deflate_codec = {
    "deflate", compress_deflate, compress_inflate,
  };
#ifdef HAVE_LIBZSTD
  const struct codec zstd_codec = {
    "zstd", compress_zstd_compress, compress_zstd_decompress,
  };
#endif

  test_pool_cores (&deflate_codec);
  test_codec (&deflate_codec);
  test_deflate_bad_block_type (&deflate_codec);
  test_deflate_window (&deflate_codec);
  test_compress_cluster ();
  test_pool_reuse (&deflate_codec, fresh_deflate);
  test_pool_threads (&deflate_codec);

#ifdef HAVE_LIBZSTD
  assert (qcow2_have_zstd ());
  test_codec (&zstd_codec);
  test_zstd_stream_frames (&zstd_codec);
  test_pool_reuse (&zstd_codec, fresh_zstd);
  test_pool_threads (&zstd_codec);
  test_zstd_decode_pool ();
  test_deflate_skip ();
#else
  {
    unsigned char buf[512] = { 0 };
    size_t len = sizeof buf;

    assert (!qcow2_have_zstd ());
    errno = 0;
    assert (compress_zstd_decompress (buf, len, buf, len) == -1);
    assert (errno == ENOTSUP);
    errno = 0;
    assert (compress_zstd_compress (buf, len, buf, &len) == -1);
    assert (errno == ENOTSUP);
    printf ("zstd: not built in: ok\n");
  }
#endif

  return EXIT_SUCCESS;
}
