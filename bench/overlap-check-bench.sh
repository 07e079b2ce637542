#!/usr/bin/env bash
# nbdkit-qcow2: what the metadata overlap checker costs (issue 4).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   bench/overlap-check-bench.sh [--quick] [--help]
#
# A benchmark, not a test.  In one run, on qcow2 images with 512-byte
# clusters (the worst case for QEMU's checker, which walks the whole L1
# and refcount tables for every metadata write):
#
# 1. fill: for each size in SIZES, an empty image (qemu-img create -o
#    cluster_size=512) is written in full, sequentially, with 1 MiB
#    writes at QD8 (fio --ioengine=nbd --rw=write --bs=1M --iodepth=8
#    --size=<whole disk>, not time-based), by
#      all   nbdkit PLUGIN overlap-check=all    (the default)
#      none  nbdkit PLUGIN overlap-check=none
#      raw   nbdkit file on a sparse raw file (the floor; RAW=0: not)
#      qemu  qemu-nbd -f qcow2 --cache=writeback --aio=threads
#    each started fresh on a Unix socket for each run, in alternating
#    order (round 1: all none raw qemu, round 2: qemu raw none all, ...;
#    qemu-nbd only in the first QEMU_ROUNDS rounds).  Measured: fio's
#    runtime of the fill and the server's CPU time (utime and stime of
#    /proc/PID/stat from ready to the end of the fill, before it is
#    stopped).  A
#    qemu-nbd fill still running after QEMU_TIMEOUT seconds is stopped
#    (fio --runtime) and reported as "> T s (x% done)": the ratio is
#    then a lower bound.
# 2. random allocating writes: 4 KiB random writes, QD32, time-based
#    (RAMP s warm-up, RUNTIME s measured), into a fresh empty RAND_SIZE
#    image per run: all, none, qemu.  IOPS and server CPU us per I/O.
# 3. every image written, by the plugin or by qemu-nbd, is checked with
#    qemu-img check after its server has exited: it must be clean.
# 4. the checker's memory: each image the plugin filled is opened once
#    more, untimed, by `nbdkit -v PLUGIN overlap-check=all --run true`;
#    the plugin's debug line "overlap map built: N bytes" at open is the
#    map of the filled image (built from all its metadata), and "overlap
#    map at close: N bytes, R runs, W windows" is used too when the
#    plugin prints it.  Shown next to the 2014 estimate 40*size/512^2.
#    (No -v on the timed servers: nbdkit -v logs every request.)
#
# The report (markdown, on stdout and in OUT_DIR/report.md) gives per
# size the fill times (median, min-max), all/none (paired per round),
# qemu-nbd/plugin, the plugin's growth t(4G)/t(1G), the map's memory,
# the random-write IOPS, and the goals of issue 4 with met/SHORT:
#   all vs none under 1% apart (fill and random writes);
#   fill at 4 GiB at least 10x faster than qemu-nbd;
#   the plugin's fill time linear: t(4 GiB) <= 4.5 x t(1 GiB).
# See bench/README.md.
#
# Options:
#   --quick   SIZES="64M 128M" ROUNDS=1 RUNTIME=2 RAMP=1 RAND_SIZE=1G
#             QEMU_TIMEOUT=60 (under a minute; to try the script)
#   --help    this text
#
# Knobs (environment):
#   SIZES="1 2 4"      fill sizes; a bare number is GiB, else 64M, 1G ...
#   ROUNDS=3           rounds of the plugin configurations (fill, random)
#   QEMU_ROUNDS=1      rounds with qemu-nbd (0: no qemu-nbd at all)
#   QEMU_TIMEOUT=900   seconds after which a qemu-nbd fill is stopped
#   PLUGIN_TIMEOUT=900 the same for the plugin and raw (a safety net)
#   RUNTIME=20 RAMP=2  random writes: seconds measured, warm-up
#   RAND_SIZE=4G       random writes: virtual size of the empty image
#   PHASES="fill rand" which parts to run
#   RAW=1              also fill a raw file through nbdkit's file plugin
#                      (0: not), the floor of the fill: how the file
#                      system alone scales
#   BENCH_DIR=DIR      where the images go (default: a new directory in
#                      /dev/shm if it has room, else $TMPDIR or /tmp;
#                      removed at the end); one image at a time
#   OUT_DIR=DIR        logs, fio JSON, report (kept; default
#                      $TMPDIR/overlap-check-bench-out-DATE)
#   PLUGIN=.so         the plugin (default: this tree's; copied first)
#
# Time (2-core VM, tmpfs): the full default run takes about 20
# minutes: qemu-nbd's three fills 8-10 (about 1, 3 and 5 minutes at
# 10-20 MB/s), the 27 plugin and raw fills with their checks and
# probes about 4, the 7 random-write runs with their checks about 5.
# Each qemu-nbd fill stops at QEMU_TIMEOUT, so the worst case is about
# 10 minutes + 3 x QEMU_TIMEOUT.  --quick: under a minute.

