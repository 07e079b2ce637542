#!/usr/bin/env bash
# nbdkit-qcow2: bitmap directories that cannot be kept.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# A valid image with two bitmaps (512-byte clusters, bits set by
# qemu-io) is patched into hostile variants.  Each must be served (the
# bitmaps are not the disk), a write must clear the bitmaps' autoclear
# bit (every bitmap then reads as inconsistent to QEMU) and leave an
# image qemu-img check accepts: the bitmap clusters are then leaks to
# QEMU (exit 3), as after any program without bitmap support.  Nothing may be sized from an
# unchecked count: nb_bitmaps of 2^31 with a 64-byte directory used to
# fail the open (calloc of 2^31 entries).
#
# Then an image left dirty (lazy refcounts) whose L2 table maps guest
# cluster 1 onto the bitmap's data cluster: refcounts are not trusted
# at open, the repair before the first write counts the cluster twice,
# and the bitmaps must be dropped then.  Kept, the bits stored in place
# at close used to overwrite guest cluster 1.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

PY=/usr/bin/python3
cd "$tmpdir"

qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 1M
qemu-img bitmap --add base.qcow2 b0
qemu-img bitmap --add -g 4096 base.qcow2 b1
qemu-io -f qcow2 -c "write -P 0x11 4k 8k" base.qcow2 >/dev/null

cat > patch.py <<'PYEOF'
import struct, sys
f, field, value = sys.argv[1], sys.argv[2], int(sys.argv[3], 0)
d = bytearray(open(f, "rb").read())
p = struct.unpack(">I", d[100:104])[0]          # header_length
while True:
    t, l = struct.unpack(">II", d[p:p + 8])
    if t == 0:
        sys.exit("no bitmaps extension")
    if t == 0x23852875:
        break
    p += 8 + ((l + 7) & ~7)
if field == "nb_bitmaps":
    d[p + 8:p + 12] = struct.pack(">I", value)
elif field == "share":
    # Guest cluster 'value' onto bitmap 0's first data cluster (COPIED),
    # and the dirty bit set.
    dir_off = struct.unpack(">Q", d[p + 24:p + 32])[0]
    table = struct.unpack(">Q", d[dir_off:dir_off + 8])[0]
    data = struct.unpack(">Q", d[table:table + 8])[0] & 0x00fffffffffffe00
    l1 = struct.unpack(">Q", d[40:48])[0]
    l2 = struct.unpack(">Q", d[l1:l1 + 8])[0] & 0x00fffffffffffe00
    assert data != 0 and l2 != 0
    d[l2 + 8 * value:l2 + 8 * value + 8] = struct.pack(">Q", data | 1 << 63)
    d[79] |= 1
else:
    sys.exit("unknown field " + field)
open(f, "wb").write(d)
PYEOF

# autoclear IMG: the header's autoclear bitmaps bit (0 or 1).
autoclear ()
{
    $PY -c 'import sys; print(open(sys.argv[1], "rb").read()[95] & 1)' "$1"
}

# hostile NAME FIELD VALUE
hostile ()
{
    local img=$1.qcow2
    cp base.qcow2 $img
    $PY patch.py $img $2 $3
    [ "$(autoclear $img)" = 1 ] || fail "$1: autoclear bit not set before"
    serve_run file=$img --run 'nbdsh -u "$uri" -c "h.pwrite(b\"w\" * 512, 0)"' \
        2> $1.log || {
        cat $1.log >&2
        fail "$1: the image was not served"
    }
    grep -q "cannot be kept" $1.log ||
        fail "$1: no message that the bitmaps cannot be kept"
    [ "$(autoclear $img)" = 0 ] ||
        fail "$1: autoclear bit still set after a write"
    qcheck_leaks_ok $img >/dev/null
    echo "$1: served, bitmaps dropped"
}

hostile nb-huge nb_bitmaps 0x7fffffff
hostile nb-over-dir nb_bitmaps 3
hostile nb-over-max nb_bitmaps 65536

img=shared.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on $img 4M
qemu-img bitmap --add -g 4096 $img b
qemu-io -f qcow2 -c "write -P 0x11 0 4k" $img >/dev/null
$PY patch.py $img share 1
qemu-io -r -f qcow2 -c "read -v 4096 4096" $img | grep "^0" > before
serve_run file=$img --run 'nbdsh -u "$uri" -c "h.pwrite(b\"w\" * 4096, 1 << 20)"' \
    2> shared.log || {
    cat shared.log >&2
    fail "shared: the image was not served"
}
qemu-io -r -f qcow2 -c "read -v 4096 4096" $img | grep "^0" > after
cmp -s before after || {
    diff before after | head >&2
    fail "shared: guest cluster 1 (the bitmap's data cluster) changed"
}
grep -q "cannot be kept" shared.log ||
    fail "shared: no message that the bitmaps cannot be kept"
[ "$(autoclear $img)" = 0 ] || fail "shared: autoclear bit still set"
echo "shared: bitmaps dropped after the repair, guest data intact"
