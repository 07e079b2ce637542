#!/usr/bin/env bash
# nbdkit-qcow2: the file grows into reserved space in large steps on a
# disk file system, as prealloc-size= says, and not on tmpfs.
#
# core/refcount.c reserves disk blocks past the last allocated cluster
# with fallocate(KEEP_SIZE), in steps of prealloc-size (whenever the file
# grows past the reservation, up to the next multiple of the step at
# least one step further), so that the file system allocates in large
# contiguous steps; qcow2_close gives back what was not used.  On tmpfs
# a reservation is memory allocated and cleared up front, also for the
# parts of each cluster a small write never touches, so core/io.c does
# not reserve there.  For each case, 32 scattered 4 KiB writes go into
# an empty image with 64 KiB clusters, and while the server still runs
# the blocks the file takes (st_blocks) are compared with what was
# written:
#   disk (the test's TMPDIR, if not tmpfs), with the default
#     prealloc-size (--dump-plugin says which), with prealloc-size=32M
#     and with 3M: between one and two steps allocated (plus 1 MiB);
#   disk, prealloc-size=0: under 1 MiB (32 clusters of 4 KiB data plus
#     metadata: no reservation at all);
#   tmpfs (/dev/shm, if it is tmpfs), default: under 1 MiB (64 KiB
#     clusters fully allocated would be 2 MiB, a reservation more).
# After close, the file holds no reserved blocks beyond its size, and
# qemu-img check is clean.  Then, as root, a nearly full ext4 file
# system on a loop device (see full_ext4 below).

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires stat --version

