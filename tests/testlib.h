/* nbdkit-qcow2: helpers shared by the C tests that drive whole images.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Failures here are test failures: the functions assert or exit(1)
 * rather than return an error.
 */

#ifndef QCOW2_TESTLIB_H
#define QCOW2_TESTLIB_H

#include <stddef.h>
#include <stdint.h>

/* Run a shell command built from fmt; exit(1) if it fails. */
extern void sys (const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* A whole file into a malloc'd buffer (caller frees), and back. */
extern uint8_t *read_file (const char *path, size_t *size);
extern void write_file (const char *path, const uint8_t *b, size_t size);

/* The incompatible feature bits of the qcow2 header in img[0..size):
 * 0 for version 2 (which has none) or a header too short to hold them.
 */
extern uint64_t header_incompat_bits (const uint8_t *img, size_t size);

/* splitmix64 over the caller's state: reproducible from a seed. */
extern uint64_t rnd (uint64_t *state);
extern uint64_t rnd_below (uint64_t *state, uint64_t n);   /* 0 if n = 0 */

#endif /* QCOW2_TESTLIB_H */
