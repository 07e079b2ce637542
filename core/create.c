/* nbdkit-qcow2: creating new images.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * qcow2_create writes a complete, consistent image in one pass, without
 * going through the allocator of the write path.  Every cluster the
 * image will ever start with is known in advance, so the whole layout
 * is computed first and then each region is written front to back from
 * a few large buffers:
 *
 *   cluster 0     header, header extensions, backing file name
 *   reftable      refcount table (R clusters)
 *   refblocks     refcount blocks (B clusters) covering every cluster
 *                 below, themselves included
 *   L1            the L1 table, sized for the virtual size
 *   L2            preallocation only: every L2 table, back to back
 *   data          preallocation only: one cluster per guest cluster,
 *                 in guest order
 *                 (file end)
 *
 * Since every cluster from 0 to the end of the file is in use exactly
 * once, every refcount is 1: the refcount blocks are a run of ones
 * followed by zeros, and R and B are the smallest fixed point of
 * "B blocks cover header + R + B + L1 + L2 + data clusters".
 *
 * Why contiguous: QEMU preallocates metadata by allocating one cluster
 * at a time through its normal write path, with a refcount update and a
 * metadata overlap check per cluster.  With 512-byte clusters that is
 * millions of allocations whose overlap checks each scan all the
 * metadata, so creation time grows with the square of the image size
 * (qemu-img 7.2 takes over three minutes for 4 GiB: bench/README.md).
 * Here creation costs one sequential write of the metadata, and the L2
 * tables end up next to each other and the data in guest order, which
 * also makes the image fast to read sequentially.  QEMU interleaves each L2 table with its
 * data instead; both are valid and qemu-img check accepts either.
 *
 * What is written matches what qemu-img create writes for the same
 * options (header fields, the feature name table when it fits in
 * cluster 0, the backing format extension, the backing file name
 * stored exactly as given), and the same combinations are refused.
 * Preallocated clusters are normal allocated clusters with the COPIED
 * flag: they read as whatever the file holds there, which is zeros
 * because the file is new (sparse, fallocated or written with zeros).
 * With extended L2 entries the subcluster bitmaps stay 0 ("unallocated",
 * reading from the backing file or as zeros) as QEMU leaves them, which
 * is what allows preallocation together with a backing file.
 *
 * Crash safety: the header is written last, after every table, and
 * then the file is synced, so an interrupted creation leaves a file
 * that is not a qcow2 image rather than one with bad metadata.  A file
 * this function created (or truncated) is removed again on failure.
 *
 * Locking: none needed in memory; the new file gets QEMU's writer locks
 * while it is written (unless no_locking), so an existing image in use
 * by QEMU is never truncated with create=force.
 *
 * XXX No external data files, lazy refcounts, encryption or bitmaps.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "internal.h"

#define DEFAULT_CLUSTER_SIZE  65536
#define DEFAULT_REFCOUNT_BITS 16
#define HDR_V3_LENGTH         112          /* what QEMU writes */
#define FEATURE_ENTRY_SIZE    48
#define WRITE_BUFFER_SIZE     (4 << 20)    /* a multiple of any cluster */

/* The names QEMU puts in the feature name table (type, bit, name). */
static const struct feature_name {
  uint8_t type;                 /* 0 incompatible, 1 compatible, 2 autoclear */
  uint8_t bit;
  const char *name;
} feature_names[] = {
  { 0, 0, "dirty bit" },
  { 0, 1, "corrupt bit" },
  { 0, 2, "external data file" },
  { 0, 3, "compression type" },
  { 0, 4, "extended L2 entries" },
  { 1, 0, "lazy refcounts" },
  { 2, 0, "bitmaps" },
  { 2, 1, "raw external data" },
};
#define NR_FEATURE_NAMES (sizeof feature_names / sizeof feature_names[0])

/* The whole image, in clusters.  Regions are [first, first + n). */
struct layout {
  const char *name;             /* for messages */
  const struct qcow2_create_options *opts;
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint32_t refcount_order;
  bool ext_l2;
  bool prealloc;                /* L2 tables and data clusters exist */
  uint64_t size;                /* virtual size, multiple of 512 */
  uint32_t l2_bits;             /* log2 of entries per L2 table */
  uint32_t rb_bits;             /* log2 of refcounts per refcount block */
  uint64_t l1_size;             /* L1 entries */
  uint64_t reftable, reftable_n;
  uint64_t refblocks, refblocks_n;
  uint64_t l1, l1_n;
  uint64_t l2, l2_n;
  uint64_t data, data_n;
  uint64_t end;                 /* clusters in the file */
};

