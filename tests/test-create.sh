#!/usr/bin/env bash
# nbdkit-qcow2: create=true makes new images that QEMU agrees with.
#
# (1) A matrix of creation options (cluster sizes 512 B to 2 MiB,
#     compat 0.10 and 1.1, refcount widths 1 to 64, extended L2, zstd,
#     every preallocation mode, odd sizes).  For each, the plugin
#     creates the image and serves it; through nbdsh a fixed set of
#     writes (odd offsets and lengths, crossing cluster and L2 table
#     boundaries, the last byte) is made and the whole disk is read back
#     and compared with the expected content.  Then:
#       - qemu-img check must exit 0 (no leaks, no corruption);
#       - qemu-img info must show what was asked for: virtual size,
#         cluster size, compat, refcount bits, extended L2, compression
#         type, backing file name and format;
#       - qemu-img compare with the expected raw content must agree.
# (2) Preallocated images (metadata, falloc, full) read as zeros before
#     any write, every cluster is allocated (qemu-img check: 100.00%
#     allocated; qemu-img map: all data without extended L2, where the
#     subclusters stay unallocated as in QEMU), and writes land in the
#     preallocated clusters (the file does not grow).
# (3) Backing files: raw and qcow2, relative names stored as given and
#     resolved against the image's directory, the size taken from the
#     backing file when size= is not given, reads through the backing
#     file, and metadata preallocation with a backing file (extended L2
#     only, as qemu-img).
# (4) Refusals, each with its message and without leaving a file
#     behind: an existing file without create=force (which must be left
#     untouched), an image in use by another server even with
#     create=force, v2 with v3 features, bad cluster sizes and refcount
#     widths, too large sizes, a backing file without its format,
#     preallocation with a backing file without extended L2, creation
#     options without create=true.  And create=force replaces an image.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires nbdsh --version
requires md5sum --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3
d=$tmpdir
MiB=$((1024*1024))

have_zstd=yes
if nbdkit "$PLUGIN" --dump-plugin 2>/dev/null | grep -q '^qcow2_zstd=no'; then
  have_zstd=no
  echo "$0: plugin built without zstd: zstd cases skipped"
fi

#----------------------------------------------------------------------
# The writes, shared by nbdsh (apply to the export and check the whole
# disk) and by the expected-content builder (apply to a raw file).

cat > "$d/writes.py" <<'EOF'
import sys

def pattern(n, seed):
    return bytes(((i * 131 + seed * 7) % 251) + 1 for i in range(n))

