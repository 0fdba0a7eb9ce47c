"""Checkpoint readers and writers.

``read_checkpoint`` returns the embedding table of a file as a 2-D float array,
memory-mapped where the format allows (.safetensors, .npy, uncompressed .pt). Every error
is a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.storage import bfloat16_to_float32
from models.checkpoints.atomic import atomic_write
from models.checkpoints.entry import TensorEntry
from models.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from models.checkpoints.onnx_format import read_onnx
from models.checkpoints.safetensors_format import read_safetensors, write_safetensors
from models.checkpoints.torch_format import read_torch

__all__ = [
    "SUFFIXES",
    "CheckpointError",
    "TensorEntry",
    "UnsafeCheckpointError",
    "list_tensors",
    "read_checkpoint",
    "select_tensor",
    "write_npy",
    "write_safetensors",
]

SUFFIXES = (".safetensors", ".npy", ".npz", ".pt", ".pth", ".bin", ".onnx")
_TABLE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _read_npy(path: Path) -> dict[str, TensorEntry]:
    try:
        with path.open("rb") as file:
            magic = file.read(6)
        if magic != b"\x93NUMPY":
            raise CheckpointError(f"{path}: not a .npy file (it does not start with NumPy's "
                                  "header)")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        # NumPy's own advice (allow_pickle) is not an option a server offers.
        reason = str(exc).split(" If you trust the file")[0]
        raise CheckpointError(f"{path}: corrupt or truncated .npy file: {reason}") from None
    return {"": TensorEntry(array.shape, str(array.dtype), partial(_same, array))}


#: A compressed .npz member past this size that inflates more than this many times is
#: refused: float tables compress by 1.1-1.3x, a table of zeros by 1,000x.
_BOMB_MIN_BYTES, _BOMB_RATIO = 16 << 20, 64


def _read_npz(path: Path) -> dict[str, TensorEntry]:
    """List an .npz archive's arrays from their headers; each loads when asked. A member
    whose header declares more bytes than the member holds is refused before anything is
    allocated (a tiny file must not claim a terabyte table)."""
    entries: dict[str, TensorEntry] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise CheckpointError(f"{path}: array {name!r} is in .npy format "
                                              f"version {version}, which is not read")
                    shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise CheckpointError(f"{path}: array {name!r} holds Python objects "
                                          "(pickles are not read)")
                declared = math.prod(shape) * dtype.itemsize
                if (info.compress_type != zipfile.ZIP_STORED
                        and info.file_size > _BOMB_MIN_BYTES
                        and info.file_size > _BOMB_RATIO * info.compress_size):
                    raise CheckpointError(
                        f"{path}: array {name!r} inflates {info.compress_size:,} compressed "
                        f"bytes to {info.file_size:,} (over {_BOMB_RATIO}x): a real table "
                        "barely compresses; refused as a decompression bomb (save it "
                        "uncompressed, as .npy or .safetensors, if it is real)")
                if declared > info.file_size:
                    raise CheckpointError(
                        f"{path}: array {name!r} declares shape {list(shape)} ({declared:,} "
                        f"bytes) but its member holds {info.file_size:,} bytes (corrupt "
                        "file)")
                entries[name] = TensorEntry(tuple(shape), str(dtype),
                                            partial(_npz_member, path, name))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated .npz file: {exc}") from None
    return entries


def _npz_member(path: Path, name: str) -> npt.NDArray[Any]:
    try:
        with path.open("rb") as file, np.load(file, allow_pickle=False) as archive:
            array: npt.NDArray[Any] = archive[name]
            return array
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated .npz file: {exc}") from None


def _same(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return array


_READERS = {".safetensors": read_safetensors, ".npy": _read_npy, ".npz": _read_npz,
            ".pt": read_torch, ".pth": read_torch, ".bin": read_torch, ".onnx": read_onnx}


def list_tensors(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """The tensors a checkpoint holds, by name (a .npy file's one array is named ``""``).

    Raises:
        CheckpointError: missing file, unknown suffix, or a corrupt file.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected "
                              f"one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return reader(path)


def _describe(entries: dict[str, TensorEntry]) -> str:
    return ", ".join(f"{name} ({e.dtype} {list(e.shape)})" for name, e in entries.items())


def select_tensor(path: Path, entries: dict[str, TensorEntry], tensor: str | None,
                  dtypes: tuple[str, ...], what: str) -> str:
    """The name of the table to read: ``tensor`` when given, else the one 2-D tensor of
    one of ``dtypes`` (``what`` names such tensors in errors, e.g. "2-D float tensor").

    Raises:
        CheckpointError: no such tensor (the message lists the available ones), several
            candidates and no name, or the named tensor is not 2-D of those dtypes.
    """
    if tensor is not None:
        if path.suffix.lower() == ".npy":
            raise CheckpointError(f"{path}: a .npy file holds one unnamed array; do not pass "
                                  f"tensor={tensor!r}")
        if tensor not in entries:
            raise CheckpointError(f"{path}: no tensor named {tensor!r}; available: "
                                  f"{_describe(entries) or 'none'}")
        name = tensor
    else:
        tables = [n for n, e in entries.items() if len(e.shape) == 2 and e.dtype in dtypes]
        if not tables and len(entries) == 1:
            tables = list(entries)  # the only tensor: say what is wrong with it, below
        if len(tables) != 1:
            which = f"no {what}" if not tables else f"several {what}s"
            raise CheckpointError(f"{path}: holds {which}; pass tensor=NAME. Available: "
                                  f"{_describe(entries) or 'none'}")
        name = tables[0]
    entry = entries[name]
    label = f"tensor {name!r}" if name else "the array"
    if len(entry.shape) != 2 or entry.dtype not in dtypes:
        raise CheckpointError(f"{path}: {label} is {entry.dtype} {list(entry.shape)}; an "
                              f"embedding table must be a {what}")
    return name


def read_checkpoint(path: str | os.PathLike[str],
                    tensor: str | None = None) -> npt.NDArray[np.floating[Any]]:
    """Read the embedding table of a checkpoint.

    Args:
        path: a .safetensors, .npy, .npz, .pt, .pth or .bin (``torch.save``) file, or an
            .onnx model (its initializers; a bagserve export gives back its table).
        tensor: the tensor's name; may be omitted when the file holds one 2-D float tensor.

    Returns:
        ``(num_embeddings, embedding_dim)`` float32 or float64, read-only and
        memory-mapped where possible; float16 and bfloat16 tables are widened to float32
        (:func:`models.load_table` keeps them as they are).

    Raises:
        CheckpointError: missing, corrupt or truncated file; no such tensor (the message
            lists the available ones); several candidates and no name; not a 2-D float
            tensor.
        UnsafeCheckpointError: a pickle that would run code.
    """
    path = Path(path)
    entries = list_tensors(path)
    entry = entries[select_tensor(path, entries, tensor, _TABLE_DTYPES, "2-D float tensor")]
    array = entry.load()
    if entry.dtype == "bfloat16":
        array = bfloat16_to_float32(array)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def write_npy(path: str | os.PathLike[str], array: npt.ArrayLike) -> None:
    """Write one array as .npy atomically (readable memory-mapped by ``read_checkpoint``)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write(Path(path), [buffer.getbuffer()])
