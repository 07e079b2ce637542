/* nbdkit-qcow2: compressed cluster payloads.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * This file owns the two codecs qcow2 knows (compression_type 0 =
 * deflate, 1 = zstd) and nothing else: every function is buffer ->
 * buffer.  No I/O, no image locks, no messages (callers know the file
 * name and the offset and report once).  The only state kept between
 * calls is the pool of compressors ("compressors" below), behind its
 * own mutex, so everything here is thread-safe.  Errors are -1 with
 * errno: EIO for data that does not decode to exactly one cluster,
 * ENOSPC when compressed output does not fit, ENOMEM, ENOTSUP (zstd
 * not built in), EINVAL for buffers over 4 GiB (zlib's limit; clusters
 * are <= 2 MiB).
 *
 * What a compressed cluster looks like on disk (QCOW2-NOTES 1.5):
 *
 *        host offset (byte granular)
 *        v
 *   ...|....[ stream of cluster N ][ stream N+1 ...  |...
 *      |<-------- (nb_sectors + 1) * 512 ------------>|
 *         512-byte sectors counted by the L2 descriptor
 *
 * The caller reads whole sectors, so the input handed to the
 * decompressors is the stream *plus whatever follows it in the last
 * sector*: padding, or the start of the next cluster's stream.  Hence
 * the rule for both codecs: decode until exactly out_len bytes (one
 * cluster) have been produced and ignore the rest of the input, which
 * is what QEMU's reader does.  An output buffer that fills before the
 * stream's end marker is accepted too (QEMU stops at one cluster);
 * fewer bytes than out_len is EIO.
 *
 * Deflate: raw deflate (no zlib header or checksum).  QEMU writes with
 * windowBits -12 (4 KiB window), and so do we: the window is what a
 * reader must be able to hold, so it is part of the format.  The level
 * and memLevel only decide how hard the writer looks for matches (any
 * inflater reads the result): QEMU uses zlib's default level (6) and
 * memLevel 9, we use level 5 and memLevel 7.  Measured on the mixed
 * data of the compressed-copy bench (bench/compress-levels.c, per
 * text-like 64 KiB cluster): 6/9 1320 us, 6/7 1050 us with the same
 * streams (memLevel sets the hash table, 128 KiB at 9 and 32 KiB at 7;
 * with a 4 KiB window the larger table finds nothing more but misses
 * the cache), 5/7 880 us with streams 0.45% larger (0.22% on the whole
 * image), 4/7 and below 3% and more larger.  For reading we
 * ask for -15: a raw stream carries no window size, and an inflater
 * set up with a 32 KiB window decodes every stream made with any
 * smaller window, so -15 reads QEMU's -12 streams and anything written
 * with a larger window by another tool.  (Measured with zlib 1.2.13:
 * because we inflate in one call into a buffer holding the whole
 * cluster, even -12 accepts distances beyond 4 KiB; the window size
 * would only bite if the output were produced in pieces.  -15 is right
 * either way.)  The writer must stay at -12: the unit test checks that
 * our streams are byte-identical to zlib's with our parameters, and
 * that an inflater with a 4 KiB window, fed small output buffers so
 * that the window is enforced, reads them.
 *
 * zstd: one zstd frame per cluster, as QEMU writes it.  The streaming
 * decoder is used because, unlike ZSTD_decompress(), it stops at the
 * end of the first frame instead of trying to parse the trailing bytes
 * as another frame.  Decompression contexts are pooled like the
 * compressors (below): a new one per cluster cost 48 us against 35 us
 * with one reused, per 64 KiB text-like cluster (bench/compress-levels.c),
 * on every read of a compressed cluster and every partial write over
 * one.  (Inflate streams are not pooled: inflateInit2 costs nothing
 * measurable there.)  The library's default window limit (128 MiB) is
 * kept so that any frame a standard encoder produces is readable; XXX
 * a malicious image can therefore make one read allocate that much.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>

#define ZLIB_CONST 1
#include <zlib.h>

#ifdef HAVE_LIBZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif

/* QEMU's deflate window ("small window, no zlib header"); our level
 * and memLevel (see above: QEMU's are 6 and 9).
 */
#define DEFLATE_WINDOW_BITS   (-12)
#define DEFLATE_LEVEL         5
#define DEFLATE_MEM_LEVEL     7
/* Reading: the largest raw window, which accepts every smaller one. */
#define INFLATE_WINDOW_BITS   (-15)

