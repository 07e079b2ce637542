/* nbdkit-qcow2: size and CPU time of cluster compression settings.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 *   cc -O2 -o compress-levels bench/compress-levels.c -lz -lzstd
 *   ./compress-levels FILE [CLUSTER [PASSES [MATCH]]]
 *
 * Compresses every non-zero cluster of FILE (a raw image, e.g. from
 * tests/mkmixed.py; all-zero clusters are skipped, as nbdcopy sends
 * them as zero requests) with each setting below, the way compress=on
 * stores them: into room for one byte less than a cluster, else the
 * cluster is stored as it is.  For each setting: the bytes the data
 * takes (streams + clusters stored as they are), against the
 * reference setting of its codec (what QEMU writes: zstd level 3,
 * deflate level 6 / memLevel 9), how many clusters were compressed,
 * and the CPU time (the best of PASSES passes, default 3) in total
 * and per cluster, split into high-entropy clusters (random: those the
 * byte histogram of compress.c calls uniform) and the others.  One
 * thread; the machine's other load changes CPU times little.  With
 * MATCH, only the settings whose name contains it.
 *
 * Deflate settings skip high-entropy clusters that zstd -1 cannot
 * shrink, as compress.c does (deflate_hopeless); the "noskip" setting
 * shows what that saves.
 */

#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define ZLIB_CONST 1
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

enum kind { ZSTD_REUSE_DIRECT, ZSTD_REUSE_SCRATCH, ZSTD_FRESH_STREAM,
            ZSTD_REUSE_STREAM, DEFLATE_REUSE, DEFLATE_FRESH };

struct setting {
  const char *name;
  enum kind kind;
  int level;
  int mem_level;
  bool skip;                    /* deflate: skip hopeless clusters */
  int strategy;                 /* zstd: 0 or a ZSTD_strategy */
};

static const struct setting settings[] = {
  { "zstd3 reused CCtx, into out (+retry)", ZSTD_REUSE_DIRECT, 3 },
  { "zstd3 reused CCtx, into scratch", ZSTD_REUSE_SCRATCH, 3 },
  { "zstd3 reused CCtx, stream e_end", ZSTD_REUSE_STREAM, 3 },
  { "zstd3 new CCtx each, stream (QEMU)", ZSTD_FRESH_STREAM, 3 },
  { "zstd2 reused, scratch", ZSTD_REUSE_SCRATCH, 2 },
  { "zstd1 reused, scratch", ZSTD_REUSE_SCRATCH, 1 },
  { "zstd-1 reused, scratch", ZSTD_REUSE_SCRATCH, -1 },
  { "zstd3 strategy=fast, scratch", ZSTD_REUSE_SCRATCH, 3, 0, false,
    ZSTD_fast },
  { "deflate6 mem9 new each (QEMU)", DEFLATE_FRESH, 6, 9, false },
  { "deflate6 mem9 reused noskip", DEFLATE_REUSE, 6, 9, false },
  { "deflate6 mem9 reused", DEFLATE_REUSE, 6, 9, true },
  { "deflate6 mem8 reused", DEFLATE_REUSE, 6, 8, true },
  { "deflate6 mem7 reused", DEFLATE_REUSE, 6, 7, true },
  { "deflate5 mem9 reused", DEFLATE_REUSE, 5, 9, true },
  { "deflate5 mem8 reused", DEFLATE_REUSE, 5, 8, true },
  { "deflate5 mem7 reused", DEFLATE_REUSE, 5, 7, true },
  { "deflate4 mem9 reused", DEFLATE_REUSE, 4, 9, true },
  { "deflate4 mem8 reused", DEFLATE_REUSE, 4, 8, true },
  { "deflate3 mem9 reused", DEFLATE_REUSE, 3, 9, true },
  { "deflate2 mem9 reused", DEFLATE_REUSE, 2, 9, true },
  { "deflate1 mem9 reused", DEFLATE_REUSE, 1, 9, true },
};
#define NR_SETTINGS (sizeof settings / sizeof settings[0])

