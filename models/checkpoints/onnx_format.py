"""Read the tables of an ONNX model: its float initializers (external data included).

A model written by :func:`models.export.export_onnx` carries its table with one sentinel
row appended and says so in its metadata; that row is dropped here, so exporting and
serving the .onnx file again gives back the original table.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.checkpoints.entry import TensorEntry
from models.checkpoints.errors import CheckpointError

#: Metadata keys written by the exporter.
TABLE_KEY = "bagserve.table"
SENTINEL_KEY = "bagserve.sentinel_rows"


def _array(initializer: Any, drop_rows: int) -> npt.NDArray[Any]:
    from onnx import numpy_helper

    array = numpy_helper.to_array(initializer)
    return array[: array.shape[0] - drop_rows] if drop_rows else array


def read_onnx(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """List an ONNX model's initializers as tensors.

    Raises:
        CheckpointError: the file is not a readable ONNX model.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - protobuf and I/O errors alike
        raise CheckpointError(f"{path}: not a readable ONNX model: {type(exc).__name__}: "
                              f"{exc}") from None
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    table = metadata.get(TABLE_KEY)
    sentinel = int(metadata.get(SENTINEL_KEY, "0") or 0)
    entries: dict[str, TensorEntry] = {}
    for initializer in model.graph.initializer:
        drop = sentinel if initializer.name == table else 0
        shape = tuple(int(d) for d in initializer.dims)
        if drop and shape:
            shape = (shape[0] - drop, *shape[1:])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
        entries[initializer.name] = TensorEntry(shape, str(np.dtype(dtype)),
                                                partial(_array, initializer, drop))
    return entries
