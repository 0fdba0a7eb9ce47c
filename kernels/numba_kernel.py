"""Fused CPU kernel compiled by numba: gather and pool in one pass over the ids.

Each bag is pooled straight into its output row with the register tiles of
:mod:`kernels.numba_tiles`: accumulators stay in SIMD registers across the whole bag, so
every gathered table row is read once and nothing else moves. Bags run in parallel
(``prange``) when a call is big enough to pay for waking the thread pool, serially
otherwise. Inside a bag ids are added strictly in order, which is PyTorch's accumulation
order, so results match ``torch.nn.functional.embedding_bag`` bit for bit on float32
tables. Each tile prefetches its lines of the row ``PREFETCH_AHEAD`` ids ahead, fewer for
wide rows of a table that fits the L2 caches, none for a table that fits one core's
(see :func:`prefetch_distance`) nor while a kernel's calls gather few rows many times
each (see :data:`kernels.numba_calls.REUSE_USES`); where a float32 or float64 row part
spans more than two lines, only its first two when timed calls find that faster (rows in
the caches: see :data:`kernels.numba_calls.TRIAL_CALLS`). A call reaches the loops
through one compiled entry (:mod:`kernels.numba_calls`). The loops release the GIL so
the service can run them in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from kernels.base import FloatArray, IndexArray, TableSpec
from kernels.caches import cache_bytes
from kernels.storage import StoredTable

logger = logging.getLogger(__name__)

#: Calls gathering fewer bytes than this run on the calling thread: waking the pool costs
#: more than the second core gives back (see BENCHMARKS.md, small calls).
PARALLEL_MIN_BYTES = 256 << 10
#: ... where a row counts at least one cache line: an id costs a line's fetch and its own
#: loop trip however short its row (int8/int4 dim 16 and float32 dim 8 rows of 12-32
#: bytes: two threads won from ~4,000 ids hot and cold, where bytes alone kept them serial
#: up to 8,000-20,000 ids, 0.74-0.89x torch's quantized op at 256 bags).
LINE_BYTES = 64
#: What a bag weighs in that choice besides its ids: its bounds and its output row cost
#: about two short rows' gathering whatever the row width. Measured (2 threads, Zipf 1.1,
#: bags of 1-2 ids on average, serial against parallel): two threads win from ~16 us of
#: serial work, which ids alone misjudged both ways (dim 16: 1,536-2,048 one-id bags ran
#: serially, 23-31 us against 19-24 in parallel; counting a bag as one more row, dim 64:
#: 512 one-id bags ran in parallel, 13.9 us against 12.2); this weight sorts all 11
#: measured calls (BENCHMARKS.md, thirteenth pass).
BAG_BYTES = 128
#: How many ids ahead a row is prefetched (FBGEMM's default distance; 8 measured slower
#: on short bags, whose next rows belong to the next bags; 24-48 no better).
PREFETCH_AHEAD = 16
#: Tables up to this size stay in a core's L1 and L2 caches: no prefetching.
_PREFETCH_MIN_TABLE_BYTES = 128 << 10
#: Tables up to this size fit the cores' L2 caches: rows are prefetched about this many
#: bytes ahead instead (wide rows prefetched 16 ids ahead evict each other; see
#: BENCHMARKS.md, prefetch distance).
_L2_TABLE_BYTES = 1 << 20
_L2_PREFETCH_BYTES = 4 << 10
#: Short rows are prefetched twice as far ahead from tables past the L2: each holds fewer
#: lines in flight, so more rows fit the core's miss buffers. Short: at most two lines, or
#: three for quantized rows, whose decoding makes each row's trip longer. Measured (cold,
#: 16 vs 32 ahead, same process): float32 dim 16/32 +5-16%, int8 dim 16 1.07-1.13 ->
#: 1.38-1.51x torch's quantized op, int8 dim 128 and int4 dim 64 +2-21%; float32 dim 48
#: (three lines) -3-7% and rows of four lines or more (float16 dim 128, float32 dim
#: 64-128) as fast or slower, so they stay at 16.
_SHORT_ROW_LINES = 2
_SHORT_QUANTIZED_ROW_LINES = 3

#: The rows a call may gather unprefetched (see :data:`kernels.numba_calls.REUSE_USES`)
#: fill at most this share of the L2 cache.
_REUSE_L2_SHARE = 4

_compile_lock = threading.Lock()
_compiled: dict[str, Any] | None = None


def available() -> bool:
    """Whether numba imports on this machine (the kernel is then usable)."""
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _kernels() -> dict[str, Any]:
    global _compiled
    with _compile_lock:
        if _compiled is None:
            from kernels import numba_calls  # imports numba and compiles on first use

            _compiled = numba_calls.build()
        return _compiled


#: The array view each storage's rows reach the loops as: the view's dtype tells them how
#: to decode (:mod:`kernels.numba_decode` reads this table). float16 goes as int16 (numba
#: does not type float16 arrays on every version), int4 as int8 to keep it apart from
#: int8 rows.
VIEWS: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
    "float16": np.dtype(np.int16), "bfloat16": np.dtype(np.uint16),
    "int8": np.dtype(np.uint8), "int4": np.dtype(np.int8)}


def prefetch_distance(table_bytes: int, row_bytes: int, quantized: bool = False) -> int:
    """How many ids ahead the loops prefetch rows for a table (0: not at all);
    ``quantized``: int8/int4 rows (see :data:`_SHORT_ROW_LINES`)."""
    if table_bytes <= _PREFETCH_MIN_TABLE_BYTES:
        return 0
    if table_bytes <= _L2_TABLE_BYTES:
        return max(1, min(PREFETCH_AHEAD, _L2_PREFETCH_BYTES // row_bytes))
    lines = _SHORT_QUANTIZED_ROW_LINES if quantized else _SHORT_ROW_LINES
    return 2 * PREFETCH_AHEAD if row_bytes <= lines * LINE_BYTES else PREFETCH_AHEAD


def table_prefetch(table: StoredTable) -> int:
    """:func:`prefetch_distance` for a stored table."""
    return prefetch_distance(table.nbytes, table.row_bytes, table.storage in ("int8", "int4"))


def id_bytes(table: StoredTable) -> int:
    """What one id of ``table`` costs in the serial-or-parallel choice (see
    :data:`LINE_BYTES`)."""
    return max(table.row_bytes, LINE_BYTES)


def _read_only(array: Any) -> Any:
    """A read-only view: numba compiles one specialisation per mix of writable and
    read-only arguments (~1 s each), so tables (memory-mapped ones are read-only) always
    reach the loops read-only; the per-call inputs go writable (see :func:`_writable`).
    (Always a view: checking the flag first costs more than the view, 0.6 us against
    0.36.)"""
    view = array.view()
    view.setflags(write=False)
    return view


def _writable(array: Any) -> Any:
    """``array`` itself when it is writable, else a writable copy: the per-call inputs
    (ids, offsets, weights; the collection kernel's too) always reach the loops
    writable, so numba compiles one specialisation for them (the loops never write
    them). Writable, because numba types a read-only array through its Python fallback:
    a read-only view of each input cost the API 4-5 us a call right after a large call
    (1.7 us the views, the rest typing); read-only inputs are rare (``np.frombuffer`` of
    a request body) and their copy is a memcpy of 8 bytes an id against the row bytes
    the loop gathers for it."""
    return array if array.flags.writeable else array.copy()


class _ThreadState(threading.local):
    """Per-thread kernel settings; the class holds the defaults, so reading one a thread
    never set is a plain attribute lookup (``getattr`` with a default raised and caught
    an AttributeError: 0.64 us a call, a ninth of a one-bag call)."""

    #: Set by :func:`parallel_from_here`; unset (-1): :data:`PARALLEL_MIN_BYTES`, read
    #: at each call.
    parallel_min_bytes: int | None = -1
    #: The thread count this thread last gave numba (None: never set).
    threads: int | None = None


_thread_state = _ThreadState()


def parallel_from_here(min_bytes: int | None) -> None:
    """From now on, kernels called from this thread run their parallel loops only for
    calls gathering at least ``min_bytes`` of rows (``None``: never), instead of
    :data:`PARALLEL_MIN_BYTES`. For servers: a parallel loop waits at its end for every
    thread it woke, so on a busy host (other processes on the cores) a 50-us call can
    take a scheduler time slice, and two threads that each start parallel loops make
    libgomp's workers sleep between calls."""
    _thread_state.parallel_min_bytes = min_bytes


def parallel_min_bytes() -> int | None:
    """The bytes from which this thread's kernel calls run in parallel (None: never)."""
    value = _thread_state.parallel_min_bytes
    return PARALLEL_MIN_BYTES if value == -1 else value


def runs_serially(units: int, gathered_bytes: int) -> bool:
    """Whether a call of ``units`` bags (or samples) whose work weighs ``gathered_bytes``
    (its rows gathered, each at least :data:`LINE_BYTES`, plus :data:`BAG_BYTES` a bag
    where the caller counts bags) runs serially on this thread: a single unit, a thread
    that never runs parallel loops, or fewer bytes than its :func:`parallel_min_bytes`."""
    least = parallel_min_bytes()
    return units == 1 or least is None or gathered_bytes < least


def call_threads(num_threads: int | None, get_threads: Any, set_threads: Any) -> int:
    """The threads a parallel loop gets for this call: numba's count, or ``num_threads``
    set for the calling thread (numba keeps it per thread). Set only when this thread's
    last setting differs: ``set_num_threads`` costs 1.5 us, a tenth of a 256-bag call of
    short rows. (Code calling ``numba.set_num_threads`` directly can leave the remembered
    value stale; the loops then run their chunks on numba's count, same results.)"""
    if num_threads is None:
        count: int = get_threads()
        return count
    if _thread_state.threads != num_threads:
        set_threads(num_threads)
        _thread_state.threads = num_threads
    return num_threads


class _ThreadCount:
    """numba's thread count for the calling thread, read cheaply.

    ``numba.get_num_threads()`` first makes sure numba's threads are launched, under a
    process-wide lock: 2.1 us a call here, paid by every parallel call of a kernel built
    without ``num_threads`` (the public API's default). Once they are launched, numba's
    own reader behind it answers the same in 0.5 us, so the first call goes through the
    public function (which launches the threads, as before: never earlier, so a server's
    parent process still forks without threads) and later calls read directly. A numba
    without that reader keeps the public function."""

    def __init__(self) -> None:
        self._read: Any = None

    def __call__(self) -> int:
        read = self._read
        if read is not None:
            count: int = read()
            return count
        import numba
        from numba.np.ufunc import parallel

        count = numba.get_num_threads()
        direct = getattr(parallel, "_get_num_threads", None)  # bound by the launch
        self._read = (direct if callable(direct) and direct() == count
                      else numba.get_num_threads)
        return count


_thread_count = _ThreadCount()


def thread_control(num_threads: int | None) -> tuple[Any, Any]:
    """numba's ``(set_num_threads, get_num_threads)`` (the latter read cheaply: see
    :class:`_ThreadCount`), after checking ``num_threads``.

    Raises:
        ImportError: numba is not installed.
        ValueError: ``num_threads`` is not in ``[1, numba.config.NUMBA_NUM_THREADS]``.
    """
    import numba

    limit = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if num_threads is not None and not 1 <= num_threads <= limit:
        raise ValueError(f"num_threads must be in [1, {limit}]; got {num_threads}")
    return numba.set_num_threads, _thread_count


class NumbaKernel:
    """Fused, parallel CPU kernel (the default CPU path).

    Args:
        spec: the table and its pooling.
        num_threads: threads used per call (``None``: numba's default, all cores).

    Raises:
        ImportError: numba is not installed.
        ValueError: ``num_threads`` is not in ``[1, numba.config.NUMBA_NUM_THREADS]``.
    """

    name = "numba"
    provider = "numba-cpu"

    def __init__(self, spec: TableSpec, num_threads: int | None = None) -> None:
        self._set_threads, self._get_threads = thread_control(num_threads)
        self.spec = spec
        self.num_threads = num_threads
        self._loops = _kernels()
        table = spec.table
        self._table = _read_only(table.data.view(VIEWS[table.storage]))
        self._dtype = table.compute_dtype
        #: The result's dtype and width, for the entries to allocate it by.
        self._like = np.empty((0, spec.embedding_dim), dtype=self._dtype)
        self._id_bytes = id_bytes(table)
        #: How far ahead the loops prefetch and whether the rows are cache-resident: an
        #: array the compiled entries update (see kernels.numba_calls.PLAN_SIZE).
        hot_rows = cache_bytes(2, 1 << 20) // _REUSE_L2_SHARE // self._id_bytes
        self._plan = self._loops["new_plan"](table_prefetch(table), hot_rows, table)
        # None compiles loops with no padding compare at all (see numba_tiles._Tile).
        self._padding = spec.padding_idx
        #: max_norm's factor per row (float16/bfloat16/int4 tables): pooled as weights.
        self._row_scale = table.row_scale
        #: The entries a call goes through in one dispatch; None where the row factors
        #: make every call a scaled one (see _pool_scaled).
        plain = self._row_scale is None
        self._call = self._loops[f"call_{spec.mode}"] if plain else None
        self._call_weighted = (self._loops["call_weighted"] if plain and spec.mode == "sum"
                               else None)

    def __call__(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        per_sample_weights: FloatArray | None = None,
    ) -> FloatArray:
        out, invalid = self.pool(indices, offsets, offsets.shape[0] - 1, per_sample_weights)
        if invalid < 0:
            raise ValueError("offsets must start at 0 and end at len(indices): the kernel's "
                             "input must be validated first")
        if invalid:
            raise ValueError(f"{invalid} bag(s) hold ids outside [0, "
                             f"{self.spec.num_embeddings}) or bad offsets: the kernel's input "
                             "must be validated first")
        return out

    def pool(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        num_bags: int,
        per_sample_weights: FloatArray | None = None,
    ) -> tuple[FloatArray, int]:
        """Pool ``num_bags`` bags, checking every id and bag bound on the way.

        Args:
            indices: C-contiguous int64 ``[N]`` ids, not yet range-checked.
            offsets: C-contiguous int64 ``[B + 1]`` CSR offsets (the last ``N``), or
                ``[B]`` bag starts (the last bag runs to ``N``); the first 0.
            num_bags: ``B``.
            per_sample_weights: ``None`` or C-contiguous ``[N]`` in the table dtype (sum
                mode).

        Returns ``(out, invalid)``: the ``(B, D)`` result and how many bags had an id
        outside ``[0, num_embeddings)`` or a start past their end or past ``N`` (those rows
        are zeros; the caller reports the error); or an empty array and -1 when
        ``offsets`` is empty, does not start at 0, or (``B + 1`` of them) does not end at
        ``N``. Never reads outside the table.
        """
        indices, offsets = _writable(indices), _writable(offsets)
        if runs_serially(num_bags, indices.shape[0] * self._id_bytes + num_bags * BAG_BYTES):
            chunks = 0
        else:
            chunks = call_threads(self.num_threads, self._get_threads, self._set_threads)
        if per_sample_weights is None:
            call = self._call
            if call is not None:
                return call(self._table, indices, offsets, num_bags,  # type: ignore[no-any-return]
                            self._padding, self._plan, chunks, self._like)
        else:
            call = self._call_weighted
            if call is not None:
                return call(self._table, indices, offsets, num_bags,  # type: ignore[no-any-return]
                            _writable(per_sample_weights), self._padding, self._plan,
                            chunks, self._like)
        return self._pool_scaled(indices, offsets, num_bags, per_sample_weights, chunks)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) every loop a call can reach: serial and
        parallel, unweighted and, in sum mode, weighted, and the distinct-id count."""
        ids = np.zeros(4, dtype=np.int64)
        offsets = np.array([0, 2, 4], dtype=np.int64)
        plan = self._plan.copy()  # a count on 4 ids must not mark the table hot
        self._loops["planned_prefetch"](np.zeros(512, dtype=np.int64), plan)
        weights = np.ones(4, dtype=self._dtype) if self.spec.mode == "sum" else None
        for chunks in (0, 2):
            for scale in (None, weights) if weights is not None else (None,):
                if self._call is None:
                    self._pool_scaled(ids, offsets, 2, scale, chunks)
                elif scale is None:
                    self._call(self._table, ids, offsets, 2, self._padding, plan, chunks,
                               self._like)
                else:
                    self._call_weighted(self._table, ids, offsets, 2, scale,  # type: ignore[misc]
                                        self._padding, plan, chunks, self._like)

    def _pool_scaled(self, indices: IndexArray, offsets: IndexArray, num_bags: int,
                     per_sample_weights: FloatArray | None, chunks: int
                     ) -> tuple[FloatArray, int]:
        """:meth:`pool` for tables with row factors (each id weighs its row's factor
        times its own weight: a weighted sum, a weighted sum divided by the count for
        mean, a max of scaled rows), and weights outside sum mode; ``chunks`` as the
        entries take it."""
        out, num_bags = self._loops["output"](indices, offsets, num_bags, self._like)
        if num_bags <= 0:
            return out, num_bags
        prefetch = self._loops["planned_prefetch"](indices, self._plan)
        scale = per_sample_weights
        if self._row_scale is not None:
            factors = np.take(self._row_scale, indices, mode="clip")
            scale = factors if scale is None else factors * scale
        mode = self.spec.mode
        loop = self._loops[("scaled_max" if mode == "max" else "weighted")
                           if scale is not None else mode]
        bags = (0, num_bags) if chunks == 0 else (num_bags, min(chunks, num_bags))
        extra = () if scale is None else (_writable(scale),)
        invalid = loop[chunks == 0](self._table, indices, offsets, *bags, *extra,
                                    self._padding, prefetch, out)
        if scale is not None and mode == "mean":
            out /= self._counts(indices, offsets, num_bags)[:, None]
        return out, int(invalid)

    def _counts(self, indices: IndexArray, offsets: IndexArray, num_bags: int
                ) -> FloatArray:
        """Each bag's ids that are not ``padding_idx``, at least 1 (the mean's divisor;
        an empty bag's zeros stay zeros)."""
        ends = (offsets[1:] if offsets.shape[0] > num_bags
                else np.append(offsets[1:], indices.shape[0]))
        counts = ends - offsets[:num_bags]
        if self._padding is not None:
            padded = np.flatnonzero(indices == self._padding)
            # (Clipped: offsets not yet validated must not make bincount fail; such bags
            # are reported invalid anyway.)
            bags = np.clip(np.searchsorted(offsets[:num_bags], padded, side="right") - 1,
                           0, num_bags - 1)
            counts = counts - np.bincount(bags, minlength=num_bags)
        divisors: FloatArray = np.maximum(counts, 1).astype(self._dtype)
        return divisors
