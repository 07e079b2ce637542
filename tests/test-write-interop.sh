#!/usr/bin/env bash
# nbdkit-qcow2: what the plugin writes, QEMU must read, and what QEMU
# writes over the plugin's work, the plugin must read (and overwrite).
#
# For each image of a small matrix (64 KiB, 512 B and 2 MiB clusters,
# compat=0.10, refcount_bits=1, extended L2, a compressed image, a qcow2
# backing file, an external data file) the two sides take turns, three
# rounds each:
#
#   plugin turn: nbdsh reads the whole export and compares it with the
#                model (so it checks what qemu-io wrote last), then does
#                ~60 writes of one-byte patterns (unaligned, crossing
#                cluster and L2-table boundaries and the end of the disk,
#                some FUA) and zeroes (with and without NO_HOLE, some
#                cluster aligned so that the zero flag or deallocation is
#                used), applied to the model too;
#   check:       qemu-img check must exit 0 (leaks fail);
#   qemu turn:   `qemu-io -r` checks the whole disk against the model
#                with one `read -P 0xNN OFF LEN` per run of equal bytes,
#                then qemu-io writes (write -P, write -z, write -z -u,
#                compressed `write -c` of whole clusters (after discarding
#                them: qemu compresses only into clusters without a host
#                cluster), and discard of whole clusters where it must
#                read as zeroes), applied to
#                the model;
#   check:       qemu-img check must exit 0.
#
# Every write is of a single byte value, so the model is a list of runs
# and a mismatch names the run (offset, length, expected byte).
# The model does not depend on what the plugin or qemu do (a mismatch
# fails the test), so one model.py run per image computes every turn's
# operations and expected contents in advance, as raw files and command
# lists, before the first turn.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires /usr/bin/python3 --version

# Python here allocates and frees buffers of megabytes all the time,
# which glibc maps and unmaps each time: the page faults cost more CPU
# than the work.  These keep such buffers in the heap, for the python
# processes only (nbdkit runs with the environment it always has).
PYENV="env MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864"
PY="$PYENV /usr/bin/python3"
MiB=$((1024*1024))
cd "$tmpdir"

#----------------------------------------------------------------------
# model.py IMG-RAW ROUNDS SEED CS L2COV DISCARD_OK COMPRESS_OK: starting
# from the contents IMG-RAW, for each round R (1..ROUNDS), with the
# round's seed SEED * 10 + R:
#   model-R.raw      the expected contents before the plugin's turn
#   ops-R.txt        the plugin turn's operations (applied to the model)
#   qemu-read-R.txt  "read -P" commands of the whole model after them
#   qemu-write-R.txt the qemu turn's commands (applied to the model)
# and model-final.raw, the expected contents after the last round.
# (This was one process per step: loading and saving the 16-32 MiB
# model each time, and finding runs with a back-reference regex, cost
# more CPU than the rest of the test.)
cat > model.py <<'EOF'
import random, re, sys

