#!/usr/bin/env bash
# nbdkit-qcow2: compress=on (compressed writes).
#
# A mixed raw image (text-like, zero, random and half-zero clusters:
# mkmixed.py) is copied with nbdcopy into a new image made by the
# plugin in one step (create=true compression-type=T compress=on), for
# zstd and zlib.  The copy must be `qemu-img compare`-equal to the
# source and pass `qemu-img check`, at least 60% of its allocated
# clusters must be compressed (`qemu-img check --output=json`), and its
# file must be within 5% of the size of `qemu-img convert -c` of the
# source (issue 18), in fact within 1.5% (packing as tight as QEMU's).
# Then random requests through the plugin, with compress on and off
# (whole clusters over compressed ones, partial writes into
# them, writes over normal clusters, zeroes, trims, from several
# connections at once), are mirrored into a raw copy: the image must
# stay equal to the mirror and pass `qemu-img check`.  The same random
# requests run on small images of other geometries (512-byte clusters,
# 1-bit refcounts, extended L2 entries, compat 0.10, a backing file).
#
# COMPRESS_TEST_SIZE (default 64M) is the size of the mixed image.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires nbdcopy --version
requires nbdsh --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3
size=${COMPRESS_TEST_SIZE:-64M}
cd "$tmpdir"

# jget IMG KEY: a number from qemu-img check --output=json.
jget ()
{
    qemu-img check --output=json "$1" |
        $PY -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$2"
}

# ops.py: random requests from NCONN connections at once (threads, one
# handle each), mirrored into MIRROR; compressible data (text with a
# random stamp) or random data, whole clusters and pieces.
cat > ops.py <<'PYEOF'
import os, random, threading, nbd
uri, mirror, seed = os.environ["uri"], os.environ["MIRROR"], int(os.environ["SEED"])
nops, nconn, cs = int(os.environ["NOPS"]), int(os.environ.get("NCONN", "1")), int(os.environ["CS"])
size = os.path.getsize(mirror)
words = [b"alpha ", b"beta ", b"qcow2 ", b"\n", b"cluster ", b"zeta "]
r0 = random.Random(seed)
corpus = b"".join(r0.choice(words) for _ in range(100000))
fd = os.open(mirror, os.O_RDWR)
lock = threading.Lock()

def data(rng, n):
    if rng.random() < 0.25:
        return os.urandom(n)
    s = rng.randrange(len(corpus))
    b = os.urandom(8) + corpus[s:]
    while len(b) < n:
        b += corpus
    return b[:n]

