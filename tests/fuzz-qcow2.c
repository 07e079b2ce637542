/* nbdkit-qcow2: a libFuzzer target that opens hostile images.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The input is the whole image file.  It is opened writable through the
 * memory io backend (dir NULL, so images that need a backing or data
 * file are refused) with small caches, so that eviction and write-back
 * run even on tiny images.  Then, on whatever opened:
 *
 *   read the virtual disk     all of it when small; else the first 4 MiB
 *                             and 64 chunks at pseudo-random offsets
 *   write, zero, trim, flush  a few ops at offsets taken from the input
 *   extents                   over the whole disk, checked for tiling
 *   bitmap extents            of every persistent bitmap, the same way
 *   close                     which flushes and clears the dirty bit
 *
 *       input:  [ image bytes ...................... | tail: 32 bytes ]
 *                                                      \-> op script seed
 *
 * The last bytes of the input seed the op script (a splitmix64 stream),
 * so the fuzzer steers the ops by mutating them; in most images they are
 * guest data or padding.  Op sizes are bounded (a few clusters, at most
 * 1 MiB) so that one input cannot spend minutes on a 2 EiB disk.
 *
 * API failures are expected (the input is hostile) and ignored.  What
 * the fuzzer looks for are sanitizer reports, leaks, hangs, and broken
 * promises (abort):
 *  - a write inside one cluster that succeeded reads back (a write that
 *    spans clusters is not checked: a hostile image may map two guest
 *    clusters to one host cluster, which core does not detect);
 *  - a zero that succeeded reads back as zeroes;
 *  - extents tile the requested range with valid types;
 *  - after a successful flush, the image reopened from the flushed bytes
 *    reads the same as the live image (what the caches held reached the
 *    file);
 *  - nothing is written far past the end of the file: the io is wrapped,
 *    and a write ending more than FAR_PAST_EOF beyond the input aborts.
 *    By the project's rules every table offset is checked against the
 *    file size, so a hostile L1/L2/reftable entry, or refcounts that
 *    claim clusters far past the end, must not turn into a huge sparse
 *    file (or, in memory, a huge realloc).  With
 *    FUZZ_EOF_LAX=1 in the environment such writes fail with EFBIG
 *    instead, like a file system's size limit.
 *
 * Build: `make fuzz` after configure --enable-fuzzer (tests/Makefile.am).
 * Replay: ./fuzz-qcow2 FILE... runs each input once.  Built with
 * -DFUZZ_REPLAY_MAIN this file has its own main, which replays
 * tests/fuzz-regressions/ (or the files given) without libFuzzer: the
 * unit test test-fuzz-replay.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>

#include "qcow2.h"
#include "io.h"

#define TAIL_BYTES       32
#define CHUNK            (UINT64_C(256) << 10)
#define FULL_READ_MAX    (UINT64_C(8) << 20)
#define HEAD_READ        (UINT64_C(4) << 20)
#define RANDOM_CHUNKS    64
#define MAX_OP_BYTES     (UINT64_C(1) << 20)
#define NR_OPS           12
#define MAX_EXTENTS      100000
#define FAR_PAST_EOF     (UINT64_C(64) << 20)

/* Scratch buffers, allocated once. */
static uint8_t *chunk_buf, *op_buf, *check_buf;

static void
check (bool ok, const char *what, uint64_t off, uint64_t count)
{
  if (!ok) {
    fprintf (stderr, "fuzz-qcow2: %s failed at offset %#llx count %#llx\n",
             what, (unsigned long long) off, (unsigned long long) count);
    abort ();
  }
}

static uint64_t
min_u64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* The io wrapper: the memory backend, plus the far-past-EOF check. */
struct fuzz_io {
  struct qcow2_io io;           /* must be first */
  struct qcow2_io *mem;
  uint64_t limit;               /* no write may end past this */
  bool lax;
};

static int
fio_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  return io_pread (((struct fuzz_io *) io)->mem, buf, count, offset);
}

static int
fio_pwrite (struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  struct fuzz_io *f = (struct fuzz_io *) io;

  if (offset > f->limit || count > f->limit - offset) {
    if (f->lax) {
      errno = EFBIG;
      return -1;
    }
    fprintf (stderr, "fuzz-qcow2: write of %zu bytes at host offset %#llx, "
             "far past the end of the file (limit %#llx)\n", count,
             (unsigned long long) offset, (unsigned long long) f->limit);
    abort ();
  }
  return io_pwrite (f->mem, buf, count, offset);
}

static int
fio_flush (struct qcow2_io *io)
{
  return io_flush (((struct fuzz_io *) io)->mem);
}

