"""``bagserve quantize``: the stored file serves as printed, and the accuracy it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.storage import store
from models import load_table, write_safetensors
from models.quantize import accuracy, quantize_checkpoint
from service.cli import main
from service.config import ModelSpec, load_config
from service.registry import load_model


def _checkpoint(tmp_path: Path, dim: int = 16) -> Path:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": np.random.default_rng(0).standard_normal(
        (300, dim)).astype(np.float32)})
    return path


@pytest.mark.parametrize(("storage", "min_cosine"), [
    ("int8", 0.9999), ("int4", 0.98), ("float16", 0.999999), ("bfloat16", 0.99999)])
def test_the_written_table_serves_with_the_printed_fields(
        tmp_path: Path, storage: str, min_cosine: float) -> None:
    source = load_table(_checkpoint(tmp_path))
    out = tmp_path / f"{storage}.safetensors"
    stored, fields, result = quantize_checkpoint(source, storage, out,  # type: ignore[arg-type]
                                                 mode="sum", bags=200)
    model = load_model(ModelSpec(name="q", checkpoint=out, mode="sum", **fields))
    assert model.bag.table_dtype == storage
    np.testing.assert_array_equal(model.bag.table.data, stored.data)
    assert result.bags == 200 and result.mode == "sum"
    assert 0 < result.mean_abs_error <= result.max_abs_error
    assert min_cosine < result.min_cosine <= result.mean_cosine <= 1.0 + 1e-12


def test_accuracy_of_an_exact_table_is_perfect(tmp_path: Path) -> None:
    weight = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    result = accuracy(weight, store(weight, "float32"), mode="max", bags=30)
    assert result.max_abs_error == 0 and result.min_cosine == pytest.approx(1.0)


def test_odd_dims_cannot_be_written_as_4bit_rows(tmp_path: Path) -> None:
    source = load_table(_checkpoint(tmp_path, dim=7))
    with pytest.raises(ValueError, match="4bit_rowwise rows hold an even number of values"):
        quantize_checkpoint(source, "int4", tmp_path / "q.safetensors")


def test_quantize_command_prints_size_accuracy_and_a_config_that_serves_as_pasted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", str(checkpoint), "--dtype", "int8", "-o", "out/q.int8.safetensors",
                 "--bags", "50", "--mode", "max"]) == 0
    printed = capsys.readouterr().out
    assert "300 x 16 as int8, 7,200 bytes (0.38x float32's 19,200)" in printed
    assert "accuracy on 50 sampled bags (mode max" in printed
    config = printed.split("serve it with:\n", 1)[1]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "models.toml").write_text(config)  # paths resolve from here
    spec, = load_config(tmp_path / "elsewhere" / "models.toml")
    assert (spec.name, spec.mode, spec.table_dtype) == ("q.int8", "max", "int8")
    assert load_model(spec).bag.table_dtype == "int8"
    assert main(["quantize", str(tmp_path / "none.safetensors"), "--dtype", "int8", "-o",
                 "x.safetensors"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize(("options", "message"), [
    (["-o", "q.npy"], "--output must be a .safetensors file; got 'q.npy'"),
    (["-o", "missing/q.safetensors"], "--output: folder 'missing' does not exist"),
    (["-o", "q.safetensors", "--bags", "0"], "--bags must be at least 1; got 0"),
    (["-o", "q.safetensors", "--bag-length", "-3"],
     "--bag-length must be a positive number; got -3.0"),
])
def test_quantize_refuses_bad_options_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        options: list[str], message: str) -> None:
    checkpoint = _checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", str(checkpoint), "--dtype", "int8", *options]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_written_checkpoints_are_readable_by_other_users(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "t.safetensors", {"w": np.ones((2, 2), np.float32)})
    finally:
        os.umask(mask)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
