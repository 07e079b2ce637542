#!/usr/bin/env bash
# nbdkit-qcow2: the file-level call graph of core has no forbidden circles.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# From the objects of libqcow2core (nm): file A uses file B when A has
# an undefined symbol that B defines.  The strongly connected
# components of that graph are the circles of files that call each
# other.  Two rules, kept by this test:
#
#  - the leaves stay leaves: LEAVES (the table cache, the io layer, the
#    overlap map, compression, file locks, the header, the snapshot
#    table, backing files and the metadata walk) are in no circle;
#  - the largest circle never grows past MAX_CIRCLE files (issue 15
#    asked for at most 3; there is none left, so 1 means no circle);
#  - only the request layer, rw.c, takes or drops the image's locks
#    (img->lock, io_lock, inflight_lock): a grep of the sources.

source ./functions.sh

LEAVES="cache io overlap-map overlap-map-update compress lock header snapshot backing walk"
MAX_CIRCLE=1

objdir=$abs_top_builddir/core/.libs
ls "$objdir"/libqcow2core_la-*.o >/dev/null 2>&1 ||
  fail "no core objects in $objdir (build first)"

for o in "$objdir"/libqcow2core_la-*.o; do
  f=${o##*/libqcow2core_la-}
  f=${f%.o}
  nm --defined-only -g "$o" | awk -v f="$f" '$2 ~ /[TDBR]/ { print "D", f, $3 }'
  nm -u "$o" | awk -v f="$f" '{ print "U", f, $2 }'
done > "$tmpdir/syms"

/usr/bin/python3 - "$tmpdir/syms" "$LEAVES" "$MAX_CIRCLE" <<'PYEOF'
import sys
from collections import defaultdict
defs, uses = {}, defaultdict(set)
for line in open(sys.argv[1]):
    k, f, s = line.split()
    if k == "D":
        defs[s] = f
    else:
        uses[f].add(s)
files = sorted(set(defs.values()) | set(uses))
edges = {f: sorted({defs[s] for s in uses[f] if s in defs and defs[s] != f})
         for f in files}

# Tarjan's strongly connected components.
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1
    stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        sccs.append(sorted(c))
sys.setrecursionlimit(10000)
for f in files:
    if f not in index:
        visit(f)

circles = [c for c in sccs if len(c) > 1]
bad = []
for c in circles:
    print("circle of %d files: %s" % (len(c), " ".join(c)))
for leaf in sys.argv[2].split():
    if leaf not in files:
        bad.append("%s: no such core object" % leaf)
    for c in circles:
        if leaf in c:
            bad.append("%s is in a circle: %s" % (leaf, " ".join(c)))
biggest = max([len(c) for c in circles] or [0])
if biggest > int(sys.argv[3]):
    bad.append("the largest circle has %d files (at most %s allowed)"
               % (biggest, sys.argv[3]))
for f in sys.argv[2].split():
    if f in edges:
        print("%s uses: %s" % (f, " ".join(edges[f]) or "nothing in core"))
for b in bad:
    print("FAIL: " + b)
sys.exit(1 if bad else 0)
PYEOF

# The image's locks are taken and dropped in rw.c alone.  (cache.c's
# stage_lock, io.c's memory-backend mutex and its direct I/O stripes
# are their own, not the image's; image.c only creates and destroys
# the locks.)  One exception, by name: l2.c's wb_lock (with wb_done),
# a leaf mutex over the unlocked write-back's state alone, held only
# to read or change that state and never while taking another lock
# or doing I/O (core/l2.c, "Write-back without the lock").
take='pthread_(rwlock_(rd|wr|un|tryrd|trywr)lock|mutex_lock|mutex_unlock|cond_wait) \(&img->'
outside=$(grep -nE "$take" "$abs_top_srcdir"/core/*.c | grep -v '/rw\.c:' |
            grep -vE '/l2\.c:[0-9]+:.*\(&img->(wb_lock|wb_done)\b' || :)
if [ -n "$outside" ]; then
  echo "FAIL: the image's locks are taken outside rw.c:"
  echo "$outside"
  exit 1
fi
echo "image locks taken in: rw.c only (and l2.c's own wb_lock)"
