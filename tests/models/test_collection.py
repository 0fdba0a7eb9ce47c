"""EmbeddingBagCollection against TorchRec-layout golden fixtures (tests/golden/
make_collections.py), in keyed and KJT form, and every refusal naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

from models import CheckpointError, InvalidInputError, write_safetensors
from models.collection import EmbeddingBagCollection, EmbeddingBagConfig, jagged

GOLDEN = Path(__file__).parents[1] / "golden" / "collections"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def configs(case: str) -> list[EmbeddingBagConfig]:
    document = tomllib.loads((GOLDEN / case / "config.toml").read_text())
    model = document["models"][0]
    return [EmbeddingBagConfig(**{("feature_names" if k == "features" else k): v
                                  for k, v in table.items()}) for table in model["tables"]]


def golden(case: str, backend: str = "numpy") -> tuple[EmbeddingBagCollection, dict[str, Any],
                                                       np.ndarray]:
    document = tomllib.loads((GOLDEN / case / "config.toml").read_text())
    checkpoint = GOLDEN / case / document["models"][0]["checkpoint"]
    ebc = EmbeddingBagCollection.from_checkpoint(checkpoint, configs(case), backend=backend)
    request = json.loads((GOLDEN / case / "request.json").read_text())
    return ebc, request, np.load(GOLDEN / case / "expected.npy")


def as_kjt(request: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The keyed request as KeyedJaggedTensor arrays (feature major)."""
    values, lengths, weights = [], [], []
    for key in keys:
        for position, bag in enumerate(request["features"][key]):
            values += bag
            lengths.append(len(bag))
            weights += (request["weights"][key][position] if key in request["weights"]
                        else [1.0] * len(bag))
    return {"keys": keys, "values": values, "lengths": lengths, "weights": weights}


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
@pytest.mark.parametrize("case", CASES)
def test_golden_keyed(case: str, backend: str) -> None:
    ebc, request, expected = golden(case, backend)
    out = ebc(request["features"], weights=request["weights"])
    assert out.keys() == list(ebc.keys)
    assert out.offset_per_key()[-1] == expected.shape[1]
    np.testing.assert_allclose(out.values(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_golden_kjt_any_key_order(case: str) -> None:
    ebc, request, expected = golden(case)
    for keys in (list(ebc.keys), list(ebc.keys)[::-1]):
        out = ebc(**as_kjt(request, keys))
        np.testing.assert_allclose(out.values(), expected, rtol=1e-6, atol=1e-6)
    kjt = as_kjt(request, list(ebc.keys))
    starts = np.concatenate([[0], np.cumsum(kjt.pop("lengths"))])
    out = ebc(keys=kjt["keys"], values=kjt["values"], offsets=starts, weights=kjt["weights"])
    np.testing.assert_allclose(out.values(), expected, rtol=1e-6, atol=1e-6)


def test_output_layout_is_torchrec_order() -> None:
    ebc, request, expected = golden("ranker")
    assert ebc.keys == ("user_id", "history", "candidates", "category", "tags")
    assert ebc.dims == (8, 12, 12, 5, 4)
    assert ebc.offset_per_key == [0, 8, 20, 32, 37, 41]
    parts = ebc(request["features"], weights=request["weights"]).to_dict()
    np.testing.assert_allclose(parts["category"], expected[:, 32:37], rtol=1e-6, atol=1e-6)


def test_oov_policies_count_per_feature() -> None:
    ebc, request, _ = golden("hashed")
    from models.collection import keyed

    batch = ebc.batch(keyed(request["features"], request["weights"]))
    assert batch.oov == {"site": 4, "app": 4, "device": 3}
    assert batch.samples == 6


def _small(**options: Any) -> EmbeddingBagCollection:
    rng = np.random.default_rng(0)
    tables = [EmbeddingBagConfig("a", ("f1",), "sum", **options),
              EmbeddingBagConfig("b", ("f2", "f3"), "mean")]
    weights = {"a": rng.standard_normal((5, 3)).astype(np.float32),
               "b": rng.standard_normal((7, 2)).astype(np.float32)}
    return EmbeddingBagCollection(tables, weights, backend="numpy")


@pytest.mark.parametrize(("features", "message"), [
    ({"f1": [[9]], "f2": [[1]], "f3": [[1]]},
     r"feature 'f1', sample 0, position 0: id 9 is outside \[0, 5\) of table 'a'"),
    ({"f1": [[1], [2]], "f2": [[1]], "f3": [[1]]}, "same number of samples"),
    ({"f1": [[1]], "f2": [[1]]}, "'f3' missing"),
    ({"f1": [[1]], "f2": [[1]], "f3": [[1]], "f4": [[1]]}, "unknown feature.*'f4'"),
    ({"f1": [[1]], "f2": [[-1]], "f3": [[1]]}, "feature 'f2'.*id -1"),
    ({"f1": [[1.5]], "f2": [[1]], "f3": [[1]]}, "integer"),
    ({"f1": [1], "f2": [[1]], "f3": [[1]]}, "list of bags"),
])
def test_bad_input_names_the_feature(features: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        _small()(features)


def test_weights_only_on_sum_tables() -> None:
    ebc = _small()
    with pytest.raises(InvalidInputError, match="'f2'.*pools by mean"):
        ebc({"f1": [[1]], "f2": [[1]], "f3": [[1]]}, weights={"f2": [[2.0]]})
    with pytest.raises(InvalidInputError, match="'f2'.*pools by mean"):
        ebc(keys=["f1", "f2", "f3"], values=[1, 1, 1], lengths=[1, 1, 1],
            weights=[1.0, 0.5, 1.0])
    with pytest.raises(InvalidInputError, match="one weight per id"):
        ebc({"f1": [[1, 2]], "f2": [[1]], "f3": [[1]]}, weights={"f1": [[2.0]]})
    # KJT weights of 1 on a mean feature are no weights at all.
    out = ebc(keys=["f1", "f2", "f3"], values=[1, 1, 1], lengths=[1, 1, 1],
              weights=[2.0, 1.0, 1.0])
    np.testing.assert_array_equal(out.values()[0, :3], 2 * ebc.spec.tables[0].weight[1])


@pytest.mark.parametrize(("kjt", "message"), [
    ({"keys": ["f1", "f2", "f3"], "values": [1, 1], "lengths": [1, 1, 1]}, "add up to 3"),
    ({"keys": ["f1", "f2", "f3"], "values": [1, 1], "lengths": [1, 1]}, "split evenly"),
    ({"keys": ["f1", "f2", "f3"], "values": [1], "lengths": [1, -1, 1]}, "negative"),
    ({"keys": ["f1", "f2", "f3"], "values": [1, 1, 1]}, "offsets .* missing"),
    ({"keys": ["f1"], "values": [1], "lengths": [1], "offsets": [0, 1]}, "not both"),
    ({"keys": ["f1", "f2", "f3"], "values": [1, 1, 1], "offsets": [0, 2, 1, 3]}, "decrease"),
    ({"keys": "f1", "values": [1], "lengths": [1]}, "list of feature names"),
    ({"keys": ["f1", "f1", "f3"], "values": [1, 1, 1], "lengths": [1, 1, 1]}, "twice"),
])
def test_bad_kjt(kjt: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        _small()(**kjt)


def test_oov_zero_skips_like_padding_and_hash_wraps() -> None:
    zero = _small(oov="zero")
    plain = _small()
    out = zero({"f1": [[1, 99, 2], [77]], "f2": [[1], []], "f3": [[], [2]]}).values()
    expected = plain({"f1": [[1, 2], []], "f2": [[1], []], "f3": [[], [2]]}).values()
    np.testing.assert_array_equal(out, expected)
    hashed = _small(oov="hash")
    out = hashed({"f1": [[7, -1]], "f2": [[1]], "f3": [[1]]}).values()
    expected = plain({"f1": [[2, 4]], "f2": [[1]], "f3": [[1]]}).values()
    np.testing.assert_array_equal(out, expected)


def test_torchrec_kjt_object_and_pooling_type() -> None:
    class Pooling:
        name = "SUM"

    class KJT:
        def keys(self) -> list[str]:
            return ["f1", "f2", "f3"]

        def values(self) -> np.ndarray:
            return np.array([1, 2, 3])

        def lengths(self) -> np.ndarray:
            return np.array([1, 1, 1])

        def weights_or_none(self) -> None:
            return None

    rng = np.random.default_rng(0)
    tables = [EmbeddingBagConfig("a", ("f1",), Pooling()),  # type: ignore[arg-type]
              EmbeddingBagConfig("b", ("f2", "f3"), "MEAN")]
    weights = {"a": rng.standard_normal((5, 3)), "b": rng.standard_normal((7, 2))}
    ebc = EmbeddingBagCollection(tables, weights, backend="numpy")
    out = ebc(KJT()).values()
    np.testing.assert_allclose(out[0, 3:5], weights["b"][2].astype(np.float32), rtol=1e-6)


def test_config_refusals() -> None:
    with pytest.raises(ValueError, match="'b' has no features"):
        EmbeddingBagConfig("b", (), "sum")
    with pytest.raises(ValueError, match="oov must be"):
        EmbeddingBagConfig("b", ("x",), "sum", oov="clamp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pooling must be one of sum, mean, max"):
        EmbeddingBagConfig("b", ("x",), "median")
    tables = [EmbeddingBagConfig("a", ("x",)), EmbeddingBagConfig("b", ("x",))]
    table = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="feature 'x' is named twice"):
        EmbeddingBagCollection(tables, {"a": table, "b": table})
    with pytest.raises(ValueError, match="embedding_dim = 4 but"):
        EmbeddingBagCollection([EmbeddingBagConfig("a", ("x",), embedding_dim=4)],
                               {"a": table})


def test_checkpoint_missing_table_names_key_and_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "ebc.safetensors"
    write_safetensors(path, {"embedding_bags.a.weight": np.zeros((3, 2), np.float32)})
    tables = [EmbeddingBagConfig("a", ("x",)), EmbeddingBagConfig("b", ("y",))]
    with pytest.raises(CheckpointError, match=r"table 'b' needs tensor "
                       r"'embedding_bags.b.weight'.*holds embedding_bags.a.weight"):
        EmbeddingBagCollection.from_checkpoint(path, tables)
    ebc = EmbeddingBagCollection.from_checkpoint(
        path, [EmbeddingBagConfig("a", ("x",)), EmbeddingBagConfig(
            "b", ("y",), tensor="embedding_bags.a.weight")])
    assert ebc.dims == (2, 2)


def test_whole_model_state_dict_keys_resolve_under_one_prefix(tmp_path: Path) -> None:
    path = tmp_path / "dlrm.safetensors"
    prefix = "sparse_arch.embedding_bag_collection."
    write_safetensors(path, {f"{prefix}embedding_bags.a.weight": np.ones((3, 2), np.float32),
                             "dense_arch.weight": np.zeros((4, 4), np.float32)})
    ebc = EmbeddingBagCollection.from_checkpoint(path, [EmbeddingBagConfig("a", ("x",))])
    np.testing.assert_array_equal(ebc({"x": [[0, 1]]}).values(), [[2.0, 2.0]])
    two = tmp_path / "two.safetensors"
    write_safetensors(two, {f"{p}embedding_bags.a.weight": np.ones((3, 2), np.float32)
                            for p in ("left.", "right.")})
    with pytest.raises(CheckpointError, match="name another with the table's tensor"):
        EmbeddingBagCollection.from_checkpoint(two, [EmbeddingBagConfig("a", ("x",))])


@pytest.mark.parametrize("table_dtype", ["float16", "bfloat16", "int8", "int4"])
def test_stored_tables_match_single_table_modules(table_dtype: str) -> None:
    from models import EmbeddingBag

    rng = np.random.default_rng(5)
    weights = {"a": rng.standard_normal((40, 24)).astype(np.float32),
               "b": rng.standard_normal((30, 10)).astype(np.float32)}
    tables = [EmbeddingBagConfig("a", ("f1", "f2"), "sum", table_dtype=table_dtype,
                                 max_norm=2.0),
              EmbeddingBagConfig("b", ("f3",), "max", table_dtype=table_dtype, max_norm=3.0,
                                 padding_idx=3)]
    ebc = EmbeddingBagCollection(tables, weights, backend="numpy")
    bags = {f: [[int(x) for x in rng.integers(0, rows, rng.integers(0, 6))] for _ in range(5)]
            for f, rows in (("f1", 40), ("f2", 40), ("f3", 30))}
    w = {"f2": [[0.5] * len(b) for b in bags["f2"]]}
    out = ebc(bags, weights=w).to_dict()
    for feature, name, mode in (("f1", "a", "sum"), ("f2", "a", "sum"), ("f3", "b", "max")):
        config = next(t for t in tables if t.name == name)
        bag = EmbeddingBag.from_pretrained(weights[name], mode=mode, table_dtype=table_dtype,
                                           max_norm=config.max_norm,
                                           padding_idx=config.padding_idx,
                                           include_last_offset=True)
        ids = [i for b in bags[feature] for i in b]
        offsets = np.cumsum([0] + [len(b) for b in bags[feature]])
        scale = (np.array([x for b in w[feature] for x in b], np.float32)
                 if feature in w else None)
        np.testing.assert_allclose(out[feature], bag(ids, offsets, scale), rtol=1e-6,
                                   atol=1e-6)


def test_jagged_refuses_non_integer_values() -> None:
    with pytest.raises(InvalidInputError, match="values must hold integers"):
        jagged(["a"], [1.5], [1])


@pytest.mark.parametrize("case", CASES)
def test_compiled_and_numpy_layouts_agree(case: str) -> None:
    from models.collection import keyed

    ebc, request, _ = golden(case)
    assert ebc._lay_out is not None
    for keys in (list(ebc.keys), list(ebc.keys)[::-1]):
        for features in (keyed({k: request["features"][k] for k in keys}, request["weights"]),
                         jagged(**as_kjt(request, keys))):
            compiled = ebc.batch(features)
            ebc._lay_out = None
            try:
                plain = ebc.batch(features)
            finally:
                ebc._lay_out = _compiled()
            np.testing.assert_array_equal(compiled.batch.indices, plain.batch.indices)
            np.testing.assert_array_equal(compiled.batch.offsets, plain.batch.offsets)
            np.testing.assert_array_equal(compiled.batch.per_sample_weights,
                                          plain.batch.per_sample_weights)
            assert compiled.oov == plain.oov


@pytest.mark.parametrize("compiled", [True, False])
def test_both_layouts_refuse_alike(compiled: bool) -> None:
    ebc = _small()
    if not compiled:
        ebc._lay_out = None
    with pytest.raises(InvalidInputError, match="feature 'f3', sample 1, position 2: id 7"):
        ebc(keys=["f3", "f1", "f2"], values=[1, 1, 2, 7, 1, 1, 1, 1], lengths=[1, 3, 1, 1, 1, 1])
    with pytest.raises(InvalidInputError, match="'f2'.*pools by mean"):
        ebc(keys=["f1", "f2", "f3"], values=[1, 1, 1], lengths=[1, 1, 1],
            weights=[1.0, 0.5, 1.0])


def _compiled() -> object:
    from models.collection import _compiled_layout

    return _compiled_layout()
