"""The CPU kernels on their own: contract, chunking, threads, selection."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kernels import (
    BackendError,
    Kernel,
    NumpyKernel,
    TableSpec,
    make_kernel,
    numba_calls,
    numba_kernel,
    numba_tiles,
)
from kernels.numba_kernel import NumbaKernel
from kernels.numpy_kernel import padded_length

ROOT = Path(__file__).resolve().parents[2]


def _batch(rng: np.random.Generator, rows: int, bags: int, max_len: int
           ) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, max_len + 1, bags)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return rng.integers(0, rows, int(offsets[-1])).astype(np.int64), offsets


def test_padded_length_wastes_under_an_eighth() -> None:
    lengths = np.arange(0, 5000, dtype=np.int64)
    padded = padded_length(lengths)
    np.testing.assert_array_equal(padded[:17], lengths[:17])
    assert (padded >= lengths).all()
    assert ((padded - lengths)[1:] / lengths[1:] < 1 / 8).all()
    assert len(np.unique(padded)) < 120


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 7])
def test_numpy_and_numba_agree_bit_for_bit(mode: str, padding_idx: int | None) -> None:
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((500, 48)).astype(np.float32)
    # Long bags cross the NumPy kernel's chunk boundary; lengths 0..300 hit many buckets.
    indices, offsets = _batch(rng, 500, 200, 300)
    indices[::3] = 7
    spec = TableSpec(weight, mode, padding_idx)  # type: ignore[arg-type]
    np.testing.assert_array_equal(NumpyKernel(spec)(indices, offsets),
                                  NumbaKernel(spec)(indices, offsets))


def test_kernels_return_fresh_float_arrays_of_table_dtype() -> None:
    weight = np.ones((4, 3), np.float64)
    for kernel in (NumpyKernel(TableSpec(weight, "sum")), NumbaKernel(TableSpec(weight, "sum"))):
        assert isinstance(kernel, Kernel)
        out = kernel(np.array([0, 1], np.int64), np.array([0, 2], np.int64))
        assert out.dtype == np.float64 and out.shape == (1, 3)
        np.testing.assert_array_equal(out, [[2.0, 2.0, 2.0]])
        empty = kernel(np.zeros(0, np.int64), np.zeros(1, np.int64))
        assert empty.shape == (0, 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads: int) -> None:
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((300, 16)).astype(np.float32)
    indices, offsets = _batch(rng, 300, 100, 40)
    spec = TableSpec(weight, "mean")
    np.testing.assert_array_equal(NumbaKernel(spec, num_threads=threads)(indices, offsets),
                                  NumpyKernel(spec)(indices, offsets))


def test_bad_thread_count_is_named() -> None:
    with pytest.raises(ValueError, match=r"num_threads must be in \[1, \d+\]; got 0"):
        NumbaKernel(TableSpec(np.ones((2, 2), np.float32), "sum"), num_threads=0)


def test_the_cheap_thread_count_follows_numbas_in_every_thread() -> None:
    import numba

    _, count = numba_kernel.thread_control(None)
    before = numba.get_num_threads()
    try:
        for threads in (1, before, 1):
            numba.set_num_threads(threads)
            assert count() == numba.get_num_threads() == threads
        with ThreadPoolExecutor(1) as pool:  # another thread has numba's default
            assert pool.submit(count).result() == pool.submit(numba.get_num_threads).result()
    finally:
        numba.set_num_threads(before)


def test_concurrent_calls_from_threads_are_independent() -> None:
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((1000, 32)).astype(np.float32)
    batches = [_batch(rng, 1000, 64, 50) for _ in range(16)]
    for kernel in (NumpyKernel(TableSpec(weight, "sum")), NumbaKernel(TableSpec(weight, "sum"))):
        expected = [kernel(i, o) for i, o in batches]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b, k=kernel: k(*b), batches))
        for one, other in zip(expected, got, strict=True):
            np.testing.assert_array_equal(one, other)


def test_make_kernel_picks_the_fused_loop_and_honours_fused_false() -> None:
    spec = TableSpec(np.ones((2, 2), np.float32), "sum")
    assert make_kernel(spec).name == "numba"  # "auto" is tested beside the CUDA checks
    assert make_kernel(spec, fused=False).name == "numpy"
    with pytest.raises(BackendError, match="backend must be one of numpy, onnx, auto; got 'gpu'"):
        make_kernel(spec, "gpu")


@pytest.mark.parametrize("backend", ["numba", "numpy", "onnx"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_a_bags_vector_does_not_depend_on_its_batch(backend: str, mode: str) -> None:
    rng = np.random.default_rng(14)
    weight = rng.standard_normal((1000, 64)).astype(np.float32)
    spec = TableSpec(weight, mode)  # type: ignore[arg-type]
    kernel = (make_kernel(spec, "onnx", device="cpu") if backend == "onnx"
              else make_kernel(spec, fused=backend == "numba"))
    ids = rng.integers(0, 1000, 20).astype(np.int64)
    alone = kernel(ids, np.array([0, 20], np.int64))
    for extra in (1, 21, 33, 200, 900):
        others = rng.integers(0, 1000, extra).astype(np.int64)
        batch = kernel(np.concatenate([others, ids]),
                       np.array([0, extra, extra + 20], np.int64))
        np.testing.assert_array_equal(batch[1], alone[0])


def test_bags_weigh_in_the_serial_or_parallel_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Short bags cost their bounds and output rows besides their ids: 2,048 one-id bags
    # of 64-byte rows weigh as much as 6,144 ids, and are shared out.
    weighed: list[tuple[int, int]] = []
    original = numba_kernel.runs_serially

    def spy(units: int, gathered_bytes: int) -> bool:
        weighed.append((units, gathered_bytes))
        return original(units, gathered_bytes)

    monkeypatch.setattr(numba_kernel, "runs_serially", spy)
    weight = np.ones((100, 16), np.float32)  # rows of 64 bytes, one line
    kernel = NumbaKernel(TableSpec(weight, "sum"))
    ids = np.arange(2048, dtype=np.int64) % 100
    out = kernel(ids, np.arange(2049, dtype=np.int64))
    np.testing.assert_array_equal(out, np.ones((2048, 16), np.float32))
    bag_bytes = numba_kernel.BAG_BYTES
    assert weighed == [(2048, 2048 * 64 + 2048 * bag_bytes)]
    assert original(2048, 2048 * 64) and not original(2048, 2048 * (64 + bag_bytes))


@pytest.mark.parametrize("parallel_min_bytes", [0, 1 << 40])
# -16: 16 ids ahead, only each pass's first numba_tiles.LEAD_LINES lines.
@pytest.mark.parametrize("prefetch", [0, 1, 16, -16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
# 40 columns: one pass of 5 registers; 300: 4 passes of 8 registers, then 5 and a
# masked tail of 4 lanes.
@pytest.mark.parametrize("dim", [40, 300])
def test_serial_parallel_and_prefetch_paths_give_the_same_results(
        monkeypatch: pytest.MonkeyPatch, parallel_min_bytes: int, prefetch: int,
        mode: str, dim: int) -> None:
    monkeypatch.setattr(numba_kernel, "PARALLEL_MIN_BYTES", parallel_min_bytes)
    rng = np.random.default_rng(14)
    weight = rng.standard_normal((2000, dim)).astype(np.float32)
    indices, offsets = _batch(rng, 2000, 200, 30)
    spec = TableSpec(weight, mode)  # type: ignore[arg-type]
    kernel = NumbaKernel(spec)
    kernel._plan[numba_calls.PLAN_PREFETCH] = prefetch
    np.testing.assert_array_equal(kernel(indices, offsets), NumpyKernel(spec)(indices, offsets))
    if mode == "sum":
        weights = rng.standard_normal(indices.size).astype(np.float32)
        np.testing.assert_allclose(kernel(indices, offsets, weights),
                                   NumpyKernel(spec)(indices, offsets, weights), rtol=1e-5,
                                   atol=1e-5)


def test_reused_counts_distinct_ids_exactly() -> None:
    from kernels import numba_loops

    rng = np.random.default_rng(3)
    for distinct in (0, 1, 2, 17, 1000):
        values = rng.choice(np.arange(-5, 1 << 40, 7919, dtype=np.int64), distinct,
                            replace=False)
        ids = rng.permutation(np.tile(values, 3))
        for most in (0, max(distinct - 1, 0), distinct, distinct + 1, 4 * distinct):
            assert numba_loops.reused(ids, most) == (distinct <= most), (distinct, most)
    # Ids that collide in the set's slots: equal low bits, and the extremes of int64.
    strided = np.arange(0, 1 << 30, 1 << 20, dtype=np.int64)
    assert numba_loops.reused(np.tile(strided, 4), strided.size)
    assert not numba_loops.reused(np.tile(strided, 4), strided.size - 1)
    extremes = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max] * 5)
    assert numba_loops.reused(extremes, 4) and not numba_loops.reused(extremes, 3)


def test_prefetching_stops_while_few_rows_repeat_and_results_stay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel skips prefetching after a call that gathers at most its plan's hot rows
    (distinct rows) ``REUSE_USES`` times or more each, counted again every
    ``REUSE_EVERY`` calls of ``REUSE_MIN_IDS`` ids or more (smaller calls neither
    count nor move the countdown); results never depend on it."""
    monkeypatch.setattr(numba_kernel, "cache_bytes", lambda level, default: 1 << 20)
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((5000, 64)).astype(np.float32)  # 1.3 MB: prefetched
    spec = TableSpec(weight, "sum")
    kernel, reference = NumbaKernel(spec), NumpyKernel(spec)
    plan = kernel._plan
    assert plan[numba_calls.PLAN_PREFETCH] > 0
    assert plan[numba_calls.PLAN_HOT_ROWS] == 1024  # a quarter of 1 MiB / 256 B

    def call(ids: np.ndarray) -> None:
        offsets = np.append(np.arange(0, ids.size, 8, dtype=np.int64), ids.size)
        np.testing.assert_array_equal(kernel(ids, offsets), reference(ids, offsets))

    hot = rng.permutation(np.repeat(rng.choice(5000, 1000, replace=False), 8))
    spread = rng.integers(0, 5000, 4096)
    call(hot)
    assert plan[numba_calls.PLAN_HOT]
    call(hot[:200])  # too few ids to count
    for _ in range(numba_calls.REUSE_EVERY - 1):
        call(spread)
        assert plan[numba_calls.PLAN_HOT]  # not counted again yet
    call(spread)
    assert not plan[numba_calls.PLAN_HOT]
    # Rows used 8 times but more of them than a quarter of the L2 holds: prefetched.
    plan[numba_calls.PLAN_UNTIL_COUNT] = 0
    call(rng.permutation(np.repeat(rng.choice(5000, 1100, replace=False), 8)))
    assert not plan[numba_calls.PLAN_HOT]
    # Few rows used fewer than 8 times each: prefetched.
    plan[numba_calls.PLAN_UNTIL_COUNT] = 0
    call(rng.permutation(np.repeat(rng.choice(5000, 500, replace=False), 7)))
    assert not plan[numba_calls.PLAN_HOT]


