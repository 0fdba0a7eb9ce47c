"""What every protocol does between parsing and shaping the answer."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import Request

from models import FlatBatch, InvalidInputError, flatten_inputs
from models.collection import EmbeddingBagCollection, JaggedFeatures
from models.text import StaticModel, TextBatch
from service.batcher import Batcher, BatchResult
from service.errors import Forbidden, InvalidRequest, ServiceError, TextTooLong, Unauthorized
from service.registry import LoadedModel
from service.state import ServiceState
from service.wire import read_body


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: the bearer key, compared in constant time, when one is set.

    ``async`` on purpose: FastAPI runs plain functions in a thread pool, a thread hop per
    request that cost ~10% of the event loop under load."""
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


#: Where a request's scope names the model it was submitted to (see :func:`_submit`).
_MODEL = "bagserve.model"


def count_refused(request: Request, model_name: str | None, exc: Exception) -> None:
    """The one place that counts a request refused for what it sent (413, 422: a body
    past the limits, a float id, an id past the table, a row pooled past float32) as
    ``invalid`` in its model's request metrics, found while parsing or after. The model
    is the one it was submitted to, else ``model_name`` (from the path). Refusals the
    batcher counts itself (429, 503, 499) and failures (500) are not 413/422."""
    status = (exc.status if isinstance(exc, ServiceError)
              else 422 if isinstance(exc, InvalidInputError) else 0)
    name = request.scope.get(_MODEL, model_name)
    if name is None or status not in (413, 422):
        return
    batcher = service_state(request).batchers.get(name)
    if batcher is not None:
        batcher.record("invalid")


async def body_of(request: Request) -> bytes:
    """The request body within the configured size and time limits."""
    settings = service_state(request).settings
    return await read_body(request, settings.max_body_bytes, settings.body_timeout_s)


@dataclass(frozen=True)
class Answer:
    """A computed request: the model, its rows and the timing facts for headers."""

    model: LoadedModel
    result: BatchResult
    ids: int
    #: A collection's ids skipped or hashed by their table's ``oov``, per feature.
    oov: dict[str, int]

    @property
    def rows(self) -> npt.NDArray[np.floating]:
        return self.result.rows

    def headers(self) -> dict[str, str]:
        """The version that answered, where the time went and, for a collection, the ids
        beyond their tables that were skipped or hashed (``X-OOV-Ids: feature=n,...``)."""
        headers = {"X-Model-Version": str(self.model.version),
                   "X-Queue-Ms": f"{self.result.queue_s * 1e3:.3f}",
                   "X-Compute-Ms": f"{self.result.compute_s * 1e3:.3f}",
                   "X-Batch-Bags": str(self.result.batch_bags)}
        if self.oov:
            headers["X-OOV-Ids"] = ",".join(f"{k}={v}" for k, v in self.oov.items())
        return headers


#: Header a client may send to bound its own wait, in milliseconds (capped by the server).
DEADLINE_HEADER = "x-request-timeout-ms"


def _client_deadline(request: Request) -> float | None:
    value = request.headers.get(DEADLINE_HEADER)
    if value is None:
        return None
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = float("nan")
    if not 0 < milliseconds < float("inf"):
        raise InvalidRequest(f"{DEADLINE_HEADER} must be a positive number of "
                             f"milliseconds; got {value!r}")
    return milliseconds / 1e3


#: Lays one request out for its model: ``(batch, oov counts)``.
Build = Callable[[LoadedModel], tuple[FlatBatch | TextBatch, dict[str, int]]]


async def embed(request: Request, model_name: str, input: Any, offsets: Any = None,
                per_sample_weights: Any = None, *, include_last_offset: bool | None = None
                ) -> Answer:
    """Validate one table request against its model and the limits, batch it, wait for
    its rows.

    Raises:
        ServiceError subclasses: 404 unknown model, 422 invalid input, over a limit or a
        collection (which takes features), 429 overloaded, 503 not ready / deadline, 500
        if the batch failed.
    """
    def build(model: LoadedModel) -> tuple[FlatBatch | TextBatch, dict[str, int]]:
        bag = model.bag
        if isinstance(bag, StaticModel):
            # Token ids of the model's vocabulary, pooled as its texts' tokens are.
            return flatten_inputs(
                input, offsets, None, num_embeddings=bag.tokenizer.get_vocab_size(),
                mode="mean", include_last_offset=bool(include_last_offset)), {}
        if isinstance(bag, EmbeddingBagCollection):
            raise InvalidRequest(
                f"model {model.name!r} is a collection of features "
                f"({', '.join(bag.keys)}): POST /v1/models/{model.name}/embed with "
                '{"features": {feature: [[id, ...], ...]}} or a KeyedJaggedTensor as '
                '{"kjt": {"keys", "values", "lengths"}}, or KServe v2 inputs '
                "<feature>__values and <feature>__lengths")
        return flatten_inputs(
            input, offsets, per_sample_weights, num_embeddings=bag.num_embeddings,
            mode=bag.mode, dtype=bag.compute_dtype,
            include_last_offset=(bag.include_last_offset if include_last_offset is None
                                 else include_last_offset)), {}

    return await _submit(request, model_name, build)