static inline uint64_t
div_round_up (uint64_t a, uint64_t b)
{
  return a / b + (a % b != 0);
}

static inline uint64_t
cluster_offset (const struct layout *lo, uint64_t cluster)
{
  return cluster << lo->cluster_bits;
}

static int
einval (const char *name, const char *msg)
{
  nbdkit_error ("%s: %s", name, msg);
  errno = EINVAL;
  return -1;
}

/* The option checks, in qemu-img's order and with its rules. */
static int
check_options (const char *name, const struct qcow2_create_options *opts,
               struct layout *lo)
{
  uint32_t cs = opts->cluster_size ? opts->cluster_size
                                   : DEFAULT_CLUSTER_SIZE;
  uint32_t rb = opts->refcount_bits ? opts->refcount_bits
                                    : DEFAULT_REFCOUNT_BITS;
  uint32_t version = opts->version ? opts->version : 3;

  if (cs < 512 || cs > (UINT32_C(1) << MAX_CLUSTER_BITS) || (cs & (cs - 1))) {
    nbdkit_error ("%s: cluster size %" PRIu32 " must be a power of 2 "
                  "between 512 and 2M", name, cs);
    errno = EINVAL;
    return -1;
  }
  if (rb == 0 || rb > 64 || (rb & (rb - 1))) {
    nbdkit_error ("%s: refcount width %" PRIu32 " must be a power of 2 "
                  "from 1 to 64 bits", name, rb);
    errno = EINVAL;
    return -1;
  }
  if (version != 2 && version != 3)
    return einval (name, "compat must be 0.10 (version 2) or 1.1 "
                   "(version 3)");
  if (version == 2) {
    if (opts->extended_l2)
      return einval (name, "extended L2 entries need compat=1.1 "
                     "(qcow2 version 3)");
    if (opts->zstd)
      return einval (name, "compression type zstd needs compat=1.1 "
                     "(qcow2 version 3)");
    if (rb != 16)
      return einval (name, "refcount widths other than 16 bits need "
                     "compat=1.1 (qcow2 version 3)");
  }
  if (opts->extended_l2 && cs < 16384)
    return einval (name, "extended L2 entries need a cluster size of at "
                   "least 16K");
  if (opts->zstd && !qcow2_have_zstd ())
    return einval (name, "compression type zstd needs a plugin built "
                   "with libzstd");
  if (opts->backing_file) {
    if (opts->backing_format == NULL)
      return einval (name, "a backing file needs its format "
                     "(backing-format=qcow2 or raw), as qemu-img -F");
    if (strcmp (opts->backing_format, "qcow2") != 0 &&
        strcmp (opts->backing_format, "raw") != 0)
      return einval (name, "backing file format must be qcow2 or raw");
    if (opts->backing_file[0] == '\0')
      return einval (name, "backing file name is empty");
    if (strlen (opts->backing_file) > MAX_BACKING_NAME)
      return einval (name, "backing file name is longer than 1023 bytes");
    if (opts->preallocation != QCOW2_PREALLOC_OFF && !opts->extended_l2)
      return einval (name, "a backing file and preallocation can only be "
                     "used together with extended L2 entries "
                     "(extended-l2=on), as in qemu-img");
  }
  else if (opts->backing_format)
    return einval (name, "backing-format needs a backing file");
  if ((unsigned) opts->preallocation > QCOW2_PREALLOC_FULL)
    return einval (name, "unknown preallocation mode");
  if (!opts->size_from_backing_file && opts->size > MAX_VIRTUAL_SIZE) {
    nbdkit_error ("%s: virtual size %" PRIu64 " is too large (limit "
                  "%" PRIu64 ")", name, opts->size, MAX_VIRTUAL_SIZE);
    errno = EFBIG;
    return -1;
  }
  if (opts->size_from_backing_file && !opts->backing_file)
    return einval (name, "the image size is required (size=) when there "
                   "is no backing file");

