#!/usr/bin/python3
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.

"""Copy the dirty ranges of a bitmap export into a backup overlay.

Usage: incremental-backup.py [-v] [--data DATA_URI] SOURCE_URI DEST_URI

SOURCE_URI is the NBD URI of a dirty bitmap export of nbdkit-qcow2-plugin
("bitmap:NAME", for example nbd+unix:///bitmap:ckpt1?socket=/tmp/src),
whose block status says dirty ranges are data and clean ranges holes.
DEST_URI is a writable NBD export of the same size, normally a new qcow2
overlay on the previous backup served by nbdkit-qcow2-plugin with
create=true backing=PREVIOUS.QCOW2 backing-format=qcow2.

Every dirty range is read and written to the same offset of the
destination; parts of it that read as zeroes are sent as zero requests
(so the overlay hides what the previous backup had there, without
storing zeroes as data).  Clean ranges are not touched: the overlay
reads them from its backing chain.  At the end the destination is
flushed and one line of totals is printed.

With --data, the dirty ranges are read from DATA_URI instead, an export
of the same size: an internal snapshot of the disk taken at the
checkpoint (the snapshot's export of the same server), so that the disk
may be written while the copy runs.  Disable the bitmap at that
checkpoint too (qemu-img bitmap --disable): an enabled one also gets the
ranges written since, which are then copied from the snapshot as well
(correct, but more than needed).

nbdcopy cannot do this: it writes zeroes over the source's holes (the
clean ranges, which would hide the previous backup), and with
--destination-is-zero it also skips dirty ranges that read as zero.

Runs with /usr/bin/python3 and the nbd module (python3-libnbd).
"""

import argparse
import sys

import nbd

CHUNK = 4 * 1024 * 1024         # bytes read at once
ZBLOCK = 64 * 1024              # zero detection unit (aligned)
STATUS_MAX = 1 << 30            # bytes of block status asked at once


def connect(uri, meta):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if meta and not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        sys.exit("%s: the server has no block status (base:allocation)"
                 % uri)
    return h


def dirty_ranges(src, size):
    """Yield (offset, length) of the dirty ranges, in order, merged."""
    offset = 0
    pending = None
    while offset < size:
        got = []

        def extent(metacontext, off, entries, err):
            if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            pos = off
            for i in range(0, len(entries), 2):
                got.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
            return 0

        src.block_status(min(STATUS_MAX, size - offset), offset, extent)
        if not got or got[0][0] != offset or got[0][1] == 0:
            sys.exit("block status at %d described nothing" % offset)
        for off, length, flags in got:
            length = min(length, size - off)
            if length <= 0:
                break
            if not flags & nbd.STATE_HOLE:
                if pending and pending[0] + pending[1] == off:
                    pending = (pending[0], pending[1] + length)
                else:
                    if pending:
                        yield pending
                    pending = (off, length)
            offset = off + length
    if pending:
        yield pending


def copy_range(data, dst, offset, length, totals):
    """Copy one dirty range: data as writes, zero blocks as zeroes."""
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        buf = data.pread(n, offset)
        # Runs of ZBLOCK-aligned blocks that are all zero or not.
        pos = 0
        while pos < n:
            run_zero = None
            run_end = pos
            while run_end < n:
                blk_end = min(n, ((offset + run_end) // ZBLOCK + 1) * ZBLOCK
                              - offset)
                blk = buf[run_end:blk_end]
                z = blk.count(0) == len(blk)
                if run_zero is None:
                    run_zero = z
                elif z != run_zero:
                    break
                run_end = blk_end
            if run_zero:
                dst.zero(run_end - pos, offset + pos)
                totals["zeroed"] += run_end - pos
            else:
                dst.pwrite(buf[pos:run_end], offset + pos)
                totals["written"] += run_end - pos
            pos = run_end
        offset += n


def main():
    p = argparse.ArgumentParser(
        description="Copy the dirty ranges of an nbdkit-qcow2 bitmap "
        "export into a backup overlay.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every dirty range")
    p.add_argument("--data", metavar="DATA_URI",
                   help="read the dirty ranges from this export (a "
                   "snapshot taken at the checkpoint)")
    p.add_argument("source", help="NBD URI of the bitmap export")
    p.add_argument("dest", help="NBD URI of the writable destination")
    args = p.parse_args()

    src = connect(args.source, True)
    # Any other export's data extents are its allocation, not what
    # changed: copying them into an overlay would not be a backup.
    if not src.get_export_name().startswith("bitmap:"):
        sys.exit("%s: not a bitmap export (its name must start with "
                 "'bitmap:')" % args.source)
    dst = connect(args.dest, False)
    size = src.get_size()
    if dst.get_size() != size:
        sys.exit("destination size %d is not the source's %d"
                 % (dst.get_size(), size))
    data = src
    if args.data:
        data = connect(args.data, False)
        if data.get_size() != size:
            sys.exit("%s: size %d is not the bitmap export's %d"
                     % (args.data, data.get_size(), size))
    if dst.is_read_only():
        sys.exit("destination %s is read-only" % args.dest)

    totals = {"ranges": 0, "dirty": 0, "written": 0, "zeroed": 0}
    for offset, length in dirty_ranges(src, size):
        if args.verbose:
            print("dirty %d %d" % (offset, length))
        totals["ranges"] += 1
        totals["dirty"] += length
        copy_range(data, dst, offset, length, totals)
    dst.flush()
    dst.shutdown()
    if data is not src:
        data.shutdown()
    src.shutdown()
    print("dirty: %(dirty)d bytes in %(ranges)d ranges; written: "
          "%(written)d bytes of data, %(zeroed)d bytes as zeroes" % totals)


if __name__ == "__main__":
    main()
