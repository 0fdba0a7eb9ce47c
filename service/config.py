"""Model specs: which tables to serve and how, from a TOML file or the built-in demo.

```toml
[[models]]
name = "items"
checkpoint = "items.safetensors"   # relative to this file
tensor = "weight"                  # key inside the checkpoint, when it holds several
mode = "mean"                      # plus padding_idx, max_norm, norm_type, include_last_offset
backend = "auto"                   # numpy | onnx | auto
table_dtype = "int8"               # float32 (default) | float64 | float16 | bfloat16 | int8 | int4
quantized_format = "byte_rowwise"  # already quantized: byte_rowwise | 4bit_rowwise
                                   # | torchrec_int8 | torchrec_int4 (scale, bias in front)
```

An entry with ``[[models.tables]]`` is a collection (TorchRec's EmbeddingBagCollection):

```toml
[[models]]
name = "ranker"
checkpoint = "ebc.pt"              # torch.save(ebc.state_dict()) or safetensors
[[models.tables]]
name = "t_item"                    # tensor defaults to embedding_bags.<name>.weight
features = ["history", "candidates"]
pooling = "mean"                   # sum | mean | max; also padding_idx, max_norm,
                                   # norm_type, table_dtype, quantized_format, tensor
oov = "error"                      # error | zero (skip the id) | hash (id modulo rows)
```

A ``checkpoint`` naming a folder (model2vec's layout, or sentence-transformers'
StaticEmbedding) is a text model; ``normalize`` and ``max_length`` override its config.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kernels.storage import QUANTIZED_FORMATS, STORAGE_DTYPES
from models.collection import EmbeddingBagConfig, check_tables
from service.settings import usable_cores

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Model names appear in URLs and metric labels: keep them plain.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

DEMO_NAME = "demo"
DEMO_ROWS = 10_000
DEMO_DIM = 64
DEMO_SEED = 20261124


class ConfigError(ValueError):
    """The model config is invalid; the message names the file, model and field."""


@dataclass(frozen=True)
class ModelSpec:
    """One served table. ``checkpoint`` is ``None`` only for the built-in demo model."""

    name: str
    checkpoint: Path | None = None
    tensor: str | None = None
    mode: str = "mean"
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    include_last_offset: bool = False
    backend: str = "auto"
    device: str = "auto"
    table_dtype: str | None = None
    quantized_format: str | None = None
    num_threads: int | None = None
    #: A collection's tables (``None``: a single-table model).
    tables: tuple[EmbeddingBagConfig, ...] | None = None
    #: Text models (``checkpoint`` a model2vec folder): override the folder's config.
    normalize: bool | None = None
    max_length: int | None = None


DEMO = ModelSpec(name=DEMO_NAME, mode="mean", backend="auto")

_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "checkpoint": (str,), "tensor": (str,), "mode": (str,),
    "padding_idx": (int,), "max_norm": (int, float), "norm_type": (int, float),
    "include_last_offset": (bool,), "backend": (str,), "device": (str,),
    "table_dtype": (str,), "quantized_format": (str,), "num_threads": (int,),
    "tables": (list,), "normalize": (bool,), "max_length": (int,),
}
#: A collection table's fields and their TOML types.
_TABLE_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "features": (list,), "feature_names": (list,), "pooling": (str,),
    "tensor": (str,),
    "padding_idx": (int,), "max_norm": (int, float), "norm_type": (int, float),
    "table_dtype": (str,), "quantized_format": (str,), "oov": (str,),
    "num_embeddings": (int,), "embedding_dim": (int,),
}
#: Model-level fields that belong to a collection's tables instead.
_TABLE_ONLY = ("tensor", "mode", "padding_idx", "max_norm", "norm_type", "table_dtype",
               "quantized_format", "include_last_offset")


def _typed(entry: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> None:
    unknown = sorted(set(entry) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(types))}")
    for key, value in entry.items():
        expected = types[key]
        if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            raise ConfigError(f"{where}: field {key!r} must be "
                              f"{' or '.join(t.__name__ for t in expected)}; got {value!r}")


def _tables(entries: list[Any], where: str) -> tuple[EmbeddingBagConfig, ...]:
    """A collection's ``[[models.tables]]``, checked: fields, features named once."""
    if not entries:
        raise ConfigError(f"{where}: tables is empty; list at least one [[models.tables]]")
    tables: list[EmbeddingBagConfig] = []
    for i, entry in enumerate(entries):
        at = f"{where}: tables[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: each [[models.tables]] entry must be a table")
        _typed(entry, _TABLE_TYPES, at)
        values = dict(entry)
        if "table_dtype" in values and values["table_dtype"] not in STORAGE_DTYPES:
            raise ConfigError(f"{at}: table_dtype must be one of {', '.join(STORAGE_DTYPES)}; "
                              f"got {values['table_dtype']!r}")
        if "quantized_format" in values and values["quantized_format"] not in QUANTIZED_FORMATS:
            raise ConfigError(f"{at}: quantized_format must be one of "
                              f"{', '.join(QUANTIZED_FORMATS)}; got "
                              f"{values['quantized_format']!r}")
        if "feature_names" in values:  # TorchRec's name for it
            if "features" in values:
                raise ConfigError(f"{at}: give features or feature_names, not both")
            values["features"] = values.pop("feature_names")
        if "features" not in values:
            raise ConfigError(f"{at} ({values.get('name')}): features is required (the "
                              "feature names pooled from this table)")
        values["feature_names"] = tuple(values.pop("features"))
        for key in ("max_norm", "norm_type"):
            if key in values:
                values[key] = float(values[key])
        try:
            table = EmbeddingBagConfig(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{at}: {exc}") from None
        tables.append(table)
        try:
            check_tables(tables)
        except ValueError as exc:
            raise ConfigError(f"{at}: {exc}") from None
    return tuple(tables)


def _spec(entry: Any, where: str, base: Path) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each [[models]] entry must be a table")
    _typed(entry, _TYPES, where)
    name = entry.get("name")
    if name is None or not NAME.match(name):
        raise ConfigError(f"{where}: name must match {NAME.pattern}; got {name!r}")
    if "checkpoint" not in entry:
        raise ConfigError(f"{where} ({name}): checkpoint is required")
    values = dict(entry)
    values["checkpoint"] = (base / entry["checkpoint"]).resolve()
    if values["checkpoint"].is_dir():
        misplaced = [key for key in _TABLE_ONLY if key in values]
        if misplaced:
            raise ConfigError(f"{where} ({name}): {', '.join(misplaced)} apply to tables, "
                              "not to a text model (its checkpoint is a model folder; it "
                              "mean-pools its stored table as the folder says)")
    if "normalize" in values or "max_length" in values:
        if values["checkpoint"].is_file():
            raise ConfigError(f"{where} ({name}): normalize and max_length apply to text "
                              "models, whose checkpoint is a model2vec folder")
        if values.get("max_length", 1) < 1:
            raise ConfigError(f"{where} ({name}): max_length must be a positive number of "
                              f"tokens; got {values['max_length']}")
    if "tables" in values:
        misplaced = [key for key in _TABLE_ONLY if key in values]
        if misplaced:
            shown = ", ".join("mode (there: pooling)" if key == "mode" else key
                              for key in misplaced)
            raise ConfigError(f"{where} ({name}): {shown} belong(s) to each "
                              "[[models.tables]] entry of a collection, not to the model")
        values["tables"] = _tables(values["tables"], f"{where} ({name})")
        return ModelSpec(**values)
    if "table_dtype" in values and values["table_dtype"] not in STORAGE_DTYPES:
        raise ConfigError(f"{where} ({name}): table_dtype must be one of "
                          f"{', '.join(STORAGE_DTYPES)}; got {values['table_dtype']!r}")
    if "quantized_format" in values:
        stored = QUANTIZED_FORMATS.get(values["quantized_format"])
        if stored is None:
            raise ConfigError(f"{where} ({name}): quantized_format must be one of "
                              f"{', '.join(QUANTIZED_FORMATS)}; got "
                              f"{values['quantized_format']!r}")
        if values.setdefault("table_dtype", stored) != stored:
            raise ConfigError(f"{where} ({name}): quantized_format "
                              f"{values['quantized_format']!r} holds {stored} rows; "
                              f"table_dtype {values['table_dtype']!r} does not fit it")
    for key in ("max_norm", "norm_type"):
        if key in values:
            values[key] = float(values[key])
    return ModelSpec(**values)


def share_threads(spec: ModelSpec, workers: int) -> ModelSpec:
    """``spec`` as one of ``workers`` processes serves it: without its own
    ``num_threads`` it gets its share of the usable cores (those ``--workers auto``
    counts), so N workers' kernels do not oversubscribe the machine."""
    if workers <= 1 or spec.num_threads is not None:
        return spec
    return replace(spec, num_threads=max(1, usable_cores() // workers))


def checkpoint_stamp(spec: ModelSpec) -> tuple[int, int, int] | None:
    """What tells a rewritten checkpoint from the one loaded: ``(inode, size, mtime)``;
    ``None`` for the demo table or a file that cannot be read (a reload then tries, and
    reports why)."""
    if spec.checkpoint is None:
        return None
    try:
        stat = spec.checkpoint.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def config_changes(specs: list[ModelSpec], served: dict[str, ModelSpec],
                   stamps: dict[str, tuple[int, int, int] | None], serving: set[str]
                   ) -> tuple[list[str], list[str]]:
    """What a config reload does: ``(names to load, names to unload)``. Loaded: entries
    not ``serving``, entries whose options differ from ``served``, and entries whose
    checkpoint was rewritten since (its stamp differs); unloaded: serving names the file no
    longer has."""
    load = [spec.name for spec in specs
            if spec.name not in serving or spec != served.get(spec.name)
            or checkpoint_stamp(spec) != stamps.get(spec.name)]
    unload = sorted(serving - {spec.name for spec in specs})
    return load, unload


def load_config(path: str | Path) -> list[ModelSpec]:
    """Read the ``[[models]]`` of a TOML file; checkpoints resolve relative to it.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown or mistyped fields, duplicate names.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    entries = document.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected at least one [[models]] table")
    specs = [_spec(entry, f"{path}: models[{i}]", path.parent)
             for i, entry in enumerate(entries)]
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: duplicate model name(s): {', '.join(duplicates)}")
    return specs


def served_config(path: str | Path, workers: int) -> list[ModelSpec]:
    """The config's entries as each of ``workers`` processes serves them (thread shares).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    return [share_threads(spec, workers) for spec in load_config(path)]
