/* nbdkit-qcow2: the image header and its extensions.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * What this file owns: parsing and validating the header and its
 * extensions (header_read), the three feature words and their writer
 * (header_write_features), marking the image corrupt
 * (header_mark_corrupt), preparing the header for the first write
 * (header_prepare_write: clear the autoclear bits this code does not
 * maintain, set the dirty bit for lazy refcounts) and marking it clean
 * on a clean close (header_mark_clean).  It calls only the io layer and
 * compress.c's qcow2_have_zstd, nothing above it.
 *
 * header_read validates every header field and extension before anything
 * else uses it: an offset or size that comes from the file is checked
 * against the file size and against fixed limits (format.h) before any
 * memory is allocated for it, and every failure names the field and the
 * bad value.  Only what cannot be served is refused: unknown
 * incompatible feature bits, encryption, a version other than 2 or 3,
 * and a compression type this build cannot decode.  The steps run in
 * the order the fields depend on each other, and the first failure is
 * the one reported:
 *
 *   read_first_cluster -> read_fixed_fields (magic, version, clusters)
 *   -> read_version_fields (v3: feature words, header length)
 *   -> read_extensions -> check_features -> check_encoding
 *   -> derive_geometry -> check_l1_table -> check_other_tables
 *   -> read_backing_name -> check_data_file
 *
 * The header is only ever rewritten in place, a few fields at a time,
 * so fields and extensions this code does not understand are preserved
 * as the spec requires.  This file writes only the feature words; the
 * refcount table pointer is rewritten by refcount.c (grow_reftable) and
 * the whole header is written once, by create.c.
 *
 * Locking: header_read runs at open and header_mark_clean at close, when
 * no request runs; the other writers are called with img->lock held
 * exclusively, and header_write_ready needs it only shared.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"

/* Name a feature bit from the image's own feature table if it has one. */
static void
name_features (const uint8_t *table, uint32_t table_len, int type,
               uint64_t bits, char *out, size_t outlen)
{
  size_t used = 0;
  int bit;

  out[0] = '\0';
  for (bit = 0; bit < 64; bit++) {
    const char *name = NULL;
    char namebuf[47];
    uint32_t i;

    if (!(bits & (UINT64_C(1) << bit)))
      continue;
    for (i = 0; table && i + 48 <= table_len; i += 48) {
      if (table[i] == type && table[i+1] == bit) {
        memcpy (namebuf, &table[i+2], 46);
        namebuf[46] = '\0';
        name = namebuf;
        break;
      }
    }
    if (used < outlen)
      used += snprintf (out + used, outlen - used, "%s%d%s%s%s",
                        used ? ", " : "", bit,
                        name ? " (" : "", name ? name : "", name ? ")" : "");
  }
}

static char *
copy_string (const uint8_t *p, size_t len)
{
  char *s = malloc (len + 1);
  if (s == NULL)
    return NULL;
  memcpy (s, p, len);
  s[len] = '\0';
  return s;
}

/* One bit per extension type read below, to refuse a duplicate; 0 for
 * the types this code ignores (and preserves).
 */
static uint32_t
extension_bit (uint32_t type)
{
  switch (type) {
  case EXT_BACKING_FORMAT: return 1;
  case EXT_FEATURE_TABLE:  return 2;
  case EXT_BITMAPS:        return 4;
  case EXT_CRYPTO:         return 8;
  case EXT_DATA_FILE:      return 16;
  default:                 return 0;
  }
}

/* Replace *dst by a copy of a string extension of at most max bytes. */
static int
read_string_extension (struct qcow2_image *img, uint32_t type,
                       const uint8_t *data, uint32_t len, uint32_t max,
                       char **dst)
{
  if (len > max) {
    nbdkit_error ("%s: header extension %#" PRIx32 " string is too long "
                  "(%" PRIu32 " bytes)", img->name, type, len);
    errno = EIO;
    return -1;
  }
  free (*dst);
  *dst = copy_string (data, len);
  if (*dst == NULL)
    return -1;
  return 0;
}

