#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# An image left dirty by QEMU (lazy refcounts, then abort: refcounts on
# disk are stale, qemu-img check reports errors) opens writable after
# the plugin rebuilds its refcounts, and then checks clean.  Opened
# read-only, the same image is served as it is and left untouched.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version

img=$tmpdir/dirty.qcow2
make_dirty ()
{
  rm -f "$img"
  qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=$1 "$img" 64M
  # qemu-io aborts on purpose; the shell's "Aborted" message is expected.
  ( qemu-io -c 'write -P 0x5a 0 3M' -c 'write -P 0x5b 10M 100k' \
            -c flush -c abort "$img" ) >/dev/null 2>&1 || :
  qemu-img info "$img" | grep -q 'lazy refcounts: true' ||
    fail "test image lost lazy refcounts"
  if qemu-img check "$img" >/dev/null 2>&1; then
    fail "qemu-io abort did not leave a dirty image (check is clean)"
  fi
}

for cs in 65536 512; do
  # Read-only: served as it is, file untouched.
  make_dirty $cs
  sum=$(md5sum < "$img")
  nbdkit -r -U - "$PLUGIN" file="$img" --run 'nbdsh -u "$uri" -c "
assert h.pread(4096, 0) == b\"\x5a\" * 4096
assert h.pread(4096, 10 * 1024 * 1024) == b\"\x5b\" * 4096
"' || fail "cluster $cs: reading the dirty image read-only failed"
  [ "$(md5sum < "$img")" = "$sum" ] ||
    fail "cluster $cs: a read-only open changed the dirty image"

  # Writable: repaired at open, then written, then clean.
  nbdkit -U - "$PLUGIN" file="$img" --run 'nbdsh -u "$uri" -c "
assert h.pread(4096, 0) == b\"\x5a\" * 4096
h.pwrite(b\"\x78\" * 5000, 20 * 1024 * 1024)
h.pwrite(b\"\x79\" * 512, 1024 * 1024 + 7)
h.flush()
"' || fail "cluster $cs: writing the dirty image failed"
  qcheck "$img"
  qemu-io -r -c 'read -P 0x5a 0 1M' -c 'read -P 0x79 1048583 512' \
          -c 'read -P 0x5b 10M 100k' -c 'read -P 0x78 20M 5000' "$img" |
    grep -q 'Pattern verification failed' &&
    fail "cluster $cs: data wrong after repair"
  qemu-img info "$img" | grep -q 'corrupt: false' ||
    fail "cluster $cs: image not clean after repair"
  echo "cluster $cs: dirty image repaired and written"
done
