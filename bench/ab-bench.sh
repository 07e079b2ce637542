#!/usr/bin/env bash
# nbdkit-qcow2: what one feature costs writes: the plugin in two
# configurations, A and B, in one alternating run.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   bench/ab-bench.sh                     # A: no bitmaps, B: two bitmaps
#   B_BITMAPS=0 B_ARGS=detect-zeroes=on bench/ab-bench.sh
#
# One alternating run (each round runs A and B, in an order drawn at
# random, or with ORDER=abba swapped every other round: A B B A A B
# ..., whose period a periodic disturbance of the host can match, so
# that it always hits the same configuration) of the plugin on images
# made the same way; B's image
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
# round's pair (median, min-max); the same for the server's CPU time
# per write (user + system over the measured part, from /proc/PID/stat),
# which depends much less on what else runs than IOPS do, and for the
# user part alone (the plugin's own code; the kernel's share follows
# the system calls, which are the same in A and B unless the feature
# adds some: bench/syscount.sh counts them).  On this kind of VM some
# runs land in a slow phase of the host (both configurations: user and
# system time per write up together by 1.5-2x, no steal reported);
# the median of the per-round ratios is what to quote, with enough
# rounds (ROUNDS=14 RUNTIME=5 gives 14 pairs in about 7 minutes).
#
# Knobs: ORDER (random or abba), FRESH (0; 1 makes randwrite4k's image anew for every run, as
# alloc-randwrite4k's always is), PERF (0; 1 adds a perf profile of B
# per workload), ROUNDS (5), RUNTIME (10 s), BENCH_DIR (/dev/shm), PLUGIN (this
# tree's build; A_PLUGIN and B_PLUGIN, default PLUGIN, compare two
# builds), WORKLOADS ("randwrite4k alloc-randwrite4k").

set -eu
: "${ROUNDS:=5}" "${RUNTIME:=10}" "${BENCH_DIR:=/dev/shm}"
: "${WORKLOADS:=randwrite4k alloc-randwrite4k}"
: "${A_BITMAPS:=0}" "${B_BITMAPS:=1}" "${A_ARGS:=}" "${B_ARGS:=}"
: "${FRESH:=0}" "${ORDER:=random}"
src=$(cd "$(dirname "$0")/.." && pwd)
: "${PLUGIN:=$src/plugin/.libs/nbdkit-qcow2-plugin.so}"
: "${A_PLUGIN:=$PLUGIN}" "${B_PLUGIN:=$PLUGIN}"
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
plugin () { if [ "$1" = A ]; then echo "$A_PLUGIN"; else echo "$B_PLUGIN"; fi; }

for b in A B; do
    make_image "$dir/over-$b.qcow2" 4G preallocation=metadata "$(bitmaps $b)"
done

# cpu_ticks PID: user + system clock ticks of a process so far.
cpu_ticks () { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# user_ticks PID: user clock ticks alone (what the plugin's own code
# costs; the kernel's share follows the system calls, which
# bench/syscount.sh counts).
user_ticks () { awk '{ print $14 }' "/proc/$1/stat"; }
# minflt PID: minor page faults of a process so far (on some VMs, a
# fault costs far more than on bare metal: a feature that touches new
# memory in the write path shows here).
minflt () { awk '{ print $10 }' "/proc/$1/stat"; }

# run WORKLOAD CFG(A|B) ROUND
run ()
{
    local w=$1 b=$2 img spid fpid iops cpu ucpu flt c0 c1 u0 u1 f0 f1 t0 t1 i
    case $w in
    randwrite4k)
        img=$dir/over-$b.qcow2
        if [ "$FRESH" = 1 ]; then
            rm -f "$img"
            make_image "$img" 4G preallocation=metadata "$(bitmaps $b)"
        fi ;;
    alloc-randwrite4k)
        img=$dir/alloc-$b.qcow2
        rm -f "$img"
        make_image "$img" 256G cluster_size=65536 "$(bitmaps $b)" ;;
    esac
    rm -f "$sock"
    # shellcheck disable=SC2046
    nbdkit -f -U "$sock" "$(plugin $b)" file="$img" $(args $b) \
        2>>"$dir/server.log" &
    spid=$!
    for i in $(seq 500); do [ -S "$sock" ] && break; sleep 0.02; done
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
        --rw=randwrite --bs=4k --iodepth=32 --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --output-format=json \
        --output="$dir/fio.json" >/dev/null &
    fpid=$!
    # The server's CPU time over the measured part (after the ramp).
    sleep 1
    c0=$(cpu_ticks $spid) u0=$(user_ticks $spid) f0=$(minflt $spid)
    if [ "$3" = perf ]; then
        perf record -q -p "$spid" -o "$dir/perf.data" -- sleep "$((RUNTIME - 1))" \
            >/dev/null 2>&1 || true
    fi
    wait $fpid
    c1=$(cpu_ticks $spid) u1=$(user_ticks $spid) f1=$(minflt $spid)
    iops=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$dir/fio.json")
    cpu=$(python3 -c 'import os,sys; t,i,r=map(float,sys.argv[1:]); print(t/os.sysconf("SC_CLK_TCK")*1e6/(i*r))' \
          "$((c1 - c0))" "$iops" "$RUNTIME")
    ucpu=$(python3 -c 'import os,sys; t,i,r=map(float,sys.argv[1:]); print(t/os.sysconf("SC_CLK_TCK")*1e6/(i*r))' \
          "$((u1 - u0))" "$iops" "$RUNTIME")
    flt=$(python3 -c 'import sys; f,i,r=map(float,sys.argv[1:]); print(f/(i*r))' \
          "$((f1 - f0))" "$iops" "$RUNTIME")
    t0=$(date +%s.%N)
    kill -TERM $spid
    wait $spid || true
    t1=$(date +%s.%N)
    if qemu-img info "$img" | grep -q in-use; then
        echo "$0: bitmaps still in use after a clean stop" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$b" "$3" "$iops" \
        "$(echo "$t1 - $t0" | bc)" "$cpu" "$ucpu" "$flt" >> "$results"
    echo "ab-bench: $w $b round $3: $iops IOPS, server $cpu us CPU/write ($ucpu us user), $flt faults/write" >&2
    if [ "$3" = perf ]; then
        perf report -i "$dir/perf.data" --stdio --sort symbol 2>/dev/null |
            grep -v '^#' | grep -v '^$' > "$dir/perf-$w.txt" || true
    fi
}

