#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# Internal snapshots as NBD exports: nbdinfo --list shows the active
# image ("") and every snapshot with its ID, date and size; a snapshot
# export reads exactly what qemu-img convert -l gives, is read-only, and
# keeps its own size when the image was resized after it was taken;
# the active export stays writable next to it; snapshot=NAME serves one
# snapshot only; an unknown snapshot is refused at start.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version
requires nbdinfo --version

img=$tmpdir/snap.qcow2
qemu-img create -q -f qcow2 "$img" 32M
qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x12 20M 64k' "$img" >/dev/null
qemu-img snapshot -c first "$img"
qemu-io -c 'write -P 0x22 0 512k' "$img" >/dev/null
qemu-img resize -q "$img" 48M
qemu-io -c 'write -P 0x23 40M 1M' "$img" >/dev/null
qemu-img snapshot -c second "$img"
qemu-io -c 'write -P 0x33 0 4k' "$img" >/dev/null

for s in first second; do
  qemu-img convert -l snapshot.name=$s -O raw "$img" "$tmpdir/$s.ref"
done
# qemu-img 7.2 converts a snapshot at the image's current size (48M);
# the snapshot itself is 32M, which is what the export must show.  The
# tail qemu-img adds must be zeroes.
cmp -n $((16 * 1024 * 1024)) -i $((32 * 1024 * 1024)) "$tmpdir/first.ref" \
    /dev/zero || fail "qemu-img's view of snapshot first has data past 32M"
truncate -s 32M "$tmpdir/first.ref"
qemu-img convert -O raw "$img" "$tmpdir/active.ref"

export tmpdir
nbdkit -U - "$PLUGIN" file="$img" --run '
  set -e
  nbdinfo --list "$uri" > "$tmpdir/list"
  nbdcopy "nbd+unix:///first?socket=$unixsocket" "$tmpdir/first.out"
  nbdcopy "nbd+unix:///2?socket=$unixsocket" "$tmpdir/second.out"
  qemu-img convert -O raw "nbd+unix:///second?socket=$unixsocket" \
    "$tmpdir/second.qemu"
  nbdsh -u "nbd+unix:///first?socket=$unixsocket" -c "
assert h.is_read_only()
assert h.get_size() == 32 * 1024 * 1024
try:
    h.pwrite(b\"x\", 0)
except nbd.Error:
    pass
else:
    raise AssertionError(\"write to a snapshot export succeeded\")
"
  nbdsh -u "$uri" -c "
assert not h.is_read_only()
assert h.get_size() == 48 * 1024 * 1024
h.pwrite(b\"\x44\" * 4096, 8192)
h.flush()
"
  nbdcopy "nbd+unix:///first?socket=$unixsocket" "$tmpdir/first.after"
' || fail "serving snapshots failed"

cat "$tmpdir/list"
grep -q '^export="":' "$tmpdir/list" || fail "active export not listed"
grep -q '^export="first":' "$tmpdir/list" || fail "snapshot first not listed"
grep -q '^export="second":' "$tmpdir/list" || fail "snapshot second not listed"
grep -q 'snapshot ID 1, taken .* size 33554432' "$tmpdir/list" ||
  fail "snapshot first: description lacks ID, date or size"
grep -q 'snapshot ID 2, taken .* size 50331648' "$tmpdir/list" ||
  fail "snapshot second: description lacks ID, date or size"
cmp "$tmpdir/first.ref" "$tmpdir/first.out" || fail "snapshot first differs"
cmp "$tmpdir/second.ref" "$tmpdir/second.out" ||
  fail "snapshot second (by ID) differs"
cmp "$tmpdir/second.ref" "$tmpdir/second.qemu" ||
  fail "snapshot second via qemu-img convert differs"
cmp "$tmpdir/first.ref" "$tmpdir/first.after" ||
  fail "snapshot first changed after a write to the active image"
qcheck "$img"
qemu-img convert -l snapshot.name=first -O raw "$img" "$tmpdir/first.final"
truncate -s 32M "$tmpdir/first.final"
cmp "$tmpdir/first.ref" "$tmpdir/first.final" ||
  fail "snapshot first damaged on disk"

# snapshot=NAME: the only export, read-only.
nbdkit -U - "$PLUGIN" file="$img" snapshot=first --run '
  set -e
  nbdinfo --list "$uri" > "$tmpdir/list1"
  nbdcopy "$uri" "$tmpdir/first.param"
' || fail "snapshot=first failed"
[ "$(grep -c '^export=' "$tmpdir/list1")" = 1 ] ||
  fail "snapshot=first lists more than one export"
cmp "$tmpdir/first.ref" "$tmpdir/first.param" || fail "snapshot=first differs"

if nbdkit -U - "$PLUGIN" file="$img" snapshot=nosuch --run true \
     2>"$tmpdir/err"; then
  fail "unknown snapshot accepted"
fi
grep -q "no snapshot with name or ID 'nosuch'" "$tmpdir/err" ||
  fail "unknown snapshot: unclear message: $(cat "$tmpdir/err")"
echo "snapshot exports ok"
