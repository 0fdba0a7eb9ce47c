"""``POST /v1/embeddings``: OpenAI's embeddings API with token-id input.

The official ``openai`` client asks for ``encoding_format="base64"`` unless told
otherwise and decodes little-endian float32; ``input`` may be a list of token-id lists
(one embedding each) or one list of ids (one embedding). Text needs a tokenizer this
service does not have: it is refused with a message saying so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.errors import InvalidRequest
from service.inference import body_of, embed, require_api_key, service_state
from service.schemas import ERRORS, OpenAIEmbeddingRequest, OpenAIEmbeddingResponse, json_body
from service.wire import (
    base64_rows,
    check_lengths,
    describe,
    int_array,
    json_object_of,
    ragged_ints,
)

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


def _ids(value: Any) -> tuple[Any, Any]:
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(isinstance(v, str) for v in value)):
        raise InvalidRequest("input must be token ids (a list of ints or of int lists); "
                             "this service embeds ids and has no tokenizer for text")
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be a non-empty list of token ids or of token-id "
                             "lists")
    if isinstance(value[0], list):
        return ragged_ints(value, "input")
    ids = int_array(value, "input")
    return ids, np.array([0, ids.shape[0]], dtype=np.int64)


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=ERRORS,
             openapi_extra=json_body(OpenAIEmbeddingRequest),
             summary="OpenAI-compatible embeddings of token-id inputs")
async def embeddings(request: Request) -> Response:
    body = await json_object_of(await body_of(request), service_state(request).settings)
    value = body.get("input")
    nested = isinstance(value, list) and bool(value) and isinstance(value[0], list)
    check_lengths(service_state(request).settings, bags=value if nested else None,
                  ids=None if nested else value)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model must be the name of a served model")
    if "input" not in body:
        raise InvalidRequest("input is required")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        shown = repr(encoding) if isinstance(encoding, str) else describe(encoding)
        raise InvalidRequest(f"encoding_format must be 'float' or 'base64'; got {shown}")
    ids, offsets = _ids(body["input"])
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dim = service_state(request).batcher(name).model.dim
        if dimensions != dim:
            raise InvalidRequest(f"dimensions={dimensions!r} is not supported: model "
                                 f"{name!r} returns {dim}")
    answer = await embed(request, name, ids, offsets, include_last_offset=True)
    rows = answer.rows
    vectors: list[Any] = (base64_rows(rows) if encoding == "base64"
                          else list(np.ascontiguousarray(rows, dtype=np.float32)))
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vector, "index": index}
                 for index, vector in enumerate(vectors)],
        "model": name,
        "usage": {"prompt_tokens": answer.ids, "total_tokens": answer.ids},
    }
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    headers=answer.headers(), media_type="application/json")
