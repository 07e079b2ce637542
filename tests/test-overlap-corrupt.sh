#!/usr/bin/env bash
# nbdkit-qcow2: writes that would overwrite metadata are refused.
#
# Images are made here with qemu-img/qemu-io and then corrupted on
# purpose by a small python helper (qc.py below) that parses the
# header, L1/L2 tables, refcount table and blocks and the snapshot
# table:
#
#  1. l2-to-reftable: an allocated L2 entry (COPIED kept, so the plugin
#     would write in place) points at the refcount table;
#  2. l1-to-header: an L1 entry points into the header cluster (an
#     unaligned offset: an aligned one inside cluster 0 is offset 0,
#     which means "no L2 table", see 2b);
#  2b. l1-zero-copied: an L1 entry of offset 0 with COPIED set is
#     unallocated: the write must go to a new L2 table, never cluster 0;
#  3. refcount-l2-free: the refcount of an L2 table is 0, and a write
#     needs a new cluster: the allocator must not hand out the table;
#  4. snapshot-l2: an active L2 entry (COPIED set) points at an L2 table
#     only the snapshot still uses;
#  5. l2-to-l1: an allocated L2 entry points at the active L1 table;
#  6. l1-to-reftable: an L1 entry (COPIED) points at the refcount table,
#     which is then taken for an L2 table.  The new entry lands in the
#     L2 cache and is only written back at flush, so the refusal may
#     come from the flush instead of the write (QEMU is the same): the
#     write or, at the latest, the flush after it must fail with EIO.
#     The new data cluster and its refcount may be written (a leak), so
#     only the refcount table and header are compared there.
#  7. l2-to-bitmap-table, 8. l2-to-bitmap-dir: an allocated L2 entry
#     (COPIED) points at a persistent bitmap's table, or at the bitmap
#     directory (the map learns both from the metadata walk, walk.c).
#
# For each case, through nbdkit: the write into the affected range fails
# with EIO, and so do a second write, a zero and a trim elsewhere (the
# error is sticky); reads of unaffected ranges return the right data.
# Afterwards: nbdkit logged exactly one "marking image as corrupt"
# message naming the structure; the image file is byte-for-byte what it
# was except the incompatible-features word at offset 72, which gains
# exactly the corrupt bit (2), the autoclear word at 88, which may
# lose bits, and the flags of bitmap directory entries, which may gain
# the in-use bit (cases 7-8: the kept bitmap is marked in use before
# the first write, and stays so); the protected structure's bytes are
# unchanged (checked separately, for a clearer message); qemu-img info
# says "corrupt: true"; nbdkit serves the image read-only from then on.
#
# Each case's workload is also run on the same image left uncorrupted
# (it must succeed and qemu-img check must be clean: a plugin refusing
# every write cannot pass), and case 1 is run once more with
# overlap-check=none: the write then goes through, over the refcount
# table, and qemu-img check finds the damage (so the check, not luck,
# is what stops it).

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3
MiB=$((1024*1024))
cd "$tmpdir"

#----------------------------------------------------------------------
# qc.py: find and patch qcow2 structures (v3, standard 8-byte L2
# entries, any refcount width up to 64 bits by byte; 16 by default).

cat > qc.py <<'EOF'
import struct, sys

MASK = 0x00fffffffffffe00
COPIED = 1 << 63

