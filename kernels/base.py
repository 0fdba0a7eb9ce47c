"""The compute contract shared by every kernel.

A kernel pools bags of rows of one embedding table. It sees only flat, already
validated arrays (the same layout as a flat serving batch):

- ``indices``: int64 ``[N]``, every id in ``[0, num_embeddings)``;
- ``offsets``: int64 ``[B + 1]``, ``offsets[0] == 0``, non-decreasing,
  ``offsets[-1] == N`` (bag ``b`` is ``indices[offsets[b]:offsets[b + 1]]``);
- ``per_sample_weights``: ``None`` or ``[N]`` in the table's compute dtype (sum mode only).

and returns a fresh ``(B, D)`` array in the table's compute dtype (float64 for float64
tables, float32 for every other storage: see :mod:`kernels.storage`). Validation belongs
to ``models``; kernels trust their input so the hot path stays free of checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from kernels.storage import StoredTable

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
        table: the table in its storage form (a float32 or float64 ``(num_embeddings,
            embedding_dim)`` array is taken as it is, without a copy; it may be a
            read-only memory map).
        mode: ``"sum"``, ``"mean"`` or ``"max"``.
        padding_idx: a non-negative row id whose occurrences are skipped (they add
            nothing and do not count in the mean), or ``None``.
    """

    table: StoredTable
    mode: Mode
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        # Callers may pass a plain float array (typed as StoredTable for everyone else).
        table: Any = self.table
        if not isinstance(table, StoredTable):
            object.__setattr__(self, "table", StoredTable.of(np.asarray(table)))

    @property
    def weight(self) -> FloatArray:
        """The table as floats ``(num_embeddings, embedding_dim)``: the stored array for
        float32/float64 tables, a decoded copy for every other storage."""
        return self.table.to_float()

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        """The dtype of results and per-sample weights."""
        return self.table.compute_dtype

    @property
    def num_embeddings(self) -> int:
        return self.table.rows

    @property
    def embedding_dim(self) -> int:
        return self.table.dim


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
