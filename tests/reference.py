"""A slow, obviously correct EmbeddingBag: Python loops, float64 accumulation."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def reference_bag(weight: npt.NDArray[Any], input: Any, offsets: Any = None,
                  per_sample_weights: Any = None, *, mode: str = "mean",
                  padding_idx: int | None = None, include_last_offset: bool = False,
                  max_norm: float | None = None, norm_type: float = 2.0
                  ) -> npt.NDArray[np.float64]:
    """Pool bags one id at a time; returns ``(B, D)`` float64."""
    table = np.array(weight, dtype=np.float64)
    ids = np.asarray(input)
    weights = None if per_sample_weights is None else np.asarray(per_sample_weights, np.float64)
    if ids.ndim == 2:
        bags = [list(row) for row in ids]
        bag_weights = None if weights is None else [list(row) for row in weights]
    else:
        starts = list(np.asarray(offsets))
        if not include_last_offset:
            starts.append(len(ids))
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        bags = [list(ids[a:b]) for a, b in spans]
        bag_weights = None if weights is None else [list(weights[a:b]) for a, b in spans]
    if padding_idx is not None:
        padding_idx %= table.shape[0]
    out = np.zeros((len(bags), table.shape[1]))
    for b, bag in enumerate(bags):
        rows = []
        for position, row_id in enumerate(bag):
            if row_id == padding_idx:
                continue
            row = table[row_id].copy()
            if max_norm is not None:
                norm = np.linalg.norm(row, ord=norm_type)
                if norm > max_norm:
                    row *= max_norm / (norm + 1e-7)
            if bag_weights is not None:
                row *= bag_weights[b][position]
            rows.append(row)
        if not rows:
            continue
        if mode == "sum":
            out[b] = np.sum(rows, axis=0)
        elif mode == "mean":
            out[b] = np.sum(rows, axis=0) / len(rows)
        else:
            out[b] = np.max(rows, axis=0)
    return out