def writes(size):
    w = [(0, 1), (511, 2), (4095, 4099), (65535, 65538),
         (1048576 + 7, 300000), (2097152 - 5, 11),
         (size // 2 - 1000, 3000), (size - 1, 1)]
    return [(off, pattern(n, i)) for i, (off, n) in enumerate(w)
            if off >= 0 and off + n <= size]

def base_content(size, base):
    """The backing file's content, clipped or zero-extended to size."""
    buf = bytearray(size)
    if base:
        b = open(base, "rb").read()[:size]
        buf[:len(b)] = b
    return buf

def expected(size, base):
    """The disk after the writes."""
    buf = base_content(size, base)
    for off, data in writes(size):
        buf[off:off + len(data)] = data
    return buf

def check_nbd(h, expect_file, do_writes):
    """Compare the export with expect_file (before writes if not
    do_writes); then make the writes, read each back, and compare the
    whole disk with the expected content after them."""
    size = h.get_size()
    exp = open(expect_file, "rb").read()
    assert len(exp) == size, "size %d, expected %d" % (size, len(exp))
    if do_writes:
        for off, data in writes(size):
            h.pwrite(data, off)
            assert h.pread(len(data), off) == data, "read back at %d" % off
    step = 4 << 20
    for off in range(0, size, step):
        n = min(step, size - off)
        got = h.pread(n, off)
        if got != exp[off:off + n]:
            bad = next(i for i in range(n) if got[i] != exp[off + i])
            raise AssertionError("byte %d differs" % (off + bad))

if __name__ == "__main__":
    # OUT SIZE [BASE [nowrites]]
    out, size = sys.argv[1], int(sys.argv[2])
    base = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    if len(sys.argv) > 4 and sys.argv[4] == "nowrites":
        data = base_content(size, base)
    else:
        data = expected(size, base)
    open(out, "wb").write(data)
EOF

# info_is IMG KEY=VALUE...: qemu-img info --output=json IMG shows these
# values (format-specific keys are looked up too; VALUE None means
# absent, as extended-l2 is for compat 0.10; a later KEY=VALUE
# overrides an earlier one).
info_is ()
{
  local img=$1; shift
  qemu-img info --output=json "$img" > "$d/info.json"
  $PY - "$d/info.json" "$@" <<'EOF' || fail "qemu-img info $img: wrong"
import json, sys
info = json.load(open(sys.argv[1]))
flat = dict(info)
flat.update(info.get("format-specific", {}).get("data", {}))
# Later KEY=VALUEs override earlier ones (the defaults).
want = dict(kv.split("=", 1) for kv in sys.argv[2:])
for k, v in want.items():
    got = flat.get(k)
    got = str(got).lower() if isinstance(got, bool) else str(got)
    if got != v:
        print("qemu-img info: %s is %s, expected %s" % (k, got, v))
        sys.exit(1)
EOF
}

# make_expected OUT SIZE [BASE [nowrites]]
make_expected ()
{
  $PY "$d/writes.py" "$@"
}

# create_serve IMG EXPECTED WRITES PARAMS...: create IMG with the plugin
# and serve it; through nbdsh compare it with EXPECTED (after the writes
# if WRITES is "writes").
create_serve ()
{
  local img=$1 exp=$2 w=$3; shift 3
  local dow=False
  [ "$w" = writes ] && dow=True
  rm -f "$img"
  serve_run file="$img" create=true "$@" --run "
    nbdsh -u \"\$uri\" -c '
exec(open(\"$d/writes.py\").read())
check_nbd(h, \"$exp\", $dow)
'" || fail "create/serve $img ($*) failed"
}

# qcompare EXPECTED IMG
qcompare ()
{
  qemu-img compare -q -f raw -F qcow2 "$1" "$2" ||
    fail "qemu-img compare $1 $2: contents differ"
}

#----------------------------------------------------------------------
# (1) The option matrix.  Each entry: size, qemu-img info expectations
# ("-" = only the defaults), plugin parameters.

nr=0
matrix_case ()
{
  local size=$1 info=$2; shift 2
  local img=$d/m$nr.qcow2 exp=$d/m$nr.raw vsize
  nr=$((nr + 1))
  vsize=$(( (size + 511) / 512 * 512 ))
  make_expected "$exp" "$vsize"
  create_serve "$img" "$exp" writes size="$size" "$@"
  qcheck "$img"
  # Defaults unless the entry says otherwise.
  local -a want=(virtual-size=$vsize cluster-size=65536 compat=1.1
                 refcount-bits=16 extended-l2=false compression-type=zlib)
  [ "$info" = - ] || want+=($info)
  info_is "$img" "${want[@]}"
  qcompare "$exp" "$img"
  echo "create $*: ok"
}

matrix_case $((24*MiB)) -
matrix_case $((24*MiB)) "compat=0.10 extended-l2=None" compat=0.10
matrix_case $((24*MiB)) "cluster-size=512" cluster-size=512
matrix_case $((24*MiB)) "cluster-size=4096" cluster-size=4K
matrix_case $((24*MiB)) "cluster-size=2097152" cluster-size=2M
matrix_case $((24*MiB)) "refcount-bits=1" refcount-bits=1
matrix_case $((24*MiB)) "refcount-bits=8 cluster-size=512" \
  refcount-bits=8 cluster-size=512
matrix_case $((24*MiB)) "refcount-bits=64" refcount-bits=64
matrix_case $((24*MiB)) "extended-l2=true" extended-l2=on
matrix_case $((24*MiB)) "extended-l2=true cluster-size=16384" \
  extended-l2=on cluster-size=16K
if [ $have_zstd = yes ]; then
  matrix_case $((24*MiB)) "compression-type=zstd" compression-type=zstd
  matrix_case $((24*MiB)) \
    "compression-type=zstd extended-l2=true refcount-bits=2" \
    compression-type=zstd extended-l2=on refcount-bits=2
fi
matrix_case 1000001 - compat=1.1
matrix_case $((3*MiB + 512)) "cluster-size=2097152" cluster-size=2M
matrix_case $((24*MiB)) "compat=1.1" preallocation=metadata
matrix_case $((24*MiB)) "cluster-size=512 refcount-bits=64" \
  preallocation=metadata cluster-size=512 refcount-bits=64
matrix_case $((24*MiB)) "compat=0.10 extended-l2=None" \
  preallocation=metadata compat=0.10
matrix_case $((24*MiB)) "extended-l2=true" \
  preallocation=metadata extended-l2=on
matrix_case $((24*MiB)) "refcount-bits=1 cluster-size=4096" \
  preallocation=falloc refcount-bits=1 cluster-size=4K
matrix_case $((24*MiB)) "extended-l2=true cluster-size=32768" \
  preallocation=full extended-l2=on cluster-size=32K
# An empty disk.
img=$d/empty.qcow2
rm -f "$img"
serve_run file="$img" create=true size=0 \
  --run 'nbdsh -u "$uri" -c "assert h.get_size() == 0"' ||
  fail "size=0"
qcheck "$img"
info_is "$img" virtual-size=0

#----------------------------------------------------------------------
# (2) Preallocation: all zeros before any write, every cluster
# allocated, and the writes fill preallocated clusters in place.

prealloc_case ()
{
  local mode=$1; shift
  local img=$d/p.qcow2 exp=$d/p.raw size=$((16*MiB)) before after
  make_expected "$exp" $size "" nowrites
  create_serve "$img" "$exp" nowrites size=$size preallocation=$mode "$@"
  qcheck "$img"
  qemu-img check "$img" | grep -q ' 100.00% allocated' ||
    fail "preallocation=$mode $*: not every cluster is allocated"
  qemu-img map --output=json "$img" > "$d/map.json"
  $PY - "$d/map.json" "$size" "$*" <<'EOF' || fail "qemu-img map: wrong"
import json, sys
m = json.load(open(sys.argv[1]))
size, opts = int(sys.argv[2]), sys.argv[3]
assert m[0]["start"] == 0 and sum(e["length"] for e in m) == size
for e in m:
    if "extended-l2=on" in opts:
        # QEMU too leaves preallocated subclusters unallocated.
        assert not e["present"] and e["zero"], e
    else:
        assert e["present"] and e["data"] and "offset" in e, e
EOF
  before=$(stat -c %s "$img")
  make_expected "$exp" $size
  serve_run file="$img" --run "
    nbdsh -u \"\$uri\" -c '
exec(open(\"$d/writes.py\").read())
check_nbd(h, \"$exp\", True)
'" || fail "writing to preallocated $img failed"
  after=$(stat -c %s "$img")
  [ "$before" = "$after" ] ||
    fail "preallocation=$mode $*: file grew from $before to $after"
  qcheck "$img"
  qcompare "$exp" "$img"
  echo "preallocation=$mode $*: ok"
}

prealloc_case metadata
prealloc_case metadata cluster-size=512
prealloc_case metadata refcount-bits=1 cluster-size=1K
prealloc_case metadata extended-l2=on
prealloc_case falloc
prealloc_case full compat=0.10

# falloc and full really allocate the data on disk; metadata does not.
for mode in metadata falloc full; do
  rm -f "$d/pa.qcow2"
  serve_run file="$d/pa.qcow2" create=true size=$((32*MiB)) \
    preallocation=$mode --run true || fail "preallocation=$mode"
  blocks=$(stat -c '%b * %B' "$d/pa.qcow2")
  blocks=$(( blocks ))
  case $mode in
    metadata) [ $blocks -lt $((8*MiB)) ] ;;
    *) [ $blocks -ge $((32*MiB)) ] ;;
  esac || fail "preallocation=$mode: $blocks bytes allocated on disk"
done
echo "preallocation disk usage: ok"

#----------------------------------------------------------------------
# (3) Backing files.

mkdir -p "$d/sub"
$PY - "$d/sub/base.raw" <<'EOF'
import sys
n = 6 * 1024 * 1024 + 1000          # not a multiple of 512
open(sys.argv[1], "wb").write(bytes((i * 7 + 3) % 256 for i in range(n)))
EOF
qemu-img convert -f raw -O qcow2 "$d/sub/base.raw" "$d/sub/base.qcow2"

backing_case ()
{
  local size=$1 fmt=$2 info=$3; shift 3
  local img=$d/sub/over.qcow2 exp=$d/over.raw vsize
  if [ "$size" = - ]; then
    vsize=$(( ($(stat -c %s "$d/sub/base.raw") + 511) / 512 * 512 ))
  else
    vsize=$size
  fi
  make_expected "$exp" $vsize "$d/sub/base.raw" nowrites
  # Run from $d: the relative backing name is relative to sub/.
  cd "$d"
  local -a sz=()
  [ "$size" = - ] || sz=(size=$size)
  create_serve sub/over.qcow2 "$exp" nowrites "${sz[@]}" \
    backing=base.$fmt backing-format=$fmt "$@"
  cd - >/dev/null
  make_expected "$exp" $vsize "$d/sub/base.raw"
  serve_run file="$img" --run "
    nbdsh -u \"\$uri\" -c '
exec(open(\"$d/writes.py\").read())
check_nbd(h, \"$exp\", True)
'" || fail "writing to $img with backing failed"
  qcheck "$img"
  info_is "$img" virtual-size=$vsize backing-filename=base.$fmt \
    backing-filename-format=$fmt $info
  qcompare "$exp" "$img"
  echo "backing=base.$fmt size=$size $*: ok"
}

backing_case - raw ""
backing_case - qcow2 ""
backing_case $((16*MiB)) raw "cluster-size=512" cluster-size=512
backing_case $((4*MiB)) qcow2 "compat=0.10 extended-l2=None" compat=0.10
backing_case $((8*MiB)) raw "extended-l2=true" \
  extended-l2=on preallocation=metadata
backing_case - qcow2 "extended-l2=true cluster-size=16384" \
  extended-l2=on cluster-size=16K preallocation=full

#----------------------------------------------------------------------
# (4) Refusals.

# refuse MESSAGE PARAMS...: the plugin must refuse to start with
# PARAMS, saying MESSAGE (an extended regexp), and no new image may be
# left behind.
refuse ()
{
  local msg=$1; shift
  local img=$d/refused.qcow2
  rm -f "$img"
  if serve_run file="$img" "$@" --run true 2> "$d/err"; then
    fail "$* was accepted"
  fi
  grep -Eq "$msg" "$d/err" || {
    cat "$d/err" >&2
    fail "$*: message does not match /$msg/"
  }
  [ ! -e "$img" ] || fail "$*: left $img behind"
  echo "refused $*: ok"
}

refuse 'only used with create=true' size=1M
refuse 'only used with create=true' create=false size=1M
refuse 'only used with create=true' size=1M locking=on
refuse 'size is required' create=true
refuse 'too large for cluster size.*larger cluster size' \
  create=true size=200G cluster-size=512
refuse 'virtual size .* is too large' create=true size=4E cluster-size=2M
refuse 'cluster size 3000 must be a power of 2' create=true size=1M \
  cluster-size=3000
refuse 'cluster size 4194304 must be a power of 2' create=true size=1M \
  cluster-size=4M
refuse 'refcount width 3 must be a power of 2' create=true size=1M \
  refcount-bits=3
refuse 'refcount width 128 must be a power of 2' create=true size=1M \
  refcount-bits=128
refuse 'refcount-bits must be a power of 2' create=true size=1M \
  refcount-bits=0
refuse 'cluster-size must be a power of 2' create=true size=1M \
  cluster-size=0
refuse 'extended L2 entries need compat=1.1' create=true size=1M \
  compat=0.10 extended-l2=on
refuse 'zstd needs compat=1.1' create=true size=1M compat=0.10 \
  compression-type=zstd
refuse 'refcount widths other than 16 bits need compat=1.1' create=true \
  size=1M compat=0.10 refcount-bits=8
refuse 'extended L2 entries need a cluster size of at least 16K' \
  create=true size=1M extended-l2=on cluster-size=8K
refuse 'compat must be 0.10 or 1.1' create=true size=1M compat=2
refuse 'preallocation must be' create=true size=1M preallocation=yes
refuse 'backing file needs its format' create=true size=1M \
  backing="$d/sub/base.raw"
refuse 'backing file and preallocation can only be used together' \
  create=true size=1M backing="$d/sub/base.raw" backing-format=raw \
  preallocation=metadata
refuse 'backing file and preallocation can only be used together' \
  create=true size=1M backing="$d/sub/base.raw" backing-format=raw \
  preallocation=falloc
refuse 'cannot open backing file .*nonexistent' create=true size=1M \
  backing=nonexistent backing-format=raw
refuse 'is not a qcow2 image' create=true size=1M \
  backing="$d/sub/base.raw" backing-format=qcow2
# A 412-byte name of an existing file: too long for a 512-byte cluster.
refuse 'do not fit in one 512-byte cluster' create=true size=1M \
  cluster-size=512 backing="$(printf './%.0s' {1..200})sub/base.raw" \
  backing-format=raw

# An existing file is never replaced without create=force.
img=$d/exists.qcow2
qemu-img create -q -f qcow2 "$img" 1M
qemu-img resize -q "$img" 2M
sum=$(md5sum < "$img")
if serve_run file="$img" create=true size=4M --run true 2> "$d/err"; then
  fail "create=true replaced an existing file"
fi
grep -q 'file exists: refusing to overwrite it (use create=force' "$d/err" ||
  fail "create=true on an existing file: wrong message: $(cat "$d/err")"
[ "$(md5sum < "$img")" = "$sum" ] || fail "create=true modified $img"
echo "existing file refused: ok"

# Nor one that another server is using, even with create=force.
if serve_run file="$img" --run '
     nbdkit -U - "$PLUGIN" file="'"$img"'" create=force size=4M --run true
   ' 2> "$d/err"; then
  fail "create=force replaced an image in use"
fi
grep -q 'Failed to get "write" lock' "$d/err" ||
  fail "create=force on an image in use: wrong message: $(cat "$d/err")"
[ "$(md5sum < "$img")" = "$sum" ] || fail "create=force modified $img in use"
echo "image in use refused: ok"

# create=force replaces it with a fresh image: new size, all zeros.
exp=$d/force.raw
make_expected "$exp" $((4*MiB)) "" nowrites
serve_run file="$img" create=force size=4M cluster-size=4K --run "
  nbdsh -u \"\$uri\" -c '
exec(open(\"$d/writes.py\").read())
check_nbd(h, \"$exp\", False)
'" || fail "create=force failed"
qcheck "$img"
info_is "$img" virtual-size=$((4*MiB)) cluster-size=4096
qcompare "$exp" "$img"
echo "create=force replaced the image: ok"

# A relative file name is relative to the working directory.
mkdir -p "$d/cwd"
( cd "$d/cwd" && serve_run file=rel.qcow2 create=true size=1M --run true ) ||
  fail "relative file= with create=true"
qcheck "$d/cwd/rel.qcow2"
echo "relative file name: ok"