set -e
set -u
set -o pipefail

export PATH=/usr/bin:/usr/sbin:$PATH
export LC_ALL=C

bench_src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top_src=$(dirname "$bench_src")

usage ()
{
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

quick=0
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$0: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ $quick = 1 ]; then
    : "${SIZES:=64M 128M}" "${ROUNDS:=1}" "${RUNTIME:=2}" "${RAMP:=1}"
    : "${RAND_SIZE:=1G}" "${QEMU_TIMEOUT:=60}"
fi
: "${SIZES:=1 2 4}" "${ROUNDS:=3}" "${QEMU_ROUNDS:=1}"
: "${QEMU_TIMEOUT:=900}" "${PLUGIN_TIMEOUT:=900}"
: "${RUNTIME:=20}" "${RAMP:=2}" "${RAND_SIZE:=4G}" "${PHASES:=fill rand}"
: "${RAW:=1}"
: "${PLUGIN:=$top_src/plugin/.libs/nbdkit-qcow2-plugin.so}"

die () { echo "$0: $*" >&2; exit 1; }
log () { echo "overlap-check-bench: $*" >&2; }

for v in ROUNDS QEMU_ROUNDS QEMU_TIMEOUT PLUGIN_TIMEOUT RUNTIME RAMP; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number"
done
[ "$ROUNDS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] &&
  [ "$QEMU_TIMEOUT" -ge 1 ] && [ "$PLUGIN_TIMEOUT" -ge 1 ] ||
  die "ROUNDS, RUNTIME and the timeouts must be >= 1"

# to_bytes SIZE: a bare number is GiB; K, M, G, T suffixes (binary).
to_bytes ()
{
    local s=$1 n u
    [[ $s =~ ^([0-9]+)([KkMmGgTt]?)(i?B)?$ ]] || return 1
    n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    case $u in
    ""|G|g) echo $(( n << 30 )) ;;
    K|k) echo $(( n << 10 )) ;;
    M|m) echo $(( n << 20 )) ;;
    T|t) echo $(( n << 40 )) ;;
    esac
}

sizes_b=()
for s in $SIZES; do
    b=$(to_bytes "$s") || die "bad size $s in SIZES"
    [ $(( b % (1 << 20) )) -eq 0 ] && [ "$b" -gt 0 ] ||
        die "SIZES: $s is not a positive multiple of 1 MiB"
    sizes_b+=("$b")
done
[ ${#sizes_b[@]} -gt 0 ] || die "SIZES is empty"
rand_b=$(to_bytes "$RAND_SIZE") || die "bad RAND_SIZE $RAND_SIZE"
do_fill=0 do_rand=0
for ph in $PHASES; do
    case $ph in
    fill) do_fill=1 ;;
    rand) do_rand=1 ;;
    *) die "PHASES: unknown phase $ph (fill, rand)" ;;
    esac
done
[ $do_fill = 1 ] || sizes_b=()
[ $do_rand = 1 ] || rand_b=0
[ $do_fill = 1 ] || [ $do_rand = 1 ] || die "PHASES is empty"

# ---- tools ----------------------------------------------------------------

