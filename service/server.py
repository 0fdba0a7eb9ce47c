"""Running the app: one process, or a pre-forked pool of worker processes.

Workers (``--workers N``) are forked from a parent that has imported everything but
loaded no model and started no thread: the interpreter, NumPy, numba, FastAPI and the
service code are shared copy-on-write, each worker then memory-maps the checkpoints
(the page cache holds one copy for all) and warms its kernels. All workers accept on one
listening socket. The parent forwards SIGTERM/SIGINT to every worker and replaces a
worker that dies; if a worker fails to start, or workers keep dying, it stops the others
and exits with an error.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import select
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.app import create_app
from service.batcher import loop_load
from service.config import ModelSpec, share_threads
from service.control import ParentLink
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


class CoalescingTransport:
    """A transport that sends a response's head with its body in one system call, and,
    while the event loop is saturated, every connection's answers at the end of the
    loop's step instead of one by one.

    uvicorn writes a head and its body separately: two ``send`` calls an answer, each
    tens of microseconds on these VMs (the loopback delivery runs inside them). A write
    is held until the next (both leave at once, in one ``writev``) or the end of this
    step of the loop. Under load (:func:`service.batcher.loop_load`) writes wait for the
    end of the step even in pairs: the loop reads every ready request, then answers them
    in a burst (one-bag requests at 64 connections: 4,770-4,970 -> 5,660-6,240 req/s,
    and the client's own CPU halved); alone, that wait is one more turn of the loop
    (one connection: -12%), so an idle loop sends at once. Every other attribute is the
    wrapped transport's; ``close`` and ``abort`` flush or drop what is pending first."""

    def __init__(self, transport: Any, loop: Any) -> None:
        self._transport = transport
        self._loop = loop
        self._load = loop_load(loop)
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if len(self._pending) == 1:
            self._loop.call_soon(self._flush)  # leaves at the end of this step at latest
        elif not self._load.busy:
            self._flush()  # a head and its body: both now, in one writev

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return int(self._transport.get_write_buffer_size()) + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class IdleClosingProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol with two guards against idle sockets (20,000 of them once
    made every request fail):

    - the keep-alive timer starts when a connection opens (uvicorn starts it only after a
      first response, so a connection that never sent anything stayed open forever);
    - past ``max_connections`` open connections, a new one closes the oldest idle one
      (no request in progress): the process never runs out of file descriptors, and new
      clients (the readiness probe among them) are served rather than refused.
    """

    #: Set per server by :func:`_server` (a class attribute: uvicorn builds the protocol).
    max_connections = 4096

    def connection_made(self, transport: Any) -> None:
        super().connection_made(CoalescingTransport(transport, self.loop))
        self.opened_at = self.loop.time()
        if getattr(self, "timeout_keep_alive_task", None) is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
        connections = self.server_state.connections
        if len(connections) > self.max_connections:
            idle = [c for c in connections if c is not self and getattr(c, "cycle", 1) is None]
            if idle:
                oldest = min(idle, key=lambda c: getattr(c, "opened_at", 0.0))
                oldest.transport.close()


def _open_files_limit() -> None:
    """Raise this process's open-file limit to its hard limit: every connection is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _server(settings: Settings, specs: list[ModelSpec] | None,
            models: list[LoadedModel] | None, **control: Any) -> DrainingServer:
    app = create_app(settings, specs=specs, models=models, **control)
    protocol = type("Protocol", (IdleClosingProtocol,),
                    {"max_connections": settings.max_connections})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on", http=protocol,
                            timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))
    return DrainingServer(config, app.state.service)


def run_single(settings: Settings, models: list[LoadedModel]) -> int:
    """Serve already loaded models in this process until SIGTERM; returns the exit code."""
    _open_files_limit()
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


def _worker(settings: Settings, parent: ParentLink, down: int, sock: socket.socket) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # The parent handles SIGHUP (a reload reaches every worker through it); one sent to
    # the whole process group must not also reload, or stop, this worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    link = parent.child_side(down)
    server = _server(settings, parent.specs, None, link=link, versions=dict(parent.versions),
                     unloaded=frozenset(parent.unloaded))
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits this way when the lifespan start-up fails
        if server.started:
            raise
    return 0 if server.started else _START_FAILED


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


