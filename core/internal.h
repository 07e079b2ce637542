/* nbdkit-qcow2: the image structure and cross-file internals of core.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Locking: every field below the "lock" line is protected by img->lock,
 * which only the request layer (rw.c, the public I/O entry points)
 * takes and releases; functions declared here never take it, and
 * assume it is held exclusively unless they say otherwise.
 * img->lock is a reader-writer lock: everything that may change state
 * holds it exclusively; the fast paths of reads and in-place writes hold
 * it shared and only look (cluster_map_cached, overlap queries; the L2
 * cache's staging slots have their own mutex), falling back to the
 * exclusive path for anything else.  Guest data I/O is done outside the
 * lock.
 */

#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <endian.h>
#include <string.h>
#include <errno.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2.h"
#include "io.h"
#include "format.h"
#include "cache.h"

struct overlap_map;

/* What one guest range maps to (cluster_map). */
enum map_kind {
  MAP_DATA,          /* host_offset in the data file */
  MAP_ZERO,          /* reads as zeroes */
  MAP_UNALLOCATED,   /* backing file, or zeroes without one */
  MAP_COMPRESSED,    /* host_offset + csize: compressed cluster */
};

struct mapping {
  enum map_kind kind;
  uint64_t guest_offset;
  uint64_t length;         /* bytes, from guest_offset */
  uint64_t host_offset;    /* DATA: where guest_offset lives; COMPRESSED:
                            * byte offset of the compressed stream */
  uint64_t csize;          /* COMPRESSED: bytes to read */
  bool copied;             /* DATA: refcount is exactly 1 (writable) */
};

struct pending_free {
  uint64_t cluster;             /* first host cluster index */
  uint64_t n;                   /* number of clusters */
};

struct snapshot {
  char *id;
  char *name;
  uint64_t l1_offset;
  uint32_t l1_size;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  uint64_t disk_size;           /* virtual size when it was taken */
};

/* A persistent dirty bitmap (bitmap.c).  Its bits live in 'pages',
 * one cluster of bits per bitmap table entry, made on first use: with
 * PAGE_LOADED the page holds the bits on disk too, else only those set
 * since open; PAGE_DIRTY: bits were set since open.  Pages, their
 * flags and their words are changed with atomic operations only, by
 * writers holding img->lock shared or exclusively, or no lock.
 */
#define PAGE_DIRTY  1
#define PAGE_LOADED 2
struct bitmap {
  char *name;
  uint64_t dir_pos;             /* of its entry in the directory */
  uint32_t flags;               /* BME_FLAG_*, as on disk now */
  unsigned gran_bits;
  uint64_t table_offset;
  uint32_t table_size;          /* entries */
  uint64_t *table;              /* host byte order */
  uint64_t **pages;             /* table_size pointers */
  uint8_t *page_flags;          /* table_size PAGE_* */
  bool keep;                    /* kept up to date by writes */
  bool lost;                    /* a page could not be made: not stored */
};

/* A guest range whose new host clusters are being written outside
 * img->lock (rw.c); it lives on the writer's stack.
 */
struct inflight {
  uint64_t start, end;          /* guest bytes, cluster aligned */
  struct inflight *next;
};

struct qcow2_image {
  char *name;                   /* for messages (the path) */
  char *dir;                    /* relative names resolve here, or NULL */
  struct qcow2_io *io;          /* the image file */
  struct qcow2_io *data_io;     /* external data file, else == io */
  struct qcow2_config cfg;
  bool readonly;
  unsigned depth;               /* 0 for the top image, +1 per backing */
  struct qcow2_image *child;    /* the image this one backs, or NULL */

  /* Header, validated (header.c). */
  uint32_t version;
  uint32_t cluster_bits;
  uint32_t cluster_size;
  uint64_t size;                /* virtual size */
  uint32_t crypt_method;
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  char *backing_name;           /* NULL if none */
  char *backing_format;         /* NULL if not given */
  char *data_file_name;         /* NULL if none */
  uint64_t crypto_offset, crypto_length;
  uint32_t nb_bitmaps;
  uint64_t bitmap_dir_offset, bitmap_dir_size;
  uint64_t ext_end;             /* end of the header extension area */

