"""Write the text-model golden fixtures (needs ``model2vec==0.10.0``; not a dependency).

Small static models are built here with Hugging Face ``tokenizers`` (WordPiece, BPE and
Unigram vocabularies trained on a few sentences), saved by model2vec 0.10's own
``StaticModel.save_pretrained`` (model2vec's folder layout, and one in
sentence-transformers' ``0_StaticEmbedding`` layout), with float32, float16, float64 and
int8 tables, with and without per-token ``weights`` and a vocabulary ``mapping``,
``normalize`` on and off. Each case folder holds the model folder (``model/``),
``texts.json`` and what model2vec 0.10 answers for them: ``expected.npy``
(``StaticModel.encode``) and ``tokens.json`` (``StaticModel.tokenize`` after its cuts).

    python tests/golden/make_text.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).parent / "text"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Static embeddings pool token vectors into one sentence vector.",
    "Recommendation systems look up item ids in embedding tables.",
    "Tokenizers split text into words and subword pieces.",
    "A bag of words ignores order but keeps counts.",
    "Sentence transformers distil large models into small static ones.",
    "Numbers like 42 and 2026 appear in text too.",
]

TEXTS = [
    "",
    "   ",
    "hello world",
    "The quick brown fox",
    "Embedding tables and token vectors!",
    "zzzz qqqq xxxx",                      # mostly unknown pieces
    "Ünïcödé ünknown wörds — ok",
    "日本語のテキスト",                      # non-Latin, unknown-heavy
    "tokens " * 300,                        # past max_length: both cuts apply
    "Tokenizers split text into words and subword pieces. " * 3,
]


def _wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _unigram() -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


TOKENIZERS = {"wordpiece": _wordpiece, "bpe": _bpe, "unigram": _unigram}


def _case(name: str, kind: str, dtype: str, *, weights: str | None = None, mapping: bool = False,
          normalize: bool = False, max_length: int = 16, layout: str = "model2vec",
          seed: int = 0) -> None:
    from model2vec import StaticModel

    rng = np.random.default_rng(seed)
    tokenizer = TOKENIZERS[kind]()
    vocab = tokenizer.get_vocab_size()
    dim = 12
    rows = vocab // 3 if mapping else vocab
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    if dtype == "int8":
        vectors = np.clip(np.round(vectors * 40), -127, 127).astype(np.int8)
    else:
        vectors = vectors.astype(dtype)
    token_weights = rng.uniform(0.1, 2.0, vocab).astype(weights) if weights else None
    token_mapping = rng.integers(0, rows, vocab) if mapping else None
    model = StaticModel(vectors=vectors, tokenizer=tokenizer, weights=token_weights,
                        token_mapping=token_mapping, normalize=normalize,
                        max_length=max_length)
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "model").mkdir(parents=True)
    model.save_pretrained(folder / "model")
    if layout == "st":
        _as_sentence_transformers(folder / "model", normalize)
    reloaded = StaticModel.from_pretrained(folder / "model")
    (folder / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False))
    expected = reloaded.encode(TEXTS)
    np.save(folder / "expected.npy", expected)
    # What encode tokenizes: its character cut, then its token cut (the folder's
    # max_length; a sentence-transformers folder has none, so model2vec's 512).
    limit = reloaded.max_length
    cut = [t[: limit * reloaded.median_token_length] for t in TEXTS]
    reloaded._set_max_length_in_tokenizer(limit)
    (folder / "tokens.json").write_text(json.dumps(reloaded.tokenize(cut)))
    (folder / "model" / "README.md").unlink(missing_ok=True)


def _as_sentence_transformers(folder: Path, normalize: bool) -> None:
    """model2vec's folder rewritten as sentence-transformers saves a StaticEmbedding:
    ``0_StaticEmbedding/`` (``model.safetensors`` with ``embedding.weight``,
    ``tokenizer.json``), ``modules.json``, ``config_sentence_transformers.json``."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    inner = folder / "0_StaticEmbedding"
    inner.mkdir()
    save_file({"embedding.weight": tensors["embeddings"]}, str(inner / "model.safetensors"))
    (folder / "tokenizer.json").rename(inner / "tokenizer.json")
    for stale in ("model.safetensors", "config.json", "README.md", "modules.json"):
        (folder / stale).unlink(missing_ok=True)
    modules = [{"idx": 0, "name": "0", "path": "0_StaticEmbedding",
                "type": "sentence_transformers.models.StaticEmbedding"}]
    if normalize:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / "1_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": {"sentence_transformers": "3.4.1"}, "prompts": {},
         "default_prompt_name": None, "similarity_fn_name": "cosine"}))


def _tokenlearn() -> None:
    """What model2vec 0.10 answers for the real model inside the
    ``tokenlearn-static-model`` wheel (10,000 x 64 int8, vocabulary-quantized, a 276k-piece
    Unigram tokenizer), which the test extra installs."""
    import importlib.util

    from model2vec import StaticModel

    spec = importlib.util.find_spec("static_model")
    assert spec is not None and spec.submodule_search_locations
    model = StaticModel.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    folder = HERE / "tokenlearn"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False))
    np.save(folder / "expected.npy", model.encode(TEXTS))


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    _case("wordpiece_f32", "wordpiece", "float32")
    _case("wordpiece_f32_norm_weights", "wordpiece", "float32", weights="float64",
          normalize=True)
    _case("wordpiece_f32_weights32", "wordpiece", "float32", weights="float32", seed=7)
    _case("bpe_f16", "bpe", "float16", normalize=True)
    _case("bpe_f32_mapping_weights", "bpe", "float32", weights="float64", mapping=True)
    _case("unigram_int8_norm", "unigram", "int8", normalize=True, seed=3)
    _case("unigram_f64_weights", "unigram", "float64", weights="float64", seed=4)
    _case("wordpiece_int8_mapping", "wordpiece", "int8", mapping=True, seed=5)
    _case("st_wordpiece_f32", "wordpiece", "float32", layout="st", seed=6)
    _tokenlearn()


if __name__ == "__main__":
    main()
