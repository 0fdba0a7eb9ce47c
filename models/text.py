"""Static sentence-embedding models: a tokenizer in front of a mean-pooled table.

``StaticModel`` loads a model2vec folder (``config.json``, ``model.safetensors`` with
``embeddings`` and optional per-token ``weights`` and ``mapping``, ``tokenizer.json``) or
sentence-transformers' StaticEmbedding layouts (``config_sentence_transformers.json``
with ``model.safetensors`` holding ``embedding.weight`` and ``tokenizer.json``, at the top
or under ``0_StaticEmbedding/``), and encodes texts exactly as model2vec 0.10's
``StaticModel.encode``: no special tokens; each text first cut to ``max_length * median
token length`` characters, then to ``max_length`` tokens; the unknown token dropped;
rows looked up through ``mapping`` when present and multiplied by ``weights[token]``;
the mean over the tokens; L2-normalised when ``normalize``; zeros for a text with no
tokens left.

The table keeps its stored dtype (float32, float16, float64, or int8 kept as exact
integers in the int8 row storage); the tokenizer is configured once at load and never
changed per call, so one model serves concurrent callers (model2vec's own ``encode``
re-configures its shared tokenizer's truncation on every call).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.storage import StoredTable, from_codes, storage_dtype, store
from models.checkpoints import CheckpointError, list_tensors

#: model2vec's default ``max_length`` when a folder's config names none.
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class _Layout:
    config: str
    tensors: str
    tokenizer: str
    embedding: str


#: The folder layouts model2vec 0.10 reads, in the order it tries them.
LAYOUTS = (
    _Layout("config.json", "model.safetensors", "tokenizer.json", "embeddings"),
    _Layout("config_sentence_transformers.json", "model.safetensors", "tokenizer.json",
            "embedding.weight"),
    _Layout("config_sentence_transformers.json", "0_StaticEmbedding/model.safetensors",
            "0_StaticEmbedding/tokenizer.json", "embedding.weight"),
)


@dataclass(frozen=True)
class TextBatch:
    """Texts waiting to be embedded together (the batcher's unit for text models): one
    output row per text. ``work`` (characters) stands in for ids in queue accounting."""

    texts: tuple[str, ...]

    @property
    def num_bags(self) -> int:
        return len(self.texts)

    num_rows = num_bags
    bags_per_row = 1

    @property
    def work(self) -> int:
        return sum(map(len, self.texts))


@dataclass(frozen=True)
class _Engine:
    """What runs a text model's pooling, as a kernel reports it."""

    name: str
    provider: str


#: The NumPy dtype of each storage's values as a model folder holds them.
_STORED: dict[str, Any] = {"float32": np.float32, "float64": np.float64,
                           "float16": np.float16, "int8": np.int8}


class TextModelError(ValueError):
    """A folder that is no static model, or whose parts disagree; names file and problem."""


def _layout(folder: Path) -> _Layout:
    for layout in LAYOUTS:
        if all((folder / name).is_file() for name in (layout.config, layout.tensors,
                                                      layout.tokenizer)):
            return layout
    expected = "; ".join(f"{o.config} + {o.tensors} + {o.tokenizer}" for o in LAYOUTS)
    raise TextModelError(f"{folder}: not a static model folder; expected one of: {expected}")


def _tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises its own exceptions
        raise TextModelError(f"{path}: not a Hugging Face tokenizer: {exc}") from None


def unknown_token_id(tokenizer: Any) -> int | None:
    """The unknown token's id as model2vec finds it: the model's ``unk_token`` (WordPiece,
    BPE, WordLevel) or its ``unk_id`` (Unigram); ``None`` when it has none."""
    model = tokenizer.model
    if hasattr(model, "unk_token"):
        token = model.unk_token
        return None if token is None else tokenizer.token_to_id(token)
    unk: int | None = json.loads(tokenizer.to_str())["model"].get("unk_id")
    return unk


class StaticModel:
    """A static sentence-embedding model (model2vec / StaticEmbedding).

    Args:
        table: the embedding rows, ``(rows, dim)``, in their storage form.
        tokenizer: a ``tokenizers.Tokenizer`` (copied; padding disabled, truncation set
            to ``max_length`` once).
        weights: per-token floats ``[vocab]`` or ``None``.
        mapping: per-token row ids ``[vocab]`` or ``None`` (then ``rows == vocab``).
        normalize: L2-normalise each vector.
        max_length: tokens kept per text (``None``: all).

    Raises:
        TextModelError: sizes that disagree (names what was expected).
    """

    def __init__(self, table: StoredTable, tokenizer: Any, *,
                 weights: npt.NDArray[np.floating] | None = None,
                 mapping: npt.NDArray[np.integer] | None = None, normalize: bool = False,
                 max_length: int | None = DEFAULT_MAX_LENGTH, source: str = "model") -> None:
        vocab = tokenizer.get_vocab()
        size = len(vocab)
        if mapping is None and table.rows != size:
            raise TextModelError(f"{source}: the table has {table.rows} rows but the "
                                 f"tokenizer {size} tokens (and there is no mapping)")
        if mapping is not None:
            mapping = _per_token("mapping", mapping, size, np.integer, source)
            if size and (int(mapping.min()) < 0 or int(mapping.max()) >= table.rows):
                raise TextModelError(f"{source}: mapping points outside the table's "
                                     f"{table.rows} rows")
        if weights is not None:
            weights = _per_token("weights", weights, size, np.floating, source)
        if max_length is not None and max_length < 1:
            raise TextModelError(f"{source}: max_length must be a positive number of tokens "
                                 f"or None; got {max_length}")
        self.table = table
        self.weights = weights
        self.mapping = None if mapping is None else mapping.astype(np.int64)
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.tokenizer = copy.deepcopy(tokenizer)
        padding = self.tokenizer.padding
        if padding is not None:  # as model2vec: no padding, keep the pad token
            self.tokenizer.enable_padding(pad_id=padding["pad_id"],
                                          pad_token=padding["pad_token"],
                                          pad_type_id=padding["pad_type_id"], length=0)
        if max_length is None:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(max_length)
        self.unk_token_id = unknown_token_id(self.tokenizer)
        tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        self.median_token_length = int(np.median([len(token) for token in tokens]))
        #: The compiled pooling (float32, float64 and int8 tables, numba importable),
        #: else NumPy's per-text means.
        # (int8 rows times float16 weights multiply in float16 in NumPy: left to NumPy.)
        self._mean_rows = (None if table.storage == "int8" and weights is not None
                           and weights.dtype == np.float16 else _compiled_mean(table))
        # NumPy's dtypes for the products and the sum: float64 for float64 tables or
        # weights, and for int8 rows without weights (the mean of integers).
        self._wide = (table.storage == "float64"
                      or (weights is not None and weights.dtype == np.float64)
                      or (table.storage == "int8" and weights is None))
        self._pooled_arrays = _pooled_arrays(table)
        #: Characters kept per text before tokenizing (``None``: all).
        self.max_chars = (None if max_length is None
                          else max_length * self.median_token_length)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, normalize: bool | None = None,
                        max_length: int | None | str = "config") -> StaticModel:
        """Load a model folder (see the module docstring). ``normalize`` and
        ``max_length`` override the folder's config (``max_length=None``: no token cut;
        the default ``"config"`` reads it, else 512 as model2vec).

        Raises:
            TextModelError: a folder in no known layout, unreadable parts, or parts that
                disagree; the message names the file and what was expected.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TextModelError(f"{folder}: not a folder")
        layout = _layout(folder)
        config_path = folder / layout.config
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TextModelError(f"{config_path}: unreadable JSON: {exc}") from None
        if not isinstance(config, dict):
            raise TextModelError(f"{config_path}: expected a JSON object")
        tensors_path = folder / layout.tensors
        entries = list_tensors(tensors_path)
        if layout.embedding not in entries:
            raise TextModelError(f"{tensors_path}: no tensor {layout.embedding!r}; it holds "
                                 f"{', '.join(sorted(entries)) or 'none'}")
        table = _table(entries[layout.embedding].load(), tensors_path)
        weights = entries["weights"].load() if "weights" in entries else None
        mapping = entries["mapping"].load() if "mapping" in entries else None
        if normalize is None:
            normalize = bool(config.get("normalize", False))
        if max_length == "config":
            max_length = config.get("max_length", DEFAULT_MAX_LENGTH)
        if max_length is not None and (isinstance(max_length, bool)
                                       or not isinstance(max_length, int)):
            raise TextModelError(f"{config_path}: max_length must be an integer or null; got "
                                 f"{max_length!r}")
        return cls(table, _tokenizer(folder / layout.tokenizer), weights=weights,
                   mapping=mapping, normalize=normalize, max_length=max_length,
                   source=str(folder))

    @property
    def dim(self) -> int:
        return self.table.dim

    embedding_dim = dim

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        """Vectors are float32 for every table dtype."""
        return np.dtype(np.float32)

    @property
    def table_dtype(self) -> str:
        return self.table.storage

    @property
    def kernel(self) -> _Engine:
        """The pooling: compiled (``"numba"``) or NumPy's per-text means."""
        return (_Engine("numba", "numba-cpu") if self._mean_rows is not None
                else _Engine("numpy", "numpy-cpu"))

    @property
    def provider(self) -> str:
        return self.kernel.provider

    def encode_batch(self, texts: Sequence[str]
                     ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(vectors [T, dim] float32, tokens per text [T])`` for many texts at once."""
        ids, counts = self.token_arrays(texts)
        return self.pool(ids, counts), counts

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids after the character and token cuts, without the unknown
        token, before ``mapping`` (model2vec's ``tokenize`` after its ``encode`` cuts)."""
        if not texts:
            return []
        ids, counts = self.token_arrays(texts)
        return [part.tolist() for part in np.split(ids, np.cumsum(counts)[:-1])]

    def token_arrays(self, texts: Sequence[str]
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """All texts' kept token ids back to back (int64 ``[N]``) and each text's count
        (int64 ``[T]``)."""
        cut = texts if self.max_chars is None else [t[: self.max_chars] for t in texts]
        encodings = self.tokenizer.encode_batch_fast(list(cut), add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64,
                             count=len(encodings))
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64,
                          count=int(counts.sum()))
        if self.unk_token_id is not None and ids.size:
            known = ids != self.unk_token_id
            if not known.all():
                text_of = np.repeat(np.arange(counts.shape[0]), counts)
                counts = counts - np.bincount(text_of[~known], minlength=counts.shape[0])
                ids = ids[known]
        return ids, counts

    def encode(self, texts: str | Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors ``[T, dim]`` float32 (``[dim]`` for one string).

        Raises:
            TypeError: ``texts`` is neither a string nor a sequence of strings.
        """
        single = isinstance(texts, str)
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in batch):
            raise TypeError("texts must be a string or a sequence of strings")
        ids, counts = self.token_arrays(batch)
        out = self.pool(ids, counts)
        return out[0] if single else out

    def pool(self, ids: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
             ) -> npt.NDArray[np.float32]:
        """Mean-pool each text's tokens as model2vec does (see the module docstring):
        ``[T, dim]`` float32."""
        dim = self.table.dim
        out = np.zeros((counts.shape[0], dim), dtype=np.float32)
        rows = ids if self.mapping is None else self.mapping[ids]
        if self._mean_rows is not None:
            factors = (np.empty(0, np.float64) if self.weights is None
                       else self.weights[ids].astype(np.float64))
            codes, scales, biases = self._pooled_arrays
            self._mean_rows(codes, scales, biases, dim, rows, factors, counts, self._wide,
                            out)
            return self._normalized(out)
        # The rows as the folder stores them (int8 integers and float16 values are exact
        # in their decoded floats), so NumPy promotes and averages them exactly as
        # model2vec does: int8 rows in float64 alone but in float32 times float32
        # weights, float16 rows rounded to float16, ...
        gathered = self.table.gather(rows).astype(_STORED[self.table.storage])
        starts = np.concatenate(([0], np.cumsum(counts)))
        weights = None if self.weights is None else self.weights[ids]
        for text, count in enumerate(counts.tolist()):
            if not count:
                continue
            emb = gathered[starts[text] : starts[text] + count]
            if weights is not None:
                emb = emb * weights[starts[text] : starts[text] + count][:, None]
            out[text] = emb.mean(axis=0)
        return self._normalized(out)

    def _normalized(self, out: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``out`` L2-normalised per row when the model normalises (model2vec's
        arithmetic: float32 norms plus 1e-32)."""
        if not self.normalize:
            return out
        norm = np.linalg.norm(out, axis=1, keepdims=True) + 1e-32
        normalized: npt.NDArray[np.float32] = out / norm
        return normalized


def _compiled_mean(table: StoredTable) -> Any:
    """:func:`kernels.numba_text.mean_rows` when it serves ``table`` and numba imports."""
    from kernels import numba_kernel

    if table.storage not in ("float32", "float64", "int8") or not numba_kernel.available():
        return None
    from kernels import numba_text

    return numba_text.mean_rows


def _pooled_arrays(table: StoredTable) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32],
                                                npt.NDArray[np.float32]]:
    """What the compiled pooling reads: float rows as they are, or int8 codes (a view of
    the stored rows) with each row's scale and bias (8 bytes a row)."""
    empty = np.empty(0, np.float32)
    if table.storage != "int8":
        return table.data, empty, empty
    _, pair = table.split(table.data)
    return (table.data, np.ascontiguousarray(pair[:, 0], np.float32),
            np.ascontiguousarray(pair[:, 1], np.float32))


