#!/usr/bin/env bash
# nbdkit-qcow2: what keeping persistent dirty bitmaps costs writes.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# One alternating run (none, bitmaps, none, bitmaps, ... with the order
# swapped every other round) of the plugin on two images made the same
# way, one without bitmaps and one with two enabled bitmaps (64 KiB and
# 4 KiB granularity), for:
#   randwrite4k        4K random overwrite of allocated clusters
#                      (a 4 GiB image with preallocation=metadata)
#   alloc-randwrite4k  4K random allocating write into a new 256 GiB
#                      image (made fresh for every run)
# fio's nbd engine, iodepth 32, one connection, as bench.sh runs these
# workloads.  Each server is stopped cleanly after its run (storing the
# bitmaps), and the stop time is reported too.  Prints a markdown table:
# IOPS per configuration (median, min-max) and the median ratio
# bitmaps/none.
#
# Knobs: ROUNDS (5), RUNTIME (10 s), BENCH_DIR (/dev/shm), PLUGIN (this
# tree's build), WORKLOADS ("randwrite4k alloc-randwrite4k").

set -eu
: "${ROUNDS:=5}" "${RUNTIME:=10}" "${BENCH_DIR:=/dev/shm}"
: "${WORKLOADS:=randwrite4k alloc-randwrite4k}"
src=$(cd "$(dirname "$0")/.." && pwd)
: "${PLUGIN:=$src/plugin/.libs/nbdkit-qcow2-plugin.so}"
PATH=/usr/bin:/usr/sbin:$PATH

dir=$(mktemp -d "$BENCH_DIR/bitmap-bench.XXXXXX")
trap 'rm -rf "$dir"' EXIT
sock=$dir/sock
results=$dir/results.tsv

# make IMG SIZE OPTS BITMAPS(0|1)
make_image ()
{
    qemu-img create -q -f qcow2 -o "$3" "$1" "$2"
    if [ "$4" = 1 ]; then
        qemu-img bitmap --add -g 65536 "$1" b64
        qemu-img bitmap --add -g 4096 "$1" b4
    fi
}

for b in 0 1; do
    make_image "$dir/over-$b.qcow2" 4G preallocation=metadata $b
done

# run WORKLOAD CFG(0|1) ROUND
run ()
{
    local w=$1 b=$2 img spid iops t0 t1 i
    case $w in
    randwrite4k) img=$dir/over-$b.qcow2 ;;
    alloc-randwrite4k)
        img=$dir/alloc-$b.qcow2
        rm -f "$img"
        make_image "$img" 256G cluster_size=65536 $b ;;
    esac
    rm -f "$sock"
    nbdkit -f -U "$sock" "$PLUGIN" file="$img" 2>>"$dir/server.log" &
    spid=$!
    for i in $(seq 500); do [ -S "$sock" ] && break; sleep 0.02; done
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
        --rw=randwrite --bs=4k --iodepth=32 --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --output-format=json \
        --output="$dir/fio.json" >/dev/null
    iops=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$dir/fio.json")
    t0=$(date +%s.%N)
    kill -TERM $spid
    wait $spid || true
    t1=$(date +%s.%N)
    if [ $b = 1 ] && qemu-img info "$img" | grep -q in-use; then
        echo "$0: bitmaps still in use after a clean stop" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$b" "$3" "$iops" \
        "$(echo "$t1 - $t0" | bc)" >> "$results"
    echo "bitmap-bench: $w bitmaps=$b round $3: $iops IOPS" >&2
}

for w in $WORKLOADS; do
    for r in $(seq "$ROUNDS"); do
        if (( r % 2 )); then order="0 1"; else order="1 0"; fi
        for b in $order; do run "$w" "$b" "$r"; done
    done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
print("| workload | no bitmaps, IOPS | two bitmaps, IOPS | ratio | stop time (s) none / bitmaps |")
print("|---|---|---|---|---|")
for w in dict.fromkeys(r[0] for r in rows):
    v = {b: [float(r[3]) for r in rows if r[0] == w and r[1] == b] for b in "01"}
    t = {b: [float(r[4]) for r in rows if r[0] == w and r[1] == b] for b in "01"}
    f = lambda x: "%.0f (%.0f-%.0f)" % (statistics.median(x), min(x), max(x))
    ratios = [b / a for a, b in zip(v["0"], v["1"])]
    print("| %s | %s | %s | %.3f (%.3f-%.3f) | %.2f / %.2f |" % (
        w, f(v["0"]), f(v["1"]), statistics.median(ratios), min(ratios),
        max(ratios), statistics.median(t["0"]), statistics.median(t["1"])))
EOF
