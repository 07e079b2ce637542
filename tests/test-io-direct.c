/* nbdkit-qcow2: unit test of core/io.c's direct I/O (cache=none).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * A file in $TMPDIR (default /tmp) is opened with QCOW2_IO_DIRECT and
 * must behave exactly like the memory backend, whatever the offset,
 * length and buffer alignment:
 *  1. random reads and writes, 1 byte to 40 KiB, from buffers at odd
 *     addresses, reads past end of file reading zeroes, compared with
 *     a memory io given the same writes;
 *  2. eight threads writing 1-16 byte pieces of their own bytes into
 *     the same blocks (read-modify-writes that must not lose each
 *     other's bytes) while a ninth reads, then every byte checked;
 *  3. flush, size and truncate;
 *  4. skipped flushes, over the direct layer over a counting "disk":
 *     no sync when nothing was written since the last one began, a
 *     sync after any write, truncate or failed sync, and from four
 *     threads writing and flushing at once, every write made before a
 *     flush durable when it returns.
 * Where $TMPDIR has no direct I/O (tmpfs) QCOW2_IO_DIRECT must be
 * refused with EINVAL, and the same run uses QCOW2_IO_AUTO (buffered
 * with eviction) instead.  test-cache-modes.sh covers 4 KiB sectors.
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
#include <pthread.h>
#include <unistd.h>
#include <inttypes.h>

#undef NDEBUG
#include <assert.h>

#include "io.h"

#define SPAN (256 * 1024)       /* the region the tests write */
#define NTHREADS 8
#define PIECE 16                /* thread t owns pieces t, t+8, ... */

static struct qcow2_io *fio;

static uint32_t
rnd (uint32_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 17;
  *s ^= *s << 5;
  return *s;
}

static void
random_ops (struct qcow2_io *mem)
{
  static uint8_t a[48 * 1024 + 64], b[48 * 1024 + 64];
  uint32_t s = 12345;
  int i;

  for (i = 0; i < 3000; i++) {
    uint32_t len = 1 + rnd (&s) % (i % 10 == 0 ? 40960 : 600);
    uint64_t off = rnd (&s) % (SPAN + 8192);
    size_t skew = rnd (&s) % 64;
    uint32_t j;

    if (rnd (&s) % 2) {
      for (j = 0; j < len; j++)
        a[skew + j] = rnd (&s);
      assert (io_pwrite (fio, a + skew, len, off) == 0);
      assert (io_pwrite (mem, a + skew, len, off) == 0);
    }
    else {
      memset (a, 0xee, sizeof a);
      memset (b, 0xdd, sizeof b);
      assert (io_pread (fio, a + skew, len, off) == 0);
      assert (io_pread (mem, b, len, off) == 0);
      if (memcmp (a + skew, b, len) != 0) {
        fprintf (stderr, "read %" PRIu32 " bytes at %" PRIu64 " differs\n",
                 len, off);
        abort ();
      }
    }
  }
}

static void *
writer (void *arg)
{
  unsigned t = (uintptr_t) arg;
  uint32_t s = 777 + t;
  uint8_t buf[PIECE + 1];
  int i;

  for (i = 0; i < 4000; i++) {
    uint64_t piece = (rnd (&s) % (SPAN / PIECE / NTHREADS)) * NTHREADS + t;
    uint32_t start = rnd (&s) % PIECE;
    uint32_t len = 1 + rnd (&s) % (PIECE - start);
    uint64_t off = piece * PIECE + start;

    memset (buf + (i & 1), (uint8_t) (off * 7 + 1), len);
    assert (io_pwrite (fio, buf + (i & 1), len, off) == 0);
  }
  return NULL;
}

static void *
reader (void *arg)
{
  static __thread uint8_t buf[8192];
  uint32_t s = 99;
  int i;

  (void) arg;
  for (i = 0; i < 2000; i++)
    assert (io_pread (fio, buf + 1, 1 + rnd (&s) % 8000,
                      rnd (&s) % SPAN) == 0);
  return NULL;
}

