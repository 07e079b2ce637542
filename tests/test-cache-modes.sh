#!/usr/bin/env bash
# nbdkit-qcow2: cache= modes, and direct I/O on a device with 4 KiB
# logical sectors.
#
# As root, an ext4 file system on a loop device with 4096-byte logical
# sectors, where every O_DIRECT request must be 4 KiB aligned, holds
# images with 64 KiB and 512-byte clusters, each with a raw backing
# file, served with cache=none (core/io.c aligns everything itself):
#   - four connections write byte-granular pieces into the same 4 KiB
#     blocks at once (cache-writers.py; a lost read-modify-write shows
#     as a difference), then zero, trim, flush and FUA writes;
#   - while serving: the image's and the backing file's descriptors in
#     nbdkit have O_DIRECT (/proc/PID/fdinfo), the image is read back
#     through the plugin (qemu-img compare against the raw mirror), and
#     fincore finds none of the image's pages in the page cache;
#   - then qemu-img check is clean and the image equals the mirror;
#   - a compressed image and an image with an external data file, the
#     same way;
#   - cache=auto picks direct I/O there, and on /dev/shm (tmpfs, which
#     keeps files in the page cache whatever O_DIRECT says) buffered
#     I/O with eviction, saying so; cache=none on /dev/shm is refused
#     with a message naming tmpfs and cache=auto.
# Without root: only the tmpfs part.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

writers=$abs_top_srcdir/tests/cache-writers.py