static int64_t
fio_size (struct qcow2_io *io)
{
  return io_size (((struct fuzz_io *) io)->mem);
}

static int
fio_truncate (struct qcow2_io *io, uint64_t size)
{
  struct fuzz_io *f = (struct fuzz_io *) io;

  if (size > f->limit) {
    errno = EFBIG;
    return -1;
  }
  return io_truncate (f->mem, size);
}

static void
fio_close (struct qcow2_io *io)
{
  struct fuzz_io *f = (struct fuzz_io *) io;

  io_close (f->mem);
  free (f);
}

static const struct qcow2_io_ops fuzz_io_ops = {
  .pread = fio_pread,
  .pwrite = fio_pwrite,
  .flush = fio_flush,
  .size = fio_size,
  .truncate = fio_truncate,
  .close = fio_close,
};

static struct qcow2_io *
fuzz_io_new (const uint8_t *data, size_t size, struct qcow2_io **mem)
{
  struct fuzz_io *f = calloc (1, sizeof *f);

  if (f == NULL)
    return NULL;
  f->mem = qcow2_io_new_memory (data, size);
  if (f->mem == NULL) {
    free (f);
    return NULL;
  }
  f->io.ops = &fuzz_io_ops;
  f->io.fd = -1;
  f->limit = size + FAR_PAST_EOF;
  f->lax = getenv ("FUZZ_EOF_LAX") != NULL;
  *mem = f->mem;
  return &f->io;
}

/* splitmix64: the op script, reproducible for a given input. */
static uint64_t
next (uint64_t *s)
{
  uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
  return z ^ (z >> 31);
}

static uint64_t
seed_of (const uint8_t *data, size_t size)
{
  size_t n = min_u64 (size, TAIL_BYTES), i;
  uint64_t h = UINT64_C(0xcbf29ce484222325);    /* FNV-1a */

  for (i = size - n; i < size; i++)
    h = (h ^ data[i]) * UINT64_C(0x100000001b3);
  return h;
}

/* Pick [*off, *off + *count) inside the disk: near the start, near the
 * end or anywhere; cluster aligned or ragged; 1 byte to 8 clusters.
 */
static void
pick_range (uint64_t *s, uint64_t size, uint64_t cs,
            uint64_t *off, uint64_t *count)
{
  uint64_t r = next (s), o, n;

  switch (r & 3) {
  case 0:  o = next (s) % min_u64 (size, HEAD_READ); break;
  case 1:  o = size - 1 - next (s) % min_u64 (size, HEAD_READ); break;
  default: o = next (s) % size;
  }
  if (r & 4)
    n = (1 + (next (s) & 7)) * cs;
  else if (r & 8)
    n = 1 + next (s) % cs;
  else
    n = 1 + next (s) % (2 * cs);
  if (r & 16)
    o &= ~(cs - 1);
  n = min_u64 (n, MAX_OP_BYTES);
  *off = o;
  *count = min_u64 (n, size - o);
}

static void
read_range (struct qcow2_image *img, uint64_t off, uint64_t count)
{
  while (count > 0) {
    uint64_t n = min_u64 (count, CHUNK);
    qcow2_pread (img, chunk_buf, n, off);
    off += n;
    count -= n;
  }
}

/* The whole disk when small, else its head and scattered chunks. */
static void
read_disk (struct qcow2_image *img, uint64_t *s)
{
  uint64_t size = qcow2_get_size (img);
  int i;

  if (size <= FULL_READ_MAX) {
    read_range (img, 0, size);
    return;
  }
  read_range (img, 0, HEAD_READ);
  for (i = 0; i < RANDOM_CHUNKS; i++) {
    uint64_t off = next (s) % size;
    if (i & 1)
      off &= ~(CHUNK - 1);
    read_range (img, off, min_u64 (CHUNK, size - off));
  }
}

static bool
same_cluster (uint64_t off, uint64_t count, uint64_t cs)
{
  return off / cs == (off + count - 1) / cs;
}

static void
do_write (struct qcow2_image *img, uint64_t *s, uint64_t off, uint64_t n,
          uint64_t cs)
{
  unsigned flags = (next (s) & 7) == 0 ? QCOW2_F_FUA : 0;
  uint8_t fill = next (s) | 1;

  memset (op_buf, fill, n);
  op_buf[0] = fill ^ 0x5a;              /* catch off-by-one offsets */
  if (qcow2_pwrite (img, op_buf, n, off, flags) == 0 &&
      same_cluster (off, n, cs) &&
      qcow2_pread (img, check_buf, n, off) == 0)
    check (memcmp (op_buf, check_buf, n) == 0, "write read-back", off, n);
}

