"""The numba-compiled loops behind :class:`kernels.numba_kernel.NumbaKernel`.

This file is compiled by numba, not run as Python, so mypy skips it (see pyproject.toml);
its inputs are typed and checked in ``numba_kernel``. Every loop pools whole bags with the
register tiles of :mod:`kernels.numba_tiles`: a row of ``dim`` columns is cut into tiles of
8, 4, 2 and 1 registers plus a masked tail, and each tile walks the bag's ids once.

Each loop exists twice: over the bags in parallel (``prange``), and serially for calls too
small to pay for waking the thread pool. Every loop takes ``offsets`` as ``[B + 1]`` CSR
offsets or as ``B`` bag starts (the last bag then runs to the end of ``indices``), checks
each bag's bounds and ids on the way (out-of-range bags are zeroed and counted, never
read), and returns how many bags were invalid, so a caller can skip a separate
validation pass over the ids and word an error only when this count is not zero.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numba

from kernels import numba_tiles


def _row_pooler(op):
    """An inlined ``pool_row(weight, indices, scale, start, end, padding, out, bag,
    prefetch, divisor)`` running the tiles of ``op`` across one output row."""
    t8, t4, t2, t1 = (numba_tiles.make_tile(op, vectors) for vectors in (8, 4, 2, 1))
    tail = numba_tiles.make_tile(op, 1, masked=True)

    @numba.njit(inline="always")
    def pool_row(weight, indices, scale, start, end, padding, out, bag, prefetch, divisor):
        dim = weight.shape[1]
        lanes = 32 // weight.itemsize
        col = 0
        while col + 8 * lanes <= dim:
            t8(weight, indices, scale, start, end, padding, col, out, bag, prefetch, divisor, 0)
            col += 8 * lanes
        if col + 4 * lanes <= dim:
            t4(weight, indices, scale, start, end, padding, col, out, bag, prefetch, divisor, 0)
            col += 4 * lanes
        if col + 2 * lanes <= dim:
            t2(weight, indices, scale, start, end, padding, col, out, bag, prefetch, divisor, 0)
            col += 2 * lanes
        if col + lanes <= dim:
            t1(weight, indices, scale, start, end, padding, col, out, bag, prefetch, divisor, 0)
            col += lanes
        if col < dim:
            tail(weight, indices, scale, start, end, padding, col, out, bag, prefetch,
                 divisor, dim - col)

    return pool_row


def build() -> dict[str, Any]:
    """Compile the loops lazily so ``import kernels`` does not pay for numba.

    Returns ``{"sum", "weighted", "max"}`` each mapped to ``(parallel, serial)``.
    """
    # numba's cache keys a loop by its own file and closure, not by the files it calls:
    # the tiles' source hash in every closure retires cached loops when the tiles change.
    stamp = hashlib.sha256(Path(numba_tiles.__file__).read_bytes()).hexdigest()
    rows = {op: _row_pooler(op) for op in ("sum", "weighted", "max")}
    parallel, serial = _loops(True, stamp, rows), _loops(False, stamp, rows)
    return {name: (parallel[name], serial[name]) for name in parallel}


def _loops(parallel, stamp, rows):
    bags = numba.prange if parallel else range
    jit = numba.njit(parallel=parallel, nogil=True, cache=True, boundscheck=False)
    pool_sum_row, pool_weighted_row, pool_max_row = rows["sum"], rows["weighted"], rows["max"]

    @numba.njit(inline="always")
    def bounds(offsets, bag, total):
        """Bag ``bag``'s ids: ``offsets[bag]`` to the next start, or to the end."""
        end = offsets[bag + 1] if bag + 1 < offsets.shape[0] else total
        return offsets[bag], end

    @numba.njit(inline="always")
    def scan(weight, indices, start, end, padding, total):
        """``(valid, count)``: whether the bag's bounds and ids are in range (one
        branch-free pass, in L1 right before the tiles read the same ids), and how many
        of its ids are not ``padding``."""
        if start < 0 or start > end or end > total:
            return False, 0
        limit = numba.uint64(weight.shape[0])
        bad = False
        count = end - start
        for position in range(start, end):
            row_id = indices[position]
            bad |= numba.uint64(row_id) >= limit
            count -= 1 if row_id == padding else 0
        return not bad, count

    @numba.njit(inline="always")
    def zero(out, bag):
        for col in range(out.shape[1]):
            out[bag, col] = 0

    @jit
    def pool_sum(weight, indices, offsets, num_bags, padding, mean, prefetch, out):
        assert stamp
        invalid = 0
        total = indices.shape[0]
        for bag in bags(num_bags):
            start, end = bounds(offsets, bag, total)
            valid, count = scan(weight, indices, start, end, padding, total)
            if valid:
                divisor = count if mean else 1
                pool_sum_row(weight, indices, weight, start, end, padding, out, bag, prefetch,
                             divisor)
            else:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_weighted(weight, indices, offsets, num_bags, scale, padding, prefetch, out):
        assert stamp
        invalid = 0
        total = indices.shape[0]
        for bag in bags(num_bags):
            start, end = bounds(offsets, bag, total)
            valid, _ = scan(weight, indices, start, end, padding, total)
            if valid:
                pool_weighted_row(weight, indices, scale, start, end, padding, out, bag,
                                  prefetch, 1)
            else:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_max(weight, indices, offsets, num_bags, padding, prefetch, out):
        assert stamp
        invalid = 0
        total = indices.shape[0]
        for bag in bags(num_bags):
            start, end = bounds(offsets, bag, total)
            valid, count = scan(weight, indices, start, end, padding, total)
            if not valid:
                invalid += 1
                zero(out, bag)
            elif count == 0:  # empty bag, or only padding
                zero(out, bag)
            else:
                while indices[start] == padding:
                    start += 1
                pool_max_row(weight, indices, weight, start, end, padding, out, bag, prefetch,
                             1)
        return invalid

    return {"sum": pool_sum, "weighted": pool_weighted, "max": pool_max}