/* Read one extension whose 'len' bytes of data are inside the area. */
static int
read_extension (struct qcow2_image *img, uint32_t type,
                const uint8_t *data, uint32_t len,
                const uint8_t **ftable, uint32_t *ftable_len)
{
  switch (type) {
  case EXT_BACKING_FORMAT:
    return read_string_extension (img, type, data, len, MAX_BACKING_NAME,
                                  &img->backing_format);
  case EXT_FEATURE_TABLE:
    *ftable = data;
    *ftable_len = len;
    return 0;
  case EXT_BITMAPS:
    if (len < 24) {
      nbdkit_error ("%s: bitmaps header extension is too short (%" PRIu32
                    " bytes)", img->name, len);
      errno = EIO;
      return -1;
    }
    img->nb_bitmaps = get_be32 (data);
    img->bitmap_dir_size = get_be64 (data + 8);
    img->bitmap_dir_offset = get_be64 (data + 16);
    return 0;
  case EXT_CRYPTO:
    if (len < 16) {
      nbdkit_error ("%s: crypto header extension is too short",
                    img->name);
      errno = EIO;
      return -1;
    }
    img->crypto_offset = get_be64 (data);
    img->crypto_length = get_be64 (data + 8);
    return 0;
  case EXT_DATA_FILE:
    return read_string_extension (img, type, data, len, 4096,
                                  &img->data_file_name);
  default:                      /* unknown: ignored, preserved */
    return 0;
  }
}

/* Walk the extension area.  'buf' holds the first 'buflen' bytes of the
 * file; the area ends at 'end'.
 */
static int
read_extensions (struct qcow2_image *img, const uint8_t *buf, uint64_t end,
                 const uint8_t **ftable, uint32_t *ftable_len)
{
  uint64_t off = img->version >= 3 ? img->header_length : HDR_V2_LENGTH;
  uint32_t seen = 0;

  while (off + 8 <= end) {
    uint32_t type = get_be32 (&buf[off]);
    uint32_t len = get_be32 (&buf[off+4]);

    if (type == EXT_END)
      break;
    if (len > end - off - 8) {
      nbdkit_error ("%s: header extension %#" PRIx32 " at %#" PRIx64
                    " (length %" PRIu32 ") overruns the header area",
                    img->name, type, off, len);
      errno = EIO;
      return -1;
    }
    if (seen & extension_bit (type)) {
      nbdkit_error ("%s: header extension %#" PRIx64 " appears twice",
                    img->name, (uint64_t) type);
      errno = EIO;
      return -1;
    }
    seen |= extension_bit (type);
    if (read_extension (img, type, &buf[off+8], len,
                        ftable, ftable_len) == -1)
      return -1;
    off += 8 + round_up_pow2 (len, 8);
  }
  img->ext_end = off;
  return 0;
}

/* Check that a table [off, off+len) is aligned and inside the file. */
static int
check_table (struct qcow2_image *img, const char *what, uint64_t off,
             uint64_t len, uint64_t max, uint64_t file_size)
{
  if (len > max) {
    nbdkit_error ("%s: %s is too large (%" PRIu64 " bytes, limit %"
                  PRIu64 ")", img->name, what, len, max);
    errno = EIO;
    return -1;
  }
  if (len == 0)
    return 0;
  if (off == 0) {
    nbdkit_error ("%s: %s at offset 0 overlaps the image header",
                  img->name, what);
    errno = EIO;
    return -1;
  }
  if (offset_into_cluster (img, off) != 0) {
    nbdkit_error ("%s: %s offset %#" PRIx64 " is not cluster aligned",
                  img->name, what, off);
    errno = EIO;
    return -1;
  }
  if (off > file_size || len > file_size - off) {
    nbdkit_error ("%s: %s at %#" PRIx64 " (%" PRIu64 " bytes) extends "
                  "beyond end of file (size %#" PRIx64 ")",
                  img->name, what, off, len, file_size);
    errno = EIO;
    return -1;
  }
  return 0;
}

