#!/usr/bin/env bash
# nbdkit-qcow2: benchmark the plugin against qemu-nbd and a raw file.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   bench/bench.sh [--disk] [--smoke] [--save] [--list] [--help]
#
# In one run, for each workload, alternates four servers on the same
# data, round after round (A B C D A B C D ...):
#
#   A plugin        nbdkit + this plugin on the qcow2 image
#   B qemu-threads  qemu-nbd --cache=writeback --aio=threads, same image
#   C qemu-uring    qemu-nbd --cache=writeback --aio=io_uring, same image
#   D raw           nbdkit's file plugin on the equivalent raw image
#   E base          with PLUGIN_BASE: another build of the plugin (say,
#                   from the commit before a change), started like A;
#                   A and E swap places every other round
#
# each started fresh for each run on a Unix socket, all through the
# page cache.
#
# --disk: on a disk-backed file system (default $TMPDIR or /tmp; tmpfs
# is refused), everything with the page cache out of the way:
#
#   A plugin        the plugin with cache=none (O_DIRECT)
#   N qemu-native   qemu-nbd --cache=none --aio=native, same image
#   C qemu-uring    qemu-nbd --cache=none --aio=io_uring, same image
#   R raw-direct    qemu-nbd -f raw --cache=none --aio=native on the raw
#                   image: the O_DIRECT ceiling
#
# and the workloads randread4k randwrite4k alloc-randwrite4k
# alloc-seqwrite1m alloc-randwrite4k-fsync32 (issue 17).  The client is fio's nbd engine (qemu-img bench for the
# qb-* workloads).  Reports, per workload and server, throughput, the
# server's CPU time per I/O (utime+stime of /proc/PID/stat over the
# measured window), its peak RSS (VmHWM), and the ratios plugin/best
# qemu-nbd and plugin/raw as medians (min-max) of per-round ratios;
# with PLUGIN_BASE also plugin/base ("before/after").
# Every qcow2 image written is checked with `qemu-img check`.
# See bench/README.md.
#
# Knobs (environment):
#   ROUNDS=3 RUNTIME=10 RAMP=1      rounds; seconds measured; warm-up
#   WORKLOADS="..."                 subset of --list (default: all)
#   SERVERS="plugin qemu-threads qemu-uring raw"
#                                   (+ base after plugin with PLUGIN_BASE;
#                                   --disk: plugin qemu-native qemu-uring
#                                   raw-direct)
#   BENCH_DIR=DIR                   where the images go (default: tmpfs
#                                   /dev/shm if it has room, else $TMPDIR
#                                   or /tmp); made and removed by us
#   OUT_DIR=DIR                     logs, fio JSON, perf data (kept)
#   KEEP_IMAGES=1                   keep (and reuse) the base images
#   PLUGIN=.so PLUGIN_ARGS="..."    the plugin and extra parameters
#   PLUGIN_BASE=.so                 the base build to compare with (E),
#                                   given the same PLUGIN_ARGS
#   FULL_SIZE=4G SPARSE_SIZE=1T ALLOC_SIZE=256G ALLOC512_SIZE=128G
#   ALLOC_BUDGET=BYTES              max host-file growth of one
#                                   allocating run (default: from free
#                                   space); caps fio's io_size
#   QB_COUNT=N                      requests per qemu-img bench run
#   PERF=1 PERF_WORKLOADS="..."     after the rounds of these workloads
#                                   (default randread4k alloc-randwrite4k)
#                                   profile one extra plugin run with
#                                   perf record -g (not counted)

set -e
set -u
set -o pipefail

export PATH=/usr/bin:/usr/sbin:$PATH
export LC_ALL=C

bench_src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top_src=$(dirname "$bench_src")
: "${PLUGIN:=$top_src/plugin/.libs/nbdkit-qcow2-plugin.so}"
: "${PLUGIN_ARGS:=}"
: "${PLUGIN_BASE:=}"

ALL_WORKLOADS="randread4k seqread1m sparse-randread4k randwrite4k
alloc-randwrite4k alloc-seqwrite1m alloc-randwrite4k-c512
alloc-seqwrite1m-c512 mc-randread4k mc-randwrite4k qb-randread4k
qb-randwrite4k alloc-randwrite4k-fsync32"
DISK_WORKLOADS="randread4k randwrite4k alloc-randwrite4k alloc-seqwrite1m
alloc-randwrite4k-fsync32"
ALL_SERVERS="plugin qemu-threads qemu-uring raw base qemu-native raw-direct"

