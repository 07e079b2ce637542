#!/usr/bin/env bash
# nbdkit-qcow2: the NBD clients users run against the plugin.
#
#   nbdcopy     a raw file (data, zero runs written as data, holes over
#               the image's old data) into the export and back out, with
#               --connections=4 --requests=16; read out again after a
#               restart; the image must equal the file (qemu-img compare)
#   nbdinfo     --map right after qemu-io writes, zeroes (with and
#               without unmap, over data and over nothing), discards and
#               a partial-cluster write: data is data (type 0), zeroes
#               have the zero bit, never-written clusters are holes
#               (type 3), the map tiles the export, and agrees with
#               `qemu-img map`; again after the plugin's own writes,
#               zeroes and trims;
#               --list on an image with two internal snapshots (one of
#               another size): the active image and both snapshots, with
#               their sizes, the snapshots read-only
#   qemu-img    info, convert out of the export (and compare), convert
#               a raw file into the export (-n) and compare it there,
#               compare a snapshot export with `qemu-img convert -l`
#   qemu-io     on the NBD URI: write / writev / write -z / discard, then
#               read -P and readv -P; again after a restart, and qemu-io
#               on the file itself after nbdkit exits
#   fio         the nbd engine: 4 jobs (4 connections) of randrw with
#               --verify=crc32c for 2 seconds on disjoint quarters of a
#               64 MiB image; then a deterministic randwrite job and,
#               after a restart, the same job with --verify_only
#
# After each: `qemu-img check` must exit 0 (leaks fail).

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires fio --version
requires /usr/bin/python3 --version
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' ||
  skip "fio has no nbd engine"

PY=/usr/bin/python3
MiB=$((1024*1024))
cd "$tmpdir"

img=$tmpdir/disk.qcow2

# now_ms: wall clock in milliseconds.
now_ms ()
{
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}

# run NAME FUNCTION: run one part, print its time.  (nr_ok is checked
# at the end: bash abandons a whole command on some errors, such as a
# bad arithmetic expansion, without failing the test.)
nr_ok=0
run ()
{
  local t0
  t0=$(now_ms)
  "$2"
  echo "$1: ok ($(( $(now_ms) - t0 )) ms)"
  nr_ok=$((nr_ok + 1))
}

# quote ARGS...: ARGS as one string of words for a --run command (which
# /bin/sh runs).
quote ()
{
  printf '%q ' "$@"
}

# qio_out FILE WHAT: fail if the qemu-io output in FILE reports a
# failure (a failed pattern check is only said on stdout).
qio_out ()
{
  if grep -Eiq 'Pattern verification failed|error|fail' "$1"; then
    cat "$1" >&2
    fail "qemu-io $2 reported a failure"
  fi
}

# qio IMG QEMU-IO-ARGS...: qemu-io on a file, which must exit 0 and
# not report a failure.
qio ()
{
  local target=$1; shift
  local r=0
  qemu-io "$@" "$target" > qio.out 2>&1 || r=$?
  [ $r -eq 0 ] || { cat qio.out >&2; fail "qemu-io $* $target: exit status $r"; }
  qio_out qio.out "$* $target"
}

# qio_nbd [NBDKIT-OPTION...] -- QEMU-IO-ARGS...: the same on the NBD URI
# of the plugin serving $img.
qio_nbd ()
{
  local -a nopts=()
  local r=0
  while [ "$1" != -- ]; do nopts+=("$1"); shift; done
  shift
  serve_run file="$img" "${nopts[@]}" \
    --run "$(quote qemu-io -f raw "$@") \"\$uri\" > qio.out 2>&1" || r=$?
  [ $r -eq 0 ] || {
    cat qio.out >&2; fail "qemu-io $* on the NBD URI: exit status $r"; }
  qio_out qio.out "$* on the NBD URI"
}

# A raw file of 64 MiB: random data, zero runs written as data, holes.
$PY - src.raw <<'EOF'
import random, sys
rng = random.Random(11)
size = 64 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        n = min(rng.choice([512, 4096, 65536, 300000, 1 << 20]) +
                rng.randint(0, 5000), size - pos)
        r = rng.random()
        if r < 0.5:
            f.seek(pos)
            f.write(rng.randbytes(n))
        elif r < 0.7:
            f.seek(pos)
            f.write(bytes(n))          # zeroes written as data
        pos += n                       # else: a hole
EOF

