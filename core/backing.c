/* nbdkit-qcow2: backing files and the external data file.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * This file finds, checks, opens and locks *files*; it opens no image.
 * The format of a backing file comes from the backing format extension
 * when the image has one, otherwise from the file's magic, as qemu-img
 * does.  Relative names are resolved against the directory of the image
 * that names them, not the server's working directory.
 *
 * A raw backing file is read through its own io.  A qcow2 one is opened
 * read-only as another struct qcow2_image by image.c (so chains of any
 * depth work the same way), which hands it back as a struct qcow2_io
 * whose pread is the backing image's guest read.  So backing_read reads
 * both kinds alike, and neither this file nor cluster.c, which calls
 * it, calls back up into image.c:
 *
 *   cluster_read_run -> backing_read -> io_pread (img->backing_io)
 *                                     raw: the file
 *                                     qcow2: image.c -> qcow2_pread
 *                                            (the backing image)
 *
 * Loops (an image that is its own backing file, directly or further
 * down) are caught by comparing device and inode with every image
 * further up the chain; MAX_BACKING_DEPTH bounds the chain anyway.
 *
 * A backing file shorter than the image reads as zeros past its end.
 *
 * Locking: opening happens before the image is shared; backing_read
 * needs no lock (the backing image has its own).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "internal.h"

/* Resolve 'name' relative to 'dir' (which may be NULL). */
static char *
resolve (const char *dir, const char *name)
{
  char *path;

  if (name[0] == '/' || dir == NULL)
    return strdup (name);
  if (asprintf (&path, "%s/%s", dir, name) == -1)
    return NULL;
  return path;
}

/* The directory part of a path ("." if none), for resolving the names
 * an image holds.  Caller frees.
 */
char *
dir_of (const char *path)
{
  const char *slash = strrchr (path, '/');

  if (slash == NULL)
    return strdup (".");
  if (slash == path)
    return strdup ("/");
  return strndup (path, slash - path);
}

/* Is the file behind fd already open further up the chain? */
static bool
in_chain (const struct qcow2_image *child, int fd)
{
  struct stat st, st2;

  if (fd == -1 || fstat (fd, &st) == -1)
    return false;
  for (; child; child = child->child) {
    if (io_fd (child->io) != -1 && fstat (io_fd (child->io), &st2) == 0 &&
        st.st_dev == st2.st_dev && st.st_ino == st2.st_ino)
      return true;
  }
  return false;
}

/* Open, check and lock the backing file that img names (it must name
 * one): returns its io with its resolved path in *pathp (caller frees)
 * and its format in *is_qcow2, or NULL with errno set.
 */
struct qcow2_io *
backing_open_file (struct qcow2_image *img, char **pathp, bool *is_qcow2)
{
  struct qcow2_io *io;
  char *path;
  uint32_t magic = 0;

  if (img->dir == NULL) {
    nbdkit_error ("%s: image has a backing file (%s) but no directory to "
                  "find it in", img->name, img->backing_name);
    errno = ENOENT;
    return NULL;
  }
  if (img->depth + 1 >= MAX_BACKING_DEPTH) {
    nbdkit_error ("%s: backing chain is too deep (more than %d files)",
                  img->name, MAX_BACKING_DEPTH);
    errno = ELOOP;
    return NULL;
  }
  path = resolve (img->dir, img->backing_name);
  if (path == NULL)
    return NULL;
  io = qcow2_io_open_file_mode (path, true, cache_io_mode (&img->cfg));
  if (io == NULL) {
    nbdkit_error ("%s: cannot open backing file %s: %m", img->name, path);
    goto err;
  }
  if (in_chain (img, io_fd (io))) {
    nbdkit_error ("%s: backing file %s is already in the backing chain "
                  "(a loop)", img->name, path);
    errno = ELOOP;
    goto err_close;
  }

  if (img->backing_format) {
    if (strcmp (img->backing_format, "qcow2") == 0)
      *is_qcow2 = true;
    else if (strcmp (img->backing_format, "raw") == 0 ||
             strcmp (img->backing_format, "file") == 0)
      *is_qcow2 = false;
    else {
      nbdkit_error ("%s: backing file format '%s' is not supported (only "
                    "qcow2 and raw)", img->name, img->backing_format);
      errno = ENOTSUP;
      goto err_close;
    }
  }
  else {
    if (io_pread (io, &magic, 4, 0) == -1) {
      nbdkit_error ("%s: reading backing file %s: %m", img->name, path);
      goto err_close;
    }
    *is_qcow2 = be32toh (magic) == QCOW2_MAGIC;
  }

  /* A qcow2 backing file is locked as a read-only image, a raw one as
   * QEMU locks it through its raw driver: used, everything shared.
   */
  if (!img->cfg.no_locking &&
      (*is_qcow2 ? lock_image_file (io, path, false)
                 : lock_shared_file (io, path)) == -1)
    goto err_close;
  *pathp = path;
  return io;

 err_close:
  {
    int e = errno;
    io_close (io);
    errno = e;
  }
 err:
  free (path);
  return NULL;
}

int
backing_open_data_file (struct qcow2_image *img)
{
  char *path;

  if (img->data_file_name == NULL) {
    img->data_io = img->io;
    return 0;
  }
  if (img->dir == NULL) {
    nbdkit_error ("%s: image has an external data file (%s) but no "
                  "directory to find it in", img->name, img->data_file_name);
    errno = ENOENT;
    return -1;
  }
  path = resolve (img->dir, img->data_file_name);
  if (path == NULL)
    return -1;
  img->data_io = qcow2_io_open_file_mode (path, img->readonly,
                                          cache_io_mode (&img->cfg));
  if (img->data_io == NULL) {
    nbdkit_error ("%s: cannot open external data file %s: %m",
                  img->name, path);
    free (path);
    return -1;
  }
  if (!img->cfg.no_locking &&
      lock_data_file (img->data_io, path, !img->readonly) == -1) {
    io_close (img->data_io);
    img->data_io = NULL;
    free (path);
    return -1;
  }
  free (path);
  return 0;
}

/* Closing a qcow2 backing file's io closes its image (image.c). */
void
backing_close (struct qcow2_image *img)
{
  io_close (img->backing_io);
  img->backing_io = NULL;
  img->backing = NULL;
  if (img->data_io && img->data_io != img->io)
    io_close (img->data_io);
  img->data_io = NULL;
}

/* Read guest [offset, offset+count) from the backing file, zeroes past
 * its end or when there is none.
 */
int
backing_read (struct qcow2_image *img, void *buf, uint64_t count,
              uint64_t offset)
{
  uint64_t n = 0;

  if (offset < img->backing_size)
    n = min_u64 (count, img->backing_size - offset);
  if (n > 0 && io_pread (img->backing_io, buf, n, offset) == -1) {
    /* A qcow2 backing image has said what went wrong; a file has not. */
    if (img->backing == NULL)
      nbdkit_error ("%s: reading backing file: %m", img->name);
    return -1;
  }
  memset ((char *) buf + n, 0, count - n);
  return 0;
}
