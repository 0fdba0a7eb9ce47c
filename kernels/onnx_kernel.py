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
once; the CPU EP splits it into chunks of about 4 MB of gathered rows that run
concurrently on ``num_threads`` single-threaded sessions (faster here than onnxruntime's
own intra-op threads, and the thread count never changes results). Sessions are built
with ``session.disable_cpu_ep_fallback`` on CUDA, so a node without a CUDA kernel fails
at load instead of silently running on the CPU. onnxruntime-gpu without usable CUDA
libraries only logs an error and falls back to the CPU: that is detected, and
:attr:`OnnxKernel.provider` names the provider really running.

Precision: float32 and float64 tables accumulate in their own dtype; float16 tables halve
the memory and the gathered bytes, their rows are widened to float32 before the
reduction, so accumulation is float32 and only the stored values are rounded to fp16.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kernels.base import FloatArray, IndexArray, TableSpec
from kernels.onnx_graph import padded_model, with_sentinel

logger = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
DEVICES: tuple[Device, ...] = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


#: CPU EP: gathered bytes per run, small enough to stay in cache for the reduction.
_CPU_CHUNK_BYTES = 1 << 22


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
        session = _session(padded_model("sum", 4, np.float32), "cuda", device_id, None)
        table = np.ones((3, 4), np.float32)
        out = session.run(None, {"table": table, "ids": np.zeros((1, 2), np.int64)})[0]
        if not np.array_equal(out, np.ones((2, 4), np.float32)):
            return False, "CUDA EP returned wrong results in the self-test"
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return False, f"{CUDA} failed to start: {str(exc).strip().splitlines()[0][:300]}"
    return True, "ok"


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


class OnnxKernel:
    """EmbeddingBag on ONNX Runtime.

    Args:
        spec: the table and its pooling.
        device: ``"cuda"`` (fail if CUDA is not usable), ``"cpu"``, or ``"auto"`` (CUDA
            when usable, else the CPU EP).
        device_id: the CUDA device.
        num_threads: CPU EP: chunks run at once (``None``: twice the machine's cores; the
            gather waits on memory, and more rows in flight measured 1.6x faster than one
            chunk per core on these 2-core machines).
        table_dtype: store the table as ``float16`` (half the traffic; float32
            accumulation) or keep ``None`` (the spec's dtype).

    Raises:
        OnnxUnavailableError: onnxruntime missing, or ``device="cuda"`` and CUDA unusable.
        ValueError: an unknown device or table dtype.
    """

    name = "onnx"

    def __init__(self, spec: TableSpec, *, device: str = "auto", device_id: int = 0,
                 num_threads: int | None = None,
                 table_dtype: npt.DTypeLike | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        dtype = np.dtype(spec.weight.dtype if table_dtype is None else table_dtype)
        if dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(f"table_dtype must be float16, float32 or float64; got {dtype}")
        self.table_dtype = dtype
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
        self.device_id = device_id
        self.num_threads = num_threads or 2 * (os.cpu_count() or 1)
        self.provider = CUDA if self.device == "cuda" else CPU
        self._sentinel = spec.num_embeddings
        self._padding = spec.padding_idx
        host_table = with_sentinel(spec.weight, spec.mode, dtype)
        # The spec's weight becomes a view of the uploaded host table: one copy in RAM.
        self.spec = TableSpec(host_table[:-1] if dtype == spec.weight.dtype else spec.weight,
                              spec.mode, spec.padding_idx)
        ort = _ort()
        if self.device == "cuda":
            self._table = ort.OrtValue.ortvalue_from_numpy(host_table, "cuda", device_id)
        else:
            self._table = ort.OrtValue.ortvalue_from_numpy(host_table)
            self._host_table = host_table  # the OrtValue borrows this memory
        self._sessions: dict[bool, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        if self.device == "cpu" and self.num_threads > 1:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="onnx-cpu")
        self._session(False)  # build (and validate) the unweighted graph now

    def _session(self, weighted: bool) -> Any:
        with self._lock:
            if weighted not in self._sessions:
                model = padded_model(self.spec.mode, self.spec.embedding_dim,
                                     self.table_dtype, weighted=weighted)
                # CPU parallelism comes from concurrent chunks, one thread each.
                self._sessions[weighted] = _session(model, self.device, self.device_id, 1)
            return self._sessions[weighted]

    def __call__(self, indices: IndexArray, offsets: IndexArray,
                 per_sample_weights: FloatArray | None = None) -> FloatArray:
        num_bags = offsets.shape[0] - 1
        out = np.zeros((num_bags, self.spec.embedding_dim), dtype=self.compute_dtype)
        lengths = np.diff(offsets)
        row_bytes = self.spec.embedding_dim * self.table_dtype.itemsize
        chunks = []
        for bags in _buckets(lengths):
            step = bags.size
            if self.device == "cpu":
                step = max(1, _CPU_CHUNK_BYTES // (int(lengths[bags].max()) * row_bytes))
            chunks += [bags[start : start + step] for start in range(0, bags.size, step)]

        def pool(chunk: npt.NDArray[np.int64]) -> None:
            first, last = int(chunk[0]), int(chunk[-1])
            if last - first + 1 == chunk.size:  # consecutive bags: write rows in place
                self._run(indices, offsets[chunk], lengths[chunk], per_sample_weights,
                          out[first : last + 1])
            else:
                out[chunk] = self._run(indices, offsets[chunk], lengths[chunk],
                                       per_sample_weights)

        if self._pool is None or len(chunks) < 2:
            for chunk in chunks:
                pool(chunk)
        else:
            # list() re-raises the first failure of any chunk.
            list(self._pool.map(pool, chunks))
        return out

    def _run(self, indices: IndexArray, starts: IndexArray, lengths: IndexArray,
             per_sample_weights: FloatArray | None,
             target: FloatArray | None = None) -> FloatArray:
        """Pool bags of one bucket; rows go to ``target`` (a C-contiguous ``(B, D)`` view
        of the caller's output, CPU only) when given, else to a new array."""
        width = int(lengths.max())
        steps = np.arange(width, dtype=np.int64)[:, None]
        positions = starts[None, :] + steps  # [L, B]
        ragged = bool((lengths != width).any())
        inside = steps < lengths[None, :] if ragged else None
        ids = np.take(indices, positions, mode="clip")
        if inside is not None:
            ids[~inside] = self._sentinel
        if self._padding is not None:
            ids[ids == self._padding] = self._sentinel
        session = self._session(per_sample_weights is not None)
        binding = session.io_binding()
        binding.bind_ortvalue_input("table", self._table)
        binding.bind_cpu_input("ids", ids)
        if per_sample_weights is not None:
            weights = np.take(per_sample_weights, positions, mode="clip").astype(
                self.compute_dtype, copy=False)
            if inside is not None:
                weights[~inside] = 0
            binding.bind_cpu_input("weights", weights)
        if self.spec.mode != "sum":
            counts = (ids != self._sentinel).sum(axis=0).astype(self.compute_dtype)
            binding.bind_cpu_input("counts", counts)
        if self.device == "cuda":
            binding.bind_output("embeddings", "cuda", self.device_id)
        elif target is not None:
            # onnxruntime writes the rows straight into the caller's buffer: no copy.
            binding.bind_ortvalue_output("embeddings", _ort().OrtValue.ortvalue_from_numpy(target))
        else:
            binding.bind_output("embeddings")
        session.run_with_iobinding(binding)
        if target is not None and self.device == "cpu":
            return target
        result: FloatArray = binding.copy_outputs_to_cpu()[0]
        if target is not None:
            target[...] = result
        return result
