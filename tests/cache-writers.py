# nbdkit-qcow2: helper of test-cache-modes.sh.  -*- python -*-
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   cache-writers.py nbd URI SEED NPROC NREC REGION
#   cache-writers.py file MIRROR SEED NPROC NREC REGION
#
# NPROC writers (processes, each with its own NBD connection) write
# NREC byte-granular pieces each into the first REGION bytes.  Writer t
# owns bytes t*Q..(t+1)*Q-1 of every 4 KiB block (Q = 4096 / NPROC), so
# all writers hit the same 4 KiB blocks at once but never the same
# bytes: the result does not depend on their order, and "file" applies
# the same pieces to a raw MIRROR.  Then, on one connection, zero, trim
# (rewritten afterwards: what a trimmed range reads is not fixed),
# flush and FUA writes, past REGION.

import os
import random
import sys

mode, target = sys.argv[1], sys.argv[2]
seed, nproc, nrec, region = (int(x) for x in sys.argv[3:7])
Q = 4096 // nproc


def pieces(t):
    r = random.Random(seed * 1000 + t)
    for _ in range(nrec):
        blk = r.randrange(region // 4096)
        off = r.randrange(Q)
        ln = r.randint(1, Q - off)
        yield blk * 4096 + t * Q + off, r.randbytes(ln)


def tail_ops():
    """The single-connection part: (op, offset, arg) in order."""
    r = random.Random(seed)
    base = region
    ops = []
    for i in range(16):
        off = base + r.randrange(1024 * 1024)
        ops.append(("write", off, r.randbytes(r.randint(1, 9000)), i % 3 == 0))
    for i in range(8):
        off = base + r.randrange(1024 * 1024)
        ops.append(("zero", off, r.randint(1, 70000)))
    off = base + 256 * 1024
    ops.append(("trim", off, 192 * 1024))
    ops.append(("write", off, r.randbytes(192 * 1024), False))
    ops.append(("flush",))
    ops.append(("write", base + 12345, r.randbytes(777), True))
    return ops


class File:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)

    def pwrite(self, buf, off, fua=False):
        os.pwrite(self.fd, buf, off)

    def zero(self, n, off):
        os.pwrite(self.fd, bytes(n), off)

    def trim(self, n, off):
        pass

    def flush(self):
        pass


class Nbd:
    def __init__(self, uri):
        import nbd
        self.nbd = nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)

    def pwrite(self, buf, off, fua=False):
        self.h.pwrite(buf, off, self.nbd.CMD_FLAG_FUA if fua else 0)

    def zero(self, n, off):
        self.h.zero(n, off)

    def trim(self, n, off):
        self.h.trim(n, off)

    def flush(self):
        self.h.flush()


def run_tail(t):
    for op in tail_ops():
        if op[0] == "write":
            t.pwrite(op[2], op[1], op[3])
        elif op[0] == "zero":
            t.zero(op[2], op[1])
        elif op[0] == "trim":
            t.trim(op[2], op[1])
        else:
            t.flush()


if mode == "file":
    f = File(target)
    for t in range(nproc):
        for off, buf in pieces(t):
            f.pwrite(buf, off)
    run_tail(f)
    sys.exit(0)

pids = []
for t in range(nproc):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            h = Nbd(target)
            for off, buf in pieces(t):
                h.pwrite(buf, off)
            code = 0
        finally:
            os._exit(code)
    pids.append(pid)
for pid in pids:
    _, status = os.waitpid(pid, 0)
    assert status == 0, "a writer failed"
h = Nbd(target)
run_tail(h)
h.flush()
