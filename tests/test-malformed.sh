#!/usr/bin/env bash
# nbdkit-qcow2: the plugin must refuse malformed images, cleanly.
#
# Each case takes a valid image made here by qemu-img (no binary images
# are committed), damages it (usually by poking a header field) and
# starts the plugin on it with `--run true`.  nbdkit must exit non-zero,
# its stderr must match the case's regex (case-insensitive), and there
# must be no crash: no exit status over 128, no "Segmentation fault",
# "Aborted", "core dumped", AddressSanitizer or UBSan ("runtime error")
# report.  A control case (expect OK) must start normally, so that the
# base images are known to be good.
#
# To add a case, add one line to the table below:
#     t NAME 'COMMANDS MAKING $img' 'EXPECTED STDERR REGEX'
# COMMANDS run in a fresh directory ($PWD) with $img set to the image
# path; helpers: base [TEMPLATE] (copy a template image to $img) and
# poke IMG OFFSET BYTES HEXVALUE.
#
# QCOW2_VALGRIND=1 also runs the first 8 cases under valgrind
# (QCOW2_VALGRIND=all: every case).
#
# MALFORMED_TEST_STEP=K (default 1) starts nbdkit on every K-th case of
# the first table only (and on every control case); the other cases'
# images are opened in one process by test-fuzz-replay (the fuzz
# target: open, read, write, close through core, built like the plugin,
# so with ASan and UBSan in a sanitizer build), which must not crash
# or report.  The sanitizer pass in CI uses 2: there each nbdkit costs
# a few seconds (LeakSanitizer at exit), and the message each case
# expects is checked for every case by the plain make check.  The
# write cases (second table) always run in full.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires truncate --version
requires /usr/bin/python3 --version

PY=/usr/bin/python3


# poke IMG OFFSET BYTES HEXVALUE
# Write HEXVALUE as a BYTES-wide big-endian integer at OFFSET (decimal
# or 0x...) of IMG, in place.
poke ()
{
  $PY - "$@" <<'EOF'
import sys
img, off, width, value = sys.argv[1:5]
with open(img, "r+b") as f:
    f.seek(int(off, 0))
    f.write(int(value, 16).to_bytes(int(width), "big"))
EOF
}

#----------------------------------------------------------------------
# Template images, made once.  v3, 64 KiB clusters, 64 MiB, one data
# cluster; the layout qemu-img 7.2 gives it (the cases below rely on
# the header fields, not on this layout):
#   0x00000 header (header_length 112, then the feature-name table
#           extension at 112), 0x10000 refcount table (1 cluster),
#   0x20000 refcount block, 0x30000 L1 table (l1_size 1),
#   0x40000 L2 table, 0x50000 data; file size 0x60000.
tpl=$tmpdir/templates
mkdir -p "$tpl"
qemu-img create -q -f qcow2 "$tpl/v3.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x55 0 4096' "$tpl/v3.qcow2" >/dev/null
# v2 (compat=0.10): header_length is implicit (72).
qemu-img create -q -f qcow2 -o compat=0.10 "$tpl/v2.qcow2" 64M
# An overlay whose backing file exists.
qemu-img create -q -f qcow2 "$tpl/backing.qcow2" 64M
qemu-img create -q -f qcow2 -b "$tpl/backing.qcow2" -F qcow2 "$tpl/overlay.qcow2" 64M
# 4 KiB clusters, 1 MiB: l1_size 1 is enough even with extended L2.
qemu-img create -q -f qcow2 -o cluster_size=4096 "$tpl/c4k-1m.qcow2" 1M

# base [TEMPLATE]: copy a template (default v3) to $img.
base ()
{
  cp "$tpl/${1:-v3}.qcow2" "$img"
}

#----------------------------------------------------------------------
# The table.  Header offsets (big-endian): 0 magic, 4 version,
# 8 backing_file_offset u64, 16 backing_file_size u32, 20 cluster_bits,
# 24 size u64, 32 crypt_method, 36 l1_size, 40 l1_table_offset u64,
# 48 refcount_table_offset u64, 56 refcount_table_clusters,
# 60 nb_snapshots, 64 snapshots_offset u64, 72 incompatible u64,
# 80 compatible u64, 88 autoclear u64, 96 refcount_order,
# 100 header_length, 104 compression_type u8.

names=() makers=() regexes=()
t ()
{
  names+=("$1") makers+=("$2") regexes+=("$3")
}

