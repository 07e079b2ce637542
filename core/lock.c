/* nbdkit-qcow2: image locking that interoperates with QEMU.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * QEMU's file driver publishes, for every image file it has open, which
 * block-layer permissions it uses and which it refuses to share with
 * anyone else, as shared (F_RDLCK) locks on single bytes of the file:
 *
 *   byte 100 + i   held by every opener that uses permission i
 *   byte 200 + i   held by every opener that does not share permission i
 *
 *   i = 0 "consistent read", 1 "write", 2 "write unchanged", 3 "resize"
 *
 * (QEMU's BLK_PERM_* bits 0x1, 0x2, 0x4, 0x8.  QEMU 6.1 and older also
 * had bit 4, "graph-mod"; QEMU 6.2 and later no longer look at bytes 104
 * and 204, and neither do we.)  The locks are advisory, so they stop
 * no I/O to those bytes of the header, and read locks, so any number of
 * openers hold each byte at once.  A conflict is another holder, found
 * with F_OFD_GETLK asking for a write lock (which ignores our own
 * locks):
 *
 *   - for every permission we use, nobody may hold its "unshared" byte;
 *   - for every permission we do not share, nobody may hold its "used"
 *     byte.
 *
 * Like QEMU we take our bytes first and test second: of two openers
 * that race, at least one sees the other, so they never both succeed
 * (they may both fail, which is safe).
 *
 * What we take is what QEMU 7.2's qemu-nbd takes for the same file,
 * read off /proc/locks (qemu-nbd and qemu-io share everything at the
 * top of their graphs; the qcow2 driver never shares write or resize
 * on the file holding its metadata):
 *
 *   file                        uses (100+i)   does not share (200+i)
 *   qcow2 image, writable       100 101 103    201 203
 *   qcow2 image, read-only      100            201 203
 *   qcow2 backing file          100            201 203  (read-only image)
 *   raw backing file            100            -
 *   external data file, rw      100 101 103    203
 *   external data file, ro      100            203
 *
 * So, as with QEMU: one writer or any number of readers per image; a
 * reader refuses an image that has a writer, and a writer an image that
 * has a reader.  Openers that force-share (qemu-img info -U) take no
 * "unshared" bytes and conflict with nobody.
 *
 * The locks are Linux open file description locks, like QEMU's: they
 * belong to the open file description behind io->fd, so every thread
 * sees the same locks, they survive fork (nbdkit daemonising), and
 * they go away when the last descriptor is closed, so there is no
 * unlock call.  (POSIX process-associated locks would be dropped when
 * any descriptor of the file was closed anywhere in the process.)
 *
 * A call sets the bytes of the role exactly, releasing the bytes of
 * any earlier role, so calling lock_image_file (io, name, false) on an
 * io locked writable downgrades it.  (The checks run again; they can
 * only fail against an opener racing us, which then fails too.)  On
 * failure every lock byte of the file is released.
 *
 * XXX A file that appears twice in one chain (say, as the backing file
 * and the data file) conflicts with itself, as in QEMU.
 * XXX Without OFD locks (not Linux) every call fails: use locking=off.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "internal.h"

/* QEMU's BLK_PERM_* bits; bit 2 (0x04) is "write unchanged", which no
 * role here uses or refuses to share.
 */
#define PERM_CONSISTENT_READ  0x01
#define PERM_WRITE            0x02
#define PERM_RESIZE           0x08

#ifdef F_OFD_SETLK

#define NR_PERMS              4
#define LOCK_PERM_BASE        100
#define LOCK_SHARED_BASE      200

static const char *const perm_name[NR_PERMS] = {
  "consistent read", "write", "write unchanged", "resize",
};

static int
set_byte (int fd, int byte, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };

  return fcntl (fd, F_OFD_SETLK, &fl);
}

/* Does another open file description hold a lock on 'byte'?  Returns
 * 1 if so, 0 if not, -1 on error.
 */
static int
held_by_other (int fd, int byte)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };

  if (fcntl (fd, F_OFD_GETLK, &fl) == -1)
    return -1;
  return fl.l_type != F_UNLCK;
}

static void
release_all (int fd)
{
  int e = errno;
  int i;

  for (i = 0; i < NR_PERMS; i++) {
    set_byte (fd, LOCK_PERM_BASE + i, F_UNLCK);
    set_byte (fd, LOCK_SHARED_BASE + i, F_UNLCK);
  }
  errno = e;
}

