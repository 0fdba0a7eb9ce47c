"""Every golden case (made by PyTorch) through the API and each CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import GoldenCase, assert_close_to_bag, load_golden, runner

CASES = load_golden()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_case_matches_torch(case: GoldenCase, implementation: str) -> None:
    run = runner(implementation, case.arrays["weight"], **case.options)
    expected = case.arrays["expected"]
    actual = run(*case.call)
    # Weighted, cancelling and renormed cases round differently than FBGEMM by design
    # (DESIGN.md: ~1e-6 of the bag's magnitude); the rest add in PyTorch's order: bit-exact.
    if case.arrays.get("per_sample_weights") is None and case.options["max_norm"] is None:
        np.testing.assert_array_equal(actual, expected)
    assert_close_to_bag(actual, expected, scale=np.abs(expected) + 1.0)


def test_golden_set_covers_every_option() -> None:
    modes = {c.options["mode"] for c in CASES}
    assert modes == {"sum", "mean", "max"}
    assert any(c.options["padding_idx"] is not None and c.options["padding_idx"] < 0
               for c in CASES)
    assert any(c.options["include_last_offset"] for c in CASES)
    assert any("per_sample_weights" in c.arrays for c in CASES)
    assert any(c.arrays["input"].ndim == 2 for c in CASES)
    assert any(c.arrays["input"].size == 0 for c in CASES)
    assert any(c.arrays["weight"].dtype == np.float64 for c in CASES)
    assert any(c.arrays["input"].dtype == np.int32 for c in CASES)
