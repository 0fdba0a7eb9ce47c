"""Read and write the safetensors format without the safetensors package.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative
to the end of the header), then the data. Reading memory-maps each tensor, so a large
table costs no copy and is shared between worker processes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.checkpoints.atomic import atomic_write
from models.checkpoints.entry import TensorEntry
from models.checkpoints.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {"BF16": "bfloat16"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items() if k != "BF16"}


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse and validate the header; returns (header, data start, data length)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {length} "
                                  f"header bytes in a {size}-byte file)")
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    return header, 8 + length, size - 8 - length


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none).

    Raises:
        CheckpointError: not a safetensors file, or a corrupt header.
    """
    metadata = _header(Path(path))[0].get("__metadata__")
    if not isinstance(metadata, dict):
        return {}
    return {str(key): str(value) for key, value in metadata.items()}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """List the tensors of a safetensors file; each loads as a read-only memory map.

    Raises:
        CheckpointError: the header is corrupt, a tensor's offsets fall outside the file
            or disagree with its shape and dtype.
    """
    path = Path(path)
    header, start, available = _header(path)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            dtype = _DTYPES[code]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}: "
                                  f"{info!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= available \
                or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({code} {list(shape)}) has data "
                                  f"offsets [{begin}, {end}] that do not fit the "
                                  f"{available} data bytes (truncated or corrupt file)")
        entries[name] = TensorEntry(shape, _NAMES.get(code, str(dtype.newbyteorder("="))),
                                    _loader(path, start + begin, dtype, shape))
    return entries


def _loader(path: Path, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    def load() -> npt.NDArray[Any]:
        if 0 in shape:
            array: npt.NDArray[Any] = np.zeros(shape, dtype=dtype)
        else:
            array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return array

    return load


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, npt.ArrayLike],
                      metadata: Mapping[str, str] | None = None,
                      bfloat16: Collection[str] = ()) -> None:
    """Write ``tensors`` to ``path`` atomically (a temporary file, then a rename). Tensors
    named in ``bfloat16`` are uint16 bit patterns written as BF16.

    Raises:
        ValueError: a tensor's dtype has no safetensors code, or a name is empty.
    """
    arrays = {}
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        code = _CODES.get(array.dtype.newbyteorder("="))
        if name in bfloat16:
            code = "BF16" if array.dtype == np.uint16 else None
        if not name or code is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {array.dtype} to "
                             "safetensors")
        arrays[name] = (code, array.astype(array.dtype.newbyteorder("<"), copy=False))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    position = 0
    for name, (code, array) in arrays.items():
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned for memory maps
    atomic_write(Path(path), [struct.pack("<Q", len(raw)), raw,
                               *(array.data for _, array in arrays.values())])

