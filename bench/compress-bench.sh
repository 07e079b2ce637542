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
# on the same file system as the source.  Prints one line per copy and
# a summary of the medians, with the output sizes.  Run it from the
# top of a built tree; the machine should be otherwise idle (say what
# else ran when quoting its numbers).

set -e
set -u
export PATH=/usr/bin:/usr/sbin:$PATH LC_ALL=C

top=$(cd "$(dirname "$0")/.." && pwd)
plugin=$top/plugin/.libs/nbdkit-qcow2-plugin.so
size=${1:-768M}
rounds=${2:-3}
type=${3:-zstd}
dir=$(mktemp -d "${TMPDIR:-/var/tmp}/compress-bench.XXXXXX")
qpid=
cleanup ()
{
    if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

[ -f "$plugin" ] || { echo "$0: build the plugin first" >&2; exit 1; }
python3=/usr/bin/python3
$python3 "$top/tests/mkmixed.py" "$dir/src.raw" "$size"
vsize=$(stat -c %s "$dir/src.raw")
sync

now () { date +%s.%N; }

run_plugin ()
{
    rm -f "$dir/out.qcow2"
    nbdkit -U - "$plugin" file="$dir/out.qcow2" create=true size=$vsize \
           compression-type=$type compress=on \
           --run "nbdcopy --flush '$dir/src.raw' \"\$uri\""
}

run_convert ()
{
    rm -f "$dir/out.qcow2"
    qemu-img convert -c -f raw -O qcow2 -o compression_type=$type \
             "$dir/src.raw" "$dir/out.qcow2"
}

run_qemu_nbd ()
{
    local sock=$dir/qemu-nbd.sock
    rm -f "$dir/out.qcow2" "$sock"
    qemu-img create -q -f qcow2 -o compression_type=$type "$dir/out.qcow2" $vsize
    qemu-nbd -t -k "$sock" --image-opts \
      "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=$dir/out.qcow2" &
    qpid=$!
    while [ ! -S "$sock" ]; do sleep 0.02; done
    nbdcopy --flush "$dir/src.raw" "nbd+unix:///?socket=$sock"
    kill "$qpid"
    wait "$qpid" 2>/dev/null || true
    qpid=
}

declare -A times
for r in $(seq 1 "$rounds"); do
    # Alternate the order from round to round.
    case $((r % 3)) in
    1) order="plugin convert qemu_nbd" ;;
    2) order="convert qemu_nbd plugin" ;;
    0) order="qemu_nbd plugin convert" ;;
    esac
    for way in $order; do
        sync
        t0=$(now)
        run_$way
        sync
        t=$(echo "$(now) - $t0" | bc)
        bytes=$(stat -c %s "$dir/out.qcow2")
        comp=$(qemu-img check --output=json "$dir/out.qcow2" |
               $python3 -c 'import json, sys; j = json.load(sys.stdin); print(j.get("compressed-clusters", 0), j.get("allocated-clusters", 0))')
        printf 'round %d  %-9s %6.2f s  %11d bytes  compressed/allocated %s\n' \
               "$r" "$way" "$t" "$bytes" "$comp"
        times[$way]="${times[$way]:-} $t"
    done
done

median () { printf '%s\n' $1 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
mp=$(median "${times[plugin]}")
mc=$(median "${times[convert]}")
mq=$(median "${times[qemu_nbd]}")
echo "median: plugin $mp s, qemu-img convert -c $mc s, qemu-nbd+compress $mq s"
echo "speed-up: $(echo "scale=2; $mc / $mp" | bc)x over convert, $(echo "scale=2; $mq / $mp" | bc)x over qemu-nbd"
