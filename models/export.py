"""Export a served table as a standalone ONNX model, optionally as a Triton repository.

The exported graph (see :func:`kernels.onnx_graph.flat_model`) takes ``indices`` int64
``[N]`` and ``offsets`` int64 ``[B]`` (bag starts; ``[B + 1]`` for a bag built with
``include_last_offset``), plus ``per_sample_weights`` ``[N]`` when exported ``weighted``
(sum mode), and returns ``embeddings`` ``[B, D]``: the same numbers as
:class:`models.EmbeddingBag`, in plain onnxruntime or Triton Inference Server. The ids
are not range-checked inside the graph (ONNX Gather fails on out-of-range ids): callers
validate them, as this service does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.onnx_graph import element_types, flat_model, with_sentinel
from models.checkpoints.onnx_format import SENTINEL_KEY, TABLE_KEY
from models.embedding_bag import EmbeddingBag

#: Tables at least this large are written as external data (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


def build_onnx(bag: EmbeddingBag, *, weighted: bool = False,
               table_dtype: npt.DTypeLike | None = None) -> Any:
    """The ``onnx.ModelProto`` for ``bag`` (table, mode, padding, include_last_offset).

    Raises:
        ValueError: ``weighted`` outside mode ``"sum"``, or an unsupported table dtype.
    """
    if weighted and bag.mode != "sum":
        raise ValueError(f"weighted export needs mode='sum'; the bag's mode is {bag.mode!r}")
    import onnx

    dtype = np.dtype(bag.weight.dtype if table_dtype is None else table_dtype)
    element_types(dtype)
    model = flat_model(with_sentinel(bag.weight, bag.mode, dtype), bag.mode,
                       padding_idx=bag.padding_idx, weighted=weighted,
                       include_last_offset=bag.include_last_offset)
    # Lets read_checkpoint give the table back without its sentinel row.
    onnx.helper.set_model_props(model, {TABLE_KEY: "table", SENTINEL_KEY: "1",
                                        "bagserve.mode": bag.mode})
    return model


def export_onnx(bag: EmbeddingBag, path: str | os.PathLike[str], *, weighted: bool = False,
                table_dtype: npt.DTypeLike | None = None,
                external_data: bool | None = None) -> Path:
    """Write ``bag`` as a standalone ``.onnx`` file; returns its path.

    Args:
        bag: the module to export.
        path: the ``.onnx`` file to write (its folder must exist).
        weighted: add the ``per_sample_weights`` input (mode ``"sum"`` only).
        table_dtype: ``"float16"`` to store the table in half precision.
        external_data: store the table beside the model as ``<file>.data``; by default
            when the table reaches 1 GiB (protobuf cannot hold 2 GB).

    Raises:
        ValueError: as :func:`build_onnx`.
    """
    import onnx

    path = Path(path)
    model = build_onnx(bag, weighted=weighted, table_dtype=table_dtype)
    if external_data is None:
        external_data = bag.weight.nbytes >= EXTERNAL_DATA_BYTES
    if external_data:
        onnx.save_model(model, path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{path.name}.data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, path)
    return path


_TRITON_TYPES = {np.dtype(np.float16): "TYPE_FP32", np.dtype(np.float32): "TYPE_FP32",
                 np.dtype(np.float64): "TYPE_FP64"}


def triton_config(bag: EmbeddingBag, name: str, *, weighted: bool = False,
                  table_dtype: npt.DTypeLike | None = None) -> str:
    """``config.pbtxt`` text for the exported model on Triton's onnxruntime backend."""
    dtype = np.dtype(bag.weight.dtype if table_dtype is None else table_dtype)
    float_type = _TRITON_TYPES[dtype]
    inputs = [("indices", "TYPE_INT64", "[ -1 ]"), ("offsets", "TYPE_INT64", "[ -1 ]")]
    if weighted:
        inputs.append(("per_sample_weights", float_type, "[ -1 ]"))
    entries = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n  }}'
                         for n, t, d in inputs)
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
            f"input [\n{entries}\n]\n"
            f'output [\n  {{\n    name: "embeddings"\n    data_type: {float_type}\n'
            f"    dims: [ -1, {bag.embedding_dim} ]\n  }}\n]\n")


def export_triton(bag: EmbeddingBag, repository: str | os.PathLike[str], name: str, *,
                  weighted: bool = False, table_dtype: npt.DTypeLike | None = None,
                  version: int = 1) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and ``<name>/<version>/model.onnx``.

    Returns the model folder. Raises ``ValueError`` for a name Triton cannot serve from
    a folder (empty, ``.``/``..`` or containing a path separator).
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"model name must be a plain folder name; got {name!r}")
    folder = Path(repository) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    export_onnx(bag, folder / str(version) / "model.onnx", weighted=weighted,
                table_dtype=table_dtype)
    (folder / "config.pbtxt").write_text(triton_config(bag, name, weighted=weighted,
                                                       table_dtype=table_dtype))
    return folder
