"""``POST /v1/models/{name}/embed`` and ``GET /v1/models``."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.errors import InvalidRequest
from service.inference import body_of, embed, require_api_key, service_state
from service.schemas import ERRORS, EmbedRequest, EmbedResponse, json_body
from service.wire import (
    base64_rows,
    check_lengths,
    describe,
    float_array,
    int_array,
    json_object_of,
    little_endian_f32,
    ragged_floats,
    ragged_ints,
)

router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)])

_FIELDS = {"bags", "indices", "offsets", "per_sample_weights", "include_last_offset",
           "encoding"}


def _parse(body: dict[str, Any]) -> tuple[Any, Any, Any, bool | None, str]:
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; expected "
                             f"{', '.join(sorted(_FIELDS))}")
    encoding = body.get("encoding", "float")
    if encoding not in ("float", "base64"):
        shown = repr(encoding) if isinstance(encoding, str) else describe(encoding)
        raise InvalidRequest(f"encoding must be 'float' or 'base64'; got {shown}")
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
    body = await json_object_of(await body_of(request), state.settings)
    check_lengths(state.settings, bags=body.get("bags"), ids=body.get("indices"),
                  offsets=body.get("offsets"))
    ids, offsets, weights, last, encoding = _parse(body)
    answer = await embed(request, name, ids, offsets, weights, include_last_offset=last)
    headers = answer.headers()
    rows = answer.rows
    if "application/octet-stream" in request.headers.get("accept", ""):
        headers["X-Embeddings-Shape"] = f"{rows.shape[0]},{rows.shape[1]}"
        headers["X-Embeddings-Dtype"] = "float32"
        return Response(little_endian_f32(rows), headers=headers,
                        media_type="application/octet-stream")
    embeddings: Any = (base64_rows(rows) if encoding == "base64"
                       else np.ascontiguousarray(rows, dtype=np.float32))
    payload = {"model": name, "dim": answer.model.dim, "embeddings": embeddings}
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers,
                    media_type="application/json")


@router.get("/v1/models", summary="List served models")
async def list_models(request: Request) -> Response:
    state = service_state(request)
    data = [model.describe() for model in state.models.values()]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")