t valid-v3          'base'                              OK
t valid-v2          'base v2'                           OK
t valid-overlay     'base overlay'                      OK
t bad-magic         'base; poke $img 0 4 0x514649fa'    'not a qcow2 image'
t zero-magic        'base; poke $img 0 4 0'             'not a qcow2 image'
t version-1         'base; poke $img 4 4 1'             'unsupported qcow2 version'
t version-4         'base; poke $img 4 4 4'             'unsupported qcow2 version'
t cluster-bits-8    'base; poke $img 20 4 8'            'cluster.bits'
t cluster-bits-22   'base; poke $img 20 4 0x16'         'cluster.bits'
t cluster-bits-63   'base; poke $img 20 4 0x3f'         'cluster.bits'
t cluster-bits-huge 'base; poke $img 20 4 0xffffffff'   'cluster.bits'
t l1-beyond-eof     'base; poke $img 40 8 0x100000000'  'L1 table.*beyond end of file'
t l1-unaligned      'base; poke $img 40 8 0x30200'      'L1 table.*not cluster aligned'
t l1-size-absurd    'base; poke $img 36 4 0x7fffffff'   'L1 table.*(too large|beyond end of file)'
t l1-size-max       'base; poke $img 36 4 0xffffffff'   'L1 table.*(too large|beyond end of file)'
t l1-too-small      'base; poke $img 24 8 0x10000000000' 'L1 table too small'
t rt-beyond-eof     'base; poke $img 48 8 0x100000000'  'refcount table.*beyond end of file'
t rt-unaligned      'base; poke $img 48 8 0x10200'      'refcount table.*not cluster aligned'
t rt-clusters-absurd 'base; poke $img 56 4 0x7fffffff'  'refcount table.*(too large|beyond end of file)'
t size-absurd       'base; poke $img 24 8 0xffffffffffffffff' 'virtual size.*too large'
t size-2-pow-63     'base; poke $img 24 8 0x8000000000000000' 'virtual size.*too large'
t incompat-bit-5    'base; poke $img 72 8 0x20'         'unknown incompatible feature'
t incompat-bit-40   'base; poke $img 72 8 0x10000000000' 'unknown incompatible feature'
t crypt-aes         'base; poke $img 32 4 1'            'encrypt.*AES'
t crypt-luks        'base; poke $img 32 4 2'            'encrypt.*LUKS'
t crypt-luks-real   'make_luks'                         'LUKS'
t truncated-50      'base; truncate -s 50 $img'         'too short|truncated|not a qcow2'
t truncated-v3-hdr  'base; truncate -s 100 $img'        'too short|truncated|not a qcow2'
t empty             ': > $img'                          'too short|truncated|not a qcow2'
t header-length-96  'base; poke $img 100 4 0x60'        'header.length'
t header-length-108 'base; poke $img 100 4 0x6c'        'header.length'
t refcount-order-7  'base; poke $img 96 4 7'            'refcount.order'
t backing-name-long 'base overlay; poke $img 16 4 0x1388' 'backing file name'
t backing-name-eof  'base overlay; poke $img 8 8 0x100000000' 'backing file name'
t snapshots-eof     'base; poke $img 60 4 0x10000; poke $img 64 8 0x100000000' 'snapshot'
t snapshots-too-many 'base; poke $img 60 4 0x10001; poke $img 64 8 0x30000' 'snapshot'
t hdr-ext-overrun   'base; poke $img 116 4 0x10000'     'header extension'
t compression-2     'base; poke $img 104 1 2; poke $img 72 8 0x8' 'compression type'
t compression-1-nobit 'base; poke $img 104 1 1'         'compression type'
t extl2-cluster-4k  'base c4k-1m; poke $img 72 8 0x10'  'extended L2|subcluster'
t backing-self      'make_self_backed'                  'backing.*(loop|depth|chain)'
t backing-cycle     'make_backing_cycle'                'backing.*(loop|depth|chain)'
t backing-missing   'make_missing_backing'              'backing.*missing-base\.qcow2|missing-base\.qcow2.*backing'
t data-file-missing 'make_missing_data_file'            'data file'
t data-file-no-name 'base; poke $img 72 8 0x4'          'data file'

# Makers too long for one line.

# qemu-img times its key derivation to pick an iteration count; on a
# busy machine that measurement can fail ("Unable to get accurate CPU
# usage"), so try a few times.
make_luks ()
{
  local try
  for try in 1 2 3 4 5; do
    rm -f "$img"
    qemu-img create -q -f qcow2 --object secret,id=sec0,data=abc \
      -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50 \
      "$img" 16M && return 0
    sleep 1
  done
  return 1
}