def worker(t):
    rng = random.Random(seed * 100 + t)
    h = nbd.NBD()
    h.connect_uri(uri)
    # Each thread owns the clusters i with i % nconn == t (clusters
    # shared by two threads' requests would make the mirror's order
    # differ from the image's); a request spans 1-3 of its own.
    mine = [i for i in range(size // cs) if i % nconn == t]
    for _ in range(nops):
        c = rng.choice(mine) * cs
        k = rng.random()
        if k < 0.4:                                  # whole cluster(s)
            off, n = c, cs * (1 if nconn > 1 else rng.randint(1, 3))
        elif k < 0.8:                                # a piece
            off = c + rng.randrange(cs)
            n = rng.randint(1, c + cs - off)
        elif k < 0.9:
            off, n = c, cs
            h.zero(n, off)
            with lock:
                os.pwrite(fd, bytes(n), off)
            continue
        else:
            off, n = c, cs
            h.trim(n, off)
            got = h.pread(n, off)                    # trim: as it reads
            with lock:
                os.pwrite(fd, got, off)
            continue
        n = min(n, size - off)
        b = data(rng, n)
        h.pwrite(b, off)
        with lock:
            os.pwrite(fd, b, off)
        if rng.random() < 0.05:
            h.flush()
    # Last, one whole compressible cluster of its own each.
    off = rng.choice(mine) * cs
    n = min(cs, size - off)
    b = (b"%d" % off + corpus * (cs // len(corpus) + 1))[:n]
    h.pwrite(b, off)
    with lock:
        os.pwrite(fd, b, off)
    h.shutdown()

ts = [threading.Thread(target=worker, args=(t,)) for t in range(nconn)]
for t in ts: t.start()
for t in ts: t.join()
PYEOF

# churn IMG MIRROR CS NOPS NCONN SEED PLUGIN_OPTS...: ops.py through the
# plugin, then IMG must equal MIRROR and check clean.
churn ()
{
    local img=$1 mirror=$2
    CS=$3 NOPS=$4 NCONN=$5 SEED=$6 MIRROR=$mirror
    export CS NOPS NCONN SEED MIRROR
    shift 6
    serve_run file=$img "$@" --run 'export uri; nbdsh -c "exec(open(\"ops.py\").read())"'
    qcheck "$img"
    qemu-img compare -q -f raw -F qcow2 "$mirror" "$img" ||
        fail "$img differs from its mirror after requests with $*"
}

$PY "$abs_top_srcdir/tests/mkmixed.py" src.raw "$size"

for t in zstd zlib; do
    img=copy-$t.qcow2
    serve_run file=$img create=true size=$size compression-type=$t \
              compress=on --run 'nbdcopy src.raw "$uri"'
    qcheck $img
    qemu-img compare -q -f raw -F qcow2 src.raw $img ||
        fail "$img differs from src.raw"
    qemu-img info $img | grep -q "compression type: $t" ||
        fail "$img: compression type is not $t"
    comp=$(jget $img compressed-clusters)
    alloc=$(jget $img allocated-clusters)
    echo "$t: $comp of $alloc allocated clusters compressed"
    [ "$alloc" -gt 0 ] && [ $((comp * 100)) -ge $((alloc * 60)) ] ||
        fail "$img: only $comp of $alloc allocated clusters compressed"
    qemu-img convert -c -f raw -O qcow2 -o compression_type=$t src.raw ref-$t.qcow2
    ours=$(stat -c %s $img) ref=$(stat -c %s ref-$t.qcow2)
    echo "$t: file $ours bytes, qemu-img convert -c: $ref bytes"
    [ $((ours * 100)) -le $((ref * 105)) ] ||
        fail "$img: $ours bytes, more than 5% over qemu-img's $ref"
    # Packing as tight as QEMU's: streams go into the room left in a
    # host cluster even when the next cluster was taken by a normal
    # write meanwhile (2-3% over without that, 0-0.3% with it).
    [ $((ours * 1000)) -le $((ref * 1015)) ] ||
        fail "$img: $ours bytes, more than 1.5% over qemu-img's $ref: loose packing"

    # Requests over the compressed copy, with compress on, then off.
    cp src.raw mirror-$t.raw
    churn $img mirror-$t.raw 65536 100 4 1 compress=on
    comp2=$(jget $img compressed-clusters)
    churn $img mirror-$t.raw 65536 60 2 2 compress=off
    churn $img mirror-$t.raw 65536 60 2 3 compress=on detect-zeroes=on
    echo "$t: after the requests: $(jget $img compressed-clusters) compressed"
    [ "$comp2" -gt 0 ] || fail "$img: no compressed cluster left"
done

# Write-back started as the copy goes (rw.c: start_writeback): with
# strace, a compressed copy of 64 MiB asks the kernel to start writing
# the image file back (sync_file_range, SYNC_FILE_RANGE_WRITE), at
# least once per 4 MiB of compressed clusters, and starts an early sync
# (an fdatasync while the copy runs, io.c "Early syncs"); cache=none
# starts the early sync only, and cache=unsafe, which never syncs,
# neither.  The fdatasyncs before nbdcopy exits (strace's first signal
# line) are counted against cache=unsafe's, which are create=true's
# own.  (Not under the sanitizers: LeakSanitizer does not work under
# strace.)
if [ -n "${QCOW2_SAN_PRELOAD:-}" ]; then
    echo "$0: note: a sanitizer build: write-back not checked"
elif ! command -v strace >/dev/null; then
    echo "$0: note: no strace: write-back not checked"
else
    $PY "$abs_top_srcdir/tests/mkmixed.py" kick.raw 64M
    # cache=none needs O_DIRECT, which tmpfs (/tmp on some systems)
    # has not.
    caches="unsafe writeback none"
    rm -f kick.qcow2
    if ! nbdkit -U - "$PLUGIN" file=kick.qcow2 create=true size=64M \
         cache=none --run true 2>/dev/null; then
        echo "$0: note: no direct I/O here: cache=none not checked"
        caches="unsafe writeback"
    fi
    for cache in $caches; do
        rm -f kick.qcow2
        strace -f -qq -e trace=sync_file_range,fdatasync -o kick-$cache.log \
               nbdkit -U - "$PLUGIN" file=kick.qcow2 create=true size=64M \
               compression-type=zstd compress=on cache=$cache \
               --run 'nbdcopy kick.raw "$uri"'
        qcheck kick.qcow2
        n=$(grep -c 'sync_file_range(.*SYNC_FILE_RANGE_WRITE' kick-$cache.log || :)
        s=$(sed '/ --- /,$d' kick-$cache.log | grep -c 'fdatasync(' || :)
        echo "cache=$cache: $n write-backs started, $s fdatasyncs during the copy"
        case $cache in
        unsafe)
            [ "$n" = 0 ] || fail "cache=unsafe: write-back started $n times"
            s0=$s ;;
        writeback)
            [ "$n" -ge 1 ] || fail "cache=writeback: write-back never started"
            [ "$s" -gt "$s0" ] || fail "cache=writeback: no early sync" ;;
        none)
            [ "$s" -gt "$s0" ] || fail "cache=none: no early sync" ;;
        esac
    done
    rm -f kick.raw kick.qcow2 kick-*.log
fi

# Other geometries: small images, fresh (create=true) and requests
# straight away.
for opts in "cluster-size=512" "cluster-size=4096 refcount-bits=1" \
            "cluster-size=65536 refcount-bits=2" \
            "cluster-size=65536 extended-l2=on compression-type=zstd" \
            "cluster-size=2M" \
            "cluster-size=4096 compat=0.10"; do
    cs=$(echo "$opts" | sed 's/.*cluster-size=\([0-9M]*\).*/\1/; s/2M/2097152/')
    rm -f small.qcow2
    truncate -s 0 small.raw
    truncate -s 8M small.raw
    serve_run file=small.qcow2 create=true size=8M $opts compress=on \
              --run 'true'
    n=150
    [ "$cs" -lt 2097152 ] || n=20       # 2 MiB clusters compress slowly
    churn small.qcow2 small.raw $cs $n 1 4 compress=on
    churn small.qcow2 small.raw $cs $n 3 5 compress=on
    [ "$(jget small.qcow2 compressed-clusters)" -gt 0 ] ||
        fail "$opts: no compressed cluster"
    echo "$opts: $(jget small.qcow2 compressed-clusters) compressed clusters"
done

# A backing file: whole clusters over it are compressed, pieces are
# copied from it.
$PY "$abs_top_srcdir/tests/mkmixed.py" base.raw 8M 4096
qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=4096 over.qcow2
cp base.raw over.raw
churn over.qcow2 over.raw 4096 200 2 6 compress=on
[ "$(jget over.qcow2 compressed-clusters)" -gt 0 ] ||
    fail "over.qcow2: no compressed cluster"