static int
lock_error (int fd, const char *name, int byte)
{
  nbdkit_error ("%s: cannot lock byte %d: %m (use locking=off if the file "
                "system does not support locks)", name, byte);
  release_all (fd);
  return -1;
}

/* Someone else holds 'byte'.  The wording is QEMU's, so that a search
 * for either program's message finds the other.
 */
static int
conflict (int fd, const char *name, int byte, bool shared, int i)
{
  nbdkit_error ("%s: Failed to get %s\"%s\" lock: lock byte %d is held, "
                "the file is in use: is another process (qemu, nbdkit) "
                "using the image?",
                name, shared ? "shared " : "", perm_name[i], byte);
  release_all (fd);
  errno = EBUSY;
  return -1;
}

/* Setting 'byte' failed.  Only a write lock on it refuses our read
 * lock: some other program's scheme, not QEMU's, but a conflict still.
 */
static int
set_failed (int fd, const char *name, int byte, int i)
{
  if (errno == EAGAIN || errno == EACCES)
    return conflict (fd, name, byte, byte >= LOCK_SHARED_BASE, i);
  return lock_error (fd, name, byte);
}

/* Hold exactly the bytes of (perm, unshared), then check for others. */
static int
apply_role (struct qcow2_io *io, const char *name, unsigned perm,
            unsigned unshared)
{
  int fd = io_fd (io);
  int i, r;

  if (fd == -1)
    return 0;
  nbdkit_debug ("%s: locking: uses %#x, does not share %#x",
                name, perm, unshared);

  for (i = 0; i < NR_PERMS; i++) {
    short used = perm & (1u << i) ? F_RDLCK : F_UNLCK;
    short unshare = unshared & (1u << i) ? F_RDLCK : F_UNLCK;

    if (set_byte (fd, LOCK_PERM_BASE + i, used) == -1)
      return set_failed (fd, name, LOCK_PERM_BASE + i, i);
    if (set_byte (fd, LOCK_SHARED_BASE + i, unshare) == -1)
      return set_failed (fd, name, LOCK_SHARED_BASE + i, i);
  }

  /* Permissions we use: nobody may refuse to share them. */
  for (i = 0; i < NR_PERMS; i++) {
    if (!(perm & (1u << i)))
      continue;
    r = held_by_other (fd, LOCK_SHARED_BASE + i);
    if (r == -1)
      return lock_error (fd, name, LOCK_SHARED_BASE + i);
    if (r)
      return conflict (fd, name, LOCK_SHARED_BASE + i, false, i);
  }
  /* Permissions we do not share: nobody may be using them. */
  for (i = 0; i < NR_PERMS; i++) {
    if (!(unshared & (1u << i)))
      continue;
    r = held_by_other (fd, LOCK_PERM_BASE + i);
    if (r == -1)
      return lock_error (fd, name, LOCK_PERM_BASE + i);
    if (r)
      return conflict (fd, name, LOCK_PERM_BASE + i, true, i);
  }
  return 0;
}

#else /* !F_OFD_SETLK */

static int
apply_role (struct qcow2_io *io, const char *name, unsigned perm,
            unsigned unshared)
{
  (void) perm;
  (void) unshared;
  if (io_fd (io) == -1)
    return 0;
  nbdkit_error ("%s: image locking needs Linux open file description "
                "locks: use locking=off", name);
  errno = ENOTSUP;
  return -1;
}

#endif /* !F_OFD_SETLK */

int
lock_image_file (struct qcow2_io *io, const char *name, bool writable)
{
  unsigned perm = PERM_CONSISTENT_READ;

  if (writable)
    perm |= PERM_WRITE | PERM_RESIZE;
  return apply_role (io, name, perm, PERM_WRITE | PERM_RESIZE);
}

int
lock_shared_file (struct qcow2_io *io, const char *name)
{
  return apply_role (io, name, PERM_CONSISTENT_READ, 0);
}

int
lock_data_file (struct qcow2_io *io, const char *name, bool writable)
{
  unsigned perm = PERM_CONSISTENT_READ;

  if (writable)
    perm |= PERM_WRITE | PERM_RESIZE;
  return apply_role (io, name, perm, PERM_RESIZE);
}
