"""Load the configured models: checkpoint -> EmbeddingBag -> warm-up -> ready."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from kernels.storage import StoredTable, storage_dtype, store
from models import EmbeddingBag, flatten_inputs, load_table
from models.collection import EmbeddingBagCollection, jagged
from models.text import StaticModel
from service.config import DEMO_DIM, DEMO_ROWS, DEMO_SEED, ModelSpec
from service.floatjson import warm_up as warm_json_writer
from service.heap import release_freed_memory
from service.jsonbags import parse_bags, parse_kjt
from service.kserve_features import warm_up as warm_kserve_reader

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the file."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready model: its spec, the module that computes it (one table, or a collection
    of tables and features), and its version (1 at start-up, one more on every load)."""

    spec: ModelSpec
    bag: EmbeddingBag | EmbeddingBagCollection | StaticModel
    version: int = 1
    #: When this version was loaded (seconds since the epoch; OpenAI's ``created``).
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        """The length of one answered vector (a collection's: the sum of its dims)."""
        return self.bag.embedding_dim

    @property
    def kind(self) -> str:
        """``"table"``, ``"collection"`` or ``"text"``."""
        bag = self.bag
        return ("collection" if isinstance(bag, EmbeddingBagCollection)
                else "text" if isinstance(bag, StaticModel) else "table")

    @property
    def row_bytes(self) -> int:
        """Bytes one id gathers (a collection's: the mean over its features)."""
        bag = self.bag
        return bag.row_bytes if isinstance(bag, EmbeddingBagCollection) else bag.table.row_bytes

    @property
    def table_bytes(self) -> int:
        bag = self.bag
        return (bag.table_bytes if isinstance(bag, EmbeddingBagCollection)
                else bag.table.nbytes)

    def describe(self) -> dict[str, object]:
        """The public facts about the model (``GET /v1/models``)."""
        bag = self.bag
        facts: dict[str, object] = {
            "id": self.name, "object": "model", "created": int(self.loaded_at),
            "owned_by": "bagserve", "kind": self.kind,
            "version": self.version, "dim": self.dim, "dtype": str(bag.compute_dtype),
            "table_dtype": bag.table_dtype, "table_bytes": self.table_bytes,
            "backend": bag.kernel.name, "provider": bag.provider}
        if isinstance(bag, StaticModel):
            facts.update({"rows": bag.table.rows, "vocabulary": bag.tokenizer.get_vocab_size(),
                          "normalize": bag.normalize, "max_length": bag.max_length,
                          "weights": bag.weights is not None,
                          "mapping": bag.mapping is not None})
        elif isinstance(bag, EmbeddingBagCollection):
            facts.update({
                "keys": list(bag.keys), "dims": list(bag.dims),
                "offset_per_key": bag.offset_per_key,
                "tables": [{"name": config.name, "features": list(config.feature_names),
                            "pooling": config.pooling, "rows": spec.num_embeddings,
                            "dim": spec.embedding_dim, "table_dtype": spec.table.storage,
                            "padding_idx": spec.padding_idx, "oov": config.oov}
                           for config, spec in zip(bag.tables, bag.spec.tables,
                                                   strict=True)]})
        else:
            facts.update({"rows": bag.num_embeddings, "mode": bag.mode,
                          "padding_idx": bag.padding_idx,
                          "include_last_offset": bag.include_last_offset})
        return facts


def demo_table() -> np.ndarray:
    """The built-in demo table: deterministic, no download."""
    rng = np.random.default_rng(DEMO_SEED)
    return rng.standard_normal((DEMO_ROWS, DEMO_DIM), dtype=np.float32)


def load_model(spec: ModelSpec, version: int = 1) -> LoadedModel:
    """Read the checkpoint, build the module and run one warm-up batch.

    Raises:
        ModelLoadError: missing, corrupt or unsafe checkpoint, options that do not fit
            it, or a backend that cannot start; the message names model and file.
    """
    started = time.perf_counter()
    source = "built-in demo table" if spec.checkpoint is None else str(spec.checkpoint)
    # A first start compiles the readers and kernels (~20-30 s on 2 cores, cached on disk
    # afterwards): without a word here, the log stayed silent that long.
    logger.info("loading model (a first start compiles the kernels: up to ~30 s; "
                "later starts read numba's cache)", extra={"model": spec.name, "source": source})
    # The compiled readers of native bodies, whichever model kind: every body that is not
    # a bags body is offered to the KJT reader (a first call compiled or loaded them while
    # a fresh server's first client waited 0.5 s).
    parse_bags(b'{"bags": [[0, 1], []]}')
    parse_kjt(b'{"kjt": {"keys": ["a"], "values": [1], "lengths": [1]}}')
    warm_json_writer()  # and the writer of large JSON answers
    if spec.tables is not None:
        return _load_collection(spec, version, source, started)
    if spec.checkpoint is not None and spec.checkpoint.is_dir():
        return _load_text(spec, version, source, started)
    try:
        # Read straight into the table's storage: no float32 copy of a table kept in
        # half precision or quantized.
        table = (store(demo_table(), storage_dtype(spec.table_dtype or "float32"))
                 if spec.checkpoint is None
                 else load_table(spec.checkpoint, spec.tensor, table_dtype=spec.table_dtype,
                                 quantized_format=spec.quantized_format))
        bag = EmbeddingBag.from_pretrained(
            table, mode=spec.mode, padding_idx=spec.padding_idx, max_norm=spec.max_norm,
            norm_type=spec.norm_type, include_last_offset=spec.include_last_offset,
            backend=spec.backend, device=spec.device, num_threads=spec.num_threads)
        _check_finite(bag.table)
        warm_up(bag)
        release_freed_memory()
    except (ValueError, OSError, RuntimeError) as exc:
        hint = ""
        folder = None if spec.checkpoint is None else spec.checkpoint.parent
        if folder is not None and (folder / "tokenizer.json").is_file():
            hint = (f" (the file sits in a text model's folder: set checkpoint to the folder "
                    f"{str(folder)!r} to serve it as a text model)")
        raise ModelLoadError(f"model {spec.name!r} ({source}): {exc}{hint}") from exc
    logger.info("model loaded", extra={"model": spec.name, "version": version,
                                       "source": source,
                                       "rows": bag.num_embeddings, "dim": bag.embedding_dim,
                                       "provider": bag.provider,
                                       "seconds": round(time.perf_counter() - started, 3)})
    return LoadedModel(spec, bag, version)


