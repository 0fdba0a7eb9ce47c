"""``EmbeddingBag``: the inference side of ``torch.nn.EmbeddingBag`` on NumPy arrays."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels import COMPUTE_DTYPES, MODES, Kernel, Mode, TableSpec, make_kernel
from kernels.storage import StorageDtype, StoredTable, storage_dtype, store
from models.inputs import flatten_inputs, unchecked_call, usual_bags
from models.renorm import renormed_table


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _mode(mode: Any) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    result: Mode = mode
    return result


def _padding(padding_idx: Any, num_embeddings: int) -> int | None:
    """Normalise ``padding_idx`` (negative counts from the end) to ``[0, num_embeddings)``."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise ValueError(f"padding_idx must be an integer or None; got {padding_idx!r}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within num_embeddings: {padding_idx} is not "
                         f"in [{-num_embeddings}, {num_embeddings})")
    return int(padding_idx) % num_embeddings


def _max_norm(max_norm: Any, norm_type: Any) -> tuple[float | None, float]:
    try:
        norm = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number; got {norm_type!r}") from None
    if math.isnan(norm):
        raise ValueError("norm_type must not be NaN")
    if max_norm is None:
        return None, norm
    try:
        bound = float(max_norm)
    except (TypeError, ValueError):
        raise ValueError(f"max_norm must be a number or None; got {max_norm!r}") from None
    if not bound >= 0:
        raise ValueError(f"max_norm must be a non-negative number; got {max_norm!r}")
    return bound, norm


def _table_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        resolved: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64; got {dtype!r}") from None
    if resolved not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be float32 or float64; got {resolved}")
    return resolved


