#!/usr/bin/env bash
# nbdkit-qcow2: the plugin under the nbdkit filters users stack most.
#
# Every case starts from a fresh 32 MiB image with some data written by
# qemu-io, and a raw mirror of it (qemu-img convert).  Then one nbdkit
# run with the filter stack runs wl.py (below) in nbdsh: a few hundred
# random writes (some FUA), zeroes (with and without NO_HOLE), trims,
# flushes, cache requests, reads and runs of sequential reads, at
# offsets and lengths chosen to be unaligned and to cross 4 KiB and
# 64 KiB boundaries.  Every write is applied to the mirror too; every
# read is compared with the mirror at once; at the end the client
# flushes and reads the whole export back.  Trimmed bytes may read as
# their old contents or as zeroes (the NBD spec leaves them undefined;
# the plugin only discards whole clusters, and filters round trims
# inward), and whatever they read is then adopted by the mirror.
#
# After nbdkit exits: `qemu-img check` must exit 0 (leaks fail),
# `qemu-img compare` of the image with the mirror must find them
# identical, and the plain plugin (no filters) read out with nbdcopy
# must equal the mirror byte for byte.
#
# Cases (one line each is printed, with its time):
#   cow, cow-4k-on-read   writes go to the overlay: the client sees
#                         them, the qcow2 file stays byte-identical
#   cache-writeback       cache=writeback: the data reaches the image
#                         on the client's flush
#   cache-writethrough    cache=writethrough cache-on-read=true
#   readahead
#   blocksize-4k, -512    minblock=4096 maxdata=64k on 4 KiB and 512 B
#                         clusters: the filter's read-modify-write of
#                         unaligned heads and tails
#   stats                 statsfile= is written and counts every kind
#                         of request
#   rate                  rate=16M burstiness=0.5: the workload takes
#                         at least the time the rate allows
#   retry                 nothing fails
#   retry-reopen          over the error filter: a write, a zero, a
#                         read and a trim each fail once, the retry
#                         filter reopens the plugin and retries
#   offset                offset=1M range=8M: writes land in 1M..9M
#                         and nowhere else; a write past range= fails
#   partition             an MBR (written by python) with two
#                         partitions; partition=2: writes land inside
#                         partition 2 only
#   nocache-MODE          cachemode=none, emulate, nop
#   fua-MODE              fuamode=emulate, force, pass
#   multi-conn-MODE       multi-conn-mode=emulate, plugin: nbdcopy
#                         --connections=4 --requests=16 writes a raw
#                         file with holes into the export and reads it
#                         back
#
# QCOW2_FILTERS_ONLY=REGEX runs only the cases whose names match.
# WL_EXPECT=wrong flips one byte of the expected contents (to see the
# test fail).

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3
MiB=$((1024*1024))
filterdir=$(nbdkit --dump-config | sed -n 's/^filterdir=//p')
cd "$tmpdir"

# Every filter this test stacks must exist: a missing one is a broken
# nbdkit install, and skipping would hide it (skip fails in CI).
for f in cow cache readahead blocksize stats rate retry error offset \
         partition nocache fua multi-conn; do
  [ -f "$filterdir/nbdkit-$f-filter.so" ] ||
    skip "nbdkit-$f-filter is not installed in $filterdir"
done

#----------------------------------------------------------------------
# wl.py: the workload, run inside nbdsh (h is the handle).  Environment:
#   WL_MIRROR  raw file mirroring the whole image
#   WL_BASE    where the export starts in the mirror (offset filters)
#   WL_SEED    random seed
#   WL_NAME    the case, for messages
#   WL_OPS     number of operations (default 300)
#   WL_MAXLEN  longest request (default 128K)
#   WL_SPAN    use only the first WL_SPAN bytes of the export
#   WL_TRIM    "no": send no trims
#   WL_ERRFILE the error filter's error-file: make it exist for the
#              first try of a write, a zero, a read and a trim (a
#              timer removes it before the retry filter's retry)
#   WL_EXPECT  a deliberately wrong expectation, for trying the test
#              (flip one mirror byte before the final read)
cat > wl.py <<'EOF'
import os, random, threading

