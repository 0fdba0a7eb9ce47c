"""Model control in a real server: SIGHUP reloads, and every worker of several swaps."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from models import write_safetensors
from tests.integration.conftest import Server, start_server
from tests.integration.scenarios import pattern_table, swap_under_load
from tests.integration.test_workers import _children

BAG = {"bags": [[1, 2, 3]]}


def _write(folder: Path, name: str, value: float) -> None:
    """Checkpoint ``name`` whose every entry is ``value``, replaced by rename."""
    staged = folder / f".{name}.tmp"
    write_safetensors(staged, {"weight": np.full((20, 4), value, np.float32)})
    staged.replace(folder / f"{name}.safetensors")


def _config(folder: Path, *names: str) -> Path:
    config = folder / "models.toml"
    config.write_text("".join(f'[[models]]\nname = "{n}"\ncheckpoint = "{n}.safetensors"\n'
                              'mode = "sum"\n' for n in names))
    return config


def _answers(server: Server, name: str = "m", count: int = 40) -> set[tuple[str, float]]:
    """(version, first value) of ``count`` requests, each on a new connection (so every
    worker answers some)."""
    seen = set()
    for _ in range(count):
        response = httpx.post(f"{server.url}/v1/models/{name}/embed", json=BAG, timeout=30)
        assert response.status_code == 200, response.text
        seen.add((response.headers["X-Model-Version"], response.json()["embeddings"][0][0]))
    return seen


def _until(server: Server, expected: set[tuple[str, float]], name: str = "m") -> None:
    deadline = time.monotonic() + 60
    while (seen := _answers(server, name, 10)) != expected:
        assert time.monotonic() < deadline, (seen, server.log.read_text()[-3000:])
        time.sleep(0.2)


def test_sighup_reloads_what_changed_in_one_process(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1.0)
    _write(tmp_path, "n", 5.0)
    server = start_server(tmp_path, "--config", str(_config(tmp_path, "m")))
    try:
        assert _answers(server, count=3) == {("1", 3.0)}
        _write(tmp_path, "m", 2.0)
        _config(tmp_path, "m", "n")
        server.process.send_signal(signal.SIGHUP)
        _until(server, {("2", 6.0)})
        _until(server, {("1", 15.0)}, "n")
        _config(tmp_path, "n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.post(f"{server.url}/v1/models/m/embed", json=BAG).status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.process.send_signal(signal.SIGHUP)  # nothing changed: nothing reloads
        time.sleep(1)
        assert _answers(server, "n", 3) == {("1", 15.0)}
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_every_worker_swaps_and_replacements_start_current(tmp_path: Path) -> None:
    _write(tmp_path, "m", 1.0)
    server = start_server(tmp_path, "--config", str(_config(tmp_path, "m")),
                          "--workers", "2")
    try:
        assert _answers(server) == {("1", 3.0)}
        _write(tmp_path, "m", 2.0)
        response = httpx.post(f"{server.url}/v2/repository/models/m/load", timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == "2"
        _until(server, {("2", 6.0)})  # the other worker applies it right after
        assert _answers(server) == {("2", 6.0)}
        _write(tmp_path, "m", 3.0)
        os.kill(server.process.pid, signal.SIGHUP)  # the parent relays it
        _until(server, {("3", 9.0)})
        # A worker that dies now is replaced by one serving version 3, not 1.
        os.kill(_children(server.process.pid)[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_children(server.process.pid)) != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)  # the replacement loads and starts accepting
        assert _answers(server, count=60) == {("3", 9.0)}
        # A failed load changes nothing anywhere, and says why.
        staged = tmp_path / "broken"
        staged.write_bytes(b"not a checkpoint")
        staged.replace(tmp_path / "m.safetensors")
        failed = httpx.post(f"{server.url}/v2/repository/models/m/load", timeout=60)
        assert failed.status_code == 400 and "m.safetensors" in failed.json()["error"]
        assert _answers(server) == {("3", 9.0)}
        assert httpx.post(f"{server.url}/v2/repository/models/m/unload",
                          timeout=60).status_code == 200
        deadline = time.monotonic() + 30
        while any(httpx.post(f"{server.url}/v1/models/m/embed", json=BAG).status_code != 404
                  for _ in range(10)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.log.read_text()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_swaps_under_load_fail_no_request_and_mix_no_answer(tmp_path: Path,
                                                             workers: str) -> None:
    # The small version of benchmarks/swap_under_load.py (RELIABILITY.md has the 1 GiB one).
    rows, dim = 20_000, 16
    for version in (0, 1):
        pattern_table(tmp_path / f"v{version}.npy", rows, dim, version)
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    os.link(tmp_path / "v0.npy", tmp_path / "table.npy")
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nname = "m"\ncheckpoint = "table.npy"\nmode = "sum"\n')
    server = start_server(tmp_path, "--config", str(config), "--workers", workers)
    try:
        seen = swap_under_load(server, tmp_path, rows=rows, dim=dim, seconds=6, clients=8,
                               swaps=4, corrupt_at=1)
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert set(seen.statuses) == {"200"}, seen.statuses
    assert "wrong" not in seen.matched and set(seen.matched) == {"0", "1"}, seen.matched
    assert [status for status, _ in seen.swaps] == [200, 400, 200, 200, 200], seen.swaps


def test_a_replacement_that_cannot_load_waits_while_the_other_worker_serves(
        tmp_path: Path) -> None:
    _write(tmp_path, "m", 1.0)
    server = start_server(tmp_path, "--config", str(_config(tmp_path, "m")),
                          "--workers", "2")
    try:
        staged = tmp_path / "broken"
        staged.write_bytes(b"not a checkpoint")
        staged.replace(tmp_path / "m.safetensors")  # broken on disk since start-up
        os.kill(_children(server.process.pid)[0], signal.SIGKILL)
        time.sleep(3)  # the replacement fails to start; the pool must not stop
        assert server.process.poll() is None, server.log.read_text()[-3000:]
        assert _answers(server, count=20) == {("1", 3.0)}
        _write(tmp_path, "m", 1.0)  # fixed: the next try starts
        deadline = time.monotonic() + 30
        while len(_children(server.process.pid)) != 2 or "replacement worker failed" not in \
                server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)
        assert _answers(server, count=40) == {("1", 3.0)}
    finally:
        assert server.stop() == 0, server.log.read_text()
