"""The numba-compiled loops behind :class:`kernels.numba_kernel.NumbaKernel`.

This file is compiled by numba, not run as Python, so mypy skips it (see pyproject.toml);
its inputs are typed and checked in ``numba_kernel``. Every loop pools whole bags with the
register tiles of :mod:`kernels.numba_tiles`: a row of ``dim`` columns is cut into passes
of up to 8 registers (12 for rows of more than 48), the last with the masked tail, and
each pass walks the bag's ids once. A loop writes its bags' rows in order, so a row's
last register, when ``dim`` is not a whole number of registers, is stored whole onto the
first elements of the rows its loop writes next (a masked store costs ~3.5 ns a bag on
AMD's cores); a loop's last row, and the collection kernel's, store it masked. The
one-pass loops write outputs of 2 to 32 MiB with streaming stores (see :func:`streams`).

Each loop exists twice: over the bags in parallel (``prange``), and serially for calls too
small to pay for waking the thread pool. For rows of one pass (float32 dims up to 71, or
143 with AVX-512's registers) the serial sum, mean and weighted loops hand the call to a
loop of their own that sets the pass up once a call instead of once a bag. Every loop takes
``offsets`` as ``[B + 1]`` CSR offsets or as ``B`` bag starts (the last bag then runs to
the end of ``indices``), checks each bag's bounds, and the tiles check each id as they read
it (an id outside the table is never read; its bag is zeroed and counted). Each returns how
many bags were invalid, so a caller can skip a separate validation pass over the ids and
word an error only when this count is not zero.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numba
import numpy as np

from kernels import numba_decode, numba_tiles


def _row_pooler(op):
    """An inlined ``pool_row(weight, indices, scale, start, end, padding, out, bag,
    prefetch, divisor, after)`` running the passes of ``op`` across one output row;
    ``after``: how many rows of ``out`` after ``bag`` the caller writes later (their
    first elements may take the tail register's spare lanes, stored whole)."""
    lanes_of, most = numba_tiles.lanes, numba_tiles.MOST_VECTORS
    wide, wide_from = numba_tiles.WIDE_VECTORS, numba_tiles.WIDE_FROM
    masked, spilled = numba_tiles.STORE_MASKED, numba_tiles.STORE_WHOLE
    run = numba_tiles.make_pass(op)

    @numba.njit(inline="always")
    def pool_row(weight, indices, scale, start, end, padding, out, bag, prefetch, divisor,
                 after):
        """Returns 1 when the bag holds an id outside the table (its row is then
        incomplete: the caller zeroes it), else 0."""
        dim = out.shape[1]
        lanes = lanes_of(weight)
        whole = dim // lanes
        tail = dim - whole * lanes
        # The tail register stored whole writes lanes - tail elements past the row: on
        # the rows after it when they are contiguous and the caller writes them later.
        spill = spilled if (after * dim >= lanes - tail
                            and out.strides[0] == dim * out.itemsize) else masked
        col = 0
        invalid = 0
        # Literal pass widths in the loops: each such call compiles to one case of the
        # pass switch, not all of them (a run-time width there cost weighted sums of
        # short rows 8%).
        if whole > wide_from:
            while whole > wide:
                invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                               prefetch, divisor, 0, wide, spill)
                col += wide * lanes
                whole -= wide
        else:
            while whole > most:
                invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                               prefetch, divisor, 0, most, spill)
                col += most * lanes
                whole -= most
        if whole > most and (whole < wide or tail > 0):
            # 9 to 11 registers left, or 12 and a tail: a pass of 8 first.
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, 0, most, spill)
            col += most * lanes
            whole -= most
        # The last pass: the whole registers left and the masked tail together.
        return invalid | run(weight, indices, scale, start, end, padding, col, out, bag,
                             prefetch, divisor, tail, whole, spill)

    return pool_row


