"""Backend selection: turn a backend name into a ready kernel for one table."""

from __future__ import annotations

import logging
from typing import Literal

from kernels import numba_kernel
from kernels.base import Kernel, TableSpec
from kernels.numpy_kernel import NumpyKernel

logger = logging.getLogger(__name__)

Backend = Literal["numpy", "onnx", "auto"]
BACKENDS: tuple[Backend, ...] = ("numpy", "onnx", "auto")


class BackendError(ValueError):
    """A backend was named that does not exist or cannot run here."""


def make_kernel(
    spec: TableSpec,
    backend: str = "numpy",
    *,
    fused: bool | None = None,
    num_threads: int | None = None,
) -> Kernel:
    """Build the kernel for ``spec`` on ``backend``.

    Args:
        spec: the table and its pooling.
        backend: ``"numpy"`` (CPU arrays: the fused numba loop when numba imports, else
            pure NumPy), ``"onnx"`` or ``"auto"`` (the fastest correct backend here).
        fused: force (``True``) or forbid (``False``) the numba loop on the CPU path;
            ``None`` uses it when available.
        num_threads: CPU threads per call for the fused loop (``None``: all cores).

    Raises:
        BackendError: unknown backend, or ``fused=True`` without numba.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "onnx":
        raise BackendError("backend 'onnx' is not available in this build")
    return _cpu_kernel(spec, fused, num_threads)


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
