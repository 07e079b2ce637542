#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# check=report and check=repair on damaged images: our findings
# (corruptions, leaks) must agree with qemu-img check's, report must not
# change the file, and after repair qemu-img check is clean and the data
# is intact.  One image has a persistent bitmap (bitmap-leak): its
# directory, table and data clusters count as used, as for qemu-img.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version

py=/usr/bin/python3

# damage IMG KIND: patch refcounts / L2 entries with python.
damage ()
{
  "$py" - "$1" "$2" <<'PYEOF'
import struct, sys
path, kind = sys.argv[1], sys.argv[2]
f = open(path, "r+b")
h = f.read(104)
cb = struct.unpack(">I", h[20:24])[0]
l1off = struct.unpack(">Q", h[40:48])[0]
rt = struct.unpack(">Q", h[48:56])[0]
f.seek(rt); rb = struct.unpack(">Q", f.read(8))[0]
f.seek(l1off); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
def setref(c, v):
    f.seek(rb + 2 * c); f.write(struct.pack(">H", v))
def l2e(i):
    f.seek(l2 + 8 * i); return struct.unpack(">Q", f.read(8))[0]
data0 = (l2e(0) & 0x00fffffffffffe00) >> cb
import os
nclusters = os.path.getsize(path) >> cb
def getref(c):
    f.seek(rb + 2 * c); return struct.unpack(">H", f.read(2))[0]
free = [c for c in range(nclusters) if getref(c) == 0]
if kind == "leak":
    setref(free[0], 1); setref(free[1], 1)
elif kind == "refcount-zero":
    setref(data0, 0)
elif kind == "refcount-high":
    setref(data0, 2)            # one leak and a COPIED flag now wrong
elif kind == "copied-clear":
    f.seek(l2); f.write(struct.pack(">Q", l2e(0) & ~(1 << 63)))
elif kind == "l1-copied-clear":
    f.seek(l1off); e = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1off); f.write(struct.pack(">Q", e & ~(1 << 63)))
elif kind == "mixed":
    setref(free[0], 3); setref(data0, 0)
PYEOF
}

for kind in leak refcount-zero refcount-high copied-clear l1-copied-clear mixed \
    bitmap-leak; do
  img=$tmpdir/$kind.qcow2
  qemu-img create -q -f qcow2 "$img" 32M
  # A persistent bitmap: the writes below give it a directory, a table
  # and a data cluster, which are in use (no leaks, no corruption).
  case $kind in
    bitmap-*) qemu-img bitmap --add "$img" b0 ;;
  esac
  # The discarded megabyte leaves free clusters inside the file.
  qemu-io -c 'write -P 0x61 0 1M' -c 'write -P 0x63 4M 1M' \
          -c 'write -P 0x62 8M 64k' -c 'discard 4M 1M' "$img" >/dev/null
  damage "$img" "${kind#bitmap-}"
  qemu-img check --output=json "$img" > "$tmpdir/q.json" 2>/dev/null || :
  read -r qc ql < <("$py" -c '
import json, sys
j = json.load(open(sys.argv[1]))
print(j.get("corruptions", 0), j.get("leaks", 0))' "$tmpdir/q.json")
  [ $((qc + ql)) -gt 0 ] || fail "$kind: qemu-img finds no damage (test broken)"

  sum=$(md5sum < "$img")
  nbdkit -r -U - "$PLUGIN" file="$img" check=report --run 'nbdinfo --size "$uri"' \
    >/dev/null 2>"$tmpdir/err" || fail "$kind: check=report failed to start"
  [ "$(md5sum < "$img")" = "$sum" ] || fail "$kind: check=report changed the file"
  line=$(grep 'check: ' "$tmpdir/err" || :)
  oc=$(sed -n 's/.*check: \([0-9]*\) corruptions.*/\1/p' <<< "$line")
  ol=$(sed -n 's/.* \([0-9]*\) leaked clusters.*/\1/p' <<< "$line")
  [ "${oc:-x}" = "$qc" ] && [ "${ol:-x}" = "$ql" ] ||
    fail "$kind: we found ${oc:-?} corruptions ${ol:-?} leaks, qemu-img $qc/$ql: $line"

  nbdkit -U - "$PLUGIN" file="$img" check=repair --run 'nbdinfo --size "$uri"' \
    >/dev/null 2>"$tmpdir/err" || fail "$kind: check=repair failed: $(cat "$tmpdir/err")"
  qcheck "$img"
  qemu-io -r -c 'read -P 0x61 0 1M' -c 'read -P 0x62 8M 64k' "$img" |
    grep -q 'Pattern verification failed' && fail "$kind: data damaged by repair"
  echo "$kind: qemu-img $qc corruptions $ql leaks, ours the same; repaired clean"
done
