/* nbdkit-qcow2: writing guest data that cannot be written in place,
 * and zeroing and discarding clusters.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The rules every change to the image keeps (DESIGN.md), and where:
 *
 *  1. A refcount increment reaches the file before any L1/L2 entry that
 *     points at the cluster: new clusters are counted in the refcount
 *     cache; before any dirty L2 slice or L1 entry is written, the dirty
 *     refcount blocks are written and synced (l2.c: l2_barrier).
 *  2. Guest data (and COW) is written before the L2 entry that maps it:
 *     the data is written at once (need_sync is set), the L2 entry only
 *     goes to the cache; the same barrier syncs before L2 write-back.
 *  3. An L1/L2 entry is cleared and written before the refcount
 *     decrement that frees its cluster: frees are deferred
 *     (refcount_free_later) and applied only after the metadata is
 *     written and synced (rw.c: flush_locked), with io_lock held
 *     exclusively so that no cluster is freed while a read or write to
 *     it is in flight.  What an entry references is checked before it
 *     is freed or copied from, and before the write allocates anything
 *     (l2.c: l2_entry_host_range): a range over metadata the overlap map
 *     knows of, or past the end of the file, marks the image corrupt
 *     and nothing is freed.
 *  4. Every host write of data or of an L1/L2 table or refcount block
 *     passes overlap_check_write first (header.c writes the header,
 *     which the check would refuse, itself).
 *  5. After qcow2_flush (or a FUA write) returns, everything
 *     acknowledged before it is on stable storage.
 *  6. So after a crash, refcounts can only be too high (leaks), never
 *     too low, and no entry points at unwritten data.
 *  7. Corruption is sticky (header_mark_corrupt): writes fail with EIO.
 *
 * An allocating write of one run (unallocated, zero, compressed,
 * shared with a snapshot, backing data) has three steps, which rw.c
 * runs: write_plan, under img->lock, allocates new clusters
 * contiguously for the whole run and builds one buffer with the guest
 * data and, around it, the untouched head and tail copied from the old
 * contents; the data is then written with the lock dropped (nothing
 * can reach clusters not linked yet); write_link, under the lock
 * again, points the L2 entries at the new clusters and frees the old
 * ones (deferred).  write_abandon gives the clusters back instead.
 * On a block device whose free clusters lie only in shorter runs, the
 * plan covers as much of the run as the longest free run allows, and
 * rw.c plans the rest again (plan_alloc): each piece is a plan of its
 * own, allocated, written and linked before the next is planned, with
 * the rules above, as if the client had written it alone.
 * With extended L2 entries only the touched subclusters of a cluster
 * are written and marked allocated, all under the lock.
 *
 * A compressed write (compress=on; see "compressed writes" below) has
 * the same three steps for a run of whole clusters whose streams were
 * compressed beforehand with no lock held: write_compressed_plan places
 * the streams, the caller writes them, write_compressed_link points
 * the entries at them (or write_compressed_abandon).
 *
 * Locking: none taken; everything here needs img->lock exclusively.
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

/* One request may free clusters scattered all over the file (a trim of
 * a disk written in random order): past this many ranges of them (64
 * KiB of list), zero_clusters stops so that they are committed.
 */
#define MAX_PENDING_RANGES 4096

/* Before writing guest data at host [host, host+len) of the image file:
 * the overlap check, and a bound (an entry pointing far past the end of
 * the file is corruption, not a reason to grow it).
 */
int
write_data_check (struct qcow2_image *img, uint64_t host, uint64_t len)
{
  if (img->data_io != img->io)
    return 0;
  if (host >= img->host_end || img->host_end - host < len)
    return header_mark_corrupt (img, "data cluster at %#" PRIx64 " is "
                                "beyond the end of the file (%#" PRIx64 ")",
                                host, img->host_end);
  return overlap_check_write (img, host, len, 0);
}

/* Write buf to host [host, host+len) of the data file. */
static int
data_write (struct qcow2_image *img, const void *buf, uint64_t len,
            uint64_t host)
{
  if (write_data_check (img, host, len) == -1)
    return -1;
  if (io_pwrite (img->data_io, buf, len, host) == -1) {
    nbdkit_error ("%s: writing data at %#" PRIx64 ": %m", img->name, host);
    return -1;
  }
  img->need_sync = true;
  return 0;
}

/* Is host offset at or past the end of the data file (so reads there
 * return zeroes)?  Asked of the file itself, never of a cached size.
 */
static bool
past_eof (struct qcow2_image *img, uint64_t host)
{
  int64_t size = io_size (img->data_io);

  return size != -1 && host >= (uint64_t) size;
}

/* Extended L2: write [off, off+len) inside one cluster.  A cluster
 * allocated here is given back if the write fails before it is linked.
 */
