"""Validate EmbeddingBag call arguments and flatten them into one kernel batch.

Everything a client can get wrong is checked here, once, with vectorised NumPy, and
reported as :class:`InvalidInputError` naming the argument and the offending value. What
comes out satisfies the kernel contract in :mod:`kernels.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from kernels import Mode
from models import fastcheck

#: Whether the compiled one-pass check runs before the NumPy checks (numba imports).
_FAST = fastcheck.available()
#: NumPy's native int64 dtype: arrays of it carry this very object, so the usual call is
#: recognised by identity (see :func:`unchecked_call`).
_INT64 = np.dtype(np.int64)


class InvalidInputError(ValueError):
    """An argument of a forward call is invalid; the message names it and the value."""


@dataclass(frozen=True)
class FlatBatch:
    """One validated batch in kernel layout.

    Attributes:
        indices: int64 ``[N]``, every id in ``[0, num_embeddings)``.
        offsets: int64 ``[B + 1]``, starting at 0, non-decreasing, ending at ``N``.
        per_sample_weights: ``None`` or ``[N]`` in the table dtype.
        bags_per_row: bags pooled into one output row: 1 for a table, F for a collection
            of F features (sample major: bag ``s * F + f``).
    """

    indices: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    per_sample_weights: npt.NDArray[np.floating] | None = None
    bags_per_row: int = 1

    @property
    def num_bags(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def num_rows(self) -> int:
        """Output rows: bags for a table, samples for a collection."""
        return self.num_bags // self.bags_per_row


def _as_array(name: str, value: Any) -> npt.NDArray[Any]:
    """``np.asarray(value)``, with a ragged nested list named instead of NumPy's error."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except ValueError:
        raise InvalidInputError(
            f"{name} is a ragged nested list (bags of different lengths); 2-D input needs "
            "bags of one length: pass 1-D ids with offsets instead") from None


def _integer_array(name: str, value: Any) -> npt.NDArray[np.int64]:
    """``value`` as an int64 array; raises if it holds anything but integers."""
    array = _as_array(name, value)
    if array.dtype == np.int64:  # the common case, checked cheaply
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        if array.size == 0 and array.dtype == np.float64 and not isinstance(value, np.ndarray):
            # An empty Python list has no dtype of its own; treat it as empty ids.
            return np.zeros(array.shape, dtype=np.int64)
        raise InvalidInputError(f"{name} must hold integers (int32 or int64); got dtype "
                                f"{array.dtype}")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{name} holds {int(array.max())}, beyond int64")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_range(indices: npt.NDArray[np.int64], num_embeddings: int,
                 shape: tuple[int, ...], offsets: npt.NDArray[np.int64]) -> None:
    """Raise for the first id outside ``[0, num_embeddings)``, with its position (and, for
    1-D input, its bag and place in the bag)."""
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low >= 0 and high < num_embeddings:
        return
    bad = int(np.flatnonzero((indices < 0) | (indices >= num_embeddings))[0])
    where = f"at position {bad}"
    if len(shape) > 1:
        where = f"at position {tuple(int(i) for i in np.unravel_index(bad, shape))}"
    else:
        bag = int(np.searchsorted(offsets, bad, side="right")) - 1
        where += f" (bag {bag}, item {bad - int(offsets[bag])})"
    raise InvalidInputError(f"index {int(indices[bad])} out of range [0, {num_embeddings}) "
                            f"{where}")


def _check_offsets(offsets: npt.NDArray[np.int64], length: int,
                   include_last_offset: bool) -> npt.NDArray[np.int64]:
    """Return ``[B + 1]`` CSR offsets for 1-D input after checking every entry."""
    if offsets.ndim != 1:
        raise InvalidInputError(f"offsets has to be a 1D array; got shape {offsets.shape}")
    if offsets.shape[0] == 0:
        if include_last_offset:
            raise InvalidInputError("offsets must hold at least 1 entry with "
                                    "include_last_offset=True; got an empty array")
        if length:
            raise InvalidInputError(f"offsets is empty but input holds {length} ids; "
                                    "pass offsets=[0] for one bag")
        return np.zeros(1, dtype=np.int64)
    if offsets[0] != 0:
        raise InvalidInputError(f"offsets[0] must be 0; got {int(offsets[0])}")
    steps = np.diff(offsets)
    if steps.size and int(steps.min()) < 0:
        at = int(np.flatnonzero(steps < 0)[0]) + 1
        raise InvalidInputError(f"offsets must not decrease; offsets[{at}] = "
                                f"{int(offsets[at])} < offsets[{at - 1}] = {int(offsets[at - 1])}")
    last = int(offsets[-1])
    if last > length:
        at = int(np.flatnonzero(offsets > length)[0])
        raise InvalidInputError(f"offsets[{at}] = {int(offsets[at])} is past the end of "
                                f"input (length {length})")
    if include_last_offset:
        if last != length:
            raise InvalidInputError(f"with include_last_offset=True the last offset must "
                                    f"equal len(input) = {length}; got {last}")
        return offsets
    return np.append(offsets, np.int64(length))


