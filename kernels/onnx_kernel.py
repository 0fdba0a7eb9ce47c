"""ONNX Runtime kernel: CUDA execution provider when it really works, CPU EP otherwise.

The table is appended a sentinel row (see :mod:`kernels.onnx_graph`) and uploaded once:
on CUDA it lives on the device as an ``OrtValue`` bound by IO binding on every call, so
only the ids (and weights) cross the bus; on the CPU the ``OrtValue`` wraps the NumPy
array without a copy. Bags are padded on the host; when one long bag would make the
padding more than double the work, bags are split into power-of-two length buckets, one
run each. Reducing ``[L, B, D]`` over axis 0 adds the rows of a bag in order, so
results are PyTorch's to the bit and never depend on which other bags share the batch
(``[B, L]`` over axis 1 measured 2x faster on the CPU EP but reorders the additions: a
bag's vector then changed with its batch, so it was dropped). CUDA runs each bucket at
once. The CPU EP cuts each bucket into ``num_threads`` shares, one run each on its own
single-threaded session, the calling thread running one of them; a share's run is a
``Scan`` over steps of about 1 MB of gathered rows, so each step is reduced while its
rows are still in the core's cache (faster here than onnxruntime's own intra-op threads
or one run per chunk from Python, and the thread count never changes results). Sessions
are built with ``session.disable_cpu_ep_fallback`` on CUDA, so a node without a CUDA
kernel fails at load instead of silently running on the CPU. onnxruntime-gpu without
usable CUDA libraries only logs an error and falls back to the CPU: that is detected,
and :attr:`OnnxKernel.provider` names the provider really running.

Precision: float32 and float64 tables accumulate in their own dtype; float16 tables halve
the memory and the gathered bytes, their rows are widened to float32 before the
reduction, so accumulation is float32 and only the stored values are rounded to fp16.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kernels.base import FloatArray, IndexArray, TableSpec
from kernels.onnx_graph import (
    element_types,
    padded_model,
    scanned_model,
    sentinel_value,
    with_sentinel,
)
from kernels.storage import StoredTable, float32_to_bfloat16

logger = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
#: One run: the bag numbers and their layout, ``(B,)`` (CUDA) or ``(steps, bags a step)``.
Task = tuple[npt.NDArray[np.int64], tuple[int, ...]]
DEVICES: tuple[Device, ...] = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


#: CPU EP: gathered bytes per Scan step, small enough to stay in a core's cache until the
#: step's reduction reads them back (1 MB measured best of 0.25-4 MB; per-step cost is
#: small, so the size barely matters between 0.5 and 2 MB).
_CPU_STEP_BYTES = 1 << 20

#: onnxruntime's CPU ReduceSum over a leading axis takes its vectorised path only for more
#: than 16 rows per thread; at 16 or fewer it runs a scalar strided loop, measured 4-8x
#: slower. Bags of 9-16 ids are padded to 17 rows with the (zero) sentinel row, whose
#: gathers hit the cache: 1.2-1.8x faster, same results. Below 9 ids the extra gathers
#: cost more than the slow loop (0.5-0.8x at 1-4 ids), so those stay as they are.
_CPU_FAST_SUM_LENGTHS = (9, 17)


class OnnxUnavailableError(RuntimeError):
    """onnxruntime (or onnx) is not importable, or CUDA was demanded and is not usable."""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise OnnxUnavailableError(f"onnxruntime is not importable: {exc}") from None
    return onnxruntime


@functools.lru_cache(maxsize=1)
def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN from the nvidia-* wheels when they exist."""
    ort = _ort()
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - best effort; the probe reports the result
            logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def _session(model: Any, device: Literal["cuda", "cpu"], device_id: int,
             num_threads: int | None) -> Any:
    """An InferenceSession on exactly ``device``; raises if CUDA cannot take every node."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    # Idle pool threads must not spin: they would steal the cores from the event loop
    # and from other kernels in the process (measured: 10x slower neighbours).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda":
        _preload_cuda_libraries()
        # Fail loudly if any node would fall back to the CPU (a missing CUDA kernel, or
        # the CUDA EP failing to load at all).
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers: list[Any] = [(CUDA, {"device_id": device_id})]
    else:
        providers = [CPU]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    if session.get_providers()[0] != (CUDA if device == "cuda" else CPU):
        raise OnnxUnavailableError(f"session runs on {session.get_providers()}, not {device}")
    return session


def _nvidia_driver() -> bool:
    """Whether the NVIDIA driver library loads (without it CUDA cannot work at all)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_status(device_id: int = 0) -> tuple[bool, str]:
    """Whether the CUDA EP really runs here, and why not: ``(usable, reason)``.

    Checked once per device by running a tiny graph with CPU fallback disabled; the
    driver is looked for first so machines without a GPU stay quiet.
    """
    return _cuda_status(int(device_id))


