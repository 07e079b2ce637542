#!/usr/bin/env bash
# nbdkit-qcow2: concurrent writes, through several connections at once
# (multi-conn) and with many requests in flight on one connection.
#
# Images: empty ones with 512 B, 64 KiB and 16 KiB extended-L2 clusters;
# 64 KiB- and 4 KiB-cluster overlays on a qcow2 backing file full of
# data (so that every first write to a cluster copies from the backing
# file under concurrency); an image with an internal snapshot of all its
# data (every cluster and L2 table shared: COW under concurrency; the
# snapshot must not change); an image of compressed clusters; tiny L2
# and refcount caches (plugin parameters).  Each image gets 10 rounds; each round is one
# nbdkit run (-t 32) of conc.py below, then `qemu-img check` (exit 0,
# leaks fail) and `qemu-img compare` with the model conc.py keeps.
#
# conc.py, each round, with a block size and a window of the disk
# chosen by the round's seed (block sizes are deliberately not cluster
# multiples, so that neighbouring blocks of different writers share
# clusters):
#  1. disjoint: 4 connections (python threads, one nbd.NBD handle each,
#     16 aio requests in flight per handle, 64 in all); block k belongs
#     to writer k % 4, which writes it (70%), zeroes it (20%, with or
#     without NO_HOLE) or trims it (10%) - one request per block, so
#     the expected content is known: the data, zeroes, and for trims
#     per piece (cut at cluster / subcluster boundaries) the old data,
#     zeroes or the backing file's data (the only sound results; what is
#     read is then adopted by the model);
#  2. same data: the 4 connections write random overlapping ranges of one
#     region, all with the same content D (ranges that are all zeroes
#     in D are sent as WRITE_ZEROES), so the result is D wherever any
#     range landed;
#  3. one connection, 64 requests in flight: disjoint writes and zeroes
#     of random ranges, some FUA, with flushes among them;
#  4. chaos: 3 connections write, zero and trim overlapping ranges of a
#     small region (its result is unknown and adopted after reading it
#     back) and flush, while a 4th writes disjoint witness blocks
#     elsewhere, which allocate clusters (possibly ones just freed);
#     the witnesses must be intact, and qemu-img check catches a freed
#     cluster still in use;
#  then the whole export is read back (a fresh connection) and compared
#  with the model.
# Round 1 of every image also starts with nbdcopy --requests=64
# --connections=4 of a random raw file with holes and zero runs into the
# image (nbdcopy sends writes and zeroes at once on 4 connections).
#
# QCOW2_CONC_ROUNDS=N changes the number of rounds (default 10);
# QCOW2_CONC_SEED=K gives other (deterministic) workloads (default 0);
# QCOW2_CONC_KEEP=DIR keeps the work files.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires /usr/bin/python3 --version

# Python here allocates and frees buffers of megabytes all the time,
# which glibc maps and unmaps each time: the page faults cost more CPU
# than the work.  These keep such buffers in the heap, for the python
# processes only (nbdkit runs with the environment it always has).
PYENV="env MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864"
PY="$PYENV /usr/bin/python3"
MiB=$((1024*1024))
ROUNDS=${QCOW2_CONC_ROUNDS:-10}
work=${QCOW2_CONC_KEEP:-$tmpdir}
mkdir -p "$work"
cd "$work"

cat > conc.py <<'EOF'
import os, random, threading, time

name = os.environ["C_NAME"]
seed = int(os.environ["C_SEED"])
cs = int(os.environ["C_CS"])
gran = int(os.environ["C_GRAN"])
# uri: set by the nbdsh command line
model_path = os.environ["C_MODEL"]
backing_path = os.environ.get("C_BACKING", "")

rng = random.Random(seed)
size = h.get_size()
assert h.can_multi_conn(), "%s: no multi-conn" % name
model = bytearray(open(model_path, "rb").read())
assert len(model) == size
backing = None
if backing_path:
    backing = bytearray(open(backing_path, "rb").read())
    backing += bytes(max(0, size - len(backing)))
    del backing[size:]
