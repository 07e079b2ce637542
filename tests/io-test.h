/* nbdkit-qcow2: io backends for the unit tests (tests/io-test.c).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Fault injection and the crash recorder wrap core's io interface
 * (core/io.h); they live with the tests, not in the library the plugin
 * ships.
 */

#ifndef QCOW2_IO_TEST_H
#define QCOW2_IO_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"

/* Fault injection: wraps inner (and owns it).  Calls are counted per
 * kind from 0 at the wrap; preallocate counts as a truncate.
 */
enum qcow2_fault_op {
  QCOW2_FAULT_READ,
  QCOW2_FAULT_WRITE,
  QCOW2_FAULT_FLUSH,
  QCOW2_FAULT_TRUNCATE,
  QCOW2_FAULT_NR_OPS
};
struct qcow2_fault_stats {
  uint64_t calls[QCOW2_FAULT_NR_OPS];   /* calls seen, failed or not */
  uint64_t failed[QCOW2_FAULT_NR_OPS];  /* calls failed by a fault */
};
extern struct qcow2_io *qcow2_io_new_fault (struct qcow2_io *inner);
/* Fail call number 'at' (0-based, counted from the wrap) of kind op with
 * errno err; persistent: also every later call of that kind (full disk).
 * One fault per kind; arming again replaces it.
 */
extern void qcow2_io_fault_arm (struct qcow2_io *io, enum qcow2_fault_op op,
                                uint64_t at, int err, bool persistent);
extern void qcow2_io_fault_disarm (struct qcow2_io *io);   /* every kind */
/* lands: a failed write is still passed on (then reported failed). */
extern void qcow2_io_fault_set_lands (struct qcow2_io *io, bool lands);
extern void qcow2_io_fault_stats (struct qcow2_io *io,
                                  struct qcow2_fault_stats *stats);

/* O_DIRECT checker: wraps inner (and owns it); reads and writes whose
 * offset or length is not a multiple of align, or whose buffer is not
 * aligned to mem_align, fail with EINVAL (as with O_DIRECT) instead of
 * reaching inner.  Totals over every checker the process made: reads
 * and writes seen, and how many of them were refused.
 */
extern struct qcow2_io *qcow2_io_new_dio_check (struct qcow2_io *inner,
                                                uint32_t align,
                                                uint32_t mem_align);
extern void qcow2_io_dio_check_totals (uint64_t *ops, uint64_t *refused);

/* Crash recorder: a memory io initially holding data[0..size) that logs
 * every write, truncate and completed flush.  io_close (by qcow2_close)
 * does not free the log: call qcow2_recorder_free as well, in any order.
 */
enum qcow2_rec_kind { QCOW2_REC_WRITE, QCOW2_REC_TRUNCATE, QCOW2_REC_FLUSH };
struct qcow2_rec_op {
  enum qcow2_rec_kind kind;
  uint64_t offset;              /* write: offset; truncate: new size */
  uint64_t len;                 /* write: length */
  const uint8_t *data;          /* write: a copy of the data */
  size_t covers;                /* flush: ops [0, covers) are durable */
};
extern struct qcow2_io *qcow2_io_new_recorder (const void *data, size_t size);
extern void qcow2_recorder_free (struct qcow2_io *rec);
/* Each flush waits us microseconds before it syncs (a disk's flush is
 * not instant; requests can then run during one).
 */
extern void qcow2_recorder_set_flush_delay (struct qcow2_io *rec,
                                            unsigned us);
extern size_t qcow2_recorder_nr_ops (struct qcow2_io *rec);
extern const struct qcow2_rec_op *qcow2_recorder_op (struct qcow2_io *rec,
                                                     size_t i);
/* A crash after the first nr_ops ops: ops [0, stable) are on disk,
 * where stable is what the last flush completed by then covers.
 */
extern size_t qcow2_recorder_stable (struct qcow2_io *rec, size_t nr_ops);
/* The writes/truncates in [stable, nr_ops) that may or may not be on
 * disk: returns how many, and their op indexes in pending[] if not NULL.
 */
extern size_t qcow2_recorder_pending (struct qcow2_io *rec, size_t nr_ops,
                                      size_t *pending);

/* One crash state.  keep[j] (j counting the pending ops in order, as
 * qcow2_recorder_pending lists them) says if pending op j reached the
 * disk (keep NULL: none did).  If torn < the pending count and
 * keep[torn], only the first torn_len bytes (rounded down to a multiple
 * of 512) of that write did.
 */
struct qcow2_crash_state {
  size_t nr_ops;
  const bool *keep;
  size_t torn;                  /* SIZE_MAX for none */
  uint64_t torn_len;
};
/* The file contents of a crash state (malloc'd; *size set). */
extern uint8_t *qcow2_recorder_crash (struct qcow2_io *rec,
                                      const struct qcow2_crash_state *cs,
                                      size_t *size);
/* The same as a new memory io. */
extern struct qcow2_io *qcow2_recorder_crash_io (struct qcow2_io *rec,
                                           const struct qcow2_crash_state *cs);
/* Faster for many states in log order: keeps the stable part as a
 * running buffer.  States must come with non-decreasing stable points
 * (EINVAL otherwise).
 */
struct qcow2_replay;
extern struct qcow2_replay *qcow2_replay_new (struct qcow2_io *rec);
extern uint8_t *qcow2_replay_crash (struct qcow2_replay *rp,
                                    const struct qcow2_crash_state *cs,
                                    size_t *size);
extern void qcow2_replay_free (struct qcow2_replay *rp);

#endif /* QCOW2_IO_TEST_H */
