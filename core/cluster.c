/* nbdkit-qcow2: guest -> host cluster mapping, and reading mapped runs.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The active L1 table lives in memory (host byte order).  L2 tables are
 * read through the L2 cache in slices; cluster_map turns a guest range
 * into its first "run": the longest prefix that is all data at
 * contiguous host offsets, all zero, all unallocated, or one compressed
 * cluster.  Extended L2 entries are classified per subcluster, so a run
 * can start and end inside a cluster.
 *
 *   guest offset -> l1_index -> L1[i] = L2 table offset
 *                -> l2_index -> slice = index / entries_per_slice
 *                -> cache_get (L2 offset + slice * slice_size)
 *                -> entry (+ subcluster bitmap) -> struct mapping
 *
 * Entries read from the file are validated before use: a misaligned L2
 * or data offset, or an entry that is both allocated and zero, marks the
 * image corrupt (writes stop, reads elsewhere go on) and fails the
 * request with EIO.
 *
 * Empty slices: an image whose L2 tables are mostly zero entries (a
 * thin disk: QEMU allocates a whole L2 table, 512 MiB of guest with 64
 * KiB clusters, for the first write into it) would fill the cache with
 * slices that say nothing but "unallocated".  So a reader that reads a
 * slice into a staging slot and finds it all zero sets the slice's bit
 * in img->empty_slices instead of caching it, and later lookups in that
 * slice answer "unallocated" from the bit alone.  One bit per slice of
 * the guest disk: 4 KiB per TiB with 64 KiB clusters and 4 KiB slices.
 * The bit is set only under img->lock (shared), where the file holds
 * the slice's current contents; every change to a slice (l2_get_entry)
 * or to an L1 entry (l2_set_l1), both in l2.c, and every repair that rewrites
 * tables behind the cache (cluster_forget_all), clears the bits
 * concerned first, with the lock exclusive.
 *
 * Locking: nothing here takes a lock.  cluster_map needs img->lock
 * exclusively; cluster_map_cached needs it at least shared and changes
 * nothing but the staging slots (a slice not in the cache is staged,
 * see cache.c; when it cannot be, or an entry would mark the image
 * corrupt, it returns 1: take the lock exclusively and call
 * cluster_map).  rw.c does that dance for reads and block status, and
 * runs cluster_read_run's data I/O with only io_lock held.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"

int
cluster_load_l1 (struct qcow2_image *img)
{
  uint32_t i;

  img->l1 = calloc (img->l1_size ? img->l1_size : 1, sizeof (uint64_t));
  if (img->l1 == NULL)
    return -1;
  if (img->l1_size == 0)
    return 0;
  if (io_pread (img->io, img->l1, (size_t) img->l1_size * 8,
                img->l1_offset) == -1) {
    nbdkit_error ("%s: reading L1 table: %m", img->name);
    return -1;
  }
  for (i = 0; i < img->l1_size; i++)
    img->l1[i] = be64toh (img->l1[i]);
  return 0;
}

/* The L2 table offset for a guest offset, 0 if there is none. */
static int
l2_table_offset (struct qcow2_image *img, uint64_t offset, uint64_t *l2,
                 bool peek)
{
  uint64_t i = l1_index (img, offset);
  uint64_t e, off;

  if (i >= img->l1_size) {
    *l2 = 0;
    return 0;
  }
  e = img->l1[i];
  off = e & L1E_OFFSET_MASK;
  if (off && offset_into_cluster (img, off) != 0) {
    if (peek)
      return 1;
    return header_mark_corrupt (img, "L2 table offset %#" PRIx64
                                " in L1 entry %" PRIu64 " is not cluster "
                                "aligned", off, i);
  }
  if (off && (off >= img->host_end ||
              img->host_end - off < img->cluster_size)) {
    if (peek)
      return 1;
    return header_mark_corrupt (img, "L2 table offset %#" PRIx64
                                " in L1 entry %" PRIu64 " is beyond the end "
                                "of the file (%#" PRIx64 ")", off, i,
                                img->host_end);
  }
  *l2 = off;
  return 0;
}