  lo->name = name;
  lo->opts = opts;
  lo->version = version;
  lo->cluster_bits = __builtin_ctz (cs);
  lo->cluster_size = cs;
  lo->refcount_order = __builtin_ctz (rb);
  lo->ext_l2 = opts->extended_l2;
  lo->prealloc = opts->preallocation != QCOW2_PREALLOC_OFF;
  lo->l2_bits = lo->cluster_bits - (lo->ext_l2 ? 4 : 3);
  lo->rb_bits = lo->cluster_bits + 3 - lo->refcount_order;
  return 0;
}

/* Open the backing file, as the image will name it (relative names are
 * relative to the image's directory), to check that it exists, is not
 * the image itself and has the stated format, and to read its size.
 */
static int
check_backing (const char *name, const struct qcow2_create_options *opts,
               uint64_t *size)
{
  char *dir = NULL, *path = NULL;
  struct stat st, self;
  uint8_t hdr[32];
  uint32_t magic;
  uint64_t v;
  int fd = -1, r = -1;
  ssize_t n;

  if (opts->backing_file[0] == '/')
    path = strdup (opts->backing_file);
  else if ((dir = dir_of (name)) != NULL &&
           asprintf (&path, "%s/%s", dir, opts->backing_file) == -1)
    path = NULL;
  if (path == NULL) {
    nbdkit_error ("%s: %m", name);
    goto out;
  }
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &st) == -1) {
    nbdkit_error ("%s: cannot open backing file %s: %m", name, path);
    goto out;
  }
  if (stat (name, &self) == 0 &&
      self.st_dev == st.st_dev && self.st_ino == st.st_ino) {
    nbdkit_error ("%s: the backing file %s is the image itself",
                  name, path);
    errno = ELOOP;
    goto out;
  }

  if (strcmp (opts->backing_format, "qcow2") == 0) {
    memset (hdr, 0, sizeof hdr);
    n = pread (fd, hdr, sizeof hdr, 0);
    if (n == -1) {
      nbdkit_error ("%s: reading backing file %s: %m", name, path);
      goto out;
    }
    memcpy (&magic, &hdr[HDR_MAGIC], 4);
    if (n < (ssize_t) sizeof hdr || be32toh (magic) != QCOW2_MAGIC) {
      nbdkit_error ("%s: backing file %s is not a qcow2 image "
                    "(backing-format=qcow2)", name, path);
      errno = EINVAL;
      goto out;
    }
    memcpy (&v, &hdr[HDR_SIZE], 8);
    *size = be64toh (v);
  }
  else if (S_ISBLK (st.st_mode)) {
    off_t end = lseek (fd, 0, SEEK_END);
    if (end == -1) {
      nbdkit_error ("%s: size of backing file %s: %m", name, path);
      goto out;
    }
    *size = end;
  }
  else
    *size = st.st_size;
  r = 0;

 out:
  if (fd >= 0)
    close (fd);
  free (path);
  free (dir);
  return r;
}

/* Bytes of cluster 0 used by the header, its extensions (with or
 * without the feature name table) and the backing file name.
 */
static uint64_t
cluster0_bytes (const struct layout *lo, bool feature_table,
                uint64_t *name_offset)
{
  const struct qcow2_create_options *opts = lo->opts;
  uint64_t n = lo->version == 2 ? HDR_V2_LENGTH : HDR_V3_LENGTH;

  if (opts->backing_format)
    n += 8 + round_up_pow2 (strlen (opts->backing_format), 8);
  if (feature_table)
    n += 8 + NR_FEATURE_NAMES * FEATURE_ENTRY_SIZE;
  n += 8;                       /* end of extensions */
  *name_offset = n;
  if (opts->backing_file)
    n += strlen (opts->backing_file);
  return n;
}

