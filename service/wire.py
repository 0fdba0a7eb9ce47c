"""Wire formats: read bodies within limits, turn JSON id lists into arrays, encode rows.

Ids never go through per-element pydantic validation: ``orjson`` parses the body, one
``set(map(type, ...))`` pass proves every id is a plain integer (JSON ``true`` would
otherwise become 1), and NumPy converts the list in C. pydantic models in
:mod:`service.schemas` document the same bodies in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import base64
from array import array as std_array
from collections.abc import Callable
from itertools import chain
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from starlette.requests import ClientDisconnect, Request

from service.errors import BodyTooLarge, ClientDisconnected, InvalidRequest, RequestTimeout

T = TypeVar("T")


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it
    all when Content-Length says so, and while streaming when it lies or is absent; and
    (408) a body still incomplete after ``timeout`` seconds, so a slow client cannot keep
    a request open forever. A timer, not ``asyncio.wait_for``: no task per request."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        if task is not None:
            task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    chunks = []
    size = 0
    receive = request.receive
    try:
        # ASGI's receive directly: Starlette's stream() generator cost more than the read.
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except ClientDisconnect:
        # The client went away mid-body: nothing to answer, nothing to log as a fault.
        raise ClientDisconnected("client closed the connection while sending the "
                                 "body") from None
    except asyncio.CancelledError:
        if not expired:
            raise
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Parse a JSON body; raises InvalidRequest naming the parse error."""
    if not body:
        raise InvalidRequest("request body is empty; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def json_object(body: bytes) -> dict[str, Any]:
    value = parse_json(body)
    if not isinstance(value, dict):
        raise InvalidRequest(f"request body must be a JSON object; got {type(value).__name__}")
    return value


#: Bodies at least this large are parsed on a worker thread, not the event loop: a 9 MB
#: body takes tens of milliseconds to parse, which every other client would wait out.
OFF_LOOP_BYTES = 256 << 10


async def parse_off_loop(body: bytes, limits: Any, parse: Callable[[bytes], T]) -> T:
    """``parse(body)``: on the event loop below :data:`OFF_LOOP_BYTES`, else after
    :func:`check_structure` on a worker thread."""
    if len(body) < OFF_LOOP_BYTES:
        return parse(body)
    check_structure(body, limits)
    return await asyncio.get_running_loop().run_in_executor(None, parse, body)


async def json_object_of(body: bytes, limits: Any) -> dict[str, Any]:
    """:func:`json_object`, for bodies past :data:`OFF_LOOP_BYTES` after
    :func:`check_structure` and on a worker thread."""
    return await parse_off_loop(body, limits, json_object)


def check_structure(body: bytes, limits: Any) -> None:
    """Refuse a JSON body that cannot fit the request limits, from a count of its brackets
    and commas (milliseconds), before it is parsed (seconds: 3,000,000 empty bags take
    1.2 s to parse here). A valid request holds at most two lists a bag (ids and weights)
    plus a few, and at most two values an id plus a few separators; brackets or commas
    inside strings only make the count larger, never let a body through."""
    lists = body.count(b"[")
    values = body.count(b",")
    most_lists = 2 * limits.max_bags_per_request + 64
    most_values = 2 * limits.max_ids_per_request + 2 * limits.max_bags_per_request + 64
    if lists > most_lists or values > most_values:
        raise InvalidRequest(f"request body holds {lists} lists and {values} separators: "
                             f"more than max_bags_per_request={limits.max_bags_per_request} "
                             f"and max_ids_per_request={limits.max_ids_per_request} allow")


def check_lengths(limits: Any, *, bags: Any = None, ids: Any = None,
                  offsets: Any = None) -> None:
    """Refuse lists longer than the request limits before converting them: a body of
    3,000,000 empty bags is over the bag limit whatever they hold. ``limits`` is the
    service's settings; ``bags``, ``ids`` and ``offsets`` the raw JSON values or arrays
    read from them (anything else is left to the parsers; offsets may hold one entry more
    than the bags)."""
    most_bags = limits.max_bags_per_request
    for value, allowed, what, limit in (
            (bags, most_bags, "bags", str(most_bags)),
            (ids, limits.max_ids_per_request, "ids", str(limits.max_ids_per_request)),
            (offsets, most_bags + 1, "offsets", f"{most_bags} bags")):
        if isinstance(value, list | np.ndarray) and len(value) > allowed:
            raise InvalidRequest(f"request holds {len(value)} {what}; the limit is {limit}")


def describe(value: Any, width: int = 40) -> str:
    """A client's value, shortened for an error message; never raises (a value nested past
    orjson's or repr's recursion limit is named, not shown), as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    try:
        text = orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, RecursionError, TypeError):
        text = f"a {type(value).__name__} nested too deep to show"
    return text if len(text) <= width else text[: width - 3] + "..."





def _first_bad(values: list[Any], allowed: tuple[type, ...]) -> int:
    return next(i for i, v in enumerate(values) if type(v) not in allowed)


def not_an_integer(where: str, value: Any) -> InvalidRequest:
    """The refusal of a JSON value that should be an int64 integer. JSON integers past 64
    bits reach us as floats (orjson's reading), so a huge one is named as out of range,
    not as a float the client never sent."""
    if type(value) is float and abs(value) >= 2.0**63:
        return InvalidRequest(f"{where} is outside int64; got {describe(value)}")
    return InvalidRequest(f"{where} must be an integer; got {describe(value)}")


def int_array(values: Any, field: str) -> npt.NDArray[np.int64]:
    """A flat JSON list of integers as int64; raises InvalidRequest naming the field.

    One C loop converts and type-checks at once (``array.array('q')`` refuses floats,
    strings and None, and integers past int64): half the time of checking every element's
    type first and converting after. Only JSON's ``true``/``false`` pass it (Python's bool
    is an int), and they can only have become 0 or 1: those few elements are looked at.
    """
    if not isinstance(values, list):
        raise InvalidRequest(f"{field} must be a list of integers; got {describe(values)}")
    try:
        array = np.frombuffer(std_array("q", values), dtype=np.int64)
    except TypeError:
        bad = _first_bad(values, (int,))
        raise not_an_integer(f"{field}[{bad}]", values[bad]) from None
    except OverflowError:
        raise InvalidRequest(f"{field} holds an integer outside int64") from None
    candidates = np.flatnonzero(np.abs(array) <= 1)  # bools became 0 or 1
    if candidates.size:
        # Their types gathered in C: skewed ids are often 0 or 1, and a Python loop over
        # them cost more than the conversion itself.
        picked = itemgetter(*candidates.tolist())(values)
        if (type(picked) is not int if candidates.size == 1
                else bool(set(map(type, picked)) - {int})):
            bad = int(candidates[_first_bad([values[i] for i in candidates.tolist()], (int,))])
            raise not_an_integer(f"{field}[{bad}]", values[bad])
    return array


def float_array(values: Any, field: str) -> npt.NDArray[np.float32]:
    """A flat JSON list of finite numbers as float32; raises InvalidRequest."""
    if not isinstance(values, list):
        raise InvalidRequest(f"{field} must be a list of numbers; got {describe(values)}")
    if set(map(type, values)) - {int, float}:
        bad = _first_bad(values, (int, float))
        raise InvalidRequest(f"{field}[{bad}] must be a number; got {describe(values[bad])}")
    array = np.array(values, dtype=np.float64)
    finite = np.abs(array) <= np.finfo(np.float32).max  # False for NaN, inf and overflow
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidRequest(f"{field}[{bad}] = {values[bad]!r} is not a finite float32")
    return array.astype(np.float32)


def ragged(values: Any, field: str, element: str = "integer"
           ) -> tuple[list[Any], npt.NDArray[np.int64]]:
    """Flatten a JSON list of lists; returns (flat values, ``[B + 1]`` offsets)."""
    if not isinstance(values, list):
        raise InvalidRequest(f"{field} must be a list of lists; got {describe(values)}")
    if set(map(type, values)) - {list}:
        bad = _first_bad(values, (list,))
        raise InvalidRequest(f"{field}[{bad}] must be a list of {element}s; got "
                             f"{describe(values[bad])}")
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)),
              out=offsets[1:])
    return list(chain.from_iterable(values)), offsets


def base64_rows(rows: npt.NDArray[np.floating]) -> list[str]:
    """Each row as the base64 of its little-endian float32 bytes."""
    data = np.ascontiguousarray(rows, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


def little_endian_f32(rows: npt.NDArray[np.floating]) -> bytes:
    return np.ascontiguousarray(rows, dtype="<f4").tobytes()


def _ragged_position(offsets: npt.NDArray[np.int64], flat_index: int) -> tuple[int, int]:
    bag = int(np.searchsorted(offsets, flat_index, side="right")) - 1
    return bag, flat_index - int(offsets[bag])


def ragged_ints(values: Any, field: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A JSON list of integer lists as (int64 ids ``[N]``, offsets ``[B + 1]``)."""
    flat, offsets = ragged(values, field)
    try:
        return int_array(flat, field), offsets
    except InvalidRequest:
        if set(map(type, flat)) - {int}:
            bag, item = _ragged_position(offsets, _first_bad(flat, (int,)))
            raise not_an_integer(f"{field}[{bag}][{item}]", values[bag][item]) from None
        raise


def ragged_floats(values: Any, field: str, offsets: npt.NDArray[np.int64]
                  ) -> npt.NDArray[np.float32]:
    """Per-id floats shaped like the bags (same lengths as ``offsets``) as float32 ``[N]``."""
    flat, own = ragged(values, field, "number")
    if own.shape != offsets.shape:
        raise InvalidRequest(f"{field} has {own.size - 1} lists for {offsets.size - 1} bags")
    if not np.array_equal(own, offsets):
        bag = int(np.flatnonzero(np.diff(own) != np.diff(offsets))[0])
        raise InvalidRequest(f"{field}[{bag}] has {int(own[bag + 1] - own[bag])} weights for "
                             f"{int(offsets[bag + 1] - offsets[bag])} ids")
    return float_array(flat, field)