@functools.lru_cache(maxsize=8)
def _cuda_status(device_id: int) -> tuple[bool, str]:
    # The driver first: without it, onnxruntime is not even imported (it costs a worker
    # process tens of MB of private memory).
    if not _nvidia_driver():
        return False, "no NVIDIA driver (libcuda.so.1 does not load)"
    try:
        ort = _ort()
    except OnnxUnavailableError as exc:
        return False, str(exc)
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build has no {CUDA}"
    try:
        if not _self_test("cuda", device_id):
            return False, "CUDA EP returned wrong results in the self-test"
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return False, f"{CUDA} failed to start: {str(exc).strip().splitlines()[0][:300]}"
    return True, "ok"


def _self_test(device: Literal["cuda", "cpu"], device_id: int = 0) -> bool:
    """Whether the padded graph pools two ragged bags (``B`` != ``L``, so a layout
    mix-up shows) exactly on ``device``."""
    session = _session(padded_model("sum", 4, np.float32, sentinel=3), device, device_id,
                       None)
    table = np.arange(16, dtype=np.float32).reshape(4, 4)
    table[3] = 0  # the sentinel row
    feeds = {"table": table, "indices": np.array([0, 1, 1, 2, 2], np.int64),
             "starts": np.array([0, 3], np.int64), "lengths": np.array([3, 2], np.int64),
             "steps": np.arange(3, dtype=np.int64)}
    out = session.run(None, feeds)[0]
    return bool(np.array_equal(out, [table[0] + 2 * table[1], 2 * table[2]]))