/* Compute where everything goes, refusing what cannot be represented. */
static int
plan (struct layout *lo)
{
  const uint64_t cs = lo->cluster_size;
  const uint64_t rb_entries = UINT64_C(1) << lo->rb_bits;
  uint64_t guest_clusters, base, r = 0, b = 0, nr, nb, name_off;
  uint64_t l2_coverage_bits = lo->cluster_bits + lo->l2_bits;

  /* The L1 table, QEMU's limit.  size <= 2^61 so nothing overflows. */
  lo->l1_size = (lo->size + (UINT64_C(1) << l2_coverage_bits) - 1)
                >> l2_coverage_bits;
  if (lo->l1_size * 8 > MAX_L1_BYTES) {
    nbdkit_error ("%s: virtual size %" PRIu64 " is too large for cluster "
                  "size %" PRIu64 " (the L1 table would need %" PRIu64
                  " bytes, limit %" PRIu64 "): use a larger cluster size",
                  lo->name, lo->size, cs, lo->l1_size * 8, MAX_L1_BYTES);
    errno = EFBIG;
    return -1;
  }
  lo->l1_n = div_round_up (lo->l1_size * 8, cs);

  /* Header, extensions and backing name must fit in cluster 0. */
  if (cluster0_bytes (lo, lo->version >= 3, &name_off) > cs &&
      cluster0_bytes (lo, false, &name_off) > cs) {
    nbdkit_error ("%s: the header and backing file name do not fit in "
                  "one %" PRIu64 "-byte cluster: use a shorter backing "
                  "file name or a larger cluster size", lo->name, cs);
    errno = EINVAL;
    return -1;
  }

  if (lo->prealloc) {
    guest_clusters = (lo->size + cs - 1) >> lo->cluster_bits;
    lo->data_n = guest_clusters;
    lo->l2_n = lo->l1_size;
  }
  base = 1 + lo->l1_n + lo->l2_n + lo->data_n;

  /* Smallest R, B with B blocks covering base + R + B clusters and R
   * table clusters holding B entries.  Monotone, so iterating from 0
   * reaches it; base < 2^52 so nothing overflows.
   */
  for (;;) {
    nb = div_round_up (base + r + b, rb_entries);
    nr = div_round_up (nb * 8, cs);
    if (nb == b && nr == r)
      break;
    b = nb;
    r = nr;
  }
  if (r * cs > MAX_REFTABLE_BYTES) {
    nbdkit_error ("%s: preallocating %" PRIu64 " bytes with %" PRIu64
                  "-byte clusters and %u-bit refcounts needs a refcount "
                  "table of %" PRIu64 " bytes (limit %" PRIu64 "): use a "
                  "larger cluster size", lo->name, lo->size, cs,
                  1u << lo->refcount_order, r * cs, MAX_REFTABLE_BYTES);
    errno = EFBIG;
    return -1;
  }

  lo->reftable = 1;
  lo->reftable_n = r;
  lo->refblocks = lo->reftable + r;
  lo->refblocks_n = b;
  lo->l1 = lo->refblocks + b;
  lo->l2 = lo->l1 + lo->l1_n;
  lo->data = lo->l2 + lo->l2_n;
  lo->end = lo->data + lo->data_n;
  if (lo->end > (MAX_HOST_OFFSET >> lo->cluster_bits)) {
    nbdkit_error ("%s: preallocating %" PRIu64 " bytes would make a file "
                  "larger than the qcow2 limit of %" PRIu64 " bytes",
                  lo->name, lo->size, MAX_HOST_OFFSET);
    errno = EFBIG;
    return -1;
  }
  nbdkit_debug ("%s: layout (clusters of %" PRIu64 "): reftable %" PRIu64
                "+%" PRIu64 ", refblocks %" PRIu64 "+%" PRIu64 ", L1 %"
                PRIu64 "+%" PRIu64 ", L2 %" PRIu64 "+%" PRIu64 ", data %"
                PRIu64 "+%" PRIu64 ", end %" PRIu64,
                lo->name, cs, lo->reftable, lo->reftable_n,
                lo->refblocks, lo->refblocks_n, lo->l1, lo->l1_n,
                lo->l2, lo->l2_n, lo->data, lo->data_n, lo->end);
  return 0;
}

/* Fillers: put the contents of clusters [first, first + n) of a region
 * (counted from the region's start) into buf, which is zeroed.
 */
typedef void (*fill_fn) (const struct layout *lo, uint8_t *buf,
                         uint64_t first, uint64_t n);

static void
fill_reftable (const struct layout *lo, uint8_t *buf,
               uint64_t first, uint64_t n)
{
  uint64_t per = lo->cluster_size / 8;
  uint64_t i, e = first * per, last = min_u64 ((first + n) * per,
                                               lo->refblocks_n);

  for (i = 0; e < last; i++, e++)
    put_be64 (&buf[i * 8], cluster_offset (lo, lo->refblocks + e));
}

/* Refcount 1 for the first k entries of a block.  Sub-byte entries
 * start at the least significant bit; wider ones are big-endian.
 */