# wl_def NAME: set W_* for workload NAME.
#   W_IMG     full (4 GiB allocated) | sparse (1 TiB, all L2 tables) |
#             new64 / new512 (fresh empty image per run, cluster size)
#   W_CLIENT  fio | qb (qemu-img bench)
#   W_ARGS    fio arguments, or qb arguments
#   W_UNIT    iops | mbps
#   W_WRITE   1 if the workload writes (the qcow2 image is checked)
#   W_AMP     host bytes a guest byte may cost (sizes io_size caps)
wl_def ()
{
    W_AMP=1 W_WRITE=0 W_CLIENT=fio W_UNIT=iops
    case $1 in
    randread4k)
        W_IMG=full W_ARGS="--rw=randread --bs=4k --iodepth=32"
        W_DESC="4 KiB random read, QD32, fully allocated image" ;;
    seqread1m)
        W_IMG=full W_ARGS="--rw=read --bs=1M --iodepth=8" W_UNIT=mbps
        W_DESC="1 MiB sequential read, QD8, fully allocated image" ;;
    sparse-randread4k)
        W_IMG=sparse W_ARGS="--rw=randread --bs=4k --iodepth=32"
        W_DESC="4 KiB random read, QD32, sparse image, every L2 table allocated" ;;
    randwrite4k)
        W_IMG=full W_ARGS="--rw=randwrite --bs=4k --iodepth=32" W_WRITE=1
        W_DESC="4 KiB random overwrite, QD32, fully allocated image" ;;
    alloc-randwrite4k)
        W_IMG=new64 W_ARGS="--rw=randwrite --bs=4k --iodepth=32" W_WRITE=1
        W_AMP=16
        W_DESC="4 KiB random allocating write, QD32, empty image, 64 KiB clusters" ;;
    alloc-seqwrite1m)
        W_IMG=new64 W_ARGS="--rw=write --bs=1M --iodepth=8" W_WRITE=1
        W_UNIT=mbps W_AMP=1.1
        W_DESC="1 MiB sequential allocating write, QD8, empty image, 64 KiB clusters" ;;
    alloc-randwrite4k-fsync32)
        W_IMG=new64 W_ARGS="--rw=randwrite --bs=4k --iodepth=32 --fsync=32"
        W_WRITE=1 W_AMP=16
        W_DESC="4 KiB random allocating write, QD32, fio --fsync=32 (which at QD32 sends 0.6-0.8 NBD flushes per write, not 1/32), empty image, 64 KiB clusters" ;;
    alloc-randwrite4k-c512)
        W_IMG=new512 W_ARGS="--rw=randwrite --bs=4k --iodepth=32" W_WRITE=1
        W_AMP=2
        W_DESC="4 KiB random allocating write, QD32, empty image, 512-byte clusters" ;;
    alloc-seqwrite1m-c512)
        W_IMG=new512 W_ARGS="--rw=write --bs=1M --iodepth=8" W_WRITE=1
        W_UNIT=mbps W_AMP=1.2
        W_DESC="1 MiB sequential allocating write, QD8, empty image, 512-byte clusters" ;;
    mc-randread4k)
        W_IMG=full W_ARGS="--rw=randread --bs=4k --iodepth=8 --numjobs=4"
        W_DESC="4 KiB random read, 4 connections x QD8, fully allocated image" ;;
    mc-randwrite4k)
        W_IMG=full W_ARGS="--rw=randwrite --bs=4k --iodepth=8 --numjobs=4"
        W_WRITE=1
        W_DESC="4 KiB random overwrite, 4 connections x QD8, fully allocated image" ;;
    qb-randread4k)
        W_IMG=full W_CLIENT=qb W_ARGS=""
        W_DESC="qemu-img bench: 4 KiB strided read, QD32, fully allocated image" ;;
    qb-randwrite4k)
        W_IMG=full W_CLIENT=qb W_ARGS="-w --pattern=165" W_WRITE=1
        W_DESC="qemu-img bench: 4 KiB strided overwrite, QD32, fully allocated image" ;;
    *)
        return 1 ;;
    esac
}

usage ()
{
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

smoke=0
save=0
disk=${DISK:-0}
while [ $# -gt 0 ]; do
    case $1 in
    --smoke) smoke=1 ;;
    --disk) disk=1 ;;
    --save) save=1 ;;
    --list)
        for w in $ALL_WORKLOADS; do wl_def $w; printf '%-24s %s\n' $w "$W_DESC"; done
        exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$0: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ $disk = 1 ]; then
    # A smaller full image: it is written to the disk at the start.
    : "${WORKLOADS:=$DISK_WORKLOADS}"
    [ $smoke = 1 ] || : "${FULL_SIZE:=2G}"
    # qemu-nbd's --aio=native needs O_DIRECT; the plugin gets cache=none
    # unless PLUGIN_ARGS names a cache mode.
    QEMU_CACHE=none
    case " $PLUGIN_ARGS " in
    *" cache="*) ;;
    *) PLUGIN_ARGS="cache=none${PLUGIN_ARGS:+ $PLUGIN_ARGS}" ;;
    esac
else
    QEMU_CACHE=writeback
fi
if [ $smoke = 1 ]; then
    : "${ROUNDS:=1}" "${RUNTIME:=1}" "${RAMP:=0}"
    : "${WORKLOADS:=randread4k alloc-randwrite4k qb-randread4k}"
    : "${FULL_SIZE:=64M}" "${SPARSE_SIZE:=4G}"
    : "${ALLOC_SIZE:=1G}" "${ALLOC512_SIZE:=1G}"
    : "${QB_COUNT:=4000}"
