#!/usr/bin/env bash
# nbdkit-qcow2: read a matrix of qcow2 images through the plugin and
# compare every byte with QEMU's own reading of the same image.
#
# Every image is made here at test time with qemu-img/qemu-io (no binary
# images are committed): cluster sizes 512 B to 2 MiB, compat 0.10 and
# 1.1, refcount widths 1/16/64, extended L2, zlib and zstd compressed
# clusters, qcow2 and raw backing files found by relative path, a chain
# of three, a backing file shorter than its overlay, zero clusters (also
# over backing data), discards, external data files (also raw), lazy
# refcounts (clean and dirty), internal snapshots and preallocated
# metadata, all with data at odd offsets and lengths that cross cluster
# and L2-table boundaries.
#
# For each image:
#  (a) the whole export is copied out with nbdcopy --no-extents (so
#      every byte goes through the plugin's pread, whatever its block
#      status says) and must equal `qemu-img convert -O raw` byte for
#      byte;
#  (b) the block-status map from `nbdinfo --map --json` must cover the
#      whole export with no gaps or overlaps, and every extent the
#      plugin calls zero (type bit 1) must read as zeros in the
#      reference.  (Bit 0 "hole" alone promises nothing about contents.)
#
# One line is printed per image ("NAME: ok ...").  Any mismatch fails
# the test with a message naming the image and the first bad offset.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdcopy --version
requires nbdinfo --version
requires nbdsh --version
requires /usr/bin/python3 --version
requires md5sum --version

PY=/usr/bin/python3
imgdir=$tmpdir/img
mkdir -p "$imgdir"

nr_images=0

# Does the plugin have zstd?  A build without libzstd says
# qcow2_zstd=no in --dump-plugin; then the zstd images are skipped
# (and that is said).  If the line is absent, assume yes.
have_zstd=yes
if nbdkit "$PLUGIN" --dump-plugin 2>/dev/null | grep -q '^qcow2_zstd=no'; then
  have_zstd=no
  echo "$0: plugin built without zstd: zstd images skipped"
fi

#----------------------------------------------------------------------
# Deterministic data.

# pat1: compressible but aperiodic text (so a read from the wrong
# offset within or across clusters shows up, and compressed clusters
# really compress).  pat2: incompressible bytes (a sha256 chain), for
# clusters that qemu has to store uncompressed even with -c.  Their
# lengths are odd so that repeats never line up with clusters.
pat1=$tmpdir/pat1
pat2=$tmpdir/pat2
$PY - "$pat1" "$pat2" <<'EOF'
import hashlib, sys
t = "".join("%08x%s" % ((i * 2654435761) & 0xffffffff,
                        "\n" if i % 7 == 6 else " ") for i in range(33400))
open(sys.argv[1], "wb").write(t.encode()[:300007])
h = b"nbdkit-qcow2"
out = bytearray()
while len(out) < 131071:
    h = hashlib.sha256(h).digest()
    out += h
open(sys.argv[2], "wb").write(bytes(out[:131071]))
EOF

# The standard set of writes, as "pattern offset length" where pattern
# is a byte (qemu-io -P) or pat1/pat2 (qemu-io -s).  Offsets and
# lengths are odd on purpose and cross 512 B, 4 KiB, 64 KiB, 2 MiB,
# 16 MiB and 32 MiB boundaries (cluster sizes; the L2-table coverage of
# 512 B clusters is 32 KiB, of 4 KiB clusters 2 MiB, of 16 KiB clusters
# with extended L2 16 MiB; 256 MiB and 512 MiB are crossed too when the
# image is big enough).  "END" means the last byte of the image.
std_writes="
0x01 0 1
0x02 511 2
pat1 4090 10
0x03 32760 17
0x04 32767 33000
pat1 65000 70000
0x05 98303 32771
pat2 200001 70001
0x06 2097147 11
pat1 3000001 1048573
0x07 5242880 65536
0x08 16777211 9
pat2 16777300 40000
pat1 33554431 300007
0x09 50000000 4097
0x0a 268435453 7
pat1 536870900 100000
0x0b END 1
"