for w in $WORKLOADS; do
    for r in $(seq "$ROUNDS"); do
        if [ "$ORDER" = random ]; then
            if (( RANDOM % 2 )); then order="A B"; else order="B A"; fi
        elif (( r % 2 )); then order="A B"; else order="B A"; fi
        for b in $order; do run "$w" "$b" "$r"; done
    done
done

# PERF=1: one more run of B per workload under perf record (not in the
# table): the share of the server's samples in bitmap.c's functions.
if [ "${PERF:-0}" = 1 ]; then
    for w in $WORKLOADS; do
        run "$w" B perf
        sed -i '$d' "$results"
    done
fi

[ "$A_PLUGIN" = "$B_PLUGIN" ] || echo "A: $A_PLUGIN; B: $B_PLUGIN"
echo "A: bitmaps=$A_BITMAPS args=${A_ARGS:-none}; B: bitmaps=$B_BITMAPS args=${B_ARGS:-none}; $ROUNDS rounds of $RUNTIME s, order $ORDER, $BENCH_DIR"
python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
print("| workload | A, IOPS | B, IOPS | B/A | server CPU us/write A | B | CPU B/A | user CPU us/write A | B | user CPU B/A | page faults/write A / B | stop time (s) A / B |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for w in dict.fromkeys(r[0] for r in rows):
    col = lambda k: {b: [float(r[k]) for r in rows if r[0] == w and r[1] == b] for b in "AB"}
    v, t, c, u, pf = col(3), col(4), col(5), col(6), col(7)
    f = lambda x: "%.0f (%.0f-%.0f)" % (statistics.median(x), min(x), max(x))
    g = lambda x: "%.2f (%.2f-%.2f)" % (statistics.median(x), min(x), max(x))
    h = lambda x: "%.3f (%.3f-%.3f)" % (statistics.median(x), min(x), max(x))
    ratio = lambda d: h([b / a for a, b in zip(d["A"], d["B"])])
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.3f / %.3f | %.2f / %.2f |" % (
        w, f(v["A"]), f(v["B"]), ratio(v), g(c["A"]), g(c["B"]), ratio(c),
        g(u["A"]), g(u["B"]), ratio(u),
        statistics.median(pf["A"]), statistics.median(pf["B"]),
        statistics.median(t["A"]), statistics.median(t["B"])))
EOF
if [ "${PERF:-0}" = 1 ]; then
    for w in $WORKLOADS; do
        echo
        echo "perf, B, $w: top 10 symbols and every bitmap.c function"
        echo '```'
        head -10 "$dir/perf-$w.txt"
        echo ...
        grep -E 'bitmap_|set_range|set_bits|get_page' "$dir/perf-$w.txt" || echo "(none sampled)"
        echo '```'
    done
fi