  /* Derived geometry. */
  bool ext_l2;                  /* 128-bit L2 entries with subclusters */
  uint32_t l2_entry_shift;      /* log2 of L2 entry bytes: 3 or 4 */
  uint32_t l2_bits;             /* log2 of entries per L2 table */
  uint32_t subcluster_bits;     /* log2 subcluster size (= cluster_bits
                                 * without extended L2) */
  uint32_t slice_bits;          /* log2 L2 slice bytes */
  uint32_t refcount_bits;       /* 1 << refcount_order */
  uint32_t rb_bits;             /* log2 entries per refcount block */

  /* The active L1 table, host byte order: loaded by cluster.c, changed
   * and written only by l2.c (check.c's repair of COPIED flags too goes
   * through it), replaced in snapshot views (image.c).
   */
  uint64_t l1_offset;
  uint32_t l1_size;
  uint64_t *l1;

  /* Refcount table, host byte order (refcount.c). */
  uint64_t reftable_offset;
  uint32_t reftable_clusters;
  uint64_t reftable_entries;
  uint64_t *reftable;

  /* Snapshots (snapshot.c). */
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t snapshots_size;      /* bytes of the snapshot table */
  struct snapshot *snapshots;

  /* Persistent dirty bitmaps (bitmap.c), loaded by qcow2_open. */
  struct bitmap *bitmaps;
  uint32_t nr_bitmaps;
  uint8_t *bitmap_dir;          /* the directory as on disk now */
  bool bitmaps_kept;            /* keep the autoclear bit (header.c) */
  bool bitmaps_marked;          /* the kept ones are in use on disk */

  /* Backing file: backing_read reads backing_io, the raw file's io or,
   * for a qcow2 backing file, image.c's io over the backing image, which
   * is also kept in backing (for qcow2_extents; NULL when raw).
   */
  struct qcow2_image *backing;
  struct qcow2_io *backing_io;
  uint64_t backing_size;

