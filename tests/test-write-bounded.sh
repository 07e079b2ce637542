#!/usr/bin/env bash
# nbdkit-qcow2: freed clusters are reused, so a workload that keeps
# writing, discarding and rewriting the same range does not make the
# image file grow without bound.
#
# For each image, one nbdsh run does 50 rounds of
#     write R (new data each round); flush; read R back;
#     discard R (trim, or zero with may_trim, as the variant says); flush
# and one more write of R at the end, where R is a range of several
# clusters with unaligned ends.  The image file's size after round 1
# (S1) and after round 50 (S50) are compared: S50 <= 2 * S1 is required
# (a leak of R's clusters every round would make S50 ~ 50 * S1).
# Variants: 64 KiB, 512 B (many L2 tables), 4 KiB with refcount_bits=1,
# extended L2, compat=0.10, a compressed image (the first round frees
# compressed clusters), a 64 KiB overlay on a backing file (trim makes
# zero clusters there), zero instead of trim, and FUA writes instead of
# flushes (FUA must also commit the deferred frees).
# Afterwards qemu-img check must exit 0 (no leaks) and the image must
# equal the model (qemu-img compare).

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires /usr/bin/python3 --version

MiB=$((1024*1024))
ROUNDS=50
cd "$tmpdir"

cat > bounded.py <<'EOF'
import os, random
img = os.environ["B_IMG"]
model_path = os.environ["B_MODEL"]
how = os.environ["B_HOW"]            # trim | zero
sync = os.environ["B_SYNC"]          # flush | fua
rounds = int(os.environ["B_ROUNDS"])
off = int(os.environ["B_OFF"])
n = int(os.environ["B_LEN"])
name = os.environ["B_NAME"]

rng = random.Random(n)
model = bytearray(open(model_path, "rb").read())
assert h.get_size() == len(model)

def write_R(r):
    d = rng.randbytes(n)
    if sync == "fua":
        h.pwrite(d, off, nbd.CMD_FLAG_FUA)
    else:
        h.pwrite(d, off)
        h.flush()
    got = h.pread(n, off)
    assert got == d, "%s: round %d: R reads back wrong" % (name, r)
    model[off:off+n] = d

def discard_R():
    fua = nbd.CMD_FLAG_FUA if sync == "fua" else 0
    if how == "trim":
        h.trim(n, off, fua)
    else:
        h.zero(n, off, fua)
    if sync == "flush":
        h.flush()

sizes = []
for r in range(1, rounds + 1):
    write_R(r)
    discard_R()
    sizes.append(os.stat(img).st_size)
# The trimmed contents of R are unspecified: end with a write.
write_R(rounds + 1)
h.flush()
with open(model_path, "wb") as f:
    f.write(model)
s1, sn = sizes[0], sizes[-1]
print("%d %d %d" % (s1, sn, max(sizes)))
EOF

# bounded NAME IMG OFF LEN HOW SYNC
bounded ()
{
  local name=$1 img=$2 off=$3 len=$4 how=$5 sync=$6
  local out s1 sn smax r
  qemu-img convert -f qcow2 -O raw "$img" model.raw
  export B_IMG=$tmpdir/$img B_MODEL=$tmpdir/model.raw B_HOW=$how B_SYNC=$sync
  export B_ROUNDS=$ROUNDS B_OFF=$off B_LEN=$len B_NAME=$name
  out=$(serve_run file="$img" \
          --run 'nbdsh -u "$uri" -c "exec(open(\"bounded.py\").read())"') ||
    fail "$name: workload failed"
  read -r s1 sn smax <<< "$out"
  r=0
  qemu-img check "$img" > check.out 2>&1 || r=$?
  [ $r -eq 0 ] || { cat check.out >&2; fail "$name: qemu-img check exit $r"; }
  qemu-img compare -q -f qcow2 -F raw "$img" model.raw ||
    fail "$name: image differs from the model"
  if [ "$sn" -gt $((2 * s1)) ] || [ "$smax" -gt $((2 * s1)) ]; then
    fail "$name: file grew from $s1 bytes after round 1 to $sn after round $ROUNDS (max $smax): freed clusters are not reused"
  fi
  echo "$name: ok (file size $s1 after round 1, $sn after round $ROUNDS, max $smax)"
  rm -f model.raw
}

# R: 10 clusters and a bit, unaligned at both ends.
qemu-img create -q -f qcow2 c64k.qcow2 $((64*MiB))
bounded cluster-64k-trim c64k.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) trim flush
qemu-img create -q -f qcow2 c64kz.qcow2 $((64*MiB))
bounded cluster-64k-zero c64kz.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) zero flush
qemu-img create -q -f qcow2 c64kf.qcow2 $((64*MiB))
bounded cluster-64k-fua c64kf.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) trim fua

# 512 B clusters: R spans many L2 tables (each maps 32 KiB).
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 $((64*MiB))
bounded cluster-512-trim c512.qcow2 $((1*MiB + 100)) $((300*1024 + 7)) trim flush
qemu-img create -q -f qcow2 -o cluster_size=512 c512z.qcow2 $((64*MiB))
bounded cluster-512-zero c512z.qcow2 $((1*MiB + 100)) $((300*1024 + 7)) zero flush

qemu-img create -q -f qcow2 -o refcount_bits=1,cluster_size=4096 rc1.qcow2 $((64*MiB))
bounded refcount-bits-1 rc1.qcow2 $((5*MiB + 17)) $((200*1024)) trim flush

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16K extl2.qcow2 $((64*MiB))
bounded extended-l2 extl2.qcow2 $((2*MiB + 3000)) $((400*1024 + 99)) trim flush

qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 $((64*MiB))
bounded compat-0.10-trim v2.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) trim flush
qemu-img create -q -f qcow2 -o compat=0.10 v2z.qcow2 $((64*MiB))
bounded compat-0.10-zero v2z.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) zero flush

qemu-img create -q -f qcow2 src.qcow2 $((64*MiB))
qemu-io -f qcow2 -c "write -P 0x33 0 16M" src.qcow2 > /dev/null
qemu-img convert -c -f qcow2 -O qcow2 src.qcow2 compressed.qcow2
rm -f src.qcow2
bounded compressed compressed.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) trim flush

qemu-img create -q -f qcow2 base.qcow2 $((64*MiB))
qemu-io -f qcow2 -c "write -P 0x44 0 8M" base.qcow2 > /dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 $((64*MiB))
bounded backing top.qcow2 $((3*MiB + 1000)) $((640*1024 + 3333)) trim flush

echo "$0: all images ok"