static void
do_zero (struct qcow2_image *img, uint64_t *s, uint64_t off, uint64_t n)
{
  uint64_t r = next (s);
  unsigned flags = 0;

  if (r & 1)
    flags |= QCOW2_F_MAY_TRIM;
  if ((r & 6) == 0)
    flags |= QCOW2_F_FAST_ZERO;
  if ((r & 24) == 0)
    flags |= QCOW2_F_FUA;
  if (qcow2_zero (img, n, off, flags) == 0 &&
      qcow2_pread (img, check_buf, n, off) == 0) {
    uint64_t i;
    for (i = 0; i < n; i++)
      check (check_buf[i] == 0, "zero read-back", off + i, n);
  }
}

static void
do_ops (struct qcow2_image *img, uint64_t *s)
{
  uint64_t size = qcow2_get_size (img), cs = qcow2_cluster_size (img);
  int i;

  if (size == 0)
    return;
  for (i = 0; i < NR_OPS; i++) {
    uint64_t off, n, op = next (s) % 10;

    pick_range (s, size, cs, &off, &n);
    switch (op) {
    case 0: case 1: case 2: case 3:
      do_write (img, s, off, n, cs);
      break;
    case 4: case 5: case 6:
      do_zero (img, s, off, n);
      break;
    case 7: case 8:
      qcow2_trim (img, n, off, (next (s) & 1) ? QCOW2_F_FUA : 0);
      break;
    default:
      qcow2_flush (img);
      qcow2_prefetch (img, n, off);
    }
  }
}

/* After a successful flush, the bytes in the file must describe the
 * same disk as the live image: reopen them read-only and compare the
 * ranges read_disk would read (where both images can read them).
 */
static void
check_flushed (struct qcow2_image *img, struct qcow2_io *mem, uint64_t s)
{
  struct qcow2_config cfg = { .readonly = true, .no_locking = true };
  struct qcow2_io *io2;
  struct qcow2_image *img2;
  const uint8_t *bytes;
  uint64_t size = qcow2_get_size (img), off, n;
  size_t len;
  int i;

  if (qcow2_flush (img) == -1)
    return;
  bytes = qcow2_io_memory_data (mem, &len);
  io2 = qcow2_io_new_memory (bytes, len);
  if (io2 == NULL)
    return;
  img2 = qcow2_open_io (io2, "fuzz-reopened.qcow2", NULL, &cfg);
  if (img2 == NULL)
    return;
  check (qcow2_get_size (img2) == size, "reopened size", 0, size);
  for (i = 0; i < 16 && size > 0; i++) {
    pick_range (&s, size, qcow2_cluster_size (img), &off, &n);
    if (qcow2_pread (img, op_buf, n, off) == 0 &&
        qcow2_pread (img2, check_buf, n, off) == 0)
      check (memcmp (op_buf, check_buf, n) == 0, "flushed image read",
             off, n);
  }
  qcow2_close (img2);
}

struct extent_state {
  uint64_t next_off;
  uint64_t nr;
};

static int
extent_cb (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct extent_state *st = opaque;

  check (offset == st->next_off, "extent contiguity", offset, length);
  check (length > 0, "extent length", offset, length);
  check ((type & ~(QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO)) == 0,
         "extent type", offset, type);
  st->next_off = offset + length;
  if (++st->nr >= MAX_EXTENTS)
    return -1;                  /* enough: also tests the stop path */
  return 0;
}

static void
do_extents (struct qcow2_image *img, uint64_t *s)
{
  uint64_t size = qcow2_get_size (img), off, n;
  struct extent_state st = { 0, 0 };

  if (qcow2_extents (img, size, 0, false, extent_cb, &st) == 0)
    check (st.next_off == size, "extents cover the disk", 0, size);
  if (size == 0)
    return;
  pick_range (s, size, qcow2_cluster_size (img), &off, &n);
  st.next_off = off;
  st.nr = 0;
  if (qcow2_extents (img, n, off, true, extent_cb, &st) == 0)
    check (st.nr == 1 && st.next_off <= off + n, "req_one extents", off, n);
}

/* Every bitmap's dirty map: over the whole disk, tiled with valid
 * types, and one req_one extent of a random range.  A bitmap in use at
 * open must be refused.
 */
