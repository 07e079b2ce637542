#!/bin/bash
# nbdkit-qcow2: make the seed corpus for tests/fuzz-qcow2.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# Usage: fuzz-corpus.sh DIR
#
# Writes small qcow2 images made by qemu-img/qemu-io into DIR, one per
# on-disk feature core handles: cluster sizes 512/4K/64K, compat 0.10
# and 1.1, refcount widths 1/16/64, extended L2, zlib and zstd
# compressed clusters, zero clusters, discards, an internal snapshot,
# lazy refcounts, persistent bitmaps and preallocated metadata.  Every
# image has a virtual size of a few MiB and is cut to at most MAX_SEED
# bytes: clusters past the cut read as zeroes, and small seeds keep the
# fuzzer fast.  Nothing is binary in the tree: the corpus is made anew.

set -e
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 1
fi
dir=$1
MAX_SEED=${MAX_SEED:-300000}

for p in qemu-img qemu-io; do
    if ! command -v $p >/dev/null; then
        echo "$0: $p is needed to make the seed corpus" >&2
        exit 1
    fi
done
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# mk NAME SIZE CREATE-OPTIONS [QEMU-IO-COMMAND...]
mk ()
{
    local name=$1 size=$2 opts=$3 f=$tmp/$1.qcow2
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$f" "$size"
    for c in "$@"; do
        io "$f" -c "$c"
    done
    keep "$f" "$name"
}

# io FILE QEMU-IO-ARGS...: run qemu-io, showing its output on failure.
io ()
{
    local f=$1
    shift
    if ! qemu-io -f qcow2 "$@" "$f" >"$tmp/out" 2>&1; then
        cat "$tmp/out" >&2
        echo "$0: qemu-io $* $f failed" >&2
        exit 1
    fi
}

# keep FILE NAME: copy to the corpus, cut to MAX_SEED bytes.
keep ()
{
    cp "$1" "$dir/$2.qcow2"
    if [ "$(stat -c %s "$dir/$2.qcow2")" -gt "$MAX_SEED" ]; then
        truncate -s "$MAX_SEED" "$dir/$2.qcow2"
    fi
}

# A little of everything: data, a zero cluster, a discard, a partial
# cluster.  Written to images of every geometry.
io_mix=(
    "write -P 0x11 0 8k"
    "write -P 0x22 1M 4k"
    "write -z 64k 64k"
    "write -P 0x33 2M 1536"
    "discard 1M 4k"
    "write -P 0x44 3146240 512"
)

for cs in 512 4096 65536; do
    mk v3-c$cs 4M cluster_size=$cs,compat=1.1 "${io_mix[@]}"
    mk v2-c$cs 4M cluster_size=$cs,compat=0.10 "${io_mix[@]}"
done
for rb in 1 16 64; do
    mk rb$rb 4M cluster_size=4096,refcount_bits=$rb "${io_mix[@]}"
done
mk extl2-c32k 4M cluster_size=32768,extended_l2=on "${io_mix[@]}" \
    "write -P 0x55 263168 2k" "write -z 300k 1k"
mk extl2-c64k 2M cluster_size=65536,extended_l2=on \
    "write -P 0x66 0 4k" "write -z 8k 2k"
mk empty 4M cluster_size=4096
mk lazy 4M cluster_size=4096,lazy_refcounts=on "${io_mix[@]}"
mk prealloc 4M cluster_size=65536,preallocation=metadata
mk prealloc-c4k 2M cluster_size=4096,preallocation=metadata \
    "write -P 0x77 0 4k"
mk odd-size 3000000 cluster_size=4096 "write -P 0x88 2999808 192"

# Compressed clusters: convert -c from a raw file with some data.
qemu-img create -q -f raw "$tmp/raw" 4M
qemu-io -f raw -c "write -P 0x99 0 256k" -c "write -P 0xaa 1M 64k" \
    "$tmp/raw" >/dev/null
for cs in 4096 65536; do
    qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=$cs \
        "$tmp/raw" "$tmp/zlib-c$cs.qcow2"
    keep "$tmp/zlib-c$cs.qcow2" zlib-c$cs
    qemu-img convert -q -c -f raw -O qcow2 \
        -o cluster_size=$cs,compression_type=zstd \
        "$tmp/raw" "$tmp/zstd-c$cs.qcow2"
    keep "$tmp/zstd-c$cs.qcow2" zstd-c$cs
done
qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10,cluster_size=4096 \
    "$tmp/raw" "$tmp/zlib-v2.qcow2"
keep "$tmp/zlib-v2.qcow2" zlib-v2
# Compressed, then partly overwritten (a mix of both kinds).
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 \
    "$tmp/raw" "$tmp/zlib-mixed.qcow2"
io "$tmp/zlib-mixed.qcow2" -c "write -P 0xbb 8k 4k" -c "write -z 16k 4k"
keep "$tmp/zlib-mixed.qcow2" zlib-mixed

# An internal snapshot, then writes that make the active L1/L2 diverge.
for compat in 1.1 0.10; do
    f=$tmp/snap-$compat.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=4096,compat=$compat "$f" 4M
    io "$f" -c "write -P 0xcc 0 16k"
    qemu-img snapshot -c snap1 "$f"
    io "$f" -c "write -P 0xdd 4k 4k" -c "discard 8k 4k"
    keep "$f" snapshot-$compat
done

# Persistent dirty bitmaps (bitmap directory, bitmap tables).
f=$tmp/bitmap.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096 "$f" 4M
io "$f" -c "write -P 0xee 0 64k"
qemu-img bitmap --add "$f" b0
qemu-img bitmap --add -g 65536 "$f" b1
qemu-img bitmap --disable "$f" b1
keep "$f" bitmaps

# Lazy refcounts after a crash: qemu-io's abort leaves the dirty bit
# set and the refcounts of new clusters unwritten (core serves it
# read-only).  The second copy has the dirty bit cleared by hand, which
# is a hostile image: clusters in use with refcount 0.
f=$tmp/lazy-dirty.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$f" 4M
( ulimit -c 0; exec qemu-io -f qcow2 -c "write -P 0xef 0 8k" -c abort "$f" ) \
    >/dev/null 2>&1 || :
keep "$f" lazy-dirty
printf '\0' | dd of="$f" bs=1 seek=79 conv=notrunc status=none
keep "$f" lazy-dirty-cleared

ls -l "$dir" >&2
