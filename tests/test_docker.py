"""The Dockerfile without a Docker engine: lint, a parsed cross-check against the CLI and
settings, and the image's install step + command run for real in a fresh venv."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli import build_parser
from service.settings import Settings
from tests.integration.conftest import free_port

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(ROOT / "Dockerfile")
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in stage:
        if op == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info",
                             str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_image_command_healthcheck_and_settings_are_real() -> None:
    stage = dict(_final_stage())
    command = json.loads(stage["CMD"])
    assert command[0] == "bagserve"
    build_parser().parse_args(command[1:])  # a valid invocation of the CLI
    health = stage["HEALTHCHECK"]
    probe = json.loads(health[health.index("CMD") + 3:].strip())
    assert probe[0] == "bagserve"
    build_parser().parse_args(probe[1:])
    env = _env(_final_stage())
    fields = {f"BAGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("BAGSERVE_")} <= fields
    assert env["BAGSERVE_HOST"] == "0.0.0.0"
    assert stage["EXPOSE"] == env["BAGSERVE_PORT"]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert stage["USER"] not in ("root", "0")
    assert float(env["BAGSERVE_SHUTDOWN_GRACE_S"]) <= 25  # docker stop -t 30 leaves 5 s


def test_base_images_are_pinned_by_tag() -> None:
    images = [args.split("=", 1)[1] for op, args in _instructions(ROOT / "Dockerfile")
              if op == "ARG" and args.split("=", 1)[0].endswith("_IMAGE")]
    assert len(images) == 2
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), image
    froms = [args.split()[0] for op, args in _instructions(ROOT / "Dockerfile") if op == "FROM"]
    assert froms == ["${BUILD_IMAGE}", "${BASE_IMAGE}"]


def test_dockerignore_keeps_tests_caches_and_checkpoints_out() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for pattern in ("tests", ".git", ".venv", "**/__pycache__", "**/*.safetensors", "**/*.pt",
                    "**/*.npy"):
        assert pattern in ignored, pattern
    for needed in ("kernels", "models", "service", "pyproject.toml", "README.md"):
        assert needed not in ignored


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's install step (a wheel, installed into a fresh venv), with the
    dependencies taken from this environment instead of the network."""
    folder = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(folder / "wheels"), str(ROOT)], check=True,
                   capture_output=True)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and
                Path(p).is_relative_to(BIN.parent))
    (site / "dependencies.pth").write_text(f"{ours}\n")
    wheel = next((folder / "wheels").glob("bagserve-*.whl"))
    # The venv's own pip, as in the image: console scripts point at the venv's python.
    # --ignore-installed: never uninstall the bagserve this environment sees via the .pth.
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True)
    return venv


def test_the_image_install_serves_the_demo(image_venv: Path, tmp_path: Path) -> None:
    env = {**os.environ, **_env(_final_stage())}
    port = free_port()
    env.update({"BAGSERVE_HOST": "127.0.0.1", "BAGSERVE_PORT": str(port),
                "PATH": f"{image_venv / 'bin'}:{env['PATH']}",
                "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    # Run from an empty folder, so nothing is imported from the source tree.
    command = json.loads(dict(_final_stage())["CMD"])
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([str(image_venv / "bin" / command[0]), *command[1:]],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = [str(image_venv / "bin" / "bagserve"), "ready"]
        deadline = time.monotonic() + 90
        while subprocess.run(ready, env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the image command never became ready"
            time.sleep(0.3)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models/demo/embed",
                              json={"bags": [[1, 2, 3]]})
        assert response.status_code == 200
        import_check = subprocess.run(
            [str(image_venv / "bin" / "python"), "-c",
             "import service, models, kernels; print(service.__file__)"],
            cwd=tmp_path, capture_output=True, text=True, check=True)
        assert str(image_venv) in import_check.stdout  # the wheel, not the source tree
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        log.close()
        assert code == 0, (tmp_path / "server.log").read_text()
