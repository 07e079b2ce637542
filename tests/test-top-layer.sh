#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# top-layer=true serves the top image of a backing chain alone, like
# qemu's json:{"backing": null}: on a chain base <- mid <- top with data
# in all three, block status shows only top's clusters as data (its
# zero cluster as zero, the rest hole+zero), base-only and mid-only
# ranges read as zeroes, and the export is qemu-img compare-equal to
# qemu-img's own top-only view; the same with extended L2 entries,
# where a partly written cluster is data only in its written
# subclusters.  The export is read-only (also with readonly=false) and
# the image locked only as a reader (QEMU may read it meanwhile), and
# the backing file is not opened at all: not locked (QEMU may write
# it meanwhile), and a missing one is no error.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version
requires nbdinfo --version

topview ()
{
    printf 'json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"%s"}}' "$1"
}

base=$tmpdir/base.qcow2
mid=$tmpdir/mid.qcow2
top=$tmpdir/top.qcow2
qemu-img create -q -f qcow2 "$base" 4M
qemu-io -c 'write -P 0xaa 0 4M' "$base" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$mid"
qemu-io -c 'write -P 0xdd 512k 256k' "$mid" >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$top"
# 0xbb: two whole clusters; 0xcc: 4k inside the cluster at 3M (the
# rest of that cluster is copied from base: data of top's own); a zero
# cluster over base's data.
qemu-io -c 'write -P 0xbb 1M 128k' -c 'write -P 0xcc 3149824 4k' \
        -c 'write -z 2M 64k' "$top" >/dev/null
qemu-img convert -O raw "$(topview "$top")" "$tmpdir/top.ref"

export tmpdir
serve_run file="$top" top-layer=true readonly=false --run '
  set -e
  nbdinfo --map --json "$uri" > "$tmpdir/map"
  nbdinfo --list "$uri" > "$tmpdir/list"
  qemu-img compare -f raw -F raw "$uri" "$tmpdir/top.ref"
  nbdsh -u "$uri" -c "
assert h.is_read_only()
assert h.get_size() == 4 * 1024 * 1024
# base-only and mid-only ranges: zeroes
assert h.pread(65536, 0) == bytes(65536)
assert h.pread(256 * 1024, 512 * 1024) == bytes(256 * 1024)
assert h.pread(65536, 2 * 1024 * 1024) == bytes(65536)
# top data; the copied part of the partly written cluster is base data
assert h.pread(128 * 1024, 1024 * 1024) == b\"\xbb\" * 128 * 1024
assert h.pread(4096, 3149824) == b\"\xcc\" * 4096
assert h.pread(4096, 3145728) == b\"\xaa\" * 4096
try:
    h.pwrite(b\"x\", 0)
except nbd.Error:
    pass
else:
    raise AssertionError(\"write to a top-layer export succeeded\")
"
  # A reader lock only, on top alone: QEMU can read top, and write mid.
  qemu-io -r -c "read 0 4k" "$tmpdir/top.qcow2" >/dev/null
  qemu-io -c "write -P 0xdd 512k 4k" "$tmpdir/mid.qcow2" >/dev/null
'
grep -q 'top layer only' "$tmpdir/list" ||
    fail "the export's description does not say top layer only"
# Data: top's three clusters; zero: its zero cluster; the rest holes.
expect='0 1048576 3
1048576 131072 0
1179648 917504 3
2097152 65536 2
2162688 983040 3
3145728 65536 0
3211264 983040 3'
got=$(sed -n 's/.*"offset": \([0-9]*\), "length": \([0-9]*\), "type": \([0-9]*\).*/\1 \2 \3/p' "$tmpdir/map")
[ "$got" = "$expect" ] || {
    echo "map:"; cat "$tmpdir/map"
    fail "top-layer map is not top's clusters alone"
}

# The whole chain, without top-layer, reads base's and mid's data:
# what the checks above would see if top-layer did nothing.
serve_run file="$top" readonly=true --run '
  nbdsh -u "$uri" -c "
assert h.pread(4096, 0) == b\"\xaa\" * 4096
assert h.pread(4096, 512 * 1024) == b\"\xdd\" * 4096
"
'

# Extended L2: a 4k write to a new cluster allocates two 2k subclusters
# only; the others are unallocated, zero and holes in the top layer.
xtop=$tmpdir/xtop.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 "$xtop"
qemu-io -c 'write -P 0xee 1052672 4k' "$xtop" >/dev/null
qemu-img convert -O raw "$(topview "$xtop")" "$tmpdir/xtop.ref"
serve_run file="$xtop" top-layer=true --run '
  set -e
  nbdinfo --map --json "$uri" > "$tmpdir/xmap"
  qemu-img compare -f raw -F raw "$uri" "$tmpdir/xtop.ref"
'
expect='0 1052672 3
1052672 4096 0
1056768 3137536 3'
got=$(sed -n 's/.*"offset": \([0-9]*\), "length": \([0-9]*\), "type": \([0-9]*\).*/\1 \2 \3/p' "$tmpdir/xmap")
[ "$got" = "$expect" ] || {
    echo "map:"; cat "$tmpdir/xmap"
    fail "top-layer map of an extended L2 image is not its subclusters"
}

# The backing file is never opened: without it the top layer is still
# served (and the chain is not).
mv "$base" "$tmpdir/elsewhere.qcow2"
serve_run file="$xtop" top-layer=true --run '
  qemu-img compare -f raw -F raw "$uri" "$tmpdir/xtop.ref"
'
if serve_run file="$xtop" readonly=true --run true 2>"$tmpdir/err"; then
    fail "the chain was served without its backing file"
fi
grep -q 'cannot open backing file' "$tmpdir/err" ||
    { cat "$tmpdir/err"; fail "unexpected error without the backing file"; }
mv "$tmpdir/elsewhere.qcow2" "$base"

qcheck "$top"
qcheck "$xtop"
