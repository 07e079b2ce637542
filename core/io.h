/* nbdkit-qcow2: the host file layer.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Everything core reads or writes goes through a struct qcow2_io, so the
 * tests can swap the file for memory or for a backend that fails or
 * records writes, and a qcow2 backing image is read as one (image.c).
 * Like SQLite's VFS, the layer is dumb: whole-buffer pread/pwrite,
 * flush, size, truncate.
 *
 * Semantics every backend keeps:
 *  - pread fills the whole buffer; bytes past end of file read as zero
 *    (like QEMU's file driver), so data clusters that lie beyond a
 *    truncated file read as zeros instead of failing.
 *  - pwrite writes the whole buffer, extending the file if needed.
 *  - Calls may come from several threads at once (pread/pwrite are
 *    positional and must be thread-safe).
 *  - flush makes durable what was written through THIS io object: the
 *    file backend skips the sync when nothing was written through it
 *    since the last successful sync began (io.c, "Skipped flushes"),
 *    so anything written to the same file another way must be flushed
 *    through its own io.
 *
 * The file backend can also be opened for direct I/O (O_DIRECT, the
 * cache=none family) and then keeps the same semantics for any offset,
 * length and buffer: callers never align anything (io.c explains how).
 */

#ifndef QCOW2_IO_H
#define QCOW2_IO_H

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <errno.h>

struct qcow2_io;

/* Call the ops through the io_* wrappers below. */
struct qcow2_io_ops {
  int (*pread) (struct qcow2_io *io, void *buf, size_t count,
                uint64_t offset);
  int (*pwrite) (struct qcow2_io *io, const void *buf, size_t count,
                 uint64_t offset);
  int (*flush) (struct qcow2_io *io);
  int64_t (*size) (struct qcow2_io *io);
  int (*truncate) (struct qcow2_io *io, uint64_t size);
  /* Optional: reserve space (fallocate).  NULL means "do nothing". */
  int (*preallocate) (struct qcow2_io *io, uint64_t count, uint64_t offset);
  /* Optional: reserve disk blocks past the end of the file without
   * changing its size (fallocate KEEP_SIZE): the file then grows into
   * them in large steps.  Advisory; NULL means "do nothing".  -1 with
   * EOPNOTSUPP or ENOSYS: never supported here (the file backend
   * refuses on tmpfs, see io.c).  -1 with another errno (ENOSPC: the
   * file backend also refuses when the file system is short of free
   * space): some of the blocks may have been reserved all the same;
   * truncating the file to its own size gives them back.  Never on a
   * block device (EOPNOTSUPP: it has no size to keep, nor to cut back).
   */
  int (*reserve) (struct qcow2_io *io, uint64_t count, uint64_t offset);
  void (*close) (struct qcow2_io *io);
};

struct qcow2_io {
  const struct qcow2_io_ops *ops;
  int fd;                       /* the file descriptor, or -1 */
  bool readonly;
  bool in_memory_fs;            /* on tmpfs or ramfs: no reserve */
  bool blockdev;                /* a block device: it cannot grow, so
                                   nothing goes past its end (see
                                   refcount.c), no reserve */
  bool direct;                  /* file opened with O_DIRECT */
  bool evict;                   /* buffered, but written ranges are
                                   dropped from the page cache */
  bool no_sync;                 /* flush is a no-op (cache=unsafe) */
  uint32_t align;               /* direct: offset and length alignment */
  uint32_t mem_align;           /* direct: buffer alignment */
};

/* Modes for qcow2_io_open_file_mode, or-ed together. */
#define QCOW2_IO_DIRECT   (1 << 0)  /* O_DIRECT, or fail with EINVAL */
#define QCOW2_IO_AUTO     (1 << 1)  /* O_DIRECT if the file system has
                                       it, else buffered with eviction */
#define QCOW2_IO_NO_SYNC  (1 << 2)  /* flush does nothing */

/* Open a file.  readonly: O_RDONLY.  Returns NULL with errno set. */
extern struct qcow2_io *qcow2_io_open_file (const char *path, bool readonly);

/* The same with a cache mode (QCOW2_IO_*).  With QCOW2_IO_DIRECT on a
 * file system without direct I/O this fails with EINVAL after saying
 * so (nbdkit_error); QCOW2_IO_AUTO says what it chose (nbdkit_debug).
 */