def _per_token(name: str, values: Any, size: int, kind: Any, source: str) -> npt.NDArray[Any]:
    """``values`` checked to hold one number of ``kind`` per token of a ``size`` vocabulary.

    Raises:
        TextModelError: naming the array, what it holds and what was expected.
    """
    array = np.asarray(values)
    if array.shape != (size,) or not np.issubdtype(array.dtype, kind):
        raise TextModelError(f"{source}: {name} must hold one {kind.__name__} per token "
                             f"({size}); got {array.dtype} {list(array.shape)}")
    return array


def _table(data: npt.NDArray[Any], path: Path) -> StoredTable:
    """A model's table in its storage form: float tables as they are, int8 tables as
    exact integers (rowwise int8 codes with scale 1 and bias -128)."""
    if data.ndim != 2:
        raise TextModelError(f"{path}: the embeddings must be 2-D; got shape "
                             f"{list(data.shape)}")
    if data.dtype == np.int8:
        codes = (data.astype(np.int16) + 128).astype(np.uint8)
        ones = np.ones(data.shape[0], np.float32)
        return from_codes(codes, ones, np.full(data.shape[0], -128, np.float32),
                          "int8", data.shape[1])
    if data.dtype in (np.float16, np.float32, np.float64):
        return store(np.ascontiguousarray(data), storage_dtype(data.dtype.name))
    raise CheckpointError(f"{path}: embeddings of dtype {data.dtype} are not supported; "
                          "expected float32, float16, float64 or int8")