def test_a_prefetch_trial_times_both_choices_and_keeps_the_faster() -> None:
    """A kernel whose passes read more than ``LEAD_LINES`` lines prefetches every line
    until its ``TRIAL_FIRST``-th call of ``TRIAL_MIN_IDS`` ids or more (smaller calls and
    calls that prefetch nothing neither count nor move the countdown), then times
    ``2 * TRIAL_CALLS`` such calls, alternating the lead lines only and every line; it
    keeps the lead lines only when their median call beat every line's by more than
    1/32, and tries again ``TRIAL_EVERY`` calls later. Results never depend on it."""
    from kernels.numba_calls import (
        PLAN_LEAD_ONLY,
        PLAN_PREFETCH,
        PLAN_TRIAL_STEP,
        PLAN_TRIAL_TIMES,
        PLAN_TUNABLE,
        PLAN_UNTIL_TRIAL,
        TRIAL_CALLS,
        TRIAL_EVERY,
        TRIAL_FIRST,
        TRIAL_MIN_IDS,
        trial_record,
    )

    lanes = numba_tiles.VECTOR_BYTES // 4
    # 50 registers: passes of 12 (WIDE_VECTORS), 384 or 768 bytes, past the lead's 128.
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((1000, 50 * lanes)).astype(np.float32)
    spec = TableSpec(weight, "sum")
    kernel, reference = NumbaKernel(spec), NumpyKernel(spec)
    plan = kernel._plan
    assert plan[PLAN_PREFETCH] > 0
    assert plan[PLAN_TUNABLE] == int(numba_tiles.HAS_CYCLES)
    assert plan[PLAN_LEAD_ONLY] == 0  # every line until a trial says otherwise
    if not numba_tiles.HAS_CYCLES:  # no clock here: no trial ever starts
        return

    def call(ids: int) -> None:
        indices = rng.integers(0, 1000, ids)
        offsets = np.arange(0, ids + 1, 8, dtype=np.int64)
        np.testing.assert_array_equal(kernel(indices, offsets), reference(indices, offsets))

    call(TRIAL_MIN_IDS - 8)
    assert plan[PLAN_TRIAL_STEP] == 0 and plan[PLAN_UNTIL_TRIAL] == TRIAL_FIRST
    for until in range(TRIAL_FIRST - 1, 0, -1):
        call(TRIAL_MIN_IDS)
        assert plan[PLAN_TRIAL_STEP] == 0 and plan[PLAN_UNTIL_TRIAL] == until
    times = plan[PLAN_TRIAL_TIMES:]
    assert times.size == 2 * TRIAL_CALLS and not times.any()
    for step in range(1, 2 * TRIAL_CALLS):
        call(TRIAL_MIN_IDS)
        assert plan[PLAN_TRIAL_STEP] == step + 1
        assert (times[:step] > 0).all() and not times[step:].any()
    call(TRIAL_MIN_IDS)
    assert plan[PLAN_TRIAL_STEP] == 0 and plan[PLAN_UNTIL_TRIAL] == TRIAL_EVERY
    lead, every = np.median(times[0::2]), np.median(times[1::2])
    assert plan[PLAN_LEAD_ONLY] == int(lead * 32 < every * 31)
    call(TRIAL_MIN_IDS)
    assert plan[PLAN_UNTIL_TRIAL] == TRIAL_EVERY - 1
    plan[PLAN_PREFETCH] = 0  # nothing prefetched: nothing to try
    plan[PLAN_UNTIL_TRIAL] = 1
    call(TRIAL_MIN_IDS)
    assert plan[PLAN_TRIAL_STEP] == 0 and plan[PLAN_UNTIL_TRIAL] == 1
    plan[PLAN_PREFETCH] = 16
    for lead_only in (0, 1):  # kept either way, the results are the same
        plan[PLAN_LEAD_ONLY] = lead_only
        call(2 * TRIAL_MIN_IDS)

    # The decision: medians, so no one call decides (a call slowed by a neighbour, or
    # sped up by rows the call before left in the caches); the lead lines must win by
    # more than 1/32; a step already taken is ignored.
    last = 2 * TRIAL_CALLS
    lucky, unlucky = [10] + [100] * (TRIAL_CALLS - 1), [100] * (TRIAL_CALLS - 1) + [9000]
    for lead_times, every_times, keeps in (
            (lucky, [101] * TRIAL_CALLS, 0),  # one fast call, the rest no faster
            ([96] * TRIAL_CALLS, unlucky, 1),  # every line's one slow call ignored
            ([96] * TRIAL_CALLS, [100] * TRIAL_CALLS, 1),
            ([97] * TRIAL_CALLS, [100] * TRIAL_CALLS, 0)):  # not by more than 1/32
        for step in range(1, last):
            spent = (lead_times if step % 2 else every_times)[(step - 1) // 2]
            plan[PLAN_TRIAL_STEP] = step
            trial_record(plan, step, spent * 2, 2048)  # cycles per 1,024 ids: spent
        assert plan[PLAN_TRIAL_STEP] == last
        trial_record(plan, last - 1, 1, 1024)  # a step already taken: ignored
        assert plan[PLAN_TRIAL_STEP] == last and times[last - 2] == lead_times[-1]
        trial_record(plan, last, every_times[-1], 1024)
        assert plan[PLAN_LEAD_ONLY] == keeps, (lead_times, every_times)
        assert plan[PLAN_TRIAL_STEP] == 0 and plan[PLAN_UNTIL_TRIAL] == TRIAL_EVERY


@pytest.mark.parametrize(("storage", "dim", "past_lead"), [
    ("float32", 32, False), ("float32", 33, True), ("float32", 64, True),
    ("float64", 16, False), ("float64", 17, True),
    ("float16", 500, False), ("bfloat16", 65, False), ("int8", 4096, False),
    ("int4", 4096, False)])
def test_only_passes_past_the_lead_lines_are_tried(storage: str, dim: int,
                                                   past_lead: bool) -> None:
    """A trial only where a pass's values span more than the lead's 128 bytes, on rows
    stored as values: float32 rows of 33 values or more, float64 of 17 (in registers of
    either width: a pass of 8 AVX2 registers already reads 256 bytes); never on rows the
    loops decode, whose lead lines alone measured slower everywhere."""
    from kernels.numba_calls import PLAN_TUNABLE, new_plan
    from kernels.storage import store

    table = store(np.ones((4, dim), np.float32), storage)  # type: ignore[arg-type]
    tried = numba_tiles.HAS_CYCLES and past_lead
    assert new_plan(16, 1024, table)[PLAN_TUNABLE] == int(tried)


@pytest.mark.parametrize("storage", ["float32", "float64", "float16", "bfloat16", "int8",
                                     "int4"])
def test_every_pass_shape_matches_the_numpy_kernel(storage: str) -> None:
    """Dims 1 to 9 registers and a bit reach every pass the loops compile: 0 to 8 whole
    registers with and without a masked tail, alone and after full passes of 8 (float64
    rows have half the lanes, so more passes); dims past 48 registers the passes of 12
    and what they leave (9 to 12 registers, with and without a tail); in registers of
    this machine's width (8 float32 lanes, or 16 with AVX-512); each on a table that
    starts 16 bytes past a cache line (as NumPy's large arrays do), prefetching and not
    (float32: with and without ``padding_idx``)."""
    from kernels.storage import store

    rng = np.random.default_rng(21)
    exact = storage in ("float32", "float64")
    lanes = numba_tiles.VECTOR_BYTES // 4
    wide = [lanes * registers // 2 for registers in (97, 98, 101, 115, 120, 121, 125, 190)]
    for dim in (*range(1, 9 * lanes + 5), *wide):
        dtype = np.float64 if storage == "float64" else np.float32
        raw = np.empty(40 * dim + 4, dtype)
        weight = raw[16 // raw.itemsize:][:40 * dim].reshape(40, dim)
        weight[:] = rng.standard_normal((40, dim))
        table = store(weight, storage)  # type: ignore[arg-type]
        indices, offsets = _batch(rng, 40, 9, 6)
        indices[::4] = 3
        weights = rng.standard_normal(indices.size).astype(dtype)
        for mode in ("sum", "mean", "max"):
            # float32's odd dims skip row 3: the loops with the padding compare too (other
            # storages' padded loops are the golden tests'; each loop costs ~1 s to compile).
            padding = 3 if storage == "float32" and dim % 2 else None
            spec = TableSpec(table, mode, padding)  # type: ignore[arg-type]
            kernel, reference = NumbaKernel(spec), NumpyKernel(spec)
            kernel._plan[numba_calls.PLAN_PREFETCH] = dim % 5 - 2  # -2: lead lines only
            for scale in (None, weights) if mode == "sum" else (None,):
                got, want = kernel(indices, offsets, scale), reference(indices, offsets, scale)
                if exact and scale is None:
                    np.testing.assert_array_equal(got, want, err_msg=f"{mode} dim {dim}")
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                               err_msg=f"{mode} dim {dim}")


@pytest.mark.parametrize("storage", ["float32", "float64", "int8"])
def test_a_loop_writes_only_its_own_rows_though_it_stores_tails_whole(storage: str) -> None:
    """A row's last register is stored whole onto the rows the same loop writes next (the
    tail's spare lanes): over bags ``[first, last)`` the rows outside stay untouched
    (parallel chunks are such ranges), every row inside is right, an invalid bag's row
    zero, for dims from below one register (several rows take one tail's spill) to
    passes of 8 with a tail, and whole registers alone (16, 48, 64: bag loops of their
    own for float32); float64 rows have 4 lanes."""
    from kernels.storage import store

    rng = np.random.default_rng(31)
    for dim in (1, 2, 3, 5, 7, 9, 12, 16, 20, 48, 50, 64, 100, 150, 260):
        dtype = np.float64 if storage == "float64" else np.float32
        table = store(rng.standard_normal((30, dim)).astype(dtype), storage)  # type: ignore[arg-type]
        indices, offsets = _batch(rng, 30, 24, 5)
        valid = indices.copy()
        bad = int(offsets[6])  # an id outside the table, when bag 6 holds any
        if offsets[7] > bad:
            indices[bad] = 30
        weights = rng.standard_normal(indices.size).astype(dtype)
        for name in ("sum", "mean", "max", "weighted"):
            mode = "sum" if name == "weighted" else name
            spec = TableSpec(table, mode)  # type: ignore[arg-type]
            kernel = NumbaKernel(spec)
            scale = weights if name == "weighted" else None
            want = NumpyKernel(spec)(valid, offsets, scale)
            if offsets[7] > bad:
                want[6] = 0
            loop = kernel._loops[name][True]  # the serial loop over [first, last)
            ids = numba_kernel._read_only(indices)
            starts = numba_kernel._read_only(offsets)
            extra = (numba_kernel._read_only(scale),) if scale is not None else ()
            for first, last in ((0, 24), (3, 4), (5, 11), (6, 7), (11, 24), (23, 24)):
                out = np.full((24, dim), np.nan, want.dtype)
                loop(kernel._table, ids, starts, first, last, *extra, None, 0, out)
                assert np.isnan(out[:first]).all() and np.isnan(out[last:]).all(), (
                    f"{name} dim {dim}: wrote outside bags [{first}, {last})")
                np.testing.assert_allclose(out[first:last], want[first:last], rtol=1e-5,
                                           atol=1e-5, err_msg=f"{name} dim {dim}")


@pytest.mark.parametrize("parallel_min_bytes", [0, 1 << 40])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "weighted"])
# Bag loops of their own: a tail alone (4); 1 and 3 whole AVX-512 registers (16, 48; 2
# and 6 with AVX2); a register and a tail (20). Then whole registers and a tail (100: one
# pass with AVX-512, two with AVX2).
@pytest.mark.parametrize("dim", [4, 16, 20, 48, 100])
def test_pool_counts_bags_with_bad_ids_or_bounds_and_zeroes_them(
        monkeypatch: pytest.MonkeyPatch, parallel_min_bytes: int, mode: str, dim: int
        ) -> None:
    monkeypatch.setattr(numba_kernel, "PARALLEL_MIN_BYTES", parallel_min_bytes)
    weight = np.arange(10 * dim, dtype=np.float32).reshape(10, dim) + 1
    pooling = "sum" if mode == "weighted" else mode
    kernel = NumbaKernel(TableSpec(weight, pooling))  # type: ignore[arg-type]
    ids = np.array([1, 2, 10, 3, -1, 4, 5, 2**62], np.int64)
    scale = np.linspace(0.5, 2, 8, dtype=np.float32) if mode == "weighted" else None
    # Bags: [1, 2] ok, [10] bad, [3] ok, [-1] bad, [4, 5] ok, [2**62] bad.
    out, invalid = kernel.pool(ids, np.array([0, 2, 3, 4, 5, 7, 8], np.int64), 6, scale)
    assert invalid == 3
    np.testing.assert_array_equal(out[[1, 3, 5]], 0)
    kept = [0, 1, 3, 5, 6]
    good = NumpyKernel(TableSpec(weight, pooling))(  # type: ignore[arg-type]
        ids[kept], np.array([0, 2, 3, 5], np.int64), None if scale is None else scale[kept])
    np.testing.assert_allclose(out[[0, 2, 4]], good, rtol=1e-6)
    # A good id and a bad one in one bag: the good row is pooled, then the bag zeroed.
    out, invalid = kernel.pool(ids[[0, 1, 2, 5]], np.array([0, 1, 3], np.int64), 3,
                               None if scale is None else scale[[0, 1, 2, 5]])
    assert invalid == 1
    np.testing.assert_array_equal(out[1], 0)
    single = weight[[1, 4]] if scale is None else weight[[1, 4]] * scale[[0, 5], None]
    np.testing.assert_allclose(out[[0, 2]], single, rtol=1e-6)
    # Starts (B entries): a start past the next one or past the ids is a bad bag.
    _, invalid = kernel.pool(ids[:2], np.array([0, 2, 1], np.int64), 3)
    assert invalid == 1
    _, invalid = kernel.pool(ids[:2], np.array([0, 3], np.int64), 2)
    assert invalid == 2
    with pytest.raises(ValueError, match="must be validated first"):
        kernel(ids, np.array([0, 8], np.int64))


