#!/usr/bin/env bash
# nbdkit-qcow2: time a compressed copy (issue 18) three ways.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   bench/compress-bench.sh [SIZE [ROUNDS [TYPE]]]
#
# A mixed raw image of SIZE (default 768M: text-like, zero, random and
# half-zero clusters, tests/mkmixed.py) is copied into a new compressed
# qcow2 image (TYPE zstd or zlib, default zstd), ROUNDS times (default
# 3), the three ways alternating within each round:
#
#   plugin    nbdkit qcow2 create=true compress=on + nbdcopy
#   convert   qemu-img convert -c -O qcow2 -o compression_type=TYPE
#   qemu-nbd  qemu-nbd --image-opts driver=compress,file.driver=qcow2,...
#             over an image from qemu-img create, + nbdcopy
#
# Each copy ends with its data on disk (nbdcopy --flush; qemu-img and
# qemu-nbd sync at close; the plugin at exit), timed with the outputs
# on the same file system as the source.  For each copy it prints the
# wall time, the CPU time (user + system of every process of that way:
# server and nbdcopy, or qemu-img), the output's size and its
# compressed/allocated clusters.  The summary gives the medians (and
# min-max) of both times, the plugin's speed-up over each competitor by
# wall and by CPU time (ratios of the medians), the median and range
# of the speed-ups by wall time within each round (steadier on a
# machine whose speed drifts), the plugin's file size against qemu-img convert
# -c, its compressed share (issue 18 wants >= 60%), `qemu-img check` of
# every output and `qemu-img compare` of the plugin's last output with
# the source.  Exits 1 if a check or the compare fails.  NBDKIT_ARGS
# (default none) adds server options to the plugin's way, e.g. "-t 4".  Run it from
# the top of a built tree; the machine should be otherwise idle (say
# what else ran when quoting its numbers: the load average is printed;
# CPU times are less disturbed by other load than wall times).

set -e
set -u
export PATH=/usr/bin:/usr/sbin:$PATH LC_ALL=C

top=$(cd "$(dirname "$0")/.." && pwd)

# --one WAY: one copy (the script times itself run this way, so that
# the CPU time of every process of the copy is counted).  DIR, PLUGIN,
# TYPE and VSIZE come from the environment.
if [ "${1:-}" = --one ]; then
    case $2 in
    plugin)
        # shellcheck disable=SC2086
        nbdkit $NBDKIT_ARGS -U - "$PLUGIN" file="$DIR/out.qcow2" create=true \
               size="$VSIZE" compression-type="$TYPE" compress=on \
               --run "nbdcopy --flush '$DIR/src.raw' \"\$uri\""
        ;;
    convert)
        qemu-img convert -c -f raw -O qcow2 -o compression_type="$TYPE" \
                 "$DIR/src.raw" "$DIR/out.qcow2"
        ;;
    qemu_nbd)
        sock=$DIR/qemu-nbd.sock
        rm -f "$sock"
        qemu-img create -q -f qcow2 -o compression_type="$TYPE" \
                 "$DIR/out.qcow2" "$VSIZE"
        qemu-nbd -t -k "$sock" --image-opts \
          "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=$DIR/out.qcow2" &
        qpid=$!
        while [ ! -S "$sock" ]; do sleep 0.02; done
        r=0
        nbdcopy --flush "$DIR/src.raw" "nbd+unix:///?socket=$sock" || r=$?
        kill "$qpid"
        wait "$qpid" 2>/dev/null || true
        exit $r
        ;;
    esac
    exit 0
fi

plugin=$top/plugin/.libs/nbdkit-qcow2-plugin.so
size=${1:-768M}
rounds=${2:-3}
type=${3:-zstd}
dir=$(mktemp -d "${TMPDIR:-/var/tmp}/compress-bench.XXXXXX")
cleanup ()
{
    rm -rf "$dir"
}
trap cleanup EXIT

[ -f "$plugin" ] || { echo "$0: build the plugin first" >&2; exit 1; }
python3=/usr/bin/python3
$python3 "$top/tests/mkmixed.py" "$dir/src.raw" "$size"
vsize=$(stat -c %s "$dir/src.raw")
export DIR=$dir PLUGIN=$plugin TYPE=$type VSIZE=$vsize NBDKIT_ARGS=${NBDKIT_ARGS:-}
sync

