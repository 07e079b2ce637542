/* nbdkit-qcow2: host file backends.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Two backends live here: the real file (positional I/O on an fd, safe
 * to call from many threads at once) and a growable memory file for the
 * unit tests and the fuzzer.  See io.h for the semantics both keep.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>

#include "io.h"

/* ---- file backend ---- */

static int
file_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = pread (io->fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {               /* past end of file: zeroes */
      memset (p, 0, count);
      return 0;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
file_pwrite (struct qcow2_io *io, const void *buf, size_t count,
             uint64_t offset)
{
  const char *p = buf;

  while (count > 0) {
    ssize_t r = pwrite (io->fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
file_flush (struct qcow2_io *io)
{
  return fdatasync (io->fd);
}

static int64_t
file_size (struct qcow2_io *io)
{
  struct stat st;

  if (fstat (io->fd, &st) == -1)
    return -1;
  if (S_ISBLK (st.st_mode)) {
    off_t end = lseek (io->fd, 0, SEEK_END);
    return end;
  }
  return st.st_size;
}

static int
file_truncate (struct qcow2_io *io, uint64_t size)
{
  return ftruncate (io->fd, size);
}

static int
file_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  int r = posix_fallocate (io->fd, offset, count);
  if (r != 0 && r != EOPNOTSUPP && r != EINVAL) {
    errno = r;
    return -1;
  }
  return 0;
}

/* On a disk file system the reserved range is unwritten extents, which
 * cost nothing until written and keep the file contiguous.  tmpfs has
 * no layout to keep and allocates (and clears) memory pages for the
 * whole range, including the parts of clusters a small write never
 * touches: measured there, 4 KiB allocating writes ran at half speed
 * with it.  So none on tmpfs or ramfs.
 *
 * A reservation is only worth having while space is plentiful: it must
 * never take the last free space, which the data (ours or anybody's)
 * needs.  So none unless RESERVE_FREE_FACTOR times as much is free.
 * fallocate can still fail part way (ENOSPC, when the space goes
 * meanwhile), and ext4 then keeps the blocks it had allocated: the
 * caller gives them back.
 */
#define RESERVE_FREE_FACTOR 4

static int
file_reserve (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  if (io->in_memory_fs) {
    errno = EOPNOTSUPP;
    return -1;
  }
#ifdef FALLOC_FL_KEEP_SIZE
  {
    struct statvfs fs;
    if (fstatvfs (io->fd, &fs) == 0 &&
        (uint64_t) fs.f_bavail * fs.f_frsize / RESERVE_FREE_FACTOR < count) {
      errno = ENOSPC;
      return -1;
    }
  }
  return fallocate (io->fd, FALLOC_FL_KEEP_SIZE, offset, count);
#else
  errno = EOPNOTSUPP;
  return -1;
#endif
}

static void
file_close (struct qcow2_io *io)
{
  close (io->fd);
  free (io);
}

static const struct qcow2_io_ops file_ops = {
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .size = file_size,
  .truncate = file_truncate,
  .preallocate = file_preallocate,
  .reserve = file_reserve,
  .close = file_close,
};

struct qcow2_io *
qcow2_io_from_fd (int fd, bool readonly)
{
  struct qcow2_io *io = calloc (1, sizeof *io);

  if (io == NULL)
    return NULL;
  io->ops = &file_ops;
  io->fd = fd;
  io->readonly = readonly;
  {
    struct statfs fs;
    if (fstatfs (fd, &fs) == 0 &&
        (fs.f_type == 0x01021994 /* TMPFS_MAGIC */ ||
         fs.f_type == 0x858458f6 /* RAMFS_MAGIC */))
      io->in_memory_fs = true;
  }
  return io;
}

struct qcow2_io *
qcow2_io_open_file (const char *path, bool readonly)
{
  int fd = open (path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  struct qcow2_io *io;

  if (fd == -1)
    return NULL;
  io = qcow2_io_from_fd (fd, readonly);
  if (io == NULL) {
    int e = errno;
    close (fd);
    errno = e;
  }
  return io;
}

/* ---- memory backend ---- */

struct mem_io {
  struct qcow2_io io;           /* must be first */
  pthread_mutex_t lock;
  uint8_t *data;
  size_t size, alloc;
};

static int
mem_reserve (struct mem_io *m, uint64_t end)
{
  if (end > SIZE_MAX / 2) {
    errno = EFBIG;
    return -1;
  }
  if (end > m->alloc) {
    size_t n = m->alloc ? m->alloc : 4096;
    uint8_t *p;
    while (n < end)
      n *= 2;
    p = realloc (m->data, n);
    if (p == NULL)
      return -1;
    memset (p + m->alloc, 0, n - m->alloc);
    m->data = p;
    m->alloc = n;
  }
  return 0;
}

static int
mem_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;
  size_t n = 0;

  pthread_mutex_lock (&m->lock);
  if (offset < m->size)
    n = count < m->size - offset ? count : m->size - offset;
  if (n)
    memcpy (buf, m->data + offset, n);
  memset ((char *) buf + n, 0, count - n);
  pthread_mutex_unlock (&m->lock);
  return 0;
}

static int
mem_pwrite (struct qcow2_io *io, const void *buf, size_t count,
            uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (offset + count < offset || mem_reserve (m, offset + count) == -1)
    r = -1;
  else {
    memcpy (m->data + offset, buf, count);
    if (offset + count > m->size)
      m->size = offset + count;
  }
  pthread_mutex_unlock (&m->lock);
  if (r == -1 && errno == 0)
    errno = EFBIG;
  return r;
}

static int
mem_flush (struct qcow2_io *io)
{
  return 0;
}

static int64_t
mem_size (struct qcow2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;
  int64_t r;

  pthread_mutex_lock (&m->lock);
  r = m->size;
  pthread_mutex_unlock (&m->lock);
  return r;
}

static int
mem_truncate (struct qcow2_io *io, uint64_t size)
{
  struct mem_io *m = (struct mem_io *) io;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (size > m->size) {
    if (mem_reserve (m, size) == -1)
      r = -1;
  }
  else
    memset (m->data + size, 0, m->size - size);
  if (r == 0)
    m->size = size;
  pthread_mutex_unlock (&m->lock);
  return r;
}

static void
mem_close (struct qcow2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;

  pthread_mutex_destroy (&m->lock);
  free (m->data);
  free (m);
}

static const struct qcow2_io_ops mem_ops = {
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .flush = mem_flush,
  .size = mem_size,
  .truncate = mem_truncate,
  .close = mem_close,
};

struct qcow2_io *
qcow2_io_new_memory (const void *data, size_t size)
{
  struct mem_io *m = calloc (1, sizeof *m);

  if (m == NULL)
    return NULL;
  m->io.ops = &mem_ops;
  m->io.fd = -1;
  pthread_mutex_init (&m->lock, NULL);
  if (mem_reserve (m, size) == -1) {
    free (m);
    return NULL;
  }
  if (size)
    memcpy (m->data, data, size);
  m->size = size;
  return &m->io;
}

const uint8_t *
qcow2_io_memory_data (struct qcow2_io *io, size_t *size)
{
  struct mem_io *m = (struct mem_io *) io;

  *size = m->size;
  return m->data;
}