def _compact_row_pooler(op):
    """As :func:`_row_pooler` (without ``after``: the tail is always stored masked), in
    passes of 8 (``MOST_VECTORS``), 4, 2 and 1 registers and the masked tail in a pass of
    its own: five pass bodies, not every register count's.
    For loops that inline every op at once (the collection kernel), whose compile time
    grew 3x with every count's pass inlined four times."""
    lanes_of, most = numba_tiles.lanes, numba_tiles.MOST_VECTORS
    run = numba_tiles.make_pass(op)

    @numba.njit(inline="always")
    def pool_row(weight, indices, scale, start, end, padding, out, bag, prefetch, divisor):
        dim = out.shape[1]
        lanes = lanes_of(weight)
        whole = dim // lanes
        col = 0
        invalid = 0
        while whole >= most:
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, 0, most, 0)
            col += most * lanes
            whole -= most
        if whole >= 4:
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, 0, 4, 0)
            col += 4 * lanes
            whole -= 4
        if whole >= 2:
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, 0, 2, 0)
            col += 2 * lanes
            whole -= 2
        if whole >= 1:
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, 0, 1, 0)
            col += lanes
        if col < dim:
            invalid |= run(weight, indices, scale, start, end, padding, col, out, bag,
                           prefetch, divisor, dim - col, 0, 0)
        return invalid

    return pool_row


def build() -> dict[str, Any]:
    """Compile the loops lazily so ``import kernels`` does not pay for numba.

    Returns ``{"sum", "mean", "weighted", "max", "scaled_max"}`` each mapped to
    ``(parallel, serial)``.
    """
    parallel = _parallel_loops(STAMP)
    return {name: (parallel[name], SERIAL[name]) for name in parallel}


#: numba's cache keys a loop by its own file and closure, not by the files it calls: the
#: tiles' and decoders' source hash in every closure retires cached loops when they change.
STAMP = hashlib.sha256(b"".join(Path(module.__file__).read_bytes()
                              for module in (numba_tiles, numba_decode))).hexdigest()

# The loops below reach these as globals, never through their closures: numba's cache
# keys a function by its pickled closure, and a pickled intrinsic or dispatcher differs
# in every process (the loops would then compile again, ~2.5 s, in every process).
pool_sum_row = _row_pooler("sum")
pool_weighted_row = _row_pooler("weighted")
pool_max_row = _row_pooler("max")
pool_scaled_max_row = _row_pooler("scaled_max")
compact_sum_row = _compact_row_pooler("sum")
compact_weighted_row = _compact_row_pooler("weighted")
compact_max_row = _compact_row_pooler("max")
compact_scaled_max_row = _compact_row_pooler("scaled_max")
skips, is_padding = numba_tiles.skips, numba_tiles.is_padding
lanes_of, MOST = numba_tiles.lanes, numba_tiles.MOST_VECTORS
STREAMS, LINE_BYTES = numba_tiles.STREAMS, numba_tiles.LINE_BYTES
STORE_MASKED, STORE_WHOLE = numba_tiles.STORE_MASKED, numba_tiles.STORE_WHOLE
STORE_STREAM, fence_stores = numba_tiles.STORE_STREAM, numba_tiles.fence_stores
run_sum, run_weighted = numba_tiles.make_pass("sum"), numba_tiles.make_pass("weighted")
run_sum_tailed = numba_tiles.make_pass("sum", tailed=True)
run_weighted_tailed = numba_tiles.make_pass("weighted", tailed=True)


@numba.njit(inline="always")
def next_start(offsets, bag, total):
    """Where the bag after ``bag`` starts: ``offsets[bag + 1]``, or the end of the ids.
    Indexed unsigned: a signed index compiles numba's wrap-around of negative ones."""
    following = numba.uint64(bag) + numba.uint64(1)
    return offsets[following] if following < numba.uint64(offsets.shape[0]) else total


@numba.njit(inline="always")
def ordered(start, end, total):
    """``0 <= start <= end <= total`` in two unsigned compares (a negative value is a huge
    unsigned one)."""
    return numba.uint64(start) <= numba.uint64(end) and numba.uint64(end) <= numba.uint64(total)


@numba.njit(inline="always")
def bounds(offsets, bag, total):
    """``(start, end, valid)`` of bag ``bag``: ``offsets[bag]`` to the next start, or to
    the end of the ids; valid when ``0 <= start <= end <= total``."""
    start = offsets[numba.uint64(bag)]
    end = next_start(offsets, bag, total)
    return start, end, ordered(start, end, total)