static void
set_ones (const struct layout *lo, uint8_t *block, uint64_t k)
{
  uint32_t order = lo->refcount_order;
  uint64_t j;

  if (order >= 3) {
    uint64_t w = UINT64_C(1) << (order - 3);
    for (j = 0; j < k; j++)
      block[j * w + w - 1] = 1;
  }
  else {
    uint64_t per_byte_mask = (UINT64_C(8) >> order) - 1;
    for (j = 0; j < k; j++)
      block[j >> (3 - order)] |= 1 << ((j & per_byte_mask) << order);
  }
}

static void
fill_refblocks (const struct layout *lo, uint8_t *buf,
                uint64_t first, uint64_t n)
{
  uint64_t per = UINT64_C(1) << lo->rb_bits;
  uint64_t i, start;

  for (i = 0; i < n; i++) {
    start = (first + i) * per;          /* first cluster it counts */
    if (start >= lo->end)
      break;
    set_ones (lo, &buf[i * lo->cluster_size], min_u64 (per, lo->end - start));
  }
}

static void
fill_l1 (const struct layout *lo, uint8_t *buf, uint64_t first, uint64_t n)
{
  uint64_t per = lo->cluster_size / 8;
  uint64_t i, e = first * per, last = min_u64 ((first + n) * per,
                                               lo->l1_size);

  for (i = 0; e < last; i++, e++)
    put_be64 (&buf[i * 8],
              cluster_offset (lo, lo->l2 + e) | QCOW_OFLAG_COPIED);
}

/* Every guest cluster g maps to data cluster g.  With extended L2 the
 * bitmap word stays 0: no subcluster is allocated yet.
 */
static void
fill_l2 (const struct layout *lo, uint8_t *buf, uint64_t first, uint64_t n)
{
  uint32_t shift = lo->ext_l2 ? 4 : 3;
  uint64_t i, g = first << lo->l2_bits;
  uint64_t last = min_u64 ((first + n) << lo->l2_bits, lo->data_n);

  for (i = 0; g < last; i++, g++)
    put_be64 (&buf[i << shift],
              cluster_offset (lo, lo->data + g) | QCOW_OFLAG_COPIED);
}

/* Write n clusters of a region starting at cluster 'start', filling
 * the buffer one chunk at a time.
 */
static int
write_region (struct qcow2_io *io, const struct layout *lo, uint64_t start,
              uint64_t n, fill_fn fill, uint8_t *buf, const char *what)
{
  uint64_t per_chunk = WRITE_BUFFER_SIZE >> lo->cluster_bits;
  uint64_t done, k;

  for (done = 0; done < n; done += k) {
    k = min_u64 (per_chunk, n - done);
    memset (buf, 0, k << lo->cluster_bits);
    fill (lo, buf, done, k);
    if (io_pwrite (io, buf, k << lo->cluster_bits,
                   cluster_offset (lo, start + done)) == -1) {
      nbdkit_error ("%s: writing the %s: %m", lo->name, what);
      return -1;
    }
  }
  return 0;
}

/* Preallocation of the data clusters beyond metadata. */
static int
write_data (struct qcow2_io *io, const struct layout *lo, uint8_t *buf)
{
  uint64_t off = cluster_offset (lo, lo->data);
  uint64_t len = lo->data_n << lo->cluster_bits;
  uint64_t done, k;

  switch (lo->opts->preallocation) {
  case QCOW2_PREALLOC_FALLOC:
    if (len > 0 && io_preallocate (io, len, off) == -1) {
      nbdkit_error ("%s: fallocate of %" PRIu64 " bytes: %m",
                    lo->name, len);
      return -1;
    }
    return 0;
  case QCOW2_PREALLOC_FULL:
    memset (buf, 0, WRITE_BUFFER_SIZE);
    for (done = 0; done < len; done += k) {
      k = min_u64 (WRITE_BUFFER_SIZE, len - done);
      if (io_pwrite (io, buf, k, off + done) == -1) {
        nbdkit_error ("%s: writing zeros to the data clusters: %m",
                      lo->name);
        return -1;
      }
    }
    return 0;
  default:
    return 0;
  }
}

