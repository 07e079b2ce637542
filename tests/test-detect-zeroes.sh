#!/usr/bin/env bash
# nbdkit-qcow2: detect-zeroes=off|on|unmap, discard=unmap|ignore and
# discard-no-unref=on|off.
#
# Where QEMU (qemu-io, 7.2 here) has the same option, the same requests
# are made through the plugin and through qemu-io --image-opts on two
# copies of one image, and the results must agree: the allocated
# cluster count of `qemu-img check --output=json`, the map of `qemu-img
# map --output=json` (without host offsets), and `qemu-img compare`.
# QEMU 7.2 has no discard-no-unref (8.1 has), so that is checked against
# what the man page promises.  Every image must pass `qemu-img check`.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3
cd "$tmpdir"

# alloc IMG: the allocated cluster count qemu-img check reports.
alloc ()
{
    qemu-img check --output=json "$1" |
        $PY -c 'import json, sys; print(json.load(sys.stdin).get("allocated-clusters", 0))'
}

# qmap IMG: qemu-img map without host offsets or "present" (a zero
# flag and an unallocated cluster without backing file read the same),
# adjacent ranges of the same kind merged.
qmap ()
{
    qemu-img map --output=json "$1" |
        $PY -c 'import json, sys
out = []
for e in json.load(sys.stdin):
    k = (e["depth"], e["zero"], e["data"])
    if out and out[-1][2] == k and out[-1][0] + out[-1][1] == e["start"]:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"], k])
for s, n, k in out:
    print(s, n, *k)'
}

# ops_nbdsh OPS...: an nbdsh script doing OPS; ops_qemu OPS...: the same
# as qemu-io arguments.  An op is "write PAT OFF LEN" (PAT one byte),
# "zero OFF LEN" (may trim), "zeronh OFF LEN" (NO_HOLE) or "trim OFF LEN".
ops_nbdsh ()
{
    local op
    for op in "$@"; do
        set -- $op
        case $1 in
        write) echo "h.pwrite(bytes([$2]) * $4, $3)" ;;
        zero) echo "h.zero($3, $2)" ;;
        zeronh) echo "h.zero($3, $2, nbd.CMD_FLAG_NO_HOLE)" ;;
        trim) echo "h.trim($3, $2)" ;;
        *) fail "bad op $op" ;;
        esac
    done
}
ops_qemu ()
{
    local op
    for op in "$@"; do
        set -- $op
        case $1 in
        write) printf '%s\0' -c "write -P $2 $3 $4" ;;
        zero) printf '%s\0' -c "write -z -u $2 $3" ;;
        zeronh) printf '%s\0' -c "write -z $2 $3" ;;
        trim) printf '%s\0' -c "discard $2 $3" ;;
        esac
    done
}

# same BASE PLUGIN_OPTS QEMU_OPTS OPS...: run OPS on two copies of BASE,
# through the plugin with PLUGIN_OPTS and through qemu-io with
# QEMU_OPTS (image-opts, after driver=qcow2,file.filename=...), and
# compare.  Leaves the plugin's image in $tmpdir/ours.qcow2.
same ()
{
    local base=$1 popts=$2 qopts=$3 a b
    shift 3
    cp "$base" ours.qcow2
    cp "$base" qemu.qcow2
    ops_nbdsh "$@" > ops.py
    # shellcheck disable=SC2086
    serve_run file=ours.qcow2 $popts --run 'nbdsh -u "$uri" -c "$(cat ops.py)"'
    ops_qemu "$@" | xargs -0 qemu-io --image-opts \
        "driver=qcow2,file.filename=qemu.qcow2${qopts:+,$qopts}" >/dev/null
    qcheck ours.qcow2
    qcheck qemu.qcow2
    qemu-img compare ours.qcow2 qemu.qcow2 ||
        fail "$popts: contents differ from qemu-io's"
    a=$(alloc ours.qcow2) b=$(alloc qemu.qcow2)
    echo "$popts: allocated clusters $a (qemu-io: $b)"
    [ "$a" = "$b" ] || fail "$popts: $a allocated clusters, qemu-io $b"
    qmap ours.qcow2 > ours.map
    qmap qemu.qcow2 > qemu.map
    diff -u qemu.map ours.map || fail "$popts: map differs from qemu-io's"
}

MiB=$((1024 * 1024))
K64=65536
export MiB K64                  # used inside --run commands

# A 16 MiB v3 image, 64 KiB clusters, its first 4 MiB (64 clusters)
# written.
qemu-img create -f qcow2 base.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 4M" base.qcow2 >/dev/null
[ "$(alloc base.qcow2)" = 64 ] || fail "base image: $(alloc base.qcow2) clusters"

