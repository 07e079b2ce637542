/* nbdkit-qcow2: compressed cluster payloads.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * This file owns the two codecs qcow2 knows (compression_type 0 =
 * deflate, 1 = zstd) and nothing else: every function is pure buffer
 * -> buffer.  No I/O, no locks, no messages (callers know the file name
 * and the offset and report once), no state shared between calls, so
 * everything here is thread-safe.  Errors are -1 with errno: EIO for
 * data that does not decode to exactly one cluster, ENOSPC when
 * compressed output does not fit, ENOMEM, ENOTSUP (zstd not built in),
 * EINVAL for buffers over 4 GiB (zlib's limit; clusters are <= 2 MiB).
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
 * windowBits -12 (4 KiB window) and memLevel 9; we write exactly the
 * same parameters so our clusters look like QEMU's.  For reading we
 * ask for -15: a raw stream carries no window size, and an inflater
 * set up with a 32 KiB window decodes every stream made with any
 * smaller window, so -15 reads QEMU's -12 streams and anything written
 * with a larger window by another tool.  (Measured with zlib 1.2.13:
 * because we inflate in one call into a buffer holding the whole
 * cluster, even -12 accepts distances beyond 4 KiB; the window size
 * would only bite if the output were produced in pieces.  -15 is right
 * either way.)  The writer must stay at -12, memLevel 9: the unit test
 * checks that our streams are byte-identical to ones made with those
 * parameters, which is what QEMU's -12 readers are guaranteed to read.
 *
 * zstd: one zstd frame per cluster, as QEMU writes it.  The streaming
 * decoder is used because, unlike ZSTD_decompress(), it stops at the
 * end of the first frame instead of trying to parse the trailing bytes
 * as another frame.  A decompression context is created per call: it
 * costs an allocation per compressed cluster read, which is small next
 * to reading and decoding the cluster, and avoids thread-local state
 * that would outlive the plugin (XXX cache one per thread if profiles
 * ever show it).  The library's default window limit (128 MiB) is
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

#define ZLIB_CONST 1
#include <zlib.h>

#ifdef HAVE_LIBZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif

/* QEMU's deflate parameters ("small window, no zlib header"). */
#define DEFLATE_WINDOW_BITS   (-12)
#define DEFLATE_MEM_LEVEL     9
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

int
compress_deflate (const void *in, size_t in_len, void *out, size_t *out_len)
{
  z_stream strm = { 0 };
  int r;

  if (!fits_uint (in_len, *out_len)) {
    errno = EINVAL;
    return -1;
  }

  r = deflateInit2 (&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                    DEFLATE_WINDOW_BITS, DEFLATE_MEM_LEVEL,
                    Z_DEFAULT_STRATEGY);
  if (r != Z_OK) {
    errno = r == Z_MEM_ERROR ? ENOMEM : EINVAL;
    return -1;
  }

  strm.next_in = in;
  strm.avail_in = in_len;
  strm.next_out = out;
  strm.avail_out = *out_len;

  /* Anything but Z_STREAM_END means the output buffer filled first.
   * Except that zlib stops as soon as the buffer is full, even when the
   * stream fits it exactly: ask once more with a scratch buffer, and
   * the stream fitted if that call ends it without adding a byte.
   */
  r = deflate (&strm, Z_FINISH);
  if (r == Z_OK && strm.avail_out == 0) {
    unsigned char scratch[16];

    strm.next_out = scratch;
    strm.avail_out = sizeof scratch;
    r = deflate (&strm, Z_FINISH);
    if (r == Z_STREAM_END && strm.avail_out != sizeof scratch)
      r = Z_OK;                 /* it did not fit after all */
    else if (r == Z_STREAM_END)
      strm.avail_out = 0;
  }
  deflateEnd (&strm);

  switch (r) {
  case Z_STREAM_END:
    *out_len -= strm.avail_out;
    return 0;
  case Z_OK:
  case Z_BUF_ERROR:
    errno = ENOSPC;
    return -1;
  case Z_MEM_ERROR:
    errno = ENOMEM;
    return -1;
  default:
    errno = EIO;
    return -1;
  }
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

int
compress_zstd_decompress (const void *in, size_t in_len,
                          void *out, size_t out_len)
{
  ZSTD_inBuffer ib = { .src = in, .size = in_len, .pos = 0 };
  ZSTD_outBuffer ob = { .dst = out, .size = out_len, .pos = 0 };
  ZSTD_DCtx *dctx;
  int r;

  dctx = ZSTD_createDCtx ();
  if (dctx == NULL) {
    errno = ENOMEM;
    return -1;
  }
  r = zstd_decode (dctx, &ib, &ob);
  ZSTD_freeDCtx (dctx);
  return r;
}

int
compress_zstd_compress (const void *in, size_t in_len,
                        void *out, size_t *out_len)
{
  ZSTD_inBuffer ib = { .src = in, .size = in_len, .pos = 0 };
  ZSTD_outBuffer ob = { .dst = out, .size = *out_len, .pos = 0 };
  ZSTD_CCtx *cctx;
  size_t r;

  cctx = ZSTD_createCCtx ();
  if (cctx == NULL) {
    errno = ENOMEM;
    return -1;
  }

  /* The streaming API, ended in its first call, as QEMU writes: the
   * frame records the content size (so decoders size their window to
   * the cluster), and unlike ZSTD_compress() it fills the buffer to the
   * last byte instead of failing when the result fits only just.  zstd's
   * default level (3), like QEMU.  r > 0 means output still pending,
   * that is, the buffer is full.
   */
  r = ZSTD_compressStream2 (cctx, &ob, &ib, ZSTD_e_end);
  ZSTD_freeCCtx (cctx);
  if (ZSTD_isError (r)) {
    errno = zstd_errno (r);
    return -1;
  }
  if (r > 0) {
    errno = ENOSPC;
    return -1;
  }
  *out_len = ob.pos;
  return 0;
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
