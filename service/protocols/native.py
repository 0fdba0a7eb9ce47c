"""``POST /v1/models/{name}/embed`` and ``GET /v1/models``."""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from models.collection import JaggedFeatures, jagged, same_samples
from service.errors import InvalidRequest
from service.floatjson import rows_value
from service.inference import (
    Answer,
    body_of,
    check_text_count,
    check_text_lengths,
    embed,
    embed_features,
    embed_texts,
    require_api_key,
    service_state,
    text_model,
)
from service.jsonbags import KjtBody, parse_bags, parse_kjt
from service.schemas import ERRORS, EmbedRequest, EmbedResponse, json_body
from service.wire import (
    base64_rows,
    check_lengths,
    describe,
    float_array,
    int_array,
    json_object,
    json_object_of,
    little_endian_f32,
    parse_off_loop,
    ragged_floats,
    ragged_ints,
)

router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)])

_FIELDS = {"bags", "indices", "offsets", "per_sample_weights", "include_last_offset",
           "encoding"}
#: A collection's request: keyed bags (``features`` + ``weights``) or ``kjt``.
_COLLECTION_FIELDS = {"features", "weights", "kjt", "encoding"}
_KJT_FIELDS = {"keys", "values", "lengths", "offsets", "weights"}


def _encoding(body: dict[str, Any]) -> str:
    encoding = body.get("encoding", "float")
    if encoding not in ("float", "base64"):
        shown = repr(encoding) if isinstance(encoding, str) else describe(encoding)
        raise InvalidRequest(f"encoding must be 'float' or 'base64'; got {shown}")
    return str(encoding)


def _features(body: dict[str, Any], limits: Any) -> JaggedFeatures:
    """A collection request's features, keyed or KJT (see DESIGN.md, Collections)."""
    unknown = sorted(set(body) - _COLLECTION_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} in a collection request; "
                             f"expected {', '.join(sorted(_COLLECTION_FIELDS))}")
    if "kjt" in body:
        if "features" in body or "weights" in body:
            raise InvalidRequest("send either kjt or features (+ weights), not both")
        kjt = body["kjt"]
        if not isinstance(kjt, dict):
            raise InvalidRequest("kjt must be an object with keys, values and lengths (or "
                                 "offsets), optionally weights")
        unknown = sorted(set(kjt) - _KJT_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} in kjt; expected "
                                 f"{', '.join(sorted(_KJT_FIELDS))}")
        return _kjt(kjt.get("keys"), kjt.get("values"), kjt.get("lengths"),
                    kjt.get("offsets"), kjt.get("weights"), limits)
    features, weights = body.get("features"), body.get("weights")
    if not isinstance(features, dict) or not features:
        raise InvalidRequest('features must be an object mapping each feature name to its '
                             'bags, {"feature": [[id, ...], ...]}')
    if weights is not None and not isinstance(weights, dict):
        raise InvalidRequest("weights must be an object mapping feature names to weight "
                             "lists shaped like their bags")
    keys = tuple(features)
    columns = list(features.values())
    for key, value in zip(keys, columns, strict=True):
        if not isinstance(value, list) or set(map(type, value)) - {list}:
            ragged_ints(value, f"features.{key}")  # names the bad entry
    counts = np.fromiter(map(len, chain.from_iterable(columns)), dtype=np.int64,
                         count=sum(map(len, columns)))
    if counts.shape[0] > limits.max_bags_per_request:
        raise InvalidRequest(f"request holds {counts.shape[0]} bags; the limit is "
                             f"{limits.max_bags_per_request} (it counts every feature's bags)")
    check_lengths(limits, ids=range(int(counts.sum())))
    # Every feature's ids in one conversion: the per-call costs of 26 features' worth of
    # conversions were half of parsing a 64-sample request.
    try:
        ids = int_array(list(chain.from_iterable(chain.from_iterable(columns))), "features")
    except InvalidRequest:
        for key, value in zip(keys, columns, strict=True):
            ragged_ints(value, f"features.{key}")  # names feature, bag and item
        raise
    per_feature = [len(column) for column in columns]
    same_samples(keys, per_feature)
    samples = per_feature[0]
    lengths = counts.reshape(len(keys), samples)
    ends = np.cumsum(lengths.sum(axis=1))
    floats = {}
    for key, value in (weights or {}).items():
        if key in features:
            f = keys.index(key)
            starts = np.zeros(samples + 1, dtype=np.int64)
            np.cumsum(lengths[f], out=starts[1:])
            floats[key] = ragged_floats(value, f"weights.{key}", starts)
    weighted = None
    if floats:
        weighted = np.ones(ids.shape[0], np.float32)
        for key, value in floats.items():
            f = keys.index(key)
            weighted[int(ends[f]) - value.shape[0] : int(ends[f])] = value
    unknown = sorted(set(weights or {}) - set(features))
    if unknown:
        raise InvalidRequest(f"weights name feature(s) {', '.join(map(repr, unknown))} that "
                             "are not in features")
    return JaggedFeatures(keys, ids, lengths, weighted,
                          tuple(key in floats for key in keys) if floats else None)


