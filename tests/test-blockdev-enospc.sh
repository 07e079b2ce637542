#!/usr/bin/env bash
# nbdkit-qcow2: a qcow2 written onto a block device (an LV, here a
# loop device) cannot grow: writes that need clusters past the
# device's end fail with ENOSPC, the rest of the device is used, and
# the image stays consistent.
#
# For each case a small file becomes a loop device (root only), a new
# qcow2 image is copied onto it, and the plugin serves the device.
# Then 64 KiB writes to fresh clusters, one after the other, until they
# fail; each failure must be ENOSPC (not EIO), and:
#   - the data written reads back, rewrites of allocated clusters and a
#     flush still succeed after the device is full;
#   - the plugin said why (core/refcount.c: "the block device is full");
#   - enough was written: the device minus metadata (see min_mib);
#   - qemu-img check finds no corruption and no leak.
# Cases:
#   a  64 KiB clusters, a device of 4 MiB + 20 KiB (a partial last
#      cluster, which must not be used), cache=writeback
#   b  the same, cache=none (O_DIRECT on a block device: the device
#      node lives on devtmpfs, which must not be taken for tmpfs)
#   c  512-byte clusters, 64-bit refcounts, 16 MiB: the refcount table
#      (one cluster, 64 blocks of 64 clusters: 2 MiB) must grow inside
#      the device, not past its end (as in a file, where it goes after
#      the last cluster: on a device that is the device's end)
#   d  see below: the device grows, and trimmed clusters are reused
#   e  see below: a long write into a device whose free clusters are
#      all scattered (every other cluster trimmed) succeeds
# With strace, also: no fallocate or ftruncate call on the device
# (reservations are for files only: cases a-c ask for them with
# prealloc-size=8M).

source ./functions.sh
set -e
set -u

[ "$(id -u)" = 0 ] ||
    skip "needs root (a loop device: losetup)"
requires qemu-img --version
requires losetup --version
requires dd --version