# direct_fds PID PATH...: fail unless every PATH is open in PID with
# O_DIRECT (040000 octal in fdinfo's flags).
direct_fds ()
{
    local pid=$1 path fd flags found
    shift
    for path in "$@"; do
        found=
        for fd in /proc/"$pid"/fd/*; do
            [ "$(readlink "$fd")" = "$path" ] || continue
            flags=$(awk '/^flags:/ { print $2 }' \
                        /proc/"$pid"/fdinfo/"${fd##*/}")
            echo "nbdkit $pid: $path: fd ${fd##*/} flags $flags"
            (( 8#$flags & 8#040000 )) ||
                fail "$path is open without O_DIRECT (flags $flags)"
            found=1
        done
        [ -n "$found" ] || fail "$path is not open in nbdkit $pid"
    done
}

# not_cached PATH: fail if any page of PATH is in the page cache.
not_cached ()
{
    local res
    res=$(fincore --bytes --noheadings --output RES "$1" | tr -d " ")
    echo "fincore $1: $res bytes cached"
    [ "$res" = 0 ] || fail "$1: $res bytes in the page cache with cache=none"
}

# drop_cache PATH: write PATH back and drop it from the page cache.
drop_cache ()
{
    /usr/bin/python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}

# Writes, zero, trim and flush through the plugin with cache=none and
# the same to a raw mirror.  IMG must read as MIRROR before.
# write_case IMG MIRROR SEED [OTHER FILES OPEN WITH O_DIRECT...]
write_case ()
{
    local img=$1 mirror=$2 seed=$3
    shift 3
    /usr/bin/python3 "$writers" file "$mirror" "$seed" 4 1500 65536
    for f in "$img" "$@"; do drop_cache "$f"; done
    serve_run file="$img" cache=none --run '
        exec bash "'"$tmpdir"'/during-write.sh" "$uri" "'"$img"'" \
             "'"$mirror"'" '"$seed $*"
    not_cached "$img"
    # (qemu-img finds a relative data file in its own directory)
    ( cd "${img%/*}"
      qcheck "$img"
      qemu-img compare -q -F raw "$img" "$mirror" ||
          fail "$img differs from its mirror $mirror" )
}

# The commands run while nbdkit serves, as its child (exec keeps the
# PID: their $PPID is nbdkit), with the functions above.
declare -f fail direct_fds not_cached > "$tmpdir/lib.sh"
cat > "$tmpdir/during-write.sh" <<'DURING'
set -e
source "${0%/*}/lib.sh"
uri=$1 img=$2 mirror=$3 seed=$4
shift 4
/usr/bin/python3 "$writers" nbd "$uri" "$seed" 4 1500 65536
direct_fds $PPID "$img" "$@"
for f in "$img" "$@"; do not_cached "$f"; done
qemu-img compare -f raw -F raw "$mirror" "$uri" ||
    fail "$img read through the plugin differs from the mirror $mirror"
for f in "$img" "$@"; do not_cached "$f"; done
DURING
cat > "$tmpdir/during-read.sh" <<'DURING'
set -e
source "${0%/*}/lib.sh"
uri=$1 img=$2 mirror=$3
direct_fds $PPID "$img"
qemu-img compare -f raw -F raw "$mirror" "$uri" ||
    fail "$img read through the plugin differs from the mirror $mirror"
not_cached "$img"
DURING
export writers

loop_case ()
{
    local fs=$tmpdir/ext4.img mnt=$tmpdir/ext4 loop cs ss
    truncate -s 256M "$fs"
    loop=$(losetup -f --show --sector-size 4096 "$fs")
    cleanup_fn losetup -d "$loop"
    ss=$(blockdev --getss "$loop")
    [ "$ss" = 4096 ] || fail "$loop: logical sector size $ss, not 4096"
    mkfs.ext4 -q "$loop"
    mkdir "$mnt"
    mount "$loop" "$mnt"
    cleanup_fn umount "$mnt"

    for cs in 65536 512; do
        echo "== ext4 on 4K sectors, cluster size $cs"
        # A raw backing file with a pattern; the image reads it where
        # it has no clusters, so the mirror starts as a copy of it.
        head -c $((2 * 1024 * 1024)) /dev/urandom > "$mnt/base-$cs.raw"
        truncate -s 4M "$mnt/base-$cs.raw"
        qemu-img create -q -f qcow2 -o cluster_size=$cs \
                 -b "base-$cs.raw" -F raw "$mnt/img-$cs.qcow2" 4M
        cp "$mnt/base-$cs.raw" "$mnt/mirror-$cs.raw"
        write_case "$mnt/img-$cs.qcow2" "$mnt/mirror-$cs.raw" $cs \
                   "$mnt/base-$cs.raw"

        echo "== compressed, cluster size $cs"
        qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=$cs \
                 "$mnt/mirror-$cs.raw" "$mnt/comp-$cs.qcow2"
        drop_cache "$mnt/comp-$cs.qcow2"
        serve_run file="$mnt/comp-$cs.qcow2" cache=none readonly=true \
                  --run 'exec bash "'"$tmpdir"'/during-read.sh" "$uri" \
                         "'"$mnt/comp-$cs.qcow2"'" "'"$mnt/mirror-$cs.raw"'"'

        echo "== external data file, cluster size $cs"
        # (qemu-img creates a relative data file in its own directory)
        ( cd "$mnt" &&
          qemu-img create -q -f qcow2 -o cluster_size=$cs \
                   -o data_file="data-$cs.raw",data_file_raw=on \
                   "ext-$cs.qcow2" 4M )
        truncate -s 4M "$mnt/ext-mirror-$cs.raw"
        write_case "$mnt/ext-$cs.qcow2" "$mnt/ext-mirror-$cs.raw" $((cs + 1)) \
                   "$mnt/data-$cs.raw"
        cmp "$mnt/data-$cs.raw" "$mnt/ext-mirror-$cs.raw" ||
            fail "data file data-$cs.raw differs from its mirror"
    done

    echo "== fdatasync per mode"
    if command -v strace >/dev/null; then
        sync_modes "$mnt"
    else
        echo "$0: note: strace is missing: fdatasync counts not checked"
    fi

    echo "== cache=auto on ext4"
    nbdkit -v -U - "$PLUGIN" file="$mnt/img-512.qcow2" cache=auto \
           --run true 2> "$tmpdir/auto-ext4.log" ||
        { cat "$tmpdir/auto-ext4.log"; fail "cache=auto on ext4"; }
    grep "img-512.qcow2: cache: direct I/O (O_DIRECT), alignment 4096" \
         "$tmpdir/auto-ext4.log" ||
        fail "cache=auto on ext4 on 4K sectors did not choose O_DIRECT"
}

# sync_modes DIR: the flush side of each mode, counted with strace:
# 20 writes and 5 zeroes without FUA, then one flush, and close.
# writeback: a few fdatasyncs (the flush, close); writethrough and
# directsync: one or more per request; unsafe: none at all.  Each
# leaves a consistent image with the data written.
sync_modes ()
{
    local dir=$1 mode n min max
    for mode in writeback writethrough directsync unsafe; do
        qemu-img create -q -f qcow2 "$dir/sync.qcow2" 4M
        # (LeakSanitizer cannot run under ptrace: no leak check here)
        ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
        strace -f -qq -e trace=fdatasync -o "$tmpdir/strace.$mode" \
            nbdkit -U - "$PLUGIN" file="$dir/sync.qcow2" cache=$mode --run '
            nbdsh -u "$uri" -c "
for i in range(20):
    h.pwrite(b\"%c\" % (65 + i) * 1000, i * 70000)
for i in range(5):
    h.zero(3000, i * 70000 + 100)
h.flush()
"'
        n=$(grep -c 'fdatasync(' "$tmpdir/strace.$mode" || :)
        case $mode in
        writeback) min=1 max=10 ;;
        writethrough|directsync) min=25 max=100000 ;;
        unsafe) min=0 max=0 ;;
        esac
        echo "cache=$mode: $n fdatasync calls (expected $min..$max)"
        [ "$n" -ge $min ] && [ "$n" -le $max ] ||
            fail "cache=$mode: $n fdatasync calls, expected $min..$max"
        qcheck "$dir/sync.qcow2"
        out=$(qemu-io -c "read -P 0x54 $((19 * 70000)) 1000" \
                      -c "read -P 0 $((4 * 70000 + 100)) 3000" \
                      -c "read -P 0x45 $((4 * 70000)) 100" \
                      "$dir/sync.qcow2")
        [ "$(grep -c '^read ' <<< "$out")" = 3 ] &&
            ! grep -q 'failed' <<< "$out" ||
            fail "cache=$mode: the data did not reach the image: $out"
        rm -f "$dir/sync.qcow2"
    done
}

