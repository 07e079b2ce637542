/* nbdkit-qcow2 bench: count a server's file system calls (LD_PRELOAD).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * For bench/syscount.sh, where neither strace nor perf's syscall
 * tracepoints are available: wraps pread, pwrite, fdatasync, fsync,
 * fallocate and ftruncate, counts the calls (reads and writes also by
 * size: 512, 4096, whole multiples of 4096, other) and at exit appends
 * one line to $SYSCOUNT_OUT (default stderr).  Not part of the plugin.
 *
 *   cc -shared -fPIC -O2 -o syscount.so syscount-preload.c -ldl
 *   LD_PRELOAD=./syscount.so SYSCOUNT_OUT=counts.txt nbdkit ...
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/types.h>

enum { R512, R4K, RMUL, ROTHER, NR_SIZES };
static uint64_t reads[NR_SIZES], writes[NR_SIZES];
static uint64_t n_fdatasync, n_fsync, n_fallocate, n_ftruncate;

static int
size_class (size_t n)
{
  if (n == 512)
    return R512;
  if (n == 4096)
    return R4K;
  if (n % 4096 == 0)
    return RMUL;
  return ROTHER;
}

#define COUNT(v) __atomic_add_fetch (&(v), 1, __ATOMIC_RELAXED)
#define NEXT(name) \
  static __typeof__ (name) *real; \
  if (real == NULL) real = (__typeof__ (name) *) dlsym (RTLD_NEXT, #name)

ssize_t
pread (int fd, void *buf, size_t n, off_t off)
{
  NEXT (pread);
  COUNT (reads[size_class (n)]);
  return real (fd, buf, n, off);
}

ssize_t
pread64 (int fd, void *buf, size_t n, off_t off)
{
  NEXT (pread64);
  COUNT (reads[size_class (n)]);
  return real (fd, buf, n, off);
}

ssize_t
pwrite (int fd, const void *buf, size_t n, off_t off)
{
  NEXT (pwrite);
  COUNT (writes[size_class (n)]);
  return real (fd, buf, n, off);
}

ssize_t
pwrite64 (int fd, const void *buf, size_t n, off_t off)
{
  NEXT (pwrite64);
  COUNT (writes[size_class (n)]);
  return real (fd, buf, n, off);
}

int
fdatasync (int fd)
{
  NEXT (fdatasync);
  COUNT (n_fdatasync);
  return real (fd);
}

int
fsync (int fd)
{
  NEXT (fsync);
  COUNT (n_fsync);
  return real (fd);
}

int
fallocate (int fd, int mode, off_t off, off_t len)
{
  NEXT (fallocate);
  COUNT (n_fallocate);
  return real (fd, mode, off, len);
}

int
ftruncate (int fd, off_t len)
{
  NEXT (ftruncate);
  COUNT (n_ftruncate);
  return real (fd, len);
}

static void __attribute__ ((destructor))
report (void)
{
  const char *path = getenv ("SYSCOUNT_OUT");
  FILE *fp = path ? fopen (path, "a") : stderr;

  if (fp == NULL)
    return;
  fprintf (fp, "%s: pread %lu (512: %lu, 4096: %lu, n*4096: %lu, other: %lu) "
           "pwrite %lu (512: %lu, 4096: %lu, n*4096: %lu, other: %lu) "
           "fdatasync %lu fsync %lu fallocate %lu ftruncate %lu\n",
           program_invocation_short_name,
           (unsigned long) (reads[0] + reads[1] + reads[2] + reads[3]),
           (unsigned long) reads[0], (unsigned long) reads[1],
           (unsigned long) reads[2], (unsigned long) reads[3],
           (unsigned long) (writes[0] + writes[1] + writes[2] + writes[3]),
           (unsigned long) writes[0], (unsigned long) writes[1],
           (unsigned long) writes[2], (unsigned long) writes[3],
           (unsigned long) n_fdatasync, (unsigned long) n_fsync,
           (unsigned long) n_fallocate, (unsigned long) n_ftruncate);
  if (fp != stderr)
    fclose (fp);
}
