"""KServe v2 / Open Inference Protocol, with the binary tensor data extension.

``tritonclient.http`` sends tensors in binary by default and no Content-Type: the body
is read as bytes. With ``Inference-Header-Content-Length: n`` the first ``n`` bytes are
the JSON header and the tensors follow back to back, each input's size in its
``parameters.binary_data_size``. Outputs come back the same way when an output asks for
``binary_data`` or the request sets ``parameters.binary_data_output``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from models.collection import EmbeddingBagCollection
from models.text import StaticModel
from service.errors import InvalidRequest, LoadFailed, ModelNotFound
from service.floatjson import list_value
from service.inference import (
    body_of,
    embed,
    embed_features,
    embed_texts,
    require_api_key,
    service_state,
)
from service.kserve_features import binary_features, collect_features
from service.registry import ModelLoadError
from service.schemas import (
    KSERVE_ERRORS,
    KServeError,
    KServeInferRequest,
    KServeInferResponse,
    json_body,
)
from service.wire import (
    check_structure,
    describe,
    float_array,
    int_array,
    parse_json,
    ragged,
)

router = APIRouter(tags=["kserve-v2"])
protected = APIRouter(tags=["kserve-v2"], dependencies=[Depends(require_api_key)])

_DTYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"),
                                     "FP32": np.dtype("<f4")}
_ALLOWED = {"indices": ("INT64", "INT32"), "offsets": ("INT64", "INT32"),
            "per_sample_weights": ("FP32",)}
#: A collection's inputs: ``<feature>__<part>``.
_PARTS = {"values": ("INT64", "INT32"), "lengths": ("INT64", "INT32"),
          "offsets": ("INT64", "INT32"), "weights": ("FP32",)}
HEADER = "inference-header-content-length"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    from service import __version__

    return _json({"name": "bagserve", "version": __version__,
                  "extensions": ["binary_tensor_data", "model_repository"]})


@router.head("/v2/health/live", include_in_schema=False)
@router.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return _json({"live": True})


@router.head("/v2/health/ready", include_in_schema=False)
@router.get("/v2/health/ready", summary="Readiness: every model loaded and warmed up")
async def ready(request: Request) -> Response:
    is_ready = service_state(request).ready
    return _json({"ready": is_ready}, 200 if is_ready else 503)


def _model(request: Request, name: str, version: str | None) -> Any:
    """The serving model ``name``; a version, when named, must be the one serving (a
    swapped-out version is gone)."""
    state = service_state(request)
    batcher = state.batchers.get(name)
    if batcher is None:
        raise state.missing(name)
    model = batcher.model
    if version not in (None, "", str(model.version)):
        raise ModelNotFound(f"model {name!r} version {version!r} not found; version "
                            f"{model.version} is serving")
    return model


@protected.get("/v2/models/{name}", summary="Model metadata", responses=KSERVE_ERRORS)
@protected.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    model = _model(request, name, version)
    index = "INT64"
    bag = model.bag
    parameters: dict[str, Any] = {"table_dtype": bag.table_dtype,
                                  "table_bytes": model.table_bytes}
    if isinstance(bag, StaticModel):
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        parameters = {"kind": "text", **parameters, "normalize": bag.normalize}
    elif isinstance(bag, EmbeddingBagCollection):
        inputs = []
        for feature, table in zip(bag.keys, bag.spec.feature_tables, strict=True):
            inputs += [{"name": f"{feature}__values", "datatype": index, "shape": [-1]},
                       {"name": f"{feature}__lengths", "datatype": index, "shape": [-1]},
                       {"name": f"{feature}__offsets", "datatype": index, "shape": [-1]}]
            if bag.tables[table].pooling == "sum":
                inputs.append({"name": f"{feature}__weights", "datatype": "FP32",
                               "shape": [-1]})
        parameters = {"kind": "collection", "keys": list(bag.keys), "dims": list(bag.dims),
                      "offset_per_key": bag.offset_per_key, **parameters}
    else:
        inputs = [{"name": "indices", "datatype": index, "shape": [-1]},
                  {"name": "offsets", "datatype": index, "shape": [-1]},
                  {"name": "per_sample_weights", "datatype": "FP32", "shape": [-1]}]
    return _json({
        "name": name, "versions": [str(model.version)], "platform": "bagserve",
        "inputs": inputs,
        "outputs": [{"name": "embeddings", "datatype": "FP32", "shape": [-1, model.dim]}],
        "parameters": parameters})


async def _control_body(request: Request, allowed: frozenset[str]) -> dict[str, Any]:
    """A repository request's optional JSON object; ``parameters`` may only hold
    ``allowed`` keys (configs and files travel through the config file, not requests)."""
    raw = await body_of(request)
    if not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    parameters = body.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters must be an object")
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise InvalidRequest(f"unsupported parameter(s) {', '.join(map(repr, unknown))}: "
                             "models load from the config file and their checkpoints; "
                             "edit those, then load")
    return body


@protected.post("/v2/repository/index", summary="Repository index: every model, its state "
                "and version", responses=KSERVE_ERRORS)
async def repository_index(request: Request) -> Response:
    body = await _control_body(request, frozenset())
    ready = body.get("ready")
    if ready is not None and not isinstance(ready, bool):
        raise InvalidRequest(f"ready must be a boolean; got {describe(ready, 40)}")
    index = service_state(request).index()
    if ready:
        index = [entry for entry in index if entry["state"] == "READY"]
    return _json(index)


@protected.post("/v2/repository/models/{name}/load", responses={
    **KSERVE_ERRORS, 400: {"model": KServeError, "description": "the load failed; what "
                           "served before keeps serving"}},
                summary="Load or reload a model from its config entry and checkpoint; swaps "
                "it in atomically, or keeps the old version serving if loading fails")
async def repository_load(request: Request, name: str) -> Response:
    await _control_body(request, frozenset())
    try:
        model = await service_state(request).load(name)
    except ModelLoadError as exc:
        raise LoadFailed(str(exc)) from None
    headers = {} if model is None else {"X-Model-Version": str(model.version)}
    return Response(b"", headers=headers)


@protected.post("/v2/repository/models/{name}/unload", responses=KSERVE_ERRORS,
                summary="Stop serving a model once its admitted requests are answered")
async def repository_unload(request: Request, name: str) -> Response:
    await _control_body(request, frozenset({"unload_dependents"}))
    await service_state(request).unload(name)
    return Response(b"")


@protected.get("/v2/models/{name}/ready", summary="Model readiness", responses=KSERVE_ERRORS)
@protected.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    _model(request, name, version)
    is_ready = service_state(request).ready
    return _json({"name": name, "ready": is_ready}, 200 if is_ready else 503)


def _split(raw: bytes, request: Request) -> tuple[dict[str, Any], bytes]:
    """(JSON header, binary tail) of an infer request."""
    declared = request.headers.get(HEADER)
    if declared is None:
        check_structure(raw, service_state(request).settings)
        header = parse_json(raw)
        tail = b""
    else:
        # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
        if not (declared.isascii() and declared.isdigit()) or int(declared) > len(raw):
            raise InvalidRequest(f"Inference-Header-Content-Length {declared!r} does not fit "
                                 f"a body of {len(raw)} bytes")
        check_structure(raw[: int(declared)], service_state(request).settings)
        header = parse_json(raw[: int(declared)])
        tail = raw[int(declared):]
    if not isinstance(header, dict):
        raise InvalidRequest("the inference request must be a JSON object")
    return header, tail


#: The largest extent a KServe input's shape may declare. Far past any request limit, yet
#: small enough that no product of two overflows 64 bits or allocates before those limits.
MAX_DIMENSION = 2**31 - 1


def _allowed(name: str, features: tuple[str, ...] | None) -> tuple[str, ...]:
    """The datatypes input ``name`` may have: a table's inputs, or ``features``'
    ``<feature>__values`` / ``__lengths`` / ``__offsets`` / ``__weights``.

    Raises:
        InvalidRequest: an input the model does not take.
    """
    if features is None:
        if name not in _ALLOWED:
            raise InvalidRequest(f"unknown input {name!r}; expected indices, offsets and "
                                 "optionally per_sample_weights")
        return _ALLOWED[name]
    feature, _, part = name.rpartition("__")
    if feature not in features or part not in _PARTS:
        raise InvalidRequest(f"unknown input {name!r}; a collection takes <feature>__values "
                             "with <feature>__lengths or __offsets (optionally __weights) "
                             f"for each of its features: {', '.join(features)}")
    return _PARTS[part]


def _tensor(spec: Any, tail: bytes, position: int, features: tuple[str, ...] | None = None
            ) -> tuple[str, npt.NDArray[Any], int]:
    """Decode one input; returns (name, array shaped as declared, bytes consumed)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest("each input needs a name, shape and datatype")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    allowed = _allowed(name, features)
    if datatype not in allowed:
        raise InvalidRequest(f"input {name!r} must be {' or '.join(allowed)}; got "
                             f"{datatype!r}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(type(d) is int and 0 <= d <= MAX_DIMENSION for d in shape)):
        raise InvalidRequest(f"input {name!r} needs a shape of 1 or 2 ints in [0, "
                             f"{MAX_DIMENSION}]; got {describe(shape, 60)}")
    count = math.prod(shape)  # Python ints: no 64-bit overflow
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    dtype = _DTYPES[datatype]
    used = 0
    if size is not None:
        if type(size) is not int or size < 0 or position + size > len(tail):
            raise InvalidRequest(f"input {name!r}: binary_data_size {size!r} runs past the "
                                 f"{len(tail) - position} binary bytes left")
        if size != count * dtype.itemsize:
            raise InvalidRequest(f"input {name!r}: binary_data_size {size} is not shape "
                                 f"{shape} x {dtype.itemsize} bytes")
        array = np.frombuffer(tail, dtype=dtype, count=count, offset=position)
        used = size
    elif "data" in spec:
        data = spec["data"]
        if isinstance(data, list) and data and isinstance(data[0], list):
            data, _ = ragged(data, f"{name}.data", "number")
        array = (float_array(data, f"{name}.data") if datatype == "FP32"
                 else int_array(data, f"{name}.data"))
        if array.size != count:
            raise InvalidRequest(f"input {name!r} holds {array.size} values for shape {shape}")
    else:
        raise InvalidRequest(f"input {name!r} has neither data nor binary_data_size")
    if datatype == "FP32" and not np.isfinite(array).all():
        raise InvalidRequest(f"input {name!r} holds NaN or infinite values")
    return name, array.reshape(shape), used


def _tensors(inputs: list[Any], tail: bytes, features: tuple[str, ...] | None = None
             ) -> dict[str, npt.NDArray[Any]]:
    """Every input decoded, by name (a collection's when ``features`` are given).

    Raises:
        InvalidRequest: an input twice, or binary bytes left over; as :func:`_tensor`.
    """
    tensors: dict[str, npt.NDArray[Any]] = {}
    position = 0
    for spec in inputs:
        key, array, used = _tensor(spec, tail, position, features)
        if key in tensors:
            raise InvalidRequest(f"input {key!r} given twice")
        tensors[key] = array
        position += used
    if position != len(tail):
        raise InvalidRequest(f"{len(tail) - position} binary bytes follow the declared inputs")
    return tensors


@protected.post("/v2/models/{name}/infer", response_model=KServeInferResponse,
                responses=KSERVE_ERRORS, summary="Infer (JSON or binary tensor extension)",
                openapi_extra=json_body(KServeInferRequest, "application/octet-stream"))
@protected.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    model = _model(request, name, version)
    service_state(request).batcher(name).refuse_if_full()
    raw = await body_of(request)
    header, tail = _split(raw, request)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("inputs must be a non-empty list")
    bag = model.bag
    if isinstance(bag, StaticModel):
        texts = _texts(inputs, tail)
        options = header.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidRequest("parameters must be an object")
        answer = await embed_texts(request, model.name, texts)
        return _respond(header, _wants_binary(header, options), answer.rows, name,
                        str(answer.model.version), answer.headers())
    if isinstance(bag, EmbeddingBagCollection):
        options = header.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidRequest("parameters must be an object")
        binary = _wants_binary(header, options)
        features = (binary_features(inputs, tail, bag.keys)
                    or collect_features(_tensors(inputs, tail, bag.keys), bag.keys))
        answer = await embed_features(request, model.name, features)
        return _respond(header, binary, answer.rows, name, str(answer.model.version),
                        answer.headers())
    tensors = _tensors(inputs, tail)
    if "indices" not in tensors:
        raise InvalidRequest("input 'indices' is required")
    # Bags counted from the shapes before anything is laid out: [10**8, 0] must not
    # build 10**8 empty bags to find out it is over the limit.
    settings = service_state(request).settings
    indices, offsets = tensors["indices"], tensors.get("offsets")
    bags = indices.shape[0] if indices.ndim == 2 else (0 if offsets is None else offsets.size)
    if bags > settings.max_bags_per_request + 1:  # + 1: include_last_offset's last entry
        raise InvalidRequest(f"request holds {bags} bags; the limit is "
                             f"{settings.max_bags_per_request}")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters must be an object")
    last = parameters.get("include_last_offset")
    if last is not None and not isinstance(last, bool):
        raise InvalidRequest(f"parameters.include_last_offset must be a boolean; got {last!r}")
    binary = _wants_binary(header, parameters)
    answer = await embed(request, model.name, tensors["indices"], tensors.get("offsets"),
                         tensors.get("per_sample_weights"), include_last_offset=last)
    return _respond(header, binary, answer.rows, name, str(answer.model.version),
                    answer.headers())


def _texts(inputs: list[Any], tail: bytes) -> list[str]:
    """A text model's one input, ``text``: BYTES ``[B]``, as JSON strings or, in binary,
    each element's 4-byte little-endian length then its UTF-8 bytes."""
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != "text":
        names = [i.get("name") if isinstance(i, dict) else i for i in inputs]
        raise InvalidRequest(f"a text model takes one input, 'text' (BYTES [B]); got "
                             f"{describe(names, 60)}")
    spec = inputs[0]
    if spec.get("datatype") != "BYTES":
        raise InvalidRequest(f"input 'text' must be BYTES; got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    # [B], or Triton's habitual [B, 1].
    if not (isinstance(shape, list) and len(shape) in (1, 2) and all(
            type(d) is int and 0 <= d <= MAX_DIMENSION for d in shape)
            and (len(shape) == 1 or shape[1] == 1)):
        raise InvalidRequest(f"input 'text' needs a shape [B] or [B, 1]; got "
                             f"{describe(shape, 40)}")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        data = spec.get("data")
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise InvalidRequest("input 'text' needs data: a list of strings")
        texts = data
    else:
        if type(size) is not int or size != len(tail):
            raise InvalidRequest(f"input 'text': binary_data_size {size!r} does not match the "
                                 f"{len(tail)} binary bytes sent")
        texts = _bytes_elements(tail)
    if len(texts) != shape[0]:
        raise InvalidRequest(f"input 'text' holds {len(texts)} strings for shape {shape}")
    if not texts:
        raise InvalidRequest("input 'text' holds no strings")
    return texts


def _bytes_elements(data: bytes) -> list[str]:
    """KServe's binary BYTES tensor: elements of a 4-byte little-endian length and that
    many bytes, here UTF-8 text."""
    texts, position = [], 0
    while position < len(data):
        if position + 4 > len(data):
            raise InvalidRequest("input 'text': a BYTES element's 4-byte length is cut off")
        length = int.from_bytes(data[position : position + 4], "little")
        position += 4
        if position + length > len(data):
            raise InvalidRequest("input 'text': a BYTES element runs past the data sent")
        try:
            texts.append(data[position : position + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequest(f"input 'text': element {len(texts)} is not UTF-8") from None
        position += length
    return texts


def _wants_binary(header: dict[str, Any], parameters: dict[str, Any]) -> bool:
    outputs = header.get("outputs")
    if isinstance(outputs, list):
        for output in outputs:
            if not isinstance(output, dict) or output.get("name") != "embeddings":
                raise InvalidRequest(f"unknown output {output!r}; the only output is "
                                     "'embeddings'")
            options = output.get("parameters") or {}
            if isinstance(options, dict) and options.get("binary_data") is not None:
                return bool(options["binary_data"])
    return bool(parameters.get("binary_data_output", False))


def _respond(header: dict[str, Any], binary: bool, rows: npt.NDArray[Any],
             name: str, version: str, headers: dict[str, str]) -> Response:
    data = np.ascontiguousarray(rows, dtype="<f4")
    output: dict[str, Any] = {"name": "embeddings", "datatype": "FP32",
                              "shape": list(data.shape)}
    payload: dict[str, Any] = {"model_name": name, "model_version": version,
                               "outputs": [output]}
    if isinstance(header.get("id"), str):
        payload["id"] = header["id"]
    if binary:
        output["parameters"] = {"binary_data_size": data.nbytes}
        head = orjson.dumps(payload)
        headers = {**headers, "Inference-Header-Content-Length": str(len(head))}
        # One copy of the rows, not two (``head + data.tobytes()``): 0.4 MB for 64
        # samples of a 26-feature collection.
        return Response(b"".join((head, data.data)), headers=headers,
                        media_type="application/octet-stream")
    output["data"] = list_value(data)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers,
                    media_type="application/json")
