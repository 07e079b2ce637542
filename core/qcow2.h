/* nbdkit-qcow2: the public API of the core library.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The plugin (and the unit tests) use only this header.  One struct
 * qcow2_image serves every connection of a process; every entry point
 * takes the image's metadata lock itself, so callers may call from any
 * number of threads at once.
 *
 * All functions return 0 (or a value) on success and -1 with errno set
 * on failure, after reporting the reason with nbdkit_error; except that
 * writes to an image that is read-only (EROFS) or was marked corrupt
 * (EIO) fail silently: that was reported once, when it became so.
 */

#ifndef QCOW2_H
#define QCOW2_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

struct qcow2_image;
struct qcow2_io;

enum qcow2_overlap_mode {
  QCOW2_OVERLAP_DEFAULT = 0,    /* = ALL */
  QCOW2_OVERLAP_NONE,
  QCOW2_OVERLAP_CONSTANT,
  QCOW2_OVERLAP_CACHED,
  QCOW2_OVERLAP_ALL,
};

/* detect-zeroes (qemu-nbd's option): what a write of zeroes becomes. */
enum qcow2_detect_zeroes {
  QCOW2_DETECT_ZEROES_OFF = 0,  /* written as data */
  QCOW2_DETECT_ZEROES_ON,       /* whole clusters: zero clusters, kept */
  QCOW2_DETECT_ZEROES_UNMAP,    /* whole clusters: zero, old ones freed */
};

/* cache=, with qemu-nbd's meanings (the man page has them). */
enum qcow2_cache_mode {
  QCOW2_CACHE_WRITEBACK = 0,    /* page cache; flush = fdatasync */
  QCOW2_CACHE_NONE,             /* O_DIRECT; flush = fdatasync */
  QCOW2_CACHE_WRITETHROUGH,     /* page cache; every write FUA */
  QCOW2_CACHE_DIRECTSYNC,       /* O_DIRECT; every write FUA */
  QCOW2_CACHE_UNSAFE,           /* page cache; never fdatasync */
  QCOW2_CACHE_AUTO,             /* O_DIRECT if possible, else evict */
};

struct qcow2_config {
  bool readonly;                /* never write; lock only as a reader */
  uint64_t l2_cache_size;       /* bytes of L2 slices; 0 = default */
  uint64_t refcount_cache_size; /* bytes of refcount slices; 0 = default */
  uint32_t cache_entry_size;    /* slice size in bytes; 0 = default */
  enum qcow2_overlap_mode overlap_check;
  bool no_locking;              /* do not take QEMU-compatible file locks */
  enum qcow2_detect_zeroes detect_zeroes;
  bool discard_ignore;          /* trims do nothing; zeroes never unmap */
  bool discard_no_unref;        /* trims and zeroes keep data clusters
                                   allocated (as zero clusters) */
  enum qcow2_cache_mode cache;  /* for the image, data and backing files */
  bool top_layer;               /* serve the top image alone: its backing
                                   file is not opened, unallocated
                                   clusters read as zeroes and are holes
                                   (qemu's "backing": null); implies
                                   readonly */
  uint64_t prealloc_size;       /* bytes of disk reserved ahead as the
                                   file grows (refcount.c); 0: none.
                                   The plugin's default is below. */
  bool compress;                /* store written whole clusters compressed
                                   (the image's compression type) */
};

/* prealloc-size's default: none (measured on ext4, where it did not
 * pay: bench/results-20261203-prealloc.md).
 */
#define QCOW2_PREALLOC_SIZE_DEFAULT UINT64_C(0)
/* Its largest value. */
#define QCOW2_PREALLOC_SIZE_MAX (UINT64_C(1) << 40)

/* Flags for pwrite/zero/trim, the same values as nbdkit's. */
#define QCOW2_F_MAY_TRIM   (1 << 0)
#define QCOW2_F_FUA        (1 << 1)
#define QCOW2_F_FAST_ZERO  (1 << 3)

/* Extent types for qcow2_extents, the same values as nbdkit's. */
#define QCOW2_EXTENT_HOLE  (1 << 0)
#define QCOW2_EXTENT_ZERO  (1 << 1)

/* Open a qcow2 image from a path.  Backing and data files are opened
 * relative to the image's directory.  Unless no_locking, the image is
 * locked at once in the role it is opened in, as qemu-nbd locks it:
 * as a writer if it is writable, as a reader if cfg->readonly, if the
 * file cannot be opened for writing or if it is marked corrupt.  If
 * another process (qemu?) holds a conflicting lock, this fails with
 * errno EBUSY and a message naming the lock.
 */
extern struct qcow2_image *qcow2_open (const char *filename,
                                       const struct qcow2_config *cfg);

/* Open a qcow2 image from an io object (the tests use memory and fault
 * backends).  'name' is used in messages.  'dir' is the directory that
 * relative backing / data file names are resolved against, or NULL to
 * refuse images that need another file.  The image takes ownership of
 * io (it is closed even when this fails).
 */
extern struct qcow2_image *qcow2_open_io (struct qcow2_io *io,
                                          const char *name, const char *dir,
                                          const struct qcow2_config *cfg);

/* Write back everything, clear the dirty bit where appropriate and free
 * the image.  Returns -1 if something could not be written back.
 */
extern int qcow2_close (struct qcow2_image *img);

extern uint64_t qcow2_get_size (struct qcow2_image *img);
extern bool qcow2_is_readonly (struct qcow2_image *img);
extern uint32_t qcow2_cluster_size (struct qcow2_image *img);