# The image names itself as its backing file (-u: qemu-img would
# otherwise open the chain).
make_self_backed ()
{
  qemu-img create -q -f qcow2 -u -b "$(basename "$img")" -F qcow2 "$img" 64M
}

# img -> other.qcow2 -> img
make_backing_cycle ()
{
  qemu-img create -q -f qcow2 -u -b other.qcow2 -F qcow2 "$img" 64M
  qemu-img create -q -f qcow2 -u -b "$(basename "$img")" -F qcow2 other.qcow2 64M
}

make_missing_backing ()
{
  qemu-img create -q -f qcow2 -u -b missing-base.qcow2 -F qcow2 "$img" 64M
}

make_missing_data_file ()
{
  qemu-img create -q -f qcow2 -o data_file="$PWD/gone.data" "$img" 64M
  rm "$PWD/gone.data"
}

#----------------------------------------------------------------------
# Second table: images that open, with an L2 entry that points at
# metadata (or past the end of the file).  Freeing that entry, or
# copying from it, would hand the metadata to the allocator and the
# next allocating write would put guest data over it.  Each case makes
# the image, then in one server: OP on guest cluster 0 (the bad entry),
# allocating writes elsewhere, flushes, and a read of a good cluster.
# Expected: OP fails with EIO (the image is marked corrupt: the corrupt
# bit is set), the good data still reads, and afterwards nothing of the
# original file but the header's feature fields (72..95) has changed
# and `qemu-img check` finds no more errors than before.
#     w NAME 'COMMANDS MAKING $img' OP        OP: trim, zero or write
# Templates: v3-2data (guest 0: 4 KiB of 0x55, guest 0x20000: 4 KiB of
# 0x66), extl2-2data (the same with extended L2 entries), v3-comp-eof (guest 0x20000 as above, guest 0 one compressed
# cluster at the end of the file).  l2set IMG KIND sets guest cluster
# 0's L2 entry (found through the header and L1[0]) to KIND:
#   data-TARGET, shared-TARGET  a standard entry, COPIED set or not,
#                               pointing at TARGET: reftable, refblock,
#                               l1, or l2 (its own L2 table)
#   comp-header                 compressed, offset 0, 233 sectors: the
#                               header and the refcount table
#   comp-allones                the existing compressed entry with its
#                               sector count all ones (past EOF)
# (With extended L2 a compressed entry gets a zero bitmap; the others
# keep the bitmap.)  A standard entry cannot point at the header:
# offset 0 is unallocated.
qemu-img create -q -f qcow2 "$tpl/v3-2data.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x55 0 4096' -c 'write -P 0x66 128k 4096' \
  "$tpl/v3-2data.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on "$tpl/extl2-2data.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x55 0 4096' -c 'write -P 0x66 128k 4096' \
  "$tpl/extl2-2data.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$tpl/v3-comp-eof.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x66 128k 4096' -c 'write -c -P 0x77 0 64k' \
  "$tpl/v3-comp-eof.qcow2" >/dev/null

l2set ()
{
  $PY - "$@" <<'EOF'
import sys, struct
img, kind = sys.argv[1:3]
with open(img, "r+b") as f:
    h = f.read(104)
    cb, = struct.unpack(">I", h[20:24])
    ext = struct.unpack(">Q", h[72:80])[0] & 0x10
    l1off, rtoff = struct.unpack(">QQ", h[40:56])
    f.seek(l1off)
    l2off = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(rtoff)
    rboff = struct.unpack(">Q", f.read(8))[0] & ~0x1ff
    f.seek(l2off)
    old, = struct.unpack(">Q", f.read(8))
    x = 62 - (cb - 8)
    target = {"reftable": rtoff, "refblock": rboff, "l1": l1off, "l2": l2off}
    if kind.startswith("data-"):
        e = target[kind[5:]] | (1 << 63)
    elif kind.startswith("shared-"):
        e = target[kind[7:]]
    elif kind == "comp-header":
        e = (1 << 62) | (232 << x)
    elif kind == "comp-allones":
        assert old & (1 << 62), "guest cluster 0 is not compressed"
        e = old | (((1 << (cb - 8)) - 1) << x)
    else:
        sys.exit("l2set: unknown kind " + kind)
    f.seek(l2off)
    f.write(struct.pack(">Q", e))
    if ext and e & (1 << 62):
        f.write(struct.pack(">Q", 0))
EOF
}

