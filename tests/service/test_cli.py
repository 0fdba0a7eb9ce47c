"""The command line documents itself: every setting in ``serve --help``, every default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import write_safetensors
from service.cli import build_parser, main
from service.settings import Settings


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_serve_help_lists_every_setting_with_its_variable_default_and_description(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help("serve", capsys).split())  # argparse wraps lines
    for name, field in Settings.model_fields.items():
        default = "none" if field.default is None else repr(field.default)
        assert f"BAGSERVE_{name.upper()} (default {default})" in text
        assert " ".join(str(field.description).split()) in text


@pytest.mark.parametrize(("command", "shown"), [
    ("export", ["pooling (default: mean)", "(default: 2.0)"]),
    ("quantize", ["(default: mean)", "bags sampled (default: 1000)",
                  "(default: 20.0)", "(default: 0)"]),
    ("ready", ["(default: 2.0)"]),
])
def test_every_subcommand_shows_its_defaults(capsys: pytest.CaptureFixture[str], command: str,
                                             shown: list[str]) -> None:
    text = " ".join(_help(command, capsys).split())
    for fragment in shown:
        assert fragment in text


def test_errors_name_the_flag_not_the_python_keyword(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two.safetensors"
    table = np.ones((4, 2), np.float32)
    write_safetensors(path, {"a": table, "b": table})
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err
    assert "pass --tensor NAME" in error and "tensor=NAME" not in error


def test_workers_auto_is_one_per_usable_core(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from service.settings import usable_cores

    assert Settings(workers="auto").workers == min(64, usable_cores())
    monkeypatch.setenv("BAGSERVE_WORKERS", "auto")
    assert Settings().workers == min(64, usable_cores())
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert main(["serve", "--workers", "many"]) == 2
    assert "workers must be a number from 1 to 64 or 'auto'; got 'many'" in \
        capsys.readouterr().err
