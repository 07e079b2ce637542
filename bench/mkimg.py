#!/usr/bin/env python3
# nbdkit-qcow2: make the raw images the benchmark serves (bench/bench.sh).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   mkimg.py full FILE SIZE
#       FILE is made SIZE bytes long and written in full with non-zero,
#       incompressible data (a random 1 MiB buffer, each MiB stamped
#       with its index so that no two are alike).
#
#   mkimg.py sparse FILE SIZE CLUSTER
#       FILE is made SIZE bytes long (sparse) and one CLUSTER of data is
#       written in every region that one qcow2 L2 table maps
#       (CLUSTER * CLUSTER / 8 bytes: 512 MiB with 64 KiB clusters), at
#       a different cluster of each region.  Converted to qcow2 with
#       that cluster size, the image then has every L2 table of the
#       disk allocated (2048 tables = 128 MiB for 1 TiB) and almost
#       nothing else, so random reads are bound by L2 lookups.
#
#   mkimg.py dropcache FILE
#       posix_fadvise(DONTNEED) on FILE: drop its clean pages from the
#       page cache (used after reading holes of the sparse raw image,
#       which otherwise fills the page cache with zero pages).

import os
import sys


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper().rstrip("B").rstrip("I")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def full(path, size):
    mib = 1 << 20
    buf = bytearray(os.urandom(mib))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < size:
            n = min(mib, size - off)
            buf[0:8] = (off // mib + 1).to_bytes(8, "little")
            os.pwrite(fd, buf[:n], off)
            off += n
    finally:
        os.close(fd)


def sparse(path, size, cluster):
    region = cluster * (cluster // 8)
    per_region = region // cluster
    buf = bytearray(os.urandom(cluster))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        nregions = (size + region - 1) // region
        for i in range(nregions):
            # Spread the data over the regions (Knuth's multiplicative
            # hash), so that it is not always the first cluster.
            off = i * region + ((i * 2654435761) % per_region) * cluster
            if off + cluster > size:
                off = i * region
            n = min(cluster, size - off)
            buf[0:8] = (i + 1).to_bytes(8, "little")
            os.pwrite(fd, buf[:n], off)
    finally:
        os.close(fd)
    return nregions


def dropcache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv):
    if len(argv) >= 4 and argv[1] == "full":
        full(argv[2], parse_size(argv[3]))
    elif len(argv) >= 5 and argv[1] == "sparse":
        n = sparse(argv[2], parse_size(argv[3]), parse_size(argv[4]))
        print(n)
    elif len(argv) >= 3 and argv[1] == "dropcache":
        dropcache(argv[2])
    else:
        sys.stderr.write(
            "usage: mkimg.py full FILE SIZE | sparse FILE SIZE CLUSTER"
            " | dropcache FILE\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