phase = "?"

def fail(msg):
    raise AssertionError("%s (seed %d) %s: %s" % (name, seed, phase, msg))

def diff_msg(off, got, exp):
    i = next(i for i in range(len(got)) if got[i] != exp[i])
    lo = i - i % 16
    return ("offset %d (%#x): read %s, expected %s" %
            (off + i, off + i, bytes(got[lo:lo+16]).hex(" "),
             bytes(exp[lo:lo+16]).hex(" ")))

def pread(hh, off, n):
    if n <= 8 << 20:
        return hh.pread(n, off)          # no second copy
    out = bytearray()
    while n > 0:
        k = min(n, 8 << 20)
        out += hh.pread(k, off)
        off += k
        n -= k
    return out

def adopt_trimmed(hh, off, n):
    """After a trim of [off, off+n): every piece must read as the old
    data, zeroes or the backing file; the model takes what is read."""
    got = pread(hh, off, n)
    p = off
    while p < off + n:
        q = min(off + n, (p // gran + 1) * gran)
        g = got[p - off:q - off]
        if (g != model[p:q] and g != bytes(q - p) and
                not (backing is not None and g == backing[p:q])):
            fail("trimmed piece [%d, %d) is neither old data, zeroes nor "
                 "backing: %s" % (p, q, diff_msg(p, g, model[p:q])))
        p = q
    model[off:off+n] = got

def connect():
    hh = nbd.NBD()
    hh.connect_uri(uri)
    return hh

def run_aio(hh, ops, depth):
    """ops: list of (kind, off, n_or_data, flags).  Keep up to depth
    requests in flight; raise on the first failure."""
    pending = []
    i = 0
    while i < len(ops) or hh.aio_in_flight() > 0:
        while i < len(ops) and hh.aio_in_flight() < depth:
            kind, off, arg, flags = ops[i]
            if kind == "w":
                c = hh.aio_pwrite(nbd.Buffer.from_bytearray(arg), off, flags=flags)
            elif kind == "z":
                c = hh.aio_zero(arg, off, flags=flags)
            elif kind == "t":
                c = hh.aio_trim(arg, off, flags=flags)
            else:
                c = hh.aio_flush()
            pending.append((c, ops[i]))
            i += 1
        hh.poll(-1)
        still = []
        for c, op in pending:
            try:
                done = hh.aio_command_completed(c)
            except nbd.Error as e:
                fail("%s off=%d failed: %s" % (op[0], op[1], e))
            if not done:
                still.append((c, op))
        pending = still

def in_threads(fns):
    errs = []
    def wrap(f):
        try:
            f()
        except BaseException as e:
            errs.append(e)
    ts = [threading.Thread(target=wrap, args=(f,)) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]

W = 4
handles = [connect() for _ in range(W)]

# 1. Disjoint blocks, 4 connections x 16 in flight.
phase = "phase 1 (disjoint blocks)"
bs = rng.choice([cs // 2 + 37, cs + 123, 3 * cs - 5, 777, 2 * cs + 1, 4096 + 7])
nblocks = min(size // bs, W * 48)
start = rng.randrange(0, size - nblocks * bs + 1)
if rng.random() < 0.2:
    start = size - nblocks * bs          # up to the end of the disk
per = [[] for _ in range(W)]
trims = []
for k in range(nblocks):
    off = start + k * bs
    r = rng.random()
    if r < 0.7:
        d = bytearray(rng.randbytes(bs))
        per[k % W].append(("w", off, d, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0))
        model[off:off+bs] = d
    elif r < 0.9:
        per[k % W].append(("z", off, bs, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0))
        model[off:off+bs] = bytes(bs)
    else:
        per[k % W].append(("t", off, bs, 0))
        trims.append((off, bs))
for ops in per:
    rng.shuffle(ops)
in_threads([lambda hh=hh, ops=ops: run_aio(hh, ops, 16)
            for hh, ops in zip(handles, per)])
for off, n in trims:
    adopt_trimmed(h, off, n)
got = pread(h, start, nblocks * bs)
if got != model[start:start + nblocks * bs]:
    fail("block size %d: %s" % (bs, diff_msg(start, got, model[start:start + nblocks * bs])))

# 2. The same data D over overlapping ranges from 4 connections.
phase = "phase 2 (same data, overlapping)"
rlen = min(size, rng.choice([4 * cs, 8 * cs + 999, 1 << 20]))
rstart = rng.randrange(0, size - rlen + 1)
D = bytearray(rng.randbytes(rlen))
# Some zero runs in D, cluster aligned and not.
for _ in range(4):
    a = rng.randrange(0, rlen)
    if rng.random() < 0.5:
        a = (rstart + a) // cs * cs - rstart
        a = max(a, 0)
    b = min(rlen, a + rng.randint(1, 2 * cs))
    D[a:b] = bytes(b - a)
covered = bytearray(rlen)
per = [[] for _ in range(W)]
for w in range(W):
    for _ in range(30):
        a = rng.randrange(0, rlen)
        b = min(rlen, a + rng.randint(1, 3 * cs))
        seg = D[a:b]
        if not any(seg):
            per[w].append(("z", rstart + a, b - a,
                           nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0))
        else:
            per[w].append(("w", rstart + a, bytearray(seg), 0))
        covered[a:b] = b"\1" * (b - a)
# Apply D to the model where covered (runs, not byte by byte in Python).
i = 0
while i < rlen:
    j = covered.find(b"\1", i)
    if j < 0:
        break
    k = covered.find(b"\0", j)
    if k < 0:
        k = rlen
    model[rstart + j:rstart + k] = D[j:k]
    i = k
in_threads([lambda hh=hh, ops=ops: run_aio(hh, ops, 16)
            for hh, ops in zip(handles, per)])
got = pread(h, rstart, rlen)
if got != model[rstart:rstart + rlen]:
    fail(diff_msg(rstart, got, model[rstart:rstart + rlen]))

# 3. One connection, 64 in flight: disjoint random ranges.
phase = "phase 3 (one connection, 64 in flight)"
cuts = sorted(rng.sample(range(1, size), 129))
ops = []
for i in range(0, 128, 2):
    off, end = cuts[i], cuts[i + 1]
    end = min(end, off + 4 * cs + 3000)
    n = end - off
    if rng.random() < 0.75:
        d = bytearray(rng.randbytes(n))
        ops.append(("w", off, d, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0))
        model[off:end] = d
    else:
        ops.append(("z", off, n, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0))
        model[off:end] = bytes(n)
    if rng.random() < 0.05:
        ops.append(("f", 0, 0, 0))
rng.shuffle(ops)
run_aio(handles[0], ops, 64)
for kind, off, arg, flags in ops:
    if kind == "f":
        continue
    n = len(arg) if kind == "w" else arg
    got = pread(h, off, n)
    if got != model[off:off+n]:
        fail(diff_msg(off, got, model[off:off+n]))

# 4. Chaos in a small region, witnesses elsewhere.
phase = "phase 4 (chaos + witnesses)"
# (cluster aligned, so that trims rounded to clusters stay inside)
clen = max(cs, min(size // 4, 6 * cs) // cs * cs)
cstart = rng.randrange(0, (size - clen) // cs + 1) * cs
clen = min(clen, size - cstart)
wit = []
chaos = [[] for _ in range(W - 1)]
for w in range(W - 1):
    for _ in range(25):
        a = cstart + rng.randrange(0, clen)
        n = min(cstart + clen - a, rng.randint(1, 2 * cs + 500))
        r = rng.random()
        if r < 0.5:
            chaos[w].append(("w", a, bytearray(rng.randbytes(n)), 0))
        elif r < 0.7:
            chaos[w].append(("z", a, n, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0))
        elif r < 0.9:
            a0 = a // cs * cs
            chaos[w].append(("t", a0, min(cstart + clen, a0 + 2 * cs) - a0, 0))
        else:
            chaos[w].append(("f", 0, 0, 0))
# witnesses: blocks outside the chaos region (and not touching its
# clusters)
lo = cstart // cs * cs
hi = (cstart + clen + cs - 1) // cs * cs
wops = []
for _ in range(60):
    n = rng.randint(1, 2 * cs)
    a = rng.randrange(0, size - n + 1)
    if a + n > lo and a < hi:
        continue
    if any(a < o + len(d) and o < a + n for _, o, d, _ in wops):
        continue
    d = bytearray(rng.randbytes(n))
    wops.append(("w", a, d, 0))
    model[a:a+n] = d
in_threads([lambda hh=hh, ops=ops: run_aio(hh, ops, 8)
            for hh, ops in zip(handles[:W-1], chaos)] +
           [lambda: run_aio(handles[W-1], wops, 16)])
for _, a, d, _ in wops:
    got = pread(h, a, len(d))
    if got != d:
        fail("witness block [%d, +%d): %s" % (a, len(d), diff_msg(a, got, d)))
# The chaos region's content is unknown: adopt it.
model[cstart:cstart+clen] = pread(h, cstart, clen)
h.flush()

# Whole export, through a fresh connection.
phase = "final read"
for hh in handles:
    hh.shutdown()
hh = connect()
got = pread(hh, 0, size)
if got != model:
    fail(diff_msg(0, got, model))
hh.shutdown()
with open(model_path, "wb") as f:
    f.write(model)
print("block size %d, region %d, chaos %d" % (bs, rlen, clen))
EOF

# conc_image NAME IMG SEED [BACKING_RAW]
conc_image ()
{
  local name=$1 img=$2 seed=$3 backing=${4:-}
  local info cs ext gran size round r out start=$SECONDS
  info=$(qemu-img info --output=json "$img")
  cs=$($PY -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])' <<< "$info")
  ext=$($PY -c 'import json,sys; print(1 if json.load(sys.stdin)["format-specific"]["data"].get("extended-l2") else 0)' <<< "$info")
  size=$($PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])' <<< "$info")
  if [ "$ext" = 1 ]; then gran=$((cs / 32)); else gran=$cs; fi

  # Round 1 begins with nbdcopy of a random file with holes and zeroes.
  $PY - "$name.src" "$size" "$seed" <<'EOF'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open(path, "wb") as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.randint(1, 300000))
        r = rng.random()
        if r < 0.3:
            f.seek(pos); f.write(rng.randbytes(n))
        elif r < 0.5:                               # compressible
            t = b"%d-%d " % (seed, pos)
            f.seek(pos); f.write((t * (n // len(t) + 1))[:n])
        elif r < 0.7:
            f.seek(pos); f.write(bytes(n))          # allocated zeroes
        pos += n                                    # else a hole
EOF
  export C_SRC=$work/$name.src
  local -a params
  read -r -a params <<< "${CASE_PARAMS:-}"
  r=0
  serve_run -t 32 file="$img" ${params[@]+"${params[@]}"} \
    --run 'nbdcopy --requests=64 --connections=4 "$C_SRC" "$uri"' \
    2> "$name.err" || r=$?
  [ $r -eq 0 ] || { cat "$name.err" >&2; fail "$name: nbdcopy into the image failed"; }
  qcheck "$img" > /dev/null
  r=0
  qemu-img compare -q -f qcow2 -F raw "$img" "$name.src" || r=$?
  [ $r -eq 0 ] || fail "$name: image differs from the file nbdcopy copied in (exit $r)"
  mv "$name.src" "$name.model"
  case "${POST:-}" in
    snapshot)
      # Clusters and L2 tables now shared with a snapshot must be
      # copied (COW) under concurrency; the snapshot must not change.
      qemu-img snapshot -c snap1 "$img"
      qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" "$name.snap1" ;;
    compress)
      # Start the rounds from compressed clusters.
      qemu-img convert -c -f qcow2 -O qcow2 "$img" "$name.tmp.qcow2"
      mv "$name.tmp.qcow2" "$img"
      [ "$(qemu-img check --output=json "$img" |
           $PY -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))')" -gt 0 ] ||
        fail "$name: qemu made no compressed clusters (bug in the test)" ;;
  esac

  for round in $(seq 1 "$ROUNDS"); do
    export C_NAME="$name round $round"
    export C_SEED=$(( ${QCOW2_CONC_SEED:-0} * 100000 + seed * 100 + round ))
    export C_CS=$cs C_GRAN=$gran C_MODEL=$work/$name.model C_BACKING=$backing
    r=0
    out=$(serve_run -t 32 file="$img" ${params[@]+"${params[@]}"} \
            --run "$PYENV"' nbdsh -u "$uri" -c "uri = \"$uri\"" -c "exec(open(\"conc.py\").read())"' \
            2> "$name.err") || r=$?
    if [ $r -ne 0 ]; then
      cat "$name.err" >&2
      fail "$name: round $round failed (seed $C_SEED)"
    fi
    r=0
    qemu-img check "$img" > "$name.check" 2>&1 || r=$?
    if [ $r -ne 0 ]; then
      cat "$name.check" >&2
      fail "$name: round $round: qemu-img check exit $r (seed $C_SEED)"
    fi
    r=0
    qemu-img compare -f qcow2 -F raw "$img" "$name.model" > "$name.cmp" 2>&1 || r=$?
    if [ $r -ne 0 ]; then
      cat "$name.cmp" >&2
      fail "$name: round $round: image on disk differs from the model (seed $C_SEED)"
    fi
  done
  if [ "${POST:-}" = snapshot ]; then
    qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" "$name.snap1.after"
    cmp "$name.snap1" "$name.snap1.after" ||
      fail "$name: the internal snapshot changed"
    rm -f "$name.snap1" "$name.snap1.after"
  fi
  echo "$name: ok ($ROUNDS rounds, $((SECONDS - start))s; last: $out)"
  rm -f "$name.model" "$name.err" "$name.check" "$name.cmp"
}

qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 $((8*MiB))
conc_image cluster-512 c512.qcow2 1

qemu-img create -q -f qcow2 c64k.qcow2 $((32*MiB))
conc_image cluster-64k c64k.qcow2 2

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16K extl2.qcow2 $((16*MiB))
conc_image extended-l2-16k extl2.qcow2 3

# Backing file full of data; the overlay is empty, so concurrent first
# writes to a cluster all copy from the backing file.
$PY -c '
import random, sys
open(sys.argv[1], "wb").write(random.Random(9).randbytes(24 * 1024 * 1024))' base.raw
qemu-img convert -f raw -O qcow2 base.raw base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 $((32*MiB))
conc_image backing-64k top.qcow2 4 "$work/base.raw"
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top4k.qcow2 $((32*MiB))
conc_image backing-4k top4k.qcow2 5 "$work/base.raw"

# Tiny caches: L2 and refcount slices are evicted and written back while
# other requests are in flight.
qemu-img create -q -f qcow2 -o cluster_size=4096 tiny.qcow2 $((16*MiB))
CASE_PARAMS="l2-cache-size=1K refcount-cache-size=1K cache-entry-size=512" \
  conc_image tiny-cache-4k tiny.qcow2 8

# An internal snapshot taken after the nbdcopy: everything is shared.
qemu-img create -q -f qcow2 -o cluster_size=4096 snap.qcow2 $((16*MiB))
POST="snapshot" conc_image snapshot-4k snap.qcow2 6

# Compressed clusters (the image is recompressed after the nbdcopy).
qemu-img create -q -f qcow2 comp.qcow2 $((16*MiB))
POST="compress" conc_image compressed-64k comp.qcow2 7

echo "$0: all images ok"