static int
write_subclusters (struct qcow2_image *img, const uint8_t *buf, uint64_t off,
                   uint64_t len)
{
  uint64_t cs = img->cluster_size, c0 = off & ~(cs - 1);
  uint64_t scs = UINT64_C(1) << img->subcluster_bits;
  unsigned s0 = (off - c0) >> img->subcluster_bits;
  unsigned s1 = (off + len - 1 - c0) >> img->subcluster_bits;
  uint64_t a = c0 + s0 * scs, b = c0 + (s1 + 1) * scs;
  uint64_t e, bm, host, touched, first, nfree;
  struct l2_ref ref;
  uint8_t *data = NULL;
  bool fresh = false;           /* host allocated here, not linked yet */
  int r = -1;

  if (l2_get_entry (img, c0, &ref) == -1)
    return -1;
  e = be64toh (ref.entry[0]);
  bm = be64toh (ref.entry[1]);
  host = e & L2E_OFFSET_MASK;
  l2_put_entry (img, &ref, false);

  if ((e & QCOW_OFLAG_COMPRESSED) ||
      (host && !(e & QCOW_OFLAG_COPIED) && !img->data_file_name)) {
    /* Compressed or shared: copy the whole cluster, after checking
     * what the entry will free (before anything is allocated).
     */
    if (l2_entry_host_range (img, e, c0, img->host_end, &first, &nfree) == -1)
      return -1;
    data = malloc (cs);
    if (data == NULL)
      return -1;
    if (cluster_read_locked (img, data, cs, c0) == -1)
      goto out;
    memcpy (data + (off - c0), buf, len);
    if (img->data_file_name)
      host = c0;
    else if ((int64_t) (host = refcount_alloc (img, 1)) == -1)
      goto out;
    else
      fresh = true;
    if (data_write (img, data, cs, host) == -1)
      goto out;
    if (l2_get_entry (img, c0, &ref) == -1)
      goto out;
    ref.entry[0] = htobe64 (host | QCOW_OFLAG_COPIED);
    ref.entry[1] = htobe64 (SC_ALLOC_MASK);
    l2_put_entry (img, &ref, true);
    fresh = false;
    r = refcount_free_later (img, first << img->cluster_bits, nfree);
    goto out;
  }

  data = malloc (b - a);
  if (data == NULL)
    return -1;
  if (off > a && cluster_read_locked (img, data, off - a, a) == -1)
    goto out;
  if (off + len < b &&
      cluster_read_locked (img, data + (off + len - a), b - off - len,
                           off + len) == -1)
    goto out;
  memcpy (data + (off - a), buf, len);
  if (host == 0 && !(img->data_file_name && (e & QCOW_OFLAG_COPIED))) {
    if (img->data_file_name)
      host = c0;
    else if ((int64_t) (host = refcount_alloc (img, 1)) == -1)
      goto out;
    else
      fresh = true;
  }
  if (data_write (img, data, b - a, host + (a - c0)) == -1)
    goto out;
  touched = ((UINT64_C(1) << (s1 + 1)) - 1) & ~((UINT64_C(1) << s0) - 1);
  if (l2_get_entry (img, c0, &ref) == -1)
    goto out;
  ref.entry[0] = htobe64 (host | QCOW_OFLAG_COPIED);
  bm = (bm | touched) & ~(touched << 32);
  ref.entry[1] = htobe64 (bm);
  l2_put_entry (img, &ref, true);
  fresh = false;
  r = 0;
 out:
  if (fresh)
    refcount_unalloc (img, host, 1);
  free (data);
  return r;
}

/* The buffer of plan p, whose guest data is [off, off+len): the whole
 * clusters, head and tail as the guest saw them before (rule 2: one
 * write).  Clusters past the end of the file already read as zeroes:
 * when the head and tail are zeroes too (known from the kind of the
 * run, or checked), p keeps writing only the guest data (a 4 KiB write
 * into a fresh 64 KiB cluster writes 4 KiB, not 64, and builds no
 * padding).
 */
static int
plan_buffer (struct qcow2_image *img, struct write_plan *p,
             const uint8_t *buf, uint64_t off, uint64_t len, bool edges_zero)
{
  uint64_t cs = img->cluster_size, c0 = p->c0, end = c0 + p->n * cs;
  uint8_t *data;

  if (edges_zero && past_eof (img, p->first))
    return 0;
  data = p->data = malloc (p->n * cs);
  if (data == NULL)
    return -1;
  if (edges_zero) {
    memset (data, 0, off - c0);
    memset (data + (off + len - c0), 0, end - off - len);
  }
  else {
    if (off > c0 && cluster_read_locked (img, data, off - c0, c0) == -1)
      return -1;
    if (off + len < end &&
        cluster_read_locked (img, data + (off + len - c0), end - off - len,
                             off + len) == -1)
      return -1;
  }
  if (edges_zero || !past_eof (img, p->first) || !is_zero (data, off - c0) ||
      !is_zero (data + (off + len - c0), end - off - len)) {
    memcpy (data + (off - c0), buf, len);
    p->src = data;
    p->len = p->n * cs;
    p->host = p->first;
  }
  return 0;
}

/* How many of the n new clusters a plan wants can come in one run: *k.
 *
 * A file can grow, so the allocator always finds a run of n, past the
 * end of the file if need be: *k is n.  A block device cannot: once it
 * is full and trims have freed clusters here and there, its free
 * clusters may all lie in runs shorter than n, and asking for n fails
 * with ENOSPC although enough of them are free.  So on a block device
 * the free runs below its end are looked at first, as the allocator's
 * search sees them (from the free hint on, by refcount; clusters past
 * the end of the file are free): *k is n if one of them is n long,
 * else the longest (the allocator's first fit for that length then
 * lies below the device's end too), 0 when none is free.  Costs one
 * more search like the allocator's, only on a block device and only
 * for plans of more than one cluster.
 */