else
    : "${ROUNDS:=3}" "${RUNTIME:=10}" "${RAMP:=1}"
    : "${WORKLOADS:=$ALL_WORKLOADS}"
    : "${FULL_SIZE:=4G}" "${SPARSE_SIZE:=1T}"
    : "${ALLOC_SIZE:=256G}" "${ALLOC512_SIZE:=128G}"
    : "${QB_COUNT:=100000}"
fi
if [ -z "${SERVERS:-}" ]; then
    if [ $disk = 1 ]; then
        SERVERS="plugin qemu-native qemu-uring raw-direct"
        [ -n "$PLUGIN_BASE" ] && SERVERS="plugin base qemu-native qemu-uring raw-direct"
    else
        SERVERS="plugin qemu-threads qemu-uring raw"
        [ -n "$PLUGIN_BASE" ] && SERVERS="plugin base qemu-threads qemu-uring raw"
    fi
fi
: "${PERF:=0}" "${PERF_WORKLOADS:=randread4k alloc-randwrite4k}"
: "${KEEP_IMAGES:=0}"
WORKLOADS=$(echo $WORKLOADS)
for w in $WORKLOADS; do
    wl_def $w || { echo "$0: unknown workload $w (see --list)" >&2; exit 2; }
done
for s in $SERVERS; do
    case " $ALL_SERVERS " in *" $s "*) ;; *)
        echo "$0: unknown server $s ($ALL_SERVERS)" >&2; exit 2 ;;
    esac
done
case " $SERVERS " in
*" base "*)
    [ -n "$PLUGIN_BASE" ] || {
        echo "$0: SERVERS names base but PLUGIN_BASE is not set" >&2; exit 2; } ;;
*)
    if [ -n "$PLUGIN_BASE" ]; then
        echo "bench: PLUGIN_BASE is set but SERVERS does not name base: not run" >&2
        PLUGIN_BASE=
    fi ;;
esac
[ "$ROUNDS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] && [ "$RAMP" -ge 0 ] || {
    echo "$0: ROUNDS, RUNTIME >= 1 and RAMP >= 0 please" >&2; exit 2; }

die () { echo "$0: $*" >&2; exit 1; }
log () { echo "bench: $*" >&2; }

# ---- tools --------------------------------------------------------------

for t in nbdkit qemu-nbd qemu-img fio python3; do
    command -v $t >/dev/null 2>&1 || die "$t is not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit's file plugin is missing"
[ -f "$PLUGIN" ] || die "plugin $PLUGIN not built (run make)"
if [ -n "$PLUGIN_BASE" ]; then
    [ -f "$PLUGIN_BASE" ] || die "PLUGIN_BASE $PLUGIN_BASE does not exist"
fi
if [ "$PERF" = 1 ]; then
    command -v perf >/dev/null 2>&1 || die "PERF=1 but perf is not installed"
fi