  /* Everything below is protected by lock (see the top of this file). */
  pthread_rwlock_t lock;
  struct cache *l2_cache;
  struct cache *rc_cache;
  /* One bit per L2 slice of the active L1 (by guest position): set when
   * the slice is known to be all zero, so lookups in it need neither
   * the cache nor a read (cluster.c).  NULL when too large.  Set by
   * readers holding 'lock' shared (atomically), cleared with it held
   * exclusively before any change to the slice or its L1 entry.
   */
  uint64_t *empty_slices;
  uint64_t empty_nbits;
  struct overlap_map *overlap;
  uint64_t free_hint;           /* no free cluster below this index */
  uint64_t host_end;            /* bytes: end of allocated clusters */
  uint64_t reserved_end;        /* bytes: reservations tried up to */
  bool reserved;                /* blocks may be reserved past EOF */
  /* Gives back a failed reservation with io_lock held exclusively
   * (rw.c's rw_give_back_reservation, installed by image.c).
   */
  void (*give_back_reservation) (struct qcow2_image *img);
  bool corrupt;                 /* sticky: every write fails with EIO */
  bool dirty_written;           /* dirty bit is set on disk */
  bool autoclear_cleared;       /* header made writable for us */
  bool need_sync;               /* data or refcounts written since sync */
  /* Guest flushes (rw.c, "Coalesced flushes"): changing requests
   * returned (atomic), and 1 + the count a successful qcow2_flush read
   * (with 'lock' held exclusively).
   */
  uint64_t done_gen, flushed_gen;
  /* One guest flush at a time (rw.c); taken before 'lock'. */
  pthread_mutex_t flush_lock;
  /* A guest flush's write-back with 'lock' dropped (l2.c, "Write-back
   * without the lock"): wb_state (WB_*) and wb_failed change with
   * wb_lock held (wb_done signals the end of the unlocked part); the
   * rest is the flusher's while it runs.
   */
  pthread_mutex_t wb_lock;
  pthread_cond_t wb_done;
  int wb_state;
  bool wb_failed;
  bool wb_sync_first;           /* the barrier's sync is the flusher's */
  uint64_t *wb_l1;              /* L1 entries to write (big-endian) */
  uint64_t wb_l1_off, wb_l1_len;
  uint32_t wb_l1_lo, wb_l1_hi;  /* the dirty entries among them */
  struct pending_free *pending; /* deferred refcount decrements */
  size_t nr_pending, pending_alloc;
  uint64_t pending_clusters;
  /* The first pending_sealed ranges were pending when a guest flush's
   * write-back without the lock began (l2.c): only they may be
   * committed after it, and no later free extends them.
   */
  size_t pending_sealed;
  bool l1_dirty;                /* L1 entries changed since last write */
  uint32_t l1_dirty_lo, l1_dirty_hi;
  /* Data I/O done outside 'lock' holds this shared; committing frees
   * takes it exclusively, so no cluster is freed under in-flight I/O.
   */
  pthread_rwlock_t io_lock;
  /* Allocating writes whose data is being written with 'lock' dropped:
   * changed with both 'lock' (exclusive) and inflight_lock held, so
   * either is enough to read it.  Until an entry goes, no other write,
   * zero or trim may touch its guest range (rw.c: inflight_wait).
   */
  pthread_mutex_t inflight_lock;
  pthread_cond_t inflight_done;
  struct inflight *inflight;
  /* compress=on (write.c): the host byte where the next compressed
   * cluster goes, in a host cluster that earlier compressed clusters
   * of ours share; 0 = none, start in a new cluster.  Reset when that
   * cluster's refcount drops to 0 (refcount.c: refcount_set).
   */
  uint64_t compress_next;
  /* compress=on (rw.c): bytes of compressed clusters written since the
   * image file's write-back was last started.
   */
  uint64_t compress_unkicked;
};

/* Big-endian fields of on-disk structures, at any alignment. */
static inline uint16_t
get_be16 (const uint8_t *p)
{
  uint16_t v;
  memcpy (&v, p, 2);
  return be16toh (v);
}

static inline uint32_t
get_be32 (const uint8_t *p)
{
  uint32_t v;
  memcpy (&v, p, 4);
  return be32toh (v);
}

static inline uint64_t
get_be64 (const uint8_t *p)
{
  uint64_t v;
  memcpy (&v, p, 8);
  return be64toh (v);
}

static inline void
put_be16 (uint8_t *p, uint16_t v)
{
  v = htobe16 (v);
  memcpy (p, &v, 2);
}

static inline void
put_be32 (uint8_t *p, uint32_t v)
{
  v = htobe32 (v);
  memcpy (p, &v, 4);
}

static inline void
put_be64 (uint8_t *p, uint64_t v)
{
  v = htobe64 (v);
  memcpy (p, &v, 8);
}

/* Index math (all sizes are powers of two). */
static inline uint64_t
offset_into_cluster (const struct qcow2_image *img, uint64_t off)
{
  return off & (img->cluster_size - 1);
}

static inline uint64_t
cluster_index (const struct qcow2_image *img, uint64_t off)
{
  return off >> img->cluster_bits;
}

static inline uint64_t
l1_index (const struct qcow2_image *img, uint64_t guest_off)
{
  return guest_off >> (img->cluster_bits + img->l2_bits);
}

static inline uint64_t
l2_index (const struct qcow2_image *img, uint64_t guest_off)
{
  return (guest_off >> img->cluster_bits) & ((UINT64_C(1) << img->l2_bits) - 1);
}