static int
plan_run_length (struct qcow2_image *img, uint64_t n, uint64_t *k)
{
  uint64_t c, end, file_end, run = 0, best = 0;
  int64_t size;

  *k = n;
  if (!img->io->blockdev || n <= 1)
    return 0;
  size = io_size (img->io);
  if (size == -1) {
    nbdkit_error ("%s: size of the block device: %m", img->name);
    return -1;
  }
  end = (uint64_t) size >> img->cluster_bits;
  file_end = img->host_end >> img->cluster_bits;
  for (c = img->free_hint; c < end; c++) {
    uint64_t v = 0;

    if (c < file_end && refcount_get (img, c, &v) == -1)
      return -1;
    if (v != 0) {
      run = 0;
      continue;
    }
    if (++run == n)
      return 0;
    if (run > best)
      best = run;
  }
  *k = best;
  return 0;
}

/* Allocate the new clusters of plan p, which wants p->n of them, as
 * many as one run gives (plan_run_length); the plan shrinks to them:
 * p->n, and *len, the bytes of the request from off it covers (a
 * shrunk plan ends on a cluster boundary: only its head may need
 * copying).  The caller (rw.c) plans the rest of the request again,
 * so a long write on a fragmented block device becomes several plans,
 * each allocated, written and linked as one, with every ordering rule
 * of a plan; ENOSPC only when no cluster is free.  With none free the
 * allocator is asked for p->n all the same, to fail and say why.  The
 * allocator may take the first cluster of the run found for a new
 * refcount block (refcount.c): then the search runs again, twice at
 * most.
 */
static int64_t
plan_alloc (struct qcow2_image *img, struct write_plan *p, uint64_t off,
            uint64_t *len)
{
  uint64_t cs = img->cluster_size, k;
  int64_t host;
  int tries;

  for (tries = 0;; tries++) {
    if (plan_run_length (img, p->n, &k) == -1)
      return -1;
    if (k > 0 && k < p->n) {
      nbdkit_debug ("%s: no run of %" PRIu64 " free clusters on the block "
                    "device: the write at guest %#" PRIx64 " takes %" PRIu64
                    " first", img->name, p->n, off, k);
      p->n = k;
      *len = min_u64 (*len, p->c0 + k * cs - off);
    }
    host = refcount_alloc (img, p->n);
    if (host != -1 || errno != ENOSPC || !img->io->blockdev || k == 0 ||
        tries == 2)
      return host;
  }
}

/* Plan the write of guest [off, off+m->length) from buf, a run that
 * cannot be written in place (m as cluster_map describes it): 0 with
 * *p to carry out (write p->len bytes of p->src at p->host of data_io,
 * then write_link, or write_abandon), or 1 when it is done already
 * (extended L2: the subclusters are written under the lock).  Either
 * way p->consumed says how much of the request it covered.
 */
int
write_plan (struct qcow2_image *img, const uint8_t *buf, uint64_t off,
            const struct mapping *m, struct write_plan *p)
{
  uint64_t cs = img->cluster_size, len = m->length;
  bool edges_zero;
  int64_t host;

  memset (p, 0, sizeof *p);
  if (img->ext_l2) {
    p->consumed = min_u64 (len, cs - offset_into_cluster (img, off));
    return write_subclusters (img, buf, off, p->consumed) == -1 ? -1 : 1;
  }
  p->c0 = off & ~(cs - 1);
  p->n = (round_up_pow2 (off + len, cs) - p->c0) / cs;
  /* For standard entries the kind is per cluster, so the head and tail
   * of the run's clusters are of the run's kind: zero flag, or
   * unallocated with nothing behind it.
   */
  edges_zero = m->kind == MAP_ZERO ||
    (m->kind == MAP_UNALLOCATED && p->c0 >= img->backing_size);
  if (m->kind != MAP_UNALLOCATED &&
      l2_check_old_entries (img, p->c0, p->n) == -1)
    return -1;
  p->bound = img->host_end;
  if (img->data_file_name)
    host = p->c0;               /* external data: host offset = guest */
  else if ((host = plan_alloc (img, p, off, &len)) == -1)
    return -1;
  p->consumed = len;
  p->first = host;
  p->src = buf;
  p->len = len;
  p->host = host + (off - p->c0);
  if (plan_buffer (img, p, buf, off, len, edges_zero) == -1) {
    write_abandon (img, p);
    return -1;
  }
  return 0;
}

/* Give back the clusters of a plan not carried out.  (The caller still
 * holds the guest range, so the clusters are ours alone.)
 */
void
write_abandon (struct qcow2_image *img, struct write_plan *p)
{
  if (!img->data_file_name && p->n > 0)
    refcount_unalloc (img, p->first, p->n);
  free (p->data);
  p->data = NULL;
}

/* Point the L2 entries of plan p, whose data is written, at the new
 * clusters (one slice lookup per slice, not per cluster), and free the
 * old ones (deferred, after the checks against p->bound).  On failure
 * the clusters not linked yet are given back.
 */
