"""The numba-compiled mean pooling of static text models (:mod:`models.text`).

Each text's rows are added in token order and divided by the token count with NumPy's
``mean`` arithmetic, which is what model2vec 0.10 computes, so results are its own to the
bit: rows times their token's weight in the product's dtype (float64 when either is),
summed in that dtype, the sum divided by the count in float64 (NumPy's mean divides by an
``intp`` count) and rounded once to float32. Compiled by numba, not run as Python, so mypy
skips it (see pyproject.toml).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _value(table, scales, biases, row, col):
    """Row ``row``'s value in column ``col``: the float as stored, or a rowwise code
    times its row's scale plus its bias (in float32: exact for the integer rows of int8
    text models, scale 1 and bias -128)."""
    if scales.shape[0] == 0:
        return table[row, col]
    return np.float32(table[row, col]) * scales[row] + biases[row]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def mean_rows(table, scales, biases, dim, rows, token_weights, counts, wide, out):
    """Pool ``counts[t]`` consecutive ``rows`` (table row ids) per text into ``out[t]``.

    ``table``: float rows, or uint8 codes with per-row ``scales`` and ``biases`` (empty
    for float rows); ``dim`` columns are read. ``token_weights``: per-position factors
    (empty: none); ``wide``: add in float64 (as NumPy does for a float64 table or
    weights, and for integer rows without weights), else in float32. Texts without
    tokens are left as they are (zeros)."""
    weighted = token_weights.shape[0] > 0
    start = 0
    for text in range(counts.shape[0]):
        count = counts[text]
        if count == 0:
            continue
        if wide:
            total = np.zeros(dim, np.float64)
            for position in range(start, start + count):
                row = rows[position]
                if weighted:
                    factor = np.float64(token_weights[position])
                    for col in range(dim):
                        total[col] += np.float64(_value(table, scales, biases, row,
                                                        col)) * factor
                else:
                    for col in range(dim):
                        total[col] += np.float64(_value(table, scales, biases, row, col))
            for col in range(dim):
                out[text, col] = np.float32(total[col] / np.float64(count))
        else:
            narrow = np.zeros(dim, np.float32)
            for position in range(start, start + count):
                row = rows[position]
                if weighted:
                    factor32 = np.float32(token_weights[position])
                    for col in range(dim):
                        narrow[col] += _value(table, scales, biases, row, col) * factor32
                else:
                    for col in range(dim):
                        narrow[col] += _value(table, scales, biases, row, col)
            for col in range(dim):
                out[text, col] = np.float32(np.float64(narrow[col]) / np.float64(count))
        start += count
