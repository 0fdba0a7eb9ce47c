"""Half and quantized tables against PyTorch: its quantized ops for sums, ``embedding_bag``
on the dequantized (or widened) table for everything else, and every float32 golden case
on every storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels.storage import StoredTable, prepacked, store
from models import EmbeddingBag
from tests.conftest import GoldenCase, assert_close_to_bag, load_golden, runner
from tests.reference import reference_bag

FIXTURES = Path(__file__).parents[1] / "golden" / "quantized.npz"
CPU = ("api", "numba", "numpy", "onnx")  # onnx: ONNX Runtime's CPU EP
#: How far results may sit from PyTorch's, as a fraction of the bag's magnitude: quantized
#: sums add the bias and the scaled codes in FBGEMM's order, 1e-5 (the storage issue's
#: bound); everything else accumulates the same float32 values as PyTorch, 1e-6.
TOLERANCE = {"float16": 1e-6, "bfloat16": 1e-6, "int8": 1e-5, "int4": 1e-5}
KINDS = {"byte": ("int8", "byte_rowwise"), "4bit": ("int4", "4bit_rowwise")}
STORED_AS = {"int8": "byte", "int4": "4bit"}  # the fixtures' names for them


def _golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES) as archive:
        return {key: archive[key] for key in archive.files}


GOLDEN = _golden()
CALLS = sorted({(key.split("/")[0], key.split("/")[1]) for key in GOLDEN
                if key.endswith("/input")})
PACKED_CALLS = [(name, call, kind) for name, call in CALLS for kind in KINDS
                if f"{name}/{kind}" in GOLDEN]


def _call(name: str, call: str) -> tuple[Any, Any, Any]:
    prefix = f"{name}/{call}/"
    return (GOLDEN[prefix + "input"], GOLDEN[prefix + "offsets"],
            GOLDEN.get(prefix + "per_sample_weights"))


@pytest.mark.parametrize(("name", "call", "kind"), PACKED_CALLS)
@pytest.mark.parametrize("implementation", CPU)
@pytest.mark.parametrize("source", ["prepacked", "quantized at load"])
def test_quantized_sums_match_pytorchs_rowwise_ops(name: str, call: str, kind: str,
                                                   implementation: str, source: str) -> None:
    storage, quantized_format = KINDS[kind]
    table: Any = (prepacked(GOLDEN[f"{name}/{kind}"], quantized_format)
                  if source == "prepacked" else GOLDEN[f"{name}/weight"])
    run = runner(implementation, table, mode="sum", include_last_offset="_last" in call,
                 table_dtype=storage)
    expected = GOLDEN[f"{name}/{call}/{kind}_sum"]
    assert_close_to_bag(run(*_call(name, call)), expected, scale=np.abs(expected) + 1.0,
                        rtol=TOLERANCE[storage])


#: PyTorch has no weighted mean or max, and packs 4-bit rows of even dims only.
DECODED_CALLS = [(name, call, storage, mode) for name, call in CALLS
                 for storage in ("int8", "int4", "float16", "bfloat16")
                 for mode in ("sum", "mean", "max")
                 if f"{name}/{call}/{STORED_AS.get(storage, storage)}_{mode}_dequantized"
                 in GOLDEN]


def test_the_decoded_calls_cover_every_storage_and_mode() -> None:
    assert {(s, m) for _, _, s, m in DECODED_CALLS} == {
        (s, m) for s in ("int8", "int4", "float16", "bfloat16") for m in ("sum", "mean", "max")}
    assert any("_weighted" in call for _, call, _, _ in DECODED_CALLS)


@pytest.mark.parametrize(("name", "call", "storage", "mode"), DECODED_CALLS)
@pytest.mark.parametrize("implementation", CPU)
def test_every_mode_matches_embedding_bag_on_the_decoded_table(
        name: str, call: str, storage: str, mode: str, implementation: str) -> None:
    key = f"{name}/{call}/{STORED_AS.get(storage, storage)}_{mode}_dequantized"
    run = runner(implementation, GOLDEN[f"{name}/weight"], mode=mode,
                 include_last_offset="_last" in call, table_dtype=storage)
    actual, expected = run(*_call(name, call)), GOLDEN[key]
    # The same float32 values, compared or added in the same order: bit for bit. (ONNX
    # Runtime decodes int8 codes with a multiply, then an add: one rounding more.)
    same_values = not (implementation == "onnx" and storage == "int8")
    if same_values and (mode == "max" or (storage in ("float16", "bfloat16")
                                          and "_weighted" not in call)):
        np.testing.assert_array_equal(actual, expected)
    assert_close_to_bag(actual, expected, rtol=TOLERANCE[storage])


FLOAT32_CASES = [c for c in load_golden() if c.arrays["weight"].dtype == np.float32]
STORAGE_CASES = [(case, storage) for case in FLOAT32_CASES
                 for storage in ("float16", "bfloat16", "int8", "int4")]


@pytest.mark.parametrize(("case", "storage"), STORAGE_CASES,
                         ids=[f"{c.name}-{s}" for c, s in STORAGE_CASES])
@pytest.mark.parametrize("implementation", CPU)
def test_every_float32_golden_case_runs_on_every_storage(case: GoldenCase, storage: str,
                                                         implementation: str) -> None:
    stored = store(case.arrays["weight"], storage)  # type: ignore[arg-type]
    options = {key: case.options[key] for key in ("mode", "padding_idx",
                                                   "include_last_offset", "max_norm",
                                                   "norm_type")}
    expected = reference_bag(stored.to_float(), *case.call, **options).astype(np.float32)
    # The bag's magnitude: what its rows add up to without cancelling (cancelling cases
    # sum rows of 1e4 to about 1).
    ids, offsets, weights = case.call
    magnitude = reference_bag(np.abs(stored.to_float()), ids, offsets,
                              None if weights is None else np.abs(weights), **options)
    run = runner(implementation, case.arrays["weight"], table_dtype=storage, **case.options)
    assert_close_to_bag(run(*case.call), expected, scale=np.abs(magnitude) + 1.0,
                        rtol=TOLERANCE[storage])


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "int4"])
@pytest.mark.parametrize("implementation", CPU)
@pytest.mark.parametrize(("mode", "weighted", "padding_idx"),
                         [("sum", False, None), ("sum", True, 3), ("mean", False, 3),
                          ("max", False, None), ("max", False, 3)])
def test_max_norm_scales_rows_as_pooled_without_touching_the_stored_rows(
        storage: str, implementation: str, mode: str, weighted: bool,
        padding_idx: int | None) -> None:
    # Renormed float16/bfloat16/int4 rows would round again if stored: the rows stay as
    # they are and PyTorch's factor is applied per row as it is pooled.
    rng = np.random.default_rng(31)
    weight = (rng.standard_normal((50, 12)) * rng.uniform(0.1, 3, (50, 1))).astype(np.float32)
    stored = store(weight, storage)  # type: ignore[arg-type]
    options = {"mode": mode, "padding_idx": padding_idx, "max_norm": 2.5, "norm_type": 2.0}
    bag = EmbeddingBag.from_pretrained(stored, **options)
    table = bag.table
    assert table.storage == storage and np.shares_memory(table.data, stored.data)
    assert table.row_scale is not None and (table.row_scale < 1).sum() > 10
    ids = rng.integers(0, 50, 80)
    ids[::7] = 3
    offsets = np.array([0, 1, 1, 9, 30, 31, 80])
    weights = rng.uniform(0.5, 2, 80).astype(np.float32) if weighted else None
    expected = reference_bag(stored.to_float(), ids, offsets, weights, **options)
    magnitude = reference_bag(np.abs(stored.to_float()), ids, offsets,
                              None if weights is None else np.abs(weights), **options)
    run = runner(implementation, stored, **options)  # type: ignore[arg-type]
    assert_close_to_bag(run(ids, offsets, weights), expected.astype(np.float32),
                        scale=np.abs(magnitude) + 1.0, rtol=1e-6)
    # The module's weight is the renormed table, as PyTorch's after a lookup of every row.
    np.testing.assert_allclose(np.linalg.norm(bag.weight, axis=1).max(), 2.5, rtol=1e-6)


def test_a_stored_table_keeps_its_storage_and_reports_it() -> None:
    weight = np.random.default_rng(5).standard_normal((100, 32)).astype(np.float32)
    for storage, ratio in (("float16", 0.5), ("bfloat16", 0.5), ("int8", 40 / 128),
                           ("int4", 20 / 128)):
        bag = EmbeddingBag.from_pretrained(weight, table_dtype=storage, backend="auto")
        assert bag.table_dtype == storage
        assert isinstance(bag.table, StoredTable)
        assert bag.table.nbytes == pytest.approx(weight.nbytes * ratio)
        assert bag.compute_dtype == np.float32
        assert bag(np.array([[1, 2]])).dtype == np.float32
