#!/usr/bin/env bash
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# The incremental backup recipe of the man page, end to end: a full
# backup (nbdcopy into an image made with create=true), then four
# rounds of writes, zeroes and trims through the plugin over two
# connections, each followed by an incremental backup of the bitmap
# export's dirty ranges (tools/incremental-backup.py) into a new
# overlay made with create=true backing=PREVIOUS.  Checkpoints are
# started between server runs: after rounds 1 and 3 with a new bitmap
# (qemu-img bitmap --add, the old one removed), after round 2 by
# clearing the bitmap (--clear).  After each round the restored chain is qemu-img
# compare-equal to the disk at that point (and the older ones still
# are at the end), and backup-check.py, from nbdkit's log of the
# destination, checks that the backup wrote every byte of the dirty
# set (the requests rounded out to the bitmap's granularity) once and
# nothing else, as zero requests exactly where the disk reads as zero.
# Round 4 is the live variant: the checkpoint is an internal snapshot
# and the bitmap disabled at that moment, and the copy (--data, from
# the snapshot's export) runs while a client overwrites the whole disk.

source ./functions.sh
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires /usr/bin/python3 -c 'import nbd'

backup=$abs_top_srcdir/tools/incremental-backup.py
check=$abs_top_srcdir/tests/backup-check.py
size=$((8 * 1024 * 1024))
disk=$tmpdir/disk.qcow2
qemu-img create -q -f qcow2 "$disk" $size
qemu-io -c 'write -P 0x11 0 6M' -c 'write -P 0x12 7M 512k' "$disk" >/dev/null
qemu-img bitmap --add "$disk" ckpt1

# Full backup: the disk served read-only, copied into a new image.
export tmpdir disk
serve_run file="$disk" readonly=true --run '
  nbdcopy -- "$uri" [ nbdkit "$PLUGIN" file="$tmpdir/full.qcow2" \
                     create=true size=8M ]
'
qemu-img compare -q "$tmpdir/full.qcow2" "$disk" ||
    fail "full backup differs from the disk"