bool
is_zero (const void *buf, size_t n)
{
  static const uint8_t zero[4096];
  const uint8_t *p = buf;

  while (n > 0) {
    size_t k = n < sizeof zero ? n : sizeof zero;
    if (memcmp (p, zero, k) != 0)
      return false;
    p += k;
    n -= k;
  }
  return true;
}

/* log2 of the guest bytes one L2 slice maps. */
static unsigned
slice_span_bits (const struct qcow2_image *img)
{
  return img->cluster_bits + img->slice_bits - img->l2_entry_shift;
}

/* The empty-slice bitmap: one bit per slice the L1 table can reach,
 * unless that is more than max_bytes (then there is none).
 */
int
cluster_empty_init (struct qcow2_image *img, uint64_t max_bytes)
{
  uint64_t nbits = (uint64_t) img->l1_size << (img->cluster_bits -
                                               img->slice_bits);

  img->empty_slices = NULL;
  img->empty_nbits = 0;
  if (nbits == 0 || (nbits + 63) / 64 * 8 > max_bytes) {
    nbdkit_debug ("%s: no empty-slice bitmap (%" PRIu64 " slices)",
                  img->name, nbits);
    return 0;
  }
  img->empty_slices = calloc ((nbits + 63) / 64, 8);
  if (img->empty_slices == NULL)
    return -1;
  img->empty_nbits = nbits;
  return 0;
}

static bool
slice_is_empty (const struct qcow2_image *img, uint64_t guest)
{
  uint64_t g = guest >> slice_span_bits (img);

  return g < img->empty_nbits &&
    (__atomic_load_n (&img->empty_slices[g / 64], __ATOMIC_RELAXED) >>
     (g % 64) & 1);
}

/* With img->lock held at least shared, and the slice's contents read
 * under it: the slice mapping guest is all zero.
 */
static void
slice_set_empty (struct qcow2_image *img, uint64_t guest)
{
  uint64_t g = guest >> slice_span_bits (img);

  if (g < img->empty_nbits)
    __atomic_fetch_or (&img->empty_slices[g / 64], UINT64_C(1) << (g % 64),
                       __ATOMIC_RELAXED);
}

/* With img->lock held exclusively, before the slices mapping guest
 * [guest, guest+len) change: they may not be empty any more.
 */
void
cluster_empty_forget (struct qcow2_image *img, uint64_t guest, uint64_t len)
{
  unsigned b = slice_span_bits (img);
  uint64_t g, last;

  if (len == 0 || img->empty_nbits == 0)
    return;
  if (guest == 0 && len == UINT64_MAX) {
    memset (img->empty_slices, 0, (img->empty_nbits + 63) / 64 * 8);
    return;
  }
  last = len - 1 > UINT64_MAX - guest ? UINT64_MAX : guest + (len - 1);
  last >>= b;
  if (last >= img->empty_nbits)
    last = img->empty_nbits - 1;
  for (g = guest >> b; g <= last; g++)
    __atomic_fetch_and (&img->empty_slices[g / 64],
                        ~(UINT64_C(1) << (g % 64)), __ATOMIC_RELAXED);
}

/* With img->lock held exclusively, after L2 tables changed on disk
 * behind the cache (repair): drop every cached slice and empty bit.
 */
void
cluster_forget_all (struct qcow2_image *img)
{
  cache_drop (img->l2_cache, 0, UINT64_MAX);
  cluster_empty_forget (img, 0, UINT64_MAX);
}

/* Classify one unit (a cluster, or a subcluster with extended L2) from
 * its L2 entry.  *host is the host offset of the unit's start for DATA.
 */
