#!/usr/bin/env bash
# nbdkit-qcow2: hammer the write path of a matrix of qcow2 images with a
# deterministic pseudo-random mix of writes, zeroes, trims, flushes and
# FUA requests, mirrored into a raw file, and compare.
#
# Every image is made here at test time with qemu-img/qemu-io: cluster
# sizes 512 B, 4 KiB, 64 KiB, 2 MiB; compat 0.10 and 1.1; refcount widths
# 1, 16, 64 (with small clusters, so that the refcount table has to
# grow); extended L2 (64 KiB and 16 KiB clusters); zlib and zstd
# compressed images; qcow2 (v3 and v2 overlays, backing shorter than the
# overlay) and raw backing files named by relative paths; lazy
# refcounts; preallocation=metadata and falloc; an internal snapshot
# taken half-way through filling the image; external data files (also
# data_file_raw=on); images grown and shrunk by qemu-img resize; tiny
# L2 and refcount caches.  Some virtual sizes are not a multiple of the
# cluster size, so that the last cluster is partial.
#
# For each image two nbdsh runs (sessions; the second starts from what
# the first left on disk, and both are followed by the checks below) of
# ops.py do N/2 operations each, chosen by a seeded PRNG (the seeds are
# fixed per image, so every run does the same thing):
#   pwrite      1 byte .. a few clusters, at offsets drawn near cluster
#               boundaries, L2-table boundaries, the end of the disk,
#               a few "hot" regions (so that operations pile up on the
#               same clusters) or anywhere; some with FUA;
#   zero        with and without NBD_CMD_FLAG_NO_HOLE (NO_HOLE = may_trim
#               false), some with FAST_ZERO (an ENOTSUP failure is
#               allowed, but then nothing may have changed), some FUA;
#   trim        (some FUA);
#   flush;
#   out-of-range requests (strict mode off), which must fail and change
#   nothing.
# Everything is mirrored into a bytearray initialised from
# `qemu-img convert -O raw` of the image.  After every operation the
# range it touched (widened by a cluster each side) is read back and
# compared with the mirror, and every 25 operations a random range too,
# and block status around the last operation (every extent with the
# zero bit must be zeroes in the mirror); at the end the whole export is
# read back and its whole block-status map checked.
#
# Trim: the contents of a trimmed range are unspecified by NBD, but for
# a qcow2 image only three results are sound, per piece of the range cut
# at cluster boundaries: the old contents (trim is advisory, and the
# ragged edges are never touched), zeroes (a discarded or zero cluster),
# or the backing file's contents (a discarded cluster in an overlay).
# So after each trim the range is read back, every piece must be one of
# those three (anything else - stale data from an earlier write, data
# from another offset - is a failure), and what was read is copied into
# the mirror, which from then on expects exactly that.
#
# After each session, with the server gone:
#   `qemu-img check IMG` must exit 0 (exit 3, leaked clusters, fails);
#   `qemu-img compare -f qcow2 -F raw IMG MIRROR` must say identical;
#   data_file_raw=on: the raw data file itself must equal the mirror;
#   the snapshot image: the snapshot must still read as it did when it
#   was taken (qemu-img convert -l snapshot.name=snap1).
#
# Environment knobs for debugging:
#   QCOW2_WRITE_ONLY=NAME   run only the image(s) whose name matches the
#                           shell pattern NAME
#   QCOW2_WRITE_OPS=N       operations per image (default 400; 2 MiB
#                           clusters get a quarter)
#   QCOW2_WRITE_SEED=K      another deterministic sequence (default 0)
#   QCOW2_WRITE_SIZE_MIB=M  virtual size of the images (default 32)
#   QCOW2_WRITE_KEEP=DIR    keep the images, mirrors and op logs in DIR
# On failure the last operations are printed from the image's op log
# (every operation is logged before it is sent, with its arguments and
# the seed, so a failure can be replayed).

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
OPS=${QCOW2_WRITE_OPS:-400}
VS=$(( ${QCOW2_WRITE_SIZE_MIB:-32} * MiB ))     # virtual size of most images
ONLY=${QCOW2_WRITE_ONLY:-*}
nr_images=0