int
write_link (struct qcow2_image *img, struct write_plan *p)
{
  uint64_t cs = img->cluster_size, c0 = p->c0, i, linked = 0;
  uint64_t per_slice = (UINT64_C(1) << img->slice_bits) >> img->l2_entry_shift;
  struct l2_ref ref;
  int r = -1;

  for (i = 0; i < p->n; ) {
    uint64_t left = per_slice - l2_index (img, c0 + i * cs) % per_slice;
    if (l2_get_entry (img, c0 + i * cs, &ref) == -1)
      goto out;
    for (; left > 0 && i < p->n;
         left--, i++, ref.entry += 1u << (img->l2_entry_shift - 3)) {
      if (l2_free_entry_later (img, be64toh (ref.entry[0]), c0 + i * cs,
                               p->bound) == -1) {
        l2_put_entry (img, &ref, true);
        goto out;
      }
      ref.entry[0] = htobe64 ((p->first + i * cs) | QCOW_OFLAG_COPIED);
      linked = i + 1;
    }
    l2_put_entry (img, &ref, true);
  }
  r = 0;
 out:
  if (r == -1 && !img->data_file_name && linked < p->n)
    refcount_unalloc (img, p->first + linked * cs, p->n - linked);
  free (p->data);
  p->data = NULL;
  return r;
}

/* Write guest [offset, offset+count) with img->lock held throughout
 * (zero's fallback of real zeroes).
 */
static int
write_all_locked (struct qcow2_image *img, const uint8_t *buf,
                  uint64_t count, uint64_t offset)
{
  while (count > 0) {
    struct mapping m;
    struct write_plan p;
    int r;

    if (cluster_map (img, offset, count, &m) == -1)
      return -1;
    if (m.kind == MAP_DATA && m.copied) {
      if (data_write (img, buf, m.length, m.host_offset) == -1)
        return -1;
      p.consumed = m.length;
    }
    else if ((r = write_plan (img, buf, offset, &m, &p)) == -1)
      return -1;
    else if (r == 0) {
      if (data_write (img, p.src, p.len, p.host) == -1) {
        write_abandon (img, &p);
        return -1;
      }
      if (write_link (img, &p) == -1)
        return -1;
    }
    buf += p.consumed;
    offset += p.consumed;
    count -= p.consumed;
  }
  return 0;
}

/* The whole clusters [*a, *b) inside guest [offset, offset+count); the
 * partial last cluster of the disk counts as whole.
 */
void
write_whole_clusters (const struct qcow2_image *img, uint64_t count,
                      uint64_t offset, uint64_t *a, uint64_t *b)
{
  uint64_t cs = img->cluster_size;

  *a = round_up_pow2 (offset, cs);
  *b = (offset + count) & ~(cs - 1);
  if (offset + count == img->size)
    *b = round_up_pow2 (img->size, cs);
}

/* Does guest [off, off+len) already read as zeroes? */
static int
reads_as_zero (struct qcow2_image *img, uint64_t off, uint64_t len,
               bool *zero)
{
  *zero = true;
  while (len > 0) {
    struct mapping m;
    if (cluster_map (img, off, len, &m) == -1)
      return -1;
    if (m.kind == MAP_DATA || m.kind == MAP_COMPRESSED ||
        (m.kind == MAP_UNALLOCATED && off < img->backing_size)) {
      *zero = false;
      return 0;
    }
    off += m.length;
    len -= m.length;
  }
  return 0;
}

/* Would zeroing [off, off+len) need real zeroes written?  (Errors count
 * as yes: the real request will report them.)
 */
static bool
slow_zero (struct qcow2_image *img, uint64_t off, uint64_t len)
{
  bool zero;

  if (len == 0)
    return false;
  return reads_as_zero (img, off, len, &zero) == -1 || !zero;
}

/* Write real zeroes (the fallback). */
int
write_zeroes (struct qcow2_image *img, uint64_t off, uint64_t len,
              unsigned flags)
{
  static const uint8_t zeroes[65536];
  bool zero;

  if (reads_as_zero (img, off, len, &zero) == -1)
    return -1;
  if (zero)
    return 0;
  if (flags & QCOW2_F_FAST_ZERO) {
    errno = ENOTSUP;
    return -1;
  }
  while (len > 0) {
    uint64_t n = min_u64 (len, sizeof zeroes);
    if (write_all_locked (img, zeroes, n, off) == -1)
      return -1;
    off += n;
    len -= n;
  }
  return 0;
}

/* Change whole clusters [c0, c0+n*cs): trim discards them (they read
 * as the backing file, or zeroes without one; v3 images with a backing
 * file get the zero flag instead, as QEMU does), zero makes them read as
 * zeroes.  Host clusters are freed unless zeroing without may_trim, which
 * keeps them allocated (preallocated zero clusters).  With
 * discard-no-unref on a v3 image a trim keeps them too: a data cluster
 * of ours (COPIED, not compressed) stays allocated and gets the zero
 * flag (extended L2: its subclusters read as zero, or as the backing
 * file as before), so the file does not fragment.  Returns how many
 * clusters it changed: fewer than n once MAX_PENDING_RANGES frees are
 * pending, which the caller (rw.c) commits before it goes on.
 */