def _buckets(lengths: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Bag numbers to run together; padding never more than doubles the gathered rows."""
    nonempty = np.flatnonzero(lengths)
    if nonempty.size == 0:
        return []
    real = int(lengths[nonempty].sum())
    if int(lengths.max()) * nonempty.size <= 2 * real:
        return [nonempty]
    width = np.left_shift(1, np.ceil(np.log2(lengths[nonempty])).astype(np.int64))
    return [nonempty[width == w] for w in np.unique(width)]


def _host_arrays(spec: TableSpec, dtype: np.dtype[Any] | None) -> dict[str, npt.NDArray[Any]]:
    """The graph's table inputs on the host, each with the sentinel row appended: ``table``
    (floats in ``dtype``, bfloat16 bits, or int8/int4 codes), for int8 and int4
    ``scales`` and ``biases`` (float32; the sentinel's codes and scale are 0 and its bias
    the neutral value, so it decodes to 0 or ``-inf``), and ``row_factors`` when the table
    has them."""
    arrays = _table_arrays(spec, dtype)
    if spec.table.row_scale is not None:  # the sentinel's factor: any, it decodes to 0/-inf
        arrays["row_factors"] = np.append(spec.table.row_scale, np.float32(1))
    return arrays


def _table_arrays(spec: TableSpec, dtype: np.dtype[Any] | None
                  ) -> dict[str, npt.NDArray[Any]]:
    table = spec.table
    if dtype is not None:
        return {"table": with_sentinel(table.data, spec.mode, dtype)}
    neutral = sentinel_value(spec.mode)
    if table.storage == "bfloat16":
        bits = float32_to_bfloat16(np.array([neutral], np.float32))
        data = np.empty((table.rows + 1, table.dim), np.uint16)
        data[:-1], data[-1] = table.data, bits[0]
        return {"table": data}
    stored_codes, pair = table.split(table.data)
    codes = np.zeros((table.rows + 1, stored_codes.shape[1]), np.uint8)
    codes[:-1] = stored_codes
    scales = np.append(pair[:, 0], np.float32(0))
    biases = np.append(pair[:, 1], np.float32(neutral))
    return {"table": codes, "scales": scales, "biases": biases}


class OnnxKernel:
    """EmbeddingBag on ONNX Runtime.

    Args:
        spec: the table and its pooling.
        device: ``"cuda"`` (fail if CUDA is not usable), ``"cpu"``, or ``"auto"`` (CUDA
            when usable, else the CPU EP).
        device_id: the CUDA device.
        num_threads: CPU EP: runs at once, one share of the batch each (``None``: the
            machine's cores; more measured 10-25% slower, as runs then share cores).
        table_dtype: store the table in the session as ``float16`` (half the traffic;
            float32 accumulation), or ``None``: as the spec stores it (float32, float64
            or float16).
        graph: ``"padded"`` (one run per bucket over ids ``[B, L]``), ``"scanned"`` (steps
            of a share that stay in cache, ``[C, L, b]``), or ``None``: padded on CUDA,
            scanned on the CPU EP. The CUDA graph runs on the CPU EP too, so machines
            without a GPU test it.

    Raises:
        OnnxUnavailableError: onnxruntime missing, or ``device="cuda"`` and CUDA unusable.
        ValueError: an unknown device or table dtype.
    """

    name = "onnx"

    def __init__(self, spec: TableSpec, *, device: str = "auto", device_id: int = 0,
                 num_threads: int | None = None,
                 table_dtype: npt.DTypeLike | None = None,
                 graph: Literal["padded", "scanned"] | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        if graph not in (None, "padded", "scanned"):
            raise ValueError(f"graph must be 'padded', 'scanned' or None; got {graph!r}")
        stored = spec.table.data
        storage = spec.table.storage
        if table_dtype is not None and not spec.table.is_float:
            raise ValueError(f"table_dtype applies to float32/float64 tables; this one is "
                             f"stored as {storage}")
        dtype = np.dtype(stored.dtype if table_dtype is None else table_dtype)
        if spec.table.is_float or storage == "float16":
            if dtype not in (np.float16, np.float32, np.float64):
                raise ValueError(f"table_dtype must be float16, float32 or float64; got "
                                 f"{dtype}")
            #: What the graph is built for: a NumPy dtype, or the storage's name.
            self.table_dtype: Any = dtype
        else:
            self.table_dtype = storage
        self.compute_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
        if device == "auto":
            usable, reason = cuda_status(device_id)
            if not usable:
                logger.info("ONNX Runtime on the CPU: %s", reason)
            device = "cuda" if usable else "cpu"
        elif device == "cuda":
            usable, reason = cuda_status(device_id)
            if not usable:
                raise OnnxUnavailableError(f"device='cuda' requested but CUDA is not usable: "
                                           f"{reason}")
        self.device: Literal["cuda", "cpu"] = "cuda" if device == "cuda" else "cpu"
        if storage == "bfloat16" and self.device == "cuda":
            # onnxruntime's Python API makes bfloat16 values on the host only.
            raise ValueError("bfloat16 tables run on the ONNX CPU EP or the CPU kernel, not "
                             "on CUDA: store the table as float16 there")
        self.device_id = device_id
        self.num_threads = num_threads or os.cpu_count() or 1
        self.provider = CUDA if self.device == "cuda" else CPU
        self._padded = graph == "padded" if graph else self.device == "cuda"
        self._sentinel = spec.num_embeddings
        self._padding = spec.padding_idx
        floats = not isinstance(self.table_dtype, str)  # the graph gathers floats
        self._row_bytes = (spec.embedding_dim * dtype.itemsize if floats
                           else spec.table.row_bytes)
        self.spec = spec
        host = _host_arrays(spec, dtype if floats else None)
        if floats and dtype == stored.dtype:
            # The spec's table becomes a view of the uploaded host table: one copy in RAM.
            self.spec = TableSpec(StoredTable(host["table"][:-1], storage, spec.embedding_dim,
                                              spec.table.row_scale),
                                  spec.mode, spec.padding_idx)
        ort = _ort()
        self._inputs: dict[str, Any] = {}
        for name, array in host.items():
            if name == "table" and storage == "bfloat16":
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    array, element_types("bfloat16")[0])
            elif self.device == "cuda":
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(array)
            self._inputs[name] = value
        self._host = host  # OrtValues on the CPU borrow this memory
        self._sessions: dict[bool, list[Any]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        if self.device == "cpu" and self.num_threads > 1:
            self._pool = ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="onnx-cpu")
        self._session(False)  # build (and validate) the unweighted graph now

    def _session(self, weighted: bool, worker: int = 0) -> Any:
        """The session of ``worker``. The CPU EP has one per concurrent share, so runs never
        share a session's allocator (measured 8% faster than one shared session); all of a
        variant's are built on its first use, so warm-up builds every one of them."""
        with self._lock:
            if weighted not in self._sessions:
                spec = self.spec
                scaled = spec.table.row_scale is not None
                model = (padded_model(spec.mode, spec.embedding_dim, self.table_dtype,
                                      sentinel=self._sentinel, padding_idx=self._padding,
                                      weighted=weighted, row_scaled=scaled)
                         if self._padded else
                         scanned_model(spec.mode, spec.embedding_dim, self.table_dtype,
                                       weighted=weighted, row_scaled=scaled))
                count = 1 if self.device == "cuda" else self.num_threads
                # CPU parallelism comes from concurrent shares, one thread each.
                self._sessions[weighted] = [
                    _session(model, self.device, self.device_id, 1) for _ in range(count)]
            return self._sessions[weighted][worker]

    def __call__(self, indices: IndexArray, offsets: IndexArray,
                 per_sample_weights: FloatArray | None = None) -> FloatArray:
        num_bags = offsets.shape[0] - 1
        lengths = np.diff(offsets)
        # Every non-empty bag's row is written by a run (straight into ``out`` where its
        # bags are consecutive): only the empty ones need zeros.
        out = np.empty((num_bags, self.spec.embedding_dim), dtype=self.compute_dtype)
        out[lengths == 0] = 0
        tasks = self._plan(lengths)
        flat = self._flat_inputs(indices, per_sample_weights) if self._padded and tasks else {}

        def run(task: Task, worker: int) -> None:
            bags, shape = task
            first = int(bags[0])
            # Consecutive bags that fill whole steps: rows go straight into ``out``.
            target = (out[first : first + bags.size]
                      if int(bags[-1]) - first + 1 == bags.size
                      and math.prod(shape) == bags.size else None)
            if self._padded:
                width = int(lengths[bags].max())
                feeds = {**flat, "starts": offsets[bags], "lengths": lengths[bags],
                         "steps": np.arange(width, dtype=np.int64)}
            else:
                feeds = self._feeds(indices, offsets[bags], lengths[bags], per_sample_weights,
                                    shape)
            rows = self._run(feeds, per_sample_weights is not None, shape, worker, target)
            if target is None:
                out[bags] = rows[: bags.size]

        # One job per worker, each draining the shared task list with its own session:
        # a thread handoff costs tens of microseconds on these VMs, so it happens once per
        # worker and call, never per chunk (a list iterator's next() is atomic under the GIL).
        queue = iter(tasks)

        def drain(worker: int) -> None:
            for task in queue:
                run(task, worker)

        # The calling thread is worker 0: one thread fewer to wake, none for one task.
        pool = self._pool
        helpers = [] if pool is None else [
            pool.submit(drain, worker) for worker in range(1, min(self.num_threads, len(tasks)))]
        try:
            drain(0)
        finally:
            for helper in helpers:
                helper.result()  # waits for every worker; re-raises a worker's failure
        return out

    def _plan(self, lengths: npt.NDArray[np.int64]) -> list[Task]:
        """Runs to make: ``(bag numbers, layout)``. Padded: one run per bucket, layout
        ``(B,)``. Scanned: each bucket cut into steps of about :data:`_CPU_STEP_BYTES` of
        gathered rows, the steps shared evenly among up to ``num_threads`` runs, layout
        ``(C, b)``: C steps of b bags, b chosen so the last step pads less than C bags."""
        row_bytes = self._row_bytes
        tasks: list[Task] = []
        for bags in _buckets(lengths):
            if self._padded:
                tasks.append((bags, (bags.size,)))
                continue
            width = self._width(int(lengths[bags].max()))
            per_step = max(1, _CPU_STEP_BYTES // (width * row_bytes))
            steps = -(-bags.size // per_step)
            shares = min(self.num_threads, steps)
            for share in np.array_split(bags, shares):
                share_steps = -(-share.size // per_step)
                tasks.append((share, (share_steps, -(-share.size // share_steps))))
        return tasks

    def _width(self, longest: int) -> int:
        """Rows to gather per bag for bags of at most ``longest`` ids."""
        low, fast = _CPU_FAST_SUM_LENGTHS
        if not self._padded and self.spec.mode != "max" and low <= longest < fast:
            return fast
        return longest

    def _flat_inputs(self, indices: IndexArray, per_sample_weights: FloatArray | None
                     ) -> dict[str, Any]:
        """The padded graph's per-call inputs: ``indices`` (and ``weights``) as they
        arrive, copied to the device once for all of the call's runs."""
        flat: dict[str, Any] = {"indices": indices}
        if per_sample_weights is not None:
            flat["weights"] = np.asarray(per_sample_weights, dtype=self.compute_dtype)
        if self.device == "cuda":
            ort = _ort()
            flat = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", self.device_id)
                    for name, value in flat.items()}
        return flat

    def _run(self, feeds: dict[str, Any], weighted: bool, shape: tuple[int, ...],
             worker: int, target: FloatArray | None) -> FloatArray:
        """One run over ``feeds`` (host arrays, or OrtValues already in place) laid out as
        ``shape``: returns ``(prod(shape), D)`` rows, the last ones pooling empty padding
        bags. Rows go to ``target`` (a C-contiguous view of the caller's output with
        exactly that many rows) when given: onnxruntime writes them there, from the
        device too, so no array is allocated and copied again."""
        session = self._session(weighted, worker)
        binding = session.io_binding()
        for name, value in self._inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        if target is not None:
            rows = target.reshape(*shape, self.spec.embedding_dim)
            binding.bind_ortvalue_output("embeddings", _ort().OrtValue.ortvalue_from_numpy(rows))
            session.run_with_iobinding(binding)
            return target
        if self.device == "cuda":
            binding.bind_output("embeddings", "cuda", self.device_id)
        else:
            binding.bind_output("embeddings")
        session.run_with_iobinding(binding)
        result: FloatArray = binding.copy_outputs_to_cpu()[0]
        return result.reshape(-1, self.spec.embedding_dim)

    def _feeds(self, indices: IndexArray, starts: IndexArray, lengths: IndexArray,
               per_sample_weights: FloatArray | None, shape: tuple[int, ...]
               ) -> dict[str, npt.NDArray[Any]]:
        """The scanned graph's ``ids`` ``[C, L, b]`` (and ``weights``, and ``counts``
        ``[C, b]``) for bags starting at ``starts``, padded with empty bags to ``shape``
        ``(C, b)``. Positions past a bag's end or holding ``padding_idx`` read the
        sentinel row; the caller's arrays are never written."""
        padding = math.prod(shape) - starts.size
        if padding:
            starts = np.concatenate((starts, np.zeros(padding, np.int64)))
            lengths = np.concatenate((lengths, np.zeros(padding, np.int64)))
        starts = starts.reshape(shape)
        lengths = lengths.reshape(shape)
        width = self._width(int(lengths.max()))
        steps = np.arange(width, dtype=np.int64)[:, None]
        ragged = bool((lengths != width).any())
        inside = steps < lengths[..., None, :] if ragged else None
        first = int(starts.flat[0])
        lay_out: Callable[[npt.NDArray[Any], npt.DTypeLike], npt.NDArray[Any]]
        if inside is None and int(starts.flat[-1]) - first == width * (starts.size - 1):
            # Consecutive bags of one length: their ids are one block of ``indices``,
            # transposed (a copy 4-10x cheaper than building positions and taking).
            block = slice(first, first + starts.size * width)

            def lay_out(values: npt.NDArray[Any], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
                rows = values[block].reshape(*starts.shape, width).swapaxes(-1, -2)
                # Always a copy: padding and sentinel ids are written into it, and a
                # single-step layout would otherwise be the caller's own ids.
                return np.array(rows, dtype=dtype, order="C")
        else:
            positions = starts[..., None, :] + steps  # [C, L, b]

            def lay_out(values: npt.NDArray[Any], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
                taken = np.take(values, positions, mode="clip")
                return taken.astype(dtype, copy=False)

        ids = lay_out(indices, np.int64)
        if inside is not None:
            ids[~inside] = self._sentinel
        if self._padding is not None:
            ids[ids == self._padding] = self._sentinel
        feeds: dict[str, npt.NDArray[Any]] = {"ids": ids}
        if per_sample_weights is not None:
            weights = lay_out(per_sample_weights, self.compute_dtype)
            if inside is not None:
                weights[~inside] = 0
            feeds["weights"] = weights
        if self.spec.mode != "sum":
            counts = (ids != self._sentinel).sum(axis=-2)
            feeds["counts"] = counts.astype(self.compute_dtype)
        return feeds