def _load_collection(spec: ModelSpec, version: int, source: str, started: float
                     ) -> LoadedModel:
    assert spec.tables is not None and spec.checkpoint is not None
    try:
        bag = EmbeddingBagCollection.from_checkpoint(
            spec.checkpoint, spec.tables, backend=spec.backend, device=spec.device,
            num_threads=spec.num_threads)
        for config, table in zip(bag.tables, bag.spec.tables, strict=True):
            try:
                _check_finite(table.table)
            except ValueError as exc:
                raise ValueError(f"table {config.name!r}: {exc}") from None
        bag.kernel.warm_up()
        # The compiled per-request checks and layout.
        features = len(bag.keys)
        bag.batch(jagged(list(bag.keys), np.zeros(features, np.int64),
                         np.ones(features, np.int64)))
        warm_kserve_reader(bag.keys)
        release_freed_memory()
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"model {spec.name!r} ({source}): {exc}") from exc
    logger.info("collection loaded", extra={
        "model": spec.name, "version": version, "source": source,
        "tables": len(bag.tables), "features": len(bag.keys), "dim": bag.embedding_dim,
        "provider": bag.provider, "seconds": round(time.perf_counter() - started, 3)})
    return LoadedModel(spec, bag, version)


def _load_text(spec: ModelSpec, version: int, source: str, started: float) -> LoadedModel:
    """A static text model from its folder: table checked, pooling compiled and run once."""
    assert spec.checkpoint is not None
    try:
        bag = StaticModel.from_pretrained(
            spec.checkpoint, normalize=spec.normalize,
            max_length="config" if spec.max_length is None else spec.max_length)
        _check_finite(bag.table)
        bag.encode(["warm up", ""])
        release_freed_memory()
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"model {spec.name!r} ({source}): {exc}") from exc
    logger.info("text model loaded", extra={
        "model": spec.name, "version": version, "source": source, "rows": bag.table.rows,
        "dim": bag.dim, "vocabulary": bag.tokenizer.get_vocab_size(),
        "seconds": round(time.perf_counter() - started, 3)})
    return LoadedModel(spec, bag, version)


def warm_up(bag: EmbeddingBag) -> None:
    """Run every kernel variant a request can reach, so none compiles (numba) or builds
    a session (ONNX) while a client waits: unweighted and, in sum mode, weighted. Whether
    the request's arrays are writable does not matter: the numba kernel hands its loops
    read-only views only, so one specialisation serves both."""
    kernel = bag.kernel
    ids = np.zeros(4, dtype=np.int64)
    offsets = np.array([0, 2, 4], dtype=np.int64)
    kernel_warm_up = getattr(kernel, "warm_up", None)
    if kernel_warm_up is not None:
        kernel_warm_up()  # the numba kernel: every loop, serial and parallel
    else:
        kernel(ids, offsets)
        if bag.mode == "sum":
            kernel(ids, offsets, np.ones(4, dtype=bag.compute_dtype))
    # The compiled per-request checks.
    flatten_inputs(ids, offsets[:-1], num_embeddings=bag.num_embeddings, mode=bag.mode)


def _check_finite(table: StoredTable, rows_per_step: int = 1 << 16) -> None:
    """Refuse tables with NaN or infinite rows: every lookup touching one is garbage."""
    for start, block in table.blocks(rows_per_step):
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            hint = ("" if table.is_float else
                    f" as stored in {table.storage} (a value beyond its range becomes "
                    f"infinite)" if not table.storage.startswith("int") else
                    f" as stored in {table.storage} (from a NaN or infinite float value, or "
                    "rows not in the quantized_format the config names)")
            raise ValueError(f"table row {row} holds NaN or infinite values{hint}")