# All-zero writes: 1 MiB over data, one ragged 128 KiB (one whole
# cluster inside) over data, 8 MiB over nothing, then one data cluster.
zw=(
    "write 0 0 $MiB"
    "write 0 $((2 * MiB + 512)) $((2 * K64))"
    "write 0 $((8 * MiB)) $((7 * MiB))"
    "write 0x55 $((15 * MiB)) $K64"
)
same base.qcow2 "detect-zeroes=unmap" "detect-zeroes=unmap,discard=unmap" "${zw[@]}"
[ "$(alloc ours.qcow2)" = 48 ] || fail "detect-zeroes=unmap: not 64-17+1 clusters"
same base.qcow2 "detect-zeroes=on" "detect-zeroes=on" "${zw[@]}"
[ "$(alloc ours.qcow2)" = 65 ] || fail "detect-zeroes=on: not 64+1 clusters"
grep -q "^0 1048576 0 True False" ours.map ||
    fail "detect-zeroes=on: the zeroed MiB is not a zero range"
same base.qcow2 "" "" "${zw[@]}"
[ "$(alloc ours.qcow2)" = 177 ] || fail "detect-zeroes=off: zeroes not written"

# The issue's case: 8 MiB of zero writes (1 MiB each) and one data
# cluster into an empty image leave at most 2 allocated clusters.
qemu-img create -f qcow2 empty.qcow2 16M >/dev/null
eight=()
for i in 0 1 2 3 4 5 6 7; do eight+=("write 0 $((i * MiB)) $MiB"); done
eight+=("write 0x11 $((12 * MiB)) $K64")
same empty.qcow2 "detect-zeroes=unmap" "detect-zeroes=unmap,discard=unmap" "${eight[@]}"
n=$(alloc ours.qcow2)
[ "$n" -le 2 ] || fail "8 MiB of zeroes + 1 cluster: $n allocated clusters"

# A buffer mixing data and zero clusters (QEMU converts only all-zero
# requests, so compare with plain writes): every whole zero cluster of
# it is freed, ragged edges and data clusters are written.
cp base.qcow2 ours.qcow2
cp base.qcow2 plain.qcow2
cat > mixed.py <<EOF
cs = $K64
buf = bytearray(16 * cs)
for i in range(0, 16, 2):
    buf[i * cs + 100] = 0x77       # clusters 0, 2, 4, ... hold data
off = cs // 2                       # ragged: 8 whole zero clusters inside
h.pwrite(buf, off)
h.pwrite(bytearray(cs), 3 * $MiB, nbd.CMD_FLAG_FUA)
assert h.pread(cs, 3 * $MiB) == bytearray(cs)
assert h.pread(len(buf), off) == buf
EOF
serve_run file=ours.qcow2 detect-zeroes=unmap --run 'nbdsh -u "$uri" -c "$(cat mixed.py)"'
serve_run file=plain.qcow2 --run 'nbdsh -u "$uri" -c "$(cat mixed.py)"'
qcheck ours.qcow2
qemu-img compare ours.qcow2 plain.qcow2 || fail "mixed write: contents differ"
[ "$(alloc ours.qcow2)" = $((64 - 8 - 1)) ] ||
    fail "mixed write: $(alloc ours.qcow2) clusters, 55 expected"

# Where zeroes cannot be metadata (v2 with a backing file), zero
# writes are written as before: the same as without the option.
qemu-img create -f qcow2 -o compat=0.10 back2.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0x33 0 16M" back2.qcow2 >/dev/null
qemu-img create -f qcow2 -o compat=0.10 -b back2.qcow2 -F qcow2 over2.qcow2 >/dev/null
same over2.qcow2 "detect-zeroes=unmap" "detect-zeroes=unmap,discard=unmap" "${zw[@]}"
[ "$(alloc ours.qcow2)" = $((16 + 3 + 112 + 1)) ] ||
    fail "v2 overlay: zeroes were not written"

# discard=ignore: trims do nothing; zeroes that may trim still free
# clusters, as in QEMU 7.2.
ign=(
    "trim 0 $MiB"
    "zero $((2 * MiB)) $MiB"
    "trim $((3 * MiB)) $MiB"
)
same base.qcow2 "discard=ignore" "discard=ignore" "${ign[@]}"
[ "$(alloc ours.qcow2)" = 48 ] || fail "discard=ignore: trims freed clusters"
same base.qcow2 "" "discard=unmap" "${ign[@]}"
[ "$(alloc ours.qcow2)" = 16 ] || fail "discard=unmap: trims not done"
if serve_run file=ours.qcow2 discard=ignore detect-zeroes=unmap \
        --run true 2>err.txt; then
    fail "detect-zeroes=unmap with discard=ignore was accepted"
fi
grep -q "detect-zeroes=unmap needs discard=unmap" err.txt || {
    cat err.txt; fail "wrong error for detect-zeroes=unmap discard=ignore"; }

# discard-no-unref=on (not in QEMU 7.2): trims and zeroes keep the
# clusters allocated, which then read as zero.  check_nounref IMG
# EXPECTED_ALLOC [GROWTH] runs the same requests and checks the result
# (the file may grow by GROWTH bytes).
cat > nounref.py <<EOF
h.trim($MiB, 0)
h.trim($((2 * K64)), $((2 * MiB + 512)))    # one whole cluster inside
h.zero($MiB, $((3 * MiB)))                  # may trim
h.zero(4096, $((4 * MiB + 4096)))
for off, n in ((0, $MiB), ($((2 * MiB + K64)), $K64), ($((3 * MiB)), $MiB)):
    assert h.pread(n, off) == bytearray(n), off
