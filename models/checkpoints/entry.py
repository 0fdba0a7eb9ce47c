"""What a checkpoint reader returns: named tensors, loaded on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint.

    Attributes:
        shape: the tensor's shape.
        dtype: the file's dtype name (``"float32"``, ``"bfloat16"``, ...).
        load: returns the array, memory-mapped where the format allows; bfloat16 comes
            back as its raw bit patterns, uint16 (NumPy has no bfloat16).
    """

    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], npt.NDArray[Any]]