parse_size () { python3 -c '
import sys; sys.path.insert(0, sys.argv[1]); import mkimg
print(mkimg.parse_size(sys.argv[2]))' "$bench_src" "$1"; }
full_bytes=$(parse_size "$FULL_SIZE")
sparse_bytes=$(parse_size "$SPARSE_SIZE")

mem_avail=$(awk '/^MemAvailable:/ { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)

# ---- directories ----------------------------------------------------------

# Bytes the base images take: the full pair, the sparse pair (one
# cluster of data per L2 table, twice, plus the L2 tables).
base_need=$(( 2 * full_bytes + 3 * (sparse_bytes / 8192) + (1 << 30) ))

fs_avail () { df -B1 --output=avail "$1" | tail -1 | tr -d ' '; }
fs_type () { df --output=fstype "$1" | tail -1 | tr -d ' '; }

# The images go to tmpfs when it has room: on a disk-backed file system
# the write workloads soon measure the disk (dirty page throttling) and
# every clean shutdown of a server waits for fdatasync.
made_bench_dir=0
if [ -z "${BENCH_DIR:-}" ] && [ $disk = 1 ]; then
    base=${TMPDIR:-/tmp}
    if [ $smoke = 1 ]; then
        BENCH_DIR=$(mktemp -d "$base/nbdkit-qcow2-bench-disk.XXXXXX")
        made_bench_dir=1
        KEEP_IMAGES=0
    else
        BENCH_DIR=$base/nbdkit-qcow2-bench-disk
    fi
elif [ -z "${BENCH_DIR:-}" ]; then
    extra=$((6 << 30))
    [ $smoke = 1 ] && extra=$((1 << 30))
    # Images kept there by an earlier KEEP_IMAGES=1 run are reused, so
    # the room they take counts as free.
    kept=0
    if [ $smoke = 0 ] && [ -d /dev/shm/nbdkit-qcow2-bench ]; then
        kept=$(du -s -B1 /dev/shm/nbdkit-qcow2-bench | cut -f1)
    fi
    if [ "$(fs_type /dev/shm 2>/dev/null)" = tmpfs ] &&
       [ $(( $(fs_avail /dev/shm) + kept )) -gt $((base_need + extra)) ] &&
       [ $(( mem_avail + kept )) -gt $((base_need + extra + (2 << 30))) ]; then
        base=/dev/shm
    else
        base=${TMPDIR:-/tmp}
    fi
    if [ $smoke = 1 ]; then
        BENCH_DIR=$(mktemp -d "$base/nbdkit-qcow2-bench.XXXXXX")
        made_bench_dir=1
        KEEP_IMAGES=0
    else
        BENCH_DIR=$base/nbdkit-qcow2-bench
    fi
fi
if [ ! -d "$BENCH_DIR" ]; then
    mkdir -p "$BENCH_DIR"
    made_bench_dir=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
bench_fs=$(fs_type "$BENCH_DIR")
if [ $disk = 1 ]; then
    case $bench_fs in
    tmpfs|ramfs)
        [ $made_bench_dir = 1 ] && rmdir "$BENCH_DIR"
        die "--disk: $BENCH_DIR is on $bench_fs, not a disk (set BENCH_DIR or TMPDIR)" ;;
    esac
fi
stamp=$(date +%Y%m%d-%H%M%S)
: "${OUT_DIR:=${TMPDIR:-/tmp}/nbdkit-qcow2-bench-out-$stamp}"
mkdir -p "$OUT_DIR"/logs "$OUT_DIR"/fio
OUT_DIR=$(cd "$OUT_DIR" && pwd)
runs=$OUT_DIR/runs.tsv
: > "$runs"

# Serve a copy of the plugin (and of the base build), so that a rebuild
# during the run does not change what is measured half-way.
build_id () { echo "$1 ($(stat -c %y "$1" | cut -d. -f1), sha256 $(sha256sum "$1" | cut -c1-12))"; }
cp "$PLUGIN" "$OUT_DIR/plugin.so"
plugin_id=$(build_id "$PLUGIN")
PLUGIN=$OUT_DIR/plugin.so
base_id=
if [ -n "$PLUGIN_BASE" ]; then
    cp "$PLUGIN_BASE" "$OUT_DIR/plugin-base.so"
    base_id=$(build_id "$PLUGIN_BASE")
    PLUGIN_BASE=$OUT_DIR/plugin-base.so
fi

sock=$BENCH_DIR/bench.sock
uri="nbd+unix:///?socket=$sock"
spid=
helpers=()
perfpid=

cleanup ()
{
    local st=$?
    set +e
    if [ -n "$spid" ]; then kill -KILL "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; fi
    for p in "${helpers[@]}" $perfpid; do kill "$p" 2>/dev/null; done
    rm -f "$sock" "$BENCH_DIR"/new.* "$BENCH_DIR"/empty-* 2>/dev/null
    if [ "$KEEP_IMAGES" != 1 ]; then
        rm -f "$BENCH_DIR"/full-* "$BENCH_DIR"/sparse-* 2>/dev/null
        [ $made_bench_dir = 1 ] && rmdir "$BENCH_DIR" 2>/dev/null
    fi
    exit $st
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- images ------------------------------------------------------------

full_q=$BENCH_DIR/full-$FULL_SIZE.qcow2
full_r=$BENCH_DIR/full-$FULL_SIZE.raw
sparse_q=$BENCH_DIR/sparse-$SPARSE_SIZE.qcow2
sparse_r=$BENCH_DIR/sparse-$SPARSE_SIZE.raw

# check_image IMG TAG: qemu-img check; echo ok|leaks|corrupt|error.
check_image ()
{
    local r=0
    qemu-img check -f qcow2 "$1" >> "$OUT_DIR/logs/check.log" 2>&1 || r=$?
    echo "== $2: exit $r" >> "$OUT_DIR/logs/check.log"
    case $r in 0) echo ok ;; 3) echo leaks ;; 2) echo corrupt ;; *) echo error ;; esac
}

make_full ()
{
    [ -f "$full_q.ok" ] && [ -f "$full_q" ] && [ -f "$full_r" ] && return 0
    log "making $FULL_SIZE fully allocated images (raw and qcow2, 64 KiB clusters)"
    rm -f "$full_q" "$full_r" "$full_q.ok"
    python3 "$bench_src/mkimg.py" full "$full_r" "$FULL_SIZE"
    qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$full_r" "$full_q"
    [ "$(check_image "$full_q" "created $full_q")" = ok ] ||
        die "qemu-img check of the new $full_q failed"
    touch "$full_q.ok"
}

make_sparse ()
{
    [ -f "$sparse_q.ok" ] && [ -f "$sparse_q" ] && [ -f "$sparse_r" ] && return 0
    log "making $SPARSE_SIZE sparse images (one 64 KiB cluster per L2 table)"
    rm -f "$sparse_q" "$sparse_r" "$sparse_q.ok"
    python3 "$bench_src/mkimg.py" sparse "$sparse_r" "$SPARSE_SIZE" 64K >/dev/null
    qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$sparse_r" "$sparse_q"
    [ "$(check_image "$sparse_q" "created $sparse_q")" = ok ] ||
        die "qemu-img check of the new $sparse_q failed"
    touch "$sparse_q.ok"
}

