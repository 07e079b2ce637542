#!/usr/bin/env python3
# nbdkit-qcow2: a raw image of mixed clusters, for compressed writes
# (tests/test-compress-write.sh, bench/compress-bench.sh).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   mkmixed.py FILE SIZE [CLUSTER]
#
# FILE is made SIZE bytes long; each CLUSTER (default 64 KiB) is, by a
# fixed pseudo-random choice (the same file every time): text-like
# (3 in 8: words from a small vocabulary, compressing about 3:1),
# zero (2 in 8: a hole), random (1 in 8: incompressible), or half
# zero and half text (2 in 8).  Every non-zero cluster starts with its
# index, so no two are alike.

import os
import random
import sys

WORDS = [b"the ", b"qcow2 ", b"cluster ", b"refcount ", b"table ", b"of ",
         b"L2 ", b"slice ", b"is ", b"written ", b"\n", b"0x10000 ",
         b"and ", b"guest ", b"host ", b"offset ", b"compressed ",
         b"backup ", b"image ", b"stream ", b"to ", b"a ", b"in ", b"data "]


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B").rstrip("I")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def main():
    path, size = sys.argv[1], parse_size(sys.argv[2])
    cs = parse_size(sys.argv[3]) if len(sys.argv) > 3 else 65536
    rng = random.Random(18)
    corpus = b"".join(rng.choice(WORDS) for _ in range(400000))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range((size + cs - 1) // cs):
            n = min(cs, size - i * cs)
            kind = rng.randrange(8)
            start = rng.randrange(len(corpus) - cs)
            text = corpus[start:start + cs]
            if kind < 3:
                buf = text
            elif kind < 5:
                continue
            elif kind < 6:
                buf = os.urandom(cs)
            else:
                buf = bytes(cs // 2) + text[:cs - cs // 2]
            buf = b"%d:" % i + buf
            os.pwrite(fd, buf[:n], i * cs)
    finally:
        os.close(fd)


main()
