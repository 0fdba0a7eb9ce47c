"""Traffic the way users send it, for the kernel benchmark's matrix.

Ids: uniform, or Zipf-skewed with exponent ``a`` (rank ``r`` drawn with probability
~ ``r**-a``) and the ranks scattered over the table by a fixed permutation, so hot rows
are not the first rows. Bag lengths: fixed, Poisson or geometric (shifted to start at 0,
so empty bags occur), all with the same mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Id distributions: ``"uniform"`` or ``"zipf<a>"``.
DISTRIBUTIONS = ("uniform", "zipf0.8", "zipf1.1", "zipf1.5")
LENGTHS = ("fixed", "poisson", "geometric")


@dataclass(frozen=True)
class Traffic:
    """One kind of traffic: how ids and bag lengths are drawn."""

    ids: str = "zipf1.1"
    lengths: str = "poisson"
    mean_length: int = 20

    @property
    def label(self) -> str:
        return f"{self.ids}/{self.lengths}{self.mean_length}"


class IdSource:
    """Draws ids of one distribution over a table of ``rows`` rows (seeded)."""

    def __init__(self, distribution: str, rows: int, seed: int) -> None:
        if distribution != "uniform" and not distribution.startswith("zipf"):
            raise ValueError(f"unknown id distribution {distribution!r}")
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.exponent = None if distribution == "uniform" else float(distribution[4:])
        if self.exponent is not None:
            # P(rank r) ~ r**-a over the table's rows, sampled by inverting the CDF.
            weights = np.arange(1, rows + 1, dtype=np.float64) ** -self.exponent
            self.cdf = np.cumsum(weights)
            self.cdf /= self.cdf[-1]
            self.scatter = self.rng.permutation(rows)

    def draw(self, count: int) -> np.ndarray:
        if self.exponent is None:
            return self.rng.integers(0, self.rows, count, dtype=np.int64)
        ranks = np.searchsorted(self.cdf, self.rng.random(count), side="right")
        return self.scatter[np.minimum(ranks, self.rows - 1)].astype(np.int64)


def bag_lengths(kind: str, mean: int, bags: int, rng: np.random.Generator) -> np.ndarray:
    """``bags`` lengths with mean ``mean``: fixed, Poisson, or geometric from 0."""
    if kind == "fixed":
        return np.full(bags, mean, dtype=np.int64)
    if kind == "poisson":
        return rng.poisson(mean, bags).astype(np.int64)
    if kind == "geometric":
        return (rng.geometric(1.0 / (mean + 1), bags) - 1).astype(np.int64)
    raise ValueError(f"unknown bag length kind {kind!r}")


def batch(source: IdSource, traffic: Traffic, bags: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One call's ``(ids, starts, weights)``: int64 ids, int64 ``[B]`` bag starts (as
    torch takes them), float32 per-id weights."""
    lengths = bag_lengths(traffic.lengths, traffic.mean_length, bags, source.rng)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    ids = source.draw(int(lengths.sum()))
    weights = source.rng.random(ids.size, dtype=np.float32)
    return ids, starts, weights