# ---- servers -----------------------------------------------------------

# start_server NAME IMAGE LOG: start a server in the background on $sock
# and set spid.
start_server ()
{
    local name=$1 img=$2 slog=$3 i
    rm -f "$sock"
    case $name in
    plugin|base)
        local so=$PLUGIN
        [ "$name" = base ] && so=$PLUGIN_BASE
        # shellcheck disable=SC2086
        nbdkit -f --exit-with-parent -U "$sock" "$so" file="$img" \
            $PLUGIN_ARGS >>"$slog" 2>&1 & ;;
    qemu-threads)
        qemu-nbd -t -e 16 -f qcow2 --cache=$QEMU_CACHE --aio=threads \
            -k "$sock" "$img" >>"$slog" 2>&1 & ;;
    qemu-uring)
        qemu-nbd -t -e 16 -f qcow2 --cache=$QEMU_CACHE --aio=io_uring \
            -k "$sock" "$img" >>"$slog" 2>&1 & ;;
    qemu-native)
        qemu-nbd -t -e 16 -f qcow2 --cache=none --aio=native \
            -k "$sock" "$img" >>"$slog" 2>&1 & ;;
    raw-direct)
        qemu-nbd -t -e 16 -f raw --cache=none --aio=native \
            -k "$sock" "$img" >>"$slog" 2>&1 & ;;
    raw)
        nbdkit -f --exit-with-parent -U "$sock" file file="$img" \
            >>"$slog" 2>&1 & ;;
    esac
    spid=$!
    for (( i = 0; i < 1000; i++ )); do
        [ -S "$sock" ] && return 0
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.02
    done
    kill -KILL "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    spid=
    return 1
}

# stop_server: SIGTERM (qemu-nbd and nbdkit both flush and exit cleanly).
stop_server ()
{
    local i r=0
    [ -n "$spid" ] || return 0
    kill -TERM "$spid" 2>/dev/null || true
    for (( i = 0; i < 6000; i++ )); do
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$spid" 2>/dev/null; then
        log "server $spid does not exit: killing it"
        kill -KILL "$spid" 2>/dev/null || true
        r=1
    fi
    wait "$spid" 2>/dev/null || true
    spid=
    rm -f "$sock"
    return $r
}

# cpu_ticks PID: utime + stime of the whole process (all threads, also
# those that have exited), in clock ticks.
# steal_ticks: the whole machine's CPU ticks stolen by the hypervisor,
# and all its CPU ticks, from /proc/stat ("0 0" if there is none).
steal_ticks ()
{
    local label u n s i w q sq st rest
    read -r label u n s i w q sq st rest < /proc/stat 2>/dev/null ||
        { echo "0 0"; return; }
    st=${st:-0}
    echo "$st $(( u + n + s + i + w + q + sq + st ))"
}

# steal_pct "S0 T0" "S1 T1": stolen share of the machine's CPU time.
steal_pct ()
{
    python3 -c '
import sys
s0, t0 = map(int, sys.argv[1].split()); s1, t1 = map(int, sys.argv[2].split())
print("%.1f" % (100.0 * (s1 - s0) / (t1 - t0)) if t1 > t0 else "-")
' "$1" "$2"
}

