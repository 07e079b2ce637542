#!/usr/bin/env bash
# nbdkit-qcow2: the benchmark harness (bench/bench.sh) still runs.
#
# Runs bench.sh --smoke (tiny images, 1 s per run, one round, all four
# servers, a few workloads; 10-20 s) and checks that it produced a
# well-formed report: a ratio row per workload, a row per server and
# workload with numbers, no failed run, and every qcow2 image it wrote
# checked clean by qemu-img check.  It never asserts anything about
# speed: this is a test of the harness, not a benchmark.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-nbd --version
requires fio --enghelp=nbd
requires nbdkit file --version
requires python3 --version

bench=$abs_top_srcdir/bench/bench.sh
[ -f "$bench" ] || fail "$bench is missing"

out=$tmpdir/out
export OUT_DIR=$out
export TMPDIR=$tmpdir
unset ROUNDS RUNTIME RAMP WORKLOADS SERVERS BENCH_DIR PLUGIN_ARGS PERF \
      FULL_SIZE SPARSE_SIZE ALLOC_SIZE ALLOC512_SIZE ALLOC_BUDGET QB_COUNT \
      KEEP_IMAGES PLUGIN_BASE

bash "$bench" --smoke > "$tmpdir/report.md" 2> "$tmpdir/bench.log" || {
    cat "$tmpdir/bench.log" >&2
    fail "bench.sh --smoke exited with status $?"
}
cat "$tmpdir/report.md"

[ -s "$out/report.md" ] || fail "no $out/report.md"
cmp -s "$out/report.md" "$tmpdir/report.md" ||
    fail "the report on stdout differs from $out/report.md"

python3 - "$tmpdir/report.md" "$out/runs.tsv" <<'EOF'
import re, sys

report = open(sys.argv[1]).read()
runs = [l.split("\t") for l in open(sys.argv[2]).read().splitlines() if l]

def fail(msg):
    sys.stderr.write("test-bench-smoke: FAIL: %s\n" % msg)
    sys.exit(1)

workloads = ["randread4k", "alloc-randwrite4k", "qb-randread4k"]
servers = ["A plugin", "B qemu-nbd threads", "C qemu-nbd io_uring",
           "D file (raw)"]
uring = re.search(r"qemu-nbd --aio=io_uring: (.*)", report)
if not uring:
    fail("no io_uring status line")
if uring.group(1) != "ok":
    servers.remove("C qemu-nbd io_uring")        # reported as n/a

for h in ("# nbdkit-qcow2 benchmark", "## Ratios", "## Per server",
          "## qemu-img check"):
    if h not in report:
        fail("section %r missing" % h)

num = r"(inf|[0-9.]+k?)"
for w in workloads:
    row = re.search(r"^\| %s \| (IOPS|MB/s) \| [0-9.]+k? \| [0-9.]+k? "
                    r"\((threads|io_uring)\) \| [0-9.]+k? \| %s \| %s \| "
                    % (re.escape(w), num, num), report, re.M)
    if not row:
        fail("no well-formed ratio row for %s" % w)
    for s in servers:
        row = re.search(r"^\| %s \| %s \| [0-9.]+k? (IOPS|MB/s) \| "
                        r"[0-9.]+ \| [0-9.]+ \| [0-9.]+ \| (-|[0-9.]+) \| "
                        r"([^|]*) \|$"
                        % (re.escape(w), re.escape(s)), report, re.M)
        if not row:
            fail("no well-formed row for %s / %s" % (w, s))
        if w.startswith("alloc-") and not s.startswith("D"):
            if row.group(3).strip() != "ok x1":
                fail("%s / %s: qemu-img check column is %r"
                     % (w, s, row.group(3)))

if len(runs) != len(workloads) * len(servers):
    fail("%d runs recorded, %d expected" % (len(runs),
                                            len(workloads) * len(servers)))
for r in runs:
    if r[3] != "ok":
        fail("run %s failed" % " ".join(r[:3]))
    if int(r[6]) <= 0:
        fail("run %s did no I/O" % " ".join(r[:3]))
    if len(r) < 13 or not re.fullmatch(r"-|[0-9]+\.[0-9]", r[12]):
        fail("run %s: no host steal column" % " ".join(r[:3]))

m = re.search(r"(\d+) qcow2 images written and checked after the server "
              r"exited: (\d+) clean", report)
if not m or m.group(1) != m.group(2) or int(m.group(1)) == 0:
    fail("qemu-img check summary missing or not all clean")
if "Runs: %d, failed: 0." % len(runs) not in report:
    fail("run summary missing or runs failed")
EOF

# The smoke run cleans up after itself: its image directory is gone.
dir=$(sed -n 's/^bench: images in \([^ ]*\) .*/\1/p' "$tmpdir/bench.log")
[ -n "$dir" ] || fail "bench.log does not name the image directory"
[ ! -e "$dir" ] || fail "bench.sh left $dir behind"
exit 0