static inline uint64_t
size_to_clusters (const struct qcow2_image *img, uint64_t size)
{
  return (size + img->cluster_size - 1) >> img->cluster_bits;
}

static inline uint64_t
round_up_pow2 (uint64_t v, uint64_t align)
{
  return (v + align - 1) & ~(align - 1);
}

static inline uint64_t
min_u64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* A compressed L2 entry e: the host offset *off of its first byte and
 * the end *end of the 512-byte sectors it covers.  Bits 0 to x-1 hold
 * the offset and bits x to 61 the number of sectors after the first,
 * with x = 62 - (cluster_bits - 8) (qcow2 spec, "Compressed Clusters
 * Descriptor").  *end < 2^63: no overflow.
 */
static inline void
l2e_compressed (const struct qcow2_image *img, uint64_t e, uint64_t *off,
                uint64_t *end)
{
  unsigned x = 62 - (img->cluster_bits - 8);
  uint64_t sectors = ((e & L2E_COMPRESSED_MASK) >> x) + 1;

  *off = e & ((UINT64_C(1) << x) - 1);
  *end = (*off & ~UINT64_C(511)) + sectors * 512;
}

/* The L2 entry of a compressed cluster whose stream is len bytes at
 * host offset off (the inverse of l2e_compressed): the sector count is
 * the number of 512-byte sectors the stream touches, minus one.  The
 * caller checks that off fits in its x bits (l2e_compressed_fits).
 */
static inline uint64_t
l2e_make_compressed (const struct qcow2_image *img, uint64_t off,
                     uint64_t len)
{
  unsigned x = 62 - (img->cluster_bits - 8);
  uint64_t sectors = ((off + len - 1) >> 9) - (off >> 9);

  return QCOW_OFLAG_COMPRESSED | (sectors << x) | off;
}

static inline bool
l2e_compressed_fits (const struct qcow2_image *img, uint64_t off)
{
  return off < (UINT64_C(1) << (62 - (img->cluster_bits - 8)));
}

/* How cfg->cache opens a file (io.h's QCOW2_IO_*): the image, its data
 * file, its backing files (read-only: FUA and flush do not matter to
 * them) and snapshot views all alike.
 */
static inline unsigned
cache_io_mode (const struct qcow2_config *cfg)
{
  switch (cfg->cache) {
  case QCOW2_CACHE_NONE:
  case QCOW2_CACHE_DIRECTSYNC:
    return QCOW2_IO_DIRECT;
  case QCOW2_CACHE_AUTO:
    return QCOW2_IO_AUTO;
  case QCOW2_CACHE_UNSAFE:
    return QCOW2_IO_NO_SYNC;
  default:
    return 0;
  }
}

/* cache=writethrough and directsync: every write as if FUA. */
static inline bool
cache_write_through (const struct qcow2_config *cfg)
{
  return cfg->cache == QCOW2_CACHE_WRITETHROUGH ||
    cfg->cache == QCOW2_CACHE_DIRECTSYNC;
}

/* Every request: [offset, offset+count) must lie inside the disk;
 * 'what' names it in the message ("request", "write", ...).
 */
static inline int
image_check_range (const struct qcow2_image *img, uint64_t count,
                   uint64_t offset, const char *what)
{
  if (offset > img->size || count > img->size - offset) {
    errno = EINVAL;
    nbdkit_error ("%s: %s beyond end of disk", img->name, what);
    return -1;
  }
  return 0;
}

/* header.c */
extern int header_read (struct qcow2_image *img);
extern int header_write_features (struct qcow2_image *img);
extern int header_mark_corrupt (struct qcow2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
extern int header_prepare_write (struct qcow2_image *img);
extern bool header_write_ready (const struct qcow2_image *img);
extern int header_mark_clean (struct qcow2_image *img);

/* cluster.c */
extern int cluster_load_l1 (struct qcow2_image *img);
extern int cluster_map (struct qcow2_image *img, uint64_t offset,
                        uint64_t count, struct mapping *m);
/* Like cluster_map with img->lock held only shared: 1 if that is not
 * enough (the entries need a closer look, or the slice is not cached
 * and cannot be staged).  With drain not NULL a slice not cached is
 * staged (cache.c; -1 if reading it fails); *drain is set when the
 * caller, once it holds no lock, should take img->lock exclusively for
 * cache_stage_drain.
 */
extern int cluster_map_cached (struct qcow2_image *img, uint64_t offset,
                               uint64_t count, struct mapping *m,
                               bool *drain);
extern int cluster_read_run (struct qcow2_image *img, void *buf,
                             const struct mapping *m, uint64_t offset);
extern int cluster_read_locked (struct qcow2_image *img, void *buf,
                                uint64_t count, uint64_t offset);
extern bool is_zero (const void *buf, size_t n);
extern int cluster_empty_init (struct qcow2_image *img, uint64_t max_bytes);
extern void cluster_empty_forget (struct qcow2_image *img, uint64_t guest,
                                  uint64_t len);
extern void cluster_forget_all (struct qcow2_image *img);

/* bitmap.c */
extern int bitmap_load (struct qcow2_image *img);
extern void bitmap_free (struct qcow2_image *img);
extern int bitmap_prepare_write (struct qcow2_image *img);
extern void bitmap_check_repaired (struct qcow2_image *img);
extern void bitmap_set (struct qcow2_image *img, uint64_t offset,
                        uint64_t count);
extern int bitmap_store (struct qcow2_image *img);
extern int bitmap_extents (struct qcow2_image *img, uint32_t i,
                           uint64_t count, uint64_t offset, bool req_one,
                           qcow2_extent_fn fn, void *opaque);

/* True when bitmap_prepare_write has nothing left to do. */
static inline bool
bitmap_write_ready (const struct qcow2_image *img)
{
  return img->bitmaps_marked || !img->bitmaps_kept;
}

/* check.c */
extern int check_image (struct qcow2_image *img, bool repair,
                        struct qcow2_check_result *res);
extern int check_run (struct qcow2_image *img, bool repair,
                      struct qcow2_check_result *res);
/* Before the first write to an image left dirty (dirty bit set, not by
 * us): rebuild the refcounts and clear the bit.
 */
extern int check_repair_dirty (struct qcow2_image *img);

/* rw.c */
extern void rw_give_back_reservation (struct qcow2_image *img);
extern int rw_store_bitmaps (struct qcow2_image *img);
extern int rw_flush_all (struct qcow2_image *img);

/* l2.c */
/* An L2 entry's slice pinned in the L2 cache, and the entry in it. */
struct l2_ref {
  struct cache_entry *ce;
  uint64_t *slice;
  uint64_t *entry;              /* first word of the entry */
};
extern int l2_before_slice_write (void *img, uint64_t off, uint32_t len);
extern int l2_get_entry (struct qcow2_image *img, uint64_t guest,
                         struct l2_ref *ref);
extern void l2_put_entry (struct qcow2_image *img, struct l2_ref *ref,
                          bool dirty);
extern int l2_entry_host_range (struct qcow2_image *img, uint64_t e,
                                uint64_t guest, uint64_t bound,
                                uint64_t *first, uint64_t *n);
extern int l2_free_entry_later (struct qcow2_image *img, uint64_t e,
                                uint64_t guest, uint64_t bound);
extern int l2_check_old_entries (struct qcow2_image *img, uint64_t c0,
                                 uint64_t n);
enum { WB_IDLE, WB_RUNNING, WB_ENDED };
extern int l2_write_back (struct qcow2_image *img);
extern int l2_write_back_begin (struct qcow2_image *img);
extern int l2_write_back_run (struct qcow2_image *img);
extern void l2_write_back_end (struct qcow2_image *img, int r);
extern void l2_write_back_wait (struct qcow2_image *img);
extern int l2_barrier (struct qcow2_image *img);
extern void l2_set_l1 (struct qcow2_image *img, uint64_t i, uint64_t v);
extern int l2_write_l1 (struct qcow2_image *img);

/* write.c: an allocating write of one run in three steps (rw.c):
 * write_plan with img->lock held allocates the clusters and builds what
 * to write; the data is written (the lock dropped); write_link, the
 * lock held again, points the L2 entries at it, or write_abandon gives
 * the clusters back.
 */
struct write_plan {
  const uint8_t *src;           /* write len bytes of src ... */
  uint64_t len, host;           /* ... at host offset host of data_io */
  uint64_t c0, n;               /* guest clusters [c0, c0 + n*cs) */
  uint64_t first;               /* host offset of the first new cluster */
  uint64_t bound;               /* end of the file before allocating */
  uint64_t consumed;            /* bytes of the request covered */
  uint8_t *data;                /* the buffer src points into, or NULL */
};
extern int write_plan (struct qcow2_image *img, const uint8_t *buf,
                       uint64_t off, const struct mapping *m,
                       struct write_plan *p);
extern int write_link (struct qcow2_image *img, struct write_plan *p);
extern void write_abandon (struct qcow2_image *img, struct write_plan *p);
extern int write_data_check (struct qcow2_image *img, uint64_t host,
                             uint64_t len);
extern void write_whole_clusters (const struct qcow2_image *img,
                                  uint64_t count, uint64_t offset,
                                  uint64_t *a, uint64_t *b);
extern bool write_zero_by_metadata (const struct qcow2_image *img,
                                    bool may_trim);
extern int write_zero_plan (struct qcow2_image *img, uint64_t count,
                            uint64_t offset, unsigned flags, uint64_t *a,
                            uint64_t *b, bool *trim, bool *may_trim);
extern int write_zeroes (struct qcow2_image *img, uint64_t off,
                         uint64_t len, unsigned flags);
/* write.c, compress=on: whole clusters stored compressed.  The batch
 * is compressed outside img->lock (write_compress_batch reads only
 * what never changes: cluster size, compression type); then, with the
 * lock held, write_compressed_plan places a run of its clusters, the
 * caller writes out[pos[i]..] to host (the lock dropped, the guest
 * clusters in flight) and write_compressed_link links them, or
 * write_compressed_abandon gives the space back.
 */
struct compressed_batch {
  uint64_t c0, n;               /* guest clusters [c0, c0 + n*cs) */
  uint8_t *out;                 /* the streams, back to back */
  uint64_t *pos;                /* cluster i: its stream at out + pos[i] */
  uint32_t *len;                /* ... of len[i] bytes; 0: not compressed */
};
struct compressed_plan {
  uint64_t i, n;                /* clusters [i, i+n) of the batch */
  uint64_t host, len;           /* write out+pos[i], len bytes, at host */
  uint64_t bound;               /* end of the file before allocating */
};
extern int write_compress_batch (const struct qcow2_image *img,
                                 const uint8_t *buf, uint64_t c0,
                                 uint64_t count,
                                 struct compressed_batch *b);
extern void write_compress_batch_free (struct compressed_batch *b);
extern int write_compressed_plan (struct qcow2_image *img,
                                  const struct compressed_batch *b,
                                  uint64_t i, struct compressed_plan *p);
extern int write_compressed_link (struct qcow2_image *img,
                                  const struct compressed_batch *b,
                                  const struct compressed_plan *p);
extern void write_compressed_abandon (struct qcow2_image *img,
                                      const struct compressed_batch *b,
                                      const struct compressed_plan *p);
extern int zero_subclusters (struct qcow2_image *img, uint64_t off,
                             uint64_t len, bool trim);
extern int write_zero_edge (struct qcow2_image *img, uint64_t off,
                            uint64_t len, unsigned flags);
extern int write_trim_edge (struct qcow2_image *img, uint64_t off,
                            uint64_t len);
extern int64_t zero_clusters (struct qcow2_image *img, uint64_t c0,
                              uint64_t n, bool trim, bool may_trim);

/* image.c */
extern struct qcow2_image *image_open (struct qcow2_io *io, const char *name,
                                       const char *dir,
                                       const struct qcow2_config *cfg,
                                       struct qcow2_image *child);

/* backing.c: files only; a qcow2 backing file becomes an image in
 * image.c.
 */
extern struct qcow2_io *backing_open_file (struct qcow2_image *img,
                                           char **pathp, bool *is_qcow2);
extern int backing_open_data_file (struct qcow2_image *img);
extern void backing_close (struct qcow2_image *img);
extern char *dir_of (const char *path);
extern int backing_read (struct qcow2_image *img, void *buf,
                         uint64_t count, uint64_t offset);

/* lock.c: QEMU-compatible file locks; no-ops (0) when io->fd is -1.
 * Callers skip them when cfg.no_locking.  -1 with a message naming the
 * lock on a conflict (errno EBUSY) or when the file cannot be locked.
 */
extern int lock_image_file (struct qcow2_io *io, const char *name,
                            bool writable);
extern int lock_shared_file (struct qcow2_io *io, const char *name);
extern int lock_data_file (struct qcow2_io *io, const char *name,
                           bool writable);

/* compress.c: buffer -> buffer; no messages, errno EIO on bad data;
 * compressors come from a pool of its own (thread-safe).
 */
extern int compress_inflate (const void *in, size_t in_len,
                             void *out, size_t out_len);
extern int compress_zstd_decompress (const void *in, size_t in_len,
                                     void *out, size_t out_len);
extern int compress_deflate (const void *in, size_t in_len,
                             void *out, size_t *out_len);
extern int compress_zstd_compress (const void *in, size_t in_len,
                                   void *out, size_t *out_len);
extern int compress_cluster (uint8_t type, const void *in, size_t in_len,
                             void *out, size_t *out_len);
/* For the unit test: compressors made so far, how many of a type may
 * exist at once, deflates skipped as hopeless, idle compressors (and
 * zstd decoders) taken on another core than the one that used them
 * last.
 */
struct compress_stats {
  uint64_t created;             /* compressors */
  uint64_t decoders_created;    /* zstd decompression contexts */
  unsigned max;                 /* of each, at once */
  uint64_t deflate_skipped;
  uint64_t moved;               /* idle ones taken on another core */
};
extern void compress_stats (struct compress_stats *st);

/* snapshot.c */
extern int snapshot_read_table (struct qcow2_image *img);
extern void snapshot_free_table (struct qcow2_image *img);
extern uint64_t *snapshot_read_l1 (struct qcow2_image *img,
                                   const struct snapshot *sn);
extern const struct snapshot *snapshot_find (const struct qcow2_image *img,
                                             const char *name);

/* refcount.c */
extern int refcount_load (struct qcow2_image *img);
extern int refcount_before_block_write (void *img, uint64_t off,
                                        uint32_t len);
extern int refcount_get (struct qcow2_image *img, uint64_t cluster,
                         uint64_t *val);
extern int refcount_set (struct qcow2_image *img, uint64_t cluster,
                         uint64_t val);
extern uint64_t refcount_max (const struct qcow2_image *img);
extern int64_t refcount_alloc (struct qcow2_image *img, uint64_t n);
extern int refcount_update (struct qcow2_image *img, uint64_t c, int delta);
extern void refcount_unalloc (struct qcow2_image *img, uint64_t off,
                              uint64_t n);
extern int refcount_free_later (struct qcow2_image *img, uint64_t off,
                                uint64_t n);
extern int refcount_commit_frees (struct qcow2_image *img, size_t limit);
extern int refcount_write_back (struct qcow2_image *img);
extern void refcount_give_back_reservation (struct qcow2_image *img);

#endif /* QCOW2_INTERNAL_H */