if [ "$(id -u)" = 0 ] && command -v losetup >/dev/null &&
   command -v mkfs.ext4 >/dev/null && command -v fincore >/dev/null; then
    loop_case
else
    skip "the O_DIRECT cases need root, losetup, mkfs.ext4 and fincore"
fi

if [ -d /dev/shm ] && [ "$(stat -f -c %T /dev/shm)" = tmpfs ]; then
    echo "== tmpfs"
    shm=$(mktemp -d /dev/shm/nbdkit-qcow2-cache.XXXXXX)
    cleanup_fn rm -rf "$shm"
    qemu-img create -q -f qcow2 "$shm/img.qcow2" 4M
    if serve_run file="$shm/img.qcow2" cache=none --run true \
                 2> "$tmpdir/none-shm.log"; then
        fail "cache=none on tmpfs was not refused"
    fi
    cat "$tmpdir/none-shm.log"
    grep -q "tmpfs.*cache=auto" "$tmpdir/none-shm.log" ||
        fail "the refusal does not name tmpfs and suggest cache=auto"
    nbdkit -v -U - "$PLUGIN" file="$shm/img.qcow2" cache=auto --run '
        nbdsh -u "$uri" -c "h.pwrite(b\"a\" * 5, 4093); h.flush()"' \
        2> "$tmpdir/auto-shm.log" ||
        { cat "$tmpdir/auto-shm.log"; fail "cache=auto on tmpfs"; }
    grep "img.qcow2: cache: buffered with eviction" "$tmpdir/auto-shm.log" ||
        fail "cache=auto on tmpfs did not choose buffered with eviction"
    qcheck "$shm/img.qcow2"
fi
