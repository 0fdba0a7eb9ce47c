"""Store a float checkpoint in a smaller storage dtype, and measure what that costs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.storage import PREPACK_FORMATS, StorageDtype, StoredTable, store
from models.checkpoints import write_safetensors
from models.embedding_bag import EmbeddingBag

#: The safetensors tensor a stored table is written as.
TENSOR = "weight"
_FORMATS = {storage: name for name, storage in PREPACK_FORMATS.items()}


@dataclass(frozen=True)
class Accuracy:
    """How pooled vectors from a stored table differ from float32's, over sampled bags.

    Attributes:
        bags: how many bags were sampled; mode: their pooling.
        max_abs_error, mean_abs_error: over every component of every pooled vector.
        mean_cosine, min_cosine: cosine similarity of each pooled vector with float32's
            (bags pooling to zero in both count as 1).
    """

    bags: int
    mode: str
    max_abs_error: float
    mean_abs_error: float
    mean_cosine: float
    min_cosine: float


def write_stored(table: StoredTable, path: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``table`` as safetensors; returns the config fields that serve it.

    int8 and int4 tables are written as PyTorch's prepacked rows (``quantized_format``
    ``byte_rowwise`` / ``4bit_rowwise``), float16 as F16 and bfloat16 as BF16.

    Raises:
        ValueError: an int4 table of odd dim (the 4-bit format holds even dims only).
    """
    if table.storage == "int4" and table.dim % 2:
        raise ValueError(f"4bit_rowwise rows hold an even number of values (PyTorch's "
                         f"format); this table has dim {table.dim}: store it as int8")
    fields = {"table_dtype": table.storage, "tensor": TENSOR}
    if table.storage in _FORMATS:
        fields["quantized_format"] = _FORMATS[table.storage]
    write_safetensors(path, {TENSOR: table.data}, metadata=fields,
                      bfloat16=(TENSOR,) if table.storage == "bfloat16" else ())
    return fields


def sample_bags(rows: int, bags: int, mean_length: float, seed: int
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(ids, starts)`` of ``bags`` bags of Poisson lengths (at least one id each) with
    ids drawn uniformly from ``[0, rows)``."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(rng.poisson(mean_length, bags), 1)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return rng.integers(0, rows, int(lengths.sum())).astype(np.int64), starts


def accuracy(reference: npt.NDArray[Any], stored: StoredTable, *, mode: str = "mean",
             bags: int = 1000, mean_length: float = 20.0, seed: int = 0) -> Accuracy:
    """Pool the same sampled bags from ``reference`` (float) and ``stored``; compare."""
    ids, starts = sample_bags(stored.rows, bags, mean_length, seed)
    exact = EmbeddingBag.from_pretrained(reference, mode=mode, table_dtype="float32")
    approx = EmbeddingBag.from_pretrained(stored, mode=mode)
    want = exact(ids, offsets=starts).astype(np.float64)
    got = approx(ids, offsets=starts).astype(np.float64)
    error = np.abs(got - want)
    norms = np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1)
    dots = (want * got).sum(axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return Accuracy(bags, mode, float(error.max()), float(error.mean()),
                    float(cosine.mean()), float(cosine.min()))


def quantize_checkpoint(source: StoredTable, storage: StorageDtype,
                        output: str | os.PathLike[str], *, mode: str = "mean",
                        bags: int = 1000, mean_length: float = 20.0, seed: int = 0
                        ) -> tuple[StoredTable, dict[str, str], Accuracy]:
    """Store ``source`` (a float32 table) as ``storage``, write it to ``output`` and
    measure its accuracy on sampled bags. Returns (stored table, config fields,
    accuracy)."""
    stored = store(source, storage)
    fields = write_stored(stored, Path(output))
    return stored, fields, accuracy(source.data, stored, mode=mode, bags=bags,
                                    mean_length=mean_length, seed=seed)