# w NAME MAKER OP [PLUGIN-PARAMS]
ws=() wmakers=() wops=() wparams=()
w ()
{
  ws+=("$1") wmakers+=("$2") wops+=("$3") wparams+=("${4:-}")
}

w l2-data-reftable-trim    'base v3-2data; l2set $img data-reftable'   trim
w l2-data-reftable-zero    'base v3-2data; l2set $img data-reftable'   zero
w l2-shared-reftable-write 'base v3-2data; l2set $img shared-reftable' write
w l2-data-refblock-trim    'base v3-2data; l2set $img data-refblock'   trim
w l2-shared-refblock-write 'base v3-2data; l2set $img shared-refblock' write
w l2-data-l1-trim          'base v3-2data; l2set $img data-l1'         trim
w l2-data-l1-zero          'base v3-2data; l2set $img data-l1'         zero
w l2-shared-l1-write       'base v3-2data; l2set $img shared-l1'       write
w l2-data-own-l2-trim      'base v3-2data; l2set $img data-l2'         trim
w l2-shared-own-l2-write   'base v3-2data; l2set $img shared-l2'       write
w l2-comp-header-trim      'base v3-2data; l2set $img comp-header'     trim
w l2-comp-header-zero      'base v3-2data; l2set $img comp-header'     zero
w l2-comp-header-write     'base v3-2data; l2set $img comp-header'     write
w l2-comp-allones-trim     'base v3-comp-eof; l2set $img comp-allones' trim
w l2-comp-allones-write    'base v3-comp-eof; l2set $img comp-allones' write
w extl2-data-reftable-trim 'base extl2-2data; l2set $img data-reftable' trim
w extl2-shared-l1-write    'base extl2-2data; l2set $img shared-l1'     write
w extl2-comp-header-write  'base extl2-2data; l2set $img comp-header'   write
# overlap-check=none turns off the check of each host write, not the
# allocator's and the frees' use of the metadata map.
w nocheck-data-reftable-trim 'base v3-2data; l2set $img data-reftable' trim \
  overlap-check=none
w nocheck-shared-l1-write    'base v3-2data; l2set $img shared-l1'     write \
  overlap-check=none
w nocheck-comp-header-zero   'base v3-2data; l2set $img comp-header'   zero \
  overlap-check=none

# The client side of a w case (nbdsh); OP comes from the environment.
w_script='
import os, errno
cs = 65536
def attempt(f, *args):
    try:
        f(*args)
        return "ok"
    except nbd.Error as e:
        return "EIO" if e.errnum == errno.EIO else str(e)
op = os.environ["OP"]
if op == "trim":
    r = attempt(h.trim, cs, 0)
elif op == "zero":
    r = attempt(h.zero, cs, 0)
else:
    r = attempt(h.pwrite, b"\xaa" * 4096, 4096)
rest = [attempt(h.flush)]
for i in range(4):
    rest.append(attempt(h.pwrite, bytes([0xb0 + i]) * cs, (16 + i) * cs))
rest.append(attempt(h.flush))
print("%s: %s; then writes and flushes: %s" % (op, r, " ".join(rest)))
assert h.pread(4096, 2 * cs) == b"\x66" * 4096, "good data at 0x20000 lost"
assert r == "EIO", "%s of the bad entry did not fail with EIO" % op
'
export w_script

# w_compare ORIG NEW: print the clusters of ORIG that NEW changed (the
# feature fields at 72..95 aside) and whether NEW is marked corrupt;
# exit status 1 if either.
w_compare ()
{
  $PY - "$@" <<'EOF'
import sys, struct
orig, new = [open(p, "rb").read() for p in sys.argv[1:3]]
cb, = struct.unpack(">I", orig[20:24])
cs = 1 << cb
l1off, rtoff = struct.unpack(">QQ", orig[40:56])
l2off = struct.unpack(">Q", orig[l1off:l1off + 8])[0] & 0x00fffffffffffe00
rboff = struct.unpack(">Q", orig[rtoff:rtoff + 8])[0] & ~0x1ff
names = {0: "header", rtoff: "refcount table", l1off: "L1 table",
         l2off: "L2 table", rboff: "refcount block"}
bad = []
for c in range(0, len(orig), cs):
    a, b = orig[c:c + cs], new[c:c + cs]
    if c == 0:
        a, b = a[:72] + a[96:], b[:72] + b[96:]
    if a != b:
        bad.append("%s (host %#x)" % (names.get(c, "cluster"), c))
if bad:
    print("changed: " + ", ".join(bad))
incompat, = struct.unpack(">Q", new[72:80])
if not incompat & 2:
    print("the image is not marked corrupt")
    bad.append("corrupt bit")
sys.exit(1 if bad else 0)
EOF
}

