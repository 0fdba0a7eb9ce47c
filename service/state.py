"""The running service: settings, loaded models, their batchers, readiness, and model
control (load, unload, config reload) with atomic swaps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from service.batcher import Batcher
from service.config import (
    ConfigError,
    ModelSpec,
    checkpoint_stamp,
    config_changes,
    served_config,
)
from service.errors import ModelNotFound, NotReady
from service.heap import freeze_long_lived, release_freed_memory
from service.metrics import Metrics
from service.registry import LoadedModel, ModelLoadError, load_model
from service.settings import Settings

logger = logging.getLogger(__name__)

#: Sends a control command to every worker (multi-worker mode) and waits for this
#: worker's outcome; ``None`` in a single process, where commands apply directly.
Relay = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ServiceState:
    """Owned by one app (``app.state.service``); touched only on its event loop."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics.create)
    #: The serving models' batchers, by name (each holds its model: see :attr:`models`).
    batchers: dict[str, Batcher] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    #: The entry each name was last loaded from, and its checkpoint's stamp then.
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    stamps: dict[str, tuple[int, int, int] | None] = field(default_factory=dict)
    #: Names known but not serving, with why (unloaded, or a failed first load).
    unavailable: dict[str, str] = field(default_factory=dict)
    #: The last version given to each name (kept across unloads: versions only grow).
    versions: dict[str, int] = field(default_factory=dict)
    #: Why the last load of a serving model failed, until one succeeds.
    last_error: dict[str, str] = field(default_factory=dict)
    relay: Relay | None = None
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, specs: list[ModelSpec], preloaded: list[LoadedModel]) -> None:
        """Load (off the loop) what is not preloaded, start one batcher per model."""
        loop = asyncio.get_running_loop()
        loaded = list(preloaded)
        for spec in specs:
            if spec.name in self.unavailable:
                continue  # unloaded before this worker started
            version = self.versions.get(spec.name, 1)
            loaded.append(await loop.run_in_executor(None, load_model, spec, version))
        for model in loaded:
            self._serve(model)
        freeze_long_lived()
        self.ready = True
        logger.info("ready", extra={"models": sorted(self.batchers)})

    def begin_drain(self) -> None:
        """Not ready from now on; new inference requests get 503."""
        if not self.draining:
            logger.info("draining: not ready, no new requests admitted")
        self.draining = True
        self.ready = False

    async def stop(self) -> None:
        """Finish every admitted request, then stop the batchers."""
        self.begin_drain()
        await asyncio.gather(*(b.close() for b in self.batchers.values()), *self._retiring)
        logger.info("stopped")

    def batcher(self, name: str) -> Batcher:
        """The batcher of a ready model.

        Raises:
            NotReady: starting or draining. ModelNotFound: no such model, or unloaded.
        """
        if self.draining:
            raise NotReady("server is shutting down",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if not self.ready:
            raise NotReady("server is starting: models are still loading",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        try:
            return self.batchers[name]
        except KeyError:
            raise self.missing(name) from None

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The serving models by name (each batcher's)."""
        return {name: batcher.model for name, batcher in self.batchers.items()}

    def missing(self, name: str) -> ModelNotFound:
        """The 404 for a model not serving: unloaded (and how to load it) or unknown."""
        if name in self.unavailable:
            return ModelNotFound(f"model {name!r} is not loaded ({self.unavailable[name]}); "
                                 f"load it with POST /v2/repository/models/{name}/load")
        return ModelNotFound(f"model {name!r} not found; available: "
                             f"{', '.join(sorted(self.batchers))}")

    # Model control --------------------------------------------------------------------

    def index(self) -> list[dict[str, Any]]:
        """Every known model with its state (KServe's repository index)."""
        names = sorted(set(self.batchers) | set(self.unavailable))
        return [{"name": name, "version": str(self.versions.get(name, 1)),
                 "state": "READY" if name in self.batchers else "UNAVAILABLE",
                 "reason": self.unavailable.get(name) or self.last_error.get(name, "")}
                for name in names]

    async def load(self, name: str) -> LoadedModel | None:
        """Load ``name`` again from its config entry (re-read from the config file when
        there is one) and its checkpoint, in every worker.

        Raises:
            ModelNotFound: no config entry of that name.
            ModelLoadError: the entry or checkpoint is bad; the serving version (if any)
                keeps serving.
        """
        return await self._command({"op": "load", "name": name})

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` in every worker once its admitted requests are answered.

        Raises:
            ModelNotFound: not serving.
        """
        if name not in self.batchers:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await self._command({"op": "unload", "name": name})

    async def reload_config(self) -> None:
        """Re-read the config file and apply what changed (``SIGHUP``): load new entries,
        changed entries and rewritten checkpoints, unload removed entries. A bad file or a
        failing model is logged; everything else keeps serving."""
        try:
            specs = self._config()
        except ConfigError as exc:
            logger.error("config reload failed; nothing changed: %s", exc)
            return
        if specs is None:
            logger.warning("SIGHUP: no config file (serving the built-in demo); nothing "
                           "to reload")
            return
        load, unload = config_changes(specs, self.specs, self.stamps, set(self.batchers))
        # A model whose last load failed is tried again even if nothing changed since:
        # the fix may have been outside the config (a checkpoint put back as it was).
        configured = {spec.name for spec in specs}
        load += [name for name in self.last_error if name in configured and name not in load]
        for name in load:
            try:
                await self._command({"op": "load", "name": name})
            except (ModelLoadError, ModelNotFound) as exc:
                logger.error("reload of model %r failed; the old version keeps serving: %s",
                             name, exc)
        for name in unload:
            await self._command({"op": "unload", "name": name})

    async def _command(self, command: dict[str, Any]) -> LoadedModel | None:
        if self.relay is None:
            return await self.apply(command)
        await self.relay(command)
        batcher = self.batchers.get(command["name"])
        return None if batcher is None else batcher.model

    async def apply(self, command: dict[str, Any]) -> LoadedModel | None:
        """Carry out one control command in this process: ``{"op": "load" | "unload",
        "name": ..., "version": optional}`` (the version is given by the parent when
        several workers must agree on it)."""
        name = command["name"]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one load or unload of a name at a time, in order
            if command["op"] == "unload":
                self._unserve(name, "unloaded")
                return None
            try:
                spec = self._entry(name)
            except ConfigError as exc:
                self._failed(name, exc)
                raise ModelLoadError(f"model {name!r}: {exc}") from None
            version = int(command.get("version") or self.versions.get(name, 0) + 1)
            stamp = checkpoint_stamp(spec)  # before reading: a rewrite during it shows
            loop = asyncio.get_running_loop()
            try:
                # Read and warmed beside the serving version; requests keep flowing.
                model = await loop.run_in_executor(None, load_model, spec, version)
            except ModelLoadError as exc:
                self._failed(name, exc)
                raise
            self.stamps[name] = stamp
            self._serve(model)
            logger.info("model swapped in", extra={"model": name, "version": version})
            return model

    def _failed(self, name: str, error: Exception) -> None:
        """Log a failed load and remember why (the repository index reports it)."""
        serving = self.batchers.get(name)
        logger.error("load failed; %s", "the old version keeps serving" if serving is not None
                     else "the model stays unavailable",
                     extra={"model": name, "error": str(error)})
        if serving is not None:
            self.last_error[name] = (f"version {serving.model.version} serving; the last "
                                     f"load failed: {error}")
        else:
            self.unavailable[name] = f"load failed: {error}"

    def _config(self) -> list[ModelSpec] | None:
        """The config file's entries as this process serves them; ``None`` without one."""
        if self.settings.config is None:
            return None
        return served_config(self.settings.config, self.settings.workers)

    def _entry(self, name: str) -> ModelSpec:
        specs = self._config()
        if specs is None:  # no file: the entry it was started with
            if name not in self.specs:
                raise ModelNotFound(f"model {name!r} not found; known: "
                                    f"{', '.join(sorted(self.specs))}")
            return self.specs[name]
        for spec in specs:
            if spec.name == name:
                return spec
        raise ModelNotFound(f"model {name!r} is not in {self.settings.config}; it names "
                            f"{', '.join(spec.name for spec in specs)}")

    def _serve(self, model: LoadedModel) -> None:
        """Start ``model``'s batcher and make it the one requests find, in one step of the
        event loop (atomic for every request); the replaced one retires in the background."""
        name = model.name
        batcher = Batcher(model, self.settings, self.metrics)
        batcher.start()
        old = self.batchers.get(name)
        self.batchers[name] = batcher
        self.specs[name] = model.spec
        self.stamps.setdefault(name, checkpoint_stamp(model.spec))
        self.versions[name] = model.version
        self.unavailable.pop(name, None)
        self.last_error.pop(name, None)
        if old is not None:
            self._retire(old)  # which freezes the heap again once the old one is gone
        elif self.ready:
            freeze_long_lived()  # a model loaded while serving: its objects too

    def _unserve(self, name: str, reason: str) -> None:
        old = self.batchers.pop(name, None)
        self.unavailable[name] = reason
        if old is not None:
            self._retire(old)

    def _retire(self, old: Batcher) -> None:
        async def retire(batcher: Batcher) -> None:
            name, version = batcher.model.name, batcher.model.version
            await batcher.retire()
            # This was the last reference to the old table: hand its memory back now
            # rather than at the allocator's leisure.
            del batcher
            freeze_long_lived()  # the old version's cycles are collectable only now
            await asyncio.get_running_loop().run_in_executor(None, release_freed_memory)
            logger.info("old version released", extra={"model": name, "version": version})

        task = asyncio.get_running_loop().create_task(retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