for t in nbdkit qemu-nbd qemu-img fio python3; do
    command -v $t >/dev/null 2>&1 || die "$t is not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"
[ -f "$PLUGIN" ] || die "plugin $PLUGIN not built (run make)"

# ---- directories -------------------------------------------------------------

fs_avail () { df -B1 --output=avail "$1" | tail -1 | tr -d ' '; }
fs_type () { df --output=fstype "$1" | tail -1 | tr -d ' '; }

max_b=$rand_b
for b in ${sizes_b[@]+"${sizes_b[@]}"}; do
    [ "$b" -gt "$max_b" ] && max_b=$b
done
# One image at a time: the largest, its metadata (about 1/50 of the
# size with 512-byte clusters), and some room.
need=$(( max_b + max_b / 16 + (256 << 20) ))
mem_avail=$(awk '/^MemAvailable:/ { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)

made_bench_dir=0
if [ -z "${BENCH_DIR:-}" ]; then
    if [ "$(fs_type /dev/shm 2>/dev/null)" = tmpfs ] &&
       [ "$(fs_avail /dev/shm)" -gt $(( need + (1 << 30) )) ] &&
       [ "$mem_avail" -gt $(( need + (3 << 30) )) ]; then
        base=/dev/shm
    else
        base=${TMPDIR:-/tmp}
    fi
    BENCH_DIR=$(mktemp -d "$base/overlap-check-bench.XXXXXX")
    made_bench_dir=1
elif [ ! -d "$BENCH_DIR" ]; then
    mkdir -p "$BENCH_DIR"
    made_bench_dir=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
bench_fs=$(fs_type "$BENCH_DIR")
[ "$(fs_avail "$BENCH_DIR")" -gt "$need" ] ||
    die "$BENCH_DIR has less than $(( need >> 20 )) MiB free"

stamp=$(date +%Y%m%d-%H%M%S)
: "${OUT_DIR:=${TMPDIR:-/tmp}/overlap-check-bench-out-$stamp}"
mkdir -p "$OUT_DIR"/logs "$OUT_DIR"/fio
OUT_DIR=$(cd "$OUT_DIR" && pwd)
runs=$OUT_DIR/runs.tsv
mems=$OUT_DIR/mem.tsv
: > "$runs"
: > "$mems"

# Serve a copy of the plugin, so that a rebuild during the run does not
# change what is measured half-way.
cp "$PLUGIN" "$OUT_DIR/plugin.so"
plugin_id="$PLUGIN ($(stat -c %y "$PLUGIN" | cut -d. -f1), sha256 $(sha256sum "$PLUGIN" | cut -c1-12))"
PLUGIN=$OUT_DIR/plugin.so

img=$BENCH_DIR/bench.qcow2
raw=$BENCH_DIR/bench.raw
sock=$BENCH_DIR/bench.sock
uri="nbd+unix:///?socket=$sock"
spid=
helper=

cleanup ()
{
    local st=$?
    set +e
    if [ -n "$helper" ]; then kill "$helper" 2>/dev/null; wait "$helper" 2>/dev/null; fi
    if [ -n "$spid" ]; then kill -KILL "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; fi
    rm -f "$sock" "$img" "$raw" "$BENCH_DIR/nbdkit.pid" 2>/dev/null
    [ $made_bench_dir = 1 ] && rmdir "$BENCH_DIR" 2>/dev/null
    exit $st
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- servers -----------------------------------------------------------------

# start_server all|none|raw|qemu IMAGE LOG: start a server in the background
# on $sock (we started it, so $! is its PID: nbdkit -f does not fork) and
# set spid.
start_server ()
{
    local name=$1 image=$2 slog=$3 i
    rm -f "$sock"
    case $name in
    all|none)
        nbdkit -f --exit-with-parent -U "$sock" -P "$BENCH_DIR/nbdkit.pid" \
            "$PLUGIN" file="$image" overlap-check="$name" >>"$slog" 2>&1 & ;;
    raw)
        nbdkit -f --exit-with-parent -U "$sock" -P "$BENCH_DIR/nbdkit.pid" \
            file file="$image" >>"$slog" 2>&1 & ;;
    qemu)
        qemu-nbd -t -e 16 -f qcow2 --cache=writeback --aio=threads \
            -k "$sock" "$image" >>"$slog" 2>&1 & ;;
    esac
    spid=$!
    for (( i = 0; i < 3000; i++ )); do
        [ -S "$sock" ] && return 0
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.02
    done
    kill -KILL "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    spid=
    return 1
}