/* Replay every writer's pieces into expect (order does not matter:
 * writers own disjoint bytes).
 */
static void
expected (uint8_t *expect)
{
  unsigned t;

  for (t = 0; t < NTHREADS; t++) {
    uint32_t s = 777 + t;
    int i;
    for (i = 0; i < 4000; i++) {
      uint64_t piece = (rnd (&s) % (SPAN / PIECE / NTHREADS)) * NTHREADS + t;
      uint32_t start = rnd (&s) % PIECE;
      uint32_t len = 1 + rnd (&s) % (PIECE - start);
      uint64_t off = piece * PIECE + start;
      memset (expect + off, (uint8_t) (off * 7 + 1), len);
    }
  }
}

static void
threads (void)
{
  pthread_t th[NTHREADS + 1];
  uint8_t *got = malloc (SPAN), *expect = malloc (SPAN);
  uintptr_t t;
  size_t i;

  assert (got && expect);
  assert (io_pread (fio, expect, SPAN, 0) == 0);
  expected (expect);
  for (t = 0; t < NTHREADS; t++)
    assert (pthread_create (&th[t], NULL, writer, (void *) t) == 0);
  assert (pthread_create (&th[NTHREADS], NULL, reader, NULL) == 0);
  for (t = 0; t <= NTHREADS; t++)
    assert (pthread_join (th[t], NULL) == 0);
  assert (io_pread (fio, got, SPAN, 0) == 0);
  for (i = 0; i < SPAN; i++) {
    if (got[i] != expect[i]) {
      fprintf (stderr, "byte %zu: %#x, expected %#x (a lost "
               "read-modify-write?)\n", i, got[i], expect[i]);
      abort ();
    }
  }
  free (got);
  free (expect);
}

static void
sizes (void)
{
  uint8_t buf[100];

  assert (io_flush (fio) == 0);
  assert (io_truncate (fio, 1000) == 0);
  assert (io_size (fio) == 1000);
  /* Across the end of the file: zeroes after it. */
  memset (buf, 1, sizeof buf);
  assert (io_pread (fio, buf, sizeof buf, 950) == 0);
  assert (buf[49] != 1 || buf[50] == 0);
  assert (buf[50] == 0 && buf[99] == 0);
  assert (io_pread (fio, buf, sizeof buf, 1 << 20) == 0);
  assert (buf[0] == 0 && buf[99] == 0);
  /* A small write past the end extends the file to at least it. */
  assert (io_pwrite (fio, "xyz", 3, 5000) == 0);
  assert (io_size (fio) >= 5003);
  assert (io_pread (fio, buf, 5, 4999) == 0);
  assert (memcmp (buf, "\0xyz", 4) == 0);
  assert (io_flush (fio) == 0);
}

/* ---- skipped flushes (io.c: "Skipped flushes") ----
 *
 * The direct layer over a "disk" io that counts its syncs and keeps,
 * per write it completed, whether a sync that began after it has
 * completed since: every write that returned before a flush was
 * called must be durable when that flush returns 0, however many
 * syncs the layer skips.
 */

struct disk_io {
  struct qcow2_io io;           /* must be first */
  struct qcow2_io *mem;
  uint64_t done;                /* writes completed (atomic) */
  uint64_t durable;             /* writes [1, durable] synced (atomic) */
  uint64_t syncs;               /* syncs called (atomic) */
  bool fail;                    /* the next sync fails (EIO) */
  void (*during) (void);        /* runs inside the next sync */
};

static __thread uint64_t last_seq;      /* this thread's last write */

static int
disk_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  return io_pread (((struct disk_io *) io)->mem, buf, count, offset);
}

static int
disk_pwrite (struct qcow2_io *io, const void *buf, size_t count,
             uint64_t offset)
{
  struct disk_io *d = (struct disk_io *) io;

  if (io_pwrite (d->mem, buf, count, offset) == -1)
    return -1;
  last_seq = __atomic_add_fetch (&d->done, 1, __ATOMIC_SEQ_CST);
  return 0;
}

