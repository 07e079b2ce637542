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
 *  3. flush, size and truncate.
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

  io_close (fio);
  io_close (mem);
  unlink (path);
  return 0;
}