# check_errors IMG: how many errors qemu-img check reports.
check_errors ()
{
  qemu-img check "$1" 2>&1 |
    sed -n -e 's/^\([0-9][0-9]*\) errors were found.*/\1/p' \
           -e 's/^No errors were found.*/0/p' | head -1
}

# run_write_case I: make w case I's image, run the client on it and
# judge the outcome.
run_write_case ()
{
  local i=$1
  local name=${ws[$i]} op=${wops[$i]}
  local dir=$tmpdir/wcase-$i
  local err=$dir/stderr
  local r=0 ok=0 before after
  rm -rf "$dir"
  mkdir "$dir"
  img=$dir/image.qcow2
  if ! (cd "$dir" && eval "${wmakers[$i]}") > "$dir/make.log" 2>&1; then
    bad "$name" "making the image failed (bug in the test)" "$dir/make.log"
    return 1
  fi
  cp "$img" "$dir/orig.qcow2"
  before=$(check_errors "$dir/orig.qcow2")
  (cd "$dir" && OP=$op nbdkit -U - "$PLUGIN" file="$img" ${wparams[$i]} \
     --run 'nbdsh -u "$uri" -c "$w_script"') > "$dir/stdout" 2> "$err" ||
    r=$?
  sed -e "s/^/$name: /" "$dir/stdout"
  if [ "$r" -gt 128 ] ||
     grep -Eq 'Segmentation fault|Aborted|core dumped|AddressSanitizer|runtime error' "$err"; then
    bad "$name" "crashed or memory error (exit status $r)" "$err"
    return 1
  fi
  if [ "$r" -ne 0 ]; then
    bad "$name" "the client's checks failed (exit status $r)" "$err" || :
    ok=1
  fi
  if ! w_compare "$dir/orig.qcow2" "$img" > "$dir/compare"; then
    sed -e "s/^/$name: /" "$dir/compare"
    bad "$name" "metadata changed, or the image is not marked corrupt" || :
    ok=1
  fi
  after=$(check_errors "$img")
  if [ -z "$after" ] || [ "$after" -gt "$before" ]; then
    qemu-img check "$img" 2>&1 | tail -4 |
      sed -e "s/^/$name: qemu-img check: /"
    bad "$name" "qemu-img check: ${after:-?} errors, $before before" || :
    ok=1
  fi
  [ "$ok" -eq 0 ] || return 1
  rm -rf "$dir"
}

#----------------------------------------------------------------------
# Run the table.

# Under valgrind (about 4 s a case): QCOW2_VALGRIND=1 the first 8
# cases, QCOW2_VALGRIND=all every case.  --trace-children=yes in case
# nbdkit on PATH is a wrapper script.
case "${QCOW2_VALGRIND:-0}" in
  0) valgrind_cases=0 ;;
  all) requires valgrind --version; valgrind_cases=${#names[@]} ;;
  *) requires valgrind --version; valgrind_cases=8 ;;
esac

# bad NAME MESSAGE [STDERR_FILE]: report a failed case.
bad ()
{
  echo "$1: FAILED: $2" >&2
  if [ -n "${3:-}" ]; then
    echo "--- stderr:" >&2
    cat "$3" >&2
    echo "---" >&2
  fi
  return 1
}