int64_t
zero_clusters (struct qcow2_image *img, uint64_t c0, uint64_t n, bool trim,
               bool may_trim)
{
  uint64_t cs = img->cluster_size, i;

  for (i = 0; i < n; i++) {
    struct l2_ref ref;
    uint64_t g = c0 + i * cs, e, host, ne;
    bool backing = img->backing_name != NULL && g < img->backing_size;
    bool want_zero = !trim || (backing && img->version >= 3);
    bool keep;

    /* No L2 table: unallocated, which reads as zero without backing. */
    if ((img->l1[l1_index (img, g)] & L1E_OFFSET_MASK) == 0 &&
        (!want_zero || !backing))
      continue;
    if (img->nr_pending >= MAX_PENDING_RANGES)
      return i;                 /* the caller commits, then goes on */
    if (l2_get_entry (img, g, &ref) == -1)
      return -1;
    e = be64toh (ref.entry[0]);
    host = e & L2E_OFFSET_MASK;
    /* discard-no-unref: a data cluster of ours stays allocated even
     * when trimmed; on v3 (the only version that can say "allocated
     * but reads as zero") rw.c lets trims through only then.
     */
    keep = host && (e & QCOW_OFLAG_COPIED) && !(e & QCOW_OFLAG_COMPRESSED) &&
           ((!trim && !may_trim) ||
            (img->cfg.discard_no_unref && img->version >= 3));
    if (keep && !img->ext_l2)
      want_zero = true;         /* a kept cluster must not read as data */
    if (!keep && l2_free_entry_later (img, e, g, img->host_end) == -1) {
      l2_put_entry (img, &ref, false);
      return -1;
    }
    ne = keep ? (host | QCOW_OFLAG_COPIED) : 0;
    if (want_zero && !img->ext_l2)
      ne |= QCOW_OFLAG_ZERO;
    ref.entry[0] = htobe64 (ne);
    if (img->ext_l2)
      ref.entry[1] = htobe64 (want_zero ? SC_ZERO_MASK : 0);
    l2_put_entry (img, &ref, true);
  }
  return n;
}

/* Extended L2: make the whole subclusters [off, off+len), inside one
 * cluster, read as zeroes (zero, or a trim over a backing file: their
 * zero bits set) or discarded (trim without a backing file behind
 * them: neither bit, which reads as zeroes too).  The host cluster, if
 * any, stays allocated.  Returns 1, changing nothing, for a compressed
 * cluster (whose subclusters have no bits of their own).
 */
int
zero_subclusters (struct qcow2_image *img, uint64_t off, uint64_t len,
                  bool trim)
{
  uint64_t cs = img->cluster_size, c0 = off & ~(cs - 1), mask, e, bm;
  unsigned s0 = (off - c0) >> img->subcluster_bits;
  unsigned s1 = (off + len - c0) >> img->subcluster_bits;
  bool backing = img->backing_name != NULL && c0 < img->backing_size;
  struct l2_ref ref;

  /* No L2 table and nothing behind it: already reads as zeroes. */
  if ((img->l1[l1_index (img, c0)] & L1E_OFFSET_MASK) == 0 && !backing)
    return 0;
  mask = ((UINT64_C(1) << s1) - 1) & ~((UINT64_C(1) << s0) - 1);
  if (l2_get_entry (img, c0, &ref) == -1)
    return -1;
  e = be64toh (ref.entry[0]);
  if (e & QCOW_OFLAG_COMPRESSED) {
    l2_put_entry (img, &ref, false);
    return 1;
  }
  bm = be64toh (ref.entry[1]) & ~(mask | (mask << 32));
  if (!trim || backing)
    bm |= mask << 32;
  ref.entry[1] = htobe64 (bm);
  l2_put_entry (img, &ref, true);
  return 0;
}

/* The whole subclusters [*a, *b) of guest [off, off+len), a piece of
 * one cluster; the partial last subcluster of the disk counts as whole.
 */
static void
whole_subclusters (const struct qcow2_image *img, uint64_t off, uint64_t len,
                   uint64_t *a, uint64_t *b)
{
  uint64_t scs = UINT64_C(1) << img->subcluster_bits;

  *a = round_up_pow2 (off, scs);
  *b = (off + len) & ~(scs - 1);
  if (off + len == img->size)
    *b = round_up_pow2 (off + len, scs);
}

/* Zero guest [off, off+len), the partial clusters at the edges of a
 * zero request: real zeroes, except that with extended L2 entries the
 * whole subclusters in them get their zero bits (metadata only).
 */
int
write_zero_edge (struct qcow2_image *img, uint64_t off, uint64_t len,
                 unsigned flags)
{
  uint64_t cs = img->cluster_size;

  if (!img->ext_l2 || !write_zero_by_metadata (img, false) ||
      (flags & QCOW2_F_FAST_ZERO))
    return write_zeroes (img, off, len, flags);
  while (len > 0) {
    uint64_t n = min_u64 (len, cs - offset_into_cluster (img, off)), a, b;
    int r = 0;

    whole_subclusters (img, off, n, &a, &b);
    if (a < b && (r = zero_subclusters (img, a, b - a, false)) == -1)
      return -1;
    if (a >= b || r == 1) {
      if (write_zeroes (img, off, n, flags) == -1)
        return -1;
    }
    else if (write_zeroes (img, off, a - off, flags) == -1 ||
             (b < off + n &&
              write_zeroes (img, b, off + n - b, flags) == -1))
      return -1;
    off += n;
    len -= n;
  }
  return 0;
}