bool
qcow2_have_zstd (void)
{
#ifdef HAVE_LIBZSTD
  return true;
#else
  return false;
#endif
}

/* zlib counts in uInt.  Clusters are at most 2 MiB, so larger buffers
 * are a caller bug, not bad data.
 */
static bool
fits_uint (size_t a, size_t b)
{
  return a <= UINT_MAX && b <= UINT_MAX;
}

int
compress_inflate (const void *in, size_t in_len, void *out, size_t out_len)
{
  z_stream strm = { 0 };
  int r;

  if (!fits_uint (in_len, out_len)) {
    errno = EINVAL;
    return -1;
  }

  r = inflateInit2 (&strm, INFLATE_WINDOW_BITS);
  if (r != Z_OK) {
    errno = r == Z_MEM_ERROR ? ENOMEM : EIO;
    return -1;
  }

  strm.next_in = in;
  strm.avail_in = in_len;
  strm.next_out = out;
  strm.avail_out = out_len;

  /* One call does all the work: it returns Z_STREAM_END at the end
   * marker, or Z_BUF_ERROR when it stops early because the output is
   * full (accepted) or the input ran out (short output, rejected below).
   */
  r = inflate (&strm, Z_FINISH);
  inflateEnd (&strm);

  switch (r) {
  case Z_STREAM_END:
  case Z_BUF_ERROR:
  case Z_OK:
    if (strm.avail_out == 0)
      return 0;
    errno = EIO;                /* short output: truncated or wrong size */
    return -1;
  case Z_MEM_ERROR:
    errno = ENOMEM;
    return -1;
  default:                      /* Z_DATA_ERROR, Z_NEED_DICT, ... */
    errno = EIO;
    return -1;
  }
}

/* ---- compressors ----
 *
 * Setting up a codec costs more than it should per cluster: a zstd
 * context allocates and clears its tables on first use (about 1 MiB
 * for 64 KiB clusters), a deflate stream 270 KiB.  So compressors are
 * kept in a pool and reset between clusters (deflateReset,
 * ZSTD_CCtx_reset), which gives the same output as a new one.
 *
 * The pool is bounded: at most pool_max compressors of a type exist,
 * two a core, and a thread that finds none idle waits for one.
 * Compression is pure CPU, so more buys nothing (a compressed copy on
 * 2 cores took the same time with 8 as with 4, and 3% and 10% longer
 * with 3 and 2): nbdkit runs up to 16 threads a connection, and with a
 * compressor each they would only take turns on the cores while keeping
 * their tables out of each other's caches.
 *
 * Caches decide the speed.  A compressor's tables are warm in the
 * cache of the core that used it last, so a thread takes, in this
 * order: an idle compressor last used on its own core; else the one
 * put back last; else a new one, while fewer than pool_max exist; else
 * it waits.  So a new one is made only when none is idle.  Reused
 * last in, first out, 6-14% of the clusters of a compressed copy on 2
 * cores got a compressor last used on the other core, and each of
 * those took 240-275 us of CPU time against 150-170 us; zstd took
 * about 17% more CPU time in all (with this order, 1 cluster in 70 moves;
 * bench/results-20261203-s11.md).  Making a new one rather than taking
 * another core's, or taking the one idle longest, measured the same.
 *
 * A compressor is held only inside compress_cluster, and a zstd
 * decompression context (pooled the same way, as a third type) only
 * inside compress_zstd_decompress: the holder never waits for a lock
 * or for I/O (a waiter may hold the image lock, when a write copies a
 * compressed cluster), so a waiter always gets one.  The pool is freed
 * when the plugin is unloaded (the destructor below); nothing else is
 * shared.
 */

struct compressor {
  struct compressor *next;      /* in the idle list */
  bool ok;                      /* false: in an unknown state, free it */
  int cpu;                      /* where it was last used, -1: unknown */
  z_stream z;                   /* COMPRESSION_DEFLATE */
#ifdef HAVE_LIBZSTD
  ZSTD_CCtx *probe;             /* ... zstd -1, to skip hopeless deflates */
  ZSTD_CCtx *zc;                /* COMPRESSION_ZSTD */
  void *scratch;                /* ... room for any frame, when needed */
  size_t scratch_len;
  ZSTD_DCtx *zd;                /* POOL_ZSTD_DECODE */
#endif
};