# fill IMG [EXTRA_QEMU_IO_COMMAND...]
# Apply std_writes (those that fit in the image) and then any extra
# qemu-io commands, all in one qemu-io run.
fill ()
{
  local img=$1; shift
  local size pat off len
  local -a cmds=()
  size=$(qemu-img info --output=json "$img" |
         $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  while read -r pat off len; do
    [ -n "$pat" ] || continue
    [ "$off" != END ] || off=$((size - len))
    [ $((off + len)) -le "$size" ] || continue
    case "$pat" in
      pat1) cmds+=(-c "write -s $pat1 $off $len") ;;
      pat2) cmds+=(-c "write -s $pat2 $off $len") ;;
      *)    cmds+=(-c "write -P $pat $off $len") ;;
    esac
  done <<< "$std_writes"
  for c in "$@"; do cmds+=(-c "$c"); done
  qio "$img" "${cmds[@]}"
}

# qio IMG -c CMD [-c CMD...]: qemu-io, quiet unless it fails.
qio ()
{
  local img=$1; shift
  local out
  if ! out=$(qemu-io -f qcow2 "$@" "$img" 2>&1); then
    echo "$out" >&2
    fail "qemu-io on $img failed"
  fi
}

# qio_cmds IMG CMD...: same, each argument one command.
qio_cmds ()
{
  local img=$1; shift
  local -a cmds=()
  for c in "$@"; do cmds+=(-c "$c"); done
  qio "$img" "${cmds[@]}"
}

# new NAME SIZE [qemu-img create args...]: make $imgdir/NAME.qcow2,
# set $img to it.
new ()
{
  local name=$1 size=$2; shift 2
  img=$imgdir/$name.qcow2
  qemu-img create -q -f qcow2 "$@" "$img" "$size"
}

#----------------------------------------------------------------------
# The checks.

cat > "$tmpdir/check.py" <<'EOF'
# check.py NAME REF.raw OUT.raw MAP.json
# (a) OUT must equal REF byte for byte.  (b) The extents in MAP must
# tile [0, size) exactly, and every extent with the zero bit (type & 2)
# must be all zeros in REF.  Prints a one-line summary on success.
# Holes are skipped with SEEK_DATA/SEEK_HOLE: the first read of a hole
# costs as much as a read of data (the kernel fills the page cache with
# zero pages), seconds for a sparse 1 GiB file.
import json, os, sys
name, ref, out, mapfile = sys.argv[1:5]
CHUNK = 4 << 20
ZEROS = bytes(CHUNK)

def die(msg):
    print("%s: FAILED: %s" % (name, msg), file=sys.stderr)
    sys.exit(1)

def next_change(fd, pos, size):
    """The end of the run of data or hole that starts at pos."""
    try:
        if os.lseek(fd, pos, os.SEEK_DATA) == pos:
            return os.lseek(fd, pos, os.SEEK_HOLE)
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:             # ENXIO: only a hole from pos to EOF
        return size

def is_hole(fd, pos, size):
    try:
        return os.lseek(fd, pos, os.SEEK_DATA) != pos
    except OSError:
        return True

def runs(fds, start, end, size):
    """Split [start, end) where any of fds changes between data and hole;
    yield (offset, length, all_holes)."""
    pos = start
    while pos < end:
        nxt = min([end] + [next_change(fd, pos, size) for fd in fds])
        yield pos, nxt - pos, all(is_hole(fd, pos, size) for fd in fds)
        pos = nxt

def read_at(fd, off, n):
    buf = os.pread(fd, n, off)
    if len(buf) != n:
        die("short read at %d" % off)
    return buf

size = os.path.getsize(ref)
if os.path.getsize(out) != size:
    die("plugin export is %d bytes, qemu-img says %d" %
        (os.path.getsize(out), size))
fr = os.open(ref, os.O_RDONLY)
fo = os.open(out, os.O_RDONLY)

