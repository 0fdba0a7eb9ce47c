"""The numba-compiled loop behind :class:`kernels.collection.FusedCollectionKernel`.

One pass over a collection batch, FBGEMM's table-batched way: samples run in parallel
(contiguous runs of samples, one a thread), and inside a sample each feature's bag is
pooled from its own table straight into its columns of the ``[B, sum of dims]`` output,
with the register tiles of the single-table loops (:mod:`kernels.numba_loops`). Tables of
different dims and poolings share the pass; each table's op is chosen per bag from small
arrays, never by a Python loop.

Compiled by numba, not run as Python, so mypy skips it (see pyproject.toml); inputs are
typed and checked in :mod:`kernels.collection`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba

from kernels import numba_decode, numba_loops, numba_tiles
from kernels.numba_loops import (
    _MAX_BAD,
    _MAX_EMPTY,
    bounds,
    compact_max_row,
    compact_scaled_max_row,
    compact_sum_row,
    compact_weighted_row,
    counted,
    max_bounds,
    split,
    zero,
)

#: Per-table ops (``table_op``): how a table's bags pool in this call.
OP_SUM, OP_MEAN, OP_WEIGHTED_SUM, OP_WEIGHTED_MEAN, OP_MAX, OP_SCALED_MAX = range(6)

#: numba's cache keys a loop by its own file: the helpers' sources retire stale loops.
STAMP = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in (
    numba_tiles, numba_decode, numba_loops))).hexdigest()


def _serial(stamp):
    # No reference counting: see numba_loops._serial_loops.
    jit = numba.njit(nogil=True, cache=True, boundscheck=False, _nrt=False)

    @jit
    def pool_samples(tables, indices, offsets, scale, first, last, feature_table,
                     feature_col, table_dim, table_op, table_padding, table_prefetch, out):
        """Pool samples ``[first, last)``: bag ``sample * F + f`` is feature ``f`` of the
        sample (F = ``feature_table.shape[0]``); features whose table is -1 are left to
        another call. Returns how many bags were invalid (zeroed)."""
        assert stamp
        features = feature_table.shape[0]
        total = indices.shape[0]
        invalid = 0
        for sample in range(first, last):
            for feature in range(features):
                table = feature_table[feature]
                if table < 0:
                    continue
                weight = tables[table]
                col = feature_col[feature]
                view = out[:, col : col + table_dim[table]]
                bag = sample * features + feature
                op = table_op[table]
                padding = table_padding[table]
                prefetch = table_prefetch[table]
                bad = False
                if op >= OP_MAX:
                    start, end, state = max_bounds(weight, indices, offsets, bag, total,
                                                   padding)
                    if state == _MAX_EMPTY:
                        zero(view, sample)
                        continue
                    if state == _MAX_BAD:
                        bad = True
                    elif op == OP_MAX:
                        bad = compact_max_row(weight, indices, scale, start, end, padding,
                                              view, sample, prefetch, 1) != 0
                    else:
                        bad = compact_scaled_max_row(weight, indices, scale, start, end,
                                                     padding, view, sample, prefetch,
                                                     1) != 0
                else:
                    start, end, valid = bounds(offsets, bag, total)
                    if not valid:
                        bad = True
                    else:
                        divisor = 1
                        if op == OP_MEAN or op == OP_WEIGHTED_MEAN:
                            divisor = counted(indices, start, end, padding)
                        if op <= OP_MEAN:
                            bad = compact_sum_row(weight, indices, scale, start, end,
                                                  padding, view, sample, prefetch,
                                                  divisor) != 0
                        else:
                            bad = compact_weighted_row(weight, indices, scale, start, end,
                                                       padding, view, sample, prefetch,
                                                       divisor) != 0
                if bad:
                    invalid += 1
                    zero(view, sample)
        return invalid

    return pool_samples


serial_samples = _serial(STAMP)


def _parallel(stamp):
    # numba's parallel loops need reference counting; the per-bag loop must not have it.
    jit = numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)

    @jit
    def pool_parallel(tables, indices, offsets, sample_offsets, scale, chunks, feature_table,
                      feature_col, table_dim, table_op, table_padding, table_prefetch, out):
        """As ``pool_samples`` over every sample, ``chunks`` contiguous runs of samples
        in parallel; ``sample_offsets`` ``[B + 1]`` is where each sample's ids start."""
        assert stamp
        samples = sample_offsets.shape[0] - 1
        edges = split(sample_offsets, samples, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_samples(tables, indices, offsets, scale, edges[chunk],
                                      edges[chunk + 1], feature_table, feature_col,
                                      table_dim, table_op, table_padding, table_prefetch, out)
        return invalid

    return pool_parallel


parallel_samples = _parallel(STAMP)


#: ``policy`` codes of :func:`lay_out`: what an id outside its table does.
OOV_ERROR, OOV_ZERO, OOV_HASH = 0, 1, 2


def _layout(stamp):
    jit = numba.njit(nogil=True, cache=True, boundscheck=False)

    @jit
    def lay_out(values, starts, order, samples, rows, policy, weights, out_ids, out_weights,
                out_offsets, oov, unweighted):
        """Feature-major request bags -> the kernel's sample-major layout, in one pass.

        ``values`` holds the request's ids, feature major in the request's feature order;
        bag ``r * samples + s`` (request feature ``r``, sample ``s``) spans ``starts[bag]``
        to ``starts[bag + 1]``. Output feature ``f`` is request feature ``order[f]``. An id
        outside ``[0, rows[f])`` is an error (``OOV_ERROR``), skipped (``OOV_ZERO``) or
        taken modulo ``rows[f]`` (``OOV_HASH``); ``oov[f]`` counts the skipped and
        hashed ones. ``out_ids`` / ``out_weights`` (when ``weights`` is not empty) receive
        the kept ids, ``out_offsets`` ``[samples * F + 1]`` the bags; ``unweighted[f]`` is
        set when a weight of feature ``f`` is not 1.

        Returns ``(kept ids, -1)`` or, at the first id outside an ``OOV_ERROR`` table in
        output feature-major order, ``(flat position in values, f)``; the outputs are then
        incomplete.
        """
        assert stamp
        features = order.shape[0]
        weighted = weights.shape[0] > 0
        # Errors first, feature major: the reported id does not depend on the layout.
        for f in range(features):
            if policy[f] != OOV_ERROR:
                continue
            bound = rows[f]
            first = starts[order[f] * samples]
            last = starts[order[f] * samples + samples]
            for position in range(first, last):
                if numba.uint64(values[position]) >= numba.uint64(bound):
                    return position, f
        kept = 0
        out_offsets[0] = 0
        for s in range(samples):
            for f in range(features):
                bag = order[f] * samples + s
                bound = rows[f]
                mode = policy[f]
                for position in range(starts[bag], starts[bag + 1]):
                    value = values[position]
                    if numba.uint64(value) >= numba.uint64(bound):
                        oov[f] += 1
                        if mode == OOV_ZERO:
                            continue
                        value = value % bound  # Python's modulo: non-negative
                    out_ids[kept] = value
                    if weighted:
                        weight = weights[position]
                        out_weights[kept] = weight
                        if weight != 1.0:
                            unweighted[f] = True
                    kept += 1
                out_offsets[s * features + f + 1] = kept
        return kept, -1

    return lay_out


lay_out = _layout(STAMP)