cpu_ticks ()
{
    local line rest
    read -r line < /proc/$1/stat || { echo -1; return; }
    rest=${line##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $(( ${12} + ${13} ))
}

vm_hwm ()
{
    awk '/^VmHWM:/ { print $2 }' /proc/$1/status 2>/dev/null || echo 0
}

# Does qemu-nbd --aio=io_uring work here?  (Kernel support, seccomp,
# io_uring_disabled, ...)
uring_status=untested
probe_uring ()
{
    local img=$BENCH_DIR/uring-probe.qcow2 ok=0
    qemu-img create -q -f qcow2 "$img" 16M
    if start_server qemu-uring "$img" "$OUT_DIR/logs/uring-probe.log"; then
        if qemu-img bench -f raw -c 64 -d 4 -s 4096 "$uri" \
               >>"$OUT_DIR/logs/uring-probe.log" 2>&1 &&
           find /proc/$spid/fd -lname '*io_uring*' 2>/dev/null | grep -q .; then
            ok=1
        fi
        stop_server || true
    fi
    rm -f "$img"
    if [ $ok = 1 ]; then
        uring_status=ok
    else
        uring_status="n/a (qemu-nbd --aio=io_uring failed here; see $OUT_DIR/logs/uring-probe.log)"
    fi
}

# ---- budgets ----------------------------------------------------------

# How much an allocating run may grow its image: fio's io_size is set
# to this / W_AMP so that a fast server cannot fill tmpfs or the disk.
alloc_budget ()
{
    local avail budget
    avail=$(fs_avail "$BENCH_DIR")
    budget=$(( avail - (2 << 30) ))
    if [ "$bench_fs" = tmpfs ]; then
        local mem
        mem=$(awk '/^MemAvailable:/ { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)
        [ $(( mem - (4 << 30) )) -lt $budget ] && budget=$(( mem - (4 << 30) ))
        [ $budget -gt $((8 << 30)) ] && budget=$((8 << 30))
    else
        [ $budget -gt $((32 << 30)) ] && budget=$((32 << 30))
    fi
    [ $budget -lt $((64 << 20)) ] && budget=$((64 << 20))
    echo $budget
}

# ---- one run ------------------------------------------------------------

# Stride of qemu-img bench: an odd number of 4 KiB blocks (so every
# block of a power-of-two image is visited) that moves to another L2
# table and slice at each request (about 0.62 of an L2 table's 512 MiB
# further each time).
qb_step=$(( (2 * 131072 + 80107) * 4096 ))

# page_cache_bytes FILE: how much of FILE is in the page cache now
# (fincore; "-" without it).  In --disk mode each run records how much
# that grew from the server's start to the end of the client: every
# server keeps the page cache out of the way, so it should stay near 0
# however much was written.
page_cache_bytes ()
{
    fincore --bytes --noheadings --output RES "$1" 2>/dev/null | tr -d ' ' |
        grep -x '[0-9][0-9]*' || echo -
}

# run_one WORKLOAD SERVER ROUND [perf]: one measured run; appends a line
# to runs.tsv.
run_one ()
{
    local wl=$1 srv=$2 round=$3 perf=${4:-}
    local tag=$wl.$srv.r$round img fresh=0 st=ok
    local json=$OUT_DIR/fio/$tag.json clog=$OUT_DIR/logs/$tag.client.log
    local slog=$OUT_DIR/logs/$tag.server.log
    local t0f=$OUT_DIR/logs/$tag.t0 c0 c1 st0 st1 steal=- rss=0 check=- iops=0 bw=0 ios=0
    local secs=0 cli_ms=0 r pcache=- pc0
    perfpid=
    [ -n "$perf" ] && tag=$wl.$srv.perf
    wl_def "$wl"

    local qcow2=1
    case $srv in raw|raw-direct) qcow2=0 ;; esac
    case $W_IMG in
    full)   if [ $qcow2 = 1 ]; then img=$full_q; else img=$full_r; fi ;;
    sparse) if [ $qcow2 = 1 ]; then img=$sparse_q; else img=$sparse_r; fi ;;
    new64|new512)
        fresh=1
        local size=$ALLOC_SIZE cs=65536
        [ $W_IMG = new512 ] && { size=$ALLOC512_SIZE; cs=512; }
        if [ $qcow2 = 1 ]; then
            # A copy of an empty image made once (qemu-img create takes
            # seconds with 512-byte clusters: a 32 MiB L1 table).
            local tmpl=$BENCH_DIR/empty-$cs-$size.qcow2
            if [ ! -f "$tmpl" ]; then
                qemu-img create -q -f qcow2 -o cluster_size=$cs "$tmpl.tmp" "$size"
                mv "$tmpl.tmp" "$tmpl"
            fi
            img=$BENCH_DIR/new.qcow2
            rm -f "$img"
            cp --sparse=always "$tmpl" "$img"
        else
            img=$BENCH_DIR/new.raw
            rm -f "$img"
            truncate -s "$size" "$img"
        fi ;;
    esac

    pc0=-
    [ "$disk" = 1 ] && pc0=$(page_cache_bytes "$img")
    if ! start_server "$srv" "$img" "$slog"; then
        log "$tag: server did not start (see $slog)"
        printf '%s\t%s\t%s\tfail\t0\t0\t0\t0\t0\t0\t0\t-\t-\n' "$wl" "$srv" "$round" >> "$runs"
        [ $fresh = 1 ] && rm -f "$img"
        return 0
    fi

    rm -f "$t0f"
    if [ "$W_CLIENT" = fio ]; then
        local limit="--time_based"
        if [ $fresh = 1 ]; then
            limit="--io_size=$(python3 -c "print(int($ALLOC_BUDGET_BYTES / $W_AMP) // (1 << 20) << 20)")"
        fi
        if [ "$RAMP" -gt 0 ]; then
            ( sleep "$RAMP"; { cpu_ticks "$spid"; steal_ticks; } > "$t0f" ) &
            helpers+=($!)
        else
            { cpu_ticks "$spid"; steal_ticks; } > "$t0f"
        fi
        if [ -n "$perf" ]; then
            ( sleep "$RAMP"; perf record -q -g -p "$spid" -o "$OUT_DIR/perf-$wl.data" \
                  -- sleep "$RUNTIME" ) >"$OUT_DIR/logs/$tag.perf.log" 2>&1 &
            perfpid=$!
        fi
        r=0
        # shellcheck disable=SC2086
        fio --name="$wl" --ioengine=nbd --uri="$uri" $W_ARGS \
            --runtime="$RUNTIME" --ramp_time="$RAMP" $limit \
            --norandommap --randrepeat=1 --group_reporting \
            --output-format=json --output="$json" >"$clog" 2>&1 || r=$?
        c1=$(cpu_ticks "$spid")
        st1=$(steal_ticks)
        rss=$(vm_hwm "$spid")
        if [ "$disk" = 1 ] && [ "$pc0" != - ]; then
            pcache=$(page_cache_bytes "$img")
            [ "$pcache" = - ] || pcache=$(( pcache - pc0 ))
        fi
        if [ ${#helpers[@]} -gt 0 ]; then
            wait "${helpers[@]}" 2>/dev/null || true
            helpers=()
        fi
        [ -n "$perfpid" ] && { wait "$perfpid" || true; perfpid=; }
        c0=$(head -1 "$t0f" 2>/dev/null)
        c0=${c0:--1}
        st0=$(sed -n 2p "$t0f" 2>/dev/null)
        [ -n "$st0" ] && steal=$(steal_pct "$st0" "$st1")
        if [ $r -ne 0 ] || [ "$c0" -lt 0 ]; then
            st=fail
            log "$tag: fio failed (exit $r, see $clog)"
        else
            # iops, bytes/s, I/Os, seconds, client CPU ms
            read -r iops bw ios secs cli_ms < <(python3 - "$json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]
if j.get("error", 0):
    sys.exit(1)
r, w = j["read"], j["write"]
io = r["total_ios"] + w["total_ios"]
iops = r["iops"] + w["iops"]
bw = r["bw_bytes"] + w["bw_bytes"]
rt = max(r["runtime"], w["runtime"]) / 1000.0
cpu_ms = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"]
print("%.1f %.0f %d %.3f %.1f" % (iops, bw, io, rt, cpu_ms))
EOF
            ) || { st=fail; log "$tag: bad fio output $json"; }
        fi
    else
        # qemu-img bench: a fixed number of requests, no warm-up.
        c0=$(cpu_ticks "$spid")
        st0=$(steal_ticks)
        r=0
        # shellcheck disable=SC2086
        { TIMEFORMAT='cpu %U %S'; time \
            qemu-img bench -f raw -c "$QB_COUNT" -d 32 -s 4096 -S $qb_step \
                $W_ARGS "$uri" >"$clog" 2>&1 || r=$?; } 2>"$clog.time"
        c1=$(cpu_ticks "$spid")
        steal=$(steal_pct "$st0" "$(steal_ticks)")
        rss=$(vm_hwm "$spid")
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$clog")
        if [ $r -ne 0 ] || [ -z "$secs" ]; then
            st=fail
            log "$tag: qemu-img bench failed (exit $r, see $clog)"
        else
            ios=$QB_COUNT
            read -r iops bw cli_ms < <(python3 -c '
import sys
n, s = int(sys.argv[1]), float(sys.argv[2])
u = open(sys.argv[3]).read().split()
print("%.1f %.0f %.1f" % (n / s, n * 4096 / s, (float(u[-2]) + float(u[-1])) * 1000))
' "$ios" "$secs" "$clog.time")
        fi
    fi

    stop_server || st=fail
    if [ $W_WRITE = 1 ] && [ $qcow2 = 1 ]; then
        check=$(check_image "$img" "$tag")
    fi
    if [ $fresh = 1 ]; then
        rm -f "$img"
    elif [ "$W_IMG" = sparse ] && [ $qcow2 = 0 ]; then
        python3 "$bench_src/mkimg.py" dropcache "$img"
    fi
    [ -n "$perf" ] && return 0
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$wl" "$srv" "$round" "$st" "$iops" "$bw" "$ios" "$secs" \
        "$(( c1 - c0 ))" "$rss" "$cli_ms" "$check" "$steal" "$pcache" >> "$runs"
    log "$(printf '%-22s %-13s round %s: %s iops %s MB/s, cpu %s ticks, rss %s KiB, steal %s%%, check %s' \
        "$wl" "$srv" "$round" "${iops%.*}" "$(( ${bw%.*} / 1000000 ))" \
        "$(( c1 - c0 ))" "$rss" "$steal" "$check")"
}

# ---- main ---------------------------------------------------------------

started=$(date +%s)
log "images in $BENCH_DIR ($bench_fs), logs in $OUT_DIR"

case " $SERVERS " in
*" qemu-uring "*)
    probe_uring
    if [ "$uring_status" != ok ]; then
        log "qemu-nbd --aio=io_uring: $uring_status"
        SERVERS=$(echo " $SERVERS " | sed 's/ qemu-uring / /')
        SERVERS=$(echo $SERVERS)
    fi ;;
*) uring_status="not run (SERVERS)" ;;
esac

for w in $WORKLOADS; do
    wl_def $w
    case $W_IMG in
    full) make_full ;;
    sparse) make_sparse ;;
    esac