#: A pool whose workers die more often than this (not counting start-up failures, which
#: stop it at once) gives up: a crash loop is an outage to report, not to hide.
RESPAWN_LIMIT, RESPAWN_WINDOW_S = 5, 60.0
#: Seconds before a replacement that failed to start is tried again.
RETRY_START_S = 5.0
#: Exit code of a worker whose server never started (a bad checkpoint or config).
_START_FAILED = 3


def _spawn(settings: Settings, parent: ParentLink, sock: socket.socket) -> int:
    down_read, down_write = parent.new_worker()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child (covered by the worker tests)
        code = 1
        try:
            os.close(down_write)
            code = _worker(settings, parent, down_read, sock)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(down_read)
    parent.downs[pid] = down_write
    return pid


def run_workers(settings: Settings, specs: list[ModelSpec], workers: int) -> int:
    """Fork ``workers`` processes serving ``specs`` on one socket and supervise them until
    SIGTERM/SIGINT; returns the exit code.

    A worker that dies (a crash, the OOM killer, a SIGKILL) is replaced while the others
    keep serving; a worker that fails to start stops the pool (exit 2), and so do more
    than :data:`RESPAWN_LIMIT` deaths within :data:`RESPAWN_WINDOW_S` seconds. Models
    without their own ``num_threads`` get the cores divided among the workers, so N
    workers' kernels do not oversubscribe the machine. Model control (the repository
    routes, ``SIGHUP``) reaches every worker through the parent (:mod:`service.control`)."""
    parent = ParentLink([share_threads(spec, workers) for spec in specs], settings.config,
                        workers)
    _preload()
    _open_files_limit()
    sock = _listen(settings)  # kept open: replacements accept on it too
    children = {_spawn(settings, parent, sock): number for number in range(workers)}
    first = set(children)  # a start-up failure of one of these stops the pool
    waiting: list[tuple[float, int]] = []  # (when, worker number) to start again
    logger.info("workers started", extra={"workers": sorted(children)})
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    reload_wanted = False

    def reload(sig: int, frame: FrameType | None) -> None:
        nonlocal reload_wanted
        reload_wanted = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, reload)
    status = 0
    deaths: list[float] = []
    while children or waiting:
        # Commands from workers, a pending reload, replacements due, then any ended worker.
        readable, _, _ = select.select([parent.up_read], [], [], 0.2)
        if readable:
            parent.read_commands()
        if reload_wanted and not stopping:
            reload_wanted = False
            parent.reload()
        for due in [w for w in waiting if w[0] <= time.monotonic() or stopping]:
            waiting.remove(due)
            if not stopping:
                children[_spawn(settings, parent, sock)] = due[1]
        if not children:
            continue
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid == 0 or pid not in children:
            continue
        parent.worker_gone(pid)
        number = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            # Its live gauges (queued ids) stop counting; its counters stay in the totals.
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        if stopping:
            if exit_code != 0:
                status = 2
            continue
        now = time.monotonic()
        if exit_code == _START_FAILED and pid not in first:
            # A replacement could not load what the pool serves (a checkpoint broken on
            # disk since): the others keep serving; try again later, not in a loop.
            logger.error("replacement worker failed to start; retrying in %g s",
                         RETRY_START_S, extra={"worker": number})
            waiting.append((now + RETRY_START_S, number))
            continue
        deaths = [t for t in deaths if now - t < RESPAWN_WINDOW_S] + [now]
        if exit_code == _START_FAILED or len(deaths) > RESPAWN_LIMIT:
            why = ("failed to start" if exit_code == _START_FAILED else
                   f"died {len(deaths)} times in {RESPAWN_WINDOW_S:g} s")
            logger.error("worker %s; stopping the pool", why,
                         extra={"worker": number, "code": exit_code})
            status = 2
            forward(signal.SIGTERM, None)
            continue
        replacement = _spawn(settings, parent, sock)
        children[replacement] = number
        logger.warning("worker died; replaced", extra={"worker": number, "code": exit_code,
                                                        "pid": replacement})
    sock.close()
    return status