def _check_weights(per_sample_weights: Any, mode: Mode, shape: tuple[int, ...],
                   dtype: np.dtype[Any]) -> npt.NDArray[np.floating] | None:
    if per_sample_weights is None:
        return None
    if mode != "sum":
        raise InvalidInputError(f"per_sample_weights is only supported for mode='sum'; "
                                f"got mode={mode!r}")
    weights = per_sample_weights
    if (type(weights) is np.ndarray and weights.dtype == dtype and weights.shape == shape
            and weights.flags.c_contiguous):  # the common case, checked cheaply
        return weights if weights.ndim == 1 else weights.reshape(-1)
    weights = _as_array("per_sample_weights", per_sample_weights)
    if weights.size == 0 and weights.dtype == np.float64:
        weights = weights.astype(dtype)
    if not np.issubdtype(weights.dtype, np.floating):
        raise InvalidInputError(f"per_sample_weights must hold floats; got dtype "
                                f"{weights.dtype}")
    if weights.shape != shape:
        raise InvalidInputError(f"per_sample_weights must have the shape of input {shape}; "
                                f"got {weights.shape}")
    return np.ascontiguousarray(weights.reshape(-1), dtype=dtype)


def flatten_inputs(
    input: Any,
    offsets: Any = None,
    per_sample_weights: Any = None,
    *,
    num_embeddings: int,
    mode: Mode,
    include_last_offset: bool = False,
    dtype: npt.DTypeLike = np.float32,
) -> FlatBatch:
    """Validate a forward call and return it as one flat batch.

    Args:
        input: int ids, 2-D ``(B, L)`` (each row a bag; ``offsets`` must be ``None``) or
            1-D ``[N]`` with ``offsets``.
        offsets: 1-D int starts of the bags (``B`` entries, or ``B + 1`` with
            ``include_last_offset``).
        per_sample_weights: floats of ``input``'s shape (mode ``"sum"`` only).
        num_embeddings: rows in the table; ids must be in ``[0, num_embeddings)``.
        mode: the pooling mode.
        include_last_offset: whether ``offsets`` carries the end of the last bag.
        dtype: the table dtype the weights are cast to.

    Raises:
        InvalidInputError: any argument is invalid; nothing is modified.
    """
    ids = _integer_array("input", input)
    if _FAST and ids.ndim == 1 and offsets is not None:
        # One compiled pass accepts valid ids and offsets; anything else falls through to
        # the NumPy checks below, which find the first problem and word the error.
        offsets = _integer_array("offsets", offsets)
        csr = fastcheck.valid_csr(ids, offsets, num_embeddings, include_last_offset)
        if csr is not None:
            return FlatBatch(ids, csr, _check_weights(per_sample_weights, mode, ids.shape,
                                                      np.dtype(dtype)))
    if ids.ndim == 2:
        if offsets is not None:
            raise InvalidInputError("if input is 2D, then offsets has to be None; got "
                                    f"offsets of type {type(offsets).__name__}")
        bags, length = ids.shape
        csr = np.arange(bags + 1, dtype=np.int64) * length
    elif ids.ndim == 1:
        if offsets is None:
            raise InvalidInputError("offsets has to be a 1D array when input is 1D; got None")
        csr = _check_offsets(_integer_array("offsets", offsets), ids.shape[0],
                             include_last_offset)
    else:
        raise InvalidInputError(f"input has to be 1D or 2D; got {ids.ndim}D with shape "
                                f"{ids.shape}")
    weights = _check_weights(per_sample_weights, mode, ids.shape, np.dtype(dtype))
    if not (_FAST and fastcheck.ids_in_range(ids, num_embeddings)):
        _check_range(ids.reshape(-1), num_embeddings, ids.shape, csr)
    return FlatBatch(ids.reshape(-1), csr, weights)