/* Cluster 0: the header, its extensions and the backing file name. */
static void
fill_header (const struct layout *lo, uint8_t *buf)
{
  const struct qcow2_create_options *opts = lo->opts;
  bool feature_table;
  uint64_t p, name_off;
  size_t i, len;

  feature_table = lo->version >= 3 &&
                  cluster0_bytes (lo, true, &name_off) <= lo->cluster_size;
  cluster0_bytes (lo, feature_table, &name_off);

  memset (buf, 0, lo->cluster_size);
  put_be32 (&buf[HDR_MAGIC], QCOW2_MAGIC);
  put_be32 (&buf[HDR_VERSION], lo->version);
  if (opts->backing_file) {
    put_be64 (&buf[HDR_BACKING_FILE_OFFSET], name_off);
    put_be32 (&buf[HDR_BACKING_FILE_SIZE], strlen (opts->backing_file));
  }
  put_be32 (&buf[HDR_CLUSTER_BITS], lo->cluster_bits);
  put_be64 (&buf[HDR_SIZE], lo->size);
  put_be32 (&buf[HDR_CRYPT_METHOD], CRYPT_NONE);
  put_be32 (&buf[HDR_L1_SIZE], lo->l1_size);
  /* QEMU leaves the L1 offset 0 for an empty L1 table. */
  put_be64 (&buf[HDR_L1_TABLE_OFFSET],
            lo->l1_size ? cluster_offset (lo, lo->l1) : 0);
  put_be64 (&buf[HDR_REFCOUNT_TABLE_OFFSET],
            cluster_offset (lo, lo->reftable));
  put_be32 (&buf[HDR_REFCOUNT_TABLE_CLUSTERS], lo->reftable_n);
  put_be32 (&buf[HDR_NB_SNAPSHOTS], 0);
  put_be64 (&buf[HDR_SNAPSHOTS_OFFSET], 0);
  if (lo->version >= 3) {
    put_be64 (&buf[HDR_INCOMPATIBLE_FEATURES],
              (opts->zstd ? INCOMPAT_COMPRESSION : 0) |
              (lo->ext_l2 ? INCOMPAT_EXTL2 : 0));
    put_be64 (&buf[HDR_COMPATIBLE_FEATURES], 0);
    put_be64 (&buf[HDR_AUTOCLEAR_FEATURES], 0);
    put_be32 (&buf[HDR_REFCOUNT_ORDER], lo->refcount_order);
    put_be32 (&buf[HDR_HEADER_LENGTH], HDR_V3_LENGTH);
    buf[HDR_COMPRESSION_TYPE] = opts->zstd ? COMPRESSION_ZSTD
                                           : COMPRESSION_DEFLATE;
    p = HDR_V3_LENGTH;
  }
  else
    p = HDR_V2_LENGTH;

  /* Extensions, in QEMU's order; the area is already zero-padded. */
  if (opts->backing_format) {
    len = strlen (opts->backing_format);
    put_be32 (&buf[p], EXT_BACKING_FORMAT);
    put_be32 (&buf[p + 4], len);
    memcpy (&buf[p + 8], opts->backing_format, len);
    p += 8 + round_up_pow2 (len, 8);
  }
  if (feature_table) {
    put_be32 (&buf[p], EXT_FEATURE_TABLE);
    put_be32 (&buf[p + 4], NR_FEATURE_NAMES * FEATURE_ENTRY_SIZE);
    p += 8;
    for (i = 0; i < NR_FEATURE_NAMES; i++, p += FEATURE_ENTRY_SIZE) {
      buf[p] = feature_names[i].type;
      buf[p + 1] = feature_names[i].bit;
      memcpy (&buf[p + 2], feature_names[i].name,
              strlen (feature_names[i].name));
    }
  }
  put_be32 (&buf[p], EXT_END);     /* and a zero length */
  p += 8;

  if (opts->backing_file)
    memcpy (&buf[p], opts->backing_file, strlen (opts->backing_file));
}

