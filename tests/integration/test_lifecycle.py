"""Start-up, the demo model, SIGTERM under load, start-up failures: real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np

from models import EmbeddingBag
from service.registry import demo_table
from tests.integration.conftest import BAGSERVE, start_server
from tests.integration.scenarios import sigterm_under_load


def test_demo_model_serves_without_config(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        response = httpx.post(f"{server.url}/v1/models/demo/embed",
                              json={"bags": [[1, 2, 3]]}, timeout=10)
        assert response.status_code == 200
        expected = EmbeddingBag.from_pretrained(demo_table(), mode="mean")([[1, 2, 3]])
        np.testing.assert_array_equal(np.array(response.json()["embeddings"], np.float32),
                                      expected)
    finally:
        assert server.stop() == 0


def test_bad_checkpoint_stops_start_up_naming_model_and_file(tmp_path: Path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 4)
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nname = "items"\ncheckpoint = "broken.safetensors"\n')
    result = subprocess.run([BAGSERVE, "serve", "--config", str(config), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "model 'items'" in result.stderr
    assert str(tmp_path / "broken.safetensors") in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_under_load_loses_no_admitted_request(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    seen, code = sigterm_under_load(server, clients=16, after_s=1.0)
    assert code == 0, server.log.read_text()
    assert seen.wrong == 0
    assert seen.statuses["200"] > 16
    assert set(seen.statuses) <= {"200", "503", "refused"}, seen.statuses
    log = server.log.read_text()
    assert log.index("draining") < log.index("Shutting down")


def test_slow_client_gets_408_and_others_are_served(tmp_path: Path) -> None:
    import socket

    server = start_server(tmp_path, env={"BAGSERVE_BODY_TIMEOUT_S": "1"})
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"POST /v1/models/demo/embed HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"bags": [[1')
            # Meanwhile the server answers everyone else.
            response = httpx.post(f"{server.url}/v1/models/demo/embed",
                                  json={"bags": [[1]]}, timeout=10)
            assert response.status_code == 200
            slow.settimeout(10)
            answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request body not received within 1 s" in answer
    finally:
        assert server.stop() == 0


def test_idle_connections_are_closed_and_do_not_block_others(tmp_path: Path) -> None:
    import socket
    import time

    server = start_server(tmp_path, env={"BAGSERVE_IDLE_TIMEOUT_S": "0.5"})
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        response = httpx.post(f"{server.url}/v1/models/demo/embed", json={"bags": [[1]]},
                              timeout=10)
        assert response.status_code == 200
        time.sleep(1.5)
        for sock in idle:
            sock.settimeout(2)
            assert sock.recv(1) == b""  # closed by the server
            sock.close()
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_past_max_connections_the_oldest_idle_ones_make_room(tmp_path: Path) -> None:
    import socket
    import time

    server = start_server(tmp_path, env={"BAGSERVE_IDLE_TIMEOUT_S": "60",
                                         "BAGSERVE_MAX_CONNECTIONS": "50"})
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        for _ in range(3):  # new clients are served although 200 sockets sit idle
            assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
        closed = 0
        time.sleep(0.5)  # let the closes arrive
        for sock in idle:
            sock.settimeout(0.02)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
            sock.close()
        assert closed >= 140, closed  # at most 50 stay open
    finally:
        assert server.stop() == 0, server.log.read_text()