/* Trim guest [off, off+len), the partial clusters at the edges of a
 * trim: with extended L2 entries, their whole subclusters; else
 * nothing (trim is advisory).
 */
int
write_trim_edge (struct qcow2_image *img, uint64_t off, uint64_t len)
{
  uint64_t cs = img->cluster_size;

  if (!img->ext_l2)
    return 0;
  while (len > 0) {
    uint64_t n = min_u64 (len, cs - offset_into_cluster (img, off)), a, b;

    whole_subclusters (img, off, n, &a, &b);
    if (a < b && zero_subclusters (img, a, b - a, true) == -1)
      return -1;
    off += n;
    len -= n;
  }
  return 0;
}

/* Can whole clusters be zeroed by changing metadata only (a zero
 * request with or without may_trim)?  v3 without a raw external data
 * file: zero flags; v2 without backing or data file: discarded
 * clusters read as zero, but only a client that allows it may lose
 * the allocation.
 */
bool
write_zero_by_metadata (const struct qcow2_image *img, bool may_trim)
{
  if (img->version >= 3)
    return !(img->autoclear & AUTOCLEAR_DATA_FILE_RAW);
  return !img->backing_name && !img->data_file_name && may_trim;
}

/* How zeroing guest [offset, offset+count) splits: real zeroes
 * (write_zeroes) for [offset, *a) and [*b, offset+count), and
 * zero_clusters (with *trim, *may_trim) for the whole clusters [*a, *b)
 * between them, if any.  Whole clusters change metadata only on v3
 * images without a raw external data file; on v2 without a backing
 * file, a discarded cluster reads as zero, so they are discarded when
 * the client allows it.  A fast zero that would need real zeroes
 * anywhere fails (ENOTSUP) before anything changes.
 */
int
write_zero_plan (struct qcow2_image *img, uint64_t count, uint64_t offset,
                 unsigned flags, uint64_t *a, uint64_t *b, bool *trim,
                 bool *may_trim)
{
  bool meta = write_zero_by_metadata (img, false);
  uint64_t end = offset + count;

  write_whole_clusters (img, count, offset, a, b);
  if ((flags & QCOW2_F_FAST_ZERO) &&
      (((!meta || *a >= *b) && slow_zero (img, offset, count)) ||
       (meta && *a < *b && (slow_zero (img, offset, *a - offset) ||
                            (end > *b && slow_zero (img, *b, end - *b)))))) {
    errno = ENOTSUP;
    return -1;
  }
  *may_trim = (flags & QCOW2_F_MAY_TRIM) != 0;
  *trim = false;
  if (meta && *a < *b)
    return 0;
  if (!meta && *a < *b && write_zero_by_metadata (img, *may_trim)) {
    *trim = true;
    return 0;
  }
  *a = *b = end;                /* real zeroes for all of it */
  return 0;
}

/* ---- compressed writes (compress=on) ----
 *
 * Whole guest clusters that are unallocated, zero or compressed are
 * stored compressed, packed the way QEMU packs them: each stream
 * starts where the previous one ended (img->compress_next), in the
 * same host cluster while it fits, else running on into the next host
 * cluster when the allocator hands out the one just after it, else at
 * the start of a new one (the rest of the old one stays unused).  Like
 * QEMU, which places one stream at a time, the streams of a run that
 * fit in the old cluster go there first, by themselves, so that only
 * less than a stream is lost when a normal write took the next one.
 *
 *   host clusters:  |  H          |  H+1        |
 *   streams:        [ A ][ B ][ C    ][ D ][ E ...
 *   refcounts:      H: A,B,C = 3     H+1: C,D,E = 3
 *
 * A stream holds one reference on every host cluster it touches, so a
 * host cluster's refcount is the number of streams in it, and freeing
 * one (l2.c: l2_entry_host_range, from the entry's sector count, which
 * touches the same host clusters) decrements exactly those.  When the
 * last goes, the cluster is free, and refcount_set forgets it as the
 * place to go on filling.  A cluster whose refcount is at its maximum
 * is not filled further (with 1-bit refcounts: one stream a cluster).
 *
 * Clusters that do not compress to less than a cluster, and those
 * holding normal data (rewritten in place, or copied if shared), are
 * left to the normal write path: the plan says how many (returns 1).
 */

void
write_compress_batch_free (struct compressed_batch *b)
{
  free (b->pos);                /* one allocation holds all three */
  memset (b, 0, sizeof *b);
}

/* Compress guest clusters [c0, c0+count) (cluster aligned, count
 * rounded up to whole clusters; the partial last cluster of the disk is
 * padded with zeroes, as QEMU does) from buf.  Needs no lock.  The
 * streams go straight into one buffer, back to back, each given room
 * for one byte less than a cluster (smaller than a cluster, or stored
 * as it is: what qemu-img convert -c does).
 */
int
write_compress_batch (const struct qcow2_image *img, const uint8_t *buf,
                      uint64_t c0, uint64_t count,
                      struct compressed_batch *b)
{
  uint64_t cs = img->cluster_size, i, pos = 0;
  uint8_t *pad = NULL;
  char *mem;