static int
classify (struct qcow2_image *img, uint64_t e, uint64_t bitmap,
          unsigned sc, uint64_t guest, struct mapping *m, uint64_t *host,
          bool peek)
{
  uint64_t off, end;

  if (e & QCOW_OFLAG_COMPRESSED) {
    l2e_compressed (img, e, &off, &end);
    if (img->data_file_name) {
      if (peek)
        return 1;
      return header_mark_corrupt (img, "compressed cluster at guest offset "
                                  "%#" PRIx64 " in an image with an "
                                  "external data file", guest);
    }
    if (off >= MAX_HOST_OFFSET) {
      if (peek)
        return 1;
      return header_mark_corrupt (img, "compressed cluster offset %#"
                                  PRIx64 " is invalid", off);
    }
    m->kind = MAP_COMPRESSED;
    m->host_offset = off;
    m->csize = end - off;
    return 0;
  }

  off = e & L2E_OFFSET_MASK;
  if (img->ext_l2) {
    bool alloc = bitmap & (UINT64_C(1) << sc);
    bool zero = bitmap & (UINT64_C(1) << (sc + 32));
    if (alloc && zero) {
      if (peek)
        return 1;
      return header_mark_corrupt (img, "subcluster %u at guest offset %#"
                                  PRIx64 " is both allocated and zero",
                                  sc, guest);
    }
    if (zero) {
      m->kind = MAP_ZERO;
      return 0;
    }
    if (!alloc) {
      m->kind = MAP_UNALLOCATED;
      return 0;
    }
  }
  else if (img->version >= 3 && (e & QCOW_OFLAG_ZERO)) {
    m->kind = MAP_ZERO;
    return 0;
  }
  else if (off == 0 && !(img->data_file_name && (e & QCOW_OFLAG_COPIED))) {
    m->kind = MAP_UNALLOCATED;
    return 0;
  }

  if (off == 0 && !img->data_file_name) {
    if (peek)
      return 1;
    return header_mark_corrupt (img, "allocated subcluster at guest offset "
                                "%#" PRIx64 " has no host offset", guest);
  }
  if (offset_into_cluster (img, off) != 0) {
    if (peek)
      return 1;
    return header_mark_corrupt (img, "data cluster offset %#" PRIx64
                                " for guest offset %#" PRIx64 " is not "
                                "cluster aligned", off, guest);
  }
  m->kind = MAP_DATA;
  m->copied = (e & QCOW_OFLAG_COPIED) != 0;
  *host = off + ((uint64_t) sc << img->subcluster_bits);
  return 0;
}

/* The L2 slice at host offset soff, which maps guest offset: through
 * the cache, or with peek (nothing may change) only looked up in it,
 * else staged (when drain is not NULL; see map_run).  0 with *slice set
 * (and *ce to put back or *slot to make ready), 2 if the slice is all
 * zero, 1 when peeking is not enough, -1 on error.
 */
static int
get_slice (struct qcow2_image *img, uint64_t offset, uint64_t soff,
           bool peek, bool *drain, const uint64_t **slice,
           struct cache_entry **ce, int *slot, uint64_t *gen)
{
  uint32_t slice_size = UINT32_C(1) << img->slice_bits;
  void *buf;

  if (slice_is_empty (img, offset))
    return 2;
  if (!peek) {
    *slice = cache_get (img->l2_cache, soff, true, ce);
    return *slice == NULL ? -1 : 0;
  }
  *slice = cache_peek (img->l2_cache, soff);
  if (*slice != NULL)
    return 0;
  if (drain == NULL ||
      (*slot = cache_stage_get (img->l2_cache, &buf, gen)) == -1)
    return 1;
  if (io_pread (img->io, buf, slice_size, soff) == -1) {
    nbdkit_error ("%s: reading L2 slice at %#" PRIx64 ": %m",
                  img->name, soff);
    cache_stage_abort (img->l2_cache, *slot);
    *slot = -1;
    return -1;
  }
  if (img->empty_slices && is_zero (buf, slice_size)) {
    cache_stage_abort (img->l2_cache, *slot);
    *slot = -1;
    slice_set_empty (img, offset);
    return 2;
  }
  *slice = buf;
  return 0;
}

