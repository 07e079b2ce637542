/* nbdkit-qcow2: opening and closing images.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Every struct qcow2_image is made here: the image served, a read-only
 * view of one of its internal snapshots (qcow2_open_snapshot), and the
 * qcow2 images of its backing chain.  snapshot.c only describes the
 * snapshot table and backing.c only finds, opens and locks files, so
 * neither calls back up into this file.  A qcow2 backing image is
 * handed to the read path as a struct qcow2_io (image_io_new), so that
 * backing_read reads it as it reads a raw file.
 *
 * Open order: header (validated) -> L1 table -> refcount table ->
 * snapshot table -> caches -> overlap map -> backing chain / data file
 * -> (the image served only) bitmaps.
 * Each step validates what it reads before the next one trusts it.
 *
 * top_layer (qemu's "backing": null): the backing file is not opened at
 * all, so backing_size stays 0 and every unallocated cluster reads as
 * zeroes and is reported as a hole, as in an image without a backing
 * file.  Such an image is always read-only: a partial write to an
 * unallocated cluster would copy zeroes, not the backing file's data,
 * into it, and a zero or trim could drop clusters the backing file
 * needs to be hidden.  backing_name is kept (the image still has one).
 *
 * Cache defaults: the L2 cache covers the whole virtual disk, capped at
 * 32 MiB (QEMU's Linux default cap, enough for 256 GiB with 64 KiB
 * clusters); slices are 4 KiB, or the cluster size when smaller.
 * Memory is only used as the cache fills.
 *
 * The I/O entry points are in rw.c, which alone takes the image's
 * locks; opening and closing run while no request does.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"
#include "overlap.h"

#define DEFAULT_L2_CACHE_MAX     (UINT64_C(32) << 20)
#define DEFAULT_RC_CACHE         (UINT64_C(256) << 10)
#define DEFAULT_SLICE_SIZE       4096

static int
setup_caches (struct qcow2_image *img)
{
  uint32_t slice = img->cfg.cache_entry_size ? img->cfg.cache_entry_size
                                             : DEFAULT_SLICE_SIZE;
  uint64_t l2_bytes, rc_bytes;

  if (slice > img->cluster_size)
    slice = img->cluster_size;
  if (slice < 512 || (slice & (slice - 1))) {
    nbdkit_error ("%s: cache-entry-size %" PRIu32 " must be a power of 2 "
                  "of at least 512", img->name, slice);
    errno = EINVAL;
    return -1;
  }
  img->slice_bits = __builtin_ctz (slice);

  if (img->cfg.l2_cache_size)
    l2_bytes = img->cfg.l2_cache_size;
  else {
    /* Bytes of L2 entries needed to map the whole disk. */
    uint64_t clusters = size_to_clusters (img, img->size);
    l2_bytes = clusters << img->l2_entry_shift;
    if (l2_bytes > DEFAULT_L2_CACHE_MAX)
      l2_bytes = DEFAULT_L2_CACHE_MAX;
  }
  rc_bytes = img->cfg.refcount_cache_size ? img->cfg.refcount_cache_size
                                          : DEFAULT_RC_CACHE;
  img->l2_cache = cache_create (img->io, img->name, "L2", img->slice_bits,
                                l2_bytes, l2_before_slice_write, img);
  img->rc_cache = cache_create (img->io, img->name, "refcount",
                                img->slice_bits, rc_bytes,
                                refcount_before_block_write, img);
  if (!img->l2_cache || !img->rc_cache)
    return -1;
  /* Beside the cache, at most 1/8 of its size (cluster.c). */
  if (cluster_empty_init (img, l2_bytes / 8 > 65536 ? l2_bytes / 8
                                                    : 65536) == -1)
    return -1;
  nbdkit_debug ("%s: L2 cache %" PRIu32 " slices of %" PRIu32 " bytes, "
                "refcount cache %" PRIu32 " slices", img->name,
                cache_nr_entries (img->l2_cache), slice,
                cache_nr_entries (img->rc_cache));
  return 0;
}

/* ---- a qcow2 backing image as a read-only file ---- */

/* Reads are the image's guest reads (its own locks), zeroes past its
 * virtual size as io.h asks.  The io owns the image: closing it closes
 * the image.
 */
struct image_io {
  struct qcow2_io io;           /* first: a struct qcow2_io * is this */
  struct qcow2_image *img;
};