def pick(rng, size, cs, l2cov):
    r = rng.random()
    if r < 0.3:
        base = rng.randrange(0, size // cs + 1) * cs
    elif r < 0.45:
        base = rng.randrange(0, size // l2cov + 1) * l2cov
    elif r < 0.55:
        base = size
    else:
        base = rng.randrange(0, size)
    off = base + rng.randint(-cs - 100, cs + 100)
    off = min(max(off, 0), size - 1)
    r = rng.random()
    if r < 0.4:
        n = rng.randint(1, 1000)
    else:
        n = rng.randint(1, 3 * cs + 1000)
    return off, max(1, min(n, size - off))

def plugin_ops(m, seed, cs, l2cov, path):
    rng = random.Random(seed)
    size = len(m)
    with open(path, "w") as f:
        for i in range(60):
            r = rng.random()
            if r < 0.6:
                off, n = pick(rng, size, cs, l2cov)
                pat = rng.randrange(1, 256)
                fua = int(rng.random() < 0.2)
                f.write("write %d %d %d %d\n" % (pat, off, n, fua))
                m[off:off+n] = bytes([pat]) * n
            else:
                if rng.random() < 0.5:
                    off = rng.randrange(0, (size + cs - 1) // cs) * cs
                    n = min(size - off, rng.randint(1, 4) * cs)
                else:
                    off, n = pick(rng, size, cs, l2cov)
                nohole = int(rng.random() < 0.4)
                fua = int(rng.random() < 0.2)
                f.write("zero %d %d %d %d\n" % (off, n, nohole, fua))
                m[off:off+n] = bytes(n)

def qemu_ops(m, seed, cs, l2cov, discard_ok, compress_ok, path):
    rng = random.Random(seed)
    size = len(m)
    full = size // cs                  # whole clusters only
    with open(path, "w") as f:
        for i in range(40):
            r = rng.random()
            if r < 0.5:
                off, n = pick(rng, size, cs, l2cov)
                pat = rng.randrange(1, 256)
                f.write("write -P 0x%02x %d %d\n" % (pat, off, n))
                m[off:off+n] = bytes([pat]) * n
            elif r < 0.65 and compress_ok and full > 0:
                c = rng.randrange(0, full)
                k = min(rng.randint(1, 3), full - c)
                pat = rng.randrange(1, 256)
                # qemu compresses only into clusters without a host
                # cluster (else EIO): discard them first.
                f.write("discard %d %d\n" % (c * cs, k * cs))
                f.write("write -c -P 0x%02x %d %d\n" % (pat, c * cs, k * cs))
                m[c*cs:(c+k)*cs] = bytes([pat]) * (k * cs)
            elif r < 0.85:
                off, n = pick(rng, size, cs, l2cov)
                # Half cluster aligned, so that qemu uses zero clusters.
                if rng.random() < 0.5:
                    off = off // cs * cs
                    n = min(size - off, max(cs, n // cs * cs))
                u = "-u " if rng.random() < 0.5 else ""
                f.write("write -z %s%d %d\n" % (u, off, n))
                m[off:off+n] = bytes(n)
            elif discard_ok and full > 0:
                c = rng.randrange(0, full)
                k = min(rng.randint(1, 4), full - c)
                f.write("discard %d %d\n" % (c * cs, k * cs))
                m[c*cs:(c+k)*cs] = bytes(k * cs)

# One "read -P" per run of equal bytes.  The end of a run of byte B is
# found with a search for [^B] (a scan in C), not with a regex
# back-reference like (.)\1*, which costs seconds per 32 MiB.
not_byte = {}
def reads(m, path):
    pos, size = 0, len(m)
    with open(path, "w") as f:
        while pos < size:
            b = m[pos]
            p = not_byte.get(b)
            if p is None:
                p = not_byte[b] = re.compile(b"[^\\x%02x]" % b)
            mo = p.search(m, pos)
            end = mo.start() if mo else size
            f.write("read -P 0x%02x %d %d\n" % (b, pos, end - pos))
            pos = end

def save(m, path):
    with open(path, "wb") as f:
        f.write(m)

start = sys.argv[1]
rounds, seed, cs, l2cov, discard_ok, compress_ok = map(int, sys.argv[2:8])
m = bytearray(open(start, "rb").read())
for r in range(1, rounds + 1):
    save(m, "model-%d.raw" % r)
    plugin_ops(m, seed * 10 + r, cs, l2cov, "ops-%d.txt" % r)
    reads(m, "qemu-read-%d.txt" % r)
    qemu_ops(m, seed * 10 + r, cs, l2cov, discard_ok, compress_ok,
             "qemu-write-%d.txt" % r)
save(m, "model-final.raw")
EOF

# The plugin turn: check the whole export against $MODEL (the expected
# contents before this turn), then apply $OPS (if set).  Runs inside
# nbdsh.
cat > plugin-turn.py <<'EOF'
import os
model = open(os.environ["MODEL"], "rb").read()
ops = [l.split() for l in open(os.environ["OPS"])] if os.environ.get("OPS") else []
size = h.get_size()
assert size == len(model), "size %d, model %d" % (size, len(model))
pos = 0
while pos < size:
    n = min(size - pos, 8 << 20)
    got = h.pread(n, pos)
    if got != model[pos:pos+n]:
        i = next(i for i in range(n) if got[i] != model[pos + i])
        j = i
        while j < n and got[j] != model[pos + j]:
            j += 1
        raise AssertionError("%s: plugin reads %#x at offset %d, expected %#x "
                             "(%d bytes differ from there)" %
                             (os.environ["NAME"], got[i], pos + i,
                              model[pos + i], j - i))
    pos += n
for op in ops:
    if op[0] == "write":
        pat, off, n, fua = map(int, op[1:])
        h.pwrite(bytes([pat]) * n, off, nbd.CMD_FLAG_FUA if fua else 0)
    else:
        off, n, nohole, fua = map(int, op[1:])
        h.zero(n, off, (nbd.CMD_FLAG_NO_HOLE if nohole else 0) |
                       (nbd.CMD_FLAG_FUA if fua else 0))
EOF

# qio_file IMG FILE NAME [QEMU-IO OPTIONS]: run the qemu-io commands in
# FILE in one qemu-io process; fail on an error or a pattern mismatch,
# naming the run(s) that did not match.
qio_file ()
{
  local img=$1 file=$2 name=$3; shift 3
  local -a cmds=()
  local out line r=0
  while IFS= read -r line; do cmds+=(-c "$line"); done < "$file"
  [ ${#cmds[@]} -gt 0 ] || return 0
  out=$(qemu-io "$@" -f qcow2 "${cmds[@]}" "$img" 2>&1) || r=$?
  if grep -q 'Pattern verification failed' <<< "$out"; then
    grep 'Pattern verification failed' <<< "$out" | head -5 >&2
    echo "the model expects:" >&2
    grep 'Pattern verification failed' <<< "$out" | head -5 |
      while read -r _ _ _ _ _ off _; do
        grep -m1 " ${off%,} " "$file" >&2 || :
      done
    fail "$name: qemu-io reads something else than the plugin wrote"
  fi
  if [ $r -ne 0 ] || grep -qiE 'error|failed' <<< "$out"; then
    echo "$out" | grep -iE 'error|failed' | head >&2
    fail "$name: qemu-io failed (exit $r)"
  fi
}

# interop NAME IMG SEED DISCARD_OK COMPRESS_OK
interop ()
{
  local name=$1 img=$2 seed=$3 discard_ok=$4 compress_ok=$5
  local cs l2cov ext round r
  cs=$(qemu-img info --output=json "$img" |
       $PY -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
  ext=$(qemu-img info --output=json "$img" |
        $PY -c 'import json,sys; print(1 if json.load(sys.stdin)["format-specific"]["data"].get("extended-l2") else 0)')
  if [ "$ext" = 1 ]; then l2cov=$((cs * (cs / 16))); else l2cov=$((cs * (cs / 8))); fi
  qemu-img convert -f qcow2 -O raw "$img" start.raw
  $PY model.py start.raw 3 "$seed" "$cs" "$l2cov" "$discard_ok" "$compress_ok"
  rm -f start.raw
  export NAME=$name
  for round in 1 2 3; do
    # Plugin turn: verify what is there (qemu's writes), then write.
    r=0
    MODEL=model-$round.raw OPS=ops-$round.txt serve_run file="$img" \
      --run "$PYENV"' nbdsh -u "$uri" -c "exec(open(\"plugin-turn.py\").read())"' \
      2> nbdkit.err || r=$?
    if [ $r -ne 0 ]; then
      cat nbdkit.err >&2
      fail "$name: round $round: plugin turn failed"
    fi
    qcheck "$img" > /dev/null

    # qemu turn: verify everything with read -P, then write.
    qio_file "$img" qemu-read-$round.txt "$name: round $round" -r
    qio_file "$img" qemu-write-$round.txt "$name: round $round" -t writeback
    qcheck "$img" > /dev/null
    rm -f model-$round.raw ops-$round.txt qemu-write-$round.txt
    [ $round = 3 ] || rm -f qemu-read-$round.txt
  done
  # Last word to the plugin: it must read qemu's last writes.
  MODEL=model-final.raw OPS= serve_run file="$img" \
    --run "$PYENV"' nbdsh -u "$uri" -c "exec(open(\"plugin-turn.py\").read())"' ||
    fail "$name: final plugin read failed"
  echo "$name: ok ($(wc -l < qemu-read-3.txt) runs checked by qemu-io in the last round)"
  rm -f model-final.raw qemu-read-3.txt
}

#----------------------------------------------------------------------

qemu-img create -q -f qcow2 c64k.qcow2 $((32*MiB))
interop c64k c64k.qcow2 1 1 1

qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 $((16*MiB + 512))
interop c512 c512.qcow2 2 1 1

qemu-img create -q -f qcow2 -o cluster_size=2M c2m.qcow2 $((32*MiB))
interop c2m c2m.qcow2 3 1 1

qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 $((16*MiB))
interop compat-0.10 v2.qcow2 4 1 1

qemu-img create -q -f qcow2 -o refcount_bits=1,cluster_size=4096 rc1.qcow2 $((16*MiB))
interop refcount-bits-1 rc1.qcow2 5 1 1

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16K extl2.qcow2 $((32*MiB))
interop extended-l2-16k extl2.qcow2 6 1 1

# A compressed image to start from.
qemu-img create -q -f qcow2 src.qcow2 $((16*MiB))
qemu-io -f qcow2 -c "write -P 0x41 0 8M" -c "write -P 0x42 8M 7M" src.qcow2 >/dev/null
qemu-img convert -c -f qcow2 -O qcow2 src.qcow2 compressed.qcow2
rm -f src.qcow2
interop compressed compressed.qcow2 7 1 1

# A qcow2 backing file: discard in the overlay (v3) makes zero clusters.
qemu-img create -q -f qcow2 base.qcow2 $((16*MiB))
qemu-io -f qcow2 -c "write -P 0x61 0 16M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top.qcow2 $((16*MiB))
interop backing top.qcow2 8 1 1

# External data file: no compression there; discard leaves data.
qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 $((16*MiB))
interop data-file ext.qcow2 9 0 0

echo "$0: all images ok"