/* Classify the units of slice from guest offset up to end into the run
 * m (m->guest_offset is offset): the longest prefix of one kind, at
 * contiguous host offsets for data; one compressed cluster alone.
 */
static int
walk_slice (struct qcow2_image *img, const uint64_t *slice, uint64_t offset,
            uint64_t end, struct mapping *m, bool peek)
{
  uint64_t slice_entries = (UINT64_C(1) << img->slice_bits) >>
    img->l2_entry_shift;
  uint64_t unit_mask = (UINT64_C(1) << img->subcluster_bits) - 1;
  uint64_t cur = offset;
  int r;

  while (cur < end) {
    uint64_t i = l2_index (img, cur) % slice_entries;
    uint64_t e, bitmap = 0, host = 0, unit_end;
    unsigned sc = 0;
    struct mapping u = { 0 };

    if (img->ext_l2) {
      e = be64toh (slice[2 * i]);
      bitmap = be64toh (slice[2 * i + 1]);
      sc = offset_into_cluster (img, cur) >> img->subcluster_bits;
    }
    else
      e = be64toh (slice[i]);
    r = classify (img, e, bitmap, sc, cur, &u, &host, peek);
    if (r != 0)
      return r;
    /* A compressed cluster is one whole-cluster unit. */
    if (u.kind == MAP_COMPRESSED)
      unit_end = (cur | (img->cluster_size - 1)) + 1;
    else
      unit_end = (cur | unit_mask) + 1;
    if (unit_end > end)
      unit_end = end;

    if (cur == offset) {
      m->kind = u.kind;
      m->copied = u.copied;
      if (u.kind == MAP_DATA)
        m->host_offset = host + (cur & unit_mask);
      else if (u.kind == MAP_COMPRESSED) {
        m->host_offset = u.host_offset;
        m->csize = u.csize;
      }
    }
    else {
      if (u.kind != m->kind || u.kind == MAP_COMPRESSED ||
          m->kind == MAP_COMPRESSED)
        break;
      if (u.kind == MAP_DATA &&
          (host != m->host_offset + (cur - offset) || u.copied != m->copied))
        break;
    }
    cur = unit_end;
    if (m->kind == MAP_COMPRESSED)
      break;
  }
  m->length = cur - offset;
  return 0;
}

/* cluster_map and cluster_map_cached.  With peek, nothing may change:
 * return 1 instead of marking the image corrupt, and instead of loading
 * a slice into the cache, either stage it (when drain is not NULL; set
 * *drain when the staging slots want draining; a failed read is -1) or
 * return 1.
 */
static int
map_run (struct qcow2_image *img, uint64_t offset, uint64_t count,
         struct mapping *m, bool peek, bool *drain)
{
  uint64_t l2 = 0, slice_entries, soff, end, gen = 0, span;
  uint32_t slice_size = UINT32_C(1) << img->slice_bits;
  uint64_t table_span = UINT64_C(1) << (img->cluster_bits + img->l2_bits);
  struct cache_entry *ce = NULL;
  const uint64_t *slice = NULL;
  int r, slot = -1;

  memset (m, 0, sizeof *m);
  m->guest_offset = offset;
  r = l2_table_offset (img, offset, &l2, peek);
  if (r != 0)
    return r;
  if (l2 == 0) {
    m->kind = MAP_UNALLOCATED;
    m->length = min_u64 (count, table_span - (offset & (table_span - 1)));
    return 0;
  }

  slice_entries = slice_size >> img->l2_entry_shift;
  soff = l2 + (l2_index (img, offset) / slice_entries) * slice_size;
  r = get_slice (img, offset, soff, peek, drain, &slice, &ce, &slot, &gen);
  if (r == 2) {
    /* Every entry of the slice is 0: unallocated to the slice's end. */
    span = UINT64_C(1) << slice_span_bits (img);
    m->kind = MAP_UNALLOCATED;
    m->length = min_u64 (count, span - (offset & (span - 1)));
    return 0;
  }
  if (r != 0)
    return r;

