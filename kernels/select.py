"""Backend selection: turn a backend name into a ready kernel for one table."""

from __future__ import annotations

import logging
from typing import Literal

from kernels import numba_kernel
from kernels.base import Kernel, TableSpec
from kernels.numpy_kernel import NumpyKernel

logger = logging.getLogger(__name__)

Backend = Literal["numpy", "onnx", "auto"]
#: Storages ``auto`` sends to ONNX Runtime on CUDA: where it beat the CPU kernel in some
#: measured cell (float32: large calls of cold rows; BENCHMARKS.md, GPU). Half and
#: quantized tables ran faster on the CPU kernel in every cell, even float16 (the CPU
#: reads half the bytes; CUDA's cost is not the bytes). The graphs serve every storage,
#: bfloat16 on the CPU EP only.
AUTO_CUDA_STORAGES = ("float32", "float64")
BACKENDS: tuple[Backend, ...] = ("numpy", "onnx", "auto")


class BackendError(ValueError):
    """A backend was named that does not exist or cannot run here."""


def make_kernel(
    spec: TableSpec,
    backend: str = "numpy",
    *,
    device: str = "auto",
    fused: bool | None = None,
    num_threads: int | None = None,
) -> Kernel:
    """Build the kernel for ``spec`` on ``backend``.

    Args:
        spec: the table and its pooling.
        backend: ``"numpy"`` (CPU arrays: the fused numba loop when numba imports, else
            pure NumPy), ``"onnx"`` (ONNX Runtime) or ``"auto"`` (ONNX Runtime on CUDA
            when CUDA really works here and serves the table's storage, else the fastest
            CPU kernel, the numba loop).
        device: for ``"onnx"``: ``"auto"``, ``"cuda"`` (fail without CUDA) or ``"cpu"``.
        fused: force (``True``) or forbid (``False``) the numba loop on the CPU path;
            ``None`` uses it when available.
        num_threads: CPU threads per call (``None``: the library's default).

    Raises:
        BackendError: unknown backend, a backend that cannot run here, or an option
            that does not apply to it.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        from kernels.onnx_kernel import cuda_status

        usable, reason = cuda_status()
        if usable and spec.table.storage not in AUTO_CUDA_STORAGES:
            usable, reason = False, (f"{spec.table.storage} tables ran faster on the CPU "
                                     "kernel than on CUDA (BENCHMARKS.md)")
        if usable:
            backend = "onnx"
        else:
            logger.info("backend 'auto' uses the CPU kernel: %s", reason)
            backend = "numpy"
    if backend == "onnx":
        return _onnx_kernel(spec, device, num_threads)
    return _cpu_kernel(spec, fused, num_threads)


def _onnx_kernel(spec: TableSpec, device: str, num_threads: int | None) -> Kernel:
    from kernels.onnx_kernel import OnnxKernel, OnnxUnavailableError

    try:
        return OnnxKernel(spec, device=device, num_threads=num_threads)
    except (OnnxUnavailableError, ValueError) as exc:
        raise BackendError(str(exc)) from None


def _cpu_kernel(spec: TableSpec, fused: bool | None, num_threads: int | None) -> Kernel:
    if fused is None:
        fused = numba_kernel.available()
        if not fused:
            logger.warning("numba is not importable: using the slower pure NumPy kernel")
    if not fused:
        return NumpyKernel(spec)
    if not numba_kernel.available():
        raise BackendError("fused=True needs numba, which is not importable here")
    return numba_kernel.NumbaKernel(spec, num_threads=num_threads)