assert h.pread(512, $((2 * MiB))) == b"\xaa" * 512
EOF
check_nounref ()
{
    local img=$1 want=$2 before
    before=$(stat -c %s "$img")
    serve_run file="$img" discard-no-unref=on --run 'nbdsh -u "$uri" -c "$(cat nounref.py)"'
    qcheck "$img"
    [ "$(alloc "$img")" = "$want" ] ||
        fail "discard-no-unref $img: $(alloc "$img") clusters, $want expected"
    [ "$(stat -c %s "$img")" -le $((before + ${3:-0})) ] ||
        fail "discard-no-unref $img: the file grew"
    qemu-img map --output=json "$img" > nounref.map
}
cp base.qcow2 nu.qcow2
check_nounref nu.qcow2 64
grep -q '"start": 0, "length": 1048576, "depth": 0, "present": true, "zero": true, "data": false' nounref.map ||
    fail "discard-no-unref: trimmed MiB is not a zero range"
# Extended L2 entries, and a v3 overlay: the same.
qemu-img create -f qcow2 -o extended_l2=on nux.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 4M" nux.qcow2 >/dev/null
check_nounref nux.qcow2 64
qemu-img create -f qcow2 back3.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0x33 0 16M" back3.qcow2 >/dev/null
qemu-img create -f qcow2 -b back3.qcow2 -F qcow2 nub.qcow2 >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 4M" nub.qcow2 >/dev/null
# (The ragged 4 KiB zero at 4 MiB copies a cluster up from the backing
# file: one more.)
check_nounref nub.qcow2 65 $K64
# Version 2: nothing can be allocated and read as zero, so trims do
# nothing (the data stays) and zeroes are written.
qemu-img create -f qcow2 -o compat=0.10 nu2.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 4M" nu2.qcow2 >/dev/null
serve_run file=nu2.qcow2 discard-no-unref=on --run 'nbdsh -u "$uri" -c "
h.trim($MiB, 0)
assert h.pread($MiB, 0) == b\"\xaa\" * $MiB
h.zero($MiB, $MiB)
assert h.pread($MiB, $MiB) == bytearray($MiB)
"'
qcheck nu2.qcow2
[ "$(alloc nu2.qcow2)" = 64 ] || fail "discard-no-unref v2: $(alloc nu2.qcow2) clusters"
# Without the option the same trims free the clusters.
cp base.qcow2 nu.qcow2
serve_run file=nu.qcow2 --run 'nbdsh -u "$uri" -c "$(cat nounref.py)"'
qcheck nu.qcow2
[ "$(alloc nu.qcow2)" = $((64 - 16 - 1 - 16)) ] ||
    fail "without discard-no-unref: $(alloc nu.qcow2) clusters"

# Extended L2 entries: zeroes and trims of whole subclusters inside a
# cluster change only their bits (the edges are written as before),
# the same map as QEMU's for zeroes; QEMU 7.2 does not discard
# subclusters, so trims are checked by what they read.
qemu-img create -f qcow2 -o extended_l2=on xl2.qcow2 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 4M" xl2.qcow2 >/dev/null
sub=(
    "zeronh 4096 8192"
    "zero $((K64 + 100)) 5000"
    "zero $((4 * MiB + 2048)) 4096"
    "zero $((2 * K64 + 1000)) 3000"
)
same xl2.qcow2 "" "" "${sub[@]}"
grep -q "^4096 8192 0 True False" ours.map || fail "subcluster zero: no zero bits"
cp xl2.qcow2 xt.qcow2
serve_run file=xt.qcow2 --run 'nbdsh -u "$uri" -c "
h.trim(6144, 2048 + 100)        # subclusters 2 and 3
assert h.pread(4096, 4096) == bytearray(4096)
assert h.pread(2148, 0) == b\"\xaa\" * 2148
assert h.pread(2048, 8192) == b\"\xaa\" * 2048
"'
qcheck xt.qcow2
[ "$(alloc xt.qcow2)" = 64 ] || fail "subcluster trim changed the allocation"
qemu-img map --output=json xt.qcow2 | grep -q '"start": 4096, "length": 4096, "depth": 0, "present": false, "zero": true, "data": false' ||
    fail "subcluster trim: subclusters not discarded"
qemu-img create -f qcow2 -o extended_l2=on -b back3.qcow2 -F qcow2 xb.qcow2 >/dev/null
qemu-io -f qcow2 -c "write -P 0xaa 0 64k" xb.qcow2 >/dev/null
serve_run file=xb.qcow2 --run 'nbdsh -u "$uri" -c "
h.trim(4096, 4096)
assert h.pread(4096, 4096) == bytearray(4096)
"'
qcheck xb.qcow2

echo "$0: OK"
