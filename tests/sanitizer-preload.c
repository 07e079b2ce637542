/* nbdkit-qcow2: preloaded into nbdkit, after the ASan runtime, by
 * tests/sanitizer-bin/nbdkit when the plugin is built with the
 * sanitizers (configure --enable-sanitizers).
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * nbdkit is not built with ASan, so the ASan runtime has to be
 * preloaded into it (LD_PRELOAD) for the plugin to load.  But nbdkit's
 * children (the --run command: sh, nbdsh/python, qemu-img, nbdcopy,
 * fio, ...) inherit the environment and must not run under ASan.
 * This constructor runs when nbdkit starts, after the runtimes are
 * loaded, and puts LD_PRELOAD back to what it was before the wrapper
 * (QCOW2_SAN_SAVED_LD_PRELOAD, set by the wrapper, empty = unset), so
 * nothing nbdkit starts sees the sanitizer runtimes.
 *
 * (`ld.so --preload LIBS nbdkit' would leave the environment alone,
 * but with the dynamic loader run as the program getauxval(AT_BASE) is
 * 0, LeakSanitizer cannot find the loader, and reports its allocations
 * (dlopen's, TLS blocks) as leaks.)
 *
 * It also sends UBSan's reports to $QCOW2_SAN_LOG_DIR/ubsan.PID, as
 * ASan's go to asan.PID (ASAN_OPTIONS=log_path, set by the wrapper):
 * with gcc's separate libubsan next to libasan, UBSan ignores log_path
 * in UBSAN_OPTIONS and ASAN_OPTIONS alike and writes to stderr, so the
 * report would be lost wherever a test throws nbdkit's stderr away or
 * only checks that nbdkit failed.  libubsan's own
 * __sanitizer_set_report_path does work.
 *
 * It makes LeakSanitizer's scan at exit cheaper, see populate_bss.
 *
 * And it defines swift_demangle, see below.
 */

#include <config.h>

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>
#include <link.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/mman.h>

static void restore_ld_preload (void) __attribute__ ((constructor));

static void
restore_ld_preload (void)
{
  const char *saved = getenv ("QCOW2_SAN_SAVED_LD_PRELOAD");

  if (saved == NULL)
    return;
  if (*saved)
    setenv ("LD_PRELOAD", saved, 1);
  else
    unsetenv ("LD_PRELOAD");
  unsetenv ("QCOW2_SAN_SAVED_LD_PRELOAD");
}

static int
find_libubsan (struct dl_phdr_info *info, size_t size, void *data)
{
  const char *base = strrchr (info->dlpi_name, '/');

  if (base && strncmp (base, "/libubsan.so", 12) == 0) {
    *(const char **) data = info->dlpi_name;
    return 1;
  }
  return 0;
}

static void ubsan_report_path (void) __attribute__ ((constructor));

static void
ubsan_report_path (void)
{
  const char *dir = getenv ("QCOW2_SAN_LOG_DIR");
  const char *lib = NULL;
  static char path[4096];
  void *h;
  void (*set_report_path) (const char *);

  if (dir == NULL || *dir == '\0')
    return;
  dl_iterate_phdr (find_libubsan, &lib);
  if (lib == NULL || (h = dlopen (lib, RTLD_NOW | RTLD_NOLOAD)) == NULL)
    return;
  /* dlsym on libubsan's handle: its own copy, not libasan's. */
  set_report_path = (void (*) (const char *))
    dlsym (h, "__sanitizer_set_report_path");
  if (set_report_path &&
      snprintf (path, sizeof path, "%s/ubsan", dir) < (int) sizeof path)
    set_report_path (path);
  dlclose (h);
}

/* At exit LeakSanitizer scans every writable segment of every module
 * for pointers, .bss included, and nbdkit 1.32's .bss is about 200 MB,
 * almost all never touched.  Reading an untouched page maps the zero
 * page with one page fault, so the scan takes about 50,000 faults in
 * each nbdkit process (twice per captive nbdkit: the fork that runs
 * --run exits through the runtime too), which in a VM costs about
 * 0.8 s of CPU, and several seconds of wall time on a loaded machine:
 * most of the sanitizer test pass went into it.
 * MADV_POPULATE_READ (Linux 5.14) maps the zero page over the whole
 * range in one call instead, a third of the cost; the scan reads the
 * same zeros and nothing else changes.  Failure (an older kernel) is
 * ignored: the scan then faults the pages in itself, as before.
 * On the machine CI runs on (a VM, Linux 6.18) the populate does
 * not map the zero page but allocates and clears the 200 MB, 4 KiB at
 * a time; MADV_HUGEPAGE first (transparent huge pages are "madvise"
 * there) makes that 2 MiB at a time: a sanitized `nbdkit --run true'
 * then takes 0.37 s of CPU instead of 0.9 s (the same memory, the
 * same zeros scanned).  Without THP the advice fails and is ignored.
 */
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static int
populate_module_bss (struct dl_phdr_info *info, size_t size, void *data)
{
  uintptr_t page = (uintptr_t) sysconf (_SC_PAGESIZE);
  uintptr_t start, end;
  int i;

  for (i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];

    if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W) ||
        ph->p_memsz <= ph->p_filesz)
      continue;
    /* The whole pages past the file-backed part: anonymous memory. */
    start = info->dlpi_addr + ph->p_vaddr + ph->p_filesz;
    start = (start + page - 1) & ~(page - 1);
    end = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz) & ~(page - 1);
    if (end > start) {
#ifdef MADV_HUGEPAGE
      madvise ((void *) start, end - start, MADV_HUGEPAGE);
#endif
      madvise ((void *) start, end - start, MADV_POPULATE_READ);
    }
  }
  return 0;
}

static void populate_bss (void) __attribute__ ((constructor));

static void
populate_bss (void)
{
  dl_iterate_phdr (populate_module_bss, NULL);
}

/* A preloaded library's constructors run after those of the program's
 * libraries, so the ASan runtime initializes lazily, in the first
 * malloc: in nbdkit that is in libp11-kit's constructor (via gnutls),
 * inside newlocale(), which holds glibc's __libc_setlocale_lock for
 * writing.  ASan's initialization looks up swift_demangle with dlsym
 * and clears the failure with dlerror(), which translates the message
 * with dcgettext(), which takes the same lock for reading: that fails
 * (EDEADLK, ignored), and its unlock then releases newlocale's write
 * lock, which newlocale releases again.  The lock is broken, and
 * nbdkit hangs in the next locale call, typically p11-kit's freelocale()
 * at exit after an error message with %m.  With this symbol dlsym
 * succeeds and dlerror() has no message to translate.  ASan calls it
 * only for Swift names ("_T..."); NULL means "not demangled".
 */
char *swift_demangle (const char *mangled, size_t len, char *out,
                      size_t *outlen, unsigned flags);

char *
swift_demangle (const char *mangled, size_t len, char *out,
                size_t *outlen, unsigned flags)
{
  return NULL;
}