@numba.njit(inline="always")
def counted(indices, start, end, padding):
    """The bag's ids that are not ``padding`` (the mean's divisor)."""
    count = end - start
    if skips(padding):
        for position in range(start, end):
            if is_padding(indices[position], padding):
                count -= 1
    return count


_MAX_EMPTY, _MAX_BAD, _MAX_POOL = 0, 1, 2


@numba.njit(inline="always")
def max_bounds(weight, indices, offsets, bag, total, padding):
    """``(start, end, state)`` of a max bag: ``start`` moved to its first id that is not
    ``padding`` (which starts the maximum, checked here: the tiles check the rest);
    ``state`` is ``_MAX_EMPTY`` (no ids, or only padding), ``_MAX_BAD`` (bad bounds or a
    first id outside the table) or ``_MAX_POOL``."""
    start, end, valid = bounds(offsets, bag, total)
    if not valid:
        return start, end, _MAX_BAD
    while start < end and is_padding(indices[start], padding):
        start += 1
    if start == end:
        return start, end, _MAX_EMPTY
    if numba.uint64(indices[start]) >= numba.uint64(weight.shape[0]):
        return start, end, _MAX_BAD
    return start, end, _MAX_POOL


@numba.njit(inline="always")
def zero(out, bag):
    for col in range(out.shape[1]):
        out[bag, col] = 0


@numba.njit(inline="always")
def one_pass(weight, out):
    """Whether a row is one pass of the tiles: at most ``MOST_VECTORS`` whole registers
    and the tail (float32 dims up to 71, float64 up to 35; twice that with AVX-512)."""
    return out.shape[1] // lanes_of(weight) <= MOST


#: Outputs of at least this many bytes (and less than :data:`STREAM_BELOW`) are written by
#: the one-pass loops with streaming stores (``numba_tiles.STORE_STREAM``): a normal store
#: first reads its line, and an output past the core's L2 (2 MiB on the machines measured)
#: is not there, so those reads compete with the gathered rows. Measured (float32, Zipf
#: 1.1, PyTorch-made tables, Poisson bags of 1 id, api x torch, 2 threads, streaming
#: against plain in alternating processes): dim 64 8,192 bags (2 MiB) 1.47 against 0.94,
#: 16,384 (4 MiB) 1.05-1.55 against 0.82-0.98, 65,536 (16 MiB) 0.98-1.41 against 0.75-0.91;
#: dim 32 65,536 bags 0.96 against 0.76; dim 128 16,384 1.18-1.39 against 0.99-1.10; bags of
#: 3 ids 0.91-1.11 against 0.85-1.09 (BENCHMARKS.md, fourteenth pass). Outputs that fit the
#: L2 lose or tie (dim 64 2,048 bags 0.90-0.93 against 1.06-1.10, dim 128 0.88-1.40
#: against 1.31-1.57): there the lines are the L2's, and the caller reads them from there.
STREAM_FROM = 2 << 20
#: ... and less than this: glibc maps blocks of 32 MiB and more afresh at every allocation,
#: and the kernel's zeroing of each new page leaves it in the caches, where streaming past
#: them lost (dim 64 131,072 bags 0.82-0.83 against 0.96-0.97; dim 128 65,536 0.81 against
#: 0.97-1.03).
STREAM_BELOW = 32 << 20


@numba.njit(inline="always")
def streams(out):
    """Whether the one-pass loops write ``out`` with streaming stores: where
    ``numba_tiles.STREAMS``, for outputs of :data:`STREAM_FROM` to :data:`STREAM_BELOW`
    bytes whose every row starts on a 64-byte line (so each whole register's store is
    aligned; such rows have no tail register)."""
    size = out.shape[0] * out.strides[0]
    return (STREAMS and STREAM_FROM <= size < STREAM_BELOW
            and out.strides[0] % LINE_BYTES == 0 and out.ctypes.data % LINE_BYTES == 0)


@numba.njit(inline="always")
def spill_before(weight, out, first, last):
    """The bags before this one may store their tail register whole: the spare lanes
    land on rows the loop over ``[first, last)`` writes later (see :func:`_row_pooler`'s
    rule, computed once a call instead of once a bag)."""
    dim = out.shape[1]
    lanes = lanes_of(weight)
    tail = dim % lanes
    if tail == 0 or out.strides[0] != dim * out.itemsize:
        return first
    return last - (lanes - tail + dim - 1) // dim


