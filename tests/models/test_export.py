"""Exported ONNX models run in a fresh onnxruntime session and match the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import EmbeddingBag, write_safetensors
from models.export import export_onnx, export_triton, triton_config
from service.cli import main
from tests.conftest import GoldenCase, assert_close_to_bag, load_golden

CASES = load_golden()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _flat(case: GoldenCase) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ids, offsets, weights = case.call
    if ids.ndim == 2:
        rows, length = ids.shape
        offsets = np.arange(rows + int(case.options["include_last_offset"])) * length
        ids = ids.reshape(-1)
        weights = None if weights is None else weights.reshape(-1)
    return ids.astype(np.int64), offsets.astype(np.int64), weights


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exported_golden_case_matches_torch(tmp_path: Path, case: GoldenCase) -> None:
    bag = EmbeddingBag.from_pretrained(case.arrays["weight"], **case.options)
    weighted = "per_sample_weights" in case.arrays
    path = export_onnx(bag, tmp_path / "model.onnx", weighted=weighted)
    ids, offsets, weights = _flat(case)
    feeds = {"indices": ids, "offsets": offsets}
    if weights is not None:
        feeds["per_sample_weights"] = weights
    (out,) = _session(path).run(None, feeds)
    expected = case.arrays["expected"]
    assert_close_to_bag(out, expected, scale=np.abs(expected) + 1.0)


def test_fp16_export_and_external_data(tmp_path: Path) -> None:
    table = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    bag = EmbeddingBag.from_pretrained(table, mode="mean")
    ids = np.arange(0, 300, 7, dtype=np.int64)
    offsets = np.array([0, 10, 20], dtype=np.int64)
    half = export_onnx(bag, tmp_path / "half.onnx", table_dtype="float16")
    expected = EmbeddingBag.from_pretrained(table.astype(np.float16), mode="mean")(ids, offsets)
    np.testing.assert_allclose(_session(half).run(None, {"indices": ids, "offsets": offsets})[0],
                               expected, rtol=1e-6, atol=1e-6)
    external = export_onnx(bag, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= table.nbytes
    assert external.stat().st_size < 10_000
    np.testing.assert_array_equal(
        _session(external).run(None, {"indices": ids, "offsets": offsets})[0],
        bag(ids, offsets))


def test_weighted_export_needs_sum_mode() -> None:
    bag = EmbeddingBag.from_pretrained(np.ones((3, 2), np.float32), mode="max")
    with pytest.raises(ValueError, match="weighted export needs mode='sum'"):
        export_onnx(bag, "unused.onnx", weighted=True)


def test_triton_repository_layout(tmp_path: Path) -> None:
    bag = EmbeddingBag.from_pretrained(np.ones((5, 3), np.float32), mode="sum")
    folder = export_triton(bag, tmp_path, "items", weighted=True)
    assert (folder / "1" / "model.onnx").is_file()
    config = (folder / "config.pbtxt").read_text()
    assert config == triton_config(bag, "items", weighted=True)
    for fragment in ('name: "items"', 'backend: "onnxruntime"', "max_batch_size: 0",
                     'name: "per_sample_weights"', "dims: [ -1, 3 ]"):
        assert fragment in config
    session = _session(folder / "1" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["indices", "offsets",
                                                      "per_sample_weights"]
    with pytest.raises(ValueError, match="plain folder name"):
        export_triton(bag, tmp_path, "../escape")


def test_cli_export_writes_onnx_and_triton(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    table = np.random.default_rng(2).standard_normal((20, 4)).astype(np.float32)
    write_safetensors(tmp_path / "t.safetensors", {"weight": table})
    status = main(["export", str(tmp_path / "t.safetensors"), "--mode", "sum",
                   "--padding-idx", "0", "-o", str(tmp_path / "t.onnx"),
                   "--triton-repository", str(tmp_path / "repo")])
    assert status == 0
    assert (tmp_path / "repo" / "t" / "config.pbtxt").is_file()
    ids, offsets = np.array([0, 1, 2, 3], np.int64), np.array([0, 2], np.int64)
    expected = EmbeddingBag.from_pretrained(table, mode="sum", padding_idx=0)(ids, offsets)
    np.testing.assert_array_equal(
        _session(tmp_path / "t.onnx").run(None, {"indices": ids, "offsets": offsets})[0],
        expected)
    assert main(["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err


def test_an_exported_model_is_a_checkpoint_again(tmp_path: Path) -> None:
    from models import read_checkpoint

    table = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    bag = EmbeddingBag.from_pretrained(table, mode="max")
    path = export_onnx(bag, tmp_path / "m.onnx")
    np.testing.assert_array_equal(read_checkpoint(path), table)
    external = export_onnx(bag, tmp_path / "ext.onnx", external_data=True)
    np.testing.assert_array_equal(read_checkpoint(external, "table"), table)
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    from models import CheckpointError

    with pytest.raises(CheckpointError, match="bad.onnx: not a readable ONNX model"):
        read_checkpoint(tmp_path / "bad.onnx")