def test_outputs_start_on_a_line_and_only_mid_sized_aligned_ones_stream() -> None:
    from kernels import numba_loops

    for bags, dim in ((1, 1), (3, 12), (100, 64), (8192, 64)):
        kernel = NumbaKernel(TableSpec(np.ones((10, dim), np.float32), "sum"))
        out = kernel(np.zeros(bags, np.int64), np.arange(bags + 1, dtype=np.int64))
        assert out.ctypes.data % 64 == 0, (bags, dim)

    def output(nbytes: int, dim: int, past_line: int = 0) -> np.ndarray:
        block = np.empty(nbytes // 4 + 32, np.float32)
        start = (-block.ctypes.data) % 64 // 4 + past_line // 4
        return block[start:start + nbytes // 4].reshape(-1, dim)

    most = numba_loops.STREAM_BELOW
    assert numba_loops.streams(output(2 << 20, 64))
    assert numba_loops.streams(output(most - 256, 64))
    assert not numba_loops.streams(output(1 << 20, 64))  # fits the L2
    assert not numba_loops.streams(output(most, 64))  # mapped afresh by glibc
    assert not numba_loops.streams(output(2 << 20, 64, past_line=16))
    assert not numba_loops.streams(output(12 << 20, 12))  # 48-byte rows


@pytest.mark.parametrize("parallel_min_bytes", [0, 1 << 40])
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streamed_outputs_hold_the_same_results(
        monkeypatch: pytest.MonkeyPatch, parallel_min_bytes: int, mode: str,
        dtype: str) -> None:
    """Outputs of 2 MiB and more go past the caches (numba_loops.streams): every bag,
    empty, padded, ragged or invalid, still lands right, serially and in parallel."""
    from kernels import numba_loops

    monkeypatch.setattr(numba_kernel, "PARALLEL_MIN_BYTES", parallel_min_bytes)
    rng = np.random.default_rng(41)
    dim = 64 if dtype == "float32" else 32
    bags = numba_loops.STREAM_FROM // (dim * np.dtype(dtype).itemsize)
    weight = rng.standard_normal((500, dim)).astype(dtype)
    indices, offsets = _batch(rng, 500, bags, 3)
    scale = rng.standard_normal(indices.size).astype(dtype) if mode == "weighted" else None
    pooling = "sum" if mode == "weighted" else mode
    spec = TableSpec(weight, pooling, padding_idx=7)  # type: ignore[arg-type]
    want = NumpyKernel(spec)(indices, offsets, scale)
    kernel = NumbaKernel(spec, num_threads=2)
    got = kernel(indices, offsets, scale)
    assert numba_loops.streams(got)
    if scale is None:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bad = int(np.argmax(np.diff(offsets) > 0))  # a bag holding an id
    broken = indices.copy()
    broken[offsets[bad]] = 500
    out, invalid = kernel.pool(broken, offsets, bags, scale)
    assert invalid == 1
    np.testing.assert_array_equal(out[bad], 0)
    np.testing.assert_array_equal(np.delete(out, bad, 0), np.delete(got, bad, 0))


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_parallel_split_gives_every_bag_to_exactly_one_chunk(chunks: int) -> None:
    from kernels import numba_loops

    rng = np.random.default_rng(15)
    lengths = rng.geometric(0.05, 40) - 1
    lengths[7] = 5000  # one bag holds most of the ids
    ragged = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    garbage = rng.integers(-100, 10_000, 41).astype(np.int64)  # unsorted, negative
    for offsets in (ragged, garbage, ragged[:-1]):
        total = int(ragged[-1])
        edges = numba_loops.split(offsets, 40, total, chunks)
        assert edges[0] == 0 and edges[-1] == 40 and len(edges) == chunks + 1
        assert (np.diff(edges) >= 0).all()
    # Valid offsets: no chunk holds more than its share plus the one bag on its edge.
    edges = numba_loops.split(ragged, 40, int(ragged[-1]), chunks)
    work = ragged[edges[1:]] - ragged[edges[:-1]] + np.diff(edges)
    assert work.max() <= (ragged[-1] + 40) / chunks + lengths.max() + 1


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_parallel_path_on_one_huge_bag_among_empty_ones(
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(numba_kernel, "PARALLEL_MIN_BYTES", 0)
    rng = np.random.default_rng(16)
    weight = rng.standard_normal((3000, 24)).astype(np.float32)
    lengths = np.zeros(50, np.int64)
    lengths[[0, 49]] = 1
    lengths[20] = 4000
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = rng.integers(0, 3000, int(offsets[-1])).astype(np.int64)
    spec = TableSpec(weight, mode)  # type: ignore[arg-type]
    np.testing.assert_array_equal(NumbaKernel(spec, num_threads=2)(indices, offsets),
                                  NumpyKernel(spec)(indices, offsets))


def test_a_thread_sets_from_how_many_bytes_its_calls_run_in_parallel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_kernel, "PARALLEL_MIN_BYTES", 0)
    rng = np.random.default_rng(17)
    weight = rng.standard_normal((300, 16)).astype(np.float32)
    indices, offsets = _batch(rng, 300, 64, 20)
    kernel = NumbaKernel(TableSpec(weight, "sum"), num_threads=2)  # type: ignore[arg-type]
    chosen: list[bool] = []
    call = kernel._call
    assert call is not None

    def spy(*args: object) -> object:
        chosen.append(args[-2] == 0)  # chunks: 0 runs serially
        return call(*args)

    monkeypatch.setattr(kernel, "_call", spy)
    expected = NumpyKernel(TableSpec(weight, "sum"))(indices, offsets)  # type: ignore[arg-type]
    gathered = indices.shape[0] * 8  # int64 ids: 8 bytes each at least
    for least, serial in ((None, True), (gathered * 100, True), (1, False)):
        with ThreadPoolExecutor(1, initializer=numba_kernel.parallel_from_here,
                                initargs=(least,)) as thread:
            assert thread.submit(numba_kernel.parallel_min_bytes).result() == least
            np.testing.assert_array_equal(thread.submit(kernel, indices, offsets).result(),
                                          expected)
        assert chosen.pop() is serial
    assert numba_kernel.parallel_min_bytes() == 0  # this thread keeps the module's value
    np.testing.assert_array_equal(kernel(indices, offsets), expected)
    assert chosen == [False]


def test_the_avx2_tiles_on_a_cpu_with_avx512(tmp_path: Path) -> None:
    """Where the CPU has AVX-512 the tiles use 64-byte registers and every other test
    here runs those; the 32-byte tiles other x86 CPUs run are checked too, by the pass
    tests above in a process whose numba compiles for this CPU without AVX-512."""
    if numba_tiles.VECTOR_BYTES != 64:
        pytest.skip("no AVX-512 here: the suite already runs the 32-byte tiles")
    from numba.core import codegen

    features = ",".join("-" + flag[1:] if flag[1:].startswith(("avx512", "evex512", "amx"))
                        else flag for flag in codegen.get_host_cpu_features().split(","))
    # The child is a session of its own: without the parent's xdist worker variables,
    # which plugins such as pytest-benchmark read (and warn about: an error here).
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env.update(NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    check = subprocess.run(
        [sys.executable, "-c", "from kernels import numba_tiles; "
         "assert numba_tiles.VECTOR_BYTES == 32, numba_tiles.VECTOR_BYTES"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         __file__, "-k", "every_pass_shape or writes_only_its_own_rows or "
         "serial_parallel_and_prefetch or (streamed_outputs and float32)"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout, tests.stdout[-2000:]