echo "compress-bench: $size $type, $rounds rounds, nbdkit options: ${NBDKIT_ARGS:-none}, $(nproc) cores," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"

declare -A wall cpu bytes share rwall
fail=0
for r in $(seq 1 "$rounds"); do
    # Alternate the order from round to round.
    case $((r % 3)) in
    1) order="plugin convert qemu_nbd" ;;
    2) order="convert qemu_nbd plugin" ;;
    0) order="qemu_nbd plugin convert" ;;
    esac
    for way in $order; do
        rm -f "$dir/out.qcow2"
        sync
        t0=$(date +%s.%N)
        /usr/bin/time -f '%U %S' -o "$dir/time" "$0" --one "$way"
        sync
        t=$(echo "$(date +%s.%N) - $t0" | bc)
        c=$(awk '{ print $1 + $2 }' "$dir/time")
        b=$(stat -c %s "$dir/out.qcow2")
        if ! qemu-img check -q "$dir/out.qcow2"; then
            echo "round $r $way: qemu-img check FAILED" >&2
            fail=1
        fi
        comp=$(qemu-img check --output=json "$dir/out.qcow2" |
               $python3 -c 'import json, sys; j = json.load(sys.stdin); print(j.get("compressed-clusters", 0), j.get("allocated-clusters", 0))')
        printf 'round %d  %-9s %6.2f s wall %6.2f s cpu  %11d bytes  compressed/allocated %s\n' \
               "$r" "$way" "$t" "$c" "$b" "${comp/ //}"
        wall[$way]="${wall[$way]:-} $t"
        rwall[$way,$r]=$t
        cpu[$way]="${cpu[$way]:-} $c"
        bytes[$way]=$b
        share[$way]=$comp
        if [ "$way" = plugin ] && [ "$r" = "$rounds" ]; then
            if ! qemu-img compare -q -f raw -F qcow2 "$dir/src.raw" \
                 "$dir/out.qcow2"; then
                echo "round $r plugin: qemu-img compare with the source FAILED" >&2
                fail=1
            fi
        fi
    done
done

median () { printf '%s\n' $1 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread () { printf '%s\n' $1 | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
for way in plugin convert qemu_nbd; do
    printf '%-9s wall median %6.2f s (%s)  cpu median %6.2f s (%s)\n' "$way" \
           "$(median "${wall[$way]}")" "$(spread "${wall[$way]}")" \
           "$(median "${cpu[$way]}")" "$(spread "${cpu[$way]}")"
done
ratio () { printf '%.2f' "$(echo "scale=3; $(median "$1") / $(median "$2")" | bc)"; }
echo "speed-up by wall: $(ratio "${wall[convert]}" "${wall[plugin]}")x over convert," \
     "$(ratio "${wall[qemu_nbd]}" "${wall[plugin]}")x over qemu-nbd (goal >= 1.5)"
echo "speed-up by cpu:  $(ratio "${cpu[convert]}" "${cpu[plugin]}")x over convert," \
     "$(ratio "${cpu[qemu_nbd]}" "${cpu[plugin]}")x over qemu-nbd"
# The same by wall time within each round (the three copies of a round
# ran within seconds of each other, so a slow phase of the machine
# that lasts longer than a round cancels out of these): the median and
# the range of the per-round ratios.
round_ratios () {
    local r out=
    for r in $(seq 1 "$rounds"); do
        out="$out $(echo "scale=4; ${rwall[$1,$r]} / ${rwall[plugin,$r]}" | bc)"
    done
    printf '%.2f (%s)' "$(median "$out")" "$(spread "$out")"
}
echo "speed-up by wall, per round: $(round_ratios convert)x over convert," \
     "$(round_ratios qemu_nbd)x over qemu-nbd"
set -- ${share[plugin]}
echo "plugin file: ${bytes[plugin]} bytes, $(echo "scale=2; 100 * ${bytes[plugin]} / ${bytes[convert]}" | bc)% of convert's ${bytes[convert]} (goal <= 105%);" \
     "compressed $1 of $2 allocated clusters, $(echo "scale=1; 100 * $1 / $2" | bc)% (goal >= 60%)"
if [ $fail = 0 ]; then
    echo "qemu-img check: all clean; qemu-img compare plugin = source: equal"
else
    echo "FAILED: see the messages above"
fi
exit $fail
