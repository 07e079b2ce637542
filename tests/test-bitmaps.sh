#!/usr/bin/env bash
# nbdkit-qcow2: persistent dirty bitmaps are kept on every write.
#
# For each image of a small matrix (64 KiB and 512-byte clusters,
# extended L2, an internal snapshot, lazy refcounts), three bitmaps are
# added with qemu-img: b64 (64 KiB granularity), b4 (4 KiB) and bdis
# (disabled).  qemu-io writes a few ranges first (QEMU sets their bits
# in b64, b4 and bdis, then bdis is disabled): bits set before the
# plugin opens the image must be kept.  Then the plugin serves it twice
# in a row; each time three connections make random writes, zeroes and
# trims in parallel, and the server stops cleanly.  After each run:
#   - qemu-img check exits 0 (no leaks, no corruption);
#   - for every bitmap, `qemu-nbd -B NAME` + `nbdinfo --map` shows
#     exactly the expected dirty ranges: the union of every range
#     written while the bitmap was enabled, rounded out to its
#     granularity (bdis: only qemu-io's ranges);
#   - `qemu-img info` shows no bitmap in use.
# Then the crash rule: a server killed (SIGKILL) after a flush leaves the
# enabled bitmaps in use (inconsistent) and the disabled one as it was,
# and the next server leaves the in-use ones alone (with a warning), and
# still keeps the image clean.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdinfo --version
requires /usr/bin/python3 -c 'import nbd'

PY=/usr/bin/python3
cd "$tmpdir"
MiB=$((1024 * 1024))
SIZE=$((64 * MiB + 12345 * 512))   # not a multiple of any granularity

cat > bm.py <<'EOF'
import json, random, sys, threading
import nbd
from ranges import merge                # tests/ranges.py

cmd = sys.argv[1]

if cmd == "run":                        # run URI SEED NOPS LOG
    uri, seed, nops, log = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    hs = []
    for i in range(3):
        h = nbd.NBD()
        h.connect_uri(uri)
        hs.append(h)
    size = hs[0].get_size()
    done = []
    lock = threading.Lock()
    def worker(i):
        rnd = random.Random(seed * 10 + i)
        h = hs[i]
        for _ in range(nops):
            n = rnd.choice([1, 511, 4096, 5000, 65536, 70000, 300000, 2 << 20])
            off = rnd.randrange(0, size - n)
            if rnd.random() < 0.3:
                off &= ~4095
            k = rnd.random()
            if k < 0.6:
                h.pwrite(bytes([rnd.randrange(1, 256)]) * n, off)
            elif k < 0.8:
                h.zero(n, off, 0 if rnd.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE)
            else:
                h.trim(n, off)
            with lock:
                done.append([off, off + n])
        h.flush()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in ts: t.start()
    for t in ts: t.join()
    # The last byte of the disk too (a partial granule at the end).
    hs[0].pwrite(b"\xee", size - 1)
    done.append([size - 1, size])
    for h in hs:
        h.shutdown()
    with open(log, "a") as f:
        for a, b in done:
            f.write("%d %d\n" % (a, b))
