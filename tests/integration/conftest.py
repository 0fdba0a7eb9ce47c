"""A real ``bagserve serve`` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from models import write_safetensors
from tests.service.conftest import table

BAGSERVE = str(Path(sys.executable).parent / "bagserve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    log_file: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 wait: bool = True) -> Server:
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    log_file = log.open("wb")
    process = subprocess.Popen([BAGSERVE, "serve", "--port", str(port), *args],
                               stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, "BAGSERVE_LOG_FORMAT": "text", **(env or {})})
    server = Server(process, port, log, log_file)
    if wait:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        server.stop()
        raise AssertionError(f"server not ready in time:\n{log.read_text()}")
    return server


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_safetensors(folder / "items.safetensors", {"weight": table()})
    config = folder / "models.toml"
    config.write_text('[[models]]\nname = "items"\ncheckpoint = "items.safetensors"\n'
                      'mode = "mean"\n\n[[models]]\nname = "weighted"\n'
                      'checkpoint = "items.safetensors"\nmode = "sum"\n')
    return config


@pytest.fixture(scope="module")
def server(model_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("logs"), "--config", str(model_config))
    yield running
    assert running.stop() == 0, running.log.read_text()