@numba.njit(inline="always")
def store_plan(weight, out, first, last):
    """``(stores, until)``: the one-pass loops store the bags before ``until`` as
    ``stores`` says (``numba_tiles.make_pass``) and the rest masked: every bag streamed
    where :func:`streams`, else whole tail registers before :func:`spill_before`."""
    if streams(out):
        return STORE_STREAM, last
    return STORE_WHOLE, spill_before(weight, out, first, last)


@numba.njit(nogil=True, cache=True, boundscheck=False, _nrt=False)
def zero_invalid(weight, indices, offsets, first, last, out):
    """Zero and count the bags of ``[first, last)`` with bad bounds or an id outside the
    table: the one-pass loops' second look, only after they saw one."""
    invalid = 0
    total = indices.shape[0]
    rows = numba.uint64(weight.shape[0])
    for bag in range(first, last):
        start, end, valid = bounds(offsets, bag, total)
        bad = not valid
        position = start
        while not bad and position < end:
            bad = numba.uint64(indices[position]) >= rows
            position += 1
        if bad:
            invalid += 1
            zero(out, bag)
    return invalid


@numba.njit(nogil=True, cache=True, boundscheck=False)
def reused(indices, most):
    """Whether ``indices`` hold at most ``most`` distinct values, counted exactly in an
    open-addressing set that gives up once the count passes ``most``. The ids need not
    be valid: they are only compared."""
    empty = np.iinfo(np.int64).min  # marks a free slot; the id itself is counted apart
    bits = 4
    while (1 << bits) < 2 * most + 2:  # at most half full
        bits += 1
    keys = np.full(1 << bits, empty, dtype=np.int64)
    mask = numba.uint64((1 << bits) - 1)
    shift = numba.uint64(64 - bits)
    distinct = 0
    seen_empty = False
    for position in range(indices.shape[0]):
        key = indices[position]
        if key == empty:
            if not seen_empty:
                seen_empty = True
                distinct += 1
        else:
            # Fibonacci hashing: the product's top bits spread nearby and strided ids.
            slot = (numba.uint64(key) * numba.uint64(0x9E3779B97F4A7C15)) >> shift
            while keys[slot] != key and keys[slot] != empty:
                slot = (slot + numba.uint64(1)) & mask
            if keys[slot] == empty:
                keys[slot] = key
                distinct += 1
        if distinct > most:
            return False
    return True