class UncheckedCall(NamedTuple):
    """A call whose structure is valid but whose ids and bag bounds are still unchecked,
    for kernels that check them while they pool (``Kernel.pool``). A named tuple, not a
    frozen dataclass: built on every call, where the dataclass costs 0.6 us more.

    Attributes:
        indices: int64 ``[N]``.
        offsets: int64 ``[B]`` bag starts, or ``[B + 1]`` CSR offsets ending at ``N``.
        num_bags: ``B``.
        per_sample_weights: ``None`` or ``[N]`` in the table dtype (already checked).
    """

    indices: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    num_bags: int
    per_sample_weights: npt.NDArray[np.floating] | None


def unchecked_call(
    input: Any,
    offsets: Any = None,
    per_sample_weights: Any = None,
    *,
    mode: Mode,
    include_last_offset: bool = False,
    dtype: npt.DTypeLike = np.float32,
) -> UncheckedCall | None:
    """The cheap half of :func:`flatten_inputs`: dtypes, shapes, the first and (with
    ``include_last_offset``) last offset, the weights. Returns ``None`` when the call is
    not the usual shape (the caller then runs :func:`flatten_inputs`, which words any
    error); ids and the order of the offsets are left to the kernel.

    Raises:
        InvalidInputError: ``input`` or ``offsets`` do not hold integers, or the weights
            are invalid (the same errors :func:`flatten_inputs` raises first).
    """
    ids = _integer_array("input", input)
    shape = ids.shape
    if ids.ndim == 2 and offsets is None:
        bags, length = shape
        starts = np.arange(bags + 1, dtype=np.int64) * length
        num_bags = bags
        ids = ids.reshape(-1)
    elif ids.ndim == 1 and offsets is not None:
        starts = _integer_array("offsets", offsets)
        if starts.ndim != 1 or starts.shape[0] == 0 or starts[0] != 0:
            return None
        num_bags = starts.shape[0]
        if include_last_offset:
            if starts[-1] != shape[0]:
                return None
            num_bags -= 1
    else:
        return None
    if per_sample_weights is None:
        return UncheckedCall(ids, starts, num_bags, None)
    weights = _check_weights(per_sample_weights, mode, shape, np.dtype(dtype))
    return UncheckedCall(ids, starts, num_bags, weights)


def usual_bags(input: Any, offsets: Any, per_sample_weights: Any, mode: Mode,
               include_last_offset: bool, dtype: np.dtype[Any]) -> int:
    """The bag count of the usual call, or -1 for anything else (the caller then takes
    :func:`unchecked_call`). Usual: ids and offsets 1-D C-contiguous writable native
    int64 arrays, weights absent or (mode ``"sum"``) a 1-D C-contiguous writable array
    of ``input``'s shape in the table dtype ``dtype``: the arrays a kernel's compiled
    entry takes as they are (any other layout would compile another specialisation).
    The offsets' values are left to the kernel (see ``NumbaKernel.pool``).

    Tested by type, identity and attribute reads only: right after another library's
    large call, with the interpreter's working set out of the caches, each NumPy call
    costs 2-5 us (``ids.dtype == np.int64`` alone ~2 us), and the general path cost a
    256-bag call 10-20 us; this one a few."""
    if not (type(input) is np.ndarray and type(offsets) is np.ndarray
            and input.dtype is _INT64 and offsets.dtype is _INT64
            and input.ndim == 1 and offsets.ndim == 1):
        return -1
    flags, offset_flags = input.flags, offsets.flags
    if not (flags.c_contiguous and flags.writeable and offset_flags.c_contiguous
            and offset_flags.writeable):
        return -1
    if per_sample_weights is not None:
        if not (mode == "sum" and type(per_sample_weights) is np.ndarray
                and per_sample_weights.dtype is dtype
                and per_sample_weights.shape == input.shape):
            return -1
        weight_flags = per_sample_weights.flags
        if not (weight_flags.c_contiguous and weight_flags.writeable):
            return -1
    count: int = offsets.shape[0]
    return count - 1 if include_last_offset else count