# prefilled SIZE-IN-MIB [CREATE-OPTIONS]: $img with data all over it (so that
# zeroes and holes written by clients have something to replace).
prefilled ()
{
  local size=$(($1 * MiB)); shift
  rm -f "$img"
  qemu-img create -q -f qcow2 "$@" "$img" "$size"
  qio "$img" -f qcow2 -c "write -P 0x11 0 $((size / 2))" \
      -c "write -P 0x22 $((size / 2 + 12345)) $((size / 4))"
}

#----------------------------------------------------------------------
# nbdcopy both ways.

t_nbdcopy ()
{
  prefilled 64
  rm -f back.raw back2.raw
  serve_run file="$img" --run '
    nbdcopy --connections=4 --requests=16 --flush src.raw "$uri" &&
    nbdcopy --connections=4 --requests=16 "$uri" back.raw' ||
    fail "nbdcopy: copy in or out failed"
  cmp src.raw back.raw || fail "nbdcopy: what came out is not what went in"
  serve_run file="$img" -r --run \
    'nbdcopy --connections=4 --requests=16 "$uri" back2.raw' ||
    fail "nbdcopy: copy out after a restart failed"
  cmp src.raw back2.raw || fail "nbdcopy: after a restart the export differs"
  qcheck "$img" >/dev/null
  qemu-img compare -q -f qcow2 -F raw "$img" src.raw ||
    fail "nbdcopy: qemu-img compare: the image differs from the file"
  rm -f back.raw back2.raw
}
run nbdcopy t_nbdcopy

#----------------------------------------------------------------------
# nbdinfo --map.

# mapcheck.py MAP.json QMAP.json SPEC...: the plugin's map must tile the
# export, agree with qemu-img map (its zero extents have the zero bit,
# its data extents are type 0), and each SPEC "START END KIND" holds:
# data = type 0, zero = zero bit set, hole = type 3 (hole and zero).
cat > mapcheck.py <<'EOF'
import json, sys
emap = json.load(open(sys.argv[1]))
qmap = json.load(open(sys.argv[2]))
specs = [s.split() for s in sys.argv[3:]]
size = qmap[-1]["start"] + qmap[-1]["length"]

pos = 0
for e in emap:
    assert e["offset"] == pos, "map: gap or overlap at %d: %r" % (pos, e)
    assert e["length"] > 0, "map: empty extent %r" % e
    pos += e["length"]
assert pos == size, "map covers [0, %d), export is %d bytes" % (pos, size)

def types(a, b):
    """The extents of the plugin's map over [a, b)."""
    return [(e["offset"], e["length"], e["type"]) for e in emap
            if e["offset"] < b and e["offset"] + e["length"] > a]

want = {"data": lambda t: t == 0,
        "zero": lambda t: t & 2 != 0,
        "hole": lambda t: t == 3}
for q in qmap:
    kind = "zero" if q["zero"] else "data" if q["data"] else None
    if kind is None:
        continue
    for off, n, t in types(q["start"], q["start"] + q["length"]):
        assert want[kind](t), \
            "qemu-img map says %s at [%d, +%d), plugin says type %d at " \
            "[%d, +%d)" % (kind, q["start"], q["length"], t, off, n)
for a, b, kind in specs:
    for off, n, t in types(int(a), int(b)):
        assert want[kind](t), \
            "expected %s in [%s, %s), plugin says type %d at [%d, +%d)" % \
            (kind, a, b, t, off, n)
print("map: %d extents, %d specs hold" % (len(emap), len(specs)))
EOF

# mapcheck SPEC...: nbdinfo --map now, qemu-img map after, then check.
mapcheck ()
{
  serve_run file="$img" -r --run 'nbdinfo --map --json "$uri" > map.json' ||
    fail "nbdinfo --map failed"
  qemu-img map -f qcow2 --output=json "$img" > qmap.json
  $PY mapcheck.py map.json qmap.json "$@" || {
    cat map.json >&2; fail "nbdinfo --map: the map is wrong"; }
}

