"""The running service: settings, loaded models, their batchers, readiness."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.config import ModelSpec
from service.errors import ModelNotFound, NotReady
from service.metrics import Metrics
from service.registry import LoadedModel, load_model
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class ServiceState:
    """Owned by one app (``app.state.service``); touched only on its event loop."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics.create)
    models: dict[str, LoadedModel] = field(default_factory=dict)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False

    async def start(self, specs: list[ModelSpec], preloaded: list[LoadedModel]) -> None:
        """Load (off the loop) what is not preloaded, start one batcher per model."""
        loop = asyncio.get_running_loop()
        loaded = list(preloaded)
        for spec in specs:
            loaded.append(await loop.run_in_executor(None, load_model, spec))
        for model in loaded:
            self.models[model.name] = model
            batcher = Batcher(model, self.settings, self.metrics)
            batcher.start()
            self.batchers[model.name] = batcher
        self.ready = True
        logger.info("ready", extra={"models": sorted(self.models)})

    def begin_drain(self) -> None:
        """Not ready from now on; new inference requests get 503."""
        if not self.draining:
            logger.info("draining: not ready, no new requests admitted")
        self.draining = True
        self.ready = False

    async def stop(self) -> None:
        """Finish every admitted request, then stop the batchers."""
        self.begin_drain()
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        logger.info("stopped")

    def batcher(self, name: str) -> Batcher:
        """The batcher of a ready model.

        Raises:
            NotReady: starting or draining. ModelNotFound: no such model.
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
            raise ModelNotFound(f"model {name!r} not found; available: "
                                f"{', '.join(sorted(self.batchers))}") from None
