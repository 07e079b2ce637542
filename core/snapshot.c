/* nbdkit-qcow2: the internal snapshot table.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * The table is read and validated at open: every entry must lie inside
 * the table, every snapshot L1 table must be cluster aligned, inside the
 * file and within the L1 size limit.  The snapshots' L1 and L2 tables
 * are what the overlap checker protects as "inactive" metadata and what
 * the refcount check counts.  This plugin never creates or deletes
 * snapshots; it keeps clusters they share (refcount > 1) intact.
 *
 * This file only parses and describes the table (and reads a
 * snapshot's L1 table for the overlap map and the check): it opens no
 * image.  Serving a snapshot, a second image over the same file with
 * the snapshot's L1 table, is image.c's qcow2_open_snapshot.  So
 * snapshot.c calls nothing in core but the io layer.
 *
 * Locking: read once at open, immutable afterwards.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>

#include "internal.h"

/* Longest snapshot table we read: each entry is at most 40 + 64 KiB of
 * extra data + 2 * 64 KiB of names, times MAX_SNAPSHOTS, but we cap the
 * whole table more tightly, as QEMU does (64 MiB).
 */
#define MAX_SNAPSHOT_TABLE (UINT64_C(64) << 20)

int
snapshot_read_table (struct qcow2_image *img)
{
  int64_t file_size = io_size (img->io);
  uint8_t *buf = NULL;
  uint64_t len, pos = 0;
  uint32_t i;

  if (img->nb_snapshots == 0)
    return 0;
  len = min_u64 (MAX_SNAPSHOT_TABLE, file_size - img->snapshots_offset);
  buf = malloc (len);
  img->snapshots = calloc (img->nb_snapshots, sizeof *img->snapshots);
  if (buf == NULL || img->snapshots == NULL)
    goto err;
  if (io_pread (img->io, buf, len, img->snapshots_offset) == -1) {
    nbdkit_error ("%s: reading snapshot table: %m", img->name);
    goto err;
  }

  for (i = 0; i < img->nb_snapshots; i++) {
    struct snapshot *sn = &img->snapshots[i];
    uint32_t id_len, name_len, extra;
    const uint8_t *p = buf + pos;

    if (len - pos < SN_FIXED_SIZE)
      goto overrun;
    sn->l1_offset = get_be64 (p + SN_L1_TABLE_OFFSET);
    sn->l1_size = get_be32 (p + SN_L1_SIZE);
    id_len = get_be16 (p + SN_ID_STR_SIZE);
    name_len = get_be16 (p + SN_NAME_SIZE);
    sn->date_sec = get_be32 (p + SN_DATE_SEC);
    sn->date_nsec = get_be32 (p + SN_DATE_NSEC);
    sn->vm_clock_nsec = get_be64 (p + SN_VM_CLOCK_NSEC);
    sn->vm_state_size = get_be32 (p + SN_VM_STATE_SIZE);
    extra = get_be32 (p + SN_EXTRA_DATA_SIZE);
    sn->disk_size = img->size;
    if ((uint64_t) SN_FIXED_SIZE + extra + id_len + name_len > len - pos)
      goto overrun;
    p += SN_FIXED_SIZE;
    if (extra >= SN_EXTRA_VM_STATE_SIZE_64 + 8)
      sn->vm_state_size = get_be64 (p + SN_EXTRA_VM_STATE_SIZE_64);
    if (extra >= SN_EXTRA_DISK_SIZE + 8)
      sn->disk_size = get_be64 (p + SN_EXTRA_DISK_SIZE);
    p += extra;
    sn->id = strndup ((const char *) p, id_len);
    sn->name = strndup ((const char *) p + id_len, name_len);
    if (sn->id == NULL || sn->name == NULL)
      goto err;
    pos += round_up_pow2 (SN_FIXED_SIZE + extra + id_len + name_len, 8);

    if ((uint64_t) sn->l1_size * 8 > MAX_L1_BYTES ||
        (sn->l1_size && offset_into_cluster (img, sn->l1_offset)) ||
        sn->l1_offset > (uint64_t) file_size ||
        (uint64_t) sn->l1_size * 8 > file_size - sn->l1_offset) {
      nbdkit_error ("%s: snapshot %s (%s): L1 table at %#" PRIx64 " (%"
                    PRIu32 " entries) is invalid (unaligned, too large or "
                    "beyond end of file)", img->name, sn->id, sn->name,
                    sn->l1_offset, sn->l1_size);
      errno = EIO;
      goto err;
    }
    if (sn->disk_size > MAX_VIRTUAL_SIZE) {
      nbdkit_error ("%s: snapshot %s: virtual size %" PRIu64 " is too "
                    "large", img->name, sn->id, sn->disk_size);
      errno = EIO;
      goto err;
    }
  }
  img->snapshots_size = pos;
  free (buf);
  return 0;

 overrun:
  nbdkit_error ("%s: snapshot table entry %" PRIu32 " extends beyond the "
                "table (offset %#" PRIx64 ", end of file or %" PRIu64
                " byte limit)", img->name, i, img->snapshots_offset,
                MAX_SNAPSHOT_TABLE);
  errno = EIO;
 err:
  free (buf);
  snapshot_free_table (img);
  return -1;
}

void
snapshot_free_table (struct qcow2_image *img)
{
  uint32_t i;

  if (img->snapshots == NULL)
    return;
  for (i = 0; i < img->nb_snapshots; i++) {
    free (img->snapshots[i].id);
    free (img->snapshots[i].name);
  }
  free (img->snapshots);
  img->snapshots = NULL;
}

/* Read a snapshot's L1 table (host byte order).  Caller frees. */
uint64_t *
snapshot_read_l1 (struct qcow2_image *img, const struct snapshot *sn)
{
  uint64_t *l1 = calloc (sn->l1_size ? sn->l1_size : 1, 8);
  uint32_t i;

  if (l1 == NULL)
    return NULL;
  if (sn->l1_size &&
      io_pread (img->io, l1, (size_t) sn->l1_size * 8, sn->l1_offset) == -1) {
    nbdkit_error ("%s: reading L1 table of snapshot %s: %m", img->name,
                  sn->id);
    free (l1);
    return NULL;
  }
  for (i = 0; i < sn->l1_size; i++)
    l1[i] = be64toh (l1[i]);
  return l1;
}

/* ---- describing the snapshots ---- */

uint32_t
qcow2_nr_snapshots (struct qcow2_image *img)
{
  return img->nb_snapshots;
}

int
qcow2_snapshot_info (struct qcow2_image *img, uint32_t i,
                     struct qcow2_snapshot_info *info)
{
  const struct snapshot *sn;

  if (i >= img->nb_snapshots) {
    errno = EINVAL;
    return -1;
  }
  sn = &img->snapshots[i];
  info->id = sn->id;
  info->name = sn->name;
  info->size = sn->disk_size;
  info->date_sec = sn->date_sec;
  info->vm_state_size = sn->vm_state_size;
  return 0;
}

/* Find a snapshot by name, or else by ID (as qemu-img -l does). */
const struct snapshot *
snapshot_find (const struct qcow2_image *img, const char *name)
{
  uint32_t i;

  for (i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].name, name) == 0)
      return &img->snapshots[i];
  for (i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].id, name) == 0)
      return &img->snapshots[i];
  return NULL;
}