t_map ()
{
  local K=65536
  rm -f "$img"
  qemu-img create -q -f qcow2 "$img" 8M
  # Cluster by cluster (64 KiB):
  #  0-2   data            3     never written
  #  4     data, then write -z (zero flag, cluster kept)
  #  5     write -z over nothing
  #  6     data, then write -z -u (zero flag, cluster freed)
  #  7     data, then discard
  #  16    100 bytes of data in the middle of the cluster
  #  32-33 data with a zero run written as data inside (still data)
  qio "$img" -f qcow2 \
      -c "write -P 0x61 0 $((3 * K))" \
      -c "write -P 0x62 $((4 * K)) $K" -c "write -z $((4 * K)) $K" \
      -c "write -z $((5 * K)) $K" \
      -c "write -P 0x63 $((6 * K)) $K" -c "write -z -u $((6 * K)) $K" \
      -c "write -P 0x64 $((7 * K)) $K" -c "discard $((7 * K)) $K" \
      -c "write -P 0x65 $((16 * K + 1000)) 100" \
      -c "write -P 0x66 $((32 * K)) $((2 * K))" \
      -c "write -P 0 $((32 * K + 100)) 5000"
  mapcheck "0 $((3 * K)) data" "$((3 * K)) $((4 * K)) hole" \
           "$((4 * K)) $((7 * K)) zero" "$((7 * K)) $((8 * K)) zero" \
           "$((8 * K)) $((16 * K)) hole" "$((16 * K)) $((17 * K)) data" \
           "$((17 * K)) $((32 * K)) hole" "$((32 * K)) $((34 * K)) data" \
           "$((34 * K)) $((128 * K)) hole"
  # Now the plugin writes: data into a hole (partial cluster), a zero
  # that may punch (may_trim) and one that must not (NO_HOLE) over
  # data, a trim of a whole data cluster, a zero over half a cluster.
  serve_run file="$img" --run 'nbdsh -u "$uri" -c "
K = 65536
h.pwrite(b\"p\" * 3000, 40 * K + 10)
h.zero(K, 0)
h.zero(K, K, nbd.CMD_FLAG_NO_HOLE)
h.trim(K, 2 * K)
h.zero(K // 2, 33 * K)
h.flush()
"' || fail "map: the plugin writes failed"
  mapcheck "0 $((3 * K)) zero" "$((3 * K)) $((4 * K)) hole" \
           "$((33 * K)) $((33 * K + K / 2)) data" \
           "$((40 * K)) $((41 * K)) data" "$((41 * K)) $((128 * K)) hole"
  qcheck "$img" >/dev/null
}
run nbdinfo-map t_map

#----------------------------------------------------------------------
# nbdinfo --list.

t_list ()
{
  rm -f "$img"
  qemu-img create -q -f qcow2 "$img" 8M
  qio "$img" -f qcow2 -c "write -P 0x71 0 1M"
  qemu-img snapshot -c snap1 "$img"
  qemu-img resize -q "$img" 16M
  qio "$img" -f qcow2 -c "write -P 0x72 0 1M"
  qemu-img snapshot -c snap2 "$img"
  serve_run file="$img" --run 'nbdinfo --list --json "$uri" > list.json' ||
    fail "nbdinfo --list failed"
  $PY - list.json <<'EOF' || { cat list.json >&2; fail "nbdinfo --list: wrong"; }
import json, sys
j = json.load(open(sys.argv[1]))
ex = {e["export-name"]: e for e in j["exports"]}
assert sorted(ex) == ["", "snap1", "snap2"], "exports: %r" % sorted(ex)
M = 1024 * 1024
for name, size, ro in (("", 16 * M, False), ("snap1", 8 * M, True),
                       ("snap2", 16 * M, True)):
    e = ex[name]
    assert e["export-size"] == size, "%r: size %d" % (name, e["export-size"])
    assert e["is_read_only"] == ro, "%r: is_read_only %r" % (name, ro)
    if name:
        assert "snapshot" in e.get("description", ""), \
            "%r: description %r" % (name, e.get("description"))
print("list: %s" % ", ".join("%r %d" % (n, ex[n]["export-size"])
                             for n in sorted(ex)))
EOF
  qcheck "$img" >/dev/null
}
run nbdinfo-list t_list

#----------------------------------------------------------------------
# qemu-img against the NBD URI.

t_qemu_img ()
{
  prefilled 64
  qemu-img snapshot -c snap1 "$img"
  qio "$img" -f qcow2 -c "write -P 0x33 1M 3M"
  rm -f ref.raw snap1.raw out.qcow2
  qemu-img convert -f qcow2 -O raw "$img" ref.raw
  qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" snap1.raw
  serve_run file="$img" --run '
    set -e
    [ "$(qemu-img info --output=json "$uri" |
         '"$PY"' -c "import json,sys; print(json.load(sys.stdin)[\"virtual-size\"])")" \
      = $((64 * 1024 * 1024)) ] || { echo "qemu-img info: wrong size" >&2; exit 1; }
    qemu-img compare -f raw -F raw "$uri" ref.raw
    qemu-img compare -f raw -F raw "nbd+unix:///snap1?socket=$unixsocket" snap1.raw
    qemu-img convert -f raw -O qcow2 "$uri" out.qcow2
    qemu-img convert -n -f raw -O raw src.raw "$uri"
    qemu-img compare -f raw -F raw src.raw "$uri"
  ' || fail "qemu-img on the NBD URI failed"
  qemu-img compare -q -f qcow2 -F raw out.qcow2 ref.raw ||
    fail "qemu-img convert out of the export differs"
  qcheck "$img" >/dev/null
  qemu-img compare -q -f qcow2 -F raw "$img" src.raw ||
    fail "qemu-img convert -n into the export: the image differs"
  qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" snap1b.raw
  cmp snap1.raw snap1b.raw || fail "qemu-img: the snapshot changed"
  rm -f ref.raw snap1.raw snap1b.raw out.qcow2
}
run qemu-img t_qemu_img

#----------------------------------------------------------------------
# qemu-io against the NBD URI.

t_qemu_io ()
{
  prefilled 16 -o cluster_size=4096
  qio_nbd -- \
        -c "write -P 0xab 1000 5000" \
        -c "writev -P 0xcd 300000 4096 4096 513" \
        -c "write -z 65536 131072" \
        -c "write -z -u 1048576 1048576" \
        -c "discard 4194304 65536" \
        -c "aio_write -P 0xef 8000001 70000" -c aio_flush \
        -c "read -P 0xab 1000 5000" \
        -c "readv -P 0xcd 300000 4096 4096 513" \
        -c "read -P 0 65536 131072" \
        -c "read -P 0 1048576 1048576" \
        -c "read -P 0 4194304 65536" \
        -c "read -P 0xef 8000001 70000" \
        -c "read -P 0x11 6000 59536" \
        -c flush
  # Read again through a new server, and from the file itself.
  local -a reads=(-c "read -P 0xab 1000 5000"
                  -c "read -P 0xcd 300000 8705"
                  -c "read -P 0 65536 131072"
                  -c "read -P 0 1048576 1048576"
                  -c "read -P 0 4194304 65536"
                  -c "read -P 0xef 8000001 70000"
                  -c "read -P 0x22 8500000 1000")
  qio_nbd -r -- -r "${reads[@]}"
  qcheck "$img" >/dev/null
  qio "$img" -f qcow2 -r "${reads[@]}"
}
run qemu-io t_qemu_io

#----------------------------------------------------------------------
# fio's nbd engine.

t_fio ()
{
  local -a job
  rm -f "$img"
  qemu-img create -q -f qcow2 "$img" 64M
  # 4 jobs, each on its own connection and its own 16 MiB quarter.
  serve_run file="$img" --run '
    fio --name=randrw --ioengine=nbd --uri="$uri" --rw=randrw \
        --bsrange=512-64k --iodepth=8 --numjobs=4 --size=16M \
        --offset_increment=16M --runtime=2 --time_based \
        --verify=crc32c --verify_backlog=128 --verify_fatal=1 \
        --group_reporting --output=fio.out' ||
    { cat fio.out >&2; fail "fio randrw verify failed"; }
  grep -E '^ *(READ|WRITE):' fio.out
  qcheck "$img" >/dev/null
  # The same random writes twice: once to write, once (after a
  # restart) to verify only.
  job=(--name=persist --ioengine=nbd --rw=randwrite --bsrange=4k-64k
       --iodepth=16 --offset=4M --size=24M --randseed=42
       --verify=crc32c --verify_fatal=1 --output=fio2.out)
  serve_run file="$img" --run "$(quote fio "${job[@]}") --uri=\"\$uri\" --do_verify=0" ||
    { cat fio2.out >&2; fail "fio randwrite failed"; }
  serve_run file="$img" -r --run "$(quote fio "${job[@]}") --uri=\"\$uri\" --verify_only" ||
    { cat fio2.out >&2; fail "fio --verify_only after a restart failed"; }
  qcheck "$img" >/dev/null
}
run fio t_fio

[ $nr_ok -eq 6 ] || fail "only $nr_ok of 6 parts ran to the end"
echo "$0: all clients ok"