/* Pool types: COMPRESSION_DEFLATE and COMPRESSION_ZSTD (compressors),
 * and zstd decompression contexts.
 */
#define POOL_ZSTD_DECODE 2
#define NR_TYPES 3

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
/* One condition a type: a put wakes a waiter for that type.  (With one
 * for all, a put could wake a waiter for another type, which would wait
 * again, while a waiter for the type put kept sleeping beside an idle
 * one until some later put.)
 */
static pthread_cond_t pool_cond[NR_TYPES] = {
  PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
  PTHREAD_COND_INITIALIZER
};
static struct compressor *pool_idle[NR_TYPES];
static unsigned pool_count[NR_TYPES];   /* existing or being made */
static unsigned pool_max;               /* 0: not computed yet */
static uint64_t pool_created;           /* for the unit test */
static uint64_t decoders_created;       /* likewise */
static uint64_t deflate_skipped;        /* likewise */
static uint64_t pool_moved;             /* likewise */

/* Two a core (one waiting to run as soon as another finishes), at
 * least 4, at most 128.
 */
static unsigned
compute_pool_max (void)
{
  long n = sysconf (_SC_NPROCESSORS_ONLN);

  if (n < 2)
    n = 2;
  if (n > 64)
    n = 64;
  return 2 * n;
}

static void
compressor_free (uint8_t type, struct compressor *c)
{
  if (type == COMPRESSION_DEFLATE) {
    deflateEnd (&c->z);
#ifdef HAVE_LIBZSTD
    ZSTD_freeCCtx (c->probe);
#endif
  }
#ifdef HAVE_LIBZSTD
  else if (type == COMPRESSION_ZSTD) {
    ZSTD_freeCCtx (c->zc);
    free (c->scratch);
  }
  else
    ZSTD_freeDCtx (c->zd);
#endif
  free (c);
}

static struct compressor *
compressor_new (uint8_t type)
{
  struct compressor *c = calloc (1, sizeof *c);
  int r;

  if (c == NULL)
    return NULL;
  if (type == COMPRESSION_DEFLATE) {
    r = deflateInit2 (&c->z, DEFLATE_LEVEL, Z_DEFLATED,
                      DEFLATE_WINDOW_BITS, DEFLATE_MEM_LEVEL,
                      Z_DEFAULT_STRATEGY);
    if (r != Z_OK) {
      free (c);
      errno = r == Z_MEM_ERROR ? ENOMEM : EINVAL;
      return NULL;
    }
  }
#ifdef HAVE_LIBZSTD
  else if (type == COMPRESSION_ZSTD) {
    c->zc = ZSTD_createCCtx ();
    if (c->zc == NULL) {
      free (c);
      errno = ENOMEM;
      return NULL;
    }
  }
  else {
    c->zd = ZSTD_createDCtx ();
    if (c->zd == NULL) {
      free (c);
      errno = ENOMEM;
      return NULL;
    }
  }
#endif
  c->ok = true;
  c->cpu = -1;
  return c;
}

/* A compressor of type (0, 1 or 2): an idle one last used on this
 * core, else the one put back last, else a new one if there is room,
 * else wait for one.  NULL with errno only when a new one fails.
 */
static struct compressor *
compressor_get (uint8_t type)
{
  struct compressor *c, **p;
  int cpu;

  pthread_mutex_lock (&pool_lock);
  if (pool_max == 0)
    pool_max = compute_pool_max ();
  while (pool_idle[type] == NULL && pool_count[type] >= pool_max)
    pthread_cond_wait (&pool_cond[type], &pool_lock);
  cpu = sched_getcpu ();        /* -1 (unknown) as any other core */
  for (p = &pool_idle[type]; *p != NULL && (*p)->cpu != cpu;
       p = &(*p)->next)
    ;
  if (*p == NULL)
    p = &pool_idle[type];       /* none of this core's: the newest */
  c = *p;
  if (c != NULL) {
    *p = c->next;
    if (c->cpu != cpu)
      pool_moved++;
    pthread_mutex_unlock (&pool_lock);
    return c;
  }
  pool_count[type]++;
  pthread_mutex_unlock (&pool_lock);

  c = compressor_new (type);
  pthread_mutex_lock (&pool_lock);
  if (c == NULL) {
    pool_count[type]--;
    pthread_cond_signal (&pool_cond[type]);
  }
  else if (type == POOL_ZSTD_DECODE)
    decoders_created++;
  else
    pool_created++;
  pthread_mutex_unlock (&pool_lock);
  return c;
}

