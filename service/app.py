"""The FastAPI app factory: wiring only (state, routers, error handlers, lifespan)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service import __version__
from service.batcher import loop_load
from service.config import DEMO, ModelSpec
from service.control import WorkerLink
from service.errors import install_handlers
from service.fastpath import FastPath
from service.protocols import kserve, native, openai, ops
from service.registry import LoadedModel
from service.schemas import components
from service.settings import Settings, usable_cores
from service.state import ServiceState


def create_app(settings: Settings | None = None, specs: list[ModelSpec] | None = None,
               models: list[LoadedModel] | None = None, *, link: WorkerLink | None = None,
               versions: dict[str, int] | None = None, unloaded: frozenset[str] = frozenset()
               ) -> FastAPI:
    """Build the app. Models are ``models`` (already loaded) plus ``specs`` (loaded at
    start-up); with neither, the config file named in settings, else the demo model.

    A worker of several gets its ``link`` to the parent (model control reaches every
    worker), and, when it replaces one, the ``versions`` and ``unloaded`` names so far."""
    settings = settings or Settings()
    if specs is None and models is None:
        from service.config import load_config

        specs = load_config(settings.config) if settings.config else [DEMO]
    state = ServiceState(settings)
    state.versions.update(versions or {})
    state.unavailable.update(dict.fromkeys(unloaded, "unloaded"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The state takes the preloaded models over: no other reference may keep an old
        # version's table alive after a swap (the caller's list held the first one).
        preloaded = list(models or [])
        if models:
            models.clear()
        await state.start(specs or [], preloaded)
        # More workers than cores: a worker polling would hold a core another one needs
        # (4 workers on 2 cores, 16 connections: 6,027-6,852 req/s without, 5,242-6,178 with).
        loop_load().poll_s = (settings.busy_poll_us * 1e-6
                              if settings.workers <= usable_cores() else 0.0)
        del preloaded
        if link is not None:
            link.attach(state)
        reloads = _reload_on_sighup(state)
        try:
            yield
        finally:
            if reloads:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await state.stop()

    # No trailing-slash redirects: Starlette builds their Location from the client's Host
    # header; a path with a stray slash is simply not found.
    app = BagserveApp(title="bagserve", version=__version__, lifespan=lifespan,
                      redirect_slashes=False,
                      description="torch.nn.EmbeddingBag as a service: native, "
                      "OpenAI-compatible and KServe v2 protocols over dynamically batched "
                      "kernels.")
    app.state.service = state
    install_handlers(app)
    for module in (native, openai):
        app.include_router(module.router)
    app.include_router(kserve.router)
    app.include_router(kserve.protected)
    app.include_router(ops.router)
    return app


def _reload_on_sighup(state: ServiceState) -> bool:
    """``SIGHUP`` re-reads the config in a single process (with workers, the parent
    relays it); only possible on the main thread's loop. Returns whether installed."""
    if state.relay is not None or not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()
    reloading: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(state.reload_config())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (RuntimeError, ValueError):  # not the main thread (an in-process test client)
        return False
    return True


class BagserveApp(FastAPI):
    """FastAPI with the inference routes dispatched by :class:`FastPath` before FastAPI's
    middleware stack (its telemetry middleware alone read the environment per request)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fast_path = FastPath(super().__call__, [
            (r"/v1/models/(?P<name>[^/]+)/embed", native.embed_native),
            (r"/v1/embeddings", openai.embeddings),
            (r"/v2/models/(?P<name>[^/]+)/infer", kserve.infer),
            (r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer", kserve.infer),
        ])

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema plus the definitions nested in the hand-parsed request bodies."""
        if self.openapi_schema is None:
            schema = super().openapi()
            stored = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in components().items():
                stored.setdefault(name, definition)
        return super().openapi()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        await self._fast_path(scope, receive, send)