static struct qcow2_image *
io_image (struct qcow2_io *io)
{
  return ((struct image_io *) io)->img;
}

static int
image_io_pread (struct qcow2_io *io, void *buf, size_t count,
                uint64_t offset)
{
  struct qcow2_image *img = io_image (io);
  uint64_t n = 0;

  if (offset < img->size)
    n = min_u64 (count, img->size - offset);
  if (n > 0 && qcow2_pread (img, buf, n, offset) == -1)
    return -1;
  memset ((char *) buf + n, 0, count - n);
  return 0;
}

static int
image_io_pwrite (struct qcow2_io *io, const void *buf, size_t count,
                 uint64_t offset)
{
  errno = EROFS;
  return -1;
}

static int
image_io_flush (struct qcow2_io *io)
{
  return 0;
}

static int64_t
image_io_size (struct qcow2_io *io)
{
  return io_image (io)->size;
}

static int
image_io_truncate (struct qcow2_io *io, uint64_t size)
{
  errno = EROFS;
  return -1;
}

static void
image_io_close (struct qcow2_io *io)
{
  qcow2_close (io_image (io));
  free (io);
}

static const struct qcow2_io_ops image_io_ops = {
  .pread = image_io_pread,
  .pwrite = image_io_pwrite,
  .flush = image_io_flush,
  .size = image_io_size,
  .truncate = image_io_truncate,
  .close = image_io_close,
};

static struct qcow2_io *
image_io_new (struct qcow2_image *img)
{
  struct image_io *iio = calloc (1, sizeof *iio);

  if (iio == NULL)
    return NULL;
  iio->io.ops = &image_io_ops;
  iio->io.fd = -1;
  iio->io.readonly = true;
  iio->img = img;
  return &iio->io;
}

/* ---- opening and closing ---- */

static void
image_free (struct qcow2_image *img)
{
  if (img == NULL)
    return;
  backing_close (img);
  bitmap_free (img);
  overlap_free (img);
  cache_destroy (img->l2_cache);
  free (img->empty_slices);
  cache_destroy (img->rc_cache);
  snapshot_free_table (img);
  free (img->l1);
  free (img->reftable);
  free (img->backing_name);
  free (img->backing_format);
  free (img->data_file_name);
  io_close (img->io);
  pthread_rwlock_destroy (&img->lock);
  pthread_rwlock_destroy (&img->io_lock);
  pthread_mutex_destroy (&img->inflight_lock);
  pthread_cond_destroy (&img->inflight_done);
  pthread_mutex_destroy (&img->flush_lock);
  pthread_mutex_destroy (&img->wb_lock);
  pthread_cond_destroy (&img->wb_done);
  free (img->wb_l1);
  free (img->pending);
  free (img->name);
  free (img->dir);
  free (img);
}

/* The backing file: backing.c finds, checks and locks it; a qcow2 one
 * becomes another image here (with img as its child, for backing.c's
 * loop check) and is read through image_io.
 */
static int
open_backing (struct qcow2_image *img)
{
  struct qcow2_io *io;
  char *path, *bdir = NULL;
  bool is_qcow2;
  int64_t size;
  int r = -1;

  if (img->backing_name == NULL)
    return 0;
  if (img->cfg.top_layer) {
    nbdkit_debug ("%s: top-layer: backing file %s not opened, unallocated "
                  "clusters read as zeroes", img->name, img->backing_name);
    return 0;
  }
  io = backing_open_file (img, &path, &is_qcow2);
  if (io == NULL)
    return -1;
  if (is_qcow2) {
    struct qcow2_config cfg = img->cfg;
    cfg.readonly = true;
    bdir = dir_of (path);
    if (bdir == NULL) {
      io_close (io);
      goto out;
    }
    img->backing = image_open (io, path, bdir, &cfg, img);
    if (img->backing == NULL)
      goto out;
    img->backing_io = image_io_new (img->backing);
    if (img->backing_io == NULL) {
      int e = errno;
      qcow2_close (img->backing);
      img->backing = NULL;
      errno = e;
      goto out;
    }
    img->backing_size = img->backing->size;
  }
  else {
    size = io_size (io);
    if (size == -1) {
      nbdkit_error ("%s: backing file %s: %m", img->name, path);
      io_close (io);
      goto out;
    }
    img->backing_io = io;
    img->backing_size = size;
  }
  nbdkit_debug ("%s: backing file %s (%s, %" PRIu64 " bytes)", img->name,
                path, is_qcow2 ? "qcow2" : "raw", img->backing_size);
  r = 0;
 out:
  free (path);
  free (bdir);
  return r;
}

