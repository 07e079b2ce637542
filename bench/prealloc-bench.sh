#!/usr/bin/env bash
# nbdkit-qcow2: allocating writes against prealloc-size (issue 18 item 5).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# For every round, every workload and every prealloc-size in SIZES (in
# that order, so the sizes alternate), a fresh empty image (64 KiB
# clusters) in DIR is served by the plugin (default cache=writeback) and
# fio's nbd engine writes into it; the time includes the final flush
# (fio end_fsync), which is when the file system allocates the blocks of
# a buffered write.  Workloads:
#   seq1m   SEQ_MB MiB written in 1 MiB requests, sequentially
#   rand4k  RAND_N 4 KiB requests at random cluster-aligned offsets of a
#           64 GiB disk (each allocates a fresh 64 KiB cluster)
#   seq1m-direct, rand4k-direct: the same with cache=none (O_DIRECT:
#           no delayed allocation in the file system)
# After each run: the file's size, blocks and extents (filefrag) and a
# qemu-img check.  One line per run on stdout (tab-separated), then a
# summary (min/median/max per size and workload).
#
#   bench/prealloc-bench.sh                      # DIR=$TMPDIR or /tmp
#   DIR=/mnt/x ROUNDS=5 SIZES="0 8M" bench/prealloc-bench.sh

set -e
set -u
PATH=/usr/bin:/usr/sbin:$PATH
export LC_ALL=C

top=$(cd "$(dirname "$0")/.." && pwd)
PLUGIN=${PLUGIN:-$top/plugin/.libs/nbdkit-qcow2-plugin.so}
DIR=${DIR:-${TMPDIR:-/tmp}}
SIZES=${SIZES:-0 1M 4M 16M 64M}
ROUNDS=${ROUNDS:-3}
SEQ_MB=${SEQ_MB:-256}
RAND_N=${RAND_N:-4096}
WORKLOADS=${WORKLOADS:-seq1m rand4k seq1m-direct rand4k-direct}

work=$(mktemp -d "$DIR/prealloc-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "# $(date -u +%FT%TZ) $(uname -r) DIR=$DIR ($(stat -f -c %T "$DIR"))" \
     "plugin $(sha256sum "$PLUGIN" | cut -c1-12)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'round\tworkload\tprealloc\tseconds\tMiB/s\tsize\tallocated\textents\tload1\n'

run_one ()
{
    local w=$1 p=$2 r=$3 img=$work/disk.qcow2 sock=$work/sock pid t0 t1
    local fioargs cache
    rm -f "$img" "$sock"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 64G
    sync
    case $w in
    seq1m*) fioargs="--rw=write --bs=1M --size=${SEQ_MB}M --iodepth=8" ;;
    rand4k*) fioargs="--rw=randwrite --bs=4k --blockalign=64k --size=64G
                      --number_ios=$RAND_N --norandommap --randrepeat=1
                      --iodepth=16" ;;
    esac
    case $w in
    *-direct) cache=none ;;
    *) cache=writeback ;;
    esac
    nbdkit -f -U "$sock" "$PLUGIN" file="$img" prealloc-size="$p" \
           cache=$cache &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
        $fioargs --end_fsync=1 --output=/dev/null
    t1=$(date +%s.%N)
    kill "$pid"
    wait "$pid" || true
    local secs mib size alloc ext
    secs=$(echo "$t1 - $t0" | bc -l)
    case $w in
    seq1m*) mib=$SEQ_MB ;;
    rand4k*) mib=$(echo "$RAND_N * 4 / 1024" | bc -l) ;;
    esac
    size=$(stat -c %s "$img")
    alloc=$(( $(stat -c '%b * %B' "$img") ))
    ext=$(filefrag "$img" | awk '{ print $2 }')
    qemu-img check -q "$img" || echo "# CHECK FAILED: $w $p $r" >&2
    printf '%s\t%s\t%s\t%.2f\t%.1f\t%s\t%s\t%s\t%s\n' "$r" "$w" "$p" \
           "$secs" "$(echo "$mib / $secs" | bc -l)" "$size" "$alloc" "$ext" \
           "$(cut -d' ' -f1 /proc/loadavg)"
    rm -f "$img"
}

for r in $(seq "$ROUNDS"); do
    for w in $WORKLOADS; do
        for p in $SIZES; do
            run_one "$w" "$p" "$r"
        done
    done
done | tee "$work/runs.tsv"

echo
echo "# summary: MiB/s min / median / max, extents median"
/usr/bin/python3 - "$work/runs.tsv" <<'EOF'
import sys, statistics
runs = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    if not f[0].isdigit():
        continue
    runs.setdefault((f[1], f[2]), []).append((float(f[4]), int(f[7])))
for (w, p), v in sorted(runs.items()):
    mb = sorted(x[0] for x in v)
    print("%s\t%s\t%.1f / %.1f / %.1f\t%d" % (w, p, mb[0],
          statistics.median(mb), mb[-1], statistics.median(x[1] for x in v)))
EOF
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