done
if [ $smoke = 1 ]; then
    ALLOC_BUDGET_BYTES=${ALLOC_BUDGET:-64M}
else
    ALLOC_BUDGET_BYTES=${ALLOC_BUDGET:-$(alloc_budget)}
fi
ALLOC_BUDGET_BYTES=$(parse_size "$ALLOC_BUDGET_BYTES")

# On a disk-backed file system, start from clean pages.
[ "$bench_fs" != tmpfs ] && sync

{
    printf 'date\t%s\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')"
    printf 'commit\t%s\n' "$(cd "$top_src" && git describe --always --dirty 2>/dev/null || echo unknown)"
    printf 'host\t%s cores, %s, kernel %s\n' "$(nproc)" \
        "$(awk '/^MemTotal:/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
    printf 'versions\t%s; %s; %s\n' "$(nbdkit --version | head -1)" \
        "$(qemu-nbd --version | head -1)" "$(fio --version)"
    printf 'bench_dir\t%s (%s)\n' "$BENCH_DIR" "$bench_fs"
    printf 'rounds\t%s\n' "$ROUNDS"
    printf 'runtime\t%s\n' "$RUNTIME"
    printf 'ramp\t%s\n' "$RAMP"
    printf 'servers\t%s\n' "$SERVERS"
    printf 'mode\t%s\n' "$([ $disk = 1 ] && echo disk || echo cache)"
    printf 'qemu_cache\t%s\n' "$QEMU_CACHE"
    printf 'uring\t%s\n' "$uring_status"
    printf 'plugin_args\t%s\n' "${PLUGIN_ARGS:-(defaults)}"
    printf 'plugin\t%s\n' "$plugin_id"
    if [ -n "$base_id" ]; then
        printf 'plugin_base\t%s\n' "$base_id"
    fi
    printf 'sizes\tfull %s, sparse %s, allocating %s (64 KiB clusters) / %s (512-byte clusters)\n' \
        "$FULL_SIZE" "$SPARSE_SIZE" "$ALLOC_SIZE" "$ALLOC512_SIZE"
    printf 'alloc_budget\t%s\n' "$ALLOC_BUDGET_BYTES"
    printf 'qb_count\t%s\n' "$QB_COUNT"
    printf 'qb_step\t%s\n' "$qb_step"
    printf 'smoke\t%s\n' "$smoke"
    printf 'load_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'out_dir\t%s\n' "$OUT_DIR"
} > "$OUT_DIR/meta.tsv"
: > "$OUT_DIR/workloads.tsv"
for w in $WORKLOADS; do
    wl_def $w
    cap=-
    case $W_IMG in new*)
        cap=$(python3 -c "print(int($ALLOC_BUDGET_BYTES / $W_AMP) // (1 << 20) << 20)") ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$W_UNIT" "$W_WRITE" "$cap" "$W_DESC" >> "$OUT_DIR/workloads.tsv"