have_zstd=yes
if nbdkit "$PLUGIN" --dump-plugin 2>/dev/null | grep -q '^qcow2_zstd=no'; then
  have_zstd=no
  echo "$0: plugin built without zstd: zstd images skipped"
fi

work=${QCOW2_WRITE_KEEP:-$tmpdir/w}
mkdir -p "$work"
cd "$work"
mkdir -p sub elsewhere

#----------------------------------------------------------------------
# The workload, run inside nbdsh (h is the handle).  Parameters come in
# the environment (OPS_*).

cat > ops.py <<'EOF'
import errno, os, random, sys, time

seed = int(os.environ["OPS_SEED"])
nops = int(os.environ["OPS_N"])
mirror_path = os.environ["OPS_MIRROR"]
backing_path = os.environ.get("OPS_BACKING", "")
cs = int(os.environ["OPS_CS"])           # cluster size
gran = int(os.environ["OPS_GRAN"])       # trim granularity (cluster or subcluster)
l2cov = int(os.environ["OPS_L2COV"])     # guest bytes one L2 table maps
log_path = os.environ["OPS_LOG"]
name = os.environ["OPS_NAME"]

rng = random.Random(seed)
size = h.get_size()
assert not h.is_read_only(), "%s: export is read-only" % name
assert h.can_zero() and h.can_trim() and h.can_flush() and h.can_fua(), \
    "%s: export lacks zero/trim/flush/fua" % name
can_fast_zero = h.can_fast_zero()

mirror = bytearray(open(mirror_path, "rb").read())
assert len(mirror) == size, "%s: mirror is %d bytes, export %d" % (name, len(mirror), size)
backing = None
backing_end = 0
if backing_path:
    backing = bytearray(open(backing_path, "rb").read())
    backing_end = len(backing)
    if len(backing) < size:
        backing += bytes(size - len(backing))
    del backing[size:]

log = open(log_path, "w", buffering=1)
log.write("# %s seed=%d ops=%d size=%d cs=%d\n" % (name, seed, nops, size, cs))
opno = -1
counts = {}

def fail(msg):
    log.write("FAIL at op %d: %s\n" % (opno, msg))
    log.close()
    raise AssertionError("%s: op %d: %s" % (name, opno, msg))

def diff_msg(off, got, exp):
    i = next(i for i in range(len(got)) if got[i] != exp[i])
    lo = i - i % 16
    return ("offset %d (%#x): read %s, expected %s (%d bytes of %d differ)" %
            (off + i, off + i, bytes(got[lo:lo+16]).hex(" "),
             bytes(exp[lo:lo+16]).hex(" "),
             sum(1 for a, b in zip(got, exp) if a != b), len(got)))

def pread(off, n):
    if n <= 8 << 20:
        return h.pread(n, off)           # no second copy
    out = bytearray()
    while n > 0:
        k = min(n, 8 << 20)
        out += h.pread(k, off)
        off += k
        n -= k
    return out

def check(lo, hi, why):
    lo = max(0, lo)
    hi = min(size, hi)
    if lo >= hi:
        return
    got = pread(lo, hi - lo)
    if got != mirror[lo:hi]:
        fail("%s: data differs at %s" % (why, diff_msg(lo, got, mirror[lo:hi])))