static int
fail (struct qcow2_image *img, int err, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
fail (struct qcow2_image *img, int err, const char *fmt, ...)
{
  va_list ap;
  char *msg = NULL;

  va_start (ap, fmt);
  if (vasprintf (&msg, fmt, ap) == -1)
    msg = NULL;
  va_end (ap);
  nbdkit_error ("%s: %s", img->name, msg ? msg : fmt);
  free (msg);
  errno = err;
  return -1;
}

/* The header and its extensions live in the first cluster, which is at
 * most 2 MiB.  Check that the file can hold a header and return what is
 * there of that cluster (*buflen bytes), or NULL.
 */
static uint8_t *
read_first_cluster (struct qcow2_image *img, int64_t file_size,
                    uint64_t *buflen)
{
  uint8_t *buf;

  if (file_size < HDR_V2_LENGTH) {
    fail (img, EIO, "not a qcow2 image (file too short: %" PRIi64
          " bytes)", file_size);
    return NULL;
  }
  *buflen = min_u64 (file_size, UINT64_C(1) << MAX_CLUSTER_BITS);
  buf = malloc (*buflen);
  if (buf == NULL)
    return NULL;
  if (io_pread (img->io, buf, *buflen, 0) == -1) {
    nbdkit_error ("%s: reading header: %m", img->name);
    free (buf);
    return NULL;
  }
  return buf;
}

/* The fields every version has: magic, version, the fixed fields, and
 * the cluster size, which everything after depends on.
 */
static int
read_fixed_fields (struct qcow2_image *img, const uint8_t *buf)
{
  uint32_t magic = get_be32 (&buf[HDR_MAGIC]);

  if (magic != QCOW2_MAGIC)
    return fail (img, EIO, "not a qcow2 image (bad magic %#" PRIx32 ")",
                 magic);
  img->version = get_be32 (&buf[HDR_VERSION]);
  if (img->version != 2 && img->version != 3)
    return fail (img, ENOTSUP, "unsupported qcow2 version %" PRIu32
                 " (only 2 and 3 are supported)", img->version);
  img->backing_file_offset = get_be64 (&buf[HDR_BACKING_FILE_OFFSET]);
  img->backing_file_size = get_be32 (&buf[HDR_BACKING_FILE_SIZE]);
  img->cluster_bits = get_be32 (&buf[HDR_CLUSTER_BITS]);
  img->size = get_be64 (&buf[HDR_SIZE]);
  img->crypt_method = get_be32 (&buf[HDR_CRYPT_METHOD]);
  img->l1_size = get_be32 (&buf[HDR_L1_SIZE]);
  img->l1_offset = get_be64 (&buf[HDR_L1_TABLE_OFFSET]);
  img->reftable_offset = get_be64 (&buf[HDR_REFCOUNT_TABLE_OFFSET]);
  img->reftable_clusters = get_be32 (&buf[HDR_REFCOUNT_TABLE_CLUSTERS]);
  img->nb_snapshots = get_be32 (&buf[HDR_NB_SNAPSHOTS]);
  img->snapshots_offset = get_be64 (&buf[HDR_SNAPSHOTS_OFFSET]);

  if (img->cluster_bits < MIN_CLUSTER_BITS ||
      img->cluster_bits > MAX_CLUSTER_BITS)
    return fail (img, EIO, "cluster_bits %" PRIu32 " out of range (%d-%d)",
                 img->cluster_bits, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
  img->cluster_size = UINT32_C(1) << img->cluster_bits;
  return 0;
}

/* Version 2 has fixed values for what version 3 stores: the feature
 * words, the refcount order, the header length, the compression type.
 */
static int
read_version_fields (struct qcow2_image *img, const uint8_t *buf,
                     uint64_t buflen, int64_t file_size)
{
  if (img->version == 2) {
    img->header_length = HDR_V2_LENGTH;
    img->refcount_order = 4;
    return 0;
  }
  if (file_size < HDR_V3_MIN_LENGTH)
    return fail (img, EIO, "not a qcow2 image (file too short for a "
                 "version 3 header: %" PRIi64 " bytes)", file_size);
  img->incompat = get_be64 (&buf[HDR_INCOMPATIBLE_FEATURES]);
  img->compat = get_be64 (&buf[HDR_COMPATIBLE_FEATURES]);
  img->autoclear = get_be64 (&buf[HDR_AUTOCLEAR_FEATURES]);
  img->refcount_order = get_be32 (&buf[HDR_REFCOUNT_ORDER]);
  img->header_length = get_be32 (&buf[HDR_HEADER_LENGTH]);
  if (img->header_length < HDR_V3_MIN_LENGTH ||
      img->header_length % 8 != 0 ||
      img->header_length > img->cluster_size ||
      img->header_length > buflen)
    return fail (img, EIO, "header_length %" PRIu32 " is invalid (must be "
                 "a multiple of 8, at least %d and inside the first "
                 "cluster)", img->header_length, HDR_V3_MIN_LENGTH);
  if (img->header_length > HDR_COMPRESSION_TYPE)
    img->compression_type = buf[HDR_COMPRESSION_TYPE];
  return 0;
}

/* The extensions end at the end of the first cluster, or earlier where
 * the backing file name starts.
 */
static uint64_t
extensions_end (const struct qcow2_image *img, uint64_t buflen)
{
  uint64_t end = min_u64 (img->cluster_size, buflen);

  if (img->backing_file_offset > 0 && img->backing_file_offset < end)
    end = img->backing_file_offset;
  return end;
}

/* Features.  Unknown incompatible bits and encryption are the only
 * things refused for reading.  The feature table names the bits.
 */
static int
check_features (struct qcow2_image *img,
                const uint8_t *ftable, uint32_t ftable_len)
{
  uint64_t unknown = img->incompat & ~INCOMPAT_KNOWN;

  if (unknown) {
    char names[512];
    name_features (ftable, ftable_len, 0, unknown, names, sizeof names);
    return fail (img, ENOTSUP, "image uses unknown incompatible feature "
                 "bit(s) %s (%#" PRIx64 "); refusing to open it",
                 names, unknown);
  }
  if (img->crypt_method == CRYPT_AES)
    return fail (img, ENOTSUP, "encrypted images are not supported "
                 "(crypt_method 1, AES)");
  if (img->crypt_method == CRYPT_LUKS)
    return fail (img, ENOTSUP, "encrypted images are not supported "
                 "(crypt_method 2, LUKS)");
  if (img->crypt_method != CRYPT_NONE)
    return fail (img, ENOTSUP, "unknown encryption method (crypt_method %"
                 PRIu32 ")", img->crypt_method);
  return 0;
}

/* How refcounts and compressed clusters are encoded. */
static int
check_encoding (struct qcow2_image *img)
{
  if (img->refcount_order > 6)
    return fail (img, EIO, "refcount_order %" PRIu32 " is invalid "
                 "(maximum 6)", img->refcount_order);
  img->refcount_bits = UINT32_C(1) << img->refcount_order;

  if (!!(img->incompat & INCOMPAT_COMPRESSION) !=
      (img->compression_type != COMPRESSION_DEFLATE))
    return fail (img, EIO, "compression type %u does not agree with the "
                 "compression type feature bit", img->compression_type);
  if (img->compression_type > COMPRESSION_ZSTD)
    return fail (img, ENOTSUP, "unknown compression type %u",
                 img->compression_type);
  if (img->compression_type == COMPRESSION_ZSTD && !qcow2_have_zstd ())
    return fail (img, ENOTSUP, "image uses zstd compression but this "
                 "plugin was built without libzstd");
  return 0;
}

/* Geometry: L2 entry and subcluster sizes, refcount block entries, and
 * the limit on the virtual size.
 */
static int
derive_geometry (struct qcow2_image *img)
{
  img->ext_l2 = !!(img->incompat & INCOMPAT_EXTL2);
  if (img->ext_l2 && img->cluster_bits < 14)
    return fail (img, EIO, "extended L2 entries need clusters of at least "
                 "16 KiB (cluster_bits %" PRIu32 ", subclusters would be "
                 "smaller than 512 bytes)", img->cluster_bits);
  img->l2_entry_shift = img->ext_l2 ? 4 : 3;
  img->l2_bits = img->cluster_bits - img->l2_entry_shift;
  img->subcluster_bits = img->ext_l2 ? img->cluster_bits - 5
                                     : img->cluster_bits;
  img->rb_bits = img->cluster_bits + 3 - img->refcount_order;

  if (img->size > MAX_VIRTUAL_SIZE)
    return fail (img, EFBIG, "virtual size %" PRIu64 " is too large",
                 img->size);
  return 0;
}

/* The active L1 table: inside the file and big enough to map the whole
 * virtual size.
 */
static int
check_l1_table (struct qcow2_image *img, int64_t file_size)
{
  uint64_t need;

  /* L1 entries needed to map the whole virtual size. */
  need = (img->size + (UINT64_C(1) << (img->cluster_bits + img->l2_bits))
          - 1) >> (img->cluster_bits + img->l2_bits);
  if (check_table (img, "L1 table", img->l1_offset,
                   (uint64_t) img->l1_size * 8, MAX_L1_BYTES,
                   file_size) == -1)
    return -1;
  if (img->l1_size < need)
    return fail (img, EIO, "L1 table too small for the virtual size (%"
                 PRIu32 " entries, %" PRIu64 " needed)", img->l1_size, need);
  return 0;
}

/* The other tables the header points to: the refcount table, the
 * snapshot table and the bitmap directory.
 */
static int
check_other_tables (struct qcow2_image *img, int64_t file_size)
{
  if (img->reftable_clusters == 0)
    return fail (img, EIO, "refcount table is empty "
                 "(refcount_table_clusters 0)");
  if (check_table (img, "refcount table", img->reftable_offset,
                   (uint64_t) img->reftable_clusters << img->cluster_bits,
                   MAX_REFTABLE_BYTES, file_size) == -1)
    return -1;
  if (img->nb_snapshots > MAX_SNAPSHOTS)
    return fail (img, EIO, "too many snapshots (%" PRIu32 ", limit %d)",
                 img->nb_snapshots, MAX_SNAPSHOTS);
  if (img->nb_snapshots > 0 &&
      check_table (img, "snapshot table", img->snapshots_offset,
                   (uint64_t) img->nb_snapshots * SN_FIXED_SIZE,
                   UINT64_C(1) << 40, file_size) == -1)
    return -1;
  if (img->nb_bitmaps > 0 &&
      check_table (img, "bitmap directory", img->bitmap_dir_offset,
                   img->bitmap_dir_size, UINT64_C(64) << 20,
                   file_size) == -1)
    return -1;
  return 0;
}

/* The backing file name: inside the file, not too long, no NUL bytes. */
static int
read_backing_name (struct qcow2_image *img, int64_t file_size)
{
  if (img->backing_file_offset == 0)
    return 0;
  if (img->backing_file_size > MAX_BACKING_NAME ||
      img->backing_file_offset > (uint64_t) file_size ||
      img->backing_file_size > file_size - img->backing_file_offset)
    return fail (img, EIO, "backing file name at %#" PRIx64 " (%" PRIu32
                 " bytes) is invalid (past end of file or longer than %d)",
                 img->backing_file_offset, img->backing_file_size,
                 MAX_BACKING_NAME);
  img->backing_name = malloc (img->backing_file_size + 1);
  if (img->backing_name == NULL)
    return -1;
  if (io_pread (img->io, img->backing_name, img->backing_file_size,
                img->backing_file_offset) == -1) {
    nbdkit_error ("%s: reading backing file name: %m", img->name);
    return -1;
  }
  img->backing_name[img->backing_file_size] = '\0';
  if (img->backing_file_size == 0 ||
      strlen (img->backing_name) != img->backing_file_size)
    return fail (img, EIO, "backing file name is empty or contains NUL "
                 "bytes");
  return 0;
}

/* The external data file: named when the feature bit says there is
 * one, forgotten when it says there is none.
 */
static int
check_data_file (struct qcow2_image *img)
{
  if (!(img->incompat & INCOMPAT_DATA_FILE)) {
    free (img->data_file_name);
    img->data_file_name = NULL;
    return 0;
  }
  if (img->data_file_name == NULL)
    return fail (img, EIO, "image needs an external data file but its "
                 "header does not name one");
  if (img->backing_name && (img->autoclear & AUTOCLEAR_DATA_FILE_RAW))
    return fail (img, EIO, "raw external data file cannot have a backing "
                 "file");
  return 0;
}

int
header_read (struct qcow2_image *img)
{
  int64_t file_size = io_size (img->io);
  const uint8_t *ftable = NULL;
  uint32_t ftable_len = 0;
  uint64_t buflen;
  uint8_t *buf;
  int r = -1;

  if (file_size == -1) {
    nbdkit_error ("%s: cannot get file size: %m", img->name);
    return -1;
  }
  buf = read_first_cluster (img, file_size, &buflen);
  if (buf == NULL)
    return -1;

  if (read_fixed_fields (img, buf) == -1 ||
      read_version_fields (img, buf, buflen, file_size) == -1 ||
      read_extensions (img, buf, extensions_end (img, buflen),
                       &ftable, &ftable_len) == -1 ||
      check_features (img, ftable, ftable_len) == -1 ||
      check_encoding (img) == -1 ||
      derive_geometry (img) == -1 ||
      check_l1_table (img, file_size) == -1 ||
      check_other_tables (img, file_size) == -1 ||
      read_backing_name (img, file_size) == -1 ||
      check_data_file (img) == -1)
    goto out;

  nbdkit_debug ("%s: qcow2 v%" PRIu32 ", cluster %" PRIu32 " bytes, size %"
                PRIu64 ", L1 %" PRIu32 " entries, refcount %" PRIu32
                " bits, incompat %#" PRIx64 ", compat %#" PRIx64
                ", autoclear %#" PRIx64 "%s%s", img->name, img->version,
                img->cluster_size, img->size, img->l1_size,
                img->refcount_bits, img->incompat, img->compat,
                img->autoclear, img->backing_name ? ", backing " : "",
                img->backing_name ? img->backing_name : "");
  r = 0;
 out:
  free (buf);
  return r;
}

/* Write the three feature words (v3 only). */
int
header_write_features (struct qcow2_image *img)
{
  uint64_t w[3];

  if (img->version < 3)
    return 0;
  w[0] = htobe64 (img->incompat);
  w[1] = htobe64 (img->compat);
  w[2] = htobe64 (img->autoclear);
  if (io_pwrite (img->io, w, sizeof w, HDR_INCOMPATIBLE_FEATURES) == -1) {
    nbdkit_error ("%s: writing header feature bits: %m", img->name);
    return -1;
  }
  return 0;
}

/* Record corruption: log once, set the corrupt bit when the image is
 * writable, and fail every later write.  Always returns -1, errno EIO.
 */
int
header_mark_corrupt (struct qcow2_image *img, const char *fmt, ...)
{
  va_list ap;
  char *msg = NULL;

  va_start (ap, fmt);
  if (vasprintf (&msg, fmt, ap) == -1)
    msg = NULL;
  va_end (ap);

  if (!img->corrupt) {
    img->corrupt = true;
    if (!img->readonly && img->version >= 3) {
      nbdkit_error ("%s: %s; marking image as corrupt: further corruption "
                    "events will be suppressed", img->name,
                    msg ? msg : fmt);
      img->incompat |= INCOMPAT_CORRUPT;
      if (header_write_features (img) == 0)
        io_flush (img->io);
    }
    else
      nbdkit_error ("%s: %s; image is corrupt", img->name,
                    msg ? msg : fmt);
  }
  else
    nbdkit_debug ("%s: %s", img->name, msg ? msg : fmt);
  free (msg);
  errno = EIO;
  return -1;
}

/* True when header_prepare_write has nothing left to do (it needs
 * img->lock only shared).
 */
bool
header_write_ready (const struct qcow2_image *img)
{
  if ((img->incompat & INCOMPAT_DIRTY) && !img->dirty_written)
    return false;
  return img->autoclear_cleared &&
    (img->dirty_written || !(img->compat & COMPAT_LAZY_REFCOUNTS));
}

/* Called before the first change to the image: clear autoclear bits we
 * do not maintain (unknown ones, and bitmaps unless bitmap.c keeps
 * them) and set the dirty bit if refcounts will be updated lazily.
 * The change is synced before any metadata it protects is written.  An
 * image left dirty must have been repaired first (check_repair_dirty).
 */
int
header_prepare_write (struct qcow2_image *img)
{
  uint64_t keep = AUTOCLEAR_DATA_FILE_RAW;
  bool change = false;

  if (img->bitmaps_kept)
    keep |= AUTOCLEAR_BITMAPS;          /* bitmap.c keeps them */

  if (img->autoclear_cleared && (img->dirty_written ||
                                 !(img->compat & COMPAT_LAZY_REFCOUNTS)))
    return 0;
  if (img->version >= 3 && (img->autoclear & ~keep)) {
    nbdkit_debug ("%s: clearing autoclear bits %#" PRIx64, img->name,
                  img->autoclear & ~keep);
    img->autoclear &= keep;
    change = true;
  }
  img->autoclear_cleared = true;
  if ((img->compat & COMPAT_LAZY_REFCOUNTS) && !img->dirty_written) {
    img->incompat |= INCOMPAT_DIRTY;
    img->dirty_written = true;
    change = true;
  }
  if (change) {
    if (header_write_features (img) == -1 || io_flush (img->io) == -1) {
      nbdkit_error ("%s: updating header: %m", img->name);
      return -1;
    }
  }
  return 0;
}

/* Clear the dirty bit on a clean close (everything already synced). */
int
header_mark_clean (struct qcow2_image *img)
{
  if (!img->dirty_written || img->corrupt)
    return 0;
  img->incompat &= ~INCOMPAT_DIRTY;
  if (header_write_features (img) == -1 || io_flush (img->io) == -1)
    return -1;
  img->dirty_written = false;
  return 0;
}
