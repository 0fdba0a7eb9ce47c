"""Running the app: one process, or a pre-forked pool of worker processes.

Workers (``--workers N``) are forked from a parent that has imported everything but
loaded no model and started no thread: the interpreter, NumPy, numba, FastAPI and the
service code are shared copy-on-write, each worker then memory-maps the checkpoints
(the page cache holds one copy for all) and warms its kernels. All workers accept on one
listening socket. The parent forwards SIGTERM/SIGINT to every worker, and if a worker
fails to start it stops the others and exits with an error.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket
import sys
from dataclasses import replace
from types import FrameType

import uvicorn

from service.app import create_app
from service.config import ModelSpec
from service.registry import LoadedModel
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: not ready first, then uvicorn's graceful shutdown (stop accepting,
    finish in-flight requests, run the lifespan shutdown). A completed drain exits 0
    instead of re-raising the signal, so orchestrators see success."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_drain()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _server(settings: Settings, specs: list[ModelSpec] | None,
            models: list[LoadedModel] | None) -> DrainingServer:
    app = create_app(settings, specs=specs, models=models)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))
    return DrainingServer(config, app.state.service)


def run_single(settings: Settings, models: list[LoadedModel]) -> int:
    """Serve already loaded models in this process until SIGTERM; returns the exit code."""
    server = _server(settings, None, models)
    server.run()
    return 0 if server.started else 1


def _listen(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(settings: Settings, specs: list[ModelSpec], sock: socket.socket) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    server = _server(settings, specs, None)
    server.run(sockets=[sock])
    return 0 if server.started else 3


def _preload() -> None:
    """Work every worker would repeat, done once before the fork so its pages are shared:
    numba's import and its LLVM/runtime initialisation (a serial function: no thread
    pool starts, so forking stays safe); then freeze the garbage collector so it does not
    dirty the shared objects by scanning them."""
    from kernels import numba_kernel

    if numba_kernel.available():
        import numba

        numba.njit(lambda x: x + 1)(1)
    gc.collect()
    gc.freeze()


def run_workers(settings: Settings, specs: list[ModelSpec], workers: int) -> int:
    """Fork ``workers`` processes serving ``specs`` on one socket; returns the exit code.

    Models without their own ``num_threads`` get the cores divided among the workers, so
    N workers' kernels do not oversubscribe the machine."""
    share = max(1, (os.cpu_count() or 1) // workers)
    specs = [spec if spec.num_threads is not None else replace(spec, num_threads=share)
             for spec in specs]
    _preload()
    sock = _listen(settings)
    children: dict[int, int] = {}
    for number in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (covered by the worker tests)
            code = 1
            try:
                code = _worker(settings, specs, sock)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = number
    sock.close()
    logger.info("workers started", extra={"workers": sorted(children)})

    def forward(sig: int, frame: FrameType | None) -> None:
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = 0
    while children:
        pid, code = os.wait()
        if pid not in children:
            continue
        number = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0:
            logger.error("worker exited", extra={"worker": number, "code": exit_code})
            status = 2
            forward(signal.SIGTERM, None)  # one failed: stop the pool
    return status