class EmbeddingBag:
    """Pool bags of embedding rows exactly like ``torch.nn.EmbeddingBag`` (inference).

    Args mirror PyTorch. ``backend`` is ``"numpy"``, ``"onnx"`` or ``"auto"``; ``seed``
    makes the ``N(0, 1)`` initial table reproducible. Training-only arguments
    (``scale_grad_by_freq``, ``sparse``) are recorded and do not change results.
    Beyond PyTorch: ``table_dtype`` stores the table as ``float32``, ``float64``,
    ``float16``, ``bfloat16``, or quantized rowwise to ``int8`` or ``int4`` (see
    :mod:`kernels.storage`; results are float32 for all but float64), ``device``
    (``"auto"``, ``"cuda"``, ``"cpu"``) applies to the ONNX backend, ``num_threads`` to the
    CPU work of any backend; ``provider`` reports where the kernel really runs.

    ``max_norm`` is applied once, to a private copy of the table, when the module is
    built: rows over the bound are scaled as PyTorch's forward would scale them, and
    ``weight`` holds the table really used. The caller's array is never modified.

    Raises:
        ValueError: an argument is invalid (the message names it and the value).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        dtype: npt.DTypeLike = "float32",
        backend: str = "numpy",
        seed: int | None = None,
        device: str = "auto",
        table_dtype: npt.DTypeLike | None = None,
        num_threads: int | None = None,
        _weight: npt.NDArray[np.floating] | None = None,
    ) -> None:
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.mode: Mode = _mode(mode)
        self.padding_idx = _padding(padding_idx, self.num_embeddings)
        self.max_norm, self.norm_type = _max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = bool(sparse)
        self.include_last_offset = bool(include_last_offset)
        self.freeze = True
        self.backend = backend
        table: Any
        if _weight is None:
            table = np.random.default_rng(seed).standard_normal(
                (self.num_embeddings, self.embedding_dim)).astype(_table_dtype(dtype))
            if self.padding_idx is not None:
                table[self.padding_idx] = 0  # as torch.nn.EmbeddingBag.reset_parameters
        else:
            table = _weight
        storage: StorageDtype = (table.storage if table_dtype is None and isinstance(
            table, StoredTable) else storage_dtype(
                table.dtype if table_dtype is None else table_dtype))
        stored = store(table, storage)  # StorageError is a ValueError
        if self.max_norm is not None:
            stored = renormed_table(stored, self.max_norm, self.norm_type)
        self._kernel: Kernel = make_kernel(TableSpec(stored, self.mode, self.padding_idx),
                                           backend, device=device, num_threads=num_threads)
        # Looked up once: forward runs per call, where every attribute walk shows.
        self._pool = getattr(self._kernel, "pool", None)
        self._dtype = self._kernel.spec.compute_dtype

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Any,
        *,
        freeze: bool = True,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        backend: str = "numpy",
        device: str = "auto",
        table_dtype: npt.DTypeLike | None = None,
        num_threads: int | None = None,
    ) -> EmbeddingBag:
        """Wrap a table: a 2-D float array ``(num_embeddings, embedding_dim)`` or a
        :class:`kernels.storage.StoredTable` (e.g. a prepacked quantized one).

        ``table_dtype`` (default: float32, or the stored table's own storage) is how the
        table is kept in memory; converting to it goes a block of rows at a time, never
        through a float32 copy of the whole table. A C-contiguous float32/float64 array
        kept in its own dtype is used as is (a memory map stays a memory map).

        Raises:
            ValueError: ``embeddings`` is not a 2-D float array, or an option is invalid.
        """
        table: Any = embeddings
        if not isinstance(table, StoredTable):
            table = np.asarray(embeddings)
            if table.ndim != 2:
                raise ValueError(f"embeddings must be 2-D (num_embeddings, embedding_dim); "
                                 f"got shape {table.shape}")
            if not np.issubdtype(table.dtype, np.floating):
                raise ValueError(f"embeddings must hold floats; got dtype {table.dtype}")
            if table_dtype is None and table.dtype not in COMPUTE_DTYPES:
                table_dtype = "float32"
            table = np.ascontiguousarray(table)
        rows, dim = (table.rows, table.dim) if isinstance(table, StoredTable) else table.shape
        dtype = table.compute_dtype if isinstance(table, StoredTable) else (
            table.dtype if table.dtype in COMPUTE_DTYPES else np.float32)
        bag = cls(rows, dim, max_norm=max_norm, norm_type=norm_type,
                  scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse,
                  include_last_offset=include_last_offset, padding_idx=padding_idx,
                  dtype=dtype, backend=backend, device=device,
                  table_dtype=table_dtype, num_threads=num_threads, _weight=table)
        bag.freeze = bool(freeze)
        return bag

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], tensor: str | None = None,
                        **options: Any) -> EmbeddingBag:
        """Load the table from a checkpoint file (see :func:`models.read_checkpoint`).

        Raises:
            CheckpointError: the file is missing, corrupt, unsafe or holds no usable table.
            ValueError: an option is invalid.
        """
        from models.checkpoints import read_checkpoint

        return cls.from_pretrained(read_checkpoint(path, tensor), **options)

    @property
    def weight(self) -> npt.NDArray[np.floating]:
        """The table used for lookups as floats, ``(num_embeddings, embedding_dim)``: the
        array itself for float32/float64 storage, a decoded copy for the others (use
        :attr:`table` for the stored form)."""
        return self._kernel.spec.weight

    @property
    def table(self) -> StoredTable:
        """The table in its storage form."""
        return self._kernel.spec.table

    @property
    def table_dtype(self) -> StorageDtype:
        """How the table is stored: ``"float32"``, ..., ``"int4"``."""
        return self._kernel.spec.table.storage

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        """The dtype of results and of ``per_sample_weights``."""
        return self._dtype

    @property
    def provider(self) -> str:
        """Where lookups really run: ``"numba-cpu"``, ``"CUDAExecutionProvider"``, ..."""
        return self._kernel.provider

    @property
    def kernel(self) -> Kernel:
        """The compute kernel (its ``name`` says which implementation runs)."""
        return self._kernel

    def forward(self, input: Any, offsets: Any = None,
                per_sample_weights: Any = None) -> npt.NDArray[np.floating]:
        """Pool each bag; returns ``(B, embedding_dim)`` in the table dtype.

        Args:
            input: int32/int64 ids, ``(B, L)`` or ``[N]`` with ``offsets``.
            offsets: int32/int64 ``[B]`` bag starts (``[B + 1]`` with
                ``include_last_offset``); ``None`` for 2-D input.
            per_sample_weights: floats shaped like ``input``; mode ``"sum"`` only.

        Raises:
            InvalidInputError (a ``ValueError``): invalid ids, offsets or weights.
        """
        pool = self._pool
        if pool is not None:
            # The kernel checks ids and bag bounds as it pools: no separate pass over the
            # ids. Anything it or the cheap checks refuse is worded by flatten_inputs.
            bags = usual_bags(input, offsets, per_sample_weights, self.mode,
                              self.include_last_offset, self._dtype)
            if bags >= 0:
                out, invalid = pool(input, offsets, bags, per_sample_weights)
            else:
                call = unchecked_call(input, offsets, per_sample_weights, mode=self.mode,
                                      include_last_offset=self.include_last_offset,
                                      dtype=self._dtype)
                out, invalid = (None, -1) if call is None else pool(*call)
            if not invalid:
                return out  # type: ignore[no-any-return]
        batch = flatten_inputs(input, offsets, per_sample_weights,
                               num_embeddings=self.num_embeddings, mode=self.mode,
                               include_last_offset=self.include_last_offset,
                               dtype=self._dtype)
        return self._kernel(batch.indices, batch.offsets, batch.per_sample_weights)

    __call__ = forward

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("padding_idx", self.padding_idx),
                                                     ("max_norm", self.max_norm)) if v is not None)
        return (f"EmbeddingBag({self.num_embeddings}, {self.embedding_dim}, "
                f"mode={self.mode!r}{extra}, backend={self._kernel.name!r})")
