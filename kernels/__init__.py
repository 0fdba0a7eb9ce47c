"""Compute only: pool bags of embedding rows. Imports numpy (and lazily numba/onnxruntime)."""

from kernels.base import COMPUTE_DTYPES, MODES, Kernel, Mode, TableSpec
from kernels.numpy_kernel import NumpyKernel
from kernels.select import BACKENDS, Backend, BackendError, make_kernel

__all__ = [
    "BACKENDS",
    "COMPUTE_DTYPES",
    "MODES",
    "Backend",
    "BackendError",
    "Kernel",
    "Mode",
    "NumpyKernel",
    "TableSpec",
    "make_kernel",
]