# stop_server: SIGTERM (nbdkit and qemu-nbd both flush and exit
# cleanly); sets stop_secs.
stop_server ()
{
    local i r=0 t0
    stop_secs=0
    [ -n "$spid" ] || return 0
    t0=$(date +%s.%N)
    kill -TERM "$spid" 2>/dev/null || true
    for (( i = 0; i < 12000; i++ )); do
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$spid" 2>/dev/null; then
        log "server $spid does not exit after 10 minutes: killing it"
        kill -KILL "$spid" 2>/dev/null || true
        r=1
    fi
    wait "$spid" 2>/dev/null || true
    stop_secs=$(secs_since "$t0")
    spid=
    rm -f "$sock" "$BENCH_DIR/nbdkit.pid"
    return $r
}

# secs_since T0: seconds since T0 (from date +%s.%N), 3 decimals.
secs_since ()
{
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }'
}

# cpu_ticks PID: "utime stime" of the whole process (all threads, also
# those that have exited), in clock ticks.
cpu_ticks ()
{
    local line rest
    read -r line < /proc/$1/stat || { echo "-1 -1"; return; }
    rest=${line##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo "${12} ${13}"
}

vm_hwm ()
{
    awk '/^VmHWM:/ { print $2 }' /proc/$1/status 2>/dev/null || echo 0
}

# check_image TAG: qemu-img check of $img; echo ok|leaks|corrupt|error.
check_image ()
{
    local r=0
    echo "== $1" >> "$OUT_DIR/logs/check.log"
    qemu-img check -f qcow2 "$img" >> "$OUT_DIR/logs/check.log" 2>&1 || r=$?
    echo "== $1: exit $r" >> "$OUT_DIR/logs/check.log"
    case $r in 0) echo ok ;; 3) echo leaks ;; 2) echo corrupt ;; *) echo "error($r)" ;; esac
}

# mem_probe SIZE SOURCE TAG: open $img once more with nbdkit -v (the
# plugin builds the overlap map from all the metadata at open), close
# it, and append the map's size to mem.tsv.
mem_probe ()
{
    local size=$1 src=$2 tag=$3 mlog=$OUT_DIR/logs/$3.mem.log
    local built close runs windows
    if ! nbdkit -U - -v "$PLUGIN" file="$img" overlap-check=all \
             --run true > "$mlog" 2>&1; then
        log "$tag: nbdkit -v open/close failed (see $mlog)"
        return 0
    fi
    built=$(sed -n 's/.*overlap map built: \([0-9][0-9]*\) bytes.*/\1/p' "$mlog" | tail -1)
    close=$(sed -n 's/.*overlap map at close: \([0-9][0-9]*\) bytes.*/\1/p' "$mlog" | tail -1)
    runs=$(sed -n 's/.*overlap map at close: .* \([0-9][0-9]*\) runs.*/\1/p' "$mlog" | tail -1)
    windows=$(sed -n 's/.*overlap map at close: .* \([0-9][0-9]*\) windows.*/\1/p' "$mlog" | tail -1)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$src" "$tag" \
        "${built:--}" "${close:--}" "${runs:--}" "${windows:--}" >> "$mems"
}

