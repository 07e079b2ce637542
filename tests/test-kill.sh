#!/usr/bin/env bash
# nbdkit-qcow2: kill -9 the server under a concurrent write load, many
# times; no corruption, and nothing that was flushed is lost.
#
# Three images (64 KiB clusters; 4 KiB clusters with lazy refcounts, so
# every restart repairs a dirty image; 512 B clusters with tiny L2 and
# refcount caches, so that write-back happens all the time) take turns.
# Each round:
#
#  1. nbdkit serves the image in the background (-P pidfile, a Unix
#     socket), as a real server would be;
#  2. 4 clients (separate processes and connections) write 4 KiB blocks
#     of the first half of the disk, 1 to 4 at a time; client k owns the
#     16-block stripes s with s % 4 == k, so no block has two writers.
#     Every block written carries a header (block number, version) and
#     data derived from both; sometimes a block is zeroed instead.  A
#     client logs "I block version kind" before it issues a request,
#     and after each flush returns, "F block version kind" for the last
#     request on each block it completed before the flush;
#  3. after a random time (0.2 to 2.5 s, so sometimes during open or
#     the repair of a dirty image) the server is killed with SIGKILL;
#  4. `qemu-img check` must exit 0 or 3 (3 = leaked clusters, allowed
#     after a crash; 2 = corruption); then the image is converted to raw
#     with qemu-img (the oracle reads it, not us) and every block must
#     be zero (never written), or hold an issued version no older than
#     the last flushed one, intact; or be zero if such a zeroing was
#     issued.  Versions grow across rounds, so the logs accumulate.
#
# QCOW2_KILL_ROUNDS=N (default 15) rounds; QCOW2_KILL_SEED=K;
# QCOW2_KILL_KEEP=DIR keeps the work files.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires nbdkit --version
requires /usr/bin/python3 -c 'import nbd'

PY=/usr/bin/python3
ROUNDS=${QCOW2_KILL_ROUNDS:-15}
SEED=${QCOW2_KILL_SEED:-1}
work=${QCOW2_KILL_KEEP:-$tmpdir}
mkdir -p "$work"
cd "$work"

cat > client.py <<'EOF'
# client.py SOCK CLIENT NCLIENTS ROUND SEED BLOCKS LOG
import nbd, random, sys

