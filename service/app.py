"""The FastAPI app factory: wiring only (state, routers, error handlers, lifespan)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.config import DEMO, ModelSpec
from service.errors import install_handlers
from service.protocols import kserve, native, openai, ops
from service.registry import LoadedModel
from service.settings import Settings
from service.state import ServiceState


def create_app(settings: Settings | None = None, specs: list[ModelSpec] | None = None,
               models: list[LoadedModel] | None = None) -> FastAPI:
    """Build the app. Models are ``models`` (already loaded) plus ``specs`` (loaded at
    start-up); with neither, the config file named in settings, else the demo model."""
    settings = settings or Settings()
    if specs is None and models is None:
        from service.config import load_config

        specs = load_config(settings.config) if settings.config else [DEMO]
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start(specs or [], models or [])
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="bagserve", version=__version__, lifespan=lifespan,
                  description="torch.nn.EmbeddingBag as a service: native, OpenAI-compatible "
                  "and KServe v2 protocols over dynamically batched kernels.")
    app.state.service = state
    install_handlers(app)
    for module in (native, openai):
        app.include_router(module.router)
    app.include_router(kserve.router)
    app.include_router(kserve.protected)
    app.include_router(ops.router)
    return app
