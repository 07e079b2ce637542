/* nbdkit-qcow2: helpers shared by the C tests that drive whole images.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * See testlib.h.  Used by test-crash.c and test-faults.c.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>

#include "testlib.h"

void
sys (const char *fmt, ...)
{
  char cmd[2048];
  va_list ap;
  int r;

  va_start (ap, fmt);
  vsnprintf (cmd, sizeof cmd, fmt, ap);
  va_end (ap);
  r = system (cmd);
  if (r != 0) {
    fprintf (stderr, "command failed (%d): %s\n", r, cmd);
    exit (1);
  }
}

uint8_t *
read_file (const char *path, size_t *size)
{
  FILE *fp = fopen (path, "r");
  uint8_t *b;
  long n;

  assert (fp);
  fseek (fp, 0, SEEK_END);
  n = ftell (fp);
  fseek (fp, 0, SEEK_SET);
  b = malloc (n ? n : 1);
  assert (b);
  assert (fread (b, 1, n, fp) == (size_t) n);
  fclose (fp);
  *size = n;
  return b;
}

void
write_file (const char *path, const uint8_t *b, size_t size)
{
  FILE *fp = fopen (path, "w");

  assert (fp);
  assert (fwrite (b, 1, size, fp) == size);
  assert (fclose (fp) == 0);
}

uint64_t
header_incompat_bits (const uint8_t *img, size_t size)
{
  uint32_t version;
  uint64_t v;

  if (size < 104)
    return 0;
  memcpy (&version, img + 4, 4);
  if (be32toh (version) < 3)
    return 0;                   /* v2 has no feature bits */
  memcpy (&v, img + 72, 8);
  return be64toh (v);
}

uint64_t
rnd (uint64_t *state)
{
  uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
  return z ^ (z >> 31);
}

uint64_t
rnd_below (uint64_t *state, uint64_t n)
{
  return n ? rnd (state) % n : 0;
}
