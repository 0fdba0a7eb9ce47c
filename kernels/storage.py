"""How a table is stored: float32/float64 as they are, half precision, or quantized rowwise.

A :class:`StoredTable` holds one table in its storage form and never widens it as a
whole; kernels decode rows as they gather them and accumulate in float32 (float64 tables
in float64). The layouts (``data``, C-contiguous, one row per embedding):

==========  ==========================  ===============================================
storage     ``data``                    one row
==========  ==========================  ===============================================
float32     float32 ``(rows, D)``       D floats
float64     float64 ``(rows, D)``       D doubles
float16     float16 ``(rows, D)``       D halves
bfloat16    uint16 ``(rows, D)``        D bfloat16 bit patterns (float32's top half)
int8        uint8 ``(rows, D + 8)``     D codes, float32 scale, float32 bias
int4        uint8 ``(rows, P + 4)``     P = ceil(D / 2) bytes of two codes each (low
                                        nibble first), float16 scale, float16 bias
==========  ==========================  ===============================================

The int8 and int4 rows are exactly PyTorch's ``embedding_bag_byte_prepack`` and
``embedding_bag_4bit_prepack`` rows (FBGEMM's fused rowwise layouts), so such tensors are
served as they are; TorchRec's fused rows (float16 scale and bias in front) and its split
state dicts (codes, ``weight_qscale``, ``weight_qbias``) are rearranged into them. A code
``q`` stands for ``q * scale + bias``.

Quantization is FBGEMM's (and so PyTorch's prepack ops', byte for byte): int8:
``scale = (max - min) / 255``, ``bias = min``, ``q = rint((x - min) * 255 / (max - min +
1e-8))``; int4: ``bias`` and ``scale = (max - bias) / 15`` rounded to float16 first
(``scale = 1`` for constant rows or when it underflows), ``q = clip(rint((x - bias) /
scale), 0, 15)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

StorageDtype = Literal["float32", "float64", "float16", "bfloat16", "int8", "int4"]
STORAGE_DTYPES: tuple[StorageDtype, ...] = (
    "float32", "float64", "float16", "bfloat16", "int8", "int4")
#: PyTorch's prepacked rowwise formats (scale and bias after the codes), as the config
#: names them, and what they store.
PREPACK_FORMATS: dict[str, StorageDtype] = {"byte_rowwise": "int8", "4bit_rowwise": "int4"}
#: TorchRec's fused rows (FBGEMM's table-batched inference layout): float16 scale and
#: bias in front of the codes.
FRONT_FORMATS: dict[str, StorageDtype] = {"torchrec_int8": "int8", "torchrec_int4": "int4"}
#: Every already-quantized layout a checkpoint may hold.
QUANTIZED_FORMATS: dict[str, StorageDtype] = {**PREPACK_FORMATS, **FRONT_FORMATS}

#: Rows converted at a time: bounds the float32 working set of a conversion (64K rows of
#: dim 512 are 128 MB).
BLOCK_ROWS = 1 << 16

_DATA_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
    "int8": np.dtype(np.uint8), "int4": np.dtype(np.uint8)}


class StorageError(ValueError):
    """A table cannot be stored, or read, in the form asked for."""


def storage_dtype(name: Any) -> StorageDtype:
    """``name`` checked against :data:`STORAGE_DTYPES` (NumPy dtypes accepted for floats).

    Raises:
        StorageError: not a storage dtype.
    """
    for storage in STORAGE_DTYPES:
        if name == storage:
            return storage
    try:
        resolved = np.dtype(name).name
    except TypeError:
        resolved = None
    for storage in ("float32", "float64", "float16"):
        if resolved == storage:
            return storage
    raise StorageError(f"table_dtype must be one of {', '.join(STORAGE_DTYPES)}; got {name!r}")


def code_bytes(storage: StorageDtype, dim: int) -> int:
    """Bytes of codes at the start of an int8 or int4 row of ``dim`` values."""
    return dim if storage == "int8" else (dim + 1) // 2


def row_bytes(storage: StorageDtype, dim: int) -> int:
    """Bytes of one stored row of ``dim`` values."""
    if storage == "int8":
        return code_bytes(storage, dim) + 8
    if storage == "int4":
        return code_bytes(storage, dim) + 4
    return dim * _DATA_DTYPES[storage].itemsize


@dataclass(frozen=True)
class StoredTable:
    """One table in its storage form (layouts in the module docstring).

    Attributes:
        data: the stored rows, C-contiguous (may be a read-only memory map).
        storage: the storage dtype.
        dim: values per row (``D``).
        row_scale: ``None``, or a float32 factor in ``(0, 1]`` per row that every decoded
            row is multiplied by (``max_norm`` on a storage that cannot hold renormed rows
            without rounding them again: float16, bfloat16, int4).

    Raises:
        StorageError: ``data`` does not have the dtype or row size ``storage`` needs, or
            ``row_scale`` is not one finite positive float32 per row.
    """

    data: npt.NDArray[Any]
    storage: StorageDtype
    dim: int
    row_scale: npt.NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        expected = _DATA_DTYPES.get(self.storage)
        if expected is None:
            raise StorageError(f"unknown storage {self.storage!r}")
        data = self.data
        width = row_bytes(self.storage, self.dim) // expected.itemsize
        if data.dtype != expected or data.ndim != 2 or data.shape[1] != width:
            raise StorageError(f"a {self.storage} table of dim {self.dim} is stored as "
                               f"{expected} (rows, {width}); got {data.dtype} "
                               f"{list(data.shape)}")
        if not data.flags.c_contiguous:
            raise StorageError("stored rows must be C-contiguous")
        scale = self.row_scale
        if scale is not None and (scale.dtype != np.float32 or scale.shape != data.shape[:1]
                                  or not scale.flags.c_contiguous
                                  or not (np.isfinite(scale) & (scale > 0)).all()):
            raise StorageError(f"row_scale must be one finite positive float32 per row "
                               f"({data.shape[0]}), contiguous; got {scale.dtype} "
                               f"{list(scale.shape)}")

    @classmethod
    def of(cls, weight: npt.NDArray[np.floating]) -> StoredTable:
        """A float32 or float64 ``(rows, D)`` array as a table, without a copy."""
        storage = storage_dtype(weight.dtype)
        return cls(weight, storage, int(weight.shape[1]) if weight.ndim == 2 else -1)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the table takes in memory."""
        extra = 0 if self.row_scale is None else self.row_scale.nbytes
        return int(self.data.nbytes) + extra

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.storage, self.dim)

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        """What lookups accumulate in and return: float64 for float64 tables, else
        float32."""
        return np.dtype(np.float64 if self.storage == "float64" else np.float32)

    @property
    def is_float(self) -> bool:
        """Stored as float32 or float64: ``data`` is the table itself."""
        return self.storage in ("float32", "float64")

    def decode(self, data: npt.NDArray[Any]) -> npt.NDArray[np.floating]:
        """Stored rows (any leading shape, rows on the last axis) as values in the
        compute dtype: ``(..., D)``, the values the kernels pool (float32 and float64
        rows come back as they are: ``data`` itself)."""
        storage, dim = self.storage, self.dim
        if storage in ("float32", "float64"):
            return data
        if storage == "float16":
            return data.astype(np.float32)
        if storage == "bfloat16":
            return bfloat16_to_float32(data)
        packed, scale_bias = self.split(data)
        if storage == "int8":
            codes = packed.astype(np.float32)
        else:
            codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.float32)
            codes[..., 0::2] = packed & 0x0F
            codes[..., 1::2] = packed >> 4
            codes = codes[..., :dim]
        # One fused multiply-add a value, as the kernels: codes * scale + bias. Rows read
        # in the wrong format can hold any bits: they decode to NaN or inf quietly, and
        # loading refuses the table naming the row.
        with np.errstate(all="ignore"):
            return np.asarray(_fma(codes, scale_bias[..., :1], scale_bias[..., 1:]))

    def split(self, data: npt.NDArray[np.uint8]
              ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Stored int8 or int4 rows (any leading shape) as their codes ``(..., W)`` (a
        view) and their ``(scale, bias)`` pairs ``(..., 2)`` in float32."""
        width = code_bytes(self.storage, self.dim)
        kind = np.float32 if self.storage == "int8" else np.float16
        pairs = np.ascontiguousarray(data[..., width:]).view(kind).astype(np.float32)
        return data[..., :width], pairs

    def gather(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        """Rows ``ids`` (any shape, every id valid) decoded into a fresh array:
        ``ids.shape + (D,)`` (times their ``row_scale``)."""
        rows = self.decode(np.take(self.data, ids, axis=0, mode="clip"))
        if self.row_scale is None:
            return rows
        return rows * np.take(self.row_scale, ids, mode="clip")[..., None]

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, npt.NDArray[np.floating]]]:
        """``(first row, decoded rows)`` in blocks of ``rows`` (times their ``row_scale``):
        a float view of the table that never holds more than one block."""
        for start in range(0, self.rows, rows):
            block = self.decode(self.data[start : start + rows])
            if self.row_scale is not None:
                block = block * self.row_scale[start : start + rows, None]
            yield start, block

    def to_float(self) -> npt.NDArray[np.floating]:
        """The whole table decoded, ``(rows, D)`` in the compute dtype (a copy unless the
        table is stored as float32/float64)."""
        if self.is_float:
            return self.data
        out = np.empty((self.rows, self.dim), self.compute_dtype)
        for start, block in self.blocks():
            out[start : start + block.shape[0]] = block
        return out


def _fma(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32],
         c: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``a * b + c`` rounded once, as the kernels' fused multiply-add (computed in float64,
    where the product of a code and a float32 scale is exact, then rounded)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def bfloat16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 bit patterns to float32 (exact: bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bfloat16 bit patterns, to nearest even (as PyTorch); NaN
    stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    result: npt.NDArray[np.uint16] = rounded
    return result


def quantize_rows(block: npt.NDArray[np.floating], storage: StorageDtype
                  ) -> npt.NDArray[Any]:
    """Float rows ``(n, D)`` in ``storage``'s stored form (see the module docstring)."""
    values = np.asarray(block, dtype=np.float32)
    if storage in ("float32", "float64"):
        return np.ascontiguousarray(block, dtype=_DATA_DTYPES[storage])
    if storage == "float16":
        # Values beyond float16's range become infinite; loading refuses such tables.
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    if storage == "bfloat16":
        return float32_to_bfloat16(values)
    rows, dim = values.shape
    low = values.min(axis=1) if dim else np.zeros(rows, np.float32)
    high = values.max(axis=1) if dim else np.zeros(rows, np.float32)
    out = np.empty((rows, row_bytes(storage, dim)), np.uint8)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if storage == "int8":
            spread = high - low
            inverse = np.float32(255) / (spread + np.float32(1e-8))
            codes = np.rint((values - low[:, None]) * inverse[:, None])
            out[:, :dim] = np.clip(codes, 0, 255)
            out[:, dim:] = np.stack([spread / np.float32(255), low], axis=1).astype(
                np.float32).view(np.uint8)
            return out
        bias = low.astype(np.float16)
        spread = high - bias.astype(np.float32)
        scale = np.where(spread == 0, np.float32(1), spread / np.float32(15)).astype(
            np.float16).astype(np.float32)
        inverse = np.float32(1) / scale
        degenerate = (scale == 0) | np.isinf(inverse)
        scale[degenerate], inverse[degenerate] = 1, 1
    codes = np.clip(np.rint((values - bias.astype(np.float32)[:, None]) * inverse[:, None]),
                    0, 15).astype(np.uint8)
    if dim % 2:
        codes = np.concatenate([codes, np.zeros((rows, 1), np.uint8)], axis=1)
    packed = code_bytes(storage, dim)
    out[:, :packed] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out[:, packed:] = np.stack([scale.astype(np.float16), bias], axis=1).view(np.uint8)
    return out


def store(weight: npt.NDArray[Any] | StoredTable, storage: StorageDtype,
          block_rows: int = BLOCK_ROWS) -> StoredTable:
    """A float table ``(rows, D)`` (float16/32/64, or a float or half
    :class:`StoredTable`) in ``storage``, converted ``block_rows`` rows at a time: never
    more than one block of float32 beside the (possibly memory-mapped) source.

    Raises:
        StorageError: the table is not 2-D, or a quantized table would need converting.
    """
    if isinstance(weight, StoredTable):
        if weight.storage == storage:
            return weight
        if weight.storage in ("int8", "int4"):
            raise StorageError(f"a table stored as {weight.storage} is served as it is; "
                               f"it cannot be converted to {storage}")
        rows, dim = weight.rows, weight.dim
        blocks = weight.blocks(block_rows)
    else:
        if weight.ndim != 2:
            raise StorageError(f"a table must be 2-D; got shape {list(weight.shape)}")
        rows, dim = weight.shape
        if storage in ("float32", "float64") and weight.dtype == _DATA_DTYPES[storage]:
            return StoredTable(np.ascontiguousarray(weight), storage, dim)
        blocks = ((start, weight[start : start + block_rows])
                  for start in range(0, rows, block_rows))
    data = np.empty((rows, row_bytes(storage, dim) // _DATA_DTYPES[storage].itemsize),
                    _DATA_DTYPES[storage])
    for start, block in blocks:
        data[start : start + block.shape[0]] = quantize_rows(block, storage)
    return StoredTable(data, storage, dim)


def prepacked(data: npt.NDArray[Any], quantized_format: str) -> StoredTable:
    """A tensor of quantized rows in ``quantized_format``: PyTorch's
    ``embedding_bag_byte_prepack`` (``byte_rowwise``) or ``embedding_bag_4bit_prepack``
    (``4bit_rowwise``) rows, served as they are, or TorchRec's fused rows (``torchrec_int8``
    / ``torchrec_int4``: float16 scale and bias, then the codes), rearranged into the
    prepack layout (a copy; float16 scales widen exactly for int8).

    Raises:
        StorageError: an unknown format, or a tensor that cannot be that format (the
            message says what was expected).
    """
    storage = QUANTIZED_FORMATS.get(quantized_format)
    if storage is None:
        raise StorageError(f"quantized_format must be one of "
                           f"{', '.join(QUANTIZED_FORMATS)}; got {quantized_format!r}")
    front = quantized_format in FRONT_FORMATS
    extra = 4 if front or storage == "int4" else 8
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] <= extra:
        raise StorageError(f"a {quantized_format} table is uint8 (rows, bytes per row > "
                           f"{extra}); got {data.dtype} {list(data.shape)}")
    width = data.shape[1] - extra
    # 4-bit rows hold two codes a byte: PyTorch's prepack only makes even dims.
    dim = width if storage == "int8" else 2 * width
    if front:
        scale_bias = np.ascontiguousarray(data[:, :4]).view(np.float16)
        return from_codes(np.ascontiguousarray(data[:, 4:]), scale_bias[:, 0],
                          scale_bias[:, 1], storage, dim)
    return StoredTable(np.ascontiguousarray(data), storage, dim)


def from_codes(codes: npt.NDArray[np.uint8], scale: npt.NDArray[Any],
               bias: npt.NDArray[Any], storage: StorageDtype, dim: int) -> StoredTable:
    """A table from separate codes (``(rows, D)`` for int8, ``(rows, ceil(D / 2))``
    packed low nibble first for int4) and per-row scale and bias (TorchRec's quantized
    state dicts keep them apart, in float16).

    Raises:
        StorageError: shapes or dtypes that do not fit together.
    """
    rows = codes.shape[0] if codes.ndim == 2 else -1
    width = code_bytes(storage, dim)
    scale, bias = np.asarray(scale).reshape(-1), np.asarray(bias).reshape(-1)
    if (storage not in ("int8", "int4") or codes.dtype != np.uint8 or codes.ndim != 2
            or codes.shape[1] != width or scale.shape != (rows,) or bias.shape != (rows,)):
        raise StorageError(f"{storage} codes must be uint8 (rows, {width}) with a scale "
                           f"and a bias per row; got codes {codes.dtype} "
                           f"{list(codes.shape)}, scale {list(scale.shape)}, bias "
                           f"{list(bias.shape)}")
    data = np.empty((rows, row_bytes(storage, dim)), np.uint8)
    data[:, :width] = codes
    kind = np.float32 if storage == "int8" else np.float16
    data[:, width:] = np.stack([scale.astype(kind), bias.astype(kind)], axis=1).view(np.uint8)
    return StoredTable(data, storage, dim)
