# nbdkit-qcow2: helpers shared by the tests' python scripts.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# functions.sh puts tests/ on PYTHONPATH, so a script a test writes
# into its scratch directory can `from ranges import merge`; the
# scripts in tests/ find it next to themselves.

"""Byte ranges as [start, end) pairs."""


def merge(ranges):
    """The union of ranges (any order, may overlap or touch), as sorted,
    disjoint, non-adjacent (start, end) tuples."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(r) for r in out]