static int
disk_flush (struct qcow2_io *io)
{
  struct disk_io *d = (struct disk_io *) io;
  uint64_t start = __atomic_load_n (&d->done, __ATOMIC_SEQ_CST);
  uint64_t cur;
  void (*during) (void) = d->during;

  __atomic_add_fetch (&d->syncs, 1, __ATOMIC_SEQ_CST);
  d->during = NULL;
  if (during)
    during ();
  if (d->fail) {
    d->fail = false;
    errno = EIO;
    return -1;
  }
  cur = __atomic_load_n (&d->durable, __ATOMIC_SEQ_CST);
  while (cur < start &&
         !__atomic_compare_exchange_n (&d->durable, &cur, start, false,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  return 0;
}

static int64_t
disk_size (struct qcow2_io *io)
{
  return io_size (((struct disk_io *) io)->mem);
}

static int
disk_truncate (struct qcow2_io *io, uint64_t size)
{
  struct disk_io *d = (struct disk_io *) io;

  if (io_truncate (d->mem, size) == -1)
    return -1;
  last_seq = __atomic_add_fetch (&d->done, 1, __ATOMIC_SEQ_CST);
  return 0;
}

static void
disk_close (struct qcow2_io *io)
{
  io_close (((struct disk_io *) io)->mem);
  free (io);
}

static const struct qcow2_io_ops disk_ops = {
  .pread = disk_pread, .pwrite = disk_pwrite, .flush = disk_flush,
  .size = disk_size, .truncate = disk_truncate, .close = disk_close,
};

static struct disk_io *disk;
static struct qcow2_io *over;

static uint64_t
syncs (void)
{
  return __atomic_load_n (&disk->syncs, __ATOMIC_SEQ_CST);
}

/* A write that completes while a sync is running (it raced with it). */
static void
racing_write (void)
{
  assert (io_pwrite (over, "race", 4, 8192) == 0);
}

#define GEN_THREADS 4
#define GEN_ROUNDS 3000

/* Write, flush, check the write is durable; every 4th round flushes
 * twice (the second one may be skipped, and must still find the write
 * durable).
 */
static void *
gen_worker (void *arg)
{
  uintptr_t t = (uintptr_t) arg;
  uint32_t s = 4242 + t;
  static __thread uint8_t block[512] __attribute__ ((aligned (512)));
  int i, j;

  for (i = 0; i < GEN_ROUNDS; i++) {
    uint64_t mine;

    memset (block, i, sizeof block);
    /* Aligned (no read-modify-write) or not, in this thread's own
     * blocks.
     */
    if (rnd (&s) % 2)
      assert (io_pwrite (over, block, 512,
                         (t * 64 + rnd (&s) % 64) * 512) == 0);
    else
      assert (io_pwrite (over, block, 100,
                         (t * 64 + rnd (&s) % 64) * 512 + 7) == 0);
    mine = last_seq;
    for (j = 0; j < (i % 4 == 0 ? 2 : 1); j++) {
      assert (io_flush (over) == 0);
      if (__atomic_load_n (&disk->durable, __ATOMIC_SEQ_CST) < mine) {
        fprintf (stderr, "flush returned, but write %" PRIu64 " is not "
                 "durable (synced up to %" PRIu64 ")\n", mine,
                 __atomic_load_n (&disk->durable, __ATOMIC_SEQ_CST));
        abort ();
      }
    }
  }
  return NULL;
}

static void
flush_generation (void)
{
  pthread_t th[GEN_THREADS];
  uint64_t n;
  uintptr_t t;

  disk = calloc (1, sizeof *disk);
  assert (disk);
  disk->io.ops = &disk_ops;
  disk->io.fd = -1;
  disk->mem = qcow2_io_new_memory (NULL, 0);
  assert (disk->mem);
  over = qcow2_io_direct_over (&disk->io, 512, 512);
  assert (over);

  /* The first flush of an io always syncs (the file may hold writes
   * made before it was opened); flushes with nothing written between
   * them do not.
   */
  assert (io_flush (over) == 0 && syncs () == 1);
  assert (io_flush (over) == 0 && syncs () == 1);
  assert (io_flush (over) == 0 && syncs () == 1);
  /* A write between two flushes makes the second one sync.  (An
   * unaligned write is a read-modify-write below: one write.)
   */
  assert (io_pwrite (over, "a", 1, 100) == 0);
  assert (io_flush (over) == 0 && syncs () == 2);
  assert (io_flush (over) == 0 && syncs () == 2);
  assert (disk->durable == disk->done);
  /* So does a truncate, and a preallocate (the disk has none: the
   * call is still a change for all the layer knows).
   */
  assert (io_truncate (over, 4096) == 0);
  assert (io_flush (over) == 0 && syncs () == 3);
  assert (io_preallocate (over, 512, 4096) == 0);
  assert (io_flush (over) == 0 && syncs () == 4);
  assert (io_flush (over) == 0 && syncs () == 4);
  /* A failed sync marks nothing synced: the next flush syncs again. */
  assert (io_pwrite (over, "b", 1, 200) == 0);
  disk->fail = true;
  assert (io_flush (over) == -1 && errno == EIO && syncs () == 5);
  assert (io_flush (over) == 0 && syncs () == 6);
  assert (io_flush (over) == 0 && syncs () == 6);
  assert (disk->durable == disk->done);
  /* A write that completes while a sync runs is not covered by it:
   * the next flush must sync (the generation is read before the sync
   * begins, not after).
   */
  assert (io_pwrite (over, "c", 1, 300) == 0);
  disk->during = racing_write;
  assert (io_flush (over) == 0 && syncs () == 7);
  assert (disk->durable < disk->done);
  assert (io_flush (over) == 0 && syncs () == 8);
  assert (disk->durable == disk->done);
  /* A failed write may have landed in part: it counts as a write. */
  assert (io_pwrite (over, "d", 1, UINT64_MAX - 2) == -1);
  assert (io_flush (over) == 0 && syncs () == 9);

  /* Threads writing and flushing at once: every flush that returns
   * covers the write its thread made before it, and flushes that find
   * nothing new are skipped.
   */
  n = syncs ();
  for (t = 0; t < GEN_THREADS; t++)
    assert (pthread_create (&th[t], NULL, gen_worker, (void *) t) == 0);
  for (t = 0; t < GEN_THREADS; t++)
    assert (pthread_join (th[t], NULL) == 0);
  printf ("flush generation: %d flushes from %d threads, %" PRIu64
          " syncs\n", GEN_THREADS * GEN_ROUNDS * 5 / 4, GEN_THREADS,
          syncs () - n);
  assert (syncs () - n <= GEN_THREADS * GEN_ROUNDS * 5 / 4);
  io_close (over);
}

int
main (void)
{
  const char *dir = getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp";
  char path[4096];
  struct qcow2_io *mem;
  int fd;

  snprintf (path, sizeof path, "%s/test-io-direct.XXXXXX", dir);
  fd = mkstemp (path);
  assert (fd != -1);
  close (fd);

  fio = qcow2_io_open_file_mode (path, false, QCOW2_IO_DIRECT);
  if (fio == NULL) {
    assert (errno == EINVAL);
    printf ("%s: no direct I/O here: testing cache=auto's eviction\n", dir);
    fio = qcow2_io_open_file_mode (path, false, QCOW2_IO_AUTO);
    assert (fio && !fio->direct && fio->evict);
  }
  else {
    assert (fio->direct);
    printf ("%s: direct I/O, alignment %" PRIu32 ", buffers %" PRIu32 "\n",
            dir, fio->align, fio->mem_align);
  }
  mem = qcow2_io_new_memory (NULL, 0);
  assert (mem);

  random_ops (mem);
  threads ();
  sizes ();
  flush_generation ();

  io_close (fio);
  io_close (mem);
  unlink (path);
  return 0;
}
