"""What every protocol does between parsing and shaping the answer."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import Request

from models import InvalidInputError, flatten_inputs
from service.batcher import BatchResult
from service.errors import Forbidden, InvalidRequest, ServiceError, Unauthorized
from service.registry import LoadedModel
from service.state import ServiceState


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def require_api_key(request: Request) -> None:
    """FastAPI dependency: the bearer key, compared in constant time, when one is set."""
    key = service_state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise Forbidden("invalid API key")


@dataclass(frozen=True)
class Answer:
    """A computed request: the model, its rows and the timing facts for headers."""

    model: LoadedModel
    result: BatchResult
    ids: int

    @property
    def rows(self) -> npt.NDArray[np.floating]:
        return self.result.rows

    def timing_headers(self) -> dict[str, str]:
        return {"X-Queue-Ms": f"{self.result.queue_s * 1e3:.3f}",
                "X-Compute-Ms": f"{self.result.compute_s * 1e3:.3f}",
                "X-Batch-Bags": str(self.result.batch_bags)}


@asynccontextmanager
async def _disconnect_watch(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set when the client goes away (read after the body was consumed)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield gone
    finally:
        task.cancel()


async def embed(request: Request, model_name: str, input: Any, offsets: Any = None,
                per_sample_weights: Any = None, *, include_last_offset: bool | None = None
                ) -> Answer:
    """Validate one request against its model and the limits, batch it, wait for its rows.

    Raises:
        ServiceError subclasses: 404 unknown model, 422 invalid input or over a limit,
        429 overloaded, 503 not ready / deadline, 500 if the batch failed.
    """
    started = time.perf_counter()
    state = service_state(request)
    batcher = state.batcher(model_name)
    model = batcher.model
    settings = state.settings
    counter = state.metrics.requests
    try:
        batch = flatten_inputs(
            input, offsets, per_sample_weights, num_embeddings=model.bag.num_embeddings,
            mode=model.bag.mode, dtype=model.bag.weight.dtype,
            include_last_offset=(model.bag.include_last_offset if include_last_offset is None
                                 else include_last_offset))
        lengths = np.diff(batch.offsets)
        for what, value, limit in (
                ("bags", batch.num_bags, settings.max_bags_per_request),
                ("ids", int(batch.indices.shape[0]), settings.max_ids_per_request),
                ("ids in one bag", int(lengths.max(initial=0)), settings.max_bag_length)):
            if value > limit:
                raise InvalidRequest(f"request holds {value} {what}; the limit is {limit}")
    except (InvalidInputError, InvalidRequest) as exc:
        counter.labels(model_name, "invalid").inc()
        raise InvalidRequest(str(exc)) from None
    try:
        async with _disconnect_watch(request) as gone:
            result = await batcher.submit(batch, gone)
    except ServiceError as exc:
        if exc.status == 500:
            counter.labels(model_name, "failed").inc()
        raise
    metrics = state.metrics
    counter.labels(model_name, "ok").inc()
    metrics.queue_seconds.labels(model_name).observe(result.queue_s)
    metrics.request_seconds.labels(model_name).observe(time.perf_counter() - started)
    return Answer(model, result, int(batch.indices.shape[0]))