struct qcow2_image *
image_open (struct qcow2_io *io, const char *name, const char *dir,
            const struct qcow2_config *cfg, struct qcow2_image *child)
{
  struct qcow2_image *img = calloc (1, sizeof *img);

  if (img == NULL) {
    io_close (io);
    return NULL;
  }
  {
    /* Writer-preferring: a stream of cached reads holding the lock
     * shared must not starve allocating writes.
     */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init (&attr);
    pthread_rwlockattr_setkind_np
      (&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init (&img->lock, &attr);
    pthread_rwlockattr_destroy (&attr);
  }
  pthread_rwlock_init (&img->io_lock, NULL);
  pthread_mutex_init (&img->inflight_lock, NULL);
  pthread_cond_init (&img->inflight_done, NULL);
  pthread_mutex_init (&img->flush_lock, NULL);
  pthread_mutex_init (&img->wb_lock, NULL);
  pthread_cond_init (&img->wb_done, NULL);
  img->io = io;
  img->give_back_reservation = rw_give_back_reservation;
  img->cfg = *cfg;
  img->readonly = cfg->readonly || cfg->top_layer || io->readonly;
  img->child = child;
  img->depth = child ? child->depth + 1 : 0;
  img->name = strdup (name);
  img->dir = dir ? strdup (dir) : NULL;
  if (img->name == NULL || (dir && img->dir == NULL))
    goto err;

  if (header_read (img) == -1)
    goto err;
  /* Decided before the data file is opened, so that it is opened, and
   * locked, read-only too.
   */
  if ((img->incompat & INCOMPAT_CORRUPT) && !img->readonly) {
    nbdkit_error ("%s: image is marked corrupt: serving it read-only "
                  "(repair it with 'qemu-img check -r all')", img->name);
    img->readonly = true;
  }
  {
    int64_t fs = io_size (img->io);
    if (fs == -1)
      goto err;
    img->host_end = round_up_pow2 (fs, img->cluster_size);
    if (img->io->blockdev && !img->readonly)
      nbdkit_debug ("%s: a block device of %" PRIi64 " bytes: the image "
                    "cannot grow past it, and no space is reserved ahead",
                    img->name, fs);
  }
  if (cluster_load_l1 (img) == -1 ||
      refcount_load (img) == -1 ||
      snapshot_read_table (img) == -1 ||
      setup_caches (img) == -1 ||
      overlap_build (img) == -1 ||
      open_backing (img) == -1 ||
      backing_open_data_file (img) == -1)
    goto err;

  if (img->incompat & INCOMPAT_DIRTY)
    nbdkit_debug ("%s: dirty bit set: refcounts will be rebuilt before "
                  "the first write", img->name);
  img->child = NULL;            /* only needed for loop detection */
  return img;

 err:
  {
    int e = errno;
    image_free (img);
    errno = e;
  }
  return NULL;
}

/* The image served (not a backing file or snapshot view): with its
 * persistent dirty bitmaps.
 */
static struct qcow2_image *
open_top (struct qcow2_image *img)
{
  if (img && bitmap_load (img) == -1) {
    int e = errno;
    image_free (img);
    errno = e;
    return NULL;
  }
  return img;
}

struct qcow2_image *
qcow2_open_io (struct qcow2_io *io, const char *name, const char *dir,
               const struct qcow2_config *cfg)
{
  return open_top (image_open (io, name, dir, cfg, NULL));
}

struct qcow2_image *
qcow2_open (const char *filename, const struct qcow2_config *cfg)
{
  struct qcow2_io *io;
  struct qcow2_image *img;
  char *dir;
  bool ro = cfg->readonly || cfg->top_layer;

  io = qcow2_io_open_file_mode (filename, ro, cache_io_mode (cfg));
  if (io == NULL && !ro && (errno == EACCES || errno == EROFS ||
                            errno == EPERM)) {
    nbdkit_debug ("%s: cannot open for writing (%m), opening read-only",
                  filename);
    io = qcow2_io_open_file_mode (filename, true, cache_io_mode (cfg));
  }
  if (io == NULL) {
    /* io.c has said why a cache mode was refused (EINVAL). */
    if (errno != EINVAL || cache_io_mode (cfg) == 0)
      nbdkit_error ("%s: %m", filename);
    return NULL;
  }
  /* Lock before reading anything: an image QEMU is writing must not
   * be read half-written, or marked corrupt or repaired, by us.  The
   * role is decided now, as qemu-nbd decides it: the writer's locks if
   * we may write, so that a second writer is refused at once instead of
   * both starting as readers and neither being able to write.
   */
  if (!cfg->no_locking &&
      lock_image_file (io, filename, !io->readonly) == -1) {
    int e = errno;
    if (e == EBUSY && !io->readonly)
      nbdkit_error ("%s: not served; if the other process only reads the "
                    "image, readonly=true serves it read-only beside it",
                    filename);
    io_close (io);
    errno = e;
    return NULL;
  }
  dir = dir_of (filename);
  if (dir == NULL) {
    io_close (io);
    return NULL;
  }
  img = open_top (image_open (io, filename, dir, cfg, NULL));
  free (dir);
  /* Writable file, read-only image (marked corrupt): a reader. */
  if (img && img->readonly && !io->readonly && !cfg->no_locking &&
      lock_image_file (io, filename, false) == -1) {
    int e = errno;
    image_free (img);
    errno = e;
    return NULL;
  }
  return img;
}

/* A read-only view of a snapshot: a second image on its own read-only
 * descriptor of the same file, with the snapshot's L1 table and size.
 * Its caches cannot go stale: snapshot tables are never written (the
 * active image copies anything it shares with a snapshot before
 * changing it, and this plugin never deletes snapshots).
 */
struct qcow2_image *
qcow2_open_snapshot (struct qcow2_image *img, const char *name)
{
  const struct snapshot *sn = snapshot_find (img, name);
  struct qcow2_config cfg = img->cfg;
  struct qcow2_image *view;
  struct qcow2_io *io;
  uint64_t need;

  if (sn == NULL) {
    nbdkit_error ("%s: no snapshot with name or ID '%s'", img->name, name);
    errno = ENOENT;
    return NULL;
  }
  need = (sn->disk_size + (UINT64_C(1) << (img->cluster_bits + img->l2_bits))
          - 1) >> (img->cluster_bits + img->l2_bits);
  if (sn->l1_size < need) {
    nbdkit_error ("%s: snapshot %s: L1 table too small for its size (%"
                  PRIu32 " entries, %" PRIu64 " needed)", img->name,
                  sn->id, sn->l1_size, need);
    errno = EIO;
    return NULL;
  }
  io = qcow2_io_open_file_mode (img->name, true, cache_io_mode (&cfg));
  if (io == NULL) {
    nbdkit_error ("%s: %m", img->name);
    return NULL;
  }
  cfg.readonly = true;
  cfg.no_locking = true;        /* the active image holds the locks */
  view = image_open (io, img->name, img->dir, &cfg, NULL);
  if (view == NULL)
    return NULL;
  free (view->l1);
  view->l1 = snapshot_read_l1 (view, sn);
  if (view->l1 == NULL) {
    qcow2_close (view);
    return NULL;
  }
  view->l1_size = sn->l1_size;
  view->l1_offset = sn->l1_offset;
  cluster_empty_forget (view, 0, UINT64_MAX);   /* nothing known of this L1 */
  view->size = sn->disk_size;
  return view;
}

int
qcow2_close (struct qcow2_image *img)
{
  int r = 0;

  if (img == NULL)
    return 0;
  if (!img->readonly && rw_flush_all (img) == -1)
    r = -1;
  if (r == 0 && !img->readonly && rw_store_bitmaps (img) == -1)
    r = -1;
  if (r == 0 && !img->readonly && header_mark_clean (img) == -1)
    r = -1;
  /* Give back disk blocks reserved past the end of the file (truncating
   * to the same size frees them), also what a failed reservation took.
   * No request runs any more, so no write can be extending the file.
   */
  if (img->reserved) {
    int64_t size = io_size (img->io);
    if (size != -1)
      io_truncate (img->io, size);
  }
  image_free (img);
  return r;
}

uint64_t
qcow2_get_size (struct qcow2_image *img)
{
  return img->size;
}

bool
qcow2_is_readonly (struct qcow2_image *img)
{
  return img->readonly;
}

uint32_t
qcow2_cluster_size (struct qcow2_image *img)
{
  return img->cluster_size;
}
