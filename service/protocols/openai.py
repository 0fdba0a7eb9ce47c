"""``POST /v1/embeddings``: OpenAI's embeddings API.

The official ``openai`` client asks for ``encoding_format="base64"`` unless told
otherwise and decodes little-endian float32; ``input`` may be a string or a list of
strings (text models), a list of token-id lists (one embedding each) or one list of ids
(one embedding). ``dimensions`` keeps a text model's first components (re-normalised when
the model normalises); ``usage`` counts the tokens the texts became.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from models.text import StaticModel
from service.errors import InvalidRequest
from service.floatjson import row_values
from service.inference import body_of, embed, embed_texts, require_api_key, service_state
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


def _texts(value: Any) -> list[str] | None:
    """``input`` as texts: a string, or a non-empty list of strings; ``None`` for ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], str):
        if not all(isinstance(v, str) for v in value):
            bad = next(i for i, v in enumerate(value) if not isinstance(v, str))
            raise InvalidRequest(f"input[{bad}] must be a string like the others; got "
                                 f"{describe(value[bad], 40)}")
        return value
    return None


def _ids(value: Any) -> tuple[Any, Any]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be a string, a non-empty list of strings, or a "
                             "non-empty list of token ids or of token-id lists")
    if isinstance(value[0], list):
        return ragged_ints(value, "input")
    ids = int_array(value, "input")
    return ids, np.array([0, ids.shape[0]], dtype=np.int64)


def _shortened(rows: Any, dimensions: int, normalize: bool) -> Any:
    """The first ``dimensions`` components (Matryoshka-style), re-normalised when the
    model normalises its vectors (a zero vector stays zero)."""
    kept = np.ascontiguousarray(rows[:, :dimensions], dtype=np.float32)
    if not normalize:
        return kept
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    return kept / np.where(norms > 0, norms, 1).astype(np.float32)


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=ERRORS,
             openapi_extra=json_body(OpenAIEmbeddingRequest),
             summary="OpenAI-compatible embeddings of texts or token-id inputs")
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
    texts = _texts(body["input"])
    dimensions = body.get("dimensions")
    model = service_state(request).batcher(name).model
    text_model = isinstance(model.bag, StaticModel)
    if dimensions is not None:
        dim = model.dim
        if type(dimensions) is not int or not (
                1 <= dimensions <= dim if text_model else dimensions == dim):
            allowed = f"1 to {dim}" if text_model else str(dim)
            raise InvalidRequest(f"dimensions={describe(dimensions, 20)} is not supported: "
                                 f"model {name!r} returns {dim} (allowed: {allowed})")
    if texts is not None:
        answer = await embed_texts(request, name, texts)
    else:
        ids, offsets = _ids(body["input"])
        answer = await embed(request, name, ids, offsets, include_last_offset=True)
    rows = answer.rows
    if dimensions is not None and dimensions < rows.shape[1]:
        rows = _shortened(rows, dimensions, isinstance(model.bag, StaticModel)
                          and model.bag.normalize)
    vectors: list[Any] = (base64_rows(rows) if encoding == "base64"
                          else row_values(rows))
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vector, "index": index}
                 for index, vector in enumerate(vectors)],
        "model": name,
        "usage": {"prompt_tokens": answer.ids, "total_tokens": answer.ids},
    }
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    headers=answer.headers(), media_type="application/json")
