"""What a checkpoint reader returns: named tensors, loaded on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint.

    Attributes:
        shape: the tensor's shape.
        dtype: the file's dtype name (``"float32"``, ``"bfloat16"``, ...).
        load: returns the array, memory-mapped where the format allows; bfloat16 comes
            back as float32 (NumPy has no bfloat16).
    """

    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], npt.NDArray[Any]]


def bfloat16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 bit patterns to float32 (exact: bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