def _bag_loops(whole, tailed, stamp):
    # One-pass rows (dims up to 71 or 143, where a bag is a few ids' work) pool in loops that
    # pick the pass once a call, not once a bag: the per-bag pass choice, the spill
    # test and the invalid bag's branch cost 1.5-4 ns a bag (bags of 4-8 ids at dims 32
    # and 64 were 0.75-0.9x torch on one thread). Functions of their own, called once a
    # call: inside the serial loops, beside their general loop, the same code ran as slow
    # as before (registers spilled for both).
    # ``whole`` and ``tailed`` (constants of the closure: the dead branches below are
    # pruned, and ``whole`` reaches the tiles as a literal): rows of ``whole`` registers,
    # and a masked tail register when ``tailed``, take a loop whose pass is one case, not a
    # switch among two dozen inside the bag loop whose cases share the loop's registers;
    # ``whole`` < 0 compiles that switching loop for any row. Measured (the loop alone, one
    # thread, the same process, 16,384 bags of Poisson 1 and 4 ids, Zipf 1.1, dims 16-128,
    # three runs): 1.01-1.18x the switching loop, median 1.08; rows of a tail and 0 or 1
    # whole registers (dims 8, 12, 20, 24; 2,048 and 16,384 bags of 1 and 4 ids, sums and
    # weighted) 1.00-1.21x, median 1.13. A function per count, not every count's loop
    # written out in one function: 0.90-1.23x those (median 1.03; dim 48 with a count of
    # its own 1.09-1.23x; weighted one-id bags at dims 12 and 32 0.90-0.99x), and each
    # loop's source once. Made by numba.literal_unroll they ran 0.95-1.12x the switching
    # loop (median 1.02); every count through inlined helpers took 7 min 51 s to compile.
    # A bag starts where the one before it ended (one load of the offsets a bag, not two);
    # a bag with bad bounds pools nothing (end = start, one conditional move); any bad bag
    # is zeroed and counted by a second look (``zero_invalid``). Measured against loading
    # both ends with signed indices and zeroing both on bad bounds (the loop alone, one
    # thread, the same process, Zipf 1.1 PyTorch-made calls of 2,048 and 16,384 Poisson
    # bags): sums of 1-4 ids at dims 16, 32, 64 1.03-1.27x (median 1.11), dims 48 and 100
    # 1.02-1.12x; weighted dims 12, 48, 100 0.99-1.15x.
    # Each returns 1 when a bag was bad, else 0; ``stores`` and ``spilling`` are
    # :func:`store_plan`'s, ``first < last``.
    general = whole < 0
    jit = numba.njit(nogil=True, cache=True, boundscheck=False, _nrt=False)

    @jit
    def sum_bags(weight, indices, offsets, first, last, padding, prefetch, out, stores,
                 spilling):
        assert stamp
        total = indices.shape[0]
        lanes = lanes_of(weight)
        begin = offsets[numba.uint64(first)]
        bad = 0
        for bag in range(first, last):
            start, end = begin, next_start(offsets, bag, total)
            begin = end
            if not ordered(start, end, total):
                end = start
                bad = 1
            if general:
                bad |= run_sum(weight, indices, weight, start, end, padding, 0, out, bag,
                               prefetch, 1, out.shape[1] % lanes, out.shape[1] // lanes,
                               stores if bag < spilling else STORE_MASKED)
            elif tailed:
                bad |= run_sum_tailed(weight, indices, weight, start, end, padding, 0, out,
                                      bag, prefetch, 1, out.shape[1] % lanes, whole,
                                      stores if bag < spilling else STORE_MASKED)
            else:
                bad |= run_sum(weight, indices, weight, start, end, padding, 0, out, bag,
                               prefetch, 1, 0, whole, stores)
        return bad

    @jit
    def mean_bags(weight, indices, offsets, first, last, padding, prefetch, out, stores,
                  spilling):
        assert stamp
        total = indices.shape[0]
        lanes = lanes_of(weight)
        begin = offsets[numba.uint64(first)]
        bad = 0
        for bag in range(first, last):
            start, end = begin, next_start(offsets, bag, total)
            begin = end
            if not ordered(start, end, total):
                end = start
                bad = 1
            if general:
                bad |= run_sum(weight, indices, weight, start, end, padding, 0, out, bag,
                               prefetch, counted(indices, start, end, padding),
                               out.shape[1] % lanes, out.shape[1] // lanes,
                               stores if bag < spilling else STORE_MASKED)
            elif tailed:
                bad |= run_sum_tailed(weight, indices, weight, start, end, padding, 0, out,
                                      bag, prefetch, counted(indices, start, end, padding),
                                      out.shape[1] % lanes, whole,
                                      stores if bag < spilling else STORE_MASKED)
            else:
                bad |= run_sum(weight, indices, weight, start, end, padding, 0, out, bag,
                               prefetch, counted(indices, start, end, padding), 0, whole,
                               stores)
        return bad

    @jit
    def weighted_bags(weight, indices, offsets, first, last, scale, padding, prefetch, out,
                      stores, spilling):
        assert stamp
        total = indices.shape[0]
        lanes = lanes_of(weight)
        begin = offsets[numba.uint64(first)]
        bad = 0
        for bag in range(first, last):
            start, end = begin, next_start(offsets, bag, total)
            begin = end
            if not ordered(start, end, total):
                end = start
                bad = 1
            if general:
                bad |= run_weighted(weight, indices, scale, start, end, padding, 0, out, bag,
                                    prefetch, 1, out.shape[1] % lanes, out.shape[1] // lanes,
                                    stores if bag < spilling else STORE_MASKED)
            elif tailed:
                bad |= run_weighted_tailed(weight, indices, scale, start, end, padding, 0,
                                           out, bag, prefetch, 1, out.shape[1] % lanes,
                                           whole, stores if bag < spilling else STORE_MASKED)
            else:
                bad |= run_weighted(weight, indices, scale, start, end, padding, 0, out, bag,
                                    prefetch, 1, 0, whole, stores)
        return bad

    return sum_bags, mean_bags, weighted_bags