# run_one fill|rand SIZE SERVER ROUND: one measured run on a fresh empty
# image; appends a line to runs.tsv.
run_one ()
{
    local phase=$1 size=$2 srv=$3 round=$4
    local tag=$phase-$size.$srv.r$round st=ok check=- r limit t0f
    local json=$OUT_DIR/fio/$tag.json clog=$OUT_DIR/logs/$tag.client.log
    local slog=$OUT_DIR/logs/$tag.server.log
    local u0 s0 u1 s1 rss=0 secs=0 bytes=0 iops=0 ios=0 wall=0 w0 k0
    local check_secs=0 image=$img

    rm -f "$img" "$raw"
    if [ "$srv" = raw ]; then
        image=$raw
        truncate -s "$size" "$raw"
    else
        qemu-img create -q -f qcow2 -o cluster_size=512 "$img" "$size"
    fi
    [ "$bench_fs" != tmpfs ] && sync

    if ! start_server "$srv" "$image" "$slog"; then
        log "$tag: server did not start (see $slog)"
        printf '%s\t%s\t%s\t%s\tfail\t0\t0\t0\t0\t0\t0\t0\t0\t-\t0\t0\t0\n' \
            "$phase" "$size" "$srv" "$round" >> "$runs"
        rm -f "$img" "$raw"
        return 0
    fi

    r=0
    t0f=$OUT_DIR/logs/$tag.t0
    rm -f "$t0f"
    w0=$(date +%s.%N)
    if [ "$phase" = fill ]; then
        limit=$PLUGIN_TIMEOUT
        [ "$srv" = qemu ] && limit=$QEMU_TIMEOUT
        read -r u0 s0 < <(cpu_ticks "$spid")
        fio --name="$tag" --ioengine=nbd --uri="$uri" \
            --rw=write --bs=1M --iodepth=8 --size="$size" \
            --runtime="$limit" \
            --output-format=json --output="$json" >"$clog" 2>&1 || r=$?
    else
        ( sleep "$RAMP"; cpu_ticks "$spid" > "$t0f" ) &
        helper=$!
        fio --name="$tag" --ioengine=nbd --uri="$uri" \
            --rw=randwrite --bs=4k --iodepth=32 --size="$size" \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --norandommap --randrepeat=1 \
            --output-format=json --output="$json" >"$clog" 2>&1 || r=$?
        wait "$helper" 2>/dev/null || true
        helper=
        read -r u0 s0 < <(cat "$t0f" 2>/dev/null || echo "-1 -1")
        u0=${u0:--1} s0=${s0:--1}
    fi
    read -r u1 s1 < <(cpu_ticks "$spid")
    rss=$(vm_hwm "$spid")
    wall=$(secs_since "$w0")

    if [ $r -ne 0 ] || [ "$u0" -lt 0 ]; then
        st=fail
        log "$tag: fio failed (exit $r, see $clog)"
    else
        # seconds, bytes written, IOPS, I/Os
        read -r secs bytes iops ios < <(python3 - "$json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]
if j.get("error", 0):
    sys.exit(1)
w = j["write"]
print("%.3f %d %.1f %d" % (w["runtime"] / 1000.0, w["io_bytes"], w["iops"],
                           w["total_ios"]))
EOF
        ) || { st=fail; log "$tag: bad fio output $json"; }
        if [ "$st" = ok ] && [ "$phase" = fill ] && [ "$bytes" -lt "$size" ]; then
            st=timeout
        fi
    fi

    stop_server || st=fail
    if [ "$srv" != raw ]; then
        k0=$(date +%s.%N)
        check=$(check_image "$tag")
        check_secs=$(secs_since "$k0")
    fi
    if [ "$phase" = fill ] && [ "$st" = ok ]; then
        case $srv in
        qemu) mem_probe "$size" qemu "$tag" ;;
        all|none) mem_probe "$size" plugin "$tag" ;;
        esac
    fi
    rm -f "$img" "$raw"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$phase" "$size" "$srv" "$round" "$st" "$secs" "$bytes" "$iops" \
        "$ios" "$(( u1 + s1 - u0 - s0 ))" "$rss" "$wall" "$stop_secs" "$check" \
        "$check_secs" "$(( u1 - u0 ))" "$(( s1 - s0 ))" >> "$runs"
    if [ "$phase" = fill ]; then
        log "$(printf '%-22s %-5s %-7s %8ss %3s%% cpu %6.2fs stop %6ss check %s (%ss)' \
            "fill $((size >> 20)) MiB" "$srv" "r$round" "$secs" \
            "$(( bytes * 100 / size ))" "$(( u1 + s1 - u0 - s0 ))e-2" "$stop_secs" \
            "$check" "$check_secs")"
    else
        log "$(printf '%-22s %-5s %-7s %8s IOPS cpu %6.2fs check %s (%ss)' \
            "random 4k $((size >> 20)) MiB" "$srv" "r$round" "${iops%.*}" \
            "$(( u1 + s1 - u0 - s0 ))e-2" "$check" "$check_secs")"
    fi
}

