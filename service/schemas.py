"""Request and response bodies for the OpenAPI schema.

Bodies are parsed by :mod:`service.wire` (orjson + NumPy, no per-id validation); these
pydantic models document exactly what those parsers accept and what routes return.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class EmbedRequest(BaseModel):
    """Native request: ``bags`` (one id list per bag) or ``indices`` + ``offsets``."""

    bags: list[list[int]] | None = Field(None, description="one list of ids per bag")
    indices: list[int] | None = Field(None, description="all ids, bag after bag")
    offsets: list[int] | None = Field(None, description="start of each bag in indices "
                                      "(B entries, or B+1 ending at len(indices) with "
                                      "include_last_offset)")
    per_sample_weights: list[list[float]] | list[float] | None = Field(
        None, description="one weight per id, shaped like bags or indices (sum models only)")
    include_last_offset: bool | None = Field(None, description="override the model's "
                                             "offsets convention")
    encoding: Literal["float", "base64"] = Field("float", description="base64: each row as "
                                                 "little-endian float32 bytes")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] | list[str]


class OpenAIEmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] | list[list[int]] | list[int] = Field(
        ..., description="a text or texts (text models), token-id lists (one per input) or "
        "one list of ids")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="text models: keep the first n "
                                   "components (re-normalised when the model normalises); "
                                   "other models: must equal their dim")
    user: str | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class KServeTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class KServeOutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class KServeInferRequest(BaseModel):
    """Inputs ``indices`` (INT64/INT32, ``[N]`` or ``[B, L]``), ``offsets`` (``[B]`` or
    ``[B+1]`` with ``parameters.include_last_offset``), optional ``per_sample_weights``
    (FP32). With the binary extension the JSON header is followed by the raw tensors."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[KServeTensor]
    outputs: list[KServeOutputRequest] | None = None


class KServeInferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[KServeTensor]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class KServeError(BaseModel):
    error: str


#: Request models documented through ``openapi_extra``: FastAPI does not see them, so
#: their nested definitions are added to the schema's components by :func:`components`.
_REQUEST_MODELS: list[type[BaseModel]] = []
_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel], *extra_types: str) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route parses itself."""
    _REQUEST_MODELS.append(model)
    schema = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    content = {"application/json": {"schema": schema}}
    for media_type in extra_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def components() -> dict[str, Any]:
    """The nested definitions of every request model, for ``components.schemas``."""
    definitions: dict[str, Any] = {}
    for model in _REQUEST_MODELS:
        definitions.update(model.model_json_schema(ref_template=_REF).get("$defs", {}))
    return definitions


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (401, "missing API key"), (403, "invalid API key"), (404, "unknown model"),
        (413, "body too large"), (422, "invalid input"), (429, "overloaded"),
        (503, "not ready, draining or past the deadline"))}
KSERVE_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": KServeError, "description": value["description"]}
    for code, value in ERRORS.items()}