/* Write the whole image into io, which is empty. */
static int
write_image (struct qcow2_io *io, const struct layout *lo)
{
  uint8_t *buf;
  int r = -1;

  buf = malloc (WRITE_BUFFER_SIZE);
  if (buf == NULL) {
    nbdkit_error ("%s: malloc: %m", lo->name);
    return -1;
  }

  /* The file ends at the last cluster; what is not written reads as 0. */
  if (io_truncate (io, cluster_offset (lo, lo->end)) == -1) {
    nbdkit_error ("%s: extending the file to %" PRIu64 " bytes: %m",
                  lo->name, cluster_offset (lo, lo->end));
    goto out;
  }
  if (write_region (io, lo, lo->reftable, lo->reftable_n, fill_reftable,
                    buf, "refcount table") == -1 ||
      write_region (io, lo, lo->refblocks, lo->refblocks_n, fill_refblocks,
                    buf, "refcount blocks") == -1)
    goto out;
  if (lo->prealloc &&
      (write_region (io, lo, lo->l1, lo->l1_n, fill_l1,
                     buf, "L1 table") == -1 ||
       write_region (io, lo, lo->l2, lo->l2_n, fill_l2,
                     buf, "L2 tables") == -1 ||
       write_data (io, lo, buf) == -1))
    goto out;

  /* Only now the header: until here the file is not a qcow2 image. */
  fill_header (lo, buf);
  if (io_pwrite (io, buf, lo->cluster_size, 0) == -1) {
    nbdkit_error ("%s: writing the header: %m", lo->name);
    goto out;
  }
  if (io_flush (io) == -1) {
    nbdkit_error ("%s: flush: %m", lo->name);
    goto out;
  }
  r = 0;
 out:
  free (buf);
  return r;
}

/* Open the file to create: a new one, or an existing regular file when
 * overwriting (truncated only once we hold the writer's locks).
 */
static struct qcow2_io *
open_target (const char *name, const struct qcow2_create_options *opts,
             bool *created)
{
  struct qcow2_io *io;
  struct stat st;
  int fd;

  *created = false;
  fd = open (name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd >= 0)
    *created = true;
  else if (errno != EEXIST) {
    nbdkit_error ("%s: cannot create: %m", name);
    return NULL;
  }
  else if (!opts->overwrite) {
    nbdkit_error ("%s: file exists: refusing to overwrite it "
                  "(use create=force to replace it)", name);
    errno = EEXIST;
    return NULL;
  }
  else {
    fd = open (name, O_RDWR | O_CLOEXEC);
    if (fd == -1 || fstat (fd, &st) == -1) {
      nbdkit_error ("%s: cannot open: %m", name);
      if (fd >= 0)
        close (fd);
      return NULL;
    }
    if (!S_ISREG (st.st_mode)) {
      nbdkit_error ("%s: not a regular file: refusing to replace it", name);
      close (fd);
      errno = EINVAL;
      return NULL;
    }
  }

  io = qcow2_io_from_fd (fd, false);
  if (io == NULL) {
    nbdkit_error ("%s: %m", name);
    close (fd);
    goto fail;
  }
  if (!opts->no_locking && lock_image_file (io, name, true) == -1) {
    io_close (io);
    goto fail;
  }
  if (!*created && io_truncate (io, 0) == -1) {
    nbdkit_error ("%s: truncating: %m", name);
    io_close (io);
    return NULL;
  }
  return io;

 fail:
  if (*created)
    unlink (name);
  return NULL;
}

int
qcow2_create (const char *filename, const struct qcow2_create_options *opts)
{
  struct qcow2_create_options o = *opts;
  struct layout lo = { 0 };
  struct qcow2_io *io;
  bool created;
  int saved_errno;

  if (check_options (filename, opts, &lo) == -1)
    return -1;
  if (o.backing_file) {
    uint64_t bsize;
    if (check_backing (filename, &o, &bsize) == -1)
      return -1;
    if (o.size_from_backing_file) {
      o.size = bsize;
      if (o.size > MAX_VIRTUAL_SIZE) {
        nbdkit_error ("%s: backing file size %" PRIu64 " is too large",
                      filename, o.size);
        errno = EFBIG;
        return -1;
      }
    }
  }
  lo.opts = &o;
  /* As qemu-img does, round the size up to whole 512-byte sectors. */
  lo.size = round_up_pow2 (o.size, 512);
  if (plan (&lo) == -1)
    return -1;

  io = open_target (filename, &o, &created);
  if (io == NULL)
    return -1;
  if (write_image (io, &lo) == -1) {
    saved_errno = errno;
    io_close (io);
    unlink (filename);
    errno = saved_errno;
    return -1;
  }
  io_close (io);
  nbdkit_debug ("%s: created qcow2 v%" PRIu32 " image, %" PRIu64
                " bytes virtual, %" PRIu64 " bytes on disk",
                filename, lo.version, lo.size, cluster_offset (&lo, lo.end));
  return 0;
}
