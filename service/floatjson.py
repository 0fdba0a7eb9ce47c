"""float32 rows as JSON text, the same bytes ``orjson`` writes, in about half its time.

A 64-bag answer of a dim-128 model is 8,192 floats; ``orjson.dumps`` spends ~26 ns on
each (~215 us on the event loop, a third of such a request at one connection). This
compiled pass writes pooled values in ~13 ns each on fresh answers, releasing the GIL,
and the answer embeds the text with ``orjson.Fragment``. Values it is slower for
(a quantized table's short decimals, integers from 2**24 on: 35-45 ns) are left to
orjson, judged from a sample (:func:`_suits`); so are answers under :data:`MIN_FLOATS`
floats.

Each value is the shortest decimal that reads back to the same float32, and among those
the nearest, laid out as orjson (and Rust's ``ryu``) lay it out: ``0.1``, ``1.0``,
``0.000123``, ``123456780.0``, ``1e-7``, ``1.2345678e+20``, ``-0.0``. Tests compare the
text byte for byte with orjson's on hundreds of thousands of random bit patterns and
every power of two and ten.

How: a float's value times a power of ten (float64, error below 1e-15 relative) gives
its 9 significant digits, always enough for a float32. Shorter candidates are rounded
from those and kept while they fall strictly inside the float's rounding interval, by a
margin far above the arithmetic's error, so every text read back with any correct
parser (straight to float32, or through float64) gives the float again. Two cases need
exact ends and go to a slower pass: powers of two (the interval below them is half the
one above) and integers from 2**24 on, whose intervals end on integers a short decimal
can hit exactly (``123456784`` prints as ``123456780.0``: a tie that rounds to even).

Written in two passes (the digits of every value, then the text) because a call or an
early return inside numba's inlined loop body cost it 2-3x; stores index with unsigned
positions so that numba emits no negative-index check per byte. Measured with
``benchmarks/bench_json.py`` (fresh answers: a repeated one lets the branch predictor
learn it and flatters any encoder).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from kernels.jit import AVAILABLE, compiled, inlined

#: ``_P10[k + 70]`` is 10**k as the nearest float64.
_P10 = np.array([float(f"1e{k}") for k in range(-70, 71)])
#: Half the gap to a float32's neighbours, by biased exponent (subnormals: 0 and 1 alike).
_HALF = np.array([2.0 ** (max(e, 1) - 151) for e in range(256)])
#: "00" to "99".
_PAIRS = np.frombuffer(b"".join(b"%02d" % i for i in range(100)), dtype=np.uint8).copy()
#: Unsigned offsets: a signed index makes numba check each store for a negative index.
_U = tuple(np.uint64(k) for k in range(17))
#: Scaled candidates must clear the interval's ends by this much (in units of the 9th
#: digit; the float64 arithmetic errs by < 3e-7 of one).
_MARGIN = 1e-6
#: Text bytes a float may take, comma included, and what a row adds.
_FLOAT_BYTES = 18
_SLACK = 32
#: Below this many floats orjson costs less than this module's three calls (~5 us):
#: 128 floats 3.0 vs 6.6 us, 512 12.9 vs 11.5, 1,024 25.9 vs 17.7.
MIN_FLOATS = 512


@inlined
def _estimated(ax: Any, eb: Any) -> tuple[Any, Any, Any]:
    """:func:`_scaled` without its last step, and without a branch (the vectorized loop
    of :func:`_decimals` runs it): ``rint(s)`` may still round up to ``1e9``. ``e10`` is
    clamped so that any ``eb`` (a zero's, an infinity's) indexes the table."""
    e10 = min(max((eb * 78913) >> 18, -60), 60)  # floor(eb * log10(2)), or one below
    e10 += ax >= _P10[e10 + 71]  # (no branch: either way half the time)
    scale = _P10[78 - e10]
    return e10, scale, ax * scale


@inlined
def _scaled(ax: Any, eb: Any) -> tuple[Any, Any, Any]:
    """(e10, scale, s) for a nonzero float32 magnitude ``ax`` (as float64) of binary
    exponent ``eb``: ``scale = 10**(8 - e10)`` and ``s = ax * scale``, with ``e10`` chosen
    so that ``1e8 <= rint(s) < 1e9`` (9 significant digits)."""
    e10, scale, s = _estimated(ax, eb)
    if np.rint(s) >= 1e9:  # rounds up to 10 digits: one power of ten more
        e10 += 1
        scale = _P10[78 - e10]
        s = ax * scale
    return e10, scale, s


@inlined
def _decimal(b: Any, f: Any) -> tuple[int, int, int]:
    """(d, n, kk) for a finite nonzero float32 ``f`` with sign-less bits ``b``: its
    shortest decimal's n digits followed by 9 - n zeros (``1e8 <= d < 1e9``) and
    ``|f| ~ 0.d x 10**kk``, one value at a time, for the values :func:`_decimals`'s
    branch-free loop marks. Powers of two and integers from 2**24 on would get a valid
    decimal that may not be the shortest: :func:`_exact` does those."""
    e2 = b >> 23
    mant = b & 0x7FFFFF
    ax = abs(np.float64(f))
    if e2 == 0:  # subnormal: its binary exponent from the mantissa's length
        eb = -150
        m = mant
        while m:
            m >>= 1
            eb += 1
    else:
        eb = np.int64(e2) - 127
    e10, scale, s = _scaled(ax, eb)
    d = np.rint(s)
    half = _HALF[e2]
    lo = (ax - half) * scale + _MARGIN
    hi = (ax + half) * scale - _MARGIN
    # Shorter candidates while they stay inside the interval (the branch-free pass in
    # _decimals handles the usual values; this one sees the ones it marks).
    n = 9
    for j in range(1, 9):
        v = np.rint(s * _P10[70 - j]) * _P10[70 + j]
        if not (lo < v < hi):
            break
        d = v
        n = 9 - j
    if d >= 1e9:  # rounded up to the next power of ten
        d = 1e8
        n = 1
        e10 += 1
    return np.int64(d), n, e10 + 1


@inlined
def _careful(b: Any) -> bool:
    """Whether the nonzero sign-less float32 bits ``b`` need :func:`_exact`: a power of
    two (normal) or an integer from 2**24 on."""
    return bool(((b & 0x7FFFFF) == 0) & (b >= 0x00800000) | (b >= 0x4B800000))


@compiled
def _exact(b: Any, f: Any) -> tuple[int, int, int]:
    """As :func:`_decimal`, digit by digit, for the two kinds of float whose interval
    needs care: a power of two (the interval below it is half the one above, so the
    nearest candidate may fall out below while the next one up fits) and an integer
    from 2**24 on (candidates compared with the interval unscaled, exactly, ends
    included when the mantissa is even: a decimal on an end reads back to this float by
    round-half-even), as ryu does."""
    e2 = b >> 23
    mant = b & 0x7FFFFF
    ax = abs(np.float64(f))
    e10, scale, s = _scaled(ax, np.int64(e2) - 127)
    half = _HALF[e2]
    down = half * 0.5 if (mant == 0 and e2 > 1) else half
    closed = (mant & 1) == 0
    lo = (ax - down) * scale + _MARGIN
    hi = (ax + half) * scale - _MARGIN
    d = np.rint(s)
    n = 9
    for j in range(1, 9):
        t = np.rint(s * _P10[70 - j])
        found = False
        for candidate in (t, t + 1.0, t - 1.0):
            q = j + e10 - 8  # the candidate is worth candidate * 10**q
            w = candidate * _P10[70 + q] if 0 <= q <= 22 else 0.0
            if 0 < w < 9007199254740992.0:  # exact in float64: compare exactly
                inside = ((ax - down < w < ax + half)
                          or (closed and (w == ax - down or w == ax + half)))
            else:
                inside = lo < candidate * _P10[70 + j] < hi
            if inside:
                found = True
                d = candidate * _P10[70 + j]
                break
            if mant != 0:
                break
        if not found:
            break
        n = 9 - j
    if d >= 1e9:
        d = 1e8
        n = 1
        e10 += 1
    return np.int64(d), n, e10 + 1


@compiled
def _decimals(bits: Any, values: Any, digits: Any, counts: Any, points: Any,
              odd: Any) -> int:
    """Pass one: each value's (d, n, kk) into ``digits``, ``counts``, ``points`` (d = 0
    for a zero); -1 on a value that is not finite, else 0.

    In two loops. The first has no branch, so LLVM runs it four values at a time (AVX2;
    with the second, 6.4 ns a value against 11.5 for the loop with branches it
    replaces): the 9 digits, and candidates of 8, 7, 6 and 5 digits kept by arithmetic.
    It marks in ``odd`` (scratch, one byte a value, a whole number of 8-byte words)
    every value it may have got wrong or short: zeros, subnormals, infinities and NaNs,
    5 digits or fewer (shorter ones need a loop), a rounding up to ten digits, and the
    powers of two and integers from 2**24 on that :func:`_exact` does. The second loop
    redoes those one by one (0.3% of pooled values), skipping unmarked words whole.
    """
    halfs = _HALF
    for i in range(values.shape[0]):
        b = bits[i] & np.uint32(0x7FFFFFFF)
        e2 = np.int32(b >> np.uint32(23))
        ax = np.float64(abs(values[i]))
        e10, scale, s = _estimated(ax, e2 - np.int32(127))
        d = np.rint(s)
        half = halfs[e2]
        lo = (ax - half) * scale + _MARGIN
        hi = (ax + half) * scale - _MARGIN
        v1 = np.rint(s * 0.1) * 10.0
        v2 = np.rint(s * 0.01) * 100.0
        v3 = np.rint(s * 0.001) * 1000.0
        v4 = np.rint(s * 0.0001) * 10000.0
        fit1 = (lo < v1) & (v1 < hi)
        fit2 = fit1 & (lo < v2) & (v2 < hi)
        fit3 = fit2 & (lo < v3) & (v3 < hi)
        fit4 = fit3 & (lo < v4) & (v4 < hi)
        ten = d >= 1e9  # 9 digits rounded up to ten: one power of ten more
        # Selected by arithmetic (exact: integers below 2**53), not by branches.
        d += fit1 * (v1 - d) + fit2 * (v2 - v1) + fit3 * (v3 - v2) + fit4 * (v4 - v3)
        digits[i] = np.int32(d)
        counts[i] = np.int8(9 - np.int32(fit1) - np.int32(fit2) - np.int32(fit3)
                            - np.int32(fit4))
        points[i] = np.int8(e10 + 1)
        odd[i] = np.uint8((e2 == 0) | (e2 == 255) | fit4 | ten | (d >= 1e9) | _careful(b))
    words = odd.view(np.uint64)  # eight marks at a time: nearly all words are 0
    for w in range(words.shape[0]):
        if words[w] == 0:
            continue
        for i in range(8 * w, min(8 * w + 8, values.shape[0])):
            if not odd[i]:
                continue
            b = bits[i] & 0x7FFFFFFF
            if b >= 0x7F800000:
                return -1
            if b == 0:
                digits[i] = 0
            elif _careful(b):
                digits[i], counts[i], points[i] = _exact(b, values[i])
            else:
                digits[i], counts[i], points[i] = _decimal(b, values[i])
    return 0


@inlined
def _nine(out: Any, at: Any, d: Any) -> None:
    """The 9 digits of ``d`` (``1e8 <= d < 1e9``) at ``out[at:at + 9]``."""
    u = _U
    c = np.uint64(d)
    high = c // np.uint64(100000)
    low = c - high * np.uint64(100000)
    h1 = high // np.uint64(100)
    h2 = high - h1 * np.uint64(100)
    l1 = low // np.uint64(1000)
    l3 = low - l1 * np.uint64(1000)
    l2 = l3 // np.uint64(10)
    l4 = l3 - l2 * np.uint64(10)
    out[at] = _PAIRS[u[2] * h1]
    out[at + u[1]] = _PAIRS[u[2] * h1 + u[1]]
    out[at + u[2]] = _PAIRS[u[2] * h2]
    out[at + u[3]] = _PAIRS[u[2] * h2 + u[1]]
    out[at + u[4]] = _PAIRS[u[2] * l1]
    out[at + u[5]] = _PAIRS[u[2] * l1 + u[1]]
    out[at + u[6]] = _PAIRS[u[2] * l2]
    out[at + u[7]] = _PAIRS[u[2] * l2 + u[1]]
    out[at + u[8]] = u[16] * u[3] + l4  # "0" + the last digit


@inlined
def _number(out: Any, pos: Any, d: Any, n: Any, kk: Any) -> Any:
    """One nonzero float's text after its sign at ``pos`` (unsigned): the position past
    it. May write up to 16 bytes past ``pos`` whatever its length. One exit: numba
    inlines early returns badly."""
    u = _U
    if -6 < kk <= 0:  # 0.000ddd, the usual embedding value
        for k in range(8):
            out[pos + np.uint64(k)] = 48
        out[pos + u[1]] = 46
        at = pos + np.uint64(2 - kk)
        _nine(out, at, d)
        end = at + np.uint64(n)
    elif 0 < kk <= 13 and kk >= n:  # an integer: digits, zeros, ".0"
        _nine(out, pos, d)
        for k in range(9, kk):
            out[pos + np.uint64(k)] = 48
        at = pos + np.uint64(kk)
        out[at] = 46
        out[at + u[1]] = 48
        end = at + u[2]
    elif 0 < kk <= 13:  # ddd.ddd: the digits one place on, the integer part moved back
        _nine(out, pos + u[1], d)
        for k in range(kk):
            out[pos + np.uint64(k)] = out[pos + np.uint64(k + 1)]
        out[pos + np.uint64(kk)] = 46
        end = pos + np.uint64(n + 1)
    else:  # d.ddde+XX
        _nine(out, pos + u[1], d)
        out[pos] = out[pos + u[1]]
        at = pos + u[1]
        if n > 1:
            out[at] = 46
            at = pos + np.uint64(n + 1)
        out[at] = 101
        x = kk - 1
        out[at + u[1]] = 45 if x < 0 else 43
        x = abs(x)
        if x >= 10:
            out[at + u[2]] = _PAIRS[2 * x]
            out[at + u[3]] = _PAIRS[2 * x + 1]
            end = at + u[4]
        else:
            out[at + u[2]] = 48 + x
            end = at + u[3]
    return end


@compiled
def _texts(bits: Any, digits: Any, counts: Any, points: Any, width: int, nested: bool,
           out: Any, ends: Any) -> int:
    """Pass two: the JSON list of pass one's values into ``out``, rows of ``width`` as
    lists of lists when ``nested`` (``ends[r]``: the end of row r's text, its "]"
    included); its length. ``width`` > 0."""
    u = _U
    pos = u[1]
    out[0] = 91  # [
    row = 0
    column = 0
    if nested and digits.shape[0] > 0:
        out[pos] = 91
        pos += u[1]
    for i in range(digits.shape[0]):
        out[pos] = 45  # "-", kept only for a negative value
        pos += bits[i] >> 31
        if digits[i] == 0:
            out[pos] = 48
            out[pos + u[1]] = 46
            out[pos + u[2]] = 48
            pos += u[3]
        else:
            pos = _number(out, pos, digits[i], counts[i], points[i])
        out[pos] = 44
        pos += u[1]
        column += 1
        if nested and column == width:
            out[pos - u[1]] = 93  # over the row's last comma
            ends[row] = pos
            row += 1
            column = 0
            out[pos] = 44
            out[pos + u[1]] = 91
            pos += u[2]
    if nested and digits.shape[0] > 0:
        pos -= u[1]  # the "[" opened after the last row
    if pos > u[1]:
        pos -= u[1]  # the last comma
    out[pos] = 93
    return int(pos + u[1])


@compiled
def _suits(bits: Any) -> bool:
    """Whether values like these (a sample of up to 64, evenly spaced) are the kind this
    writer is faster for: full mantissas below 2**24, as pooled float tables give, of
    any sign and scale (1.3-2x orjson's speed from 1e-7 to 1e7). Short decimals (a
    quantized table's exact steps: their branches mispredict) and integers from 2**24
    on (an exact pass each) are written faster by orjson (0.6-0.7x by
    ``benchmarks/bench_json.py``)."""
    total = bits.shape[0]
    step = max(total // 64, 1)
    odd = 0
    for i in range(0, total, step):
        b = bits[i] & 0x7FFFFFFF
        # |x| >= 2**24, or a mantissa ending in ten zero bits; zeros are fine.
        odd += (b != 0) & ((b >= 0x4B800000) | ((b & 0x3FF) == 0))
    return bool(odd * 16 <= min(total, 64))  # at most one in 16


def _encode(values: npt.NDArray[np.float32], width: int, nested: bool
            ) -> tuple[bytes, npt.NDArray[np.int64]] | None:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = flat.view(np.uint32)
    total = flat.shape[0]
    rows = total // width if width > 0 else 0
    digits = np.empty(total, np.int32)
    counts = np.empty(total, np.int8)
    points = np.empty(total, np.int8)
    odd = np.zeros(-(-total // 8) * 8, np.uint8)  # whole words: see _decimals
    if _decimals(bits, flat, digits, counts, points, odd) < 0:
        return None
    out = np.empty(total * _FLOAT_BYTES + (rows + 1) * 3 + _SLACK, np.uint8)
    ends = np.zeros(max(rows, 1), np.int64)
    size = _texts(bits, digits, counts, points, max(width, 1), nested, out, ends)
    return out[:size].tobytes(), ends


def rows_json(rows: npt.NDArray[Any]) -> bytes | None:
    """A (B, D) array as JSON text, ``[[...], ...]``, each value as float32: the bytes
    ``orjson.dumps(rows.astype(np.float32), option=OPT_SERIALIZE_NUMPY)`` gives. None
    when a value is not finite (orjson writes ``null`` there) or the compiled pass is
    unavailable; callers fall back to orjson."""
    if not AVAILABLE or rows.ndim != 2:
        return None
    if rows.shape[1] == 0:  # [[], [], ...]: nothing to gain
        return None
    encoded = _encode(rows, rows.shape[1], True)
    return None if encoded is None else encoded[0]


def row_texts(rows: npt.NDArray[Any]) -> list[bytes] | None:
    """Each row of a (B, D) array as its own JSON list (for answers that put every row
    in its own object); None as for :func:`rows_json`."""
    if not AVAILABLE or rows.ndim != 2 or rows.shape[1] == 0:
        return None
    encoded = _encode(rows, rows.shape[1], True)
    if encoded is None:
        return None
    text, ends = encoded
    starts = np.empty(rows.shape[0], np.int64)
    starts[0:1] = 1
    starts[1:] = ends[:-1] + 1  # past "," (and the outer "[" for the first)
    return [text[a:b] for a, b in zip(starts.tolist(), ends[: rows.shape[0]].tolist(),
                                      strict=True)]


def list_json(values: npt.NDArray[Any]) -> bytes | None:
    """Any array's values, flattened, as one JSON list ``[...]`` of float32 values;
    None as for :func:`rows_json`."""
    if not AVAILABLE:
        return None
    encoded = _encode(values, max(values.size, 1), False)
    return None if encoded is None else encoded[0]


def _pays(values: npt.NDArray[np.float32]) -> bool:
    """Whether the compiled writer pays for these (contiguous float32) values: from
    :data:`MIN_FLOATS`, and values :func:`_suits` finds like pooled embeddings."""
    return (values.size >= MIN_FLOATS and AVAILABLE
            and bool(_suits(values.reshape(-1).view(np.uint32))))


def rows_value(rows: npt.NDArray[Any]) -> Any:
    """What an orjson payload should hold for a (B, D) float32 answer: its text as an
    ``orjson.Fragment``, or, where that does not pay (under :data:`MIN_FLOATS`, values
    :func:`_suits` finds unlike pooled embeddings) or apply (not finite), the contiguous
    array for ``OPT_SERIALIZE_NUMPY``. Either way the same bytes come out."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if _pays(rows):
        text = rows_json(rows)
        if text is not None:
            return orjson.Fragment(text)
    return rows


def row_values(rows: npt.NDArray[Any]) -> list[Any]:
    """As :func:`rows_value`, one value per row (each row in its own JSON object)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if _pays(rows):
        texts = row_texts(rows)
        if texts is not None:
            return [orjson.Fragment(text) for text in texts]
    return list(rows)


def list_value(values: npt.NDArray[Any]) -> Any:
    """As :func:`rows_value`, for any array written as one flat JSON list."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if _pays(values):
        text = list_json(values)
        if text is not None:
            return orjson.Fragment(text)
    return values


def warm_up() -> None:
    """Compile (or load from numba's cache) every pass, so that a fresh server's first
    large answer does not wait for it; checks the text against orjson's.

    Raises:
        RuntimeError: the compiled writer and orjson disagree.
    """
    if not AVAILABLE:
        return
    values = np.array([[0.5, -1.25e-7, 3.0e20, 123456784.0], [0.0, -0.0, 0.1, 2.0**-140]],
                      dtype=np.float32)
    expected = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
    _suits(values.reshape(-1).view(np.uint32))
    if rows_json(values) != expected or row_texts(values) is None or list_json(values) is None:
        raise RuntimeError("the compiled JSON writer misread its warm-up answer")
