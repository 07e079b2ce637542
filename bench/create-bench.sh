#!/usr/bin/env bash
# nbdkit-qcow2: image creation with metadata preallocation and 512-byte
# clusters, the plugin against qemu-img.
#
# This is the workload of the 2014 overlap-check benchmark (Max
# Reitz's qcow2 metadata list series for QEMU, never merged): QEMU
# preallocates one cluster at a time and checks each metadata write
# against all metadata, so its time grows with the square of the size.
# The plugin computes the layout and writes the tables sequentially
# (core/create.c).
#
# For each size, each round runs, in alternating order:
#   ours: nbdkit -U - PLUGIN file=X create=true size=NG cluster-size=512
#           preallocation=metadata --run true
#         (start to ready and exit: create, open, serve, close)
#   qemu: qemu-img create -f qcow2 -o preallocation=metadata,
#           cluster_size=512 X NG
# and prints wall, user and system time (bash's time, children
# included), and for our images the result of qemu-img check.
#
# Environment:
#   SIZES="1 2 4"     sizes in GiB
#   ROUNDS=1          rounds per size
#   QEMU_MAX_GIB=4    skip qemu-img for sizes above this (4 GiB takes
#                     minutes); 0 = never run qemu-img
#   BENCH_DIR         where the images go (default: a new directory in
#                     ${TMPDIR:-/tmp}); it needs size + 2% free space
#   PLUGIN            the plugin (default: the one in this tree)

set -e
set -u

PATH=/usr/bin:/usr/sbin:$PATH
export LC_ALL=C

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${PLUGIN:=$top/plugin/.libs/nbdkit-qcow2-plugin.so}"
: "${SIZES:=1 2 4}"
: "${ROUNDS:=1}"
: "${QEMU_MAX_GIB:=4}"

[ -f "$PLUGIN" ] || { echo "$0: $PLUGIN not built" >&2; exit 1; }
command -v nbdkit >/dev/null || { echo "$0: nbdkit not found" >&2; exit 1; }
command -v qemu-img >/dev/null ||
  { echo "$0: qemu-img not found" >&2; exit 1; }

if [ -z "${BENCH_DIR:-}" ]; then
  BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/create-bench.XXXXXX")
  trap 'rm -rf "$BENCH_DIR"' EXIT
fi
img=$BENCH_DIR/bench.qcow2

# timed NAME CMD...: run CMD, set $t to "wall user sys" (seconds).
timed ()
{
  local out=$BENCH_DIR/time.out
  local TIMEFORMAT='%R %U %S'
  { time "$@" >/dev/null 2>"$BENCH_DIR/err" ; } 2> "$out" || {
    cat "$BENCH_DIR/err" >&2
    echo "$0: $* failed" >&2
    exit 1
  }
  t=$(tail -n 1 "$out")
}

run_ours ()
{
  local gib=$1 check r
  rm -f "$img"
  sync
  timed nbdkit -U - "$PLUGIN" file="$img" create=true size=${gib}G \
    cluster-size=512 preallocation=metadata --run true
  r=0
  qemu-img check "$img" > "$BENCH_DIR/check" 2>&1 || r=$?
  if [ $r -eq 0 ] && grep -q 'No errors were found' "$BENCH_DIR/check"; then
    check="clean (exit 0)"
  else
    check="FAILED (exit $r)"
  fi
  printf "%-6s %4s GiB %9s %9s %9s   %s\n" ours "$gib" $t "$check"
  rm -f "$img"
}

run_qemu ()
{
  local gib=$1
  if [ "$gib" -gt "$QEMU_MAX_GIB" ]; then
    printf "%-6s %4s GiB %9s %9s %9s   %s\n" qemu "$gib" - - - \
      "skipped (QEMU_MAX_GIB=$QEMU_MAX_GIB)"
    return
  fi
  rm -f "$img"
  sync
  timed qemu-img create -q -f qcow2 \
    -o preallocation=metadata,cluster_size=512 "$img" ${gib}G
  printf "%-6s %4s GiB %9s %9s %9s\n" qemu "$gib" $t
  rm -f "$img"
}

echo "nbdkit $(nbdkit --version | awk '{print $2}'),"\
     "$(qemu-img --version | head -1)"
echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
     "images in $BENCH_DIR"
echo
printf "%-6s %8s %9s %9s %9s   %s\n" tool size wall/s user/s sys/s \
  "qemu-img check"
for gib in $SIZES; do
  for (( round = 0; round < ROUNDS; round++ )); do
    if (( round % 2 == 0 )); then
      run_ours "$gib"; run_qemu "$gib"
    else
      run_qemu "$gib"; run_ours "$gib"
    fi
  done
done
