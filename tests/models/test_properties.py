"""Property tests: every implementation against the slow reference on random calls."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import IMPLEMENTATIONS, assert_close_to_bag, runner
from tests.reference import reference_bag


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 19))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    weight = draw(hnp.arrays(dtype, (rows, dim), elements=st.floats(-100, 100, width=32)))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    padding_idx = draw(st.none() | st.integers(-rows, rows - 1))
    include_last_offset = draw(st.booleans())
    max_norm = draw(st.none() | st.floats(0.1, 50))
    norm_type = draw(st.sampled_from([1.0, 2.0, 3.0, float("inf")]))
    two_d = draw(st.booleans())
    index_dtype = draw(st.sampled_from([np.int32, np.int64]))
    if two_d:
        shape = (draw(st.integers(0, 12)), draw(st.integers(0, 20)))
        ids = draw(hnp.arrays(index_dtype, shape, elements=st.integers(0, rows - 1)))
        offsets = None
    else:
        lengths = draw(st.lists(st.integers(0, 25), min_size=1, max_size=12))
        ids = draw(hnp.arrays(index_dtype, sum(lengths), elements=st.integers(0, rows - 1)))
        starts = np.concatenate(([0], np.cumsum(lengths))).astype(index_dtype)
        offsets = starts if include_last_offset else starts[:-1]
    weights = None
    if mode == "sum" and draw(st.booleans()):
        weights = draw(hnp.arrays(dtype, ids.shape, elements=st.floats(-4, 4, width=32)))
    return {"weight": weight, "call": (ids, offsets, weights),
            "options": {"mode": mode, "padding_idx": padding_idx,
                        "include_last_offset": include_last_offset, "max_norm": max_norm,
                        "norm_type": norm_type}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(calls())
def test_every_implementation_matches_reference(case: dict[str, Any]) -> None:
    weight = case["weight"]
    expected = reference_bag(weight, *case["call"], **case["options"])
    # Bound the error by the magnitudes that were added, not the (possibly cancelled) result.
    scale = reference_bag(np.abs(weight), *case["call"][:2],
                          None if case["call"][2] is None else np.abs(case["call"][2]),
                          **{**case["options"], "mode": "sum"})
    rtol = 1e-5 if weight.dtype == np.float32 else 1e-12
    for implementation in IMPLEMENTATIONS:
        actual = runner(implementation, weight, **case["options"])(*case["call"])
        assert_close_to_bag(actual, expected.astype(weight.dtype), scale=np.abs(scale) + 1,
                            rtol=rtol)