static double
cpu_now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* compress.c's test: uniform bytes in a 4096-byte sample. */
static bool
high_entropy (const unsigned char *in, size_t len)
{
  uint32_t hist[256] = { 0 };
  size_t step = len > 4096 ? len / 4096 : 1, i, n = 0;
  uint32_t distinct = 0, max = 0;

  for (i = 0; i < len; i += step, n++)
    hist[in[i]]++;
  for (i = 0; i < 256; i++) {
    distinct += hist[i] > 0;
    if (hist[i] > max)
      max = hist[i];
  }
  return n >= 1024 && distinct == 256 && max <= 4 * (n / 256);
}

struct state {
  ZSTD_CCtx *zc, *probe;
  z_stream z;
  bool z_init;
  unsigned char *scratch;
  size_t scratch_len;
};

/* The stream's length, or 0 when it does not fit in cap. */
static size_t
one (const struct setting *s, struct state *st, const unsigned char *in,
     size_t len, unsigned char *out, size_t cap)
{
  size_t r;

  switch (s->kind) {
  case ZSTD_REUSE_DIRECT:
    ZSTD_CCtx_reset (st->zc, ZSTD_reset_session_only);
    r = ZSTD_compress2 (st->zc, out, cap, in, len);
    if (ZSTD_isError (r) &&
        ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall) {
      ZSTD_CCtx_reset (st->zc, ZSTD_reset_session_only);
      r = ZSTD_compress2 (st->zc, st->scratch, st->scratch_len, in, len);
      if (ZSTD_isError (r) || r > cap)
        return 0;
      memcpy (out, st->scratch, r);
    }
    return ZSTD_isError (r) ? 0 : r;
  case ZSTD_REUSE_SCRATCH:
    ZSTD_CCtx_reset (st->zc, ZSTD_reset_session_only);
    r = ZSTD_compress2 (st->zc, st->scratch, st->scratch_len, in, len);
    if (ZSTD_isError (r) || r > cap)
      return 0;
    memcpy (out, st->scratch, r);
    return r;
  case ZSTD_REUSE_STREAM:
  case ZSTD_FRESH_STREAM: {
    ZSTD_CCtx *c = st->zc;
    ZSTD_inBuffer ib = { in, len, 0 };
    ZSTD_outBuffer ob = { out, cap, 0 };

    if (s->kind == ZSTD_FRESH_STREAM)
      c = ZSTD_createCCtx ();
    else
      ZSTD_CCtx_reset (c, ZSTD_reset_session_only);
    r = ZSTD_compressStream2 (c, &ob, &ib, ZSTD_e_end);
    if (s->kind == ZSTD_FRESH_STREAM)
      ZSTD_freeCCtx (c);
    return r == 0 ? ob.pos : 0;
  }
  case DEFLATE_REUSE:
  case DEFLATE_FRESH: {
    int zr;

    if (s->skip && high_entropy (in, len)) {
      ZSTD_CCtx_reset (st->probe, ZSTD_reset_session_only);
      r = ZSTD_compress2 (st->probe, out, cap, in, len);
      if (ZSTD_isError (r) &&
          ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall)
        return 0;
    }
    if (s->kind == DEFLATE_FRESH || !st->z_init) {
      if (st->z_init)
        deflateEnd (&st->z);
      memset (&st->z, 0, sizeof st->z);
      deflateInit2 (&st->z, s->level, Z_DEFLATED, -12, s->mem_level,
                    Z_DEFAULT_STRATEGY);
      st->z_init = true;
    }
    else
      deflateReset (&st->z);
    st->z.next_in = in;
    st->z.avail_in = len;
    st->z.next_out = out;
    st->z.avail_out = cap;
    zr = deflate (&st->z, Z_FINISH);
    if (s->kind == DEFLATE_FRESH) {
      deflateEnd (&st->z);
      st->z_init = false;
    }
    return zr == Z_STREAM_END ? cap - st->z.avail_out : 0;
  }
  }
  return 0;
}