extern struct qcow2_io *qcow2_io_open_file_mode (const char *path,
                                                 bool readonly,
                                                 unsigned mode);

/* For the tests: the direct I/O layer of the file backend (bounce
 * buffers, read-modify-writes, stripes) over another io, which it owns
 * (and closes even when this fails), as if that io were a file opened
 * with O_DIRECT needing offsets and lengths aligned to align and
 * buffers to mem_align (powers of 2, mem_align <= align <= 65536): it
 * passes on only such reads and writes.  Flush, size, truncate and
 * reserve go straight to the lower io.
 */
extern struct qcow2_io *qcow2_io_direct_over (struct qcow2_io *lower,
                                              uint32_t align,
                                              uint32_t mem_align);

/* An io over an existing fd, which the io then owns. */
extern struct qcow2_io *qcow2_io_from_fd (int fd, bool readonly);

/* A growable memory file, initially a copy of data[0..size). */
extern struct qcow2_io *qcow2_io_new_memory (const void *data, size_t size);
/* Borrow the current contents of a memory io (valid until next write). */
extern const uint8_t *qcow2_io_memory_data (struct qcow2_io *io,
                                            size_t *size);

static inline int
io_pread (struct qcow2_io *io, void *buf, size_t count, uint64_t offset)
{
  return io->ops->pread (io, buf, count, offset);
}

static inline int
io_pwrite (struct qcow2_io *io, const void *buf, size_t count,
           uint64_t offset)
{
  return io->ops->pwrite (io, buf, count, offset);
}

static inline int
io_flush (struct qcow2_io *io)
{
  return io->ops->flush (io);
}

static inline int64_t
io_size (struct qcow2_io *io)
{
  return io->ops->size (io);
}

/* Every backend has truncate; a missing one is an error all the same. */
static inline int
io_truncate (struct qcow2_io *io, uint64_t size)
{
  if (io->ops->truncate == NULL) {
    errno = EOPNOTSUPP;
    return -1;
  }
  return io->ops->truncate (io, size);
}

/* Without the op there is nothing to preallocate with: success, as the
 * op's own "not supported" is (see file_preallocate).
 */
static inline int
io_preallocate (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  if (io->ops->preallocate == NULL)
    return 0;
  return io->ops->preallocate (io, count, offset);
}

/* Without the op: -1 with EOPNOTSUPP, "never supported here", which
 * tells the caller to stop trying.
 */
static inline int
io_reserve (struct qcow2_io *io, uint64_t count, uint64_t offset)
{
  if (io->ops->reserve == NULL) {
    errno = EOPNOTSUPP;
    return -1;
  }
  return io->ops->reserve (io, count, offset);
}

/* Widen a write of [*start, *end), a piece of a structure the caller
 * holds whole in memory at [lo, hi) (lo <= *start, *end <= hi), to
 * whole blocks of the direct I/O alignment as far as the structure
 * goes, so that io.c writes those blocks without reading them first
 * (only a block the structure covers in part is still read).  For
 * buffered I/O the write is left as it is.
 */
static inline void
io_widen_write (const struct qcow2_io *io, uint64_t *start, uint64_t *end,
                uint64_t lo, uint64_t hi)
{
  uint64_t mask, s, e;

  if (!io->direct || io->align <= 1)
    return;
  mask = (uint64_t) io->align - 1;
  s = *start & ~mask;
  e = *end > UINT64_MAX - mask ? hi : (*end + mask) & ~mask;
  *start = s > lo ? s : lo;
  *end = e < hi ? e : hi;
}

/* Ask the kernel to start writing the file's dirty pages back, and
 * start an early sync (io.c: "Early syncs"; queued if one is running),
 * without waiting for either: a hint, whose failure changes nothing
 * (an early sync's error is reported by the next flush of the io).
 * Only for a file io that is synced at all (not no_sync); the
 * write-back part only in the page cache and not when evicting (which
 * starts write-back itself).  Nothing for a memory io or a direct io
 * over another io.
 */
extern void io_start_writeback (struct qcow2_io *io);

/* The file descriptor, for locks and identity checks, or -1. */
static inline int
io_fd (const struct qcow2_io *io)
{
  return io->fd;
}

static inline void
io_close (struct qcow2_io *io)
{
  if (io)
    io->ops->close (io);
}

#endif /* QCOW2_IO_H */
