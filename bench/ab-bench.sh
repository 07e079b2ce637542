#!/usr/bin/env bash
# nbdkit-qcow2: what one feature costs writes: the plugin in two
# configurations, A and B, in one alternating run.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   bench/ab-bench.sh                     # A: no bitmaps, B: two bitmaps
#   B_BITMAPS=0 B_ARGS=detect-zeroes=on bench/ab-bench.sh
#
# One alternating run (A, B, A, B, ... with the order swapped every
# other round) of the plugin on images made the same way; B's image
# gets B_BITMAPS (default 1: two enabled bitmaps, 64 KiB and 4 KiB
# granularity; A_BITMAPS default 0), and each server gets its A_ARGS /
# B_ARGS plugin parameters (default none), for:
#   randwrite4k        4K random overwrite of allocated clusters
#                      (a 4 GiB image with preallocation=metadata)
#   alloc-randwrite4k  4K random allocating write into a new 256 GiB
#                      image (made fresh for every run)
# fio's nbd engine, iodepth 32, one connection, as bench.sh runs these
# workloads.  Each server is stopped cleanly after its run (storing the
# bitmaps), and the stop time is reported too.  Prints a markdown table:
# IOPS per configuration (median, min-max) and the ratio B/A of each
# round's pair (median, min-max).
#
# Knobs: ROUNDS (5), RUNTIME (10 s), BENCH_DIR (/dev/shm), PLUGIN (this
# tree's build), WORKLOADS ("randwrite4k alloc-randwrite4k").

set -eu
: "${ROUNDS:=5}" "${RUNTIME:=10}" "${BENCH_DIR:=/dev/shm}"
: "${WORKLOADS:=randwrite4k alloc-randwrite4k}"
: "${A_BITMAPS:=0}" "${B_BITMAPS:=1}" "${A_ARGS:=}" "${B_ARGS:=}"
src=$(cd "$(dirname "$0")/.." && pwd)
: "${PLUGIN:=$src/plugin/.libs/nbdkit-qcow2-plugin.so}"
PATH=/usr/bin:/usr/sbin:$PATH

dir=$(mktemp -d "$BENCH_DIR/ab-bench.XXXXXX")
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

# bitmaps CFG, args CFG: of configuration A or B.
bitmaps () { if [ "$1" = A ]; then echo "$A_BITMAPS"; else echo "$B_BITMAPS"; fi; }
args () { if [ "$1" = A ]; then echo "$A_ARGS"; else echo "$B_ARGS"; fi; }

for b in A B; do
    make_image "$dir/over-$b.qcow2" 4G preallocation=metadata "$(bitmaps $b)"
done

# run WORKLOAD CFG(A|B) ROUND
run ()
{
    local w=$1 b=$2 img spid iops t0 t1 i
    case $w in
    randwrite4k) img=$dir/over-$b.qcow2 ;;
    alloc-randwrite4k)
        img=$dir/alloc-$b.qcow2
        rm -f "$img"
        make_image "$img" 256G cluster_size=65536 "$(bitmaps $b)" ;;
    esac
    rm -f "$sock"
    # shellcheck disable=SC2046
    nbdkit -f -U "$sock" "$PLUGIN" file="$img" $(args $b) \
        2>>"$dir/server.log" &
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
    if qemu-img info "$img" | grep -q in-use; then
        echo "$0: bitmaps still in use after a clean stop" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$b" "$3" "$iops" \
        "$(echo "$t1 - $t0" | bc)" >> "$results"
    echo "ab-bench: $w $b round $3: $iops IOPS" >&2
}

for w in $WORKLOADS; do
    for r in $(seq "$ROUNDS"); do
        if (( r % 2 )); then order="A B"; else order="B A"; fi
        for b in $order; do run "$w" "$b" "$r"; done
    done
done

echo "A: bitmaps=$A_BITMAPS args=${A_ARGS:-none}; B: bitmaps=$B_BITMAPS args=${B_ARGS:-none}; $ROUNDS rounds of $RUNTIME s, $BENCH_DIR"
python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
print("| workload | A, IOPS | B, IOPS | B/A | stop time (s) A / B |")
print("|---|---|---|---|---|")
for w in dict.fromkeys(r[0] for r in rows):
    v = {b: [float(r[3]) for r in rows if r[0] == w and r[1] == b] for b in "AB"}
    t = {b: [float(r[4]) for r in rows if r[0] == w and r[1] == b] for b in "AB"}
    f = lambda x: "%.0f (%.0f-%.0f)" % (statistics.median(x), min(x), max(x))
    ratios = [b / a for a, b in zip(v["A"], v["B"])]
    print("| %s | %s | %s | %.3f (%.3f-%.3f) | %.2f / %.2f |" % (
        w, f(v["A"]), f(v["B"]), statistics.median(ratios), min(ratios),
        max(ratios), statistics.median(t["A"]), statistics.median(t["B"])))
EOF
