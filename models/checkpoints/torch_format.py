"""Read ``torch.save`` zip archives without torch and without a general unpickler.

A ``.pt`` file is a zip holding ``<root>/data.pkl`` (a pickle of the object tree) and
``<root>/data/<key>`` (raw storage bytes). The pickle is read by an unpickler whose
``find_class`` returns project-owned stand-ins for an allow-list of globals (the tensor
rebuild functions, storage types and plain containers) and refuses everything else
before it can be called, like ``torch.load(weights_only=True)``. Nothing in the file
runs. Storages stored uncompressed (torch's default) are memory-mapped.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.checkpoints.entry import TensorEntry
from models.checkpoints.errors import CheckpointError, UnsafeCheckpointError

_STORAGE_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "DoubleStorage": (np.dtype("<f8"), "float64"),
    "FloatStorage": (np.dtype("<f4"), "float32"),
    "HalfStorage": (np.dtype("<f2"), "float16"),
    "BFloat16Storage": (np.dtype("<u2"), "bfloat16"),
    "LongStorage": (np.dtype("<i8"), "int64"),
    "IntStorage": (np.dtype("<i4"), "int32"),
    "ShortStorage": (np.dtype("<i2"), "int16"),
    "CharStorage": (np.dtype("i1"), "int8"),
    "ByteStorage": (np.dtype("u1"), "uint8"),
    "BoolStorage": (np.dtype("?"), "bool"),
}
_KEY = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype[Any]
    dtype_name: str


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *_ignored: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size),
                   tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(*args)


#: (module, name) -> the stand-in ``find_class`` returns. Nothing else is resolvable.
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): _size,
    ("torch", "device"): str,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: Path, storages: dict[str, str]) -> None:
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to load global {module}.{name}: only tensors and plain "
            "containers are allowed (nothing in the file was run)")

    def persistent_load(self, pid: Any) -> _Storage:
        try:
            kind, storage_type, key, _location, _numel = pid
        except (TypeError, ValueError):
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r}") from None
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
        key = str(key)
        if not _KEY.match(key) or key not in self._storages:
            raise CheckpointError(f"{self._path}: storage {key!r} is missing from the archive")
        dtype, dtype_name = _STORAGE_DTYPES[storage_type.name]
        return _Storage(key, dtype, dtype_name)


def _flatten(value: Any, prefix: str, out: dict[str, _Tensor],
             seen: set[int] | None = None) -> None:
    """Collect the tensors of a container tree under dotted names. Each container is
    walked once: a pickle can share one container many times over (40 levels of two
    shared references each are 2**40 paths), and walking every path never ends."""
    seen = set() if seen is None else seen
    if isinstance(value, _Tensor):
        out.setdefault(prefix or "tensor", value)
        return
    if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        _flatten(item, f"{prefix}.{key}" if prefix else str(key), out, seen)


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data (local header: 30 bytes + name + extra)."""
    with path.open("rb") as file:
        file.seek(info.header_offset)
        local = file.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip entry {info.filename}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return int(info.header_offset) + 30 + int(name_length) + int(extra_length)


def read_torch(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """List the tensors of a ``torch.save`` zip archive (a state dict, nested containers
    or a bare tensor; nested keys are joined with dots).

    Raises:
        UnsafeCheckpointError: the pickle references a global outside the allow-list.
        CheckpointError: not a zip archive (legacy format), corrupt or truncated.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch.save zip archive (the legacy pre-1.6 format and plain "
            "pickles are not read); re-save it with a current torch or convert it to "
            "safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            roots = [name[: -len("/data.pkl")] for name in infos
                     if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(roots) != 1:
                raise CheckpointError(f"{path}: expected one <root>/data.pkl in the archive; "
                                      f"found {len(roots)}")
            root = roots[0]
            storages = {name[len(root) + 6 :]: name for name in infos
                        if name.startswith(f"{root}/data/")}
            byteorder = "little"
            if f"{root}/byteorder" in infos:
                byteorder = archive.read(f"{root}/byteorder").decode("ascii", "replace")
            pickled = archive.read(f"{root}/data.pkl")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive: {exc}") from None
    try:
        tree = _RestrictedUnpickler(io.BytesIO(pickled), path, storages).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt pickle in {root}/data.pkl: "
                              f"{type(exc).__name__}: {exc}") from None
    tensors: dict[str, _Tensor] = {}
    _flatten(tree, "", tensors)
    big_endian = byteorder.strip() == "big"
    return {name: TensorEntry(t.shape, t.storage.dtype_name,
                              _loader(path, infos[storages[t.storage.key]], t, big_endian))
            for name, t in tensors.items()}


def _loader(path: Path, info: zipfile.ZipInfo, tensor: _Tensor,
            big_endian: bool) -> Callable[[], npt.NDArray[Any]]:
    def load() -> npt.NDArray[Any]:
        dtype = tensor.storage.dtype.newbyteorder(">") if big_endian else tensor.storage.dtype
        count = info.file_size // dtype.itemsize
        if info.compress_type == zipfile.ZIP_STORED and count:
            flat: npt.NDArray[Any] = np.memmap(path, dtype=dtype, mode="r",
                                               offset=_member_offset(path, info),
                                               shape=(count,))
        else:
            with zipfile.ZipFile(path) as archive:
                flat = np.frombuffer(archive.read(info), dtype=dtype, count=count)
        if len(tensor.shape) != len(tensor.stride):
            raise CheckpointError(f"{path}: tensor of shape {list(tensor.shape)} has strides "
                                  f"{list(tensor.stride)} (corrupt file)")
        extent = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride,
                                                                strict=True))
        if any(s < 0 for s in tensor.stride) or any(n < 0 for n in tensor.shape) or (
                0 not in tensor.shape and not 0 <= tensor.offset <= extent < count):
            raise CheckpointError(
                f"{path}: tensor of shape {list(tensor.shape)} at offset {tensor.offset} "
                f"with strides {list(tensor.stride)} does not fit its storage of {count} "
                "elements (truncated or corrupt file)")
        repeated = any(s == 0 and n > 1 for n, s in zip(tensor.shape, tensor.stride,
                                                        strict=True))
        if 0 not in tensor.shape and (repeated or math.prod(tensor.shape) > count):
            # A view repeating its storage (stride 0, or overlapping strides) would expand
            # a few stored bytes into a table of any size.
            raise CheckpointError(
                f"{path}: tensor of shape {list(tensor.shape)} with strides "
                f"{list(tensor.stride)} repeats its storage of {count} elements; expanded "
                "(stride-0 or overlapping) tensors are refused: save a contiguous copy")
        if 0 in tensor.shape:
            array: npt.NDArray[Any] = np.zeros(tensor.shape, dtype=dtype)
        else:
            array = np.lib.stride_tricks.as_strided(
                flat[tensor.offset :], shape=tensor.shape,
                strides=tuple(s * dtype.itemsize for s in tensor.stride), writeable=False)
        if big_endian:
            array = array.astype(dtype.newbyteorder("="))
        return array

    return load