class Image:
    def __init__(self, path, write=False):
        self.f = open(path, "r+b" if write else "rb")
        h = self.read(0, 104)
        (self.magic, self.version) = struct.unpack(">4sI", h[0:8])
        assert self.magic == b"QFI\xfb", "not a qcow2 image"
        self.cluster_bits = struct.unpack(">I", h[20:24])[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size = struct.unpack(">I", h[36:40])[0]
        self.l1_offset = struct.unpack(">Q", h[40:48])[0]
        self.rt_offset = struct.unpack(">Q", h[48:56])[0]
        self.rt_clusters = struct.unpack(">I", h[56:60])[0]
        self.nb_snapshots = struct.unpack(">I", h[60:64])[0]
        self.sn_offset = struct.unpack(">Q", h[64:72])[0]
        self.incompat = struct.unpack(">Q", h[72:80])[0]
        self.refcount_order = (struct.unpack(">I", h[96:100])[0]
                               if self.version >= 3 else 4)
        assert not (self.incompat & 0x10), "extended L2 not supported here"
        assert self.refcount_order >= 3, "sub-byte refcounts not supported here"
        self.l2_entries = self.cs // 8

    def read(self, off, n):
        self.f.seek(off)
        b = self.f.read(n)
        assert len(b) == n, "short read at %d" % off
        return b

    def u64(self, off):
        return struct.unpack(">Q", self.read(off, 8))[0]

    def put64(self, off, v):
        self.f.seek(off)
        self.f.write(struct.pack(">Q", v))

    def l1_pos(self, guest):
        i = guest // (self.cs * self.l2_entries)
        assert i < self.l1_size
        return self.l1_offset + 8 * i

    def l2_table(self, guest):
        t = self.u64(self.l1_pos(guest)) & MASK
        assert t, "no L2 table for guest offset %d" % guest
        return t

    def l2_pos(self, guest):
        return self.l2_table(guest) + 8 * ((guest // self.cs) % self.l2_entries)

    def refcount_pos(self, host):
        c = host >> self.cluster_bits
        bits = 1 << self.refcount_order
        per_block = self.cs * 8 // bits
        rb = self.u64(self.rt_offset + 8 * (c // per_block)) & MASK
        assert rb, "no refcount block for %#x" % host
        return rb + (c % per_block) * bits // 8, bits // 8

    def snapshots(self):
        off = self.sn_offset
        for _ in range(self.nb_snapshots):
            l1_off, l1_size, id_len, name_len = \
                struct.unpack(">QIHH", self.read(off, 16))
            extra = struct.unpack(">I", self.read(off + 36, 4))[0]
            p = off + 40 + extra
            sid = self.read(p, id_len).decode()
            name = self.read(p + id_len, name_len).decode()
            yield name, sid, l1_off, l1_size
            off = (p + id_len + name_len + 7) & ~7

cmd, path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
num = lambda s: int(s, 0)

if cmd == "layout":
    # Shell assignments: eval "$($PY qc.py layout IMG)"
    im = Image(path)
    print("cs=%d l1_offset=%d l1_len=%d rt_offset=%d rt_len=%d" %
          (im.cs, im.l1_offset, im.l1_size * 8, im.rt_offset,
           im.rt_clusters * im.cs))
elif cmd == "bitmaps":
    # Shell assignments for the bitmap directory and the first bitmap's
    # table: eval "$($PY qc.py bitmaps IMG)"
    im = Image(path)
    p = struct.unpack(">I", im.read(100, 4))[0]     # header_length
    while True:
        t, n = struct.unpack(">II", im.read(p, 8))
        if t == 0:
            sys.exit("no bitmaps extension")
        if t == 0x23852875:
            break
        p += 8 + ((n + 7) & ~7)
    nb, _, dir_len, dir_off = struct.unpack(">IIQQ", im.read(p + 8, 24))
    t_off, t_size = struct.unpack(">QI", im.read(dir_off, 12))
    print("bm_dir=%d bm_dir_len=%d bm_table=%d bm_table_len=%d" %
          (dir_off, dir_len, t_off & MASK, t_size * 8))
elif cmd == "l2-table":                 # l2-table IMG GUEST
    print(Image(path).l2_table(num(args[0])))
elif cmd == "snap-l2":                  # snap-l2 IMG NAME GUEST
    im = Image(path)
    for name, sid, l1_off, l1_size in im.snapshots():
        if name == args[0]:
            i = num(args[1]) // (im.cs * im.l2_entries)
            t = im.u64(l1_off + 8 * i) & MASK
            assert t, "snapshot %s has no L2 table there" % name
            print(t)
            break
    else:
        sys.exit("no snapshot named %s" % args[0])
elif cmd == "set-l2":                   # set-l2 IMG GUEST HOST: HOST|COPIED
    im = Image(path, True)
    pos = im.l2_pos(num(args[0]))
    old = im.u64(pos)
    assert old & MASK, "L2 entry for %s is not allocated" % args[0]
    im.put64(pos, num(args[1]) | COPIED)
    print("L2 entry at %#x: %#x -> %#x" % (pos, old, im.u64(pos)))
elif cmd == "set-l1":                   # set-l1 IMG GUEST VALUE
    im = Image(path, True)
    pos = im.l1_pos(num(args[0]))
    old = im.u64(pos)
    im.put64(pos, num(args[1]))
    print("L1 entry at %#x: %#x -> %#x" % (pos, old, im.u64(pos)))
elif cmd == "set-refcount":             # set-refcount IMG HOST VALUE
    im = Image(path, True)
    pos, width = im.refcount_pos(num(args[0]))
    old = int.from_bytes(im.read(pos, width), "big")
    im.f.seek(pos)
    im.f.write(num(args[1]).to_bytes(width, "big"))
    print("refcount of %#x at %#x: %d -> %s" % (num(args[0]), pos, old, args[1]))
elif cmd == "refcount":                 # refcount IMG HOST
    im = Image(path)
    pos, width = im.refcount_pos(num(args[0]))
    print(int.from_bytes(im.read(pos, width), "big"))
elif cmd == "same-range":               # same-range IMG COPY OFF LEN
    off, n = num(args[1]), num(args[2])
    a = Image(path).read(off, n)
    b = open(args[0], "rb").read()[off:off + n]
    if a != b:
        i = next(i for i in range(n) if a[i] != b[i])
        sys.exit("bytes [%#x, +%d) changed: first at %#x" % (off, n, off + i))
elif cmd == "same-but-corrupt":         # same-but-corrupt IMG COPY
    # IMG must equal COPY except the incompatible-features word, which
    # must be COPY's with the corrupt bit (2) added, and the autoclear
    # word, which may lose bits (the plugin clears those of features it
    # does not keep up to date, such as bitmaps, before its first change).
    a = open(path, "rb").read()
    b = open(args[0], "rb").read()
    if len(a) != len(b):
        sys.exit("image size changed: %d -> %d" % (len(b), len(a)))
    old = int.from_bytes(b[72:80], "big")
    new = int.from_bytes(a[72:80], "big")
    if new != old | 2 or old & 2:
        sys.exit("incompatible features %#x -> %#x (expected %#x)" %
                 (old, new, old | 2))
    old = int.from_bytes(b[88:96], "big")
    new = int.from_bytes(a[88:96], "big")
    if new & ~old:
        sys.exit("autoclear features %#x -> %#x (bits set)" % (old, new))
    # The flags of each bitmap directory entry may gain the in-use bit
    # (1): the plugin marks the bitmaps it keeps in use before its first
    # change, and they stay so when the image turns out corrupt.
    a = bytearray(a)
    p = int.from_bytes(b[100:104], "big")
    while p + 8 <= len(b):
        t, n = struct.unpack(">II", b[p:p + 8])
        if t == 0:
            break
        if t == 0x23852875:
            nb, _, dir_len, q = struct.unpack(">IIQQ", b[p + 8:p + 32])
            for _ in range(nb):
                f_old = int.from_bytes(b[q + 12:q + 16], "big")
                f_new = int.from_bytes(a[q + 12:q + 16], "big")
                if f_new not in (f_old, f_old | 1):
                    sys.exit("bitmap flags %#x -> %#x" % (f_old, f_new))
                a[q + 12:q + 16] = b[q + 12:q + 16]
                ns, es = struct.unpack(">HI", b[q + 18:q + 24])
                q += (24 + ns + es + 7) & ~7
        p += 8 + ((n + 7) & ~7)
    a = bytes(a)
    if a[:72] + a[80:88] + a[96:] != b[:72] + b[80:88] + b[96:]:
        i = next(i for i in range(len(a))
                 if a[i] != b[i] and not 72 <= i < 80 and not 88 <= i < 96)
        sys.exit("image changed at offset %#x (cluster %#x)" %
                 (i, i & ~((1 << Image(path).cluster_bits) - 1)))
else:
    sys.exit("qc.py: unknown command %s" % cmd)
EOF
qc () { $PY "$tmpdir/qc.py" "$@"; }

#----------------------------------------------------------------------
# The workload, run inside nbdsh.  Environment:
#   MODE   corrupt: the first write (W1) must fail with EIO, then a
#                   second write, a zero and a trim (at W2) too;
#          late:    like corrupt, but the first write may succeed if
#                   the flush after it fails with EIO;
#          control: both writes succeed and read back;
#          through: (overlap-check=none) the first write succeeds.
#   W1, W2 offsets of the 4 KiB writes.
#   GOOD   "off:len:byte ..." ranges that must read as that byte.

cat > workload.py <<'EOF'
import errno, os
mode = os.environ["MODE"]
w1 = int(os.environ["W1"], 0)
w2 = int(os.environ["W2"], 0)
n = 4096

def expect_eio(what, f):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == errno.EIO, \
            "%s: failed with %s, EIO expected" % (what, e)
    else:
        raise AssertionError("%s: succeeded, EIO expected" % what)

def write_then_flush():
    h.pwrite(b"\xee" * n, w1)
    h.flush()

assert not h.is_read_only(), "export is read-only before the test"
if mode in ("corrupt", "late"):
    if mode == "corrupt":
        expect_eio("write at %#x" % w1, lambda: h.pwrite(b"\xee" * n, w1))
    else:
        expect_eio("write at %#x + flush" % w1, write_then_flush)
    expect_eio("second write at %#x" % w2, lambda: h.pwrite(b"\xdd" * n, w2))
    expect_eio("zero at %#x" % w2, lambda: h.zero(n, w2))
    expect_eio("trim at %#x" % w2, lambda: h.trim(n, w2))
    assert h.pread(n, w2) == bytes(n), "refused write at %#x changed data" % w2
elif mode == "control":
    h.pwrite(b"\xee" * n, w1)
    h.pwrite(b"\xdd" * n, w2)
    h.flush()
    assert h.pread(n, w1) == b"\xee" * n, "control: read back at %#x" % w1
    assert h.pread(n, w2) == b"\xdd" * n, "control: read back at %#x" % w2
elif mode == "through":
    h.pwrite(b"\xee" * n, w1)
    h.flush()
else:
    raise AssertionError("bad MODE " + mode)
for g in os.environ["GOOD"].split():
    off, length, byte = (int(x, 0) for x in g.split(":"))
    got = h.pread(length, off)
    if got != bytes([byte]) * length:
        i = next(i for i in range(length) if got[i] != byte)
        raise AssertionError("read of unaffected [%#x, +%d): byte %#x at %#x, "
                             "expected %#x" % (off, length, got[i],
                                               off + i, byte))
EOF

# serve NAME IMG MODE W1 W2 GOOD [NBDKIT_PARAM...]: run the workload;
# nbdkit's messages go to $tmpdir/NAME.log.
serve ()
{
  local name=$1 img=$2 mode=$3 w1=$4 w2=$5 good=$6; shift 6
  if ! MODE=$mode W1=$w1 W2=$w2 GOOD=$good \
       serve_run file="$img" "$@" \
         --run 'nbdsh -u "$uri" -c "exec(open(\"workload.py\").read())"' \
         2> "$name.log"; then
    cat "$name.log" >&2
    fail "$name ($mode): workload failed"
  fi
  if grep -Eq 'AddressSanitizer|runtime error|Assertion|Segmentation' "$name.log"; then
    cat "$name.log" >&2
    fail "$name ($mode): nbdkit crashed or a sanitizer complained"
  fi
}

# qinfo_corrupt IMG: print true/false from qemu-img info.
qinfo_corrupt ()
{
  qemu-img info --output=json "$1" |
    $PY -c 'import json,sys
print(str(json.load(sys.stdin)["format-specific"]["data"]["corrupt"]).lower())'
}

# base IMG: the image every case starts from: 1 GiB, 64 KiB clusters
# (so one L2 table maps 512 MiB: two L1 entries), data in both halves.
#   [0, 1M) 0x11 (L1 entry 0), [600M, 601M) 0x22 (L1 entry 1).
# W2 = 800M is unallocated (L1 entry 1) in every case.
base ()
{
  qemu-img create -q -f qcow2 "$1" 1G
  qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 600M 1M" \
    "$1" >/dev/null
}
W2=$((800 * MiB))
GOOD_HI="$((600 * MiB)):$MiB:0x22"

# corrupt_case NAME IMG W1 GOOD PROT WHAT [late]: run the workload on
# an image already corrupted ($IMG.orig is the copy made just after
# corrupting it) and check everything afterwards.  PROT is the
# protected structure as "off:len ..." byte ranges; WHAT is a regexp
# the "marking image as corrupt" message must match.  With "late" the
# refusal may come at flush and only PROT is compared.
corrupt_case ()
{
  local name=$1 img=$2 w1=$3 good=$4 prot=$5 what=$6 mode=${7:-corrupt}
  local n msg r

  serve "$name" "$img" "$mode" "$w1" "$W2" "$good"
  n=$(grep -c 'marking image as corrupt' "$name.log" || :)
  if [ "$n" != 1 ]; then
    cat "$name.log" >&2
    fail "$name: $n 'marking image as corrupt' messages, 1 expected"
  fi
  msg=$(grep 'marking image as corrupt' "$name.log")
  echo "$name: nbdkit: ${msg#*: }"
  echo "$msg" | grep -Eq "$what" ||
    fail "$name: the message does not name $what"
  for r in $prot; do
    qc same-range "$img" "$img.orig" "${r%:*}" "${r#*:}" ||
      fail "$name: the protected structure changed on disk"
  done
  if [ "$mode" = corrupt ]; then
    qc same-but-corrupt "$img" "$img.orig" ||
      fail "$name: the image changed beyond the corrupt bit"
  fi
  [ "$(qinfo_corrupt "$img")" = true ] ||
    fail "$name: qemu-img info does not say corrupt: true"
  # A corrupt image is served read-only from then on.
  serve_run file="$img" --run 'nbdsh -u "$uri" -c "assert h.is_read_only()"' \
    2>/dev/null || fail "$name: the corrupt image is served writable"
  echo "$name: ok (${mode/late/write or flush} refused, metadata intact, corrupt: true)"
}

# control_case NAME IMG W1 GOOD: the same workload on the uncorrupted
# image succeeds and leaves a clean image (no leaks: bitmaps, cases
# 7-8, are kept and stored at close).
control_case ()
{
  local name=$1 img=$2 w1=$3 good=$4
  serve "$name-control" "$img" control "$w1" "$W2" "$good"
  if grep -q 'corrupt' "$name-control.log"; then
    cat "$name-control.log" >&2
    fail "$name-control: nbdkit called the intact image corrupt"
  fi
  qcheck "$img" >/dev/null
  [ "$(qinfo_corrupt "$img")" = false ] ||
    fail "$name-control: qemu-img info says corrupt"
  echo "$name-control: ok (same workload succeeds uncorrupted)"
}

#----------------------------------------------------------------------
# 1. An L2 entry points at the refcount table.

W1=$((64 * 1024))                       # guest cluster 1
GOOD="$((128 * 1024)):$((MiB - 128 * 1024)):0x11 $GOOD_HI"

base c1.qcow2
cp c1.qcow2 c1-ctl.qcow2
cp c1.qcow2 c1-none.qcow2
eval "$(qc layout c1.qcow2)"
qc set-l2 c1.qcow2 $W1 $rt_offset
cp c1.qcow2 c1.qcow2.orig
corrupt_case l2-to-reftable c1.qcow2 $W1 "$GOOD" "$rt_offset:$rt_len" \
  'overlaps the refcount table'
control_case l2-to-reftable c1-ctl.qcow2 $W1 "$GOOD"

# ... and with overlap-check=none the write goes through, over the
# refcount table, and qemu-img check finds the damage.
qc set-l2 c1-none.qcow2 $W1 $rt_offset >/dev/null
cp c1-none.qcow2 c1-none.qcow2.orig
serve l2-to-reftable-none c1-none.qcow2 through $W1 $W2 "$GOOD" \
  overlap-check=none
if qc same-range c1-none.qcow2 c1-none.qcow2.orig $rt_offset $rt_len \
   2>/dev/null; then
  fail "l2-to-reftable-none: the refcount table was not overwritten"
fi
r=0; qemu-img check c1-none.qcow2 > c1-none.check 2>&1 || r=$?
if [ $r -eq 0 ] || [ $r -eq 3 ] || ! grep -q 'errors were found' c1-none.check
then
  cat c1-none.check >&2
  fail "l2-to-reftable-none: qemu-img check exit $r, corruption expected"
fi
echo "l2-to-reftable-none: ok (overlap-check=none: write went through," \
     "qemu-img check exit $r)"

#----------------------------------------------------------------------
# 2. An L1 entry points into the header cluster (offset 0x200, COPIED).

W1=$((64 * 1024))                       # under L1 entry 0
GOOD="$GOOD_HI"                         # L1 entry 0 is all suspect

base c2.qcow2
cp c2.qcow2 c2-ctl.qcow2
eval "$(qc layout c2.qcow2)"
qc set-l1 c2.qcow2 $W1 0x8000000000000200
cp c2.qcow2 c2.qcow2.orig
# The header cluster but its incompatible-features word, and the L1
# table.
corrupt_case l1-to-header c2.qcow2 $W1 "$GOOD" \
  "0:72 80:$((cs - 80)) $l1_offset:$l1_len" 'L2 table offset 0x200'
control_case l1-to-header c2-ctl.qcow2 $W1 "$GOOD"

# 2b. Offset 0 with COPIED set: no L2 table, whatever the flag says.
# The write must allocate a new L2 table, never write cluster 0.
base c2b.qcow2
eval "$(qc layout c2b.qcow2)"
qc set-l1 c2b.qcow2 0 0x8000000000000000 >/dev/null
cp c2b.qcow2 c2b.qcow2.orig
serve l1-zero-copied c2b.qcow2 control $W1 $W2 "$GOOD_HI"
qc same-range c2b.qcow2 c2b.qcow2.orig 0 $cs ||
  fail "l1-zero-copied: the header cluster changed"
l2=$(qc l2-table c2b.qcow2 0)
[ "$l2" -ge $cs ] || fail "l1-zero-copied: L2 table at $l2"
# The old L2 table and its data clusters are leaked (by the patch).
r=0; qemu-img check c2b.qcow2 > c2b.check 2>&1 || r=$?
if [ $r -ne 0 ] && [ $r -ne 3 ]; then
  cat c2b.check >&2
  fail "l1-zero-copied: qemu-img check exit $r (0 or 3 expected)"
fi
echo "l1-zero-copied: ok (new L2 table at $l2, header intact)"

#----------------------------------------------------------------------
# 3. The refcount of an L2 table is 0 and a write needs a new cluster.
# qemu puts the L2 table of L1 entry 0 right after the L1 table, before
# any data, so the allocator (which reuses the lowest free cluster)
# meets it first.  It may refuse the cluster (it is in the overlap map)
# or the data write into it may be refused: either way the message
# names an active L2 table and the table is unchanged.

W1=$((700 * MiB))                       # unallocated, under L1 entry 1
GOOD="0:$MiB:0x11 $GOOD_HI"

base c3.qcow2
cp c3.qcow2 c3-ctl.qcow2
eval "$(qc layout c3.qcow2)"
l2=$(qc l2-table c3.qcow2 0)
qc set-refcount c3.qcow2 $l2 0
cp c3.qcow2 c3.qcow2.orig
corrupt_case refcount-l2-free c3.qcow2 $W1 "$GOOD" "$l2:$cs" \
  'active L2 table'
control_case refcount-l2-free c3-ctl.qcow2 $W1 "$GOOD"

#----------------------------------------------------------------------
# 4. An active L2 entry points at an L2 table only a snapshot uses.

W1=$((64 * 1024))                       # shared with the snapshot
GOOD="0:$((64 * 1024)):0x33 $((128 * 1024)):$((MiB - 128 * 1024)):0x11 $GOOD_HI"

base c4.qcow2
qemu-img snapshot -c snap1 c4.qcow2
qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 c4.qcow2 snap1-ref.raw
# The first write after the snapshot copies L2 table 0 for the active L1.
qemu-io -f qcow2 -c "write -P 0x33 0 64k" c4.qcow2 >/dev/null
cp c4.qcow2 c4-ctl.qcow2
eval "$(qc layout c4.qcow2)"
sl2=$(qc snap-l2 c4.qcow2 snap1 0)
al2=$(qc l2-table c4.qcow2 0)
[ "$sl2" != "$al2" ] || fail "snapshot-l2: qemu did not copy the L2 table (bug in the test)"
[ "$(qc refcount c4.qcow2 $sl2)" = 1 ] ||
  fail "snapshot-l2: the snapshot's L2 table is still shared (bug in the test)"
qc set-l2 c4.qcow2 $W1 $sl2
cp c4.qcow2 c4.qcow2.orig
corrupt_case snapshot-l2 c4.qcow2 $W1 "$GOOD" "$sl2:$cs" \
  'overlaps an inactive L2 table'
qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 c4.qcow2 snap1.raw
qemu-img compare -q -f raw -F raw snap1-ref.raw snap1.raw ||
  fail "snapshot-l2: the snapshot's data changed"
echo "snapshot-l2: ok (snapshot snap1 reads as before)"
control_case snapshot-l2 c4-ctl.qcow2 $W1 "$GOOD"
qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 c4-ctl.qcow2 snap1.raw
qemu-img compare -q -f raw -F raw snap1-ref.raw snap1.raw ||
  fail "snapshot-l2-control: the snapshot's data changed"
rm -f snap1.raw snap1-ref.raw

#----------------------------------------------------------------------
# 5. An L2 entry points at the active L1 table.

W1=$((64 * 1024))
GOOD="$((128 * 1024)):$((MiB - 128 * 1024)):0x11 $GOOD_HI"

base c5.qcow2
cp c5.qcow2 c5-ctl.qcow2
eval "$(qc layout c5.qcow2)"
qc set-l2 c5.qcow2 $W1 $l1_offset
cp c5.qcow2 c5.qcow2.orig
corrupt_case l2-to-l1 c5.qcow2 $W1 "$GOOD" "$l1_offset:$cs" \
  'overlaps the active L1 table'
control_case l2-to-l1 c5-ctl.qcow2 $W1 "$GOOD"

#----------------------------------------------------------------------
# 6. An L1 entry points at the refcount table (taken for an L2 table).

W1=$((64 * 1024))                       # under L1 entry 0
GOOD="$GOOD_HI"

base c6.qcow2
cp c6.qcow2 c6-ctl.qcow2
eval "$(qc layout c6.qcow2)"
qc set-l1 c6.qcow2 0 $(printf '%#x' $(( rt_offset | (1 << 63) )))
cp c6.qcow2 c6.qcow2.orig
corrupt_case l1-to-reftable c6.qcow2 $W1 "$GOOD" \
  "0:72 80:$((cs - 80)) $rt_offset:$rt_len" 'overlaps the refcount table' late
control_case l1-to-reftable c6-ctl.qcow2 $W1 "$GOOD"

#----------------------------------------------------------------------
# 7. An L2 entry points at a bitmap table, and 8. at the bitmap
# directory.  The image has a persistent bitmap with data (qemu-io's
# writes are tracked in it).

W1=$((64 * 1024))
GOOD="$((128 * 1024)):$((MiB - 128 * 1024)):0x11 $GOOD_HI"

for c in 7 8; do
  qemu-img create -q -f qcow2 c$c.qcow2 1G
  qemu-img bitmap --add c$c.qcow2 b0
  qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 600M 1M" \
    c$c.qcow2 >/dev/null
  cp c$c.qcow2 c$c-ctl.qcow2
done
eval "$(qc bitmaps c7.qcow2)"
qc set-l2 c7.qcow2 $W1 $bm_table
cp c7.qcow2 c7.qcow2.orig
corrupt_case l2-to-bitmap-table c7.qcow2 $W1 "$GOOD" "$bm_table:$bm_table_len" \
  'overlaps a bitmap table'
control_case l2-to-bitmap-table c7-ctl.qcow2 $W1 "$GOOD"

eval "$(qc bitmaps c8.qcow2)"
qc set-l2 c8.qcow2 $W1 $bm_dir
cp c8.qcow2 c8.qcow2.orig
# (Its first entry's flags word, at +12, gains the in-use bit.)
corrupt_case l2-to-bitmap-dir c8.qcow2 $W1 "$GOOD" \
  "$bm_dir:12 $((bm_dir + 16)):$((bm_dir_len - 16))" \
  'overlaps the bitmap directory'
control_case l2-to-bitmap-dir c8-ctl.qcow2 $W1 "$GOOD"

echo "$0: all overlap cases refused, controls passed"
