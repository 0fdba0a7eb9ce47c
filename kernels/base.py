"""The compute contract shared by every kernel.

A kernel pools bags of rows of one embedding table. It sees only flat, already
validated arrays (the same layout as a flat serving batch):

- ``indices``: int64 ``[N]``, every id in ``[0, num_embeddings)``;
- ``offsets``: int64 ``[B + 1]``, ``offsets[0] == 0``, non-decreasing,
  ``offsets[-1] == N`` (bag ``b`` is ``indices[offsets[b]:offsets[b + 1]]``);
- ``per_sample_weights``: ``None`` or ``[N]`` in the table's compute dtype (sum mode only).

and returns a fresh ``(B, D)`` array in the table's compute dtype (float32 for float32
tables, float64 for float64 tables). Validation belongs to ``models``; kernels trust
their input so the hot path stays free of checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Mode = Literal["sum", "mean", "max"]
MODES: tuple[Mode, ...] = ("sum", "mean", "max")

#: Table dtypes every CPU kernel computes in directly.
COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

IndexArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class TableSpec:
    """One table and the pooling applied to it.

    Attributes:
        weight: ``(num_embeddings, embedding_dim)`` float32 or float64, C-contiguous
            (may be a read-only memory map).
        mode: ``"sum"``, ``"mean"`` or ``"max"``.
        padding_idx: a non-negative row id whose occurrences are skipped (they add
            nothing and do not count in the mean), or ``None``.
    """

    weight: FloatArray
    mode: Mode
    padding_idx: int | None = None

    @property
    def num_embeddings(self) -> int:
        return int(self.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])


@runtime_checkable
class Kernel(Protocol):
    """Pools flat bags; see the module docstring for the exact input contract."""

    #: Short name reported to users (``"numba"``, ``"numpy"``, ``"onnx"``).
    name: str
    #: Where it really runs (``"numba-cpu"``, ``"CUDAExecutionProvider"``, ...).
    provider: str
    spec: TableSpec

    def __call__(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        per_sample_weights: FloatArray | None = None,
    ) -> FloatArray:
        """Return the pooled ``(B, D)`` array for ``B = len(offsets) - 1`` bags."""
        ...