int
main (int argc, char **argv)
{
  size_t cs = argc > 2 ? strtoul (argv[2], NULL, 0) : 65536;
  int passes = argc > 3 ? atoi (argv[3]) : 3;
  struct stat sb;
  unsigned char *map, *out;
  size_t nclusters, i, n = 0, nrand = 0, *idx;
  bool *rnd;
  uint64_t ref_bytes[2] = { 0, 0 };
  int fd, p;
  unsigned k;

  if (argc < 2) {
    fprintf (stderr, "usage: %s FILE [CLUSTER [PASSES]]\n", argv[0]);
    exit (2);
  }
  fd = open (argv[1], O_RDONLY);
  if (fd == -1 || fstat (fd, &sb) == -1) {
    perror (argv[1]);
    exit (1);
  }
  map = mmap (NULL, sb.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
  if (map == MAP_FAILED) {
    perror ("mmap");
    exit (1);
  }
  nclusters = sb.st_size / cs;
  idx = malloc (nclusters * sizeof *idx);
  rnd = malloc (nclusters * sizeof *rnd);
  out = malloc (cs);
  for (i = 0; i < nclusters; i++) {
    const unsigned char *c = map + i * cs;
    if (c[0] == 0 && memcmp (c, c + 1, cs - 1) == 0)
      continue;
    rnd[n] = high_entropy (c, cs);
    nrand += rnd[n];
    idx[n++] = i;
  }
  printf ("%s: %zu clusters of %zu bytes, %zu non-zero (%zu high-entropy), "
          "best of %d passes\n", argv[1], nclusters, cs, n, nrand, passes);
  printf ("%-38s %12s %8s %9s %7s %8s %8s\n", "setting", "data bytes",
          "vs ref", "compr.", "cpu s", "us/text", "us/rand");

  for (k = 0; k < NR_SETTINGS; k++) {
    const struct setting *s = &settings[k];
    bool is_zstd = s->kind <= ZSTD_REUSE_STREAM;
    double best = 1e9, best_t = 0, best_r = 0;

    if (argc > 4 && strstr (s->name, argv[4]) == NULL)
      continue;
    uint64_t bytes = 0;
    size_t ncomp = 0;

    for (p = 0; p < passes; p++) {
      struct state st = { 0 };
      double t0, t_text = 0, t_rand = 0;

      st.zc = ZSTD_createCCtx ();
      ZSTD_CCtx_setParameter (st.zc, ZSTD_c_compressionLevel, s->level);
      if (s->strategy)
        ZSTD_CCtx_setParameter (st.zc, ZSTD_c_strategy, s->strategy);
      st.probe = ZSTD_createCCtx ();
      ZSTD_CCtx_setParameter (st.probe, ZSTD_c_compressionLevel, 1);
      st.scratch_len = ZSTD_compressBound (cs);
      st.scratch = malloc (st.scratch_len);
      bytes = 0;
      ncomp = 0;
      for (i = 0; i < n; i++) {
        size_t r;
        double a = cpu_now (), b;

        r = one (s, &st, map + idx[i] * cs, cs, out, cs - 1);
        b = cpu_now ();
        if (rnd[i])
          t_rand += b - a;
        else
          t_text += b - a;
        bytes += r ? r : cs;
        ncomp += r != 0;
      }
      t0 = t_text + t_rand;
      if (t0 < best) {
        best = t0;
        best_t = t_text;
        best_r = t_rand;
      }
      ZSTD_freeCCtx (st.zc);
      ZSTD_freeCCtx (st.probe);
      if (st.z_init)
        deflateEnd (&st.z);
      free (st.scratch);
    }
    if (ref_bytes[!is_zstd] == 0 &&
        (s->kind == ZSTD_REUSE_DIRECT || s->kind == DEFLATE_FRESH))
      ref_bytes[!is_zstd] = bytes;
    printf ("%-38s %12" PRIu64 " %7.2f%% %9zu %7.3f %8.1f %8.1f\n",
            s->name, bytes,
            ref_bytes[!is_zstd] ? 100.0 * bytes / ref_bytes[!is_zstd] : 0,
            ncomp, best,
            n > nrand ? 1e6 * best_t / (n - nrand) : 0,
            nrand ? 1e6 * best_r / nrand : 0);
    fflush (stdout);
  }

  /* Decompression (a partial write over a compressed cluster reads
   * it): a new context per cluster, as compress.c does, against one
   * reused.
   */
  {
    unsigned char *streams = malloc (n * cs), *back = malloc (cs);
    size_t *slen = calloc (n, sizeof *slen), m = 0;
    ZSTD_CCtx *zc = ZSTD_createCCtx ();
    z_stream z = { 0 };
    int mode, codec;

    for (codec = 0; codec < 2; codec++) {
      m = 0;
      if (codec == 1)
        deflateInit2 (&z, 6, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY);
      for (i = 0; i < n; i++) {
        if (codec == 0)
          slen[i] = ZSTD_compressCCtx (zc, streams + i * cs, cs, map + idx[i] * cs, cs, 3);
        else {
          deflateReset (&z);
          z.next_in = map + idx[i] * cs;
          z.avail_in = cs;
          z.next_out = streams + i * cs;
          z.avail_out = cs;
          slen[i] = deflate (&z, Z_FINISH) == Z_STREAM_END ? cs - z.avail_out : 0;
        }
        if (ZSTD_isError (slen[i]) || slen[i] >= cs)
          slen[i] = 0;
        m += slen[i] != 0;
      }
      for (mode = 0; mode < 2; mode++) {
        double best = 1e9;
        for (p = 0; p < passes; p++) {
          ZSTD_DCtx *d = ZSTD_createDCtx ();
          z_stream in = { 0 };
          double t = cpu_now ();
          inflateInit2 (&in, -15);
          for (i = 0; i < n; i++) {
            if (slen[i] == 0)
              continue;
            if (codec == 0) {
              ZSTD_inBuffer ib = { streams + i * cs, slen[i], 0 };
              ZSTD_outBuffer ob = { back, cs, 0 };
              ZSTD_DCtx *dd = d;
              if (mode == 0)
                dd = ZSTD_createDCtx ();
              else
                ZSTD_DCtx_reset (dd, ZSTD_reset_session_only);
              while (ob.pos < ob.size)
                if (ZSTD_isError (ZSTD_decompressStream (dd, &ob, &ib)))
                  abort ();
              if (mode == 0)
                ZSTD_freeDCtx (dd);
            }
            else {
              if (mode == 0) {
                inflateEnd (&in);
                memset (&in, 0, sizeof in);
                inflateInit2 (&in, -15);
              }
              else
                inflateReset (&in);
              in.next_in = streams + i * cs;
              in.avail_in = slen[i];
              in.next_out = back;
              in.avail_out = cs;
              inflate (&in, Z_FINISH);
              if (in.avail_out != 0)
                abort ();
            }
            if (p == 0 && memcmp (back, map + idx[i] * cs, cs) != 0)
              abort ();
          }
          t = cpu_now () - t;
          if (t < best)
            best = t;
          ZSTD_freeDCtx (d);
          inflateEnd (&in);
        }
        printf ("decode %-7s %-22s %zu clusters %7.3f s %6.1f us/cluster\n",
                codec == 0 ? "zstd3" : "deflate",
                mode == 0 ? "new context each" : "reused context",
                m, best, 1e6 * best / m);
      }
    }
    deflateEnd (&z);
    ZSTD_freeCCtx (zc);
    free (streams);
    free (back);
    free (slen);
  }
  return 0;
}