/* Back to the pool, or freed when its state is unknown (a codec
 * error): the next user then makes a new one.
 */
static void
compressor_put (uint8_t type, struct compressor *c)
{
  int e = errno;

  c->cpu = sched_getcpu ();
  pthread_mutex_lock (&pool_lock);
  if (c->ok) {
    c->next = pool_idle[type];
    pool_idle[type] = c;
  }
  else
    pool_count[type]--;
  pthread_cond_signal (&pool_cond[type]);
  pthread_mutex_unlock (&pool_lock);
  if (!c->ok)
    compressor_free (type, c);
  errno = e;
}

/* At unload (dlclose) or exit: no compression is running then. */
static void __attribute__ ((destructor))
pool_free_all (void)
{
  uint8_t type;

  for (type = 0; type < NR_TYPES; type++)
    while (pool_idle[type] != NULL) {
      struct compressor *c = pool_idle[type];
      pool_idle[type] = c->next;
      pool_count[type]--;
      compressor_free (type, c);
    }
}

void
compress_stats (struct compress_stats *st)
{
  pthread_mutex_lock (&pool_lock);
  if (pool_max == 0)
    pool_max = compute_pool_max ();
  st->created = pool_created;
  st->decoders_created = decoders_created;
  st->max = pool_max;
  st->deflate_skipped = deflate_skipped;
  st->moved = pool_moved;
  pthread_mutex_unlock (&pool_lock);
}

/* Deflate with QEMU's window and our level on a pooled stream. */
static int
deflate_with (struct compressor *c, const void *in, size_t in_len,
              void *out, size_t *out_len)
{
  z_stream *strm = &c->z;
  int r;

  if (deflateReset (strm) != Z_OK) {
    c->ok = false;
    errno = EIO;
    return -1;
  }
  strm->next_in = in;
  strm->avail_in = in_len;
  strm->next_out = out;
  strm->avail_out = *out_len;

  /* Anything but Z_STREAM_END means the output buffer filled first.
   * Except that zlib stops as soon as the buffer is full, even when the
   * stream fits it exactly: ask once more with a scratch buffer, and
   * the stream fitted if that call ends it without adding a byte.
   */
  r = deflate (strm, Z_FINISH);
  if (r == Z_OK && strm->avail_out == 0) {
    unsigned char scratch[16];

    strm->next_out = scratch;
    strm->avail_out = sizeof scratch;
    r = deflate (strm, Z_FINISH);
    if (r == Z_STREAM_END && strm->avail_out != sizeof scratch)
      r = Z_OK;                 /* it did not fit after all */
    else if (r == Z_STREAM_END)
      strm->avail_out = 0;
  }

  switch (r) {
  case Z_STREAM_END:
    *out_len -= strm->avail_out;
    return 0;
  case Z_OK:
  case Z_BUF_ERROR:
    errno = ENOSPC;
    return -1;
  case Z_MEM_ERROR:
    c->ok = false;
    errno = ENOMEM;
    return -1;
  default:
    c->ok = false;
    errno = EIO;
    return -1;
  }
}

#ifdef HAVE_LIBZSTD
/* Is deflate hopeless for this cluster?  Random data (clusters of
 * compressed or encrypted files) costs deflate as much time as text
 * (about 0.9 ms per 64 KiB against 1.6 ms for text, zlib 1.2.13) only
 * to come out larger than a cluster.  zstd at level 1 tells in a few
 * microseconds: it gives up on a block that it cannot make smaller
 * (it then needs room for the block as it is, which out does not
 * have).  Only high-entropy data is asked, told by a byte histogram
 * of a sample (up to 4096 bytes, spread over the cluster; text, zeroes
 * and mixed clusters fail it at once and go straight to deflate), and
 * only when the stream must be smaller than the input (the caller's
 * room is a cluster less a byte).
 *
 * The answer is zstd's, not deflate's: a cluster that zstd -1 cannot
 * shrink but deflate could (byte-uniform data with only 3-4 byte
 * repeats) is stored as it is.  Such a cluster would save deflate at
 * most about 1.6% (zstd keeps a block as it is below that gain), so
 * the image grows by that much of such clusters at worst.
 */
