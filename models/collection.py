"""``EmbeddingBagCollection``: many sparse features and tables per sample, TorchRec's way.

Names follow TorchRec: a table is an :class:`EmbeddingBagConfig` (``name``,
``feature_names``, ``pooling``, ``num_embeddings``, ``embedding_dim``); the module takes
keyed bags or a ``KeyedJaggedTensor``'s flat arrays and returns a :class:`KeyedTensor`
(``keys()``, ``length_per_key()``, ``offset_per_key()``, ``values()`` ``[B, sum of
dims]`` float32). Output order is TorchRec's: tables in config order, each table's
features in its ``feature_names`` order, whatever order a request's keys come in.

Ids beyond a table are handled per table by ``oov``: ``"error"`` (TorchRec does not check
and FBGEMM silently reads row 0; here it is an error naming feature, sample and
position), ``"zero"`` (the id is skipped, like padding) or ``"hash"`` (id modulo rows, for
hashed categorical features). Skipped and hashed ids are counted per feature.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kernels.base import TableSpec
from kernels.collection import (
    COMPUTE_DTYPE,
    CollectionSpec,
    make_collection_kernel,
    select_bags,
)
from kernels.storage import StoredTable, storage_dtype, store
from models.checkpoints import CheckpointError, list_tensors
from models.embedding_bag import _max_norm, _mode, _padding
from models.inputs import FlatBatch, InvalidInputError, _check_offsets, _integer_array
from models.renorm import renormed_table
from models.tables import load_table

Oov = Literal["error", "zero", "hash"]
OOV_POLICIES: tuple[Oov, ...] = ("error", "zero", "hash")


def _pooling(value: Any) -> str:
    """TorchRec's ``PoolingType.SUM`` / ``"SUM"`` / ``"sum"`` -> ``"sum"``."""
    name = getattr(value, "name", value)
    if not isinstance(name, str) or name.lower() not in ("sum", "mean", "max"):
        raise ValueError(f"pooling must be one of sum, mean, max; got {value!r}")
    return _mode(name.lower())


@dataclass(frozen=True)
class EmbeddingBagConfig:
    """One table of a collection (TorchRec's ``EmbeddingBagConfig`` plus serving options).

    Attributes:
        name: the table's name; its checkpoint tensor is ``embedding_bags.<name>.weight``
            unless ``tensor`` names another.
        feature_names: the features pooled from this table, in output order.
        pooling: ``"sum"``, ``"mean"`` or ``"max"`` (TorchRec's ``PoolingType`` works).
        num_embeddings, embedding_dim: optional; when given they must match the tensor.
        padding_idx, max_norm, norm_type: as :class:`models.EmbeddingBag`.
        table_dtype: storage (``float32`` default, ``float16``, ``bfloat16``, ``int8``,
            ``int4``).
        quantized_format: the checkpoint already holds quantized rows in this layout.
        oov: ``"error"``, ``"zero"`` or ``"hash"`` (see the module docstring).
        tensor: the checkpoint key holding the table.
    """

    name: str
    feature_names: tuple[str, ...]
    pooling: str = "sum"
    num_embeddings: int | None = None
    embedding_dim: int | None = None
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    table_dtype: str | None = None
    quantized_format: str | None = None
    oov: Oov = "error"
    tensor: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a table needs a name; got {self.name!r}")
        features: Any = self.feature_names
        if isinstance(features, str) or not all(isinstance(f, str) and f for f in features):
            raise ValueError(f"table {self.name!r}: feature_names must be a list of "
                             f"non-empty names; got {features!r}")
        object.__setattr__(self, "feature_names", tuple(features))
        if not self.feature_names:
            raise ValueError(f"table {self.name!r} has no features: name the features "
                             "pooled from it")
        object.__setattr__(self, "pooling", _pooling(self.pooling))
        if self.oov not in OOV_POLICIES:
            raise ValueError(f"table {self.name!r}: oov must be one of "
                             f"{', '.join(OOV_POLICIES)}; got {self.oov!r}")

    @property
    def key(self) -> str:
        """The checkpoint tensor of this table."""
        return self.tensor or f"embedding_bags.{self.name}.weight"


