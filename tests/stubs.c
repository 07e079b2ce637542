/* nbdkit-qcow2: nbdkit_error and nbdkit_debug for the unit tests.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Core reports errors through nbdkit's functions.  The plugin gets them
 * from the nbdkit binary; the unit tests, which run core without
 * nbdkit, get these.  Errors always go to stderr; debug messages only
 * when QCOW2_DEBUG is set in the environment.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

/* The last error message, for tests that check what was reported. */
char stub_last_error[1024];

void
nbdkit_verror (const char *fs, va_list args)
{
  va_list copy;

  va_copy (copy, args);
  vsnprintf (stub_last_error, sizeof stub_last_error, fs, copy);
  va_end (copy);
  if (getenv ("QCOW2_QUIET") == NULL)
    fprintf (stderr, "error: %s\n", stub_last_error);
}

void
nbdkit_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  nbdkit_verror (fs, args);
  va_end (args);
}

void
nbdkit_vdebug (const char *fs, va_list args)
{
  if (getenv ("QCOW2_DEBUG") == NULL)
    return;
  fprintf (stderr, "debug: ");
  vfprintf (stderr, fs, args);
  fprintf (stderr, "\n");
}

void
nbdkit_debug (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  nbdkit_vdebug (fs, args);
  va_end (args);
}
