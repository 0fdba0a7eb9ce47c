"""Read a checkpoint's table straight into its storage form (see :mod:`kernels.storage`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kernels.storage import (
    QUANTIZED_FORMATS,
    StorageError,
    StoredTable,
    from_codes,
    prepacked,
    storage_dtype,
    store,
)
from models.checkpoints import CheckpointError, list_tensors, select_tensor
from models.checkpoints.safetensors_format import safetensors_metadata

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def load_table(path: str | os.PathLike[str], tensor: str | None = None, *,
               table_dtype: Any = None, quantized_format: str | None = None) -> StoredTable:
    """The table of a checkpoint in ``table_dtype`` (default: float32).

    A float table is converted a block of rows at a time from the (memory-mapped where
    the format allows) file: a float16 or bfloat16 table kept in its own dtype is never
    widened, and quantizing never holds a float32 copy of the whole table. With
    ``quantized_format`` the tensor is already quantized and served as it is:
    ``byte_rowwise`` / ``4bit_rowwise`` rows as PyTorch's prepack ops write them, or, when
    ``<tensor>_qscale`` and ``<tensor>_qbias`` sit beside it (TorchRec's quantized state
    dicts), bare codes with their float16 scales and biases.

    Raises:
        CheckpointError: the file or tensor cannot be read, or cannot be that format (the
            message names the file and what was expected).
        UnsafeCheckpointError: a pickle that would run code.
    """
    path = Path(path)
    entries = list_tensors(path)
    written = _written_format(path)
    quantized = [f"{n} ({e.dtype} {list(e.shape)})" for n, e in entries.items()
                 if e.dtype == "uint8" and len(e.shape) == 2]
    floats = [f"{n} ({e.dtype} {list(e.shape)})" for n, e in entries.items()
              if e.dtype in _FLOAT_DTYPES and len(e.shape) == 2]
    try:
        if quantized_format is None:
            if tensor is None and quantized and not floats:
                hint = written or "one of " + ", ".join(QUANTIZED_FORMATS)
                raise StorageError(f"holds quantized rows ({', '.join(quantized)}) and no "
                                   f"float table: serve it with quantized_format = {hint}")
            name = select_tensor(path, entries, tensor, _FLOAT_DTYPES, "2-D float tensor")
            entry = entries[name]
            source: Any = entry.load()
            if entry.dtype == "bfloat16":
                source = StoredTable(np.ascontiguousarray(source), "bfloat16",
                                     source.shape[1])
            return store(source, storage_dtype(table_dtype or "float32"))
        storage = QUANTIZED_FORMATS.get(quantized_format)
        if storage is None:
            raise StorageError(f"quantized_format must be one of "
                               f"{', '.join(QUANTIZED_FORMATS)}; got {quantized_format!r}")
        if table_dtype is not None and storage_dtype(table_dtype) != storage:
            raise StorageError(f"quantized_format {quantized_format!r} stores {storage} "
                               f"rows; table_dtype {table_dtype!r} does not fit it")
        if written is not None and written != quantized_format:
            raise StorageError(f"was written as {written} rows (its metadata says so); "
                               f"quantized_format {quantized_format!r} does not fit it")
        if tensor is None and floats and not quantized:
            raise StorageError(f"holds a float table ({', '.join(floats)}), not "
                               f"{quantized_format} rows: drop quantized_format "
                               "(table_dtype alone quantizes a float table at load)")
        name = select_tensor(path, entries, tensor, ("uint8",), f"2-D uint8 tensor "
                             f"({quantized_format} rows)")
        codes = entries[name].load()
        scale, bias = entries.get(f"{name}_qscale"), entries.get(f"{name}_qbias")
        if scale is not None and bias is not None:
            width = codes.shape[1]
            return from_codes(np.ascontiguousarray(codes), scale.load(), bias.load(), storage,
                              width if storage == "int8" else 2 * width)
        return prepacked(codes, quantized_format)
    except StorageError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _written_format(path: Path) -> str | None:
    """The quantized_format a safetensors file says it was written in (``bagserve
    quantize`` records it), if any."""
    if path.suffix.lower() != ".safetensors":
        return None
    return safetensors_metadata(path).get("quantized_format")