sock, me, nclients, rnd, seed, blocks, log = sys.argv[1:]
me, nclients, rnd, seed, blocks = map(int, (me, nclients, rnd, seed, blocks))
BS = 4096
STRIPE = 16
rng = random.Random(seed * 1000003 + rnd * 101 + me)
log = open(log, "a", buffering=1)
mine = [s for s in range(blocks // STRIPE) if s % nclients == me]
seq = 0

def content(blk, ver):
    head = b"QKILL%011d%016d" % (blk, ver)
    return head + random.Random(blk * 1000003 + ver).randbytes(BS - len(head))

h = nbd.NBD()
try:
    h.connect_unix(sock)
except nbd.Error:
    sys.exit(0)                 # the server was killed before we came
done = {}                       # block -> (version, kind) since last flush
try:
    while True:
        s = rng.choice(mine)
        n = rng.randint(1, 4)
        first = s * STRIPE + rng.randint(0, STRIPE - n)
        seq += 1
        ver = rnd * 10000000 + seq
        kind = "Z" if rng.random() < 0.1 else "W"
        for b in range(first, first + n):
            log.write("I %d %d %s\n" % (b, ver, kind))
        log.flush()
        if kind == "Z":
            h.zero(n * BS, first * BS,
                   nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        else:
            h.pwrite(b"".join(content(b, ver)
                              for b in range(first, first + n)), first * BS,
                     nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
        for b in range(first, first + n):
            done[b] = (ver, kind)
        if rng.random() < 0.1:
            h.flush()
            for b, (v, k) in done.items():
                log.write("F %d %d %s\n" % (b, v, k))
            log.flush()
            done = {}
except nbd.Error:
    pass                        # killed
EOF

cat > verify.py <<'EOF'
# verify.py RAW BLOCKS LOG...: every block as the logs allow.
import random, sys

raw, blocks = sys.argv[1], int(sys.argv[2])
BS = 4096
issued = {}                     # block -> {version: kind}
flushed = {}                    # block -> (version, kind)
for path in sys.argv[3:]:
    for line in open(path):
        parts = line.split()
        if len(parts) != 4:
            continue            # a line cut by the end of the client
        t, b, v, k = parts[0], int(parts[1]), int(parts[2]), parts[3]
        if t == "I":
            issued.setdefault(b, {})[v] = k
        elif t == "F" and v >= flushed.get(b, (-1, ""))[0]:
            flushed[b] = (v, k)

def content(blk, ver):
    head = b"QKILL%011d%016d" % (blk, ver)
    return head + random.Random(blk * 1000003 + ver).randbytes(BS - len(head))

bad = 0
zero = bytes(BS)
with open(raw, "rb") as f:
    for b in range(blocks):
        got = f.read(BS)
        fv, fk = flushed.get(b, (-1, ""))
        iss = issued.get(b, {})
        why = None
        if got == zero:
            if fv >= 0 and fk != "Z" and \
               not any(k == "Z" and v >= fv for v, k in iss.items()):
                why = "reads as zeroes, flushed version %d" % fv
        elif not got.startswith(b"QKILL"):
            why = "garbage (%s...)" % got[:16].hex()
        else:
            gb, gv = int(got[5:16]), int(got[16:32])
            if gb != b:
                why = "holds block %d's data (version %d)" % (gb, gv)
            elif iss.get(gv) != "W":
                why = "version %d was never written" % gv
            elif gv < fv:
                why = "version %d is older than flushed %d" % (gv, fv)
            elif got != content(b, gv):
                why = "version %d is damaged" % gv
        if why:
            bad += 1
            if bad <= 10:
                print("block %d: %s" % (b, why), file=sys.stderr)
print("%d blocks, %d flushed, %d bad" % (blocks, len(flushed), bad))
sys.exit(1 if bad else 0)
EOF

MiB=$((1024 * 1024))
SIZE=$((64 * MiB))
BLOCKS=$((SIZE / 2 / 4096))
NCLIENTS=4
names=(c64k c4k-lazy c512)
qemu-img create -q -f qcow2 -o cluster_size=65536 c64k.qcow2 $SIZE
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on \
    c4k-lazy.qcow2 $SIZE
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 $SIZE
declare -A params
params[c64k]=
params[c4k-lazy]=
params[c512]="l2-cache-size=16K refcount-cache-size=8K"

# If the test fails half way, do not leave a server behind.
kill_server ()
{
    if [ -s "$work/nbdkit.pid" ]; then
        kill -9 "$(cat "$work/nbdkit.pid")" 2>/dev/null || :
    fi
}
cleanup_fn kill_server

RANDOM=$SEED
start=$SECONDS
leaky=0
for (( r = 1; r <= ROUNDS; r++ )); do
    name=${names[$(( (r - 1) % ${#names[@]} ))]}
    img=$name.qcow2
    sock=$work/sock
    pidfile=$work/nbdkit.pid
    rm -f "$sock" "$pidfile"

    # shellcheck disable=SC2086
    nbdkit -U "$sock" -P "$pidfile" "$PLUGIN" file="$img" ${params[$name]}
    wait_socket "$sock" "$pidfile" || fail "round $r: nbdkit did not start"
    pid=$(cat "$pidfile")

    cpids=()
    for (( k = 0; k < NCLIENTS; k++ )); do
        $PY client.py "$sock" $k $NCLIENTS $r "$SEED" $BLOCKS \
            "$name.log.$k" &
        cpids+=($!)
    done
    delay_ms=$(( 200 + RANDOM % 2300 ))
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill -9 "$pid"
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    ! kill -0 "$pid" 2>/dev/null || fail "round $r: nbdkit $pid survived"
    rm -f "$pidfile"            # so that the cleanup kills no other process
    for p in "${cpids[@]}"; do
        wait "$p" || fail "round $r: a client failed"
    done

    st=0
    qemu-img check "$img" > check.log 2>&1 || st=$?
    if [ $st -ne 0 ] && [ $st -ne 3 ]; then
        cat check.log
        fail "round $r ($name): qemu-img check exit $st after kill -9"
    fi
    [ $st -eq 0 ] || leaky=$((leaky + 1))
    qemu-img convert -O raw "$img" "$name.raw"
    out=$($PY verify.py "$name.raw" $BLOCKS "$name".log.*) ||
        fail "round $r ($name): flushed data lost after kill -9 at ${delay_ms} ms"
    rm -f "$name.raw"
    nf=$(grep -c '^F' "$name".log.* | awk -F: '{ s += $2 } END { print s }')
    echo "round $r: $name killed after ${delay_ms} ms: check exit $st, $out," \
         "$nf flush records"
done
echo "$0: $ROUNDS rounds in $((SECONDS - start)) s, $leaky with leaks"