def check_map(lo, hi, why):
    """Block status over [lo, hi): the extents must tile it, and every
    extent with the zero bit must read as zeroes (in the mirror, which
    is known to equal the export there)."""
    lo = max(0, lo)
    hi = min(size, hi)
    if lo >= hi or not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        return
    pos = lo
    while pos < hi:
        ext = []
        def cb(metacontext, offset, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                ext.extend(entries)
            return 0
        h.block_status(min(hi - pos, 1 << 30), pos, cb)
        if not ext:
            fail("%s: block status at %d returned no extents" % (why, pos))
        for i in range(0, len(ext), 2):
            n, flags = ext[i], ext[i + 1]
            if n == 0:
                fail("%s: block status at %d: empty extent" % (why, pos))
            end = min(pos + n, hi)
            if (flags & nbd.STATE_ZERO) and any(mirror[pos:end]):
                j = next(j for j in range(pos, end) if mirror[j])
                fail("%s: block status says [%d, +%d) (flags %d) reads as "
                     "zeroes, but byte %d is %#x" %
                     (why, pos, n, flags, j, mirror[j]))
            pos += n
            if pos >= hi:
                break

def pick_offset():
    r = rng.random()
    if r < 0.25:
        base = rng.randrange(0, size // cs + 1) * cs
    elif r < 0.40:
        base = rng.randrange(0, size // l2cov + 1) * l2cov
    elif r < 0.50:
        base = size
    elif r < 0.80:
        base = hot[rng.randrange(len(hot))] + rng.randrange(0, 4 * cs)
    else:
        return rng.randrange(0, size)
    j = rng.random()
    if j < 0.3:
        off = base
    elif j < 0.6:
        off = base - rng.randrange(1, 600)
    else:
        off = base + rng.randint(-2 * cs, 2 * cs)
    return min(max(off, 0), size - 1)

def pick_len(off, maxlen):
    r = rng.random()
    if r < 0.35:
        n = rng.randint(1, 1024)
    elif r < 0.70:
        n = rng.randint(1, 2 * cs)
    else:
        n = rng.randint(1, 4 * cs + 4096)
    n = min(n, maxlen, size - off)
    return max(n, 1)

def pick_aligned():
    a = rng.randrange(0, (size + cs - 1) // cs) * cs
    if rng.random() < 0.5:
        # Near a hot spot so that it hits written clusters.
        a = (hot[rng.randrange(len(hot))] // cs + rng.randrange(4)) * cs
        a = min(a, (size - 1) // cs * cs)
    n = rng.randint(1, 6) * cs
    r = rng.random()
    if r < 0.15:
        n = size - a                     # to the end of the disk
    elif r < 0.4:
        n += rng.randint(1, cs - 1)      # aligned start, ragged end
    return a, max(1, min(n, size - a))

def data(n):
    if rng.random() < 0.5:
        return rng.randbytes(n)
    tag = b"op%05d/" % opno
    return (tag * (n // len(tag) + 1))[:n]

def write_op(off, buf, flags):
    log.write("%d pwrite off=%d len=%d flags=%d\n" % (opno, off, len(buf), flags))
    h.pwrite(buf, off, flags)
    mirror[off:off+len(buf)] = buf

def zero_op(off, n, flags):
    log.write("%d zero off=%d len=%d flags=%d\n" % (opno, off, n, flags))
    try:
        h.zero(n, off, flags)
    except nbd.Error as e:
        if (flags & nbd.CMD_FLAG_FAST_ZERO) and e.errnum in (errno.ENOTSUP, errno.EOPNOTSUPP):
            log.write("%d   fast zero refused (ENOTSUP)\n" % opno)
            counts["fast-zero-refused"] = counts.get("fast-zero-refused", 0) + 1
            return                       # nothing may have changed
        fail("zero off=%d len=%d flags=%d failed: %s" % (off, n, flags, e))
    mirror[off:off+n] = bytes(n)

def trim_op(off, n, flags):
    log.write("%d trim off=%d len=%d flags=%d\n" % (opno, off, n, flags))
    h.trim(n, off, flags)
    got = pread(off, n)
    p = off
    while p < off + n:
        q = min(off + n, (p // gran + 1) * gran)
        g = got[p - off:q - off]
        if (g != mirror[p:q] and g != bytes(q - p) and
                not (backing is not None and g == backing[p:q])):
            fail("after trim off=%d len=%d the piece [%d, %d) is neither the "
                 "old data, zeroes nor the backing file: %s" %
                 (off, n, p, q, diff_msg(p, g, mirror[p:q])))
        p = q
    mirror[off:off+n] = got

# Hot regions: a few clusters around fixed places where operations
# accumulate (start, an L2 boundary if there is one, the middle, the end,
# the end of a backing file shorter than the image).
hot = [0, min(l2cov, size // 2), size // 2 - cs // 2, max(0, size - 3 * cs),
       rng.randrange(0, size)]
if 0 < backing_end < size:
    hot.append(backing_end - cs)         # where the backing file ends
hot = [min(max(0, x), size - 1) for x in hot]

maxlen = 16 << 20
t0 = time.time()
for opno in range(nops):
    r = rng.random()
    lo = hi = None
    if r < 0.45:
        off = pick_offset()
        n = pick_len(off, maxlen)
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.15 else 0
        write_op(off, data(n), flags)
        lo, hi = off, off + n
        counts["pwrite"] = counts.get("pwrite", 0) + 1
    elif r < 0.65:
        if rng.random() < 0.5:
            off, n = pick_aligned()
        else:
            off = pick_offset()
            n = pick_len(off, maxlen)
        flags = 0
        if rng.random() < 0.35:
            flags |= nbd.CMD_FLAG_NO_HOLE
        if can_fast_zero and rng.random() < 0.2:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        if rng.random() < 0.1:
            flags |= nbd.CMD_FLAG_FUA
        zero_op(off, n, flags)
        lo, hi = off, off + n
        counts["zero"] = counts.get("zero", 0) + 1
    elif r < 0.80:
        if rng.random() < 0.5:
            off, n = pick_aligned()
        else:
            off = pick_offset()
            n = pick_len(off, maxlen)
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
        trim_op(off, n, flags)
        lo, hi = off, off + n
        counts["trim"] = counts.get("trim", 0) + 1
    elif r < 0.85:
        log.write("%d flush\n" % opno)
        h.flush()
        counts["flush"] = counts.get("flush", 0) + 1
    elif r < 0.87:
        # Out of range (libnbd would refuse it itself in strict mode):
        # the server must fail it and change nothing.
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
        off = size - rng.randint(0, 3 * cs)
        n = rng.randint(size - off + 1, size - off + 2 * cs)
        kind = rng.choice(["pwrite", "zero", "trim"])
        log.write("%d %s off=%d len=%d (out of range)\n" % (opno, kind, off, n))
        try:
            if kind == "pwrite":
                h.pwrite(bytes(n), off)
            elif kind == "zero":
                h.zero(n, off)
            else:
                h.trim(n, off)
        except nbd.Error:
            pass
        else:
            fail("%s off=%d len=%d past the end (size %d) succeeded" %
                 (kind, off, n, size))
        h.set_strict_mode(h.get_strict_mode() | nbd.STRICT_BOUNDS)
        lo, hi = max(0, off - cs), size
        counts["out-of-range"] = counts.get("out-of-range", 0) + 1
    else:
        # Overwrite exactly a hot region's whole clusters (in-place path).
        a = (hot[rng.randrange(len(hot))] // cs) * cs
        n = min(rng.randint(1, 3) * cs, size - a)
        write_op(a, data(n), 0)
        lo, hi = a, a + n
        counts["pwrite"] = counts.get("pwrite", 0) + 1
    if lo is not None:
        check(lo - cs, hi + cs, "read-back after op")
    if opno % 25 == 24:
        off = rng.randrange(0, size)
        check(off, off + rng.randint(1, 8 * cs), "random read-back")
        if lo is not None:
            check_map(lo - cs, hi + cs, "block status after op")

opno = nops
check(0, size, "final read of the whole export")
check_map(0, size, "final block status of the whole export")
with open(mirror_path, "wb") as f:
    f.write(mirror)
log.write("# done in %.1fs: %s\n" % (time.time() - t0, counts))
log.close()
print("%d ops (%s)" % (nops, ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
EOF

#----------------------------------------------------------------------
# Helpers.

# qio IMG CMD...: qemu-io, one command per argument, quiet unless it fails.
qio ()
{
  local img=$1; shift
  local out
  local -a cmds=()
  for c in "$@"; do cmds+=(-c "$c"); done
  if ! out=$(qemu-io -t writeback -f qcow2 "${cmds[@]}" "$img" 2>&1); then
    echo "$out" >&2
    fail "qemu-io on $img failed"
  fi
}

vsize ()
{
  qemu-img info --output=json "$1" |
    $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'
}

# fill IMG: some data all over the image (patterns, so that -c can
# compress them), at odd offsets.
fill ()
{
  local img=$1 size
  size=$(vsize "$img")
  local -a cmds=()
  local off=0 i=1
  while [ $((off + 300000)) -le "$size" ]; do
    cmds+=("write -P $((i % 250 + 1)) $off $((100000 + i * 777))")
    off=$((off + 1234567 + i * 4099))
    i=$((i + 1))
  done
  cmds+=("write -P 0xee $((size - 70000)) 70000")
  qio "$img" "${cmds[@]}"
}

# run_case NAME IMG SEED [BACKING_RAW]
# Mirror the image, then two sessions of ops.py (N/2 operations each,
# different seeds), each served from ./elsewhere (so relative names must
# resolve against the image's directory) and each followed by the
# checks: the second session starts from what the first left on disk
# (freed clusters, refcounts and tables as written back).
# With 2 MiB clusters every operation copies and reads back megabytes,
# so those images get a quarter of the operations.
# Set CASE_PARAMS to extra plugin parameters (e.g. small caches),
# CHECK_DATA_FILE to a raw data file that must equal the guest view,
# CHECK_SNAPSHOT to the raw dump of snapshot snap1.
run_case ()
{
  local name=$1 img=$2 seed=$3 backing=${4:-}
  local info cs ext size gran l2cov r out start nops=$OPS session
  local -a params
  # shellcheck disable=SC2053
  [[ $name == $ONLY ]] || return 0
  start=$SECONDS
  read -r -a params <<< "${CASE_PARAMS:-}"
  img=$(realpath "$img")
  info=$(qemu-img info --output=json "$img")
  cs=$($PY -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])' <<< "$info")
  ext=$($PY -c 'import json,sys; d=json.load(sys.stdin)["format-specific"]["data"]; print(1 if d.get("extended-l2") else 0)' <<< "$info")
  size=$($PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])' <<< "$info")
  if [ "$ext" = 1 ]; then
    gran=$((cs / 32)); l2cov=$((cs * (cs / 16)))
  else
    gran=$cs; l2cov=$((cs * (cs / 8)))
  fi
  qcheck "$img" >/dev/null
  qemu-img convert -f qcow2 -O raw "$img" "$name.mirror"
  [ "$cs" -lt $((2*MiB)) ] || nops=$((OPS / 4))

  for session in 1 2; do
    seed=$(( ${QCOW2_WRITE_SEED:-0} * 100000 + $3 * 10 + session ))
    export OPS_SEED=$seed OPS_N=$((nops / 2)) OPS_CS=$cs OPS_GRAN=$gran
    export OPS_L2COV=$l2cov OPS_MIRROR=$work/$name.mirror OPS_BACKING=$backing
    export OPS_LOG=$work/$name.$session.log OPS_NAME="$name (session $session)"
    export OPS_PY=$work/ops.py
    r=0
    out=$(cd elsewhere &&
          nbdkit -U - "$PLUGIN" file="$img" ${params[@]+"${params[@]}"} \
            --run "$PYENV"' nbdsh --base-allocation -u "$uri" -c "exec(open(\"$OPS_PY\").read())"' \
            2> "$work/$name.nbdkit.err") || r=$?
    if [ $r -ne 0 ]; then
      grep -v 'offset and count are out of range' "$work/$name.nbdkit.err" >&2
      echo "--- last operations ($OPS_LOG):" >&2
      tail -n 15 "$OPS_LOG" >&2
      fail "$name: session $session: workload failed (seed $seed)"
    fi
    if grep -Eq 'AddressSanitizer|runtime error' "$work/$name.nbdkit.err"; then
      cat "$work/$name.nbdkit.err" >&2
      fail "$name: sanitizer report"
    fi

    r=0
    qemu-img check "$img" > "$work/$name.check" 2>&1 || r=$?
    if [ $r -ne 0 ]; then
      cat "$work/$name.check" >&2
      fail "$name: session $session: qemu-img check exit $r after the workload (seed $seed)"
    fi
    r=0
    qemu-img compare -f qcow2 -F raw "$img" "$name.mirror" > "$work/$name.cmp" 2>&1 || r=$?
    if [ $r -ne 0 ]; then
      cat "$work/$name.cmp" >&2
      fail "$name: session $session: image differs from the mirror after the workload (seed $seed)"
    fi
    if [ -n "${CHECK_DATA_FILE:-}" ]; then
      cmp "$CHECK_DATA_FILE" "$name.mirror" ||
        fail "$name: session $session: raw data file $CHECK_DATA_FILE differs from the mirror"
    fi
    if [ -n "${CHECK_SNAPSHOT:-}" ]; then
      qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" "$name.snap-after"
      cmp "$CHECK_SNAPSHOT" "$name.snap-after" ||
        fail "$name: session $session: snapshot snap1 changed"
      rm -f "$name.snap-after"
    fi
  done
  [ -n "${QCOW2_WRITE_KEEP:-}" ] || rm -f "$name.mirror"
  nr_images=$((nr_images + 1))
  echo "$name: ok (2 x $out, $((SECONDS - start))s)"
}

# new NAME SIZE [qemu-img create args...]: make NAME.qcow2, set $img.
new ()
{
  local name=$1 size=$2; shift 2
  img=$name.qcow2
  qemu-img create -q -f qcow2 "$@" "$img" "$size"
}

#----------------------------------------------------------------------
# The matrix.  Each case: make the image, put some data in it with
# qemu-io, run the workload.

# Cluster sizes.  512 B clusters: an L2 table maps 32 KiB, so 32 MiB
# crosses 1024 of them.  Odd sizes leave the last cluster partial.
new c512 $((VS)) -o cluster_size=512;             fill "$img"; run_case c512 "$img" 101
new c4k $((VS + 1536)) -o cluster_size=4096;      fill "$img"; run_case c4k "$img" 102
new c64k $((VS + 1536)) -o cluster_size=65536;    fill "$img"; run_case c64k "$img" 103
new c2m $((VS + 512)) -o cluster_size=2M;         fill "$img"; run_case c2m "$img" 104
new empty-64k $((VS));                                         run_case empty-64k "$img" 105

# Tiny caches (one or two slices), so that L2 and refcount slices are
# evicted and written back all the time, in the middle of allocations.
new tiny-cache-4k $((VS)) -o cluster_size=4096; fill "$img"
CASE_PARAMS="l2-cache-size=1K refcount-cache-size=1K cache-entry-size=512" \
  run_case tiny-cache-4k "$img" 106
new tiny-cache-64k $((VS)); fill "$img"
CASE_PARAMS="l2-cache-size=8K refcount-cache-size=4K cache-entry-size=4K" \
  run_case tiny-cache-64k "$img" 107

# compat=0.10 (no zero flag: zeroes are real writes or discards).
new v2-64k $((VS)) -o compat=0.10;                fill "$img"; run_case v2-64k "$img" 201
new v2-4k $((VS + 512)) -o compat=0.10,cluster_size=4096; fill "$img"; run_case v2-4k "$img" 202

# Refcount widths; small clusters so that refcount blocks fill up and
# the refcount table grows.
new rc1-512 $((VS)) -o refcount_bits=1,cluster_size=512; fill "$img"; run_case rc1-512 "$img" 301
new rc1-64k $((VS)) -o refcount_bits=1;           fill "$img"; run_case rc1-64k "$img" 302
new rc16-4k $((VS)) -o refcount_bits=16,cluster_size=4096; fill "$img"; run_case rc16-4k "$img" 303
new rc64-4k $((VS)) -o refcount_bits=64,cluster_size=4096; fill "$img"; run_case rc64-4k "$img" 304
# 64-bit refcounts and 512 B clusters: a refcount block covers 32 KiB
# of the file and the one-cluster refcount table 2 MiB, so the table
# has to grow (and move) several times.
new rc64-512 $((VS)) -o refcount_bits=64,cluster_size=512; fill "$img"; run_case rc64-512 "$img" 305

# Extended L2.
new extl2-64k $((VS)) -o extended_l2=on,cluster_size=64K
fill "$img"; qio "$img" "write -z 67584 2048" "discard 200704 2048"
run_case extl2-64k "$img" 401
new extl2-16k $((VS)) -o extended_l2=on,cluster_size=16K
fill "$img"; qio "$img" "write -z 66048 512" "discard 3000320 8192"
run_case extl2-16k "$img" 402

# Compressed images (qemu-img convert -c), with some plain writes on
# top so that compressed and normal clusters mix.
new csrc $((VS)); fill "$img"
qemu-img convert -c -f qcow2 -O qcow2 -o compression_type=zlib csrc.qcow2 zlib.qcow2
qio zlib.qcow2 "write -P 0x77 3001000 70000"
run_case compressed-zlib zlib.qcow2 501
qemu-img convert -c -f qcow2 -O qcow2 -o compression_type=zlib,cluster_size=4096 csrc.qcow2 zlib4k.qcow2
run_case compressed-zlib-4k zlib4k.qcow2 502
if [ "$have_zstd" = yes ]; then
  qemu-img convert -c -f qcow2 -O qcow2 -o compression_type=zstd csrc.qcow2 zstd.qcow2
  qio zstd.qcow2 "write -P 0x78 3001000 70000"
  run_case compressed-zstd zstd.qcow2 503
fi
rm -f csrc.qcow2

# Backing files by relative path (served from ./elsewhere).  The qcow2
# base (24 MiB) is shorter than the overlays (32 MiB).
qemu-img create -q -f qcow2 sub/base.qcow2 $((VS * 3 / 4)); fill sub/base.qcow2
qemu-img convert -f qcow2 -O raw sub/base.qcow2 base.raw
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 sub/top.qcow2 $((VS))
qio sub/top.qcow2 "write -P 0xb1 60000 10000" "write -z 3500000 65536" \
    "discard 16711680 131072"
run_case backing-qcow2 sub/top.qcow2 601 "$work/base.raw"
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 -b base.qcow2 -F qcow2 \
  sub/top-v2.qcow2 $((VS))
qio sub/top-v2.qcow2 "write -P 0xb3 60000 10000"
run_case backing-qcow2-v2 sub/top-v2.qcow2 602 "$work/base.raw"
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 \
  sub/top-512.qcow2 $((VS))
run_case backing-qcow2-512 sub/top-512.qcow2 603 "$work/base.raw"
rm -f base.raw

# Raw backing of an odd size (5 MB and a bit).
$PY -c '
import random, sys
r = random.Random(7)
open(sys.argv[1], "wb").write(r.randbytes(5 * 1024 * 1024 + 4321))' sub/base.raw
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw sub/rtop.qcow2 $((VS))
qio sub/rtop.qcow2 "write -P 0xc1 5242000 500"
run_case backing-raw sub/rtop.qcow2 604 "$work/sub/base.raw"

# Lazy refcounts.
new lazy $((VS)) -o lazy_refcounts=on; fill "$img"; run_case lazy "$img" 701

# Preallocation.
new prealloc-meta $((VS)) -o preallocation=metadata; fill "$img"
run_case prealloc-metadata "$img" 801
new prealloc-falloc $((VS)) -o preallocation=falloc,cluster_size=4096; fill "$img"
run_case prealloc-falloc "$img" 802

# Internal snapshot taken half-way: data, snapshot, more data.
for cs in 4096 65536; do
  new snap-$cs $((VS)) -o cluster_size=$cs; fill "$img"
  qemu-img snapshot -c snap1 "$img"
  qemu-img convert -f qcow2 -O raw -l snapshot.name=snap1 "$img" snap-$cs.snap1.raw
  qio "$img" "write -P 0xa1 1000 5000" "write -P 0xa2 3000001 100000" \
      "write -z $((VS / 2 - 1)) 300007" "discard 200000 700000"
  CHECK_SNAPSHOT=$work/snap-$cs.snap1.raw run_case snapshot-$cs "$img" 90$((cs / 4096))
  rm -f snap-$cs.snap1.raw
done

# Resized by qemu-img: grown (the L1 table grows and moves; odd new
# size) and shrunk (to an odd size, cutting a cluster in two).
new grown $((VS / 2)) -o cluster_size=4096; fill "$img"
qemu-img resize -q "$img" $((VS + 2560))
run_case resized-grown "$img" 1101
new shrunk $((VS + VS / 2)); fill "$img"
qemu-img resize -q --shrink "$img" $((VS - 1024))
run_case resized-shrunk "$img" 1102

# External data files.
new datafile $((VS)) -o data_file=datafile.data; fill "$img"
run_case data-file "$img" 1001
new datafile-raw $((VS)) -o data_file=datafile-raw.data,data_file_raw=on; fill "$img"
CHECK_DATA_FILE=$work/datafile-raw.data run_case data-file-raw "$img" 1002

[ $nr_images -gt 0 ] || fail "no image matched QCOW2_WRITE_ONLY=$ONLY"
echo "$0: $nr_images images written correctly"