mirror_path = os.environ["WL_MIRROR"]
base = int(os.environ.get("WL_BASE", "0"))
seed = int(os.environ.get("WL_SEED", "1"))
nops = int(os.environ.get("WL_OPS", "300"))
maxlen = int(os.environ.get("WL_MAXLEN", str(128 * 1024)))
trims = os.environ.get("WL_TRIM") != "no"
errfile = os.environ.get("WL_ERRFILE")
rng = random.Random(seed)

size = h.get_size()
if "WL_SPAN" in os.environ:
    size = min(size, int(os.environ["WL_SPAN"]))
with open(mirror_path, "rb") as f:
    f.seek(base)
    m = bytearray(f.read(size))
assert len(m) == size, "mirror is shorter than the export"

# Trimmed ranges, [start, end, old bytes]: they may read as old or 0.
undef = []

def forget(a, b):
    """[a, b) now has defined contents: drop it from undef."""
    global undef
    out = []
    for s, e, old in undef:
        if e <= a or s >= b:
            out.append([s, e, old])
            continue
        if s < a:
            out.append([s, a, old[:a - s]])
        if e > b:
            out.append([b, e, old[b - s:]])
    undef = out

def old_or_zero(got, old, where):
    for p in range(0, len(got), 4096):
        g = got[p:p + 4096]
        o = old[p:p + 4096]
        if g == o or g == bytes(len(g)):
            continue
        for i in range(len(g)):
            assert g[i] == o[i] or g[i] == 0, \
                "trimmed byte %d reads %#x, expected %#x (old) or 0" % \
                (where + p + i, g[i], o[i])

def check(off, got):
    n = len(got)
    exp = bytes(m[off:off + n])
    if got == exp:
        return
    # Allow trimmed ranges; everything else must match exactly.
    pos = off
    for s, e, old in sorted(undef):
        if e <= off or s >= off + n:
            continue
        a, b = max(s, off), min(e, off + n)
        if pos < a:
            cmp_exact(pos, got[pos - off:a - off])
        old_or_zero(got[a - off:b - off], old[a - s:b - s], a)
        pos = b
    if pos < off + n:
        cmp_exact(pos, got[pos - off:])

def cmp_exact(off, got):
    exp = bytes(m[off:off + len(got)])
    if got != exp:
        i = next(i for i in range(len(got)) if got[i] != exp[i])
        raise AssertionError(
            "export offset %d (image offset %d): read %#x, expected %#x" %
            (off + i, base + off + i, got[i], exp[i]))