def _respond(request: Request, answer: Answer, encoding: str, payload: dict[str, Any]
             ) -> Response:
    """Rows as JSON floats, base64 rows, or raw bytes (``Accept: application/octet-stream``)."""
    headers = answer.headers()
    rows = answer.rows
    if "application/octet-stream" in request.headers.get("accept", ""):
        headers["X-Embeddings-Shape"] = f"{rows.shape[0]},{rows.shape[1]}"
        headers["X-Embeddings-Dtype"] = "float32"
        return Response(little_endian_f32(rows), headers=headers,
                        media_type="application/octet-stream")
    payload["embeddings"] = (base64_rows(rows) if encoding == "base64"
                             else rows_value(rows))
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers,
                    media_type="application/json")


def _parse(body: dict[str, Any]) -> tuple[Any, Any, Any, bool | None, str]:
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; expected "
                             f"{', '.join(sorted(_FIELDS))}")
    encoding = _encoding(body)
    last = body.get("include_last_offset")
    if last is not None and not isinstance(last, bool):
        raise InvalidRequest(f"include_last_offset must be a boolean; got {last!r}")
    weights = body.get("per_sample_weights")
    if "bags" in body:
        if "indices" in body or "offsets" in body:
            raise InvalidRequest("send either bags or indices + offsets, not both")
        ids, offsets = ragged_ints(body["bags"], "bags")
        if weights is not None:
            weights = ragged_floats(weights, "per_sample_weights", offsets)
        return ids, offsets, weights, True, encoding
    if "indices" not in body:
        raise InvalidRequest("the body needs bags (a list of id lists) or indices + offsets")
    if "offsets" not in body:
        raise InvalidRequest("indices needs offsets (the start of each bag)")
    ids = int_array(body["indices"], "indices")
    offsets = int_array(body["offsets"], "offsets")
    if weights is not None:
        weights = float_array(weights, "per_sample_weights")
    return ids, offsets, weights, last, encoding


@router.post("/v1/models/{name}/embed", response_model=EmbedResponse, responses={
    **ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "rows; raw "
                    "little-endian float32 bytes with Accept: application/octet-stream"}},
    openapi_extra=json_body(EmbedRequest), summary="Pool bags of ids into embeddings")
async def embed_native(name: str, request: Request) -> Response:
    state = service_state(request)
    state.batcher(name).refuse_if_full()
    body = await parse_off_loop(await body_of(request), state.settings, _bags_or_object)
    if isinstance(body, tuple):  # {"bags": [[id, ...], ...]}, read in one compiled pass
        answer = await embed(request, name, body[0], body[1], include_last_offset=True)
        return _respond(request, answer, "float", {"model": name, "dim": answer.model.dim})
    if isinstance(body, KjtBody):  # {"kjt": {...}}, read in one compiled pass
        encoding = _encoding({} if body.encoding is None else {"encoding": body.encoding})
        features = _kjt(body.keys, body.values, body.lengths, None, None, state.settings)
        return await _features_answer(request, name, features, encoding)
    if "texts" in body:
        unknown = sorted(set(body) - {"texts", "encoding"})
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} in a text request; "
                                 "expected texts and encoding")
        encoding = _encoding(body)
        answer = await embed_texts(request, name, _text_list(body["texts"]))
        return _respond(request, answer, encoding, {"model": name, "dim": answer.model.dim})
    if "features" in body or "kjt" in body:
        encoding = _encoding(body)
        return await _features_answer(request, name, _features(body, state.settings),
                                      encoding)
    check_lengths(state.settings, bags=body.get("bags"), ids=body.get("indices"),
                  offsets=body.get("offsets"))
    ids, offsets, weights, last, encoding = _parse(body)
    answer = await embed(request, name, ids, offsets, weights, include_last_offset=last)
    return _respond(request, answer, encoding, {"model": name, "dim": answer.model.dim})