# run_case NAME DEV_BYTES QEMU_IMG_OPTS MIN_MIB PLUGIN_ARGS...
run_case ()
{
    local name=$1 bytes=$2 opts=$3 min_mib=$4 back=$tmpdir/$1.dev dev r
    shift 4
    truncate -s "$bytes" "$back"
    dev=$(losetup -f --show "$back")
    attached=$dev
    qemu-img create -q -f qcow2 -o "$opts" "$tmpdir/$name.qcow2" 1G
    dd if="$tmpdir/$name.qcow2" of="$dev" bs=64k conv=fsync status=none
    export min_mib
    r=0
    $strace nbdkit -U - "$PLUGIN" file="$dev" "$@" --run '
        nbdsh -u "$uri" -c "
import errno, os
import nbd
n = 0
fails = 0
for i in range(1024):
    try:
        h.pwrite(bytes([i % 251 + 1]) * 65536, i * 65536)
    except nbd.Error as e:
        if e.errnum != errno.ENOSPC:
            raise Exception(\"write %d: %s (ENOSPC expected)\" % (i, e))
        fails += 1
        if fails == 3:
            break
        continue
    if fails:
        raise Exception(\"write %d succeeded after ENOSPC\" % i)
    n += 1
print(\"written: %d clusters of 64 KiB (%.2f MiB)\" % (n, n / 16))
if n < int(os.environ[\"min_mib\"]) * 16:
    raise Exception(\"only %d KiB written\" % (n * 64))
h.flush()
for i in range(n):
    assert h.pread(65536, i * 65536) == bytes([i % 251 + 1]) * 65536, i
    h.pwrite(bytes([i % 251 + 2]) * 65536, i * 65536)
h.flush()
for i in range(n):
    assert h.pread(65536, i * 65536) == bytes([i % 251 + 2]) * 65536, i
"' 2> "$tmpdir/$name.log" || r=$?
    cat "$tmpdir/$name.log"
    [ $r -eq 0 ] || fail "case $name: exit $r"
    grep -q "the block device is full" "$tmpdir/$name.log" ||
        fail "case $name: no \"the block device is full\" message"
    r=0
    qemu-img check -f qcow2 "$dev" || r=$?
    [ $r -eq 0 ] || fail "case $name: qemu-img check: exit $r (0 expected)"
    if [ -n "$strace" ]; then
        if grep -E '^[0-9]+ +(fallocate|ftruncate)\(' "$tmpdir/strace.log"
        then
            fail "case $name: fallocate or ftruncate called on $dev"
        fi
        rm -f "$tmpdir/strace.log"
    fi
    detach
}

# The loop device attached now, detached when done with and at exit
# (only this one: another test may have attached the next loop device
# under the same name since).
attached=
detach ()
{
    if [ -n "$attached" ]; then
        losetup -d "$attached"
        attached=
    fi
}
cleanup_fn detach

strace=
if [ -n "${QCOW2_SAN_PRELOAD:-}" ]; then
    # LeakSanitizer cannot stop the world in a traced process.
    echo "$0: note: a sanitizer build: fallocate and ftruncate calls" \
         "not checked (LeakSanitizer does not work under strace)"
elif command -v strace >/dev/null; then
    strace="strace -f -qq -e trace=fallocate,ftruncate -o $tmpdir/strace.log"
else
    echo "$0: note: no strace: fallocate and ftruncate calls not checked"
fi

# prealloc-size=8M: reservations asked for, to be refused on a device.
run_case a $((4 * 1024 * 1024 + 20480)) cluster_size=65536 3 \
         prealloc-size=8M
run_case b $((4 * 1024 * 1024 + 20480)) cluster_size=65536 3 \
         prealloc-size=8M cache=none
run_case c $((16 * 1024 * 1024)) cluster_size=512,refcount_bits=64 14 \
         prealloc-size=8M

# d: the device grows while served (lvextend; here the loop device's
# file is extended and losetup -c re-reads it): once full, 1 MiB more
# takes 16 more clusters of 64 KiB at once.  Then a trim of 8 clusters
# and a flush free them: written again from the start, the trimmed
# clusters get them back and the write fails where it did before.
back=$tmpdir/d.dev
truncate -s $((4 * 1024 * 1024)) "$back"
attached=$(losetup -f --show "$back")
qemu-img create -q -f qcow2 "$tmpdir/d.qcow2" 1G
dd if="$tmpdir/d.qcow2" of="$attached" bs=64k conv=fsync status=none
fill='
import errno, nbd
n = 0
while True:
    try:
        h.pwrite(b"\x5a" * 65536, n * 65536)
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, e
        break
    n += 1
print("full after %d clusters" % n)
open("'"$tmpdir"'/d.n", "a").write("%d\n" % n)
'
export fill dev=$attached back
serve_run file="$attached" --run '
    nbdsh -u "$uri" -c "$fill" &&
    truncate -s +1M "$back" && losetup -c "$dev" &&
    nbdsh -u "$uri" -c "$fill" &&
    nbdsh -u "$uri" -c "h.trim(8 * 65536, 0); h.flush()" &&
    nbdsh -u "$uri" -c "$fill"' 2>/dev/null
read -r n1 n2 n3 < <(paste -s "$tmpdir/d.n")
[ $((n2 - n1)) -eq 16 ] ||
    fail "case d: $n1 clusters, then $n2 after 1 MiB more (16 more expected)"
[ "$n3" -eq "$n2" ] ||
    fail "case d: after trimming 8 clusters of $n2, $n3 could be written" \
         "again ($n2 expected: the freed clusters reused)"
r=0
qemu-img check -f qcow2 "$attached" || r=$?
[ $r -eq 0 ] || fail "case d: qemu-img check: exit $r (0 expected)"
detach

# e: the device full, then every other guest cluster trimmed (and a
# flush): the free clusters lie between used ones, one by one.  A write
# of as many clusters as are free, unaligned at both ends, must take
# them all (several allocations, core/write.c: plan_alloc), not fail
# with ENOSPC for want of a run as long as the write; it reads back,
# every other cluster is intact, and then the device is really full:
# a write to one more fresh cluster fails with ENOSPC.  The image read
# by qemu-img afterwards is what the client wrote.
back=$tmpdir/e.dev
truncate -s $((4 * 1024 * 1024)) "$back"
attached=$(losetup -f --show "$back")
qemu-img create -q -f qcow2 "$tmpdir/e.qcow2" 128M
dd if="$tmpdir/e.qcow2" of="$attached" bs=64k conv=fsync status=none
export tmpdir
r=0
serve_run file="$attached" --run '
  nbdsh -u "$uri" -c "
import errno, random
import nbd
cs = 65536
expect = open(\"$tmpdir/e.expect\", \"wb\")
expect.truncate(h.get_size())
def write(buf, off):
    h.pwrite(buf, off)
    expect.seek(off)
    expect.write(buf)

n = 0
while True:
    try:
        write(bytes([n % 251 + 1]) * cs, n * cs)
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, e
        break
    n += 1
for i in range(0, n, 2):
    h.trim(cs, i * cs)
    expect.seek(i * cs)
    expect.write(bytes(cs))
h.flush()
free = (n + 1) // 2
print(\"full after %d clusters, %d freed one by one\" % (n, free))

# free clusters from 64 MiB + 1000 on, ending 1000 bytes before the
# last one ends.
g = 64 << 20
data = random.Random(18).randbytes(free * cs - 2000)
try:
    write(data, g + 1000)
except nbd.Error as e:
    raise Exception(\"a write of %d clusters, %d free: %s\" % (free, free, e))
h.flush()
assert h.pread(free * cs, g) == bytes(1000) + data + bytes(1000)
for i in range(n):
    want = bytes(cs) if i % 2 == 0 else bytes([i % 251 + 1]) * cs
    assert h.pread(cs, i * cs) == want, i
try:
    h.pwrite(b\"x\" * 512, 100 << 20)
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
else:
    raise Exception(\"a write succeeded on a full device\")
expect.close()
print(\"a write of %d clusters into %d scattered free ones: ok\" % (free, free))
"' 2> "$tmpdir/e.log" || r=$?
cat "$tmpdir/e.log"
[ $r -eq 0 ] || fail "case e: exit $r"
r=0
qemu-img check -f qcow2 "$attached" || r=$?
[ $r -eq 0 ] || fail "case e: qemu-img check: exit $r (0 expected)"
qemu-img convert -f qcow2 -O raw "$attached" "$tmpdir/e.raw"
cmp "$tmpdir/e.raw" "$tmpdir/e.expect" ||
    fail "case e: the image qemu-img reads is not what was written"
detach
