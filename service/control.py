"""Model control across worker processes: every worker applies every load and unload.

The parent owns the numbering. A worker asked to load or unload (a repository route)
writes the command up one pipe shared by all workers; the parent gives it a version and
writes it down each worker's own pipe; each worker applies the commands in order, and the
asking worker answers its route with its own outcome. ``SIGHUP`` goes to the parent,
which re-reads the config and sends down what changed. A replacement worker is forked
with the parent's current versions and unloaded names. Lines are JSON objects under
``PIPE_BUF`` bytes, so writes from several workers never interleave.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from service.config import (
    ConfigError,
    ModelSpec,
    checkpoint_stamp,
    config_changes,
    served_config,
)
from service.registry import LoadedModel
from service.state import ServiceState

logger = logging.getLogger(__name__)

#: Longest command line: a model name is at most 128 characters (config.NAME).
MAX_LINE = 512


def _lines(buffer: bytearray, data: bytes) -> list[dict[str, Any]]:
    """Append ``data`` to ``buffer`` and pop every complete JSON line from it."""
    buffer += data
    commands = []
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        try:
            command = orjson.loads(line)
        except orjson.JSONDecodeError:
            logger.error("control: dropped a garbled line %r", line[:80])
            continue
        if isinstance(command, dict):
            commands.append(command)
    return commands


class WorkerLink:
    """A worker's ends of the control pipes: ``up`` (to the parent) and ``down``."""

    def __init__(self, up: int, down: int) -> None:
        self.up, self.down = up, down
        self._buffer = bytearray()
        self._counter = itertools.count()
        self._waiting: dict[str, asyncio.Future[LoadedModel | None]] = {}
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def attach(self, state: ServiceState) -> None:
        """Apply the parent's commands to ``state`` and route its own commands up."""
        loop = asyncio.get_running_loop()
        os.set_blocking(self.down, False)
        loop.add_reader(self.down, self._readable)
        self._task = loop.create_task(self._apply_all(state))
        state.relay = self.relay

    async def relay(self, command: dict[str, Any]) -> None:
        """Send ``command`` to every worker; return (or raise) when this one applied it."""
        token = f"{os.getpid()}:{next(self._counter)}"
        future = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        line = orjson.dumps({**command, "token": token}) + b"\n"
        if len(line) > MAX_LINE:
            raise ValueError("control command too long")
        os.write(self.up, line)
        try:
            await future
        finally:
            self._waiting.pop(token, None)

    def _readable(self) -> None:
        try:
            data = os.read(self.down, 65536)
        except BlockingIOError:
            return
        if not data:  # the parent is gone; the worker is about to be stopped anyway
            asyncio.get_running_loop().remove_reader(self.down)
            return
        for command in _lines(self._buffer, data):
            self._queue.put_nowait(command)

    async def _apply_all(self, state: ServiceState) -> None:
        while True:
            command = await self._queue.get()
            waiter = self._waiting.get(str(command.get("token")))
            try:
                model = await state.apply(command)
            except Exception as exc:  # noqa: BLE001 - reported to the asker, else logged
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
                continue
            if waiter is not None and not waiter.done():
                waiter.set_result(model)


class ParentLink:
    """The parent's side: reads commands from workers, numbers them, sends them to all.

    Args:
        specs: the models as the workers serve them (thread shares applied).
        config: the config file, re-read on ``SIGHUP`` (``None``: the demo model).
        workers: how many workers share the machine's cores.
    """

    def __init__(self, specs: list[ModelSpec], config: Path | None,
                 workers: int) -> None:
        self.up_read, self.up_write = os.pipe()
        self.specs = list(specs)
        self.config = config
        self.workers = workers
        self.versions = {spec.name: 1 for spec in specs}
        self.unloaded: set[str] = set()
        self.stamps = {spec.name: checkpoint_stamp(spec) for spec in specs}
        self.downs: dict[int, int] = {}  # worker pid -> its down pipe's write end
        self._buffer = bytearray()

    def new_worker(self) -> tuple[int, int]:
        """A fresh down pipe: ``(read end for the child, write end kept here)``."""
        return os.pipe()

    def child_side(self, down_read: int) -> WorkerLink:
        """In the forked child: close the parent's ends, keep the worker's."""
        os.close(self.up_read)
        for fd in self.downs.values():
            os.close(fd)
        return WorkerLink(self.up_write, down_read)

    def read_commands(self) -> None:
        """Number and broadcast what workers sent (call when ``up_read`` is readable)."""
        data = os.read(self.up_read, 65536)
        for command in _lines(self._buffer, data):
            if command.get("op") in ("load", "unload") and isinstance(command.get("name"),
                                                                    str):
                self._broadcast(command)

    def reload(self) -> None:
        """``SIGHUP``: re-read the config and send what changed, as a single process does."""
        if self.config is None:
            logger.warning("SIGHUP: no config file (serving the built-in demo); nothing "
                           "to reload")
            return
        try:
            specs = served_config(self.config, self.workers)
        except ConfigError as exc:
            logger.error("config reload failed; nothing changed: %s", exc)
            return
        served = {spec.name: spec for spec in self.specs}
        load, unload = config_changes(specs, served, self.stamps,
                                      set(served) - self.unloaded)
        self.specs = specs
        fresh = {spec.name: spec for spec in specs}
        for name in load:
            self._broadcast({"op": "load", "name": name}, fresh[name])
        for name in unload:
            self._broadcast({"op": "unload", "name": name})

    def _entry(self, name: str) -> ModelSpec | None:
        """``name``'s entry now in the config file, if it can be read and has one."""
        if self.config is None:
            return None
        try:
            specs = served_config(self.config, self.workers)
        except ConfigError:
            return None
        return next((spec for spec in specs if spec.name == name), None)

    def _broadcast(self, command: dict[str, Any], spec: ModelSpec | None = None) -> None:
        """Number a load (``spec``: its entry as read already, else read here) and send
        the command down every worker's pipe."""
        name = command["name"]
        if command["op"] == "load":
            command["version"] = self.versions[name] = self.versions.get(name, 0) + 1
            self.unloaded.discard(name)
            spec = spec or self._entry(name)
            if spec is not None:  # replacement workers start from the entry now in the file
                names = [known.name for known in self.specs]
                if name in names:
                    self.specs[names.index(name)] = spec  # the config's order stays
                else:
                    self.specs.append(spec)
                self.stamps[name] = checkpoint_stamp(spec)
        else:
            self.unloaded.add(name)
        line = orjson.dumps(command) + b"\n"
        for fd in list(self.downs.values()):
            try:
                os.write(fd, line)
            except OSError:  # that worker is gone; its replacement starts current
                pass
        logger.info("control command sent to every worker",
                    extra={"op": command["op"], "model": name,
                           "version": command.get("version"), "workers": len(self.downs)})

    def worker_gone(self, pid: int) -> None:
        fd = self.downs.pop(pid, None)
        if fd is not None:
            os.close(fd)