#define PROBE_SAMPLES 4096

static bool
high_entropy (const unsigned char *in, size_t len)
{
  uint32_t hist[256] = { 0 };
  size_t step = len > PROBE_SAMPLES ? len / PROBE_SAMPLES : 1, i, n = 0;
  uint32_t distinct = 0, max = 0;

  for (i = 0; i < len; i += step, n++)
    hist[in[i]]++;
  for (i = 0; i < 256; i++) {
    distinct += hist[i] > 0;
    if (hist[i] > max)
      max = hist[i];
  }
  /* Uniform bytes: in 4096 samples every value turns up (16 times on
   * average) and none much more often than that.
   */
  return n >= 1024 && distinct == 256 && max <= 4 * (n / 256);
}

static bool
deflate_hopeless (struct compressor *c, const void *in, size_t in_len,
                  void *out, size_t out_len)
{
  size_t r;

  if (out_len >= in_len || !high_entropy (in, in_len))
    return false;
  if (c->probe == NULL) {
    c->probe = ZSTD_createCCtx ();
    if (c->probe == NULL ||
        ZSTD_isError (ZSTD_CCtx_setParameter (c->probe,
                                              ZSTD_c_compressionLevel, 1)))
      return false;             /* then just deflate */
  }
  if (ZSTD_isError (ZSTD_CCtx_reset (c->probe, ZSTD_reset_session_only)))
    return false;
  r = ZSTD_compress2 (c->probe, out, out_len, in, in_len);
  return ZSTD_isError (r) &&
    ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall;
}
#else
static bool
deflate_hopeless (struct compressor *c, const void *in, size_t in_len,
                  void *out, size_t out_len)
{
  return false;
}
#endif

int
compress_deflate (const void *in, size_t in_len, void *out, size_t *out_len)
{
  struct compressor *c;
  int r;

  if (!fits_uint (in_len, *out_len)) {
    errno = EINVAL;
    return -1;
  }
  c = compressor_get (COMPRESSION_DEFLATE);
  if (c == NULL)
    return -1;
  if (deflate_hopeless (c, in, in_len, out, *out_len)) {
    pthread_mutex_lock (&pool_lock);
    deflate_skipped++;
    pthread_mutex_unlock (&pool_lock);
    compressor_put (COMPRESSION_DEFLATE, c);
    errno = ENOSPC;
    return -1;
  }
  r = deflate_with (c, in, in_len, out, out_len);
  compressor_put (COMPRESSION_DEFLATE, c);
  return r;
}

#ifdef HAVE_LIBZSTD

/* Bad data is EIO; only the two resource errors are told apart. */
static int
zstd_errno (size_t r)
{
  switch (ZSTD_getErrorCode (r)) {
  case ZSTD_error_memory_allocation:
    return ENOMEM;
  case ZSTD_error_dstSize_tooSmall:
    return ENOSPC;
  default:
    return EIO;
  }
}

/* Feed the decoder until the output is full.  Stops with EIO when the
 * frame ends early, when the input runs out, or when a call makes no
 * progress at all (which would otherwise loop for ever).
 */
static int
zstd_decode (ZSTD_DCtx *dctx, ZSTD_inBuffer *ib, ZSTD_outBuffer *ob)
{
  while (ob->pos < ob->size) {
    size_t in_before = ib->pos, out_before = ob->pos;
    size_t r = ZSTD_decompressStream (dctx, ob, ib);

    if (ZSTD_isError (r)) {
      errno = zstd_errno (r) == ENOMEM ? ENOMEM : EIO;
      return -1;
    }
    if (ob->pos == ob->size)
      break;
    if (r == 0 ||                               /* frame ended short */
        (ib->pos == in_before && ob->pos == out_before)) {
      errno = EIO;
      return -1;
    }
  }
  return 0;
}

/* Decode with a pooled context, reset first: a reset context decodes
 * as a new one, also after a failed decode (bad data leaves it in the
 * middle of a frame, which the reset ends).
 */