# The loops per row shape (:func:`_bag_loops`), reached as globals by the one-pass entries
# below. Whole registers 1, 2, 3, 4 and 8 are float32 dims 16, 32, 48, 64 and 128 with
# AVX-512 (8, 16, 24, 32 and 64 with AVX2); a tail after 0 or 1 of them dims 1-15 and
# 17-31 (1-7 and 9-15). Each shape costs the cold compile 2-4 s (every caller links the
# loops in): dims 96 (6 registers) ran only 1.01-1.05x faster with their own.
sum_1, mean_1, weighted_1 = _bag_loops(1, False, STAMP)
sum_2, mean_2, weighted_2 = _bag_loops(2, False, STAMP)
sum_3, mean_3, weighted_3 = _bag_loops(3, False, STAMP)
sum_4, mean_4, weighted_4 = _bag_loops(4, False, STAMP)
sum_8, mean_8, weighted_8 = _bag_loops(8, False, STAMP)
sum_0_tail, mean_0_tail, weighted_0_tail = _bag_loops(0, True, STAMP)
sum_1_tail, mean_1_tail, weighted_1_tail = _bag_loops(1, True, STAMP)
sum_any, mean_any, weighted_any = _bag_loops(-1, False, STAMP)


def _one_pass_loops(stamp):
    # Each picks its rows' bag loop once a call, streams or spills as ``store_plan`` says
    # and fences streamed stores before returning. Three written out, not one factory: a
    # closure holding the bag loops' dispatchers would pickle differently in every process
    # (see _parallel_loops).
    jit = numba.njit(nogil=True, cache=True, boundscheck=False, _nrt=False)

    @jit
    def pool_sum(weight, indices, offsets, first, last, padding, prefetch, out):
        assert stamp
        if first >= last:
            return 0
        lanes = lanes_of(weight)
        whole, tail = out.shape[1] // lanes, out.shape[1] % lanes
        count = whole if tail == 0 else 0
        stores, spilling = store_plan(weight, out, first, last)
        args = (weight, indices, offsets, first, last, padding, prefetch, out, stores,
                spilling)
        if count == 1:
            bad = sum_1(*args)
        elif count == 2:
            bad = sum_2(*args)
        elif count == 3:
            bad = sum_3(*args)
        elif count == 4:
            bad = sum_4(*args)
        elif count == 8:
            bad = sum_8(*args)
        elif tail > 0 and whole == 0:
            bad = sum_0_tail(*args)
        elif tail > 0 and whole == 1:
            bad = sum_1_tail(*args)
        else:
            bad = sum_any(*args)
        if stores == STORE_STREAM:
            fence_stores()
        return zero_invalid(weight, indices, offsets, first, last, out) if bad else 0

    @jit
    def pool_mean(weight, indices, offsets, first, last, padding, prefetch, out):
        assert stamp
        if first >= last:
            return 0
        lanes = lanes_of(weight)
        whole, tail = out.shape[1] // lanes, out.shape[1] % lanes
        count = whole if tail == 0 else 0
        stores, spilling = store_plan(weight, out, first, last)
        args = (weight, indices, offsets, first, last, padding, prefetch, out, stores,
                spilling)
        if count == 1:
            bad = mean_1(*args)
        elif count == 2:
            bad = mean_2(*args)
        elif count == 3:
            bad = mean_3(*args)
        elif count == 4:
            bad = mean_4(*args)
        elif count == 8:
            bad = mean_8(*args)
        elif tail > 0 and whole == 0:
            bad = mean_0_tail(*args)
        elif tail > 0 and whole == 1:
            bad = mean_1_tail(*args)
        else:
            bad = mean_any(*args)
        if stores == STORE_STREAM:
            fence_stores()
        return zero_invalid(weight, indices, offsets, first, last, out) if bad else 0

    @jit
    def pool_weighted(weight, indices, offsets, first, last, scale, padding, prefetch, out):
        assert stamp
        if first >= last:
            return 0
        lanes = lanes_of(weight)
        whole, tail = out.shape[1] // lanes, out.shape[1] % lanes
        count = whole if tail == 0 else 0
        stores, spilling = store_plan(weight, out, first, last)
        args = (weight, indices, offsets, first, last, scale, padding, prefetch, out, stores,
                spilling)
        if count == 1:
            bad = weighted_1(*args)
        elif count == 2:
            bad = weighted_2(*args)
        elif count == 3:
            bad = weighted_3(*args)
        elif count == 4:
            bad = weighted_4(*args)
        elif count == 8:
            bad = weighted_8(*args)
        elif tail > 0 and whole == 0:
            bad = weighted_0_tail(*args)
        elif tail > 0 and whole == 1:
            bad = weighted_1_tail(*args)
        else:
            bad = weighted_any(*args)
        if stores == STORE_STREAM:
            fence_stores()
        return zero_invalid(weight, indices, offsets, first, last, out) if bad else 0

    return {"sum": pool_sum, "mean": pool_mean, "weighted": pool_weighted}