# (a) data.
for off, length, holes in runs([fr, fo], 0, size, size):
    if holes:
        continue
    for p in range(off, off + length, CHUNK):
        n = min(CHUNK, off + length - p)
        a = read_at(fr, p, n)
        b = read_at(fo, p, n)
        if a != b:
            i = next(i for i in range(n) if a[i] != b[i])
            lo = i - i % 16
            die("data differs from qemu-img convert -O raw at offset %d (%#x)"
                " (%d bytes differ in the %d-byte block at %d)\n"
                "  qemu-img: %s\n  plugin:   %s" %
                (p + i, p + i, sum(x != y for x, y in zip(a, b)), n, p,
                 a[lo:lo+16].hex(" "), b[lo:lo+16].hex(" ")))

# (b) block status.
with open(mapfile) as f:
    extents = json.load(f)
pos = zero = 0
for e in extents:
    off, length, ty = e["offset"], e["length"], e["type"]
    if off != pos:
        die("map: extent at %d, expected one at %d (gap or overlap)" %
            (off, pos))
    if length <= 0:
        die("map: extent at %d has length %d" % (off, length))
    if off + length > size:
        die("map: extent [%d, +%d) runs past the end (%d)" %
            (off, length, size))
    if ty & 2:
        for roff, rlen, holes in runs([fr], off, off + length, size):
            if holes:
                continue
            for p in range(roff, roff + rlen, CHUNK):
                n = min(CHUNK, roff + rlen - p)
                buf = read_at(fr, p, n)
                if buf != ZEROS[:n]:
                    i = next(i for i in range(n) if buf[i])
                    die("map: extent [%d, +%d) type %d (%s) claims zero, "
                        "but byte %d is %#x" %
                        (off, length, ty, e.get("description", ""),
                         p + i, buf[i]))
        zero += length
    pos = off + length
if pos != size:
    die("map covers [0, %d), export is %d bytes" % (pos, size))