@dataclass(frozen=True)
class KeyedTensor:
    """A collection's output, as TorchRec's ``KeyedTensor``: ``values`` is float32
    ``[B, sum of dims]``, feature ``keys[i]`` in columns ``offset_per_key[i]`` to
    ``offset_per_key[i + 1]``."""

    keys_: tuple[str, ...]
    lengths: tuple[int, ...]
    values_: npt.NDArray[np.float32]

    def keys(self) -> list[str]:
        return list(self.keys_)

    def values(self) -> npt.NDArray[np.float32]:
        return self.values_

    def length_per_key(self) -> list[int]:
        return list(self.lengths)

    def offset_per_key(self) -> list[int]:
        return [int(c) for c in np.cumsum((0, *self.lengths))]

    def to_dict(self) -> dict[str, npt.NDArray[np.float32]]:
        """Each feature's ``[B, dim]`` columns."""
        offsets = self.offset_per_key()
        return {key: self.values_[:, offsets[i] : offsets[i + 1]]
                for i, key in enumerate(self.keys_)}


@dataclass(frozen=True)
class JaggedFeatures:
    """Request features in a KeyedJaggedTensor's layout: ``values`` feature major
    (int64 ``[N]``), ``lengths`` int64 ``[F, B]``, optional float32 ``weights`` ``[N]``
    and, per feature, whether weights were sent for it."""

    keys: tuple[str, ...]
    values: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32] | None = None
    weighted: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class CollectionBatch:
    """A validated request in kernel layout plus what its ids went through:
    ``oov[feature] = count`` of ids skipped (``zero``) or wrapped (``hash``)."""

    batch: FlatBatch
    samples: int
    oov: dict[str, int]


def jagged(keys: Any, values: Any, lengths: Any = None, offsets: Any = None,
           weights: Any = None) -> JaggedFeatures:
    """KeyedJaggedTensor-style arrays -> :class:`JaggedFeatures`.

    Args:
        keys: F feature names. values: ids, feature major. lengths: ``F * B`` bag lengths,
        or ``offsets``: ``F * B + 1`` bag starts (0 first, non-decreasing, ending at
        ``len(values)``). weights: floats like ``values``, or ``None``.

    Raises:
        InvalidInputError: anything malformed, named.
    """
    if (isinstance(keys, str) or not isinstance(keys, Sequence | np.ndarray)
            or not all(isinstance(k, str) for k in keys)):
        raise InvalidInputError(f"keys must be a list of feature names; got {keys!r:.80}")
    keys = tuple(keys)
    if not keys:
        raise InvalidInputError("keys must name at least one feature")
    ids = _integer_array("values", values)
    if ids.ndim != 1:
        raise InvalidInputError(f"values must be 1-D; got shape {ids.shape}")
    if (lengths is None) == (offsets is None):
        parts = "lengths (F * B entries) or offsets (F * B + 1 entries)"
        raise InvalidInputError(f"send {parts}, not both" if lengths is not None
                                else f"{parts} missing: a KJT needs one of them")
    if lengths is not None:
        counts = _integer_array("lengths", lengths)
        if counts.ndim != 1:
            raise InvalidInputError(f"lengths must be 1-D; got shape {counts.shape}")
        _check_split(counts.shape[0], len(keys))
        if counts.size and int(counts.min()) < 0:
            at = int(np.flatnonzero(counts < 0)[0])
            raise InvalidInputError(f"lengths[{at}] = {int(counts[at])} is negative")
        if int(counts.sum()) != ids.shape[0]:
            raise InvalidInputError(f"lengths add up to {int(counts.sum())} but values "
                                    f"holds {ids.shape[0]} ids")
    else:
        starts = _integer_array("offsets", offsets)
        if starts.ndim != 1 or starts.shape[0] == 0:
            raise InvalidInputError(f"offsets must be 1-D with F * B + 1 entries; got shape "
                                    f"{starts.shape}")
        _check_split(starts.shape[0] - 1, len(keys))
        counts = np.diff(_check_offsets(starts, ids.shape[0], True))
    floats = None
    if weights is not None:
        floats = _float_array("weights", weights, ids.shape[0])
    return JaggedFeatures(keys, ids, counts.reshape(len(keys), -1), floats)


def _check_split(bags: int, features: int) -> None:
    if bags % features:
        raise InvalidInputError(f"{bags} bags do not split evenly into {features} features "
                                "(lengths holds F * B entries, offsets F * B + 1, feature "
                                "major)")


