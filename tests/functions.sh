# nbdkit-qcow2: sourced by every tests/test-*.sh.  -*- shell-script -*-
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# Usage, at the top of a test:
#
#   #!/usr/bin/env bash
#   source ./functions.sh        # the tests run in tests/
#   requires qemu-img --version
#   img=$tmpdir/disk.qcow2
#   qemu-img create -f qcow2 $img 64M
#   serve_run file=$img --run 'nbdsh -u "$uri" -c "assert h.get_size() == 64 * 1024**2"'
#   qcheck $img
#
# make check sets abs_top_srcdir, abs_top_builddir and PLUGIN; when a
# test is run by hand they are derived from this file's location.
#
# Skipping: `requires CMD ARGS...` exits 77 (skip) if CMD fails, but in
# CI (env CI set) or with QCOW2_NO_SKIP=1 a missing requirement is a
# failure (exit 1): in CI every test must really run.

set -e
set -u

# nbdsh is a python program that needs /usr/bin/python3 (with the nbd
# module), not a python3 from pyenv or a virtualenv.
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
export LC_ALL=C

: "${abs_top_srcdir:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${abs_top_builddir:=$abs_top_srcdir}"
: "${PLUGIN:=$abs_top_builddir/plugin/.libs/nbdkit-qcow2-plugin.so}"
export abs_top_srcdir abs_top_builddir PLUGIN

# fail MESSAGE: stop the test with a failure.
fail ()
{
    echo "$0: FAIL: $*" >&2
    exit 1
}

# skip REASON: skip the test (exit 77), or fail if skipping is not
# allowed (CI set, or QCOW2_NO_SKIP=1).
skip ()
{
    if [ -n "${CI:-}" ] || [ "${QCOW2_NO_SKIP:-}" = 1 ]; then
        echo "$0: FAIL: test would be skipped because: $*" >&2
        echo "$0: (skipping is not allowed when CI or QCOW2_NO_SKIP=1 is set)" >&2
        exit 1
    fi
    echo "$0: test skipped because: $*"
    exit 77
}

# requires CMD ARGS...: skip the test unless CMD ARGS... succeeds.
requires ()
{
    ( "$@" ) </dev/null >/dev/null 2>&1 || skip "$* failed"
}

# cleanup_fn CMD ARGS...: run CMD ARGS... when the test exits, however
# it exits.  Cleanups run in reverse order of registration.
_cleanup_hook_count=0
cleanup_fn ()
{
    local _hook=_cleanup_hook$((_cleanup_hook_count++))
    declare -a -g "$_hook"
    eval "$_hook=(\"\$@\")"
}

_run_cleanup_hooks ()
{
    local _status=$? _i

    set +e
    trap '' INT QUIT TERM EXIT
    for (( _i = _cleanup_hook_count - 1; _i >= 0; --_i )); do
        local -n _hook=_cleanup_hook$_i
        "${_hook[@]}"
        unset -n _hook
    done
    exit $_status
}
trap _run_cleanup_hooks INT QUIT TERM EXIT

# A private scratch directory, removed at exit.
tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-qcow2-test.XXXXXX")
cleanup_fn rm -rf "$tmpdir"

# Things no shell test can do without: fail loudly, never skip, so a
# broken environment cannot silently skip the whole suite.
command -v nbdkit >/dev/null 2>&1 ||
    fail "nbdkit is not installed (apt-get install nbdkit)"
command -v nbdsh >/dev/null 2>&1 ||
    fail "nbdsh is not installed (apt-get install libnbd-bin python3-libnbd)"
nbdsh -c 'import nbd' </dev/null >/dev/null 2>&1 ||
    fail "nbdsh does not work (is python3-libnbd installed? PATH=$PATH)"
[ -f "$PLUGIN" ] ||
    fail "plugin $PLUGIN was not built (run make first)"

# serve_run PARAMS... [--run CMD]: run the plugin captive on a private
# Unix socket.  Inside --run, $uri, $unixsocket and $nbd are set by
# nbdkit.  Set QCOW2_TEST_VERBOSE=1 for nbdkit -v.
serve_run ()
{
    local _verbose=
    if [ "${QCOW2_TEST_VERBOSE:-}" = 1 ]; then _verbose=-v; fi
    nbdkit $_verbose -U - "$PLUGIN" "$@"
}

# qcheck IMG: fail unless `qemu-img check IMG` is clean (exit 0).
qcheck ()
{
    local _r=0
    qemu-img check "$1" || _r=$?
    [ $_r -eq 0 ] || fail "qemu-img check $1: exit $_r (0 expected)"
}

# qcheck_leaks_ok IMG: like qcheck, but leaked clusters (exit 3) are
# allowed, as after a crash.
qcheck_leaks_ok ()
{
    local _r=0
    qemu-img check "$1" || _r=$?
    [ $_r -eq 0 ] || [ $_r -eq 3 ] ||
        fail "qemu-img check $1: exit $_r (0 or 3 expected)"
}
