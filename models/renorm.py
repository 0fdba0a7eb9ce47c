"""``max_norm``: scale rows whose norm exceeds a bound, as ``torch.embedding_renorm_``."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kernels.storage import StoredTable

#: Rows renormalised per step: bounds the temporary memory on large tables.
_ROWS_PER_STEP = 1 << 16


def row_norms(rows: npt.NDArray[np.floating], norm_type: float) -> npt.NDArray[np.float64]:
    """The ``norm_type``-norm of each row of a ``(R, D)`` array, computed in float64.

    ``norm_type`` follows ``torch.norm``: ``inf`` is the largest magnitude, ``-inf`` the
    smallest, ``0`` counts non-zero entries, any other ``p`` is ``sum(|x|^p)^(1/p)``.
    """
    return np.asarray(np.linalg.norm(rows.astype(np.float64, copy=False), ord=norm_type,
                                     axis=1), dtype=np.float64)


def renormed(weight: npt.NDArray[np.floating], max_norm: float,
             norm_type: float) -> npt.NDArray[np.floating]:
    """Return a copy of ``weight`` whose rows have ``norm_type``-norm at most ``max_norm``.

    Rows over the bound are scaled by ``max_norm / (norm + 1e-7)`` (PyTorch's factor);
    the others are copied unchanged. Applying it twice changes nothing, so doing it once
    at load time is the same as PyTorch's per-forward renorm of the looked-up rows.
    The caller's array is never modified.
    """
    out = np.array(weight, copy=True, order="C")
    for start in range(0, out.shape[0], _ROWS_PER_STEP):
        block = out[start : start + _ROWS_PER_STEP]
        norms = row_norms(block, norm_type)
        over = norms > max_norm
        if over.any():
            scale = (max_norm / (norms[over] + 1e-7)).astype(out.dtype)
            block[over] *= scale[:, None]
    return out


def renormed_table(table: StoredTable, max_norm: float, norm_type: float) -> StoredTable:
    """``table`` with :func:`renormed` rows, in the same storage.

    float32/float64 rows are renormed as they are (a copy); int8 rows by scaling their
    scale and bias (exact up to one rounding of each). float16, bfloat16 and int4 rows
    would be rounded again if stored renormed (int4 keeps its scale in float16), so they
    stay as they are and the table gets PyTorch's factor per row (``row_scale``, 1 where
    the norm is within bounds), applied to each decoded row as it is pooled: the same
    values as renorming the widened table, for 4 bytes a row.
    """
    if table.is_float:
        return StoredTable(renormed(table.data, max_norm, norm_type), table.storage,
                           table.dim)
    if table.storage != "int8":
        factors = np.ones(table.rows, np.float32)
        for start, block in table.blocks(_ROWS_PER_STEP):
            norms = row_norms(block, norm_type)
            over = np.flatnonzero(norms > max_norm)
            factors[start + over] = (max_norm / (norms[over] + 1e-7)).astype(np.float32)
        return StoredTable(table.data, table.storage, table.dim, factors)
    data = np.array(table.data, copy=True, order="C")
    dim = table.dim
    for start, block in table.blocks(_ROWS_PER_STEP):
        norms = row_norms(block, norm_type)
        over = np.flatnonzero(norms > max_norm)
        if over.size:
            factor = (max_norm / (norms[over] + 1e-7)).astype(np.float32)
            rows = data[start + over]
            scale_bias = table.split(rows)[1] * factor[:, None]
            rows[:, dim:] = scale_bias.astype(np.float32).view(np.uint8)
            data[start + over] = rows
    return StoredTable(data, "int8", dim)