int
compress_zstd_decompress (const void *in, size_t in_len,
                          void *out, size_t out_len)
{
  ZSTD_inBuffer ib = { .src = in, .size = in_len, .pos = 0 };
  ZSTD_outBuffer ob = { .dst = out, .size = out_len, .pos = 0 };
  struct compressor *c;
  int r = -1;

  c = compressor_get (POOL_ZSTD_DECODE);
  if (c == NULL)
    return -1;
  if (ZSTD_isError (ZSTD_DCtx_reset (c->zd, ZSTD_reset_session_only)))
    errno = EIO;
  else
    r = zstd_decode (c->zd, &ib, &ob);
  compressor_put (POOL_ZSTD_DECODE, c);
  return r;
}

/* One frame in one call, as QEMU writes it (zstd's default level 3;
 * the frame records the content size, so decoders size their window to
 * the cluster).  The one-shot call compresses straight into out: the
 * streaming call QEMU uses would copy the input into the context's
 * buffer and the output out of another one whenever out is smaller
 * than ZSTD_compressBound, which it always is here.  But the one-shot
 * call fails when out is only just large enough for the frame (it
 * needs some room to spare while it works), so when it finds out too
 * small, the frame is made again in the compressor's scratch buffer,
 * which is large enough for anything, and copied if it fits.  Data
 * that does not compress fails fast both times.
 */
static int
zstd_with (struct compressor *c, const void *in, size_t in_len,
           void *out, size_t *out_len)
{
  size_t r, bound;

  r = ZSTD_CCtx_reset (c->zc, ZSTD_reset_session_only);
  if (!ZSTD_isError (r))
    r = ZSTD_compress2 (c->zc, out, *out_len, in, in_len);
  bound = ZSTD_compressBound (in_len);
  if (ZSTD_isError (r) &&
      ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall &&
      *out_len < bound) {
    if (c->scratch_len < bound) {
      free (c->scratch);
      c->scratch_len = 0;
      c->scratch = malloc (bound);
      if (c->scratch == NULL) {
        errno = ENOMEM;
        return -1;
      }
      c->scratch_len = bound;
    }
    r = ZSTD_CCtx_reset (c->zc, ZSTD_reset_session_only);
    if (!ZSTD_isError (r))
      r = ZSTD_compress2 (c->zc, c->scratch, bound, in, in_len);
    if (!ZSTD_isError (r)) {
      if (r > *out_len) {
        errno = ENOSPC;
        return -1;
      }
      memcpy (out, c->scratch, r);
    }
  }
  if (ZSTD_isError (r)) {
    errno = zstd_errno (r);
    if (errno != ENOSPC)
      c->ok = false;
    return -1;
  }
  *out_len = r;
  return 0;
}

int
compress_zstd_compress (const void *in, size_t in_len,
                        void *out, size_t *out_len)
{
  struct compressor *c;
  int r;

  c = compressor_get (COMPRESSION_ZSTD);
  if (c == NULL)
    return -1;
  r = zstd_with (c, in, in_len, out, out_len);
  compressor_put (COMPRESSION_ZSTD, c);
  return r;
}

#else /* !HAVE_LIBZSTD */

int
compress_zstd_decompress (const void *in __attribute__ ((unused)),
                          size_t in_len __attribute__ ((unused)),
                          void *out __attribute__ ((unused)),
                          size_t out_len __attribute__ ((unused)))
{
  errno = ENOTSUP;
  return -1;
}

int
compress_zstd_compress (const void *in __attribute__ ((unused)),
                        size_t in_len __attribute__ ((unused)),
                        void *out __attribute__ ((unused)),
                        size_t *out_len __attribute__ ((unused)))
{
  errno = ENOTSUP;
  return -1;
}

#endif /* !HAVE_LIBZSTD */

/* One cluster compressed with compression_type 'type' into out, which
 * has room for *out_len bytes: 0 with *out_len set to the stream's
 * length, or -1 with ENOSPC when the stream does not fit (the caller
 * gives room for one byte less than a cluster and stores a cluster
 * that does not compress as it is, as qemu-img convert -c does).
 */
int
compress_cluster (uint8_t type, const void *in, size_t in_len, void *out,
                  size_t *out_len)
{
  switch (type) {
  case COMPRESSION_DEFLATE:
    return compress_deflate (in, in_len, out, out_len);
  case COMPRESSION_ZSTD:
    return compress_zstd_compress (in, in_len, out, out_len);
  default:
    errno = ENOTSUP;
    return -1;
  }
}