print("%d extents, %d%% zero" % (len(extents), zero * 100 // size if size else 0))
EOF

ref=$tmpdir/ref.raw
out=$tmpdir/out.raw
map=$tmpdir/map.json
export out map

# check NAME IMG [NBDKIT_OPTION...]
# Serve IMG from the current directory and compare with qemu-img.
check ()
{
  local name=$1 img=$2; shift 2
  local summary
  rm -f "$ref" "$out" "$map"
  qemu-img convert -f qcow2 -O raw "$img" "$ref" ||
    fail "$name: qemu-img convert failed (bug in the test)"
  if ! nbdkit -U - "$@" "$PLUGIN" file="$img" \
       --run 'nbdcopy --no-extents "$uri" "$out" && nbdinfo --map --json "$uri" > "$map"' \
       2> "$tmpdir/nbdkit.err"; then
    cat "$tmpdir/nbdkit.err" >&2
    fail "$name: nbdkit/nbdcopy/nbdinfo failed on $img"
  fi
  if grep -Eq 'AddressSanitizer|runtime error' "$tmpdir/nbdkit.err"; then
    cat "$tmpdir/nbdkit.err" >&2
    fail "$name: sanitizer report"
  fi
  summary=$($PY "$tmpdir/check.py" "$name" "$ref" "$out" "$map") ||
    fail "$name: reads through the plugin disagree with qemu-img"
  rm -f "$ref" "$out" "$map"
  nr_images=$((nr_images + 1))
  echo "$name: ok ($summary)"
}

# check_readonly NAME IMG: with nbdkit -r the export is read-only,
# reads match, and every kind of write is refused.  (Permanent.)
check_readonly ()
{
  local name=$1 img=$2
  local sum_before sum_after
  sum_before=$(md5sum < "$img")
  check "$name" "$img" -r
  nbdkit -U - -r "$PLUGIN" file="$img" --run 'nbdsh -u "$uri" -c "
assert h.is_read_only()
for op in (lambda: h.pwrite(b\"x\", 0),
           lambda: h.zero(512, 0),
           lambda: h.trim(512, 0)):
    try:
        op()
    except nbd.Error:
        pass
    else:
        raise AssertionError(\"write allowed on read-only export\")
"' || fail "$name: nbdkit -r accepted a write"
  sum_after=$(md5sum < "$img")
  [ "$sum_before" = "$sum_after" ] || fail "$name: image changed under nbdkit -r"
  echo "$name: read-only ok"
}

# compressed NAME SRC CREATE_OPTIONS: NAME.qcow2 = qemu-img convert -c
# of SRC; qemu-img check must count compressed clusters (otherwise the
# case would test nothing).
compressed ()
{
  local name=$1 src=$2 opts=$3
  local n
  img=$imgdir/$name.qcow2
  qemu-img convert -c -f qcow2 -O qcow2 -o "$opts" "$src" "$img"
  n=$(qemu-img check --output=json "$img" |
      $PY -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))')
  [ "$n" -gt 0 ] || fail "$name: qemu made no compressed clusters (bug in the test)"
}

#----------------------------------------------------------------------
# The matrix.  Images are checked as they are made and the raw copies
# removed, so disk use stays at a few hundred MiB at most.

cd "$tmpdir"

# Cluster sizes (v3, 16-bit refcounts).
for cs in 512 4096 65536 2M; do
  new c$cs 64M -o cluster_size=$cs
  fill "$img"
  check "cluster-$cs" "$img"
done

# 64 KiB clusters, 1 GiB: the 256 MiB and 512 MiB writes cross L2
# tables (one L2 table maps 512 MiB here).
new c64k-1g 1G
fill "$img"
check "cluster-65536-1G" "$img"

# compat=0.10 (version 2).
for cs in 4096 65536; do
  new v2-$cs 64M -o compat=0.10,cluster_size=$cs
  fill "$img" "write -z 65536 65536" "write -z 3000000 5000"
  check "compat-0.10-$cs" "$img"
done

# Refcount widths.
for rb in 1 16 64; do
  new rc$rb 64M -o refcount_bits=$rb
  fill "$img"
  check "refcount-bits-$rb" "$img"
done
new rc1-512 64M -o refcount_bits=1,cluster_size=512
fill "$img"
check "refcount-bits-1-cluster-512" "$img"

# Extended L2 (32 subclusters per cluster), with zeroes and discards
# on subcluster boundaries and inside subclusters.
new extl2-64k 300M -o extended_l2=on,cluster_size=64K
fill "$img" "write -z 67584 2048" "write -z 3002048 4096" \
     "discard 200704 2048" "write -z 16777300 1000" \
     "write -P 0x5a 5244928 1"
check "extended-l2-64K" "$img"
new extl2-16k 64M -o extended_l2=on,cluster_size=16K
fill "$img" "write -z 66048 512" "write -z 3001344 1024" \
     "discard 200704 8192" "write -P 0x5b 5243393 3"
check "extended-l2-16K" "$img"

# Compressed clusters (whole images converted with -c, then some plain
# writes on top so compressed and normal clusters mix).
new csrc 64M
fill "$img"
csrc=$img
compressed compressed-zlib-64K "$csrc" compression_type=zlib
check "compressed-zlib-64K" "$img"
compressed compressed-zlib-4K "$csrc" compression_type=zlib,cluster_size=4096
check "compressed-zlib-4K" "$img"
compressed compressed-zlib-2M "$csrc" compression_type=zlib,cluster_size=2M
check "compressed-zlib-2M" "$img"
compressed compressed-zlib-v2 "$csrc" compat=0.10
check "compressed-zlib-v2" "$img"
compressed compressed-zlib-mixed "$csrc" compression_type=zlib
qio_cmds "$img" "write -P 0x77 3001000 70000" "write -z 33554431 100000" \
         "discard 5242880 65536"
check "compressed-zlib-mixed" "$img"
compressed compressed-zlib-extl2 "$csrc" compression_type=zlib,extended_l2=on
check "compressed-zlib-extended-l2" "$img"
if [ "$have_zstd" = yes ]; then
  compressed compressed-zstd-64K "$csrc" compression_type=zstd
  check "compressed-zstd-64K" "$img"
  compressed compressed-zstd-4K "$csrc" compression_type=zstd,cluster_size=4096
  check "compressed-zstd-4K" "$img"
  compressed compressed-zstd-mixed "$csrc" compression_type=zstd,cluster_size=16K
  qio_cmds "$img" "write -P 0x78 3001000 70000" "write -z 33554431 100000"
  check "compressed-zstd-mixed" "$img"
fi
rm -f "$csrc"

# Compressed writes by qemu-io itself (write -c, whole clusters).
new wc 64M -o cluster_size=4096
qio_cmds "$img" "write -c -P 0x31 0 65536" "write -c -s $pat1 1048576 4096" \
         "write -P 0x32 1050000 100"
check "compressed-by-qemu-io" "$img"

# Backing files, named by relative paths, served from another
# directory: names must resolve against the overlay's directory, not
# the current one.
mkdir -p sub/deeper elsewhere

# qcow2 backing.
qemu-img create -q -f qcow2 sub/b-base.qcow2 64M
fill sub/b-base.qcow2
qemu-img create -q -f qcow2 -b b-base.qcow2 -F qcow2 sub/b-top.qcow2 64M
qio_cmds sub/b-top.qcow2 "write -P 0xb1 60000 10000" \
         "write -P 0xb2 3000000 123457" "write -z 3500000 65536" \
         "write -z 33554432 131072" "discard 16711680 131072"
cd elsewhere; check "backing-qcow2-relative" ../sub/b-top.qcow2; cd "$tmpdir"

# v2 overlay on the same base (no zero flag: write -z allocates).
qemu-img create -q -f qcow2 -o compat=0.10 -b b-base.qcow2 -F qcow2 sub/b-top-v2.qcow2 64M
qio_cmds sub/b-top-v2.qcow2 "write -P 0xb3 60000 10000" "write -z 3000000 65536"
cd elsewhere; check "backing-qcow2-v2-overlay" ../sub/b-top-v2.qcow2; cd "$tmpdir"

# raw backing, shorter than the overlay and of an odd size: reads
# past its end (even inside the cluster that straddles it) are zeros.
$PY - sub/r-base.raw "$pat1" <<'EOF'
import sys
p = open(sys.argv[2], "rb").read()
with open(sys.argv[1], "wb") as f:
    for i in range(17):
        f.write(p)                     # 17 * 300007 = 5100119 bytes
EOF
qemu-img create -q -f qcow2 -o cluster_size=4096 -b r-base.raw -F raw sub/r-top.qcow2 64M
qio_cmds sub/r-top.qcow2 "write -P 0xc1 5099000 500" "write -z 4096 8192" \
         "write -P 0xc2 40000000 1"
cd elsewhere; check "backing-raw-relative-short" "$tmpdir/sub/r-top.qcow2"; cd "$tmpdir"

# qcow2 backing shorter than the overlay (16 MiB under 64 MiB), with
# data up to its last byte.
qemu-img create -q -f qcow2 sub/s-base.qcow2 16M
fill sub/s-base.qcow2
qemu-img create -q -f qcow2 -b s-base.qcow2 -F qcow2 sub/s-top.qcow2 64M
qio_cmds sub/s-top.qcow2 "write -P 0xd1 16777000 1000"
cd elsewhere; check "backing-qcow2-short" ../sub/s-top.qcow2; cd "$tmpdir"

# Chain of depth 3 across directories:
#   sub/c3.qcow2 -> deeper/c2.qcow2 -> ../c1.qcow2 (= sub/c1.qcow2)
qemu-img create -q -f qcow2 -o cluster_size=4096 sub/c1.qcow2 64M
fill sub/c1.qcow2
qemu-img create -q -f qcow2 -o cluster_size=16K -b ../c1.qcow2 -F qcow2 sub/deeper/c2.qcow2 64M
qio_cmds sub/deeper/c2.qcow2 "write -P 0xe2 0 4096" "write -P 0xe2 3000500 20000" \
         "write -z 16777211 9"
qemu-img create -q -f qcow2 -b deeper/c2.qcow2 -F qcow2 sub/c3.qcow2 64M
qio_cmds sub/c3.qcow2 "write -P 0xe3 2048 1024" "write -P 0xe3 3010000 1000" \
         "write -z 33554431 1000"
cd elsewhere; check "backing-chain-3" ../sub/c3.qcow2; cd "$tmpdir"

# Zero clusters on v3 without backing (whole clusters get the zero
# flag; partial ones are written as zeros), with and without unmap.
new zero 64M
fill "$img" "write -z 65536 131072" "write -z -u 3014656 524288" \
     "write -z 33554431 1001" "write -z 0 1"
check "zero-clusters-v3" "$img"

# Discards: aligned, unaligned (only whole clusters go), and over L2
# boundaries with small clusters.
new discard 64M -o cluster_size=512
fill "$img" "discard 32256 1024" "discard 3000001 600000" "discard 0 512" \
     "discard 33554431 300007"
check "discard-512" "$img"
new discard64k 64M
fill "$img" "discard 65536 65536" "discard 3000001 600000"
check "discard-64K" "$img"

# External data files (absolute names).
new datafile 64M -o data_file="$imgdir/datafile.data"
fill "$img" "write -z 65536 65536" "discard 3145728 65536"
check "data-file" "$img"
new datafile-raw 64M -o data_file="$imgdir/datafile-raw.data",data_file_raw=on
fill "$img" "write -z 65536 65536"
check "data-file-raw" "$img"

# Lazy refcounts: a clean image, and a dirty one (qemu-io aborted after
# a flush, so the L2 tables are on disk but the dirty bit is set and
# refcounts may be stale).
new lazy 64M -o lazy_refcounts=on
fill "$img"
check "lazy-refcounts" "$img"
new lazy-dirty 64M -o lazy_refcounts=on
fill "$img"
(qemu-io -f qcow2 -c "write -P 0xf1 7000000 300000" -c flush -c abort \
         "$img" || :) >/dev/null 2>&1
$PY -c '
import sys
f = open(sys.argv[1], "rb"); f.seek(72)
sys.exit(0 if int.from_bytes(f.read(8), "big") & 1 else 1)' "$img" ||
  fail "lazy-dirty: qemu-io abort did not leave the image dirty (bug in the test)"
check "lazy-refcounts-dirty" "$img"

# Internal snapshot, then more writes (clusters shared with the
# snapshot lose QCOW_OFLAG_COPIED; the active layer must still read
# the new data).
new snap 64M -o cluster_size=4096
fill "$img"
qemu-img snapshot -c snap1 "$img"
qio_cmds "$img" "write -P 0xa1 1000 5000" "write -P 0xa2 3000001 100" \
         "write -z 33554431 300007" "discard 200000 70000"
qemu-img snapshot -c snap2 "$img"
qio_cmds "$img" "write -P 0xa3 2097147 11"
check "internal-snapshots" "$img"

# Preallocated metadata (every L2 entry points at a cluster, most never
# written).
new prealloc 64M -o preallocation=metadata
fill "$img"
check "preallocation-metadata" "$img"
new prealloc-v2 64M -o preallocation=metadata,compat=0.10,cluster_size=4096
fill "$img"
check "preallocation-metadata-v2" "$img"

# An empty image and a tiny one of one sector.
new empty 64M
check "empty" "$img"
new tiny 512 -o cluster_size=512
qio_cmds "$img" "write -P 0x42 100 200"
check "tiny" "$img"

# nbdkit -r on one image.
check_readonly "read-only" "$imgdir/c4096.qcow2"

echo "$0: $nr_images images read correctly"