ONE_PASS = _one_pass_loops(STAMP)
one_pass_sum, one_pass_mean = ONE_PASS["sum"], ONE_PASS["mean"]
one_pass_weighted = ONE_PASS["weighted"]


def _serial_loops(stamp):
    # Closures hold only ``stamp``, which pickles the same in every process.
    # No reference counting (``_nrt=False``): with it, every inlined helper taking an
    # array increfs and decrefs it per bag, an atomic add on a cache line both threads
    # share (measured: 0.64x -> 0.90x torch on bags of 8 ids, one thread).
    jit = numba.njit(nogil=True, cache=True, boundscheck=False, _nrt=False)

    @jit
    def pool_sum(weight, indices, offsets, first, last, padding, prefetch, out):
        assert stamp
        if one_pass(weight, out):
            return one_pass_sum(weight, indices, offsets, first, last, padding, prefetch, out)
        invalid = 0
        total = indices.shape[0]
        for bag in range(first, last):
            start, end, valid = bounds(offsets, bag, total)
            # A literal divisor: the sum tiles then carry no division branch.
            if not valid or pool_sum_row(weight, indices, weight, start, end, padding, out,
                                         bag, prefetch, 1, last - bag - 1) != 0:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_mean(weight, indices, offsets, first, last, padding, prefetch, out):
        assert stamp
        if one_pass(weight, out):
            return one_pass_mean(weight, indices, offsets, first, last, padding, prefetch, out)
        invalid = 0
        total = indices.shape[0]
        for bag in range(first, last):
            start, end, valid = bounds(offsets, bag, total)
            if not valid or pool_sum_row(weight, indices, weight, start, end, padding, out,
                                         bag, prefetch, counted(indices, start, end, padding),
                                         last - bag - 1) != 0:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_weighted(weight, indices, offsets, first, last, scale, padding, prefetch, out):
        assert stamp
        if one_pass(weight, out):
            return one_pass_weighted(weight, indices, offsets, first, last, scale, padding,
                                     prefetch, out)
        invalid = 0
        total = indices.shape[0]
        for bag in range(first, last):
            start, end, valid = bounds(offsets, bag, total)
            bad = not valid
            if not bad:
                bad = pool_weighted_row(weight, indices, scale, start, end, padding, out, bag,
                                        prefetch, 1, last - bag - 1) != 0
            if bad:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_max(weight, indices, offsets, first, last, padding, prefetch, out):
        assert stamp
        invalid = 0
        total = indices.shape[0]
        for bag in range(first, last):
            start, end, state = max_bounds(weight, indices, offsets, bag, total, padding)
            if state == _MAX_EMPTY:
                zero(out, bag)
            elif state == _MAX_BAD or pool_max_row(weight, indices, weight, start, end,
                                                   padding, out, bag, prefetch, 1,
                                                   last - bag - 1) != 0:
                invalid += 1
                zero(out, bag)
        return invalid

    @jit
    def pool_scaled_max(weight, indices, offsets, first, last, scale, padding, prefetch, out):
        # As pool_max, each row times scale[position] first (max_norm's row factors).
        assert stamp
        invalid = 0
        total = indices.shape[0]
        for bag in range(first, last):
            start, end, state = max_bounds(weight, indices, offsets, bag, total, padding)
            if state == _MAX_EMPTY:
                zero(out, bag)
            elif state == _MAX_BAD or pool_scaled_max_row(weight, indices, scale, start, end,
                                                          padding, out, bag, prefetch, 1,
                                                          last - bag - 1) != 0:
                invalid += 1
                zero(out, bag)
        return invalid

    return {"sum": pool_sum, "mean": pool_mean, "weighted": pool_weighted, "max": pool_max,
            "scaled_max": pool_scaled_max}