  memset (b, 0, sizeof *b);
  b->c0 = c0;
  b->n = size_to_clusters (img, count);
  mem = malloc (b->n * (sizeof *b->pos + sizeof *b->len + cs));
  if (mem == NULL)
    return -1;
  b->pos = (uint64_t *) mem;
  b->len = (uint32_t *) (mem + b->n * sizeof *b->pos);
  b->out = (uint8_t *) (mem + b->n * (sizeof *b->pos + sizeof *b->len));
  for (i = 0; i < b->n; i++) {
    const uint8_t *in = buf + i * cs;
    size_t len = cs - 1;

    if ((i + 1) * cs > count) {
      pad = calloc (1, cs);
      if (pad == NULL)
        goto err;
      memcpy (pad, in, count - i * cs);
      in = pad;
    }
    b->pos[i] = pos;
    if (compress_cluster (img->compression_type, in, cs, b->out + pos,
                          &len) == -1) {
      if (errno != ENOSPC) {
        nbdkit_error ("%s: compressing guest cluster %#" PRIx64 ": %m",
                      img->name, c0 + i * cs);
        goto err;
      }
      len = 0;
    }
    b->len[i] = len;
    pos += len;
  }
  free (pad);
  return 0;

 err:
  free (pad);
  write_compress_batch_free (b);
  return -1;
}

/* May guest cluster g, whose entry is e, be replaced by a compressed
 * cluster?  Unallocated, zero (a preallocated one too: its cluster is
 * freed) or compressed; not normal data.
 */
static bool
compressible_entry (const struct qcow2_image *img, uint64_t e)
{
  if (e & QCOW_OFLAG_COMPRESSED)
    return true;
  if ((e & L2E_OFFSET_MASK) == 0)
    return true;
  return !img->ext_l2 && (e & QCOW_OFLAG_ZERO);
}

/* How many clusters from i on go the same way (compressed or not, by
 * their streams and entries): *n, and *compress.
 */
static int
classify (struct qcow2_image *img, const struct compressed_batch *b,
          uint64_t i, uint64_t *n, bool *compress)
{
  uint64_t cs = img->cluster_size, j;
  struct l2_ref ref;

  for (j = i; j < b->n; j++) {
    uint64_t e = 0;
    bool c = b->len[j] > 0;

    if (c && (img->l1[l1_index (img, b->c0 + j * cs)] & L1E_OFFSET_MASK)) {
      if (l2_get_entry (img, b->c0 + j * cs, &ref) == -1)
        return -1;
      e = be64toh (ref.entry[0]);
      l2_put_entry (img, &ref, false);
      c = compressible_entry (img, e);
    }
    if (j == i)
      *compress = c;
    else if (c != *compress)
      break;
  }
  *n = j - i;
  return 0;
}

/* At most this many new host clusters a plan (the rest of the batch
 * goes in the next one).
 */
#define PLACE_MAX_NEW 64

/* The host clusters a stream of len bytes at host touches. */
static void
stream_clusters (const struct qcow2_image *img, uint64_t host, uint64_t len,
                 uint64_t *first, uint64_t *last)
{
  *first = host >> img->cluster_bits;
  *last = (host + len - 1) >> img->cluster_bits;
}

/* Set the refcounts of host clusters [h0, h0+nh) to cnt[], undoing
 * what was set on failure (to was[]).
 */
static int
set_counts (struct qcow2_image *img, uint64_t h0, uint64_t nh,
            const uint64_t *cnt, const uint64_t *was)
{
  uint64_t x;

  for (x = 0; x < nh; x++)
    if (refcount_set (img, h0 + x, cnt[x]) == -1) {
      int e = errno;
      while (x-- > 0)
        refcount_set (img, h0 + x, was[x]);
      errno = e;
      return -1;
    }
  return 0;
}

/* Place the streams of clusters [i, i+n) of batch b, all to be stored
 * compressed: *p gets where (one contiguous host range) and how many
 * of them fit there, at least one.  They go on from img->compress_next
 * while its cluster can take more (by room and by refcount), and on
 * into new clusters if the allocator hands out the next ones, else
 * start at new clusters.  The refcounts are counted here, with the
 * allocation: each host cluster's refcount goes up by the number of
 * streams that touch it (a new one's is that number); new clusters no
 * stream reached are given back.
 */
