#!/usr/bin/env bash
# nbdkit-qcow2: a full file system leaks nothing.
#
# An allocating write that fails after it has taken clusters from the
# allocator (its data write hits ENOSPC, or the new L2 table's, or the
# copy of a snapshot's L2 table) must give them back: only a crash may
# leave leaked clusters.  For each kind of image, in a tmpfs of a few
# MiB or a small ext4 on a loop device (root only: they are mounted for
# the test), the client writes until
# the file system is full and writes fail with ENOSPC, goes on writing
# (some more fail) and trimming a little, then disconnects; the server
# shuts down cleanly, and `qemu-img check` must report no leaks (exit
# 0, where a leak is exit 3).  The images:
#   4k:       4 KiB clusters (a new L2 table per 2 MiB of guest data);
#   64k-ext:  64 KiB clusters with extended L2 entries (subclusters);
#   4k-snap:  4 KiB clusters, most of the disk written by qemu-io and
#             then an internal snapshot, so writes copy L2 tables and
#             data clusters first;
#   ext4-4k:  4 KiB clusters on ext4 (where the file is also grown
#             into space reserved ahead, core/refcount.c: with
#             prealloc-size=8M, the size that was fixed before).
# Writes of a few bytes to a few clusters, scattered and sequential.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
[ "$(id -u)" = 0 ] || skip "not root: cannot mount a small tmpfs"
requires mount --version
requires umount --version

mnt=$tmpdir/mnt
mkdir "$mnt"
mounted=
loop=
unmount ()
{
    if [ -n "$mounted" ]; then
        umount "$mnt" || umount -l "$mnt"
        mounted=
    fi
    if [ -n "$loop" ]; then
        losetup -d "$loop"
        loop=
    fi
}
cleanup_fn unmount

# fill KIND OPTS FS_SIZE: tmpfs, or ext4 if KIND starts with ext4.
fill ()
{
    local kind=$1 opts=$2 fs_size=$3 img=$mnt/$1.qcow2 r=0
    case $kind in
    ext4-*)
        truncate -s "$fs_size" "$tmpdir/ext4.img"
        loop=$(losetup -f --show "$tmpdir/ext4.img")
        mkfs.ext4 -q -m 0 "$loop"
        mount "$loop" "$mnt" ;;
    *)
        mount -t tmpfs -o size="$fs_size" "nbdkit-qcow2-enospc" "$mnt" ;;
    esac
    mounted=1
    qemu-img create -q -f qcow2 -o "$opts" "$img" 64M
    case $kind in
    *-snap)
        qemu-io -f qcow2 -c "write -P 0x11 0 24M" "$img" >/dev/null
        qemu-img snapshot -c snap "$img" ;;
    esac
    # On ext4, with reservations (prealloc-size is off by default).
    args=()
    case $kind in ext4-*) args=(prealloc-size=8M) ;; esac
    serve_run file="$img" "${args[@]}" --run '
        nbdsh -u "$uri" -c "
import errno, random
random.seed(14)
size = h.get_size()
failed = ok = 0

def write(n, off):
    global failed, ok
    try:
        h.pwrite(bytes([random.randrange(1, 256)]) * n, off)
        ok += 1
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, e
        failed += 1

# Scattered writes of a few bytes to a few clusters, then long
# sequential ones, until and after the file system is full.
for i in range(3000):
    if failed > 40:
        break
    if i % 3 == 0:
        write(random.randrange(1, 300000), random.randrange(0, size - 300000))
    elif i % 3 == 1:
        write(random.randrange(1, 8192), random.randrange(0, size - 8192))
    else:
        write(65536 * random.randrange(1, 9), (i * 65536 * 8) % (size - 65536 * 8))
    if i % 50 == 49:
        try:
            h.trim(65536, random.randrange(0, size // 65536 - 1) * 65536)
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, e
print(\"'"$kind"': %d writes ok, %d failed with ENOSPC\" % (ok, failed))
assert failed > 0, \"the file system never filled up\"
try:
    h.flush()
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
"'
    qemu-img check "$img" > "$tmpdir/check.log" 2>&1 || r=$?
    # One line per leaked cluster: show the first few and the summary.
    grep '^Leaked cluster' "$tmpdir/check.log" | head -3 || :
    grep -v '^Leaked cluster' "$tmpdir/check.log" || :
    echo "$kind: qemu-img check exit $r"
    unmount
    if [ $r -ne 0 ]; then
        echo "$0: FAIL: $kind: qemu-img check exit $r after ENOSPC and a" \
             "clean shutdown (0 expected: no leaks)" >&2
        failed="$failed $kind"
    fi
}

failed=
fill 4k cluster_size=4096 6M
fill 64k-ext cluster_size=65536,extended_l2=on 6M
fill 4k-snap cluster_size=4096 32M
if command -v mkfs.ext4 >/dev/null && command -v losetup >/dev/null; then
    fill ext4-4k cluster_size=4096 24M
else
    echo "$0: note: no mkfs.ext4 or losetup: ext4 not tested"
fi
[ -z "$failed" ] || fail "leaks after ENOSPC:$failed"