elif cmd == "expect":                   # expect GRAN SIZE LOG...
    gran, size = int(sys.argv[2]), int(sys.argv[3])
    ranges = []
    for log in sys.argv[4:]:
        for line in open(log):
            a, b = map(int, line.split())
            ranges.append([a // gran * gran, min(size, -(-b // gran) * gran)])
    for a, b in merge(ranges):
        print(a, b)
elif cmd == "dirty":                    # dirty < nbdinfo --map --json
    m = json.load(sys.stdin)
    for a, b in merge([[e["offset"], e["offset"] + e["length"]]
                       for e in m if e["type"] & 1]):
        print(a, b)
EOF

# dirty IMG NAME: the dirty ranges of bitmap NAME, as qemu-nbd serves it.
dirty ()
{
    local sock=$tmpdir/qnbd.sock pid
    rm -f "$sock"
    qemu-nbd -r -f qcow2 -B "$2" -k "$sock" "$1" & pid=$!
    wait_socket "$sock" || fail "qemu-nbd -B $2 $1 did not start"
    nbdinfo --map=qemu:dirty-bitmap:"$2" --json "nbd+unix:///?socket=$sock" |
        $PY bm.py dirty
    wait $pid
}

# check_bitmaps IMG LOGS...: b64 and b4 cover exactly LOGS (and the
# qemu-io ranges), bdis exactly the qemu-io ranges, none in use.
check_bitmaps ()
{
    local img=$1 name gran; shift
    for name in b64:65536 b4:4096 bdis:65536; do
        gran=${name#*:}; name=${name%:*}
        if [ $name = bdis ]; then
            $PY bm.py expect $gran $SIZE pre.log > expect
        else
            $PY bm.py expect $gran $SIZE pre.log "$@" > expect
        fi
        dirty "$img" $name > got
        cmp -s expect got || {
            diff expect got | head -20 >&2
            fail "$img: bitmap $name: dirty map differs from the writes"
        }
        echo "$img: $name: $(wc -l < got) dirty ranges, as expected"
    done
    [ -z "$(bitmaps_in_use "$img")" ] ||
        fail "$img: a bitmap is still in use after a clean close"
}

for kind in c64k c512 extl2 snapshot lazy; do
    img=$kind.qcow2
    case $kind in
    c64k) opts=cluster_size=65536 ;;
    c512) opts=cluster_size=512 ;;
    extl2) opts=cluster_size=65536,extended_l2=on ;;
    snapshot) opts=cluster_size=65536 ;;
    lazy) opts=cluster_size=65536,lazy_refcounts=on ;;
    esac
    qemu-img create -q -f qcow2 -o $opts $img $SIZE
    qemu-img bitmap --add -g 65536 $img b64
    qemu-img bitmap --add -g 4096 $img b4
    qemu-img bitmap --add -g 65536 $img bdis
    # Bits set before the plugin sees the image: in all three.
    qemu-io -f qcow2 -c "write -P 0x55 1M 100k" -c "write -P 0x66 40M 4k" \
        $img >/dev/null
    printf '%d %d\n' $MiB $((MiB + 102400)) $((40 * MiB)) $((40 * MiB + 4096)) \
        > pre.log
    qemu-img bitmap --disable $img bdis
    [ $kind = snapshot ] && qemu-img snapshot -c snap1 $img
    rm -f run.log

    for seed in 1 2; do
        serve_run file=$img --run "$PY bm.py run \"\$uri\" $seed 40 run.log"
        qcheck $img >/dev/null
        check_bitmaps $img run.log
    done
done

# The crash rule, on the last image (lazy refcounts): SIGKILL after a
# flush leaves b64 and b4 in use, bdis as it was.
img=lazy.qcow2
cp $img before-kill.qcow2
rm -f kill.sock kill.pid
nbdkit -f -U kill.sock -P kill.pid "$PLUGIN" file=$img 2> kill.log &
wait_socket kill.sock || fail "nbdkit on kill.sock did not start"
nbdsh -u "nbd+unix:///?socket=$tmpdir/kill.sock" \
      -c 'h.pwrite(b"k" * 4096, 8 << 20); h.flush()'
kill -9 "$(cat kill.pid)"
wait || :
[ "$(bitmaps_in_use $img)" = "b4 b64" ] ||
    fail "after SIGKILL: the enabled bitmaps are not marked in use"
qcheck_leaks_ok $img >/dev/null
dirty $img bdis > got
$PY bm.py expect 65536 $SIZE pre.log > expect
cmp -s expect got || fail "after SIGKILL: the disabled bitmap changed"
timeout 20 qemu-nbd -r -f qcow2 -B b64 -k q.sock $img 2>/dev/null &&
    fail "qemu-nbd serves a bitmap left in use"

# Served again: the in-use bitmaps are left alone, with a warning.
serve_run file=$img --run 'nbdsh -u "$uri" -c "h.pwrite(b\"z\" * 512, 0)"' \
    2> again.log
grep -q "bitmap 'b64' is in use" again.log ||
    fail "no warning about the bitmap left in use"
[ "$(bitmaps_in_use $img)" = "b4 b64" ] ||
    fail "the bitmaps left in use changed"
qcheck $img >/dev/null
echo "crash rule: in use after SIGKILL, left alone afterwards"