# run_case I [WRAPPER...]: make case I's image, start the plugin on it
# (through WRAPPER, e.g. valgrind) and judge the outcome.
run_case ()
{
  local i=$1; shift
  local name=${names[$i]} regex=${regexes[$i]}
  local dir=$tmpdir/case-$i
  local err=$dir/stderr
  local r=0
  rm -rf "$dir"
  mkdir "$dir"
  # A neutral name: the error messages quote it, and a name like
  # "truncated.qcow2" would match the regex by itself.
  img=$dir/image.qcow2
  if ! (cd "$dir" && eval "${makers[$i]}") > "$dir/make.log" 2>&1; then
    bad "$name" "making the image failed (bug in the test)" "$dir/make.log"
    return 1
  fi

  (cd "$dir" && "$@" nbdkit -U - "$PLUGIN" file="$img" --run true) \
    > "$dir/stdout" 2> "$err" || r=$?

  if [ "$r" -gt 128 ] ||
     grep -Eq 'Segmentation fault|Aborted|core dumped|AddressSanitizer|runtime error|^==[0-9]+== ' "$err"; then
    bad "$name" "crashed or memory error (exit status $r)${*:+ under $1}" "$err"
    return 1
  fi
  if [ $# -gt 0 ] && [ "$r" -eq 99 ]; then
    bad "$name" "$1 reported errors (exit status 99)" "$err"
    return 1
  fi
  if [ "$regex" = OK ]; then
    if [ "$r" -ne 0 ]; then
      bad "$name" "valid image refused (exit status $r)" "$err"
      return 1
    fi
  elif [ "$r" -eq 0 ]; then
    bad "$name" "malformed image accepted (expected an error matching /$regex/)" "$err"
    return 1
  elif ! sed -e "s|$dir/|DIR/|g" -e "s|$PLUGIN|PLUGIN|g" "$err" |
         grep -Eqi -- "$regex"; then
    bad "$name" "error message does not match /$regex/" "$err"
    return 1
  fi
  rm -rf "$dir"
}

# replay_case I: make case I's image for test-fuzz-replay.
replay_dir=$tmpdir/replay
replay_images=()
replay_case ()
{
  local i=$1 dir=$tmpdir/rcase-$1
  mkdir "$dir"
  img=$dir/image.qcow2
  if ! (cd "$dir" && eval "${makers[$i]}") > "$dir/make.log" 2>&1; then
    bad "${names[$i]}" "making the image failed (bug in the test)" "$dir/make.log"
    return 1
  fi
  mkdir -p "$replay_dir"
  cp "$img" "$replay_dir/$i-${names[$i]}"
  replay_images+=("$replay_dir/$i-${names[$i]}")
  rm -rf "$dir"
}

step=${MALFORMED_TEST_STEP:-1}
[[ $step =~ ^[1-9][0-9]*$ ]] || fail "MALFORMED_TEST_STEP=$step: a positive integer expected"

passed=0
failed=()
for i in "${!names[@]}"; do
  if [ $((i % step)) -ne 0 ] && [ "${regexes[$i]}" != OK ]; then
    if replay_case "$i"; then
      echo "${names[$i]}: image left to test-fuzz-replay (MALFORMED_TEST_STEP=$step)"
    else
      failed+=("${names[$i]}")
    fi
    continue
  fi
  if run_case "$i"; then
    echo "${names[$i]}: ok"
    passed=$((passed + 1))
  else
    failed+=("${names[$i]}")
  fi
done

for i in "${!ws[@]}"; do
  if run_write_case "$i"; then
    echo "${ws[$i]}: ok"
    passed=$((passed + 1))
  else
    failed+=("${ws[$i]}")
  fi
done

if [ ${#replay_images[@]} -gt 0 ]; then
  replay=$abs_top_builddir/tests/test-fuzz-replay
  [ -x "$replay" ] || fail "$replay was not built (make check builds it)"
  r=0 t0=$SECONDS
  "$replay" "${replay_images[@]}" > "$tmpdir/replay.log" 2>&1 || r=$?
  if [ $r -ne 0 ] ||
     grep -Eq 'Segmentation fault|Aborted|core dumped|AddressSanitizer|LeakSanitizer|runtime error' "$tmpdir/replay.log"; then
    cat "$tmpdir/replay.log" >&2
    echo "test-fuzz-replay: FAILED on the images (exit status $r)" >&2
    failed+=("test-fuzz-replay")
  else
    echo "test-fuzz-replay: ${#replay_images[@]} images opened, read and written: ok ($((SECONDS - t0)) s)"
    passed=$((passed + 1))
  fi
fi

for ((i = 0; i < valgrind_cases && i < ${#names[@]}; i++)); do
  if run_case "$i" valgrind -q --error-exitcode=99 --leak-check=no \
           --trace-children=yes; then
    echo "${names[$i]}: ok under valgrind"
    passed=$((passed + 1))
  else
    failed+=("${names[$i]} (valgrind)")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: ${#failed[@]} cases FAILED: ${failed[*]}" >&2
  echo "$passed cases passed"
  exit 1
fi
echo "$passed cases passed"