# check_fs DIR KIND [PREALLOC]
check_fs ()
{
    local dir=$1 kind=$2 img blocks size step
    local args=() what="$kind ($dir, default prealloc-size)"
    step=$default_step
    if [ $# -gt 2 ]; then
        args=(prealloc-size="$3")
        step=$(numfmt --from=iec "$3")
        what="$kind ($dir, prealloc-size=$3)"
    fi
    [ "$kind" = disk ] || step=0
    img=$(mktemp "$dir/nbdkit-qcow2-reserve.XXXXXX.qcow2")
    cleanup_fn rm -f "$img"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 4G
    serve_run file="$img" "${args[@]}" --run '
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
    echo "$what: during: $allocated bytes allocated, size $size"
    if [ "$step" -eq 0 ]; then
        [ "$allocated" -lt $((1024 * 1024)) ] ||
            fail "$what: $allocated bytes allocated while serving" \
                 "(< 1 MiB expected: no reservation)"
    else
        [ "$allocated" -ge "$step" ] &&
        [ "$allocated" -le $((2 * step + 1024 * 1024)) ] ||
            fail "$what: $allocated bytes allocated while serving" \
                 "(a reservation of $step to $((2 * step)) bytes expected)"
    fi
    read -r blocks bsize size < <(stat -c "%b %B %s" "$img")
    allocated=$((blocks * bsize))
    echo "$what: after close: $allocated bytes allocated, size $size"
    [ "$allocated" -le $((size + 1024 * 1024)) ] ||
        fail "$what: $allocated bytes allocated after close for a file" \
             "of $size bytes (the reservation was not given back)"
    qcheck "$img"
    rm -f "$img"
}

default_step=$(nbdkit "$PLUGIN" --dump-plugin |
               sed -n 's/^qcow2_prealloc_size=//p')
[ -n "$default_step" ] || fail "--dump-plugin: no qcow2_prealloc_size"
echo "default prealloc-size: $default_step"

tested=0
disk=${TMPDIR:-/tmp}
if [ "$(stat -f -c %T "$disk")" != tmpfs ]; then
    check_fs "$disk" disk
    check_fs "$disk" disk 0
    check_fs "$disk" disk 3M
    check_fs "$disk" disk 32M
    tested=$((tested + 1))
fi
if [ -d /dev/shm ] && [ "$(stat -f -c %T /dev/shm)" = tmpfs ]; then
    check_fs /dev/shm tmpfs
    tested=$((tested + 1))
fi
[ $tested -gt 0 ] || skip "neither a disk file system in $disk nor tmpfs"

# A nearly full ext4 file system (root only: a loop device).  A
# reservation that fails part way (ENOSPC: ext4 keeps the blocks it had
# allocated) must not stay behind, and no reservation may take the last
# free space: that belongs to the data, the image's or anyone's.
#  1. 4 MiB free: serve, write 64 KiB, shut down.  The file system has
#     lost no more space than the image's allocated blocks grew by.
#  2. 4 MiB free again (as after freeing some space): a restarted server
#     writes 2 MiB, and meanwhile another program can still write 1 MiB
#     to the same file system; the accounting of 1 holds again.
fs_free ()
{
    sync -f "$mnt"
    stat -f -c '%a %S' "$mnt" | awk '{ print $1 * $2 }'
}
file_alloc ()
{
    stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'
}
# leave_free BYTES: grow or shrink the filler file so that BYTES are free.
leave_free ()
{
    local size
    size=$(( $(file_alloc "$mnt/filler") + $(fs_free) - $1 ))
    if [ "$size" -lt "$(stat -c %s "$mnt/filler")" ]; then
        truncate -s "$size" "$mnt/filler"
    else
        fallocate -l "$size" "$mnt/filler"
    fi
}
# accounting PHASE FREE_BEFORE SIZE_BEFORE: the file system lost no
# more than the image's size grew by (plus a little for ext4's own
# metadata), and the image holds no blocks beyond its size.
accounting ()
{
    local free alloc size lost grew
    free=$(fs_free)
    alloc=$(file_alloc "$img")
    size=$(stat -c %s "$img")
    lost=$(( $2 - free ))
    grew=$(( size - $3 ))
    echo "ext4 $1: the file system lost $lost bytes, the image grew by" \
         "$grew bytes to $size ($alloc bytes allocated)"
    if [ "$lost" -gt $(( grew + 256 * 1024 )) ] ||
       [ "$alloc" -gt $(( size + 256 * 1024 )) ]; then
        echo "$0: FAIL: ext4 $1: the file system lost $lost bytes for an" \
             "image that grew by $grew bytes to $size, with $alloc bytes" \
             "allocated (a reservation was kept)" >&2
        full_failed="$full_failed $1"
    fi
}

full_ext4 ()
{
    local fs=$tmpdir/ext4.img free0 size0 r
    mnt=$tmpdir/ext4
    img=$mnt/disk.qcow2
    truncate -s 56M "$fs"
    loop=$(losetup -f --show "$fs")
    cleanup_fn losetup -d "$loop"
    mkfs.ext4 -q -m 0 "$loop"
    mkdir "$mnt"
    mount "$loop" "$mnt"
    cleanup_fn umount "$mnt"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 1G
    : > "$mnt/filler"

    leave_free $((4 * 1024 * 1024))
    free0=$(fs_free)
    size0=$(stat -c %s "$img")
    serve_run file="$img" --run '
        nbdsh -u "$uri" -c "h.pwrite(b\"\\x5a\" * 65536, 1024**2); h.flush()"'
    accounting 1 "$free0" "$size0"

    leave_free $((4 * 1024 * 1024))
    free0=$(fs_free)
    size0=$(stat -c %s "$img")
    r=0
    serve_run file="$img" --run '
        nbdsh -u "$uri" -c "
for i in range(32):
    h.pwrite(b\"\\x6b\" * 65536, 64 * 1024**2 + i * 65536)
h.flush()
" &&
        dd if=/dev/zero of="'"$mnt"'/other" bs=64k count=16 conv=fsync \
           status=none' || r=$?
    if [ $r -ne 0 ]; then
        echo "$0: FAIL: ext4 2: with 4 MiB free, writing 2 MiB to the" \
             "image and 1 MiB to another file failed" >&2
        full_failed="$full_failed 2-write"
    fi
    rm -f "$mnt/other"
    accounting 2 "$free0" "$size0"
    qcheck "$img"
    [ -z "$full_failed" ] ||
        fail "ext4 nearly full: failed:$full_failed"
}

full_failed=
if [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null &&
   command -v losetup >/dev/null; then
    full_ext4
else
    echo "$0: note: the nearly full ext4 case needs root, mkfs.ext4 and" \
         "losetup: not tested"
fi
