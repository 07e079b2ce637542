#!/usr/bin/python3
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.

"""test-backup-recipe.sh's oracle for one incremental backup.

Usage: backup-check.py SIZE GRANULARITY OPS LOG REF [DIRTY]

OPS: the requests made since the last backup, one a line: "w|z|t OFFSET
LENGTH".  The expected dirty set is their union rounded out to
GRANULARITY.  LOG: nbdkit's log filter's log of the backup's
destination.  REF: the source disk as raw at backup time.  DIRTY: the
"dirty OFFSET LENGTH" lines incremental-backup.py -v printed.

Checks that the backup's writes and zeroes cover exactly the expected
dirty set, each byte once, with zero requests exactly where REF reads
as zeroes (per 64 KiB-aligned piece, the unit the recipe uses) and
writes elsewhere; and that the dirty ranges reported were the expected
set.  Prints the byte counts.
"""

import re
import sys

from ranges import merge        # tests/ranges.py, next to this file

ZBLOCK = 64 * 1024


def fail(msg):
    sys.exit("backup-check: FAIL: " + msg)


def main():
    size, gran = int(sys.argv[1]), int(sys.argv[2])
    ops, log, ref = sys.argv[3], sys.argv[4], sys.argv[5]

    expected = []
    for line in open(ops):
        if not line.strip():
            continue
        _, off, length = line.split()
        off, length = int(off, 0), int(length, 0)
        a = off // gran * gran
        b = min(size, (off + length + gran - 1) // gran * gran)
        expected.append((a, b))
    expected = merge(expected)
    total = sum(b - a for a, b in expected)

    if len(sys.argv) > 6:
        reported = []
        for line in open(sys.argv[6]):
            m = re.match(r"dirty (\d+) (\d+)$", line.strip())
            if m:
                a = int(m.group(1))
                reported.append((a, a + int(m.group(2))))
        if merge(reported) != expected:
            fail("bitmap export's dirty ranges %s, expected %s"
                 % (merge(reported), expected))

    reqs = []                   # (start, end, kind)
    pat = re.compile(r"connection=\d+ (Write|Zero|Trim) id=\d+ "
                     r"offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")
    for line in open(log):
        m = pat.search(line)
        if m:
            a = int(m.group(2), 16)
            reqs.append((a, a + int(m.group(3), 16), m.group(1)))
    if any(k == "Trim" for _, _, k in reqs):
        fail("the backup trimmed")

    # Each byte written once, and only inside the dirty set.
    reqs.sort()
    for (a1, b1, _), (a2, b2, _) in zip(reqs, reqs[1:]):
        if a2 < b1:
            fail("requests [%d,%d) and [%d,%d) overlap" % (a1, b1, a2, b2))
    if merge([(a, b) for a, b, _ in reqs]) != expected:
        fail("backup wrote %s, the dirty set is %s"
             % (merge([(a, b) for a, b, _ in reqs]), expected))

    # Zero requests exactly where the source reads as zero.
    with open(ref, "rb") as f:
        data = f.read()
    zeroed = written = 0
    for a, b, kind in reqs:
        pos = a
        while pos < b:
            end = min(b, (pos // ZBLOCK + 1) * ZBLOCK)
            is_zero = data[pos:end].count(0) == end - pos
            if is_zero != (kind == "Zero"):
                fail("[%d,%d) reads as %s but the backup sent a %s"
                     % (pos, end, "zeroes" if is_zero else "data", kind))
            pos = end
        if kind == "Zero":
            zeroed += b - a
        else:
            written += b - a
    print("dirty set %d bytes in %d ranges; backup wrote %d bytes of data "
          "and %d bytes of zeroes, all inside it"
          % (total, len(expected), written, zeroed))


if __name__ == "__main__":
    main()
