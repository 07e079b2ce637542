#!/usr/bin/env bash
# nbdkit-qcow2: the file grows into reserved space in large steps on a
# disk file system, and not on tmpfs.
#
# core/refcount.c reserves 8-16 MiB past the last allocated cluster
# with fallocate(KEEP_SIZE) so that the file system allocates in large
# contiguous steps; qcow2_close gives back what was not used.  On tmpfs
# a reservation is memory allocated and cleared up front, also for the
# parts of each cluster a small write never touches, so core/io.c does
# not reserve there.  For each file system, 32 scattered 4 KiB writes
# go into an empty image with 64 KiB clusters, and while the server
# still runs the blocks the file takes (st_blocks) are compared with
# what was written:
#   disk (the test's TMPDIR, if not tmpfs): at least 8 MiB allocated;
#   tmpfs (/dev/shm, if it is tmpfs): under 1 MiB (32 clusters of 4 KiB
#     data plus metadata; 64 KiB clusters fully allocated would be 2 MiB,
#     a reservation 8 MiB or more).
# After close, the file holds no reserved blocks beyond its size, and
# qemu-img check is clean.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires stat --version

# check_fs DIR KIND
check_fs ()
{
    local dir=$1 kind=$2 img blocks size
    img=$(mktemp "$dir/nbdkit-qcow2-reserve.XXXXXX.qcow2")
    cleanup_fn rm -f "$img"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 4G
    serve_run file="$img" --run '
        nbdsh -u "$uri" -c "
import random
random.seed(7)
for i in range(32):
    h.pwrite(b\"\\x5a\" * 4096, random.randrange(0, 4 * 1024**3 // 65536) * 65536)
h.flush()
"
        stat -c "%b %B %s" "'"$img"'" > "'"$tmpdir"'/during"'
    read -r blocks bsize size < "$tmpdir/during"
    allocated=$((blocks * bsize))
    echo "$kind ($dir): during: $allocated bytes allocated, size $size"
    case $kind in
    disk)
        [ "$allocated" -ge $((8 * 1024 * 1024)) ] ||
            fail "$kind: only $allocated bytes allocated while serving" \
                 "(a reservation of >= 8 MiB expected)" ;;
    tmpfs)
        [ "$allocated" -lt $((1024 * 1024)) ] ||
            fail "$kind: $allocated bytes allocated while serving" \
                 "(< 1 MiB expected: no reservation on tmpfs)" ;;
    esac
    read -r blocks bsize size < <(stat -c "%b %B %s" "$img")
    allocated=$((blocks * bsize))
    echo "$kind ($dir): after close: $allocated bytes allocated, size $size"
    [ "$allocated" -le $((size + 1024 * 1024)) ] ||
        fail "$kind: $allocated bytes allocated after close for a file of" \
             "$size bytes (the reservation was not given back)"
    qcheck "$img"
    rm -f "$img"
}

tested=0
disk=${TMPDIR:-/tmp}
if [ "$(stat -f -c %T "$disk")" != tmpfs ]; then
    check_fs "$disk" disk
    tested=$((tested + 1))
fi
if [ -d /dev/shm ] && [ "$(stat -f -c %T /dev/shm)" = tmpfs ]; then
    check_fs /dev/shm tmpfs
    tested=$((tested + 1))
fi
[ $tested -gt 0 ] || skip "neither a disk file system in $disk nor tmpfs"