# servers_of PHASE ROUND: the servers of a round, in order.  The plugin
# configurations alternate (all none raw / raw none all; raw only in the
# fill, with RAW=1); qemu-nbd, in the first QEMU_ROUNDS rounds, goes last
# in odd rounds and first in even ones.
servers_of ()
{
    local phase=$1 round=$2 list=""
    if [ "$round" -le "$ROUNDS" ]; then
        list="all none"
        [ "$phase" = fill ] && [ "$RAW" = 1 ] && list="$list raw"
        (( round % 2 )) || list=$(echo $list | tr ' ' '\n' | tac | tr '\n' ' ')
    fi
    if [ "$round" -le "$QEMU_ROUNDS" ]; then
        if (( round % 2 )); then list="$list qemu"; else list="qemu $list"; fi
    fi
    echo $list
}

# ---- main -------------------------------------------------------------------

started=$(date +%s)
nrounds=$ROUNDS
[ "$QEMU_ROUNDS" -gt "$nrounds" ] && nrounds=$QEMU_ROUNDS

{
    printf 'date\t%s\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')"
    printf 'commit\t%s\n' "$(cd "$top_src" && git describe --always --dirty 2>/dev/null || echo unknown)"
    printf 'host\t%s cores, %s, kernel %s\n' "$(nproc)" \
        "$(awk '/^MemTotal:/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
    printf 'versions\t%s; %s; %s; %s\n' "$(nbdkit --version | head -1)" \
        "$(qemu-nbd --version | head -1)" "$(qemu-img --version | head -1)" \
        "$(fio --version)"
    printf 'plugin\t%s\n' "$plugin_id"
    printf 'bench_dir\t%s (%s)\n' "$BENCH_DIR" "$bench_fs"
    printf 'sizes\t%s\n' "${sizes_b[*]-}"
    printf 'rand_size\t%s\n' "$rand_b"
    printf 'rounds\t%s\n' "$ROUNDS"
    printf 'qemu_rounds\t%s\n' "$QEMU_ROUNDS"
    printf 'qemu_timeout\t%s\n' "$QEMU_TIMEOUT"
    printf 'plugin_timeout\t%s\n' "$PLUGIN_TIMEOUT"
    printf 'runtime\t%s\n' "$RUNTIME"
    printf 'raw\t%s\n' "$RAW"
    printf 'ramp\t%s\n' "$RAMP"
    printf 'quick\t%s\n' "$quick"
    printf 'load_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'out_dir\t%s\n' "$OUT_DIR"
} > "$OUT_DIR/meta.tsv"

log "images in $BENCH_DIR ($bench_fs), logs in $OUT_DIR"
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

for b in ${sizes_b[@]+"${sizes_b[@]}"}; do
    for (( round = 1; round <= nrounds; round++ )); do
        for s in $(servers_of fill $round); do
            run_one fill "$b" "$s" "$round"
        done
    done
done
for (( round = 1; round <= nrounds && rand_b > 0; round++ )); do
    for s in $(servers_of rand $round); do
        run_one rand "$rand_b" "$s" "$round"
    done
done

elapsed=$(( $(date +%s) - started ))
printf 'elapsed\t%s\n' "$elapsed" >> "$OUT_DIR/meta.tsv"
printf 'load_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT_DIR/meta.tsv"

python3 "$bench_src/overlap-check-report.py" "$OUT_DIR" > "$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
log "done in ${elapsed}s; logs, fio JSON and check output in $OUT_DIR"
