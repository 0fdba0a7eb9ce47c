"""One compiled pass that accepts a valid call's ids and offsets.

:func:`models.inputs.flatten_inputs` calls :func:`valid_csr` first: for a valid call it
returns the kernel's ``[B + 1]`` offsets after one pass over the ids (range) and one over
the offsets (start, order, end), in compiled code; the NumPy checks it replaces took
five to ten array passes and ~20 us of per-call overhead. For anything invalid it returns
``None`` and the caller runs the NumPy checks, which find the first problem and word the
error. Compiled on first use (see :mod:`kernels.jit`); without numba the NumPy checks
do everything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.jit import AVAILABLE, compiled


@compiled
def _in_range(ids: Any, num_embeddings: int) -> bool:
    # One branch-free pass (an OR of unsigned compares vectorises; an early exit would
    # not): a negative id is a huge unsigned one.
    limit = np.uint64(num_embeddings)
    bad = False
    for position in range(ids.shape[0]):
        bad |= np.uint64(ids[position]) >= limit
    return not bad


@compiled
def _check(ids: Any, offsets: Any, num_embeddings: int, include_last_offset: bool,
           csr: Any) -> bool:
    if not _in_range(ids, num_embeddings):
        return False
    count = offsets.shape[0]
    if count == 0 or offsets[0] != 0:
        return False
    previous = 0
    for bag in range(count):
        start = offsets[bag]
        if start < previous:
            return False
        csr[bag] = start
        previous = start
    if include_last_offset:
        return bool(previous == ids.shape[0])
    if previous > ids.shape[0]:
        return False
    csr[count] = ids.shape[0]
    return True


def available() -> bool:
    """Whether the compiled check can run here (numba imports)."""
    return AVAILABLE


def valid_csr(ids: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64],
              num_embeddings: int, include_last_offset: bool
              ) -> npt.NDArray[np.int64] | None:
    """``[B + 1]`` int64 offsets when 1-D ``ids`` and ``offsets`` form a valid call.

    Args:
        ids: int64 ``[N]`` ids.
        offsets: int64 1-D bag starts (``[B + 1]`` with ``include_last_offset``).
        num_embeddings: ids must be in ``[0, num_embeddings)``.
        include_last_offset: whether ``offsets`` already ends with ``N``.

    Returns ``None`` when anything is invalid (the caller words the error), so this never
    raises for bad input.
    """
    if offsets.ndim != 1:
        return None
    size = offsets.shape[0] if include_last_offset else offsets.shape[0] + 1
    csr = np.empty(max(size, 1), dtype=np.int64)
    if not _check(ids, offsets, num_embeddings, include_last_offset, csr):
        return None
    return offsets if include_last_offset else csr


def ids_in_range(ids: npt.NDArray[np.int64], num_embeddings: int) -> bool:
    """Whether every id of the int64 array ``ids`` (any shape) is in ``[0, num_embeddings)``."""
    return bool(_in_range(ids.reshape(-1), num_embeddings))
