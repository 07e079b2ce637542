#!/usr/bin/env bash
# nbdkit-qcow2 bench: file system calls per guest request (issue 17).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# Counts the preads, pwrites and fdatasyncs a plugin build makes for
# each guest write and flush of the flush-heavy allocating workload of
# bench.sh --disk (alloc-randwrite4k-fsync32: 4 KiB random allocating
# writes, QD32, fio --fsync=32 -- which at QD32 sends 0.6-0.8 NBD
# flushes per write, not 1/32 -- into a fresh empty 256 GiB
# image with 64 KiB clusters, served with cache=none), through an
# LD_PRELOAD counter (syscount-preload.c): no strace, no perf tracing
# needed.  Counts, unlike IOPS, mean something on a loaded machine.
#
#   bench/syscount.sh PLUGIN.so [PLUGIN.so ...]
#
# Environment: BENCH_DIR (a disk-backed directory, default /var/tmp),
# RUNTIME (seconds of fio, default 10), PLUGIN_ARGS (more key=value),
# FIO_ARGS (default the workload above), BITMAPS (0; 1 gives the image
# two enabled bitmaps, 64 KiB and 4 KiB granularity, as ab-bench.sh's
# configuration B: what persistent bitmaps add to the host calls).

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp}
RUNTIME=${RUNTIME:-10}
PLUGIN_ARGS=${PLUGIN_ARGS:-}
BITMAPS=${BITMAPS:-0}
FIO_ARGS=${FIO_ARGS:---rw=randwrite --bs=4k --iodepth=32 --fsync=32}
export PATH=/usr/bin:/usr/sbin:$PATH

[ $# -ge 1 ] || { echo "usage: $0 PLUGIN.so ..." >&2; exit 2; }
work=$(mktemp -d "$BENCH_DIR/syscount.XXXXXX")
trap 'rm -rf "$work"' EXIT
cc -shared -fPIC -O2 -o "$work/syscount.so" "$here/syscount-preload.c" -ldl

for so in "$@"; do
    img=$work/disk.qcow2
    rm -f "$img" "$work/counts" "$work/fio.json"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 256G
    if [ "$BITMAPS" = 1 ]; then
        qemu-img bitmap --add -g 65536 "$img" b64
        qemu-img bitmap --add -g 4096 "$img" b4
    fi
    # shellcheck disable=SC2086
    LD_PRELOAD=$work/syscount.so SYSCOUNT_OUT=$work/counts \
        nbdkit -U - "$so" file="$img" cache=none $PLUGIN_ARGS \
        --run "env -u LD_PRELOAD fio --name=syscount --ioengine=nbd \
               --uri=\"\$uri\" $FIO_ARGS --runtime=$RUNTIME --time_based \
               --norandommap --randrepeat=1 --output-format=json \
               --output=$work/fio.json >/dev/null"
    python3 - "$so" "$work/counts" "$work/fio.json" <<'EOF'
import json, re, sys
so, counts, fio = sys.argv[1:]
lines = [l for l in open(counts) if l.startswith("nbdkit:")]
line = max(lines, key=lambda l: int(re.search(r"fdatasync (\d+)", l).group(1)))
j = json.load(open(fio))["jobs"][0]
w = j["write"]["total_ios"]
f = j["sync"]["total_ios"] if "sync" in j else 0
n = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line)}
print(f"{so}")
print(f"  guest: {w} writes, {f} flushes, {j['write']['iops']:.0f} write IOPS")
print(f"  host:  {line.split(': ', 1)[1].strip()}")
print(f"  per guest write: {n['pread']/w:.2f} preads, {n['pwrite']/w:.2f} "
      f"pwrites, {n['fdatasync']/w:.2f} fdatasyncs; "
      f"per guest flush: {n['fdatasync']/max(f,1):.2f} fdatasyncs")
EOF
done