async def _features_answer(request: Request, name: str, features: JaggedFeatures,
                           encoding: str) -> Response:
    answer = await embed_features(request, name, features)
    bag: Any = answer.model.bag
    return _respond(request, answer, encoding, {
        "model": name, "keys": list(bag.keys), "dims": list(bag.dims),
        "offset_per_key": bag.offset_per_key})


def _bags_or_object(raw: bytes) -> (tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
                                    | KjtBody | dict[str, Any]):
    """A native body: ``(ids, offsets)`` when it is ``{"bags": ...}`` alone, a
    :class:`KjtBody` when it is a plain KJT (each one compiled pass), else the JSON object
    (orjson; raises InvalidRequest)."""
    bags = parse_bags(raw)
    if bags is not None:
        return bags
    kjt = parse_kjt(raw)
    return json_object(raw) if kjt is None else kjt


def _kjt(keys: Any, values: Any, lengths: Any, offsets: Any, weights: Any, limits: Any
         ) -> JaggedFeatures:
    """A KJT's fields as JSON lists, or int64 arrays from :func:`parse_kjt`; the request
    limits checked before anything is converted."""
    check_lengths(limits, ids=values, bags=None)
    for field, value in (("lengths", lengths), ("offsets", offsets)):
        if isinstance(value, list | np.ndarray) and len(value) > limits.max_bags_per_request + 1:
            raise InvalidRequest(f"request holds {len(value)} {field}; the limit is "
                                 f"{limits.max_bags_per_request} bags")
    if values is None:
        raise InvalidRequest("kjt needs values: every feature's ids, feature major")

    def ints(value: Any, field: str) -> Any:
        return value if isinstance(value, np.ndarray) else int_array(value, field)

    return jagged(keys, ints(values, "kjt.values"),
                  None if lengths is None else ints(lengths, "kjt.lengths"),
                  None if offsets is None else ints(offsets, "kjt.offsets"),
                  None if weights is None else float_array(weights, "kjt.weights"))


def _text_list(value: Any) -> list[str]:
    """``texts``: a non-empty list of strings."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"texts must be a non-empty list of strings; got "
                             f"{describe(value, 40)}")
    for position, text in enumerate(value):
        if not isinstance(text, str):
            raise InvalidRequest(f"texts[{position}] must be a string; got "
                                 f"{describe(text, 40)}")
    return value


@router.post("/v1/models/{name}/tokenize", responses=ERRORS,
             summary="The token ids a text model makes of each text (after its cuts, "
             "without the unknown token, before its mapping)")
async def tokenize(name: str, request: Request) -> Response:
    state = service_state(request)
    body = await json_object_of(await body_of(request), state.settings)
    unknown = sorted(set(body) - {"texts"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; expected texts")
    texts = _text_list(body.get("texts"))
    model = state.batcher(name).model
    bag = text_model(model)
    check_text_count(texts, state.settings)
    check_text_lengths(texts, state.settings)
    # Off the event loop: a thousand texts take milliseconds to tokenize.
    ids = await asyncio.get_running_loop().run_in_executor(None, bag.tokenize, texts)
    return Response(orjson.dumps({"model": name, "ids": ids}), media_type="application/json",
                    headers={"X-Model-Version": str(model.version)})


@router.get("/v1/models/{name}", summary="One served model (OpenAI's models.retrieve)",
            responses=ERRORS)
async def get_model(name: str, request: Request) -> Response:
    model = service_state(request).batcher(name).model
    return Response(orjson.dumps(model.describe()), media_type="application/json")


@router.get("/v1/models", summary="List served models")
async def list_models(request: Request) -> Response:
    state = service_state(request)
    data = [model.describe() for model in state.models.values()]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")
