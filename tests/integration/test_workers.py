"""--workers: processes share the memory-mapped table and the interpreter's pages."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from tests.integration.conftest import Server, start_server

ROWS, DIM = (1 << 30) // (128 * 4), 128  # a 1 GiB float32 table


def _unique_mib(pid: int) -> float:
    """USS: pages only this process maps (private clean + private dirty), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _two_workers(tmp_path: Path, checkpoint: str) -> Server:
    """A two-worker server on one sum model ``m`` over ``checkpoint`` (in ``tmp_path``)."""
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nname = "m"\ncheckpoint = "{checkpoint}"\nmode = "sum"\n')
    server = start_server(tmp_path, "--config", str(config), "--workers", "2")
    assert len(_children(server.process.pid)) == 2
    return server


def _table_folder(tmp_path: Path) -> Path:
    """A folder with room for the 1 GiB table: ``tmp_path``, else /dev/shm (tmpfs).

    Raises pytest's skip, naming the free space, where neither has room: a memory-mapped
    write into a full file system is a SIGBUS that kills the whole test run.
    """
    import shutil

    import pytest

    need = ROWS * DIM * 4 + (256 << 20)
    for folder in (tmp_path, Path("/dev/shm")):
        if folder.is_dir() and shutil.disk_usage(folder).free >= need:
            return folder
    free = {str(f): shutil.disk_usage(f).free >> 20 for f in (tmp_path, Path("/dev/shm"))
            if f.is_dir()}
    pytest.skip(f"no room for a 1 GiB table: free MiB {free}, need {need >> 20}")


def _write_table(path: Path) -> None:
    """A (ROWS, DIM) float32 .npy whose row r holds r / ROWS, written with plain writes
    (a full disk raises OSError instead of faulting a mapped page)."""
    step = 1 << 18
    with path.open("wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "<f4", "fortran_order": False, "shape": (ROWS, DIM)})
        for start in range(0, ROWS, step):
            file.write(np.full((step, DIM), start / ROWS, np.float32).tobytes())


def test_two_workers_share_a_1gib_table(tmp_path: Path) -> None:
    folder = _table_folder(tmp_path)
    table = folder / f"bagserve-workers-{tmp_path.name}.npy"
    try:
        _write_table(table)
        _share_the_table(tmp_path, table)
    finally:
        table.unlink(missing_ok=True)  # pytest keeps the last runs' tmp_path: 1 GiB each


def _share_the_table(tmp_path: Path, table: Path) -> None:
    server = _two_workers(tmp_path, str(table))
    try:
        workers = _children(server.process.pid)
        # Every worker read every row at start-up (the NaN/inf check); then traffic that
        # sweeps all rows twice, one new connection per request, lands on both.
        for _sweep in range(2):
            for start in range(0, ROWS, 65536):
                response = httpx.post(f"{server.url}/v1/models/m/embed",
                                      json={"indices": list(range(start, start + 65536)),
                                            "offsets": [0]}, timeout=60)
                assert response.status_code == 200, response.text
        table_mib = ROWS * DIM * 4 / 2**20
        unique = [_unique_mib(pid) for pid in workers]
        assert all(u < 0.10 * table_mib for u in unique), (unique, table_mib)
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_worker_failing_to_start_stops_the_pool(tmp_path: Path) -> None:
    import subprocess

    from tests.integration.conftest import BAGSERVE

    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nname = "big"\ncheckpoint = "broken.npy"\n')
    result = subprocess.run([BAGSERVE, "serve", "--config", str(config), "--port", "0",
                             "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "broken.npy" in result.stderr


def test_a_killed_worker_is_replaced_while_the_other_serves(tmp_path: Path) -> None:
    import os
    import signal
    import time

    np.save(tmp_path / "small.npy", np.ones((1000, 16), np.float32))
    server = _two_workers(tmp_path, "small.npy")
    try:
        first = _children(server.process.pid)
        os.kill(first[0], signal.SIGKILL)
        answered = failed = 0
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                try:
                    response = client.post(f"{server.url}/v1/models/m/embed",
                                           json={"bags": [[1, 2]]})
                    answered += response.status_code == 200
                    failed += response.status_code != 200
                except httpx.TransportError:
                    failed += 1
                now = _children(server.process.pid)
                if len(now) == 2 and first[0] not in now and answered >= 200:
                    break
        assert server.process.poll() is None, server.log.read_text()
        replaced = _children(server.process.pid)
        assert len(replaced) == 2 and first[0] not in replaced and first[1] in replaced
        assert failed <= 0.01 * (answered + failed), (answered, failed)
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_every_scrape_reads_the_totals_of_all_workers(tmp_path: Path) -> None:
    import re

    np.save(tmp_path / "small.npy", np.ones((100, 4), np.float32))
    server = _two_workers(tmp_path, "small.npy")
    try:
        requests = 60
        for _ in range(requests):  # a new connection each: both workers answer some
            assert httpx.post(f"{server.url}/v1/models/m/embed", json={"bags": [[1]]},
                              timeout=30).status_code == 200
        pattern = re.compile(r'^bagserve_requests_total\{model="m",outcome="ok"\} (\S+)$',
                             re.MULTILINE)
        seen = []
        for _ in range(6):
            text = httpx.get(f"{server.url}/metrics", timeout=30).text
            match = pattern.search(text)
            assert match is not None, text[:500]
            seen.append(float(match.group(1)))
        assert seen == [requests] * 6, seen
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_workers_auto_starts_one_per_usable_core(tmp_path: Path) -> None:
    import os

    np.save(tmp_path / "small.npy", np.ones((100, 4), np.float32))
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nname = "m"\ncheckpoint = "small.npy"\nmode = "sum"\n')
    server = start_server(tmp_path, "--config", str(config), "--workers", "auto")
    try:
        cores = len(os.sched_getaffinity(0))
        if cores > 1:
            assert len(_children(server.process.pid)) == cores
        assert httpx.post(f"{server.url}/v1/models/m/embed", json={"bags": [[1]]},
                          timeout=30).status_code == 200
    finally:
        assert server.stop() == 0, server.log.read_text()
