"""Load the configured models: checkpoint -> EmbeddingBag -> warm-up -> ready."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from kernels.storage import storage_dtype, store
from models import EmbeddingBag, flatten_inputs, load_table
from service.config import DEMO_DIM, DEMO_ROWS, DEMO_SEED, ModelSpec
from service.heap import release_freed_memory

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the file."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready model: its spec, the module that computes it, and its version (1 at
    start-up, one more on every load)."""

    spec: ModelSpec
    bag: EmbeddingBag
    version: int = 1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.bag.embedding_dim

    def describe(self) -> dict[str, object]:
        """The public facts about the model (``GET /v1/models``)."""
        return {"id": self.name, "object": "model", "owned_by": "bagserve",
                "version": self.version, "dim": self.dim,
                "rows": self.bag.num_embeddings, "mode": self.bag.mode,
                "dtype": str(self.bag.compute_dtype), "table_dtype": self.bag.table_dtype,
                "table_bytes": self.bag.table.nbytes, "backend": self.bag.kernel.name,
                "provider": self.bag.provider, "padding_idx": self.bag.padding_idx,
                "include_last_offset": self.bag.include_last_offset}


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
        _check_finite(bag)
        warm_up(bag)
        release_freed_memory()
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"model {spec.name!r} ({source}): {exc}") from exc
    logger.info("model loaded", extra={"model": spec.name, "version": version,
                                       "source": source,
                                       "rows": bag.num_embeddings, "dim": bag.embedding_dim,
                                       "provider": bag.provider,
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


def _check_finite(bag: EmbeddingBag, rows_per_step: int = 1 << 16) -> None:
    """Refuse tables with NaN or infinite rows: every lookup touching one is garbage."""
    table = bag.table
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