  /* Walk units from offset to the end of the slice or of the request. */
  end = (((offset >> img->cluster_bits) / slice_entries + 1) * slice_entries)
    << img->cluster_bits;
  if (end > offset + count)
    end = offset + count;
  r = walk_slice (img, slice, offset, end, m, peek);
  if (ce)
    cache_put (img->l2_cache, ce);
  if (slot != -1) {
    if (r != 0)
      cache_stage_abort (img->l2_cache, slot);
    else if (cache_stage_ready (img->l2_cache, slot, soff, gen))
      *drain = true;
  }
  return r;
}

int
cluster_map (struct qcow2_image *img, uint64_t offset, uint64_t count,
             struct mapping *m)
{
  return map_run (img, offset, count, m, false, NULL);
}

int
cluster_map_cached (struct qcow2_image *img, uint64_t offset,
                    uint64_t count, struct mapping *m, bool *drain)
{
  return map_run (img, offset, count, m, true, drain);
}

static int
read_compressed (struct qcow2_image *img, void *buf, const struct mapping *m)
{
  uint64_t cluster_start = m->guest_offset & ~(uint64_t) (img->cluster_size - 1);
  uint8_t *in = NULL, *out = NULL;
  int r = -1;

  if (m->csize > 2 * (uint64_t) img->cluster_size + 512) {
    nbdkit_error ("%s: compressed cluster at %#" PRIx64 " is too large (%"
                  PRIu64 " bytes)", img->name, m->host_offset, m->csize);
    errno = EIO;
    return -1;
  }
  in = malloc (m->csize);
  out = malloc (img->cluster_size);
  if (in == NULL || out == NULL)
    goto out;
  if (io_pread (img->io, in, m->csize, m->host_offset) == -1) {
    nbdkit_error ("%s: reading compressed cluster at %#" PRIx64 ": %m",
                  img->name, m->host_offset);
    goto out;
  }
  if (img->compression_type == COMPRESSION_ZSTD)
    r = compress_zstd_decompress (in, m->csize, out, img->cluster_size);
  else
    r = compress_inflate (in, m->csize, out, img->cluster_size);
  if (r == -1) {
    nbdkit_error ("%s: compressed cluster at %#" PRIx64 " (guest %#" PRIx64
                  ") cannot be decompressed", img->name, m->host_offset,
                  cluster_start);
    errno = EIO;
    goto out;
  }
  memcpy (buf, out + (m->guest_offset - cluster_start), m->length);
  r = 0;
 out:
  free (in);
  free (out);
  return r;
}

/* Read the guest data of run m (mapped at guest offset 'offset') into
 * buf.  Takes no lock: the caller holds img->lock, or io_lock shared
 * for MAP_DATA and MAP_COMPRESSED (rw.c).
 */
int
cluster_read_run (struct qcow2_image *img, void *buf, const struct mapping *m,
                  uint64_t offset)
{
  switch (m->kind) {
  case MAP_DATA:
    if (io_pread (img->data_io, buf, m->length, m->host_offset) == -1) {
      nbdkit_error ("%s: reading data at %#" PRIx64 ": %m", img->name,
                    m->host_offset);
      return -1;
    }
    return 0;
  case MAP_ZERO:
    memset (buf, 0, m->length);
    return 0;
  case MAP_UNALLOCATED:
    return backing_read (img, buf, m->length, offset);
  case MAP_COMPRESSED:
    return read_compressed (img, buf, m);
  }
  abort ();
}

/* Read guest data with img->lock held exclusively (the write path
 * reading what it copies).
 */
int
cluster_read_locked (struct qcow2_image *img, void *buf, uint64_t count,
                     uint64_t offset)
{
  uint8_t *p = buf;

  while (count > 0) {
    struct mapping m;

    if (cluster_map (img, offset, count, &m) == -1 ||
        cluster_read_run (img, p, &m, offset) == -1)
      return -1;
    p += m.length;
    offset += m.length;
    count -= m.length;
  }
  return 0;
}