#: ``{"sum", "mean", "weighted", "max", "scaled_max"}`` -> loop over the bags ``[first,
#: last)`` on the calling thread: ``(weight, indices, offsets, first, last, [scale,]
#: padding, prefetch, out) -> invalid``.
SERIAL = _serial_loops(STAMP)
serial_sum, serial_mean = SERIAL["sum"], SERIAL["mean"]
serial_weighted, serial_max = SERIAL["weighted"], SERIAL["max"]
serial_scaled_max = SERIAL["scaled_max"]


@numba.njit(inline="always")
def split(offsets, num_bags, total, chunks):
    """``chunks + 1`` bag boundaries giving each chunk about the same ids plus bags (a
    bag costs about one id more than its ids). Non-decreasing even for invalid offsets,
    so every bag lands in exactly one chunk."""
    edges = np.empty(chunks + 1, dtype=np.int64)
    edges[0] = 0
    work = total + num_bags
    for chunk in range(1, chunks):
        target = work * chunk // chunks
        low, high = edges[chunk - 1], num_bags
        while low < high:  # first bag whose start plus index reaches the target
            middle = (low + high) // 2
            if offsets[middle] + middle < target:
                low = middle + 1
            else:
                high = middle
        edges[chunk] = low
    edges[chunks] = num_bags
    return edges


def _parallel_loops(stamp):
    # Each of ``chunks`` (1 <= chunks <= num_bags; the caller passes its thread count:
    # numba's get_num_threads() in here would stop the cache) runs the serial loop over
    # one contiguous run of bags: numba's parallel loops need reference counting, which
    # the per-bag loops must not have. Five drivers written out, not one factory: a
    # factory's closure would hold the serial loop's dispatcher, which pickles differently
    # in every process, and numba's cache would then never hit.
    jit = numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)

    @jit
    def pool_sum(weight, indices, offsets, num_bags, chunks, padding, prefetch, out):
        assert stamp
        edges = split(offsets, num_bags, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_sum(weight, indices, offsets, edges[chunk], edges[chunk + 1],
                                  padding, prefetch, out)
        return invalid

    @jit
    def pool_mean(weight, indices, offsets, num_bags, chunks, padding, prefetch, out):
        assert stamp
        edges = split(offsets, num_bags, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_mean(weight, indices, offsets, edges[chunk], edges[chunk + 1],
                                   padding, prefetch, out)
        return invalid

    @jit
    def pool_weighted(weight, indices, offsets, num_bags, chunks, scale, padding, prefetch,
                      out):
        assert stamp
        edges = split(offsets, num_bags, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_weighted(weight, indices, offsets, edges[chunk],
                                       edges[chunk + 1], scale, padding, prefetch, out)
        return invalid

    @jit
    def pool_max(weight, indices, offsets, num_bags, chunks, padding, prefetch, out):
        assert stamp
        edges = split(offsets, num_bags, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_max(weight, indices, offsets, edges[chunk], edges[chunk + 1],
                                  padding, prefetch, out)
        return invalid

    @jit
    def pool_scaled_max(weight, indices, offsets, num_bags, chunks, scale, padding, prefetch,
                        out):
        assert stamp
        edges = split(offsets, num_bags, indices.shape[0], chunks)
        invalid = 0
        for chunk in numba.prange(chunks):
            invalid += serial_scaled_max(weight, indices, offsets, edges[chunk],
                                         edges[chunk + 1], scale, padding, prefetch, out)
        return invalid

    return {"sum": pool_sum, "mean": pool_mean, "weighted": pool_weighted, "max": pool_max,
            "scaled_max": pool_scaled_max}