def _float_array(name: str, value: Any, count: int) -> npt.NDArray[np.float32]:
    array = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if array.size == 0 and array.dtype == np.float64:
        array = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype,
                                                                          np.integer):
        raise InvalidInputError(f"{name} must hold numbers; got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    if array.shape[0] != count:
        raise InvalidInputError(f"{name} holds {array.shape[0]} values for {count} ids")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{name} holds NaN or infinite values")
    return array


def keyed(features: Mapping[str, Any], weights: Mapping[str, Any] | None = None
          ) -> JaggedFeatures:
    """Keyed bags ``{feature: [[id, ...], ...]}`` (optional ``{feature: [[w, ...], ...]}``)
    -> :class:`JaggedFeatures`.

    Raises:
        InvalidInputError: a feature that is not a list of id lists, weights that do not
            match their feature's bags.
    """
    if not isinstance(features, Mapping) or not features:
        raise InvalidInputError("features must map each feature name to its bags")
    weights = weights or {}
    if not isinstance(weights, Mapping):
        raise InvalidInputError("weights must map feature names to weight lists")
    ids, lengths, floats = [], [], {}
    for name, bags in features.items():
        values, counts = _ragged(bags, f"features[{name!r}]", np.int64)
        ids.append(values)
        lengths.append(counts)
        if name in weights:
            w, w_counts = _ragged(weights[name], f"weights[{name!r}]", np.float32)
            if not np.array_equal(w_counts, counts):
                raise InvalidInputError(f"weights[{name!r}] must match the bags of feature "
                                        f"{name!r}, one weight per id")
            floats[name] = w
    return stacked(tuple(features), ids, lengths, floats if weights else None)


def same_samples(keys: Sequence[str], samples: Sequence[int]) -> None:
    """Refuse features with different sample counts (``samples[i]`` of ``keys[i]``).

    Raises:
        InvalidInputError: naming each feature's count.
    """
    if len(set(samples)) > 1:
        shown = ", ".join(f"{key!r}: {n}" for key, n in zip(keys, samples, strict=True))
        raise InvalidInputError(f"every feature needs the same number of samples; got "
                                f"{shown}")


def stacked(keys: tuple[str, ...], ids: Sequence[npt.NDArray[np.int64]],
            lengths: Sequence[npt.NDArray[np.int64]],
            weights: Mapping[str, npt.NDArray[np.float32]] | None = None) -> JaggedFeatures:
    """Per-feature arrays (``ids[i]``, ``lengths[i]`` of feature ``keys[i]``; ``weights``
    by feature name, already matched to their ids) -> :class:`JaggedFeatures`.

    Raises:
        InvalidInputError: features with different sample counts, weights naming a
            feature that is not there.
    """
    weights = weights or {}
    unknown = sorted(set(weights) - set(keys))
    if unknown:
        raise InvalidInputError(f"weights name feature(s) {', '.join(map(repr, unknown))} "
                                "that are not in features")
    same_samples(keys, [counts.shape[0] for counts in lengths])
    floats = None
    if weights:
        floats = np.concatenate([weights[name] if name in weights
                                 else np.ones(values.shape[0], np.float32)
                                 for name, values in zip(keys, ids, strict=True)])
    return JaggedFeatures(keys, np.concatenate(ids), np.stack(lengths), floats,
                          tuple(name in weights for name in keys) if weights else None)


def _ragged(bags: Any, name: str, dtype: Any) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    if not isinstance(bags, list | tuple) or not all(isinstance(b, list | tuple | np.ndarray)
                                                     for b in bags):
        raise InvalidInputError(f"{name} must be a list of bags (lists), one per sample")
    counts = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
    flat = [x for b in bags for x in b]
    if dtype is not np.int64:
        return (_float_array(name, flat, len(flat)) if flat else np.zeros(0, np.float32)), counts
    if not all(type(x) is int or isinstance(x, np.integer) for x in flat):
        raise InvalidInputError(f"{name} must hold integer ids")
    try:
        return (np.array(flat, dtype=np.int64) if flat else np.zeros(0, np.int64)), counts
    except OverflowError:
        raise InvalidInputError(f"{name} holds an id beyond int64") from None


def check_tables(tables: Sequence[EmbeddingBagConfig]) -> None:
    """Refuse a table named twice and a feature named twice (a feature reads one table).

    Raises:
        ValueError: naming the table or the feature and both its tables.
    """
    owner: dict[str, str] = {}
    names: set[str] = set()
    for config in tables:
        if config.name in names:
            raise ValueError(f"table {config.name!r} is configured twice")
        names.add(config.name)
        for feature in config.feature_names:
            if feature in owner:
                raise ValueError(f"feature {feature!r} is named twice (tables "
                                 f"{owner[feature]!r} and {config.name!r}); a feature reads "
                                 "one table")
            owner[feature] = config.name


class EmbeddingBagCollection:
    """TorchRec's ``EmbeddingBagCollection`` for inference, without PyTorch.

    Args:
        tables: the table configs, in output order.
        weights: each table's rows by table name: a 2-D float array or a
            :class:`kernels.storage.StoredTable`.
        backend, device, num_threads: as :class:`models.EmbeddingBag` (``"numpy"`` and
            ``"auto"`` run every feature and table in one fused numba pass).

    Raises:
        ValueError: a feature named twice, a table without rows, shapes that disagree
            with the config, or an invalid option (the message names the table).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], weights: Mapping[str, Any], *,
                 backend: str = "auto", device: str = "auto",
                 num_threads: int | None = None) -> None:
        tables = list(tables)
        if not tables:
            raise ValueError("a collection needs at least one table")
        check_tables(tables)
        self.tables = tuple(tables)
        specs = []
        for config in tables:
            if config.name not in weights:
                raise ValueError(f"no rows for table {config.name!r}")
            specs.append(self._table_spec(config, weights[config.name]))
        features = tuple(f for config in tables for f in config.feature_names)
        feature_tables = tuple(t for t, config in enumerate(tables)
                               for _ in config.feature_names)
        self.spec = CollectionSpec(tuple(specs), features, feature_tables)
        self._kernel = make_collection_kernel(self.spec, backend, device=device,
                                              num_threads=num_threads)
        self.backend = backend
        self._rows = np.array([s.num_embeddings for s in specs], dtype=np.int64)[
            list(feature_tables)]
        self._oov = [tables[t].oov for t in feature_tables]
        self._summed = [tables[t].pooling == "sum" for t in feature_tables]
        self._position = {feature: i for i, feature in enumerate(features)}
        self._policies = np.array([OOV_POLICIES.index(p) for p in self._oov], dtype=np.int64)
        self._lay_out = _compiled_layout()

    @staticmethod
    def _table_spec(config: EmbeddingBagConfig, table: Any) -> TableSpec:
        where = f"table {config.name!r}"
        if not isinstance(table, StoredTable):
            table = np.asarray(table)
            if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
                raise ValueError(f"{where}: rows must be a 2-D float array; got "
                                 f"{table.dtype} {table.shape}")
        rows, dim = (table.rows, table.dim) if isinstance(table, StoredTable) else table.shape
        for option, value, actual in (("num_embeddings", config.num_embeddings, rows),
                                      ("embedding_dim", config.embedding_dim, dim)):
            if value is not None and value != actual:
                raise ValueError(f"{where}: {option} = {value} but its tensor "
                                 f"{config.key!r} has {actual}")
        if rows == 0 or dim == 0:
            raise ValueError(f"{where}: its tensor {config.key!r} is empty ({rows} x {dim})")
        storage = (table.storage if isinstance(table, StoredTable) and config.table_dtype
                   is None else storage_dtype(config.table_dtype or "float32"))
        try:
            stored = store(table, storage)
            max_norm, norm_type = _max_norm(config.max_norm, config.norm_type)
            if max_norm is not None:
                stored = renormed_table(stored, max_norm, norm_type)
            return TableSpec(stored, _mode(config.pooling),
                             _padding(config.padding_idx, rows))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str],
                        tables: Sequence[EmbeddingBagConfig], **options: Any
                        ) -> EmbeddingBagCollection:
        """Load every table from one file: a TorchRec state dict (``torch.save(
        ebc.state_dict())``, keys ``embedding_bags.<table>.weight``) or the same keys in
        safetensors (or any keys the configs name with ``tensor``).

        Raises:
            CheckpointError: unreadable file, or a table's tensor missing (the message
                names the table, the key and the keys available).
            ValueError: as the constructor.
        """
        path = Path(path)
        available = list_tensors(path)
        weights: dict[str, StoredTable] = {}
        for config in tables:
            key = _key_in(config, available)
            if key is None:
                shown = ", ".join(sorted(available)[:20]) or "none"
                raise CheckpointError(f"{path}: table {config.name!r} needs tensor "
                                      f"{config.key!r}, which the file does not hold; it "
                                      f"holds {shown} (name another with the table's "
                                      "tensor)")
            try:
                weights[config.name] = load_table(path, key,
                                                  table_dtype=config.table_dtype,
                                                  quantized_format=config.quantized_format)
            except CheckpointError as exc:
                raise CheckpointError(f"table {config.name!r}: {exc}") from None
        return cls(tables, weights, **options)

    # -- facts ---------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[str, ...]:
        """Feature names in output order."""
        return self.spec.features

    @property
    def dims(self) -> tuple[int, ...]:
        return self.spec.dims

    @property
    def offset_per_key(self) -> list[int]:
        return [*self.spec.cols, self.spec.total_dim]

    @property
    def embedding_dim(self) -> int:
        """A sample's vector length: the sum of its features' dims."""
        return self.spec.total_dim

    @property
    def kernel(self) -> Any:
        return self._kernel

    @property
    def provider(self) -> str:
        return str(self._kernel.provider)

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        return COMPUTE_DTYPE

    @property
    def table_dtype(self) -> str:
        """The tables' storage (``"mixed"`` when they differ)."""
        stored = {spec.table.storage for spec in self.spec.tables}
        return stored.pop() if len(stored) == 1 else "mixed"

    @property
    def table_bytes(self) -> int:
        return self.spec.table_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes one id gathers, on average over the features (each feature's row size
        counted once): what sizes a batch for the batcher's inline-or-thread choice."""
        sizes = [self.spec.tables[t].table.row_bytes for t in self.spec.feature_tables]
        return -(-sum(sizes) // len(sizes))

    # -- calls ---------------------------------------------------------------------------

    def batch(self, features: JaggedFeatures) -> CollectionBatch:
        """Validate a request and lay it out for the kernel (sample major, every feature
        in output order, ids checked or handled by their table's ``oov``).

        Raises:
            InvalidInputError: a feature missing or unknown, samples that differ, weights
                on a feature whose table does not sum, an id beyond its table (``oov =
                "error"``); each message names the feature.
        """
        order = self._order(features.keys)
        if self._lay_out is not None:
            return self._compiled_batch(features, order)
        return self._numpy_batch(features, order)

    def _compiled_batch(self, features: JaggedFeatures, order: list[int]) -> CollectionBatch:
        """:meth:`batch` in one compiled pass over the ids (NumPy's version below takes
        ~2.5x as long: its gathers and repeats each walk every id)."""
        count = len(self.keys)
        samples = features.lengths.shape[1]
        starts = np.zeros(features.lengths.size + 1, dtype=np.int64)
        np.cumsum(features.lengths.reshape(-1), out=starts[1:])
        total = features.values.shape[0]
        weights = features.weights
        ids = np.empty(total, np.int64)
        kept_weights = np.empty(0 if weights is None else total, np.float32)
        offsets = np.empty(samples * count + 1, np.int64)
        oov = np.zeros(count, np.int64)
        unweighted = np.zeros(count, np.bool_)
        positions = np.array(order, dtype=np.int64)
        kept, bad = self._lay_out(features.values, starts, positions, samples, self._rows,
                                  self._policies,
                                  np.empty(0, np.float32) if weights is None else weights,
                                  ids, kept_weights, offsets, oov, unweighted)
        if bad >= 0:
            bag = int(np.searchsorted(starts, kept, side="right")) - 1
            self._out_of_range(bad, bag - order[bad] * samples, kept - int(starts[bag]),
                               int(features.values[kept]))
        if weights is not None:
            for f in np.flatnonzero(~np.array(self._summed)):
                sent = (features.weighted[order[f]] if features.weighted is not None
                        else bool(unweighted[f]))
                if sent:
                    self._refuse_weights(int(f))
        return CollectionBatch(
            FlatBatch(ids[:kept], offsets, None if weights is None else kept_weights[:kept],
                      bags_per_row=count),
            samples, {self.keys[f]: int(oov[f]) for f in np.flatnonzero(oov)})

    def _numpy_batch(self, features: JaggedFeatures, order: list[int]) -> CollectionBatch:
        count = len(self.keys)
        lengths = features.lengths[order]
        samples = lengths.shape[1]
        # Feature-major bag starts of the request's own order, taken in output order.
        request_starts = np.zeros(features.lengths.size + 1, dtype=np.int64)
        np.cumsum(features.lengths.reshape(-1), out=request_starts[1:])
        fm_bags = (np.asarray(order)[:, None] * samples + np.arange(samples)[None, :])
        # Output order, feature major: ids of feature f are contiguous.
        ids_fm, starts_fm, picked = select_bags(features.values, request_starts,
                                               features.lengths.reshape(-1),
                                               fm_bags.reshape(-1))
        weights = None if features.weights is None else features.weights[picked]
        per_feature = lengths.sum(axis=1)
        feature_of_id = np.repeat(np.arange(count), per_feature)
        if weights is not None:
            self._check_weights(features, order, weights, feature_of_id)
        ids_fm, lengths, weights, oov = self._apply_oov(ids_fm, lengths, feature_of_id,
                                                        starts_fm, weights)
        # Sample major: bag (s, f) = s * F + f.
        fm_starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths.reshape(-1), out=fm_starts[1:])
        sm_bags = (np.arange(count)[None, :] * samples + np.arange(samples)[:, None])
        ids, offsets, picked = select_bags(ids_fm, fm_starts, lengths.reshape(-1),
                                          sm_bags.reshape(-1))
        if weights is not None:
            weights = weights[picked]
        return CollectionBatch(FlatBatch(ids, offsets, weights, bags_per_row=count),
                               samples, oov)

    def _out_of_range(self, f: int, sample: int, position: int, value: int) -> None:
        table = self.tables[self.spec.feature_tables[f]]
        raise InvalidInputError(
            f"feature {self.keys[f]!r}, sample {sample}, position {position}: id {value} is "
            f"outside [0, {int(self._rows[f])}) of table {table.name!r} (a table with oov = "
            "\"zero\" or \"hash\" accepts such ids)")

    def _refuse_weights(self, f: int) -> None:
        table = self.tables[self.spec.feature_tables[f]]
        raise InvalidInputError(f"weights for feature {self.keys[f]!r}: its table "
                                f"{table.name!r} pools by {table.pooling}; per-id weights "
                                "need sum pooling")

    def _order(self, keys: tuple[str, ...]) -> list[int]:
        """Positions in the request of each output feature."""
        if keys == self.keys:  # the usual request (KServe's reader sends this order)
            return list(range(len(keys)))
        given = {}
        for position, key in enumerate(keys):
            if key in given:
                raise InvalidInputError(f"feature {key!r} is given twice")
            given[key] = position
        unknown = [k for k in keys if k not in self._position]
        if unknown:
            raise InvalidInputError(f"unknown feature(s) {', '.join(map(repr, unknown))}; "
                                    f"this collection reads {', '.join(self.keys)}")
        missing = [k for k in self.keys if k not in given]
        if missing:
            raise InvalidInputError(f"feature(s) {', '.join(map(repr, missing))} missing: "
                                    f"every feature of the collection ({', '.join(self.keys)})"
                                    " must be sent, an empty bag where a sample has none")
        return [given[k] for k in self.keys]

    def _check_weights(self, features: JaggedFeatures, order: list[int],
                       weights: npt.NDArray[np.float32],
                       feature_of_id: npt.NDArray[np.int64]) -> None:
        """Weights only on features of sum-pooled tables (others may carry exactly 1)."""
        for f, summed in enumerate(self._summed):
            if summed:
                continue
            sent = (features.weighted[order[f]] if features.weighted is not None
                    else bool((weights[feature_of_id == f] != 1).any()))
            if sent:
                self._refuse_weights(f)

    def _apply_oov(self, ids: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
                   feature_of_id: npt.NDArray[np.int64], starts: npt.NDArray[np.int64],
                   weights: npt.NDArray[np.float32] | None
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                              npt.NDArray[np.float32] | None, dict[str, int]]:
        """Check feature-major ids against their tables: ``(ids, lengths, weights,
        counts)`` after each table's ``oov`` policy, ``counts[feature]`` the ids it
        skipped or hashed.

        Raises:
            InvalidInputError: an id outside a table whose policy is ``"error"``.
        """
        if ids.size == 0:
            return ids, lengths, weights, {}
        bound = self._rows[feature_of_id]
        outside = (ids < 0) | (ids >= bound)
        if not outside.any():
            return ids, lengths, weights, {}
        counts: dict[str, int] = {}
        for f in np.unique(feature_of_id[outside]):
            mine = outside & (feature_of_id == f)
            if self._oov[f] == "error":
                position = int(np.flatnonzero(mine)[0])
                bag = int(np.searchsorted(starts, position, side="right")) - 1
                self._out_of_range(int(f), bag - int(f) * lengths.shape[1],
                                   position - int(starts[bag]), int(ids[position]))
            counts[self.keys[f]] = int(mine.sum())
        ids = ids.copy()
        hashed = outside & np.array([p == "hash" for p in self._oov])[feature_of_id]
        ids[hashed] = np.mod(ids[hashed], bound[hashed])
        dropped = outside & ~hashed
        if dropped.any():
            bag_of_id = np.repeat(np.arange(lengths.size), lengths.reshape(-1))
            lengths = lengths - np.bincount(bag_of_id[dropped], minlength=lengths.size
                                            ).reshape(lengths.shape)
            ids = ids[~dropped]
            weights = None if weights is None else weights[~dropped]
        return ids, lengths, weights, counts

    def __call__(self, features: Any = None, *, weights: Mapping[str, Any] | None = None,
                 **kjt: Any) -> KeyedTensor:
        """Pool every feature of every sample.

        Args:
            features: keyed bags ``{feature: [[id, ...], ...]}`` (with ``weights``
                ``{feature: [[w, ...], ...]}``), a :class:`JaggedFeatures`, or a TorchRec
                ``KeyedJaggedTensor`` (anything with ``keys()``, ``values()``,
                ``lengths()`` and ``weights_or_none()``); or pass the KJT arrays as
                keywords: ``keys=``, ``values=``, ``lengths=`` or ``offsets=``,
                ``weights=``.

        Returns the :class:`KeyedTensor` of ``[B, sum of dims]`` float32.

        Raises:
            InvalidInputError: invalid input (the message names the feature).
        """
        if features is None:
            parsed = jagged(**{k: v for k, v in {**kjt, "weights": weights}.items()})
        elif isinstance(features, JaggedFeatures):
            parsed = features
        elif hasattr(features, "lengths") and hasattr(features, "keys") and callable(
                getattr(features, "values", None)) and not isinstance(features, Mapping):
            get_weights = getattr(features, "weights_or_none", lambda: None)
            parsed = jagged(list(features.keys()), _numpy(features.values()),
                            _numpy(features.lengths()), weights=_numpy(get_weights()))
        else:
            parsed = keyed(features, weights)
        batch = self.batch(parsed).batch
        rows = self._kernel(batch.indices, batch.offsets, batch.per_sample_weights)
        return KeyedTensor(self.keys, self.dims, rows)

    forward = __call__

    def __repr__(self) -> str:
        tables = ", ".join(f"{t.name}({t.pooling}: {', '.join(t.feature_names)})"
                           for t in self.tables)
        return f"EmbeddingBagCollection([{tables}], backend={self._kernel.name!r})"


def _key_in(config: EmbeddingBagConfig, available: Mapping[str, Any]) -> str | None:
    """The checkpoint key of a table: its ``tensor``, or ``embedding_bags.<name>.weight``
    alone or under one module prefix (a whole model's state dict, e.g. DLRM's
    ``sparse_arch.embedding_bag_collection.embedding_bags.<name>.weight``); ``None`` when
    absent or when several prefixes hold it (the config then names one)."""
    if config.key in available:
        return config.key
    if config.tensor is not None:
        return None
    nested = [key for key in available if key.endswith("." + config.key)]
    return nested[0] if len(nested) == 1 else None


def _compiled_layout() -> Any:
    """The compiled layout pass (:func:`kernels.numba_collection.lay_out`), or ``None``
    without numba (NumPy's version then lays requests out)."""
    from kernels import numba_kernel

    if not numba_kernel.available():
        return None
    from kernels import numba_collection

    return numba_collection.lay_out


def _numpy(value: Any) -> Any:
    """A torch tensor (or anything array-like) as a NumPy array; ``None`` stays."""
    if value is None:
        return None
    detach = getattr(value, "detach", None)
    if detach is not None:
        value = detach().cpu().numpy()
    return np.asarray(value)
