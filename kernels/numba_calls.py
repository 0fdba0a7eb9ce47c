"""One compiled step per kernel call: the entries behind :meth:`NumbaKernel.pool`.

Each entry checks the offsets' ends, allocates the output, picks how far ahead to prefetch
(counting the call's distinct ids when a count is due) and which lines (timing the call
when a prefetch trial runs), and runs the serial or the parallel loop of
:mod:`kernels.numba_loops`, all behind one dispatch from Python. Interpreted,
those steps cost the public API 15-40 us a call right after a large call (each Python
function and NumPy call a few us while the interpreter's working set is out of the
caches), 4-8% of a 2,048-bag call and more of a 256-bag one; see BENCHMARKS.md.

Compiled by numba, not run as Python, so mypy skips it (see pyproject.toml). One entry
per loop, each a call of the inlined :func:`pooled` naming its loop, not made by a
factory, for the reason :func:`numba_loops._parallel_loops` gives; their closures hold
only ``STAMP``.

Every entry returns ``(out, invalid)``: the ``(bags, dim)`` result and how many bags were
invalid (an id outside the table or bad bounds: their rows are zeros), or an empty
``(0, dim)`` array and -1 when ``offsets`` is empty, does not start at 0, or holds
``bags + 1`` entries whose last is not ``N``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numba
import numpy as np

from kernels import numba_loops
from kernels.numba_loops import (
    reused,
    serial_max,
    serial_mean,
    serial_sum,
    serial_weighted,
    split,
)
from kernels.numba_tiles import HAS_CYCLES, LEAD_LINES, LINE_BYTES, cycles
from kernels.storage import StoredTable

#: The entries inline code of the loops' files: their hash retires cached entries when
#: those change (numba keys an entry by its own file only).
STAMP = hashlib.sha256(numba_loops.STAMP.encode()
                       + Path(numba_loops.__file__).read_bytes()).hexdigest()

#: A kernel's plan, an int64 array the entries read and update: how many ids ahead its
#: table is prefetched, the most distinct rows a call may gather unprefetched, calls (of
#: ``REUSE_MIN_IDS`` ids or more) to the next count of distinct ids, and whether the last
#: count found the rows cache-resident (1) or not (0).
PLAN_PREFETCH, PLAN_HOT_ROWS, PLAN_UNTIL_COUNT, PLAN_HOT = range(4)
#: The plan's prefetch trial (see :data:`TRIAL_CALLS`): whether the kernel tries (float32
#: or float64 rows that span more lines than ``numba_tiles.LEAD_LINES``; see
#: :func:`new_plan`), the choice kept (1: the lead lines only, 0: every line), calls to
#: the next trial, the running trial's step (0: none running), then the cycles per 1,024
#: ids of each of its ``2 * TRIAL_CALLS`` calls in step order (odd steps: the lead lines).
PLAN_TUNABLE, PLAN_LEAD_ONLY, PLAN_UNTIL_TRIAL, PLAN_TRIAL_STEP, PLAN_TRIAL_TIMES = range(4, 9)
#: Rows a call gathers this many times or more on average, few enough to stay in the
#: core's L2 cache between their uses (together at most a quarter of it: the kernel's
#: ``hot_rows``), are not prefetched: a prefetch per line per id only costs instructions
#: there. A kernel counts the distinct ids of its first call and of one call in
#: ``REUSE_EVERY`` after it (of ``REUSE_MIN_IDS`` ids or more) and stops prefetching while
#: they stay that few. Measured (2 threads, Zipf 1.5 ids, 256-2,048 bags): 1.05-1.3x
#: faster; rows used 2-8 times a call (Zipf 1.1) lose up to 0.76x without prefetching,
#: and calls whose rows fill a quarter of the L2 or more lose 3-5% (16,384 bags of dim
#: 64-128: the output streaming through the cache evicts them). A count costs about a
#: call (0.1-4.6 ns an id, stopping at its bound): once in 256 calls, under 0.5% of their
#: time.
REUSE_USES = 8
REUSE_EVERY = 256
REUSE_MIN_IDS = 256


#: Whether a table's rows are best prefetched whole or by their first lines depends on
#: where they are (memory or the caches: see ``numba_tiles.LEAD_LINES``), which nothing in
#: a call tells. So a kernel whose rows span more than those lines times both: it
#: prefetches every line (as FBGEMM) until its ``TRIAL_FIRST``-th call of
#: ``TRIAL_MIN_IDS`` ids or more, which starts a trial of ``2 * TRIAL_CALLS`` such calls
#: alternating the two, and keeps the lead lines only if their median call beat every
#: line's by more than 1/32; it tries again ``TRIAL_EVERY`` calls after each trial.
#: Results never depend on it; the slower choice's 8 calls in 272 cost 0.3% at a 10% gap.
#: The first calls are left out and medians decide because single calls mislead: a
#: kernel's first calls are warm-ups and checks that repeat one batch whose rows the call
#: before left in the caches, and a call right after another library's is slowed by its
#: spinning threads. Deciding on the fastest of 4 calls each from the first call on, a
#: benchmark's check-then-warm-up start kept the lead lines for 1,000,000 x 128 cold
#: 2,048-bag calls in 16 of 20 fresh kernels (now 0 of 20), while rows in the caches
#: keep them 17-20 times in 20 (2 threads, float32 dims 128 and 384, Zipf 1.1). The lead
#: lines on rows from memory cost those calls 1-5%, and 16,384-bag ones 8-12% (0.88-0.92x
#: torch, not 0.97-1.06; BENCHMARKS.md, twelfth pass).
TRIAL_CALLS = 8
TRIAL_FIRST = 16
TRIAL_EVERY = 256
TRIAL_MIN_IDS = 1024
PLAN_SIZE = PLAN_TRIAL_TIMES + 2 * TRIAL_CALLS


@numba.njit(inline="always")
def trial_prefetch(plan, prefetch, ids):
    """``(prefetch, step)``: ``prefetch`` as the loops take it for this call (negative for
    the lead lines only) and the trial step it times (0: none)."""
    step = 0
    if prefetch != 0 and plan[PLAN_TUNABLE] != 0 and ids >= TRIAL_MIN_IDS:
        step = plan[PLAN_TRIAL_STEP]
        if step == 0:
            plan[PLAN_UNTIL_TRIAL] -= 1
            if plan[PLAN_UNTIL_TRIAL] <= 0:
                step = 1
                plan[PLAN_TRIAL_STEP] = 1
    lead_only = step % 2 == 1 if step != 0 else plan[PLAN_LEAD_ONLY] != 0
    return (-prefetch if lead_only else prefetch), step


@numba.njit(inline="always")
def middle(plan, first):
    """The middle two (in time order) of the trial's times at ``first``, ``first + 2``,
    ... (one choice's), summed: twice their median."""
    times = np.sort(plan[first:PLAN_SIZE:2])
    half = times.shape[0] // 2
    return times[half - 1] + times[half]


@numba.njit(inline="always")
def trial_record(plan, step, spent, ids):
    """Record ``spent`` cycles over ``ids`` for trial ``step``; the trial's last step
    decides. Threads racing here lose a step at worst: a step another thread already
    took is ignored."""
    if step == 0 or plan[PLAN_TRIAL_STEP] != step:
        return
    plan[PLAN_TRIAL_TIMES + step - 1] = spent * 1024 // ids
    if step < 2 * TRIAL_CALLS:
        plan[PLAN_TRIAL_STEP] = step + 1
        return
    lead, every = middle(plan, PLAN_TRIAL_TIMES), middle(plan, PLAN_TRIAL_TIMES + 1)
    plan[PLAN_LEAD_ONLY] = 1 if lead * 32 < every * 31 else 0
    plan[PLAN_TRIAL_STEP] = 0
    plan[PLAN_UNTIL_TRIAL] = TRIAL_EVERY


@numba.njit(nogil=True, cache=True, boundscheck=False)
def planned_prefetch(indices, plan):
    """How many ids ahead this call prefetches: the plan's distance, or 0 while its rows
    are cache-resident (counted again when a count is due). Threads racing here at most
    count twice: prefetching never changes a result."""
    prefetch = plan[PLAN_PREFETCH]
    if prefetch == 0:
        return 0
    if indices.shape[0] >= REUSE_MIN_IDS:
        plan[PLAN_UNTIL_COUNT] -= 1
        if plan[PLAN_UNTIL_COUNT] <= 0:
            plan[PLAN_UNTIL_COUNT] = REUSE_EVERY
            most = min(indices.shape[0] // REUSE_USES, plan[PLAN_HOT_ROWS])
            plan[PLAN_HOT] = 1 if reused(indices, most) else 0
    return 0 if plan[PLAN_HOT] else prefetch


@numba.njit(inline="always", cache=True)
def output(indices, offsets, bags, like):
    """``(out, bags)``: the uninitialised ``(bags, dim)`` result in ``like``'s dtype
    (``like`` is ``(0, dim)``), starting on a 64-byte line, or an empty one and -1 when
    the offsets' ends are wrong."""
    count = offsets.shape[0]
    if count == 0 or offsets[0] != 0 or (count > bags and offsets[bags] != indices.shape[0]):
        return np.empty((0, like.shape[1]), like.dtype), -1
    # numba aligns arrays to 32 bytes; streaming stores need whole lines (numba_loops.streams).
    size = bags * like.shape[1]
    block = np.empty(size + LINE_BYTES // like.itemsize, like.dtype)
    skip = (LINE_BYTES - block.ctypes.data % LINE_BYTES) % LINE_BYTES // like.itemsize
    return block[skip:skip + size].reshape((bags, like.shape[1])), bags


#: The serial branch's first bag, typed int64: a literal 0 would compile each serial loop
#: once more (for a first bag of Literal[int](0)), 2-3 s at every cold start.
FIRST = np.int64(0)


@numba.njit(inline="always")
def pooled(loop, weight, indices, offsets, bags, extra, padding, plan, chunks, like):
    """One call of the serial ``loop`` (``extra``: the arguments it takes between the bag
    range and ``padding``, ``(scale,)`` or none): the output allocated, the prefetch
    planned, then the loop on the calling thread (``chunks`` 0) or over ``chunks`` runs
    of bags in parallel. Inlined into each entry, so each entry links its own loop."""
    out, bags = output(indices, offsets, bags, like)
    if bags <= 0:
        return out, bags
    ids = indices.shape[0]
    prefetch, step = trial_prefetch(plan, planned_prefetch(indices, plan), ids)
    began = cycles() if step != 0 else 0
    invalid = 0
    if chunks == 0:
        invalid = loop(weight, indices, offsets, FIRST, bags, *extra, padding, prefetch, out)
    else:
        chunks = min(chunks, bags)
        edges = split(offsets, bags, ids, chunks)
        for chunk in numba.prange(chunks):
            invalid += loop(weight, indices, offsets, edges[chunk], edges[chunk + 1], *extra,
                            padding, prefetch, out)
    if step != 0:
        trial_record(plan, step, cycles() - began, ids)
    return out, invalid


def _entries(stamp):
    # ``chunks``: 0 runs the serial loop on the calling thread, else the parallel loop
    # in that many runs of bags (the caller passes numba's thread count; reading it in
    # here would stop numba's cache). Each entry names its loop as a global: a loop
    # held in a closure would pickle differently in every process (see above).
    jit = numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)

    @jit
    def call_sum(weight, indices, offsets, bags, padding, plan, chunks, like):
        assert stamp
        return pooled(serial_sum, weight, indices, offsets, bags, (), padding, plan, chunks,
                      like)

    @jit
    def call_mean(weight, indices, offsets, bags, padding, plan, chunks, like):
        assert stamp
        return pooled(serial_mean, weight, indices, offsets, bags, (), padding, plan, chunks,
                      like)

    @jit
    def call_max(weight, indices, offsets, bags, padding, plan, chunks, like):
        assert stamp
        return pooled(serial_max, weight, indices, offsets, bags, (), padding, plan, chunks,
                      like)

    @jit
    def call_weighted(weight, indices, offsets, bags, scale, padding, plan, chunks, like):
        assert stamp
        return pooled(serial_weighted, weight, indices, offsets, bags, (scale,), padding,
                      plan, chunks, like)

    return {"sum": call_sum, "mean": call_mean, "max": call_max, "weighted": call_weighted}


#: ``{"sum", "mean", "max"}`` -> ``(weight, indices, offsets, bags, padding, plan,
#: chunks, like) -> (out, invalid)``; ``"weighted"`` takes ``scale`` after ``bags``.
CALLS = _entries(STAMP)


def new_plan(prefetch: int, hot_rows: int, table: StoredTable) -> np.ndarray:
    """A kernel's plan (see :data:`PLAN_SIZE`) for ``table``: ``prefetch`` ids ahead, at
    most ``hot_rows`` rows gathered unprefetched, the first call of ``REUSE_MIN_IDS`` ids
    or more counted; where float32 or float64 rows span more than the lead lines and a
    clock can time calls, the ``TRIAL_FIRST``-th call of ``TRIAL_MIN_IDS`` ids or more
    starts a prefetch trial."""
    # A row's first pass holds the whole row or 8 registers (MOST_VECTORS, 256 bytes or
    # more), so a row past the lead has a pass past it. Only rows stored as values: rows
    # the loops decode (float16, bfloat16, int8, int4) ran slower with the lead lines only
    # wherever they were (2 threads, Zipf 1.1, hot and cold: float16 and bfloat16 dim 128
    # 0.81-0.91x every line's speed, int8 dim 1,024 0.83x, float16 dim 1,024 0.98x), so a
    # trial there would only cost calls.
    tried = table.is_float and table.row_bytes > LEAD_LINES * LINE_BYTES
    plan = np.zeros(PLAN_SIZE, dtype=np.int64)
    plan[PLAN_PREFETCH], plan[PLAN_HOT_ROWS] = prefetch, hot_rows
    plan[PLAN_TUNABLE] = int(HAS_CYCLES and tried)
    plan[PLAN_UNTIL_TRIAL] = TRIAL_FIRST
    return plan


def build() -> dict[str, Any]:
    """:func:`numba_loops.build`'s loops, and ``"call_sum"``, ``"call_mean"``,
    ``"call_max"``, ``"call_weighted"`` (the entries), ``"planned_prefetch"``,
    ``"output"`` and ``"new_plan"``."""
    built = numba_loops.build()
    built.update({f"call_{name}": entry for name, entry in CALLS.items()})
    built["planned_prefetch"] = planned_prefetch
    built["output"] = output
    built["new_plan"] = new_plan
    return built