def pick():
    r = rng.random()
    if r < 0.4:
        off = rng.randrange(0, size // 65536 + 1) * 65536 + \
              rng.randint(-5000, 5000)
    elif r < 0.6:
        off = rng.randrange(0, size // 4096) * 4096
    else:
        off = rng.randrange(0, size)
    off = min(max(off, 0), size - 1)
    r = rng.random()
    if r < 0.3:
        n = rng.randint(1, 600)
    elif r < 0.6:
        n = rng.randint(1, max(1, maxlen // 4096)) * 4096
    else:
        n = rng.randint(1, maxlen)
    return off, min(n, size - off)

fua = h.can_fua()
counts = dict()
def count(what, n=1):
    counts[what] = counts.get(what, 0) + n

def pread(n, off):
    count("rbytes", n)
    return h.pread(n, off)

for i in range(nops):
    r = rng.random()
    off, n = pick()
    if r < 0.45 and not h.is_read_only():
        data = rng.randbytes(n)
        flags = nbd.CMD_FLAG_FUA if fua and rng.random() < 0.2 else 0
        h.pwrite(data, off, flags)
        m[off:off + n] = data
        forget(off, off + n)
        count("write")
        count("wbytes", n)
    elif r < 0.60 and h.can_zero():
        flags = 0
        if rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        if fua and rng.random() < 0.2:
            flags |= nbd.CMD_FLAG_FUA
        h.zero(n, off, flags)
        m[off:off + n] = bytes(n)
        forget(off, off + n)
        count("zero")
    elif r < 0.68 and trims and h.can_trim():
        forget(off, off + n)
        undef.append([off, off + n, bytes(m[off:off + n])])
        h.trim(n, off)
        count("trim")
    elif r < 0.88:
        check(off, pread(n, off))
        count("read")
    elif r < 0.93:
        # A run of sequential reads (what readahead is for).
        for j in range(8):
            o = off + j * 32768
            if o >= size:
                break
            k = min(32768, size - o)
            check(o, pread(k, o))
        count("seqread")
    elif r < 0.97 and h.can_flush():
        h.flush()
        count("flush")
    elif h.can_cache():
        h.cache(n, off)
        count("cache")

# Requests that fail once (the error filter) and are retried.
def inject(what, op):
    open(errfile, "w").close()
    threading.Timer(0.4, os.unlink, [errfile]).start()
    op()
    assert not os.path.exists(errfile), "%s did not wait for a retry" % what
    count("injected")

if errfile:
    off, n = 3 * 65536 - 1000, 70000
    data = rng.randbytes(n)
    inject("pwrite", lambda: h.pwrite(data, off))
    m[off:off + n] = data
    forget(off, off + n)
    inject("zero", lambda: h.zero(5000, off + 100))
    m[off + 100:off + 5100] = bytes(5000)
    forget(off + 100, off + 5100)
    inject("pread", lambda: check(off, h.pread(n, off)))
    off = 10 * 65536
    forget(off, off + 131072)
    undef.append([off, off + 131072, bytes(m[off:off + 131072])])
    inject("trim", lambda: h.trim(131072, off))

if h.can_flush():
    h.flush()

if os.environ.get("WL_EXPECT") == "wrong":
    m[size // 2] ^= 0x5a

# Read everything back.
for off in range(0, size, 1 << 20):
    n = min(1 << 20, size - off)
    check(off, pread(n, off))

# Adopt what the trimmed ranges read, then save the mirror.
for s, e, old in undef:
    m[s:e] = h.pread(e - s, s)
with open(mirror_path, "r+b") as f:
    f.seek(base)
    f.write(m)
print("%s: wl: %s" % (os.environ.get("WL_NAME", "?"), " ".join("%s=%d" % kv for kv in sorted(counts.items()))))
EOF

#----------------------------------------------------------------------
# Helpers.

img=$tmpdir/disk.qcow2
mirror=$tmpdir/mirror.raw
export WL_MIRROR=$mirror

# fresh [QEMU-IMG CREATE OPTIONS]: a new 32 MiB $img with data at odd
# places (written by qemu-io, so the plugin starts from QEMU's
# allocation), and its mirror.
fresh ()
{
  rm -f "$img" "$mirror"
  qemu-img create -q -f qcow2 "$@" "$img" 32M
  qemu-io -f qcow2 \
          -c "write -P 0x11 0 1M" \
          -c "write -P 0x22 1000000 70001" \
          -c "write -P 0x33 4194303 3" \
          -c "write -P 0x44 9437184 524288" \
          -c "write -z 9500000 100000" \
          -c "write -P 0x55 20000001 2000000" \
          -c "write -P 0x66 33488896 65536" \
          "$img" >/dev/null
  qemu-img convert -f qcow2 -O raw "$img" "$mirror"
}

# filtered FILTER-OPTIONS... -- PARAMS...: run the plugin on $img under
# the filters, captive; PARAMS are the filters' and the plugin's
# parameters and any other nbdkit options (--run).
filtered ()
{
  local -a fopts=()
  while [ "$1" != -- ]; do fopts+=("$1"); shift; done
  shift
  local _verbose=
  if [ "${QCOW2_TEST_VERBOSE:-}" = 1 ]; then _verbose=-v; fi
  nbdkit $_verbose -U - "${fopts[@]}" "$PLUGIN" file="$img" "$@"
}

# workload FILTER-OPTIONS... -- PARAMS...: wl.py under the filters.
workload ()
{
  filtered "$@" --run 'nbdsh -u "$uri" -c "exec(open(\"wl.py\").read())"' ||
    fail "$WL_NAME: the workload failed under: $*"
}

# after: the checks once nbdkit has exited.
after ()
{
  qcheck "$img" >/dev/null
  qemu-img compare -q -f qcow2 -F raw "$img" "$mirror" ||
    fail "$WL_NAME: qemu-img compare: the image differs from the mirror"
  rm -f out.raw
  serve_run file="$img" -r --run 'nbdcopy "$uri" out.raw' ||
    fail "$WL_NAME: nbdcopy out of the plain plugin failed"
  cmp out.raw "$mirror" ||
    fail "$WL_NAME: the plain plugin reads something else than the mirror"
  rm -f out.raw
}

# cow_case [CREATE-OPTIONS] -- PARAMS...: the workload under the cow
# filter; the file must not change at all.
cow_case ()
{
  local -a copts=()
  local sum
  while [ "$1" != -- ]; do copts+=("$1"); shift; done
  shift
  fresh "${copts[@]}"
  cp "$mirror" orig.raw
  sum=$(md5sum < "$img")
  workload --filter=cow -- "$@"
  [ "$(md5sum < "$img")" = "$sum" ] ||
    fail "$WL_NAME: the qcow2 file changed under the cow filter"
  mv orig.raw "$mirror"
  after
}

# now_ms: wall clock in milliseconds.
now_ms ()
{
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}

# run NAME CMD ARGS...: run one case (unless QCOW2_FILTERS_ONLY leaves
# it out), each with its own seed, and print its time.
seed=${QCOW2_FILTERS_SEED:-1000}
nr_cases=0
run ()
{
  local name=$1 t0; shift
  seed=$((seed + 1))
  if [ -n "${QCOW2_FILTERS_ONLY:-}" ] &&
     ! [[ $name =~ $QCOW2_FILTERS_ONLY ]]; then
    return 0
  fi
  t0=$(now_ms)
  (
    export WL_NAME=$name WL_SEED=$seed WL_BASE=0
    "$@"
  )
  echo "$name: ok ($(( $(now_ms) - t0 )) ms)"
  nr_cases=$((nr_cases + 1))
}

#----------------------------------------------------------------------
# The cases.

# cow: the client sees its writes, the file does not change.  Also 4 KiB
# blocks with cow-on-read on a 4 KiB-cluster image.
run cow cow_case --
run cow-4k-on-read cow_case -o cluster_size=4096 -- \
  cow-block-size=4096 cow-on-read=true

# cache.  No trims here: the cache filter has no .trim, so a trim goes
# straight to the plugin and the filter goes on serving the blocks it
# holds; what the client reads after a trim (the old data, allowed) is
# then not what the image holds (zeroes, also allowed), and nothing
# could be compared afterwards.
c_cache ()
{
  fresh
  export WL_TRIM=no
  workload --filter=cache -- "$@"
  after
}
run cache-writeback c_cache cache=writeback
run cache-writethrough c_cache cache=writethrough cache-on-read=true

# readahead (a read cache that writes must invalidate).
c_simple ()
{
  fresh
  workload "$@"
  after
}
run readahead c_simple --filter=readahead --

# blocksize: unaligned client requests become aligned read-modify-write
# cycles of at most 64k, on small clusters.
c_blocksize ()
{
  fresh -o cluster_size="$1"
  workload --filter=blocksize -- minblock=4096 maxdata=64k maxlen=1M
  after
}
run blocksize-4k c_blocksize 4096
WL_OPS=100 run blocksize-512 c_blocksize 512

# stats: the statsfile is written when nbdkit exits and counts what was
# done.
c_stats ()
{
  local op
  fresh
  rm -f stats.txt
  workload --filter=stats -- statsfile="$tmpdir/stats.txt"
  [ -s stats.txt ] || fail "stats: statsfile was not written"
  grep -E '^[a-z]+: [0-9]+ ops' stats.txt
  for op in read write zero trim flush cache; do
    grep -Eq "^$op: [1-9][0-9]* ops" stats.txt ||
      fail "stats: no $op ops counted in stats.txt"
  done
  after
}
run stats c_stats

# rate: 16 Mbit/s with a bucket of 0.5 s, on the first 2 MiB of the
# disk.  The workload cannot take less than the time its bytes need
# beyond the bucket, counted separately for reads and writes (the
# filter has two buckets), with M taken as 2^20 so the bound is low.
c_rate ()
{
  local t0 elapsed min
  fresh
  export WL_OPS=60 WL_MAXLEN=$((64 * 1024)) WL_SPAN=$((2 * MiB))
  t0=$(now_ms)
  workload --filter=rate -- rate=16M burstiness=0.5 > rate.out
  elapsed=$(( $(now_ms) - t0 ))
  cat rate.out
  min=$($PY - rate.out <<'EOF'
import re, sys
c = dict(re.findall(r"(\w+)=(\d+)", open(sys.argv[1]).read()))
rate = 16 * 2**20
t = sum(max(0, int(c.get(k, 0)) * 8 - rate * 0.5) / rate
        for k in ("rbytes", "wbytes"))
print(int(t * 1000))
EOF
)
  echo "rate: workload took $elapsed ms, at least $min ms expected"
  [ "$min" -ge 500 ] ||
    fail "rate: the workload is too small to measure (bug in the test)"
  [ $elapsed -ge "$min" ] ||
    fail "rate: the workload took $elapsed ms, less than rate=16M allows ($min ms)"
  after
}
run rate c_rate

# retry: alone (nothing fails), then over the error filter: a write, a
# zero, a read and a trim each fail once (error-file exists), so the
# retry filter closes and reopens the plugin and tries again a second
# later.  (The error filter fails requests before they reach the
# plugin, so each retry is sound.)
run retry c_simple --filter=retry -- retries=3 retry-delay=1

c_retry_reopen ()
{
  local n
  fresh
  export WL_OPS=60 WL_ERRFILE=$tmpdir/inject
  rm -f retry.err "$WL_ERRFILE"
  if ! filtered --filter=retry --filter=error -- \
         retries=2 retry-delay=1 retry-exponential=no \
         error-rate=100% error=EIO error-file="$WL_ERRFILE" \
         --run 'nbdsh -u "$uri" -c "exec(open(\"wl.py\").read())"' \
         2> retry.err; then
    cat retry.err >&2
    fail "retry-reopen: the workload failed"
  fi
  n=$(grep -c 'injecting EIO' retry.err || :)
  echo "retry-reopen: $n errors injected and retried"
  grep -v 'injecting EIO' retry.err >&2 || :
  [ "$n" -eq 4 ] || fail "retry-reopen: $n errors injected, 4 expected"
  after
}
run retry-reopen c_retry_reopen

# offset: a window of the image.
c_offset ()
{
  fresh
  export WL_BASE=$MiB
  workload --filter=offset -- offset=1M range=8M
  filtered --filter=offset -- offset=1M range=8M --run 'nbdsh -u "$uri" -c "
assert h.get_size() == 8 * 1024**2
try:
    h.pwrite(b\"x\", 8 * 1024**2)
except nbd.Error:
    pass
else:
    raise AssertionError(\"write past range= succeeded\")
"' || fail "offset: size or bounds wrong"
  after
}
run offset c_offset

# partition: an MBR with two partitions, written by python; the filter
# serves partition 2 (12 MiB at 12 MiB) and writes must stay in it.
c_partition ()
{
  fresh
  $PY - mbr.bin <<'EOF'
import struct, sys
mbr = bytearray(512)
def entry(i, lba, sectors):
    # status, CHS first (unused), type 0x83, CHS last, LBA, sectors
    struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i,
                     0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", lba, sectors)
entry(0, 2048, 8 * 2048)           # at 1 MiB, 8 MiB long
entry(1, 12 * 2048, 12 * 2048)     # at 12 MiB, 12 MiB long
mbr[510:512] = b"\x55\xaa"
open(sys.argv[1], "wb").write(mbr)
EOF
  qemu-io -f qcow2 -c "write -s mbr.bin 0 512" "$img" >/dev/null
  qemu-img convert -f qcow2 -O raw "$img" "$mirror"
  if command -v sfdisk >/dev/null 2>&1; then
    # Make sure the table is what we meant.
    sfdisk -d "$mirror" | grep -Eq "${mirror}2 : start= *24576, size= *24576" ||
      fail "partition: sfdisk does not see partition 2 where it was put"
  fi
  export WL_BASE=$((12 * MiB))
  workload --filter=partition -- partition=2
  filtered --filter=partition -- partition=2 --run \
    'nbdsh -u "$uri" -c "assert h.get_size() == 12 * 1024**2"' ||
    fail "partition: partition 2 is not 12 MiB"
  after
}
run partition c_partition

# nocache: NBD_CMD_CACHE not offered, emulated by reads, or ignored.
for mode in none emulate nop; do
  WL_OPS=150 run nocache-$mode c_simple --filter=nocache -- cachemode=$mode
done

# fua: emulated with flushes, forced on every write, passed through.
for mode in emulate force pass; do
  WL_OPS=150 run fua-$mode c_simple --filter=fua -- fuamode=$mode
done

# multi-conn: nbdcopy on 4 connections writes a raw file with holes
# (over the image's data: they must become zeroes), zero runs and data
# into the export, then reads it back on 4 connections.
$PY - src.raw <<'EOF'
import random, sys
rng = random.Random(7)
size = 32 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        n = min(rng.choice([4096, 65536, 300000, 1 << 20]) + rng.randint(0, 5000),
                size - pos)
        r = rng.random()
        if r < 0.5:
            f.seek(pos)
            f.write(rng.randbytes(n))
        elif r < 0.7:
            f.seek(pos)
            f.write(bytes(n))          # zeroes written as data
        pos += n                       # else: a hole
EOF
c_multi_conn ()
{
  fresh
  rm -f back.raw
  filtered --filter=multi-conn -- multi-conn-mode="$1" --run '
    nbdinfo --json "$uri" | grep -q "\"can_multi_conn\": true" &&
    nbdcopy --connections=4 --requests=16 --flush src.raw "$uri" &&
    nbdcopy --connections=4 --requests=16 "$uri" back.raw' ||
    fail "$WL_NAME: nbdcopy failed (or multi-conn not advertised)"
  cmp src.raw back.raw || fail "$WL_NAME: read back differs"
  cp src.raw "$mirror"
  after
}
for mode in emulate plugin; do
  run multi-conn-$mode c_multi_conn $mode
done

# (bash abandons a whole command on some errors, such as a bad
# arithmetic expansion, without failing the test: count the cases.)
if [ -z "${QCOW2_FILTERS_ONLY:-}" ]; then
  [ $nr_cases -eq 21 ] || fail "only $nr_cases of 21 cases ran"
else
  [ $nr_cases -gt 0 ] || fail "no case matches QCOW2_FILTERS_ONLY=$QCOW2_FILTERS_ONLY"
fi
echo "$0: $nr_cases cases passed"