done

# round_servers ROUND: the servers of this round, in order.  The plugin
# and its base build swap places every other round, so that neither
# always runs right after the same server (or first after the images
# were made).
round_servers ()
{
    local s out=
    if (( $1 % 2 == 1 )) || [[ " $SERVERS " != *" plugin "* ]] ||
       [[ " $SERVERS " != *" base "* ]]; then
        echo $SERVERS
        return
    fi
    for s in $SERVERS; do
        case $s in plugin) s=base ;; base) s=plugin ;; esac
        out="$out $s"
    done
    echo $out
}

for w in $WORKLOADS; do
    for (( round = 1; round <= ROUNDS; round++ )); do
        for s in $(round_servers $round); do
            run_one "$w" "$s" "$round"
        done
    done
    if [ "$PERF" = 1 ] && [[ " $(echo $PERF_WORKLOADS) " == *" $w "* ]] &&
       [[ " $SERVERS " == *" plugin "* ]]; then
        log "$w: profiling one more plugin run with perf record -g"
        run_one "$w" plugin 0 perf
        if [ -f "$OUT_DIR/perf-$w.data" ]; then
            perf report -i "$OUT_DIR/perf-$w.data" --stdio --no-children \
                -F overhead,dso,sym -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | head -25 > "$OUT_DIR/perf-$w.top25.txt" || true
            perf report -i "$OUT_DIR/perf-$w.data" --stdio --no-children \
                --sort dso -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | head -8 > "$OUT_DIR/perf-$w.dso.txt" || true
            perf report -i "$OUT_DIR/perf-$w.data" --stdio --children \
                -F overhead,dso,sym -g caller,0.5,callee --percent-limit 2 \
                > "$OUT_DIR/perf-$w.callgraph.txt" 2>/dev/null || true
        fi
    fi
done

elapsed=$(( $(date +%s) - started ))
printf 'elapsed\t%s\n' "$elapsed" >> "$OUT_DIR/meta.tsv"
printf 'load_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT_DIR/meta.tsv"

python3 "$bench_src/report.py" "$OUT_DIR" > "$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
if [ $save = 1 ]; then
    res=$bench_src/results-$(date +%Y%m%d).md
    cp "$OUT_DIR/report.md" "$res"
    log "saved $res"
fi
log "done in ${elapsed}s; logs, fio JSON and check output in $OUT_DIR"
