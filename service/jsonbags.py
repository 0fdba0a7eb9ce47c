"""The common native bodies read straight into arrays: ``{"bags": [[id, ...], ...]}`` and
a plain KeyedJaggedTensor, ``{"kjt": {"keys": [...], "values": [...], "lengths":
[...]}}`` (with or without ``"encoding"``).

orjson builds a Python int per id and the lists are then flattened and converted: for 64
bags of 32 ids that cost the event loop ~110 us of a ~700 us request, for a 64-sample
KJT of 26 features (10,018 ids) ~680 us. These compiled passes read the bytes into int64
arrays (~26 us and ~140 us), releasing the GIL.

They accept only what they can prove the general path would accept with the same result:
the members above (spelt without escapes, each once), lists of JSON integers
(``-?(0|[1-9][0-9]*)``, at most 18 digits), keys and encoding as strings without escapes
or control characters, JSON whitespace. Anything else (a float, ``true``, another or a
duplicate member, offsets or weights, an exponent, a huge integer, trailing bytes, a BOM)
returns ``None`` and the caller parses the body with orjson, which words the error or
accepts the rarer forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.jit import AVAILABLE, compiled, inlined

#: Bodies past this size size their arrays by counting separators first.
_COUNT_PAST = 64 << 10
_BAGS, _KJT, _KEYS, _VALUES, _LENGTHS, _ENCODING = (
    np.frombuffer(name, dtype=np.uint8)
    for name in (b'"bags"', b'"kjt"', b'"keys"', b'"values"', b'"lengths"', b'"encoding"'))


@inlined
def _skip(body: Any, at: int) -> int:
    """Past any JSON whitespace at ``at``."""
    n = body.shape[0]
    # The usual case first: no whitespace at all (compact JSON).
    if at >= n or (body[at] != 32 and body[at] != 10 and body[at] != 13 and body[at] != 9):
        return at
    while at < n and (body[at] == 32 or body[at] == 10 or body[at] == 13 or body[at] == 9):
        at += 1
    return at


@inlined
def _after_item(body: Any, at: int, closing: int) -> tuple[int, int]:
    """After a list's element or an object's member: past a comma (and whitespace)
    ``(at, 0)``, past the ``closing`` bracket or brace ``(at, 1)``, anything else
    ``(-1, -1)``."""
    at = _skip(body, at)
    if at < body.shape[0]:
        if body[at] == 44:  # ,
            return _skip(body, at + 1), 0
        if body[at] == closing:
            return at + 1, 1
    return -1, -1


@inlined
def _integers(body: Any, at: int, out: Any, count: int) -> tuple[int, int]:
    """The JSON list of integers at ``at`` appended to ``out`` from ``count``: (past its
    ``]``, the new count), or (-1, 0) when it is not one (a float, a string, ``true``, an
    exponent, more than 18 digits, a leading zero)."""
    n = body.shape[0]
    if at >= n or body[at] != 91:  # [
        return -1, 0
    at = _skip(body, at + 1)
    if at < n and body[at] == 93:  # ]
        return at + 1, count
    while True:
        negative = False
        if at < n and body[at] == 45:  # -
            negative = True
            at += 1
        start = at
        value = 0
        while at < n:
            c = body[at]
            if c < 48 or c > 57:
                break
            value = value * 10 + (c - 48)
            at += 1
        digits = at - start
        if digits == 0 or digits > 18 or (digits > 1 and body[start] == 48):
            return -1, 0
        out[count] = -value if negative else value
        count += 1
        # A float's "." or exponent fails here too: only whitespace, "," or "]" follow.
        # (Spelt out, not _after_item: 10% of the pass.)
        at = _skip(body, at)
        if at >= n:
            return -1, 0
        if body[at] == 93:  # ]
            return at + 1, count
        if body[at] != 44:  # ,
            return -1, 0
        at = _skip(body, at + 1)


@inlined
def _name(body: Any, at: int, name: Any) -> int:
    """Past ``name`` (its bytes, quotes included) at ``at``, or -1."""
    if at < 0 or at + name.shape[0] > body.shape[0]:
        return -1
    for i in range(name.shape[0]):
        if body[at + i] != name[i]:
            return -1
    return at + int(name.shape[0])


@inlined
def _colon(body: Any, at: int) -> int:
    """Past ``:`` and the whitespace around it, or -1."""
    at = _skip(body, at)
    if at >= body.shape[0] or body[at] != 58:  # :
        return -1
    return _skip(body, at + 1)


@inlined
def _end(body: Any, at: int) -> bool:
    """Whether an object closes at ``at`` (after whitespace) and only whitespace follows."""
    at = _skip(body, at)
    return bool(at < body.shape[0] and body[at] == 125  # }
                and _skip(body, at + 1) == body.shape[0])


@compiled
def _parse(body: Any, ids: Any, offsets: Any) -> tuple[int, int]:
    """(bags, ids) read, or (-1, 0) when the body is not in the fast form."""
    n = body.shape[0]
    at = _skip(body, 0)
    if at >= n or body[at] != 123:  # {
        return -1, 0
    at = _name(body, _skip(body, at + 1), _BAGS)
    if at < 0:
        return -1, 0
    at = _colon(body, at)
    if at < 0 or at >= n or body[at] != 91:  # [
        return -1, 0
    at = _skip(body, at + 1)
    bags = 0
    count = 0
    offsets[0] = 0
    if at < n and body[at] == 93:  # ] : no bags
        at += 1
    else:
        while True:
            at, count = _integers(body, at, ids, count)
            if at < 0:
                return -1, 0
            bags += 1
            offsets[bags] = count
            at, closed = _after_item(body, at, 93)  # ]
            if closed < 0:
                return -1, 0
            if closed:
                break
    if not _end(body, at):
        return -1, 0
    return bags, count


@inlined
def _string(body: Any, at: int) -> int:
    """Past the JSON string at ``at`` when it holds no escape and no control character
    (any other string is the general path's), else -1."""
    n = body.shape[0]
    if at >= n or body[at] != 34:  # "
        return -1
    at += 1
    while at < n:
        c = body[at]
        if c == 34:
            return at + 1
        if c == 92 or c < 32:  # a backslash or a control character
            return -1
        at += 1
    return -1


@inlined
def _strings(body: Any, at: int, spans: Any) -> tuple[int, int]:
    """The JSON list of plain strings at ``at``, each one's byte span (without quotes)
    written to ``spans``: (past its ``]``, how many), or (-1, 0)."""
    n = body.shape[0]
    if at >= n or body[at] != 91:  # [
        return -1, 0
    at = _skip(body, at + 1)
    if at < n and body[at] == 93:  # ]
        return at + 1, 0
    count = 0
    while True:
        end = _string(body, at)
        if end < 0:
            return -1, 0
        spans[2 * count] = at + 1
        spans[2 * count + 1] = end - 1
        count += 1
        at, closed = _after_item(body, end, 93)  # ]
        if closed < 0:
            return -1, 0
        if closed:
            return at, count


@inlined
def _kjt_object(body: Any, at: int, values: Any, lengths: Any, spans: Any
                ) -> tuple[int, int, int, int]:
    """The object ``{"keys": [...], "values": [...], "lengths": [...]}`` at ``at``
    (members in any order, each once, nothing else): (past its ``}``, ids, lengths,
    keys), or at -1."""
    n = body.shape[0]
    ids = counts = keys = -1
    if at >= n or body[at] != 123:  # {
        return -1, 0, 0, 0
    at = _skip(body, at + 1)
    while True:
        key, end = at, _string(body, at)
        if end < 0:
            return -1, 0, 0, 0
        at = _colon(body, end)
        if at < 0:
            return -1, 0, 0, 0
        if _name(body, key, _KEYS) == end and keys < 0:
            at, keys = _strings(body, at, spans)
        elif _name(body, key, _VALUES) == end and ids < 0:
            at, ids = _integers(body, at, values, 0)
        elif _name(body, key, _LENGTHS) == end and counts < 0:
            at, counts = _integers(body, at, lengths, 0)
        else:  # offsets, weights, another name, a name twice
            return -1, 0, 0, 0
        if at < 0:
            return -1, 0, 0, 0
        at, closed = _after_item(body, at, 125)  # }
        if closed < 0:
            return -1, 0, 0, 0
        if closed:
            break
    if keys < 0 or ids < 0 or counts < 0:
        return -1, 0, 0, 0
    return at, ids, counts, keys


@compiled
def _parse_kjt(body: Any, values: Any, lengths: Any, spans: Any
               ) -> tuple[int, int, int, int, int]:
    """Read ``{"kjt": {...}, "encoding": "..."}`` (either order, each once, encoding
    optional; the KJT as :func:`_kjt_object` reads it): (ids, lengths, keys, encoding
    start, encoding end), the ids and lengths written to ``values`` and ``lengths``, each
    key's byte span (without quotes) to ``spans``, (-1, -1) for no encoding. ids is -1
    when the body is not in this form."""
    n = body.shape[0]
    ids = counts = keys = -1
    encoding_start = encoding_end = -1
    at = _skip(body, 0)
    if at >= n or body[at] != 123:  # {
        return -1, 0, 0, -1, -1
    at = _skip(body, at + 1)
    while True:
        key, end = at, _string(body, at)
        if end < 0:
            return -1, 0, 0, -1, -1
        at = _colon(body, end)
        if at < 0:
            return -1, 0, 0, -1, -1
        if _name(body, key, _KJT) == end and keys < 0:
            at, ids, counts, keys = _kjt_object(body, at, values, lengths, spans)
        elif _name(body, key, _ENCODING) == end and encoding_start < 0:
            end = _string(body, at)
            if end >= 0:
                encoding_start, encoding_end = at + 1, end - 1
            at = end
        else:
            return -1, 0, 0, -1, -1
        if at < 0:
            return -1, 0, 0, -1, -1
        at, closed = _after_item(body, at, 125)  # }
        if closed < 0:
            return -1, 0, 0, -1, -1
        if closed:
            break
    if keys < 0 or _skip(body, at) != n:
        return -1, 0, 0, -1, -1
    return ids, counts, keys, encoding_start, encoding_end


def parse_bags(body: bytes) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """``(ids [N], offsets [B + 1])``, int64, for a body of exactly the form
    ``{"bags": [[id, ...], ...]}``; ``None`` for any other body (never raises for bad
    input: the caller's general parser words the error)."""
    if not AVAILABLE or not body:
        return None
    data = np.frombuffer(body, dtype=np.uint8)
    if len(body) <= _COUNT_PAST:  # every id takes a digit and a separator
        most_ids = most_bags = len(body) // 2 + 1
    else:  # a large body: the exact bounds (memchr speed) keep the arrays small
        most_ids, most_bags = body.count(b",") + 1, body.count(b"[")
    ids = np.empty(most_ids, dtype=np.int64)
    offsets = np.empty(most_bags + 1, dtype=np.int64)
    bags, count = _parse(data, ids, offsets)
    if bags < 0:
        return None
    return ids[:count], offsets[: bags + 1]


@dataclass(frozen=True)
class KjtBody:
    """``{"kjt": {"keys", "values", "lengths"}, "encoding"}`` as read: ids and lengths
    int64, ``encoding`` as sent (``None`` when absent; the caller checks it)."""

    keys: list[str]
    values: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    encoding: str | None


def parse_kjt(body: bytes) -> KjtBody | None:
    """A KeyedJaggedTensor body read in one compiled pass; ``None`` for any other body,
    with offsets or weights, keys with escapes, or anything :func:`parse_bags` would not
    accept in its lists (never raises for bad input: the general parser words it)."""
    if not AVAILABLE or not body:
        return None
    data = np.frombuffer(body, dtype=np.uint8)
    most_ids = len(body) // 2 + 1 if len(body) <= _COUNT_PAST else body.count(b",") + 1
    values = np.empty(most_ids, dtype=np.int64)
    lengths = np.empty(most_ids, dtype=np.int64)
    # Two entries a key; a key takes three bytes at least ("", and a comma).
    spans = np.empty(len(body) // 3 * 2 + 2, dtype=np.int64)
    ids, counts, keys, start, end = _parse_kjt(data, values, lengths, spans)
    if ids < 0:
        return None
    try:
        names = [body[a:b].decode() for a, b in spans[: 2 * keys].reshape(-1, 2).tolist()]
        encoding = body[start:end].decode() if start >= 0 else None
    except UnicodeDecodeError:  # orjson refuses the body: its error, not ours
        return None
    return KjtBody(names, values[:ids], lengths[:counts], encoding)