extern int qcow2_pread (struct qcow2_image *img, void *buf,
                        uint64_t count, uint64_t offset);
extern int qcow2_pwrite (struct qcow2_image *img, const void *buf,
                         uint64_t count, uint64_t offset, unsigned flags);
extern int qcow2_zero (struct qcow2_image *img, uint64_t count,
                       uint64_t offset, unsigned flags);
extern int qcow2_trim (struct qcow2_image *img, uint64_t count,
                       uint64_t offset, unsigned flags);
extern int qcow2_flush (struct qcow2_image *img);

/* Prefetch the metadata covering a range into the cache. */
extern int qcow2_prefetch (struct qcow2_image *img,
                           uint64_t count, uint64_t offset);

/* Describe [offset, offset+count) as extents.  'fn' is called in order
 * with contiguous ranges; it returns -1 to stop with an error.  With
 * req_one, stop after the first extent.
 */
typedef int (*qcow2_extent_fn) (void *opaque, uint64_t offset,
                                uint64_t length, uint32_t type);
extern int qcow2_extents (struct qcow2_image *img, uint64_t count,
                          uint64_t offset, bool req_one,
                          qcow2_extent_fn fn, void *opaque);

/* Internal snapshots. */
struct qcow2_snapshot_info {
  const char *id;               /* valid while the image is open */
  const char *name;
  uint64_t size;                /* virtual size of the snapshot */
  uint32_t date_sec;
  uint64_t vm_state_size;
};
extern uint32_t qcow2_nr_snapshots (struct qcow2_image *img);
extern int qcow2_snapshot_info (struct qcow2_image *img, uint32_t i,
                                struct qcow2_snapshot_info *info);
/* A read-only image of a snapshot (found by name, else by ID). */
extern struct qcow2_image *qcow2_open_snapshot (struct qcow2_image *img,
                                                const char *name);

/* Persistent dirty bitmaps (bitmap.c).  Every bitmap of the image's
 * bitmap directory, in directory order, as loaded at open: an enabled
 * ('auto') one that was consistent at open is kept up to date by every
 * write, zero and trim and stored at a clean close; a disabled one is
 * never changed; one already in use at open (inconsistent: its writer
 * crashed) is left alone and must not be served.
 */
struct qcow2_bitmap_info {
  const char *name;             /* valid while the image is open */
  uint64_t granularity;         /* bytes */
  bool enabled;                 /* 'auto': kept up to date by writes */
  bool in_use;                  /* inconsistent at open: not served */
};
extern uint32_t qcow2_nr_bitmaps (struct qcow2_image *img);
extern int qcow2_bitmap_info (struct qcow2_image *img, uint32_t i,
                              struct qcow2_bitmap_info *info);
/* The dirty map of bitmap i over [offset, offset+count): fn is called
 * as for qcow2_extents, with type 0 for dirty ranges (whole granules,
 * clipped to the disk) and QCOW2_EXTENT_HOLE|QCOW2_EXTENT_ZERO for
 * clean ones.  The bits include everything written since open.  Fails
 * with EINVAL for a bitmap in use at open.
 */
extern int qcow2_bitmap_extents (struct qcow2_image *img, uint32_t i,
                                 uint64_t count, uint64_t offset,
                                 bool req_one, qcow2_extent_fn fn,
                                 void *opaque);

/* Create a new image file (create.c).  Fails with EEXIST if the file
 * exists, unless overwrite.  The options and combinations are
 * qemu-img create's (-o cluster_size=, refcount_bits=, compat=, ...),
 * as are the refusals.  The image is written but not opened.
 */
enum qcow2_prealloc {
  QCOW2_PREALLOC_OFF = 0,
  QCOW2_PREALLOC_METADATA,      /* L2 tables and data clusters allocated */
  QCOW2_PREALLOC_FALLOC,        /* metadata + fallocate the data */
  QCOW2_PREALLOC_FULL,          /* metadata + write zeros to the data */
};

struct qcow2_create_options {
  uint64_t size;                /* virtual size, rounded up to 512 */
  bool size_from_backing_file;  /* ignore size: use the backing file's */
  uint32_t cluster_size;        /* 0 = 64K */
  uint32_t refcount_bits;       /* 0 = 16 */
  uint32_t version;             /* 2 (compat 0.10) or 3 (1.1); 0 = 3 */
  bool extended_l2;
  bool zstd;                    /* compression type zstd, else deflate */
  const char *backing_file;     /* stored as given; NULL = none */
  const char *backing_format;   /* "qcow2" or "raw"; needed with backing */
  enum qcow2_prealloc preallocation;
  bool overwrite;               /* replace an existing file */
  bool no_locking;              /* do not take QEMU's writer locks */
};

extern int qcow2_create (const char *filename,
                         const struct qcow2_create_options *opts);

/* Consistency check, like qemu-img check: recompute every cluster's
 * references from the metadata and compare with the stored refcounts.
 * With repair, rewrite the refcounts and COPIED flags (the image must
 * be writable).  Returns -1 only if the check itself could not run.
 */
struct qcow2_check_result {
  uint64_t corruptions;         /* refcount lower than the references */
  uint64_t leaks;               /* refcount higher than the references */
  uint64_t errors;              /* references outside the file */
  uint64_t repaired;            /* refcounts rewritten */
};
extern int qcow2_check (struct qcow2_image *img, bool repair,
                        struct qcow2_check_result *res);

/* Whether this build can read zstd-compressed clusters. */
extern bool qcow2_have_zstd (void);

#endif /* QCOW2_H */