static int
place (struct qcow2_image *img, const struct compressed_batch *b,
       uint64_t i, uint64_t n, struct compressed_plan *p)
{
  uint64_t cs = img->cluster_size, next = img->compress_next;
  uint64_t max = refcount_max (img), room = 0, total = 0, m = 0, rc0 = 0;
  uint64_t cnt[PLACE_MAX_NEW + 1], was[PLACE_MAX_NEW + 1];
  uint64_t h0, nh, cap_end, k, x, first, last;
  int64_t new = 0;

  if (next != 0 && offset_into_cluster (img, next) != 0) {
    if (refcount_get (img, next >> img->cluster_bits, &rc0) == -1)
      return -1;
    if (rc0 > 0 && rc0 < max)
      room = cs - offset_into_cluster (img, next);
  }
  /* Streams that fit in the room left go there by themselves, the
   * rest in the next plan: only a stream that does not fit needs new
   * clusters, and when those do not follow on (another writer took
   * the next cluster), only the room after the streams that fit is
   * lost, as when QEMU places one stream at a time, not all of it.
   */
  for (k = 0; k < n; k++) {
    if (k > 0 && total <= room && total + b->len[i + k] > room)
      break;
    total += b->len[i + k];
  }
  n = k;
  p->host = next;
  cap_end = next + room;
  if (total > room) {
    m = min_u64 (size_to_clusters (img, total - room), PLACE_MAX_NEW);
    if ((new = refcount_alloc (img, m)) == -1)
      return -1;
    if (room == 0 || (uint64_t) new != cap_end) {
      room = 0;
      p->host = new;
    }
    cap_end = new + m * cs;
  }
  if (!l2e_compressed_fits (img, cap_end)) {
    if (m)
      refcount_unalloc (img, new, m);
    nbdkit_error ("%s: host offset %#" PRIx64 " too large for a compressed "
                  "cluster", img->name, cap_end);
    errno = EFBIG;
    return -1;
  }

  /* The refcounts as they are (the first cluster may be the one
   * compress_next is in; new ones have 1 from the allocator) and as
   * they will be.
   */
  h0 = p->host >> img->cluster_bits;
  nh = (cap_end - (h0 << img->cluster_bits)) / cs;
  for (x = 0; x < nh; x++) {
    was[x] = x == 0 && room > 0 ? rc0 : 1;
    cnt[x] = x == 0 && room > 0 ? rc0 : 0;
  }
  p->i = i;
  p->len = 0;
  for (k = 0; k < n; k++) {
    uint64_t len = b->len[i + k], host = p->host + p->len;
    if (host + len > cap_end)
      break;
    stream_clusters (img, host, len, &first, &last);
    if (cnt[first - h0] >= max || cnt[last - h0] >= max)
      break;
    cnt[first - h0]++;
    if (last != first)
      cnt[last - h0]++;
    p->len += len;
  }
  p->n = k;
  /* Only the clusters reached keep their refcounts; the rest go back. */
  stream_clusters (img, p->host, p->len, &first, &last);
  if (set_counts (img, h0, last - h0 + 1, cnt, was) == -1) {
    if (m)
      refcount_unalloc (img, new, m);
    return -1;
  }
  if (m && (uint64_t) new + m * cs > (last + 1) * cs)
    refcount_unalloc (img, (last + 1) * cs,
                      (new + m * cs - (last + 1) * cs) / cs);
  img->compress_next = p->host + p->len;
  if (offset_into_cluster (img, img->compress_next) == 0)
    img->compress_next = 0;
  return 0;
}

/* Plan the next step of writing batch b from cluster i on (img->lock
 * held exclusively, the guest clusters from i on not in flight): 0
 * with *p to carry out (write p->len bytes of b->out + b->pos[p->i] at
 * p->host of the image file, then write_compressed_link, or
 * write_compressed_abandon), or 1 when clusters [i, i + p->n) are to be
 * written the normal way (they do not compress, or hold data).
 */
int
write_compressed_plan (struct qcow2_image *img,
                       const struct compressed_batch *b, uint64_t i,
                       struct compressed_plan *p)
{
  uint64_t n;
  bool compress = false;

  memset (p, 0, sizeof *p);
  p->i = i;
  if (classify (img, b, i, &n, &compress) == -1)
    return -1;
  p->n = n;
  if (!compress)
    return 1;
  if (l2_check_old_entries (img, b->c0 + i * img->cluster_size, n) == -1)
    return -1;
  p->bound = img->host_end;
  return place (img, b, i, n, p);
}

/* Give back the references of plan p's streams (not linked). */
void
write_compressed_abandon (struct qcow2_image *img,
                          const struct compressed_batch *b,
                          const struct compressed_plan *p)
{
  uint64_t k, host = p->host, first, last;

  for (k = 0; k < p->n; k++) {
    uint64_t len = b->len[p->i + k];
    stream_clusters (img, host, len, &first, &last);
    refcount_unalloc (img, first << img->cluster_bits, last - first + 1);
    host += len;
  }
}

/* Point the L2 entries of plan p, whose streams are written, at them,
 * and free (deferred) what they pointed at.  On failure the streams
 * not linked yet give back their references.
 */
int
write_compressed_link (struct qcow2_image *img,
                       const struct compressed_batch *b,
                       const struct compressed_plan *p)
{
  uint64_t cs = img->cluster_size, k, host = p->host;
  struct l2_ref ref;

  for (k = 0; k < p->n; k++) {
    uint64_t g = b->c0 + (p->i + k) * cs, len = b->len[p->i + k];

    if (l2_get_entry (img, g, &ref) == -1)
      goto err;
    if (l2_free_entry_later (img, be64toh (ref.entry[0]), g,
                             p->bound) == -1) {
      l2_put_entry (img, &ref, false);
      goto err;
    }
    ref.entry[0] = htobe64 (l2e_make_compressed (img, host, len));
    if (img->ext_l2)
      ref.entry[1] = 0;
    l2_put_entry (img, &ref, true);
    host += len;
  }
  return 0;

 err:
  write_compressed_abandon (img, b, &(struct compressed_plan) {
      .i = p->i + k, .n = p->n - k, .host = host });
  return -1;
}