# run_ops ROUND: make the requests in ops.ROUND ("w|z|t OFFSET LENGTH"),
# alternating between two connections, through the plugin.
run_ops ()
{
    local ops=$tmpdir/ops.$1
    export ops
    serve_run file="$disk" --run '
      nbdsh -u "$uri" -c "
h2 = nbd.NBD()
h2.connect_uri(\"$uri\")
for i, line in enumerate(open(\"$ops\")):
    op, off, n = line.split()
    off, n = int(off, 0), int(n, 0)
    c = (h, h2)[i % 2]
    if op == \"w\":
        c.pwrite(bytes([0x20 + i]) * n, off)
    elif op == \"z\":
        c.zero(n, off)
    else:
        c.trim(n, off)
h2.flush()
h2.shutdown()
h.flush()
"
      # The plugin holds the writer lock: qemu-img cannot start a
      # checkpoint now (it must run between server runs).
      if qemu-img bitmap --add "$disk" too-soon 2>/dev/null; then
          echo "qemu-img changed the bitmaps of a served image" >&2
          exit 1
      fi
    '
}

# backup ROUND BITMAP PREVIOUS: incremental backup of BITMAP's dirty
# ranges into inc.ROUND.qcow2 on PREVIOUS, checked.
backup ()
{
    local r=$1 bitmap=$2 prev=$3
    qemu-img convert -O raw "$disk" "$tmpdir/ref.$r"
    export r bitmap prev backup
    rm -f "$tmpdir/log.$r"
    serve_run file="$disk" readonly=true --run '
      src="nbd+unix:///bitmap:$bitmap?socket=$unixsocket"
      export src
      nbdkit -U - --filter=log "$PLUGIN" file="$tmpdir/inc.$r.qcow2" \
             create=true backing="$prev" backing-format=qcow2 \
             logfile="$tmpdir/log.$r" \
             --run "/usr/bin/python3 \"\$backup\" -v \"\$src\" \"\$uri\"" \
             > "$tmpdir/dirty.$r"
    '
    verify $r
}

# verify ROUND: the checks of a backup.
verify ()
{
    local r=$1
    cat "$tmpdir/dirty.$r"
    /usr/bin/python3 "$check" $size 65536 "$tmpdir/ops.$r" "$tmpdir/log.$r" \
        "$tmpdir/ref.$r" "$tmpdir/dirty.$r"
    qemu-img compare -q "$tmpdir/inc.$r.qcow2" "$tmpdir/ref.$r" ||
        fail "round $r: restored chain differs from the disk"
    qcheck "$tmpdir/inc.$r.qcow2"
    qcheck "$disk"
}

# Round 1: unaligned and aligned writes, a zero over data, a trim.
cat > "$tmpdir/ops.1" <<EOF
w 102400 10240
w 0x200000 0x20000
z 0x401000 102400
t 0x500000 0x40000
EOF
run_ops 1
backup 1 ckpt1 full.qcow2
# The next checkpoint: a new bitmap, the old one dropped.
qemu-img bitmap --remove "$disk" ckpt1
qemu-img bitmap --add "$disk" ckpt2

# Round 2: the previous backup has data under the zeroed range, which
# the overlay must hide.
cat > "$tmpdir/ops.2" <<EOF
w 0x700000 5000
z 0 0x10000
w 0x300000 1
w 0x7ff000 0x1000
EOF
run_ops 2
backup 2 ckpt2 inc.1.qcow2
# The next checkpoint: the same bitmap, cleared.
qemu-img bitmap --clear "$disk" ckpt2

# Round 3: a trim of what round 1 wrote; data over round 2's zeroes.
cat > "$tmpdir/ops.3" <<EOF
t 0x200000 0x10000
w 0x6000 0x18000
z 0x7f0000 0x10000
w 0x600000 0x100000
EOF
run_ops 3
backup 3 ckpt2 inc.2.qcow2

# The next checkpoint: a new bitmap again.
qemu-img bitmap --remove "$disk" ckpt2
qemu-img bitmap --add "$disk" ckpt4

# Round 4, live: the checkpoint is an internal snapshot (the data to
# copy) and the bitmap disabled at that moment, a new bitmap tracks
# what comes after, and the copy runs while a client writes the disk.
cat > "$tmpdir/ops.4" <<EOF
w 0x10000 0x30000
z 0x600000 0x20000
t 0x700000 0x10000
EOF
run_ops 4
qemu-img snapshot -c backup4 "$disk"
qemu-img bitmap --disable "$disk" ckpt4
qemu-img bitmap --add "$disk" ckpt5
qemu-img convert -l snapshot.name=backup4 -O raw "$disk" "$tmpdir/ref.4"
serve_run file="$disk" --run '
  set -e
  src="nbd+unix:///bitmap:ckpt4?socket=$unixsocket"
  data="nbd+unix:///backup4?socket=$unixsocket"
  export src data
  # The writer overwrites the whole disk, 1 MiB at a time, until the
  # copy is done.
  nbdsh -u "$uri" -c "
import os, time
i = 0
while i < 8 or not os.path.exists(\"$tmpdir/stop\"):
    h.pwrite(bytes([0xe0 + i % 16]) * 1048576, (i % 8) * 1048576)
    time.sleep(0.01)
    if i == 8:
        open(\"$tmpdir/started\", \"w\").close()
    i += 1
h.flush()
print(\"writer: %d MiB written\" % i)
" &
  writer=$!
  while [ ! -f "$tmpdir/started" ]; do sleep 0.1; done
  nbdkit -U - --filter=log "$PLUGIN" file="$tmpdir/inc.4.qcow2" \
         create=true backing=inc.3.qcow2 backing-format=qcow2 \
         logfile="$tmpdir/log.4" \
         --run "/usr/bin/python3 \"\$backup\" -v --data \"\$data\" \"\$src\" \"\$uri\"" \
         > "$tmpdir/dirty.4"
  touch "$tmpdir/stop"
  wait $writer
'
if qemu-img compare -q "$disk" "$tmpdir/ref.4"; then
    fail "round 4: the writer did not write while the backup ran"
fi
verify 4
qemu-img snapshot -d backup4 "$disk"
qemu-img bitmap --remove "$disk" ckpt4
qcheck "$disk"

# Later backups changed nothing in the earlier ones.
for r in 1 2 3; do
    qemu-img compare -q "$tmpdir/inc.$r.qcow2" "$tmpdir/ref.$r" ||
        fail "restored chain of round $r changed later"
done
