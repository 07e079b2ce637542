#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# Dirty bitmaps as exports ("bitmap:NAME"), on bitmaps QEMU made and
# set: for a 64 KiB, a 4 KiB, a disabled and a later bitmap, block
# status is exactly qemu-nbd -B's qemu:dirty-bitmap map (dirty = data,
# clean = hole+zero), and the export reads as the active image in the
# dirty ranges and as zeroes elsewhere; it is read-only.  nbdinfo
# --list shows each consistent bitmap, not the one left in use by a
# crash, which is refused with a clear message, as is an unknown name.
# A snapshot named "bitmap:..." is listed and found under its ID, and
# the export of that name is the bitmap.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdinfo --version

img=$tmpdir/bm.qcow2
qemu-img create -q -f qcow2 "$img" 4M
qemu-io -c 'write -P 0x11 0 4M' "$img" >/dev/null
qemu-img snapshot -c 'bitmap:b64' "$img"
qemu-img bitmap --add "$img" b64
qemu-img bitmap --add -g 4096 "$img" b4k
qemu-img bitmap --add "$img" off
qemu-io -c 'write -P 0x22 102400 10240' -c 'write -z 1M 4k' \
        -c 'discard 2M 64k' -c 'write -P 0x23 3000000 1' "$img" >/dev/null
qemu-img bitmap --disable "$img" off
qemu-img bitmap --add "$img" late
qemu-io -c 'write -P 0x33 3M 8k' -c 'write -P 0x34 1200k 4k' "$img" >/dev/null

# A second image whose only enabled bitmap was in use when qemu-io
# died, and a consistent one added afterwards.
crashed=$tmpdir/crashed.qcow2
qemu-img create -q -f qcow2 "$crashed" 1M
qemu-img bitmap --add "$crashed" torn
( qemu-io -c 'write 0 4k' -c abort "$crashed" || : ) >/dev/null 2>&1
[ "$(bitmaps_in_use "$crashed")" = torn ] ||
    fail "qemu-io abort did not leave bitmap torn in use"
qemu-img bitmap --add "$crashed" fresh

# "$list", run with nbdsh --opt-mode: the names and descriptions the
# server lists, as JSON in $OUT (nbdinfo --list would leave out the
# exports it cannot open).
list=$tmpdir/list.py
cat > "$list" <<'EOF'
import json, os
names = {}
h.opt_list(lambda n, d: names.__setitem__(n, d))
json.dump(names, open(os.environ["OUT"], "w"))
EOF
export list

# qemu-nbd's dirty map of each bitmap: "start end" of dirty ranges.
for b in b64 b4k off late; do
    nbdinfo --map=qemu:dirty-bitmap:$b --json -- \
        [ qemu-nbd -r -f qcow2 -B $b "$img" ] > "$tmpdir/qemu.$b"
done
qemu-img convert -O raw "$img" "$tmpdir/active.raw"

export tmpdir
serve_run file="$img" --run '
  set -e
  OUT=$tmpdir/list nbdsh --opt-mode -u "$uri" -c "exec(open(\"$list\").read())"
  for b in b64 b4k off late; do
    u="nbd+unix:///bitmap:$b?socket=$unixsocket"
    nbdinfo --map --json "$u" > "$tmpdir/ours.$b"
    nbdcopy "$u" "$tmpdir/read.$b"
  done
  nbdsh -u "nbd+unix:///bitmap:b64?socket=$unixsocket" -c "
assert h.is_read_only()
assert h.get_size() == 4 * 1024 * 1024
try:
    h.pwrite(b\"x\", 0)
except nbd.Error:
    pass
else:
    raise AssertionError(\"write to a bitmap export succeeded\")
"
  # The snapshot named bitmap:b64 is served as its ID.
  nbdcopy "nbd+unix:///1?socket=$unixsocket" "$tmpdir/snap"
  if nbdinfo --size "nbd+unix:///bitmap:nope?socket=$unixsocket" \
       2>/dev/null; then
    echo "an unknown bitmap was served" >&2
    exit 1
  fi
' 2>"$tmpdir/err1" || { cat "$tmpdir/err1"; fail "serving $img failed"; }
grep -q "no bitmap named 'nope'" "$tmpdir/err1" ||
    { cat "$tmpdir/err1"; fail "no clear error for an unknown bitmap"; }

/usr/bin/python3 - "$tmpdir" <<'EOF'
import json, sys
from ranges import merge                # tests/ranges.py
d = sys.argv[1]

def dirty(path, is_dirty):
    return merge([(e["offset"], e["offset"] + e["length"])
                  for e in json.load(open(path)) if is_dirty(e["type"])])

active = open(d + "/active.raw", "rb").read()
for b in ["b64", "b4k", "off", "late"]:
    theirs = dirty(d + "/qemu." + b, lambda t: t == 1)
    ours = dirty(d + "/ours." + b, lambda t: t == 0)
    for e in json.load(open(d + "/ours." + b)):
        assert e["type"] in (0, 3), (b, e)
    assert ours == theirs, (b, ours, theirs)
    assert ours, b
    # Reads: the active image in dirty ranges, zeroes elsewhere.
    expect = bytearray(len(active))
    for a, e in ours:
        expect[a:e] = active[a:e]
    assert open(d + "/read." + b, "rb").read() == expect, b
    print(b, "dirty:", ours)

exports = json.load(open(d + "/list"))
for b in ["b64", "b4k", "off", "late"]:
    assert "bitmap:" + b in exports, exports
assert "disabled" in exports["bitmap:off"], exports
assert "granularity 4096" in exports["bitmap:b4k"], exports
assert "1" in exports and "bitmap:b64" in exports, exports
assert "snapshot" in exports["1"] and "bitmap" in exports["bitmap:b64"]
EOF
qemu-img convert -l snapshot.id=1 -O raw "$img" "$tmpdir/snap.ref"
cmp "$tmpdir/snap" "$tmpdir/snap.ref" ||
    fail "export 1 is not the snapshot named bitmap:b64"

# The bitmap left in use by a crash: not listed, refused; the one
# added after it is served.
serve_run file="$crashed" readonly=true --run '
  set -e
  OUT=$tmpdir/list2 nbdsh --opt-mode -u "$uri" -c "exec(open(\"$list\").read())"
  nbdinfo --size "nbd+unix:///bitmap:fresh?socket=$unixsocket" >/dev/null
  if nbdinfo --size "nbd+unix:///bitmap:torn?socket=$unixsocket" \
       2>/dev/null; then
    echo "a bitmap in use was served" >&2
    exit 1
  fi
' 2>"$tmpdir/err.torn" || { cat "$tmpdir/err.torn"; fail "serving $crashed failed"; }
grep -q '"bitmap:fresh":' "$tmpdir/list2" || fail "bitmap:fresh not listed"
if grep -q '"bitmap:torn":' "$tmpdir/list2"; then
    fail "the inconsistent bitmap is listed"
fi
grep -q "bitmap 'torn' is inconsistent" "$tmpdir/err.torn" ||
    { cat "$tmpdir/err.torn"; fail "no clear error for a bitmap in use"; }
