/* nbdkit-qcow2: the table cache's interface (cache.c).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * A cache of fixed-size slices of a file, keyed by their offset.  It
 * knows nothing of qcow2: its owner gives it the file, a name for
 * messages, and a function that runs before any dirty slice is written
 * back (where the owner keeps its write ordering and checks the write
 * against the image's metadata).
 */

#ifndef QCOW2_CACHE_H
#define QCOW2_CACHE_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_io;
struct cache;
struct cache_entry;

/* Runs before a dirty slice [off, off+len) is written; -1 (errno set)
 * stops the write, and the slice stays dirty.
 */
typedef int (*cache_before_write_fn) (void *opaque, uint64_t off,
                                      uint32_t len);

/* A cache of 'bytes' (at least 16 slices) of 2^slice_bits-byte slices
 * of io.  'name' and 'what' (e.g. "disk.qcow2" and "L2") are for
 * messages.  before_write may be NULL.
 */
extern struct cache *cache_create (struct qcow2_io *io, const char *name,
                                   const char *what, uint32_t slice_bits,
                                   uint64_t bytes,
                                   cache_before_write_fn before_write,
                                   void *opaque);
extern void cache_destroy (struct cache *c);
/* Get the slice at offset 'off' (slice-aligned), pinned.  If 'fill' is
 * false the slice is not read from disk and starts zeroed (for a
 * freshly allocated table).  Returns NULL with errno set.
 */
extern void *cache_get (struct cache *c, uint64_t off, bool fill,
                        struct cache_entry **ep);
extern const void *cache_peek (struct cache *c, uint64_t off);
extern void cache_put (struct cache *c, struct cache_entry *e);
extern void cache_mark_dirty (struct cache *c, struct cache_entry *e);
extern int cache_flush (struct cache *c);     /* write back dirty slices */
extern void cache_drop (struct cache *c, uint64_t off, uint64_t len);
extern bool cache_has_dirty (struct cache *c);
extern uint32_t cache_nr_entries (struct cache *c);
extern void cache_stats (struct cache *c, uint64_t *hits, uint64_t *misses);
extern int cache_stage_get (struct cache *c, void **data, uint64_t *gen);
extern bool cache_stage_ready (struct cache *c, int slot, uint64_t off,
                               uint64_t gen);
extern void cache_stage_abort (struct cache *c, int slot);
extern void cache_stage_invalidate (struct cache *c);
extern void cache_stage_drain (struct cache *c);
/* Write-back without the owner's lock (cache.c explains). */
extern int cache_wb_begin (struct cache *c, uint64_t max_bytes,
                           cache_before_write_fn check, void *opaque);
extern int cache_wb_write (struct cache *c);
extern void cache_wb_end (struct cache *c, bool ok);

#endif /* QCOW2_CACHE_H */
