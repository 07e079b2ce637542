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

# Python helpers shared by the tests (tests/ranges.py) can be imported
# by the scripts a test writes into its scratch directory.
PYTHONPATH=$abs_top_srcdir/tests${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH

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
    # After the test's own cleanups (which stop its servers): any
    # sanitizer report from an nbdkit it ran fails the test.
    if [ -n "${_san_log_dir:-}" ]; then
        _san_reports || _status=1
        rm -rf "$_san_log_dir"
    fi
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

# Sanitizers (configure --enable-sanitizers).  A plugin built with ASan
# only loads into an nbdkit that has the ASan runtime loaded first, and
# /usr/bin/nbdkit is not built with ASan.  So when the plugin needs the
# runtime, every nbdkit the tests start, whether directly, in a --run
# command (sh) or from a bash script that resets PATH (bench/bench.sh),
# goes through sanitizer-bin/nbdkit, which preloads the runtimes into
# nbdkit and nothing else (see there).  Its reports go to a directory
# that _run_cleanup_hooks prints at exit, failing the test if there is
# any: an ASan or UBSan error or a leak in nbdkit fails the test even
# when nbdkit was expected to fail, or ran in the background.
_san_log_dir=
_san_libs=$(ldd "$PLUGIN" 2>/dev/null |
            awk '$1 ~ /^libasan\.so/ { a = $3 } $1 ~ /^libubsan\.so/ { u = $3 }
                 END { if (a != "") print a, u }')
if [ -n "$_san_libs" ]; then
    for _f in $_san_libs; do
        [ -f "$_f" ] || fail "sanitizer runtime $_f (needed by $PLUGIN) not found"
    done
    QCOW2_SAN_PRELOAD=$_san_libs
    QCOW2_SAN_HELPER=$abs_top_builddir/tests/.libs/sanitizer-preload.so
    QCOW2_SAN_NBDKIT=$(type -P nbdkit)
    [ -f "$QCOW2_SAN_HELPER" ] ||
        fail "$QCOW2_SAN_HELPER was not built (run make check first)"
    [ "$QCOW2_SAN_NBDKIT" != "$abs_top_srcdir/tests/sanitizer-bin/nbdkit" ] ||
        fail "the first nbdkit in PATH is the sanitizer wrapper"
    _san_log_dir=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-qcow2-san.XXXXXX")
    QCOW2_SAN_LOG_DIR=$_san_log_dir
    export QCOW2_SAN_PRELOAD QCOW2_SAN_HELPER QCOW2_SAN_NBDKIT \
           QCOW2_SAN_LOG_DIR
    # See _san_nbdkit_own_leaks.
    _san_unknown_ok=0
    if readelf -d "$PLUGIN" 2>/dev/null | grep -q 'Flags:.*NODELETE'; then
        _san_unknown_ok=1
    fi
    PATH=$abs_top_srcdir/tests/sanitizer-bin:$PATH
    export PATH

    # bench/bench.sh puts /usr/bin first in PATH again: for bash
    # scripts, `nbdkit' is also an exported function.  Started as
    # `nbdkit ... &' (a subshell), it passes SIGTERM/SIGINT/SIGHUP on
    # and waits, so that `kill $!' stops nbdkit and `wait $!' waits for
    # it, as with nbdkit itself.
    nbdkit ()
    {
        local _w=$abs_top_srcdir/tests/sanitizer-bin/nbdkit _p _r
        if [ "$BASHPID" = "$$" ]; then
            "$_w" "$@"
            return
        fi
        "$_w" "$@" <&0 &
        _p=$!
        trap 'kill -TERM $_p 2>/dev/null' TERM
        trap 'kill -INT $_p 2>/dev/null' INT
        trap 'kill -HUP $_p 2>/dev/null' HUP
        while :; do
            _r=0
            wait $_p || _r=$?
            kill -0 $_p 2>/dev/null || break
        done
        trap - TERM INT HUP
        return $_r
    }
    export -f nbdkit

    echo "$0: sanitizers: nbdkit runs with $QCOW2_SAN_PRELOAD preloaded"
fi

# Leaks of nbdkit's own.  LeakSanitizer reports two kinds in nbdkit
# 1.32, neither a bug of the plugin:
#
#  - A race at exit: when nbdkit is told to quit (in captive mode the
#    --run command has exited and nbdkit got SIGTERM) while a
#    connection is still being torn down (its client has just
#    disconnected), free_connection() skips backend_close(), by design
#    ("the main thread will be in the process of unloading it"), so
#    that connection's context (280 bytes malloc'd by nbdkit) and the
#    plugin handle in it (ours, from qcow2_plugin_open, whose .close is
#    never called) are never freed.  A few percent of nbdkit runs,
#    more under load (make -j2 check: about 100 in the whole suite).
#  - nbdkit's multi-conn filter leaks a few bytes (a vector) at unload
#    (test-filters).  nbdkit has unloaded the filter by then, so the
#    frame is "<unknown module>".
#
# LSan's suppression files cannot express these narrowly: nbdkit is
# stripped, so a suppression could only name its module (or none), and
# a module matches any frame of a stack, so that one would hide every
# leak of ours, all of which are allocated under a call from nbdkit.
# So _san_nbdkit_own_leaks decides instead, per report: it is true if
# FILE is a LeakSanitizer report (and nothing else) in which the first
# frame outside the sanitizer runtime of every direct leak is in the
# nbdkit executable or in a module unloaded by then, and no frame of a
# direct leak is in our code.  Indirect leaks are only reachable from
# direct ones, so then they are nbdkit's, or ours hanging off nbdkit's.
# "<unknown module>" is never ours only because the plugin is linked
# with -z nodelete (configure --enable-sanitizers): nbdkit's dlclose
# leaves it mapped and its frames named; without that flag unknown
# frames count as ours.  A report with any other direct leak, or any
# other sanitizer error, fails the test.
_san_nbdkit_own_leaks ()
{
    awk -v nbdkit="($QCOW2_SAN_NBDKIT+0x" -v unknown="${_san_unknown_ok:-0}" \
        -v src="$abs_top_srcdir/" -v build="$abs_top_builddir/" '
      /ERROR: LeakSanitizer: detected memory leaks/ { lsan = 1; next }
      /ERROR: |runtime error/ { other = 1 }
      /^(Direct|Indirect) leak of / {
        blk = $1; first = 1; if (blk == "Direct") direct++; next
      }
      /^[ \t]*$/ { blk = ""; next }
      blk == "Direct" && /^ *#[0-9]+ / {
        if (index($0, "/libsanitizer/") || / in __interceptor_/) next
        if (first && !index($0, nbdkit) &&
            !(unknown && index($0, "(<unknown module>)")))
          other = 1
        first = 0
        if (index($0, src) || index($0, build)) other = 1
      }
      END { exit !(lsan && direct && !other) }
    ' "$1"
}

# _san_reports: print the sanitizer reports nbdkit wrote (to stderr),
# return 1 if there is any (but nbdkit's own leaks, see above).
_san_reports ()
{
    local _f _r=0
    for _f in "$_san_log_dir"/*; do
        [ -f "$_f" ] || continue
        if _san_nbdkit_own_leaks "$_f"; then
            echo "$0: note: ignored a LeakSanitizer report (${_f##*/}) of nbdkit's own leaks at exit:" >&2
            grep -E '^(Direct|Indirect) leak|^ *#[0-9]+ |^SUMMARY' "$_f" >&2
            continue
        fi
        echo "$0: FAIL: sanitizer report from nbdkit (${_f##*/}):" >&2
        cat "$_f" >&2
        _r=1
    done
    return $_r
}

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

# wait_socket SOCK [PIDFILE]: wait until a server started in the
# background listens on the Unix socket SOCK and, given PIDFILE, has
# written its PID there; polls for up to 10 s.  Returns 1 if it did
# not come up.
wait_socket ()
{
    local _i
    for (( _i = 0; _i < 200; _i++ )); do
        if [ -S "$1" ] && { [ $# -lt 2 ] || [ -s "$2" ]; }; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# bitmaps_in_use IMG: the names of IMG's persistent dirty bitmaps that
# are marked in use (left inconsistent: the writer did not close the
# image cleanly), sorted, on one line; an empty line if there are none.
bitmaps_in_use ()
{
    qemu-img info --output=json "$1" | /usr/bin/python3 -c '
import json, sys
info = json.load(sys.stdin)
bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
print(" ".join(sorted(b["name"] for b in bms if "in-use" in b["flags"])))
'
}