async def embed_features(request: Request, model_name: str, features: JaggedFeatures
                         ) -> Answer:
    """As :func:`embed` for a collection's features: one row per sample."""
    def build(model: LoadedModel) -> tuple[FlatBatch | TextBatch, dict[str, int]]:
        bag = model.bag
        if not isinstance(bag, EmbeddingBagCollection):
            raise InvalidRequest(f"model {model.name!r} is a single table, not a collection "
                                 'of features: send {"bags": [[id, ...], ...]} or indices '
                                 "and offsets")
        laid_out = bag.batch(features)
        return laid_out.batch, laid_out.oov

    return await _submit(request, model_name, build)


async def embed_texts(request: Request, model_name: str, texts: list[str]) -> Answer:
    """As :func:`embed` for a text model's texts: one row per text; the texts are
    tokenized with the rest of their batch on the compute thread.

    Raises:
        ServiceError subclasses: as :func:`embed`; 413 a text past ``max_text_chars``,
        422 more texts than ``max_texts_per_request`` or a model without a tokenizer.
    """
    settings = service_state(request).settings

    def build(model: LoadedModel) -> tuple[FlatBatch | TextBatch, dict[str, int]]:
        text_model(model)
        check_text_count(texts, settings)
        return TextBatch(tuple(texts)), {}

    check_text_lengths(texts, settings)
    return await _submit(request, model_name, build)


def text_model(model: LoadedModel) -> StaticModel:
    """The model's text module.

    Raises:
        InvalidRequest: the model has no tokenizer.
    """
    if not isinstance(model.bag, StaticModel):
        raise InvalidRequest(f"model {model.name!r} has no tokenizer: it embeds ids "
                             "(send token-id lists); text needs a text model")
    return model.bag


def check_text_count(texts: list[str], settings: Any) -> None:
    """Raises InvalidRequest (422) for more texts than ``max_texts_per_request``."""
    if len(texts) > settings.max_texts_per_request:
        raise InvalidRequest(f"request holds {len(texts)} texts; the limit is "
                             f"{settings.max_texts_per_request} (max_texts_per_request)")


def check_text_lengths(texts: list[str], settings: Any) -> None:
    """Raises TextTooLong (413) for a text past ``max_text_chars``, named by position."""
    longest = max(map(len, texts), default=0)
    if longest > settings.max_text_chars:
        at = next(i for i, text in enumerate(texts) if len(text) == longest)
        raise TextTooLong(f"text {at} holds {longest} characters; the limit is "
                          f"{settings.max_text_chars} (max_text_chars)")


async def _submit(request: Request, model_name: str, build: Build) -> Answer:
    request.scope[_MODEL] = model_name  # whose metrics count it if it is refused
    state = service_state(request)
    batcher = state.batcher(model_name)
    batcher.hold()  # a swap now lets this request finish on this version
    try:
        return await _embed(request, state, batcher, build)
    finally:
        batcher.release()


async def _embed(request: Request, state: ServiceState, batcher: Batcher, build: Build
                 ) -> Answer:
    started = time.perf_counter()
    model = batcher.model
    settings = state.settings
    try:
        batch, oov = build(model)
        if isinstance(batch, FlatBatch):
            ids = int(batch.indices.shape[0])
            for what, value, limit in (
                    ("bags", batch.num_bags, settings.max_bags_per_request),
                    ("ids", ids, settings.max_ids_per_request),
                    # No bag is longer than the request (the usual case: no pass at all).
                    ("ids in one bag", ids if ids <= settings.max_bag_length
                     else int(np.diff(batch.offsets).max(initial=0)),
                     settings.max_bag_length)):
                if value > limit:
                    raise InvalidRequest(f"request holds {value} {what}; the limit is {limit}")
        deadline = _client_deadline(request)
    except (InvalidInputError, InvalidRequest) as exc:
        raise InvalidRequest(str(exc)) from None  # counted by count_refused
    try:
        result = await batcher.submit(batch, request.receive, deadline)
    except ServiceError as exc:
        if exc.status == 500:
            batcher.record("failed")
        raise
    # Checked as the rows go out, in float32: a float64 table's rows can be finite and
    # still past float32's range (they became null in JSON, infinities in binary).
    wire = result.rows
    if wire.dtype != np.float32:
        with np.errstate(over="ignore"):  # the overflow is what is checked for
            wire = wire.astype(np.float32)
    if not np.isfinite(wire).all():
        finite = np.isfinite(wire).all(axis=1)
        # Finite inputs can still pool past float32 (huge weights, huge rows): JSON would
        # carry null, binary clients an infinity. Name the first such bag instead.
        what = "sample" if batch.bags_per_row > 1 else "bag"
        raise InvalidRequest(f"{what} {int(np.flatnonzero(~finite)[0])} pools to values "
                             "beyond float32's range (+-3.4e38); scale its "
                             "weights or rows down")
    batcher.record("ok", result, time.perf_counter() - started, oov)
    tokens = (result.tokens if isinstance(batch, TextBatch)
              else int(batch.indices.shape[0]))
    return Answer(model, result, tokens, oov)
