"""``max_norm``: scale rows whose norm exceeds a bound, as ``torch.embedding_renorm_``."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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