static void
do_bitmaps (struct qcow2_image *img, uint64_t *s)
{
  uint64_t size = qcow2_get_size (img), off, n;
  uint32_t i, nr = qcow2_nr_bitmaps (img);
  struct qcow2_bitmap_info info;
  struct extent_state st;
  int r;

  for (i = 0; i < nr; i++) {
    check (qcow2_bitmap_info (img, i, &info) == 0, "bitmap info", i, nr);
    st.next_off = 0;
    st.nr = 0;
    r = qcow2_bitmap_extents (img, i, size, 0, false, extent_cb, &st);
    if (info.in_use)
      check (r == -1, "in-use bitmap refused", i, nr);
    if (r == 0)
      check (st.next_off == size, "bitmap extents cover the disk", i, size);
    if (size == 0)
      continue;
    pick_range (s, size, qcow2_cluster_size (img), &off, &n);
    st.next_off = off;
    st.nr = 0;
    if (qcow2_bitmap_extents (img, i, n, off, true, extent_cb, &st) == 0)
      check (st.nr == 1 && st.next_off <= off + n, "req_one bitmap extents",
             off, n);
  }
}

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  setenv ("QCOW2_QUIET", "1", 1);
  chunk_buf = malloc (CHUNK);
  op_buf = malloc (MAX_OP_BYTES);
  check_buf = malloc (MAX_OP_BYTES);
  if (!chunk_buf || !op_buf || !check_buf)
    abort ();
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  uint64_t s = seed_of (data, size);
  struct qcow2_config cfg = {
    .readonly = false,
    .no_locking = true,
  };
  struct qcow2_io *io, *mem;
  struct qcow2_image *img;
  uint64_t r = next (&s);

  /* Small caches, so that eviction runs; vary slice size and the
   * overlap check a little.
   */
  cfg.l2_cache_size = (r & 1) ? 64 << 10 : 4 << 10;
  cfg.refcount_cache_size = (r & 2) ? 64 << 10 : 4 << 10;
  cfg.cache_entry_size = (r & 4) ? 512 : 0;
  cfg.overlap_check = (r & 0x18) == 0x18 ? QCOW2_OVERLAP_CACHED
                                         : QCOW2_OVERLAP_ALL;

  io = fuzz_io_new (data, size, &mem);
  if (io == NULL)
    return 0;
  img = qcow2_open_io (io, "fuzz.qcow2", NULL, &cfg);
  if (img == NULL)
    return 0;
  read_disk (img, &s);
  do_ops (img, &s);
  if (!qcow2_is_readonly (img))
    check_flushed (img, mem, next (&s));
  do_extents (img, &s);
  do_bitmaps (img, &s);
  read_disk (img, &s);
  qcow2_close (img);
  return 0;
}

#ifdef FUZZ_REPLAY_MAIN
/* Replay without libFuzzer: the files given, or every file in
 * $abs_top_srcdir/tests/fuzz-regressions.  A crash or abort fails.
 */
#include <dirent.h>
#include <sys/stat.h>

static void
replay (const char *path)
{
  FILE *fp = fopen (path, "rb");
  uint8_t *data = NULL;
  size_t len = 0, alloc = 0, r;

  if (fp == NULL) {
    perror (path);
    exit (EXIT_FAILURE);
  }
  do {
    if (len == alloc) {
      alloc = alloc ? 2 * alloc : 65536;
      data = realloc (data, alloc);
      if (data == NULL) {
        perror ("realloc");
        exit (EXIT_FAILURE);
      }
    }
    r = fread (data + len, 1, alloc - len, fp);
    len += r;
  } while (r > 0);
  fclose (fp);
  printf ("%s (%zu bytes)\n", path, len);
  fflush (stdout);
  LLVMFuzzerTestOneInput (data, len);
  free (data);
}

int
main (int argc, char *argv[])
{
  const char *top = getenv ("abs_top_srcdir");
  char dir[4096];
  struct dirent **names;
  int i, n;

  LLVMFuzzerInitialize (&argc, &argv);
  if (argc > 1) {
    for (i = 1; i < argc; i++)
      replay (argv[i]);
    return 0;
  }
  snprintf (dir, sizeof dir, "%s/tests/fuzz-regressions", top ? top : "..");
  n = scandir (dir, &names, NULL, alphasort);
  if (n == -1) {
    perror (dir);
    return EXIT_FAILURE;
  }
  for (i = 0; i < n; i++) {
    char path[8192];
    struct stat st;

    snprintf (path, sizeof path, "%s/%s", dir, names[i]->d_name);
    if (names[i]->d_name[0] != '.' && stat (path, &st) == 0 &&
        S_ISREG (st.st_mode))
      replay (path);
    free (names[i]);
  }
  free (names);
  free (chunk_buf);
  free (op_buf);
  free (check_buf);
  return 0;
}
#endif /* FUZZ_REPLAY_MAIN */
