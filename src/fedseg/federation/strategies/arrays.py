"""Plain numpy helpers of aggregation: the streaming weighted mean and dtype casts (no model, no site)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

__all__ = ["RunningMean", "Weights", "cast_like", "float_names", "is_float", "is_real"]

Weights = dict[str, np.ndarray]
"""A model state dict as numpy arrays (float tensors, plus integer/bool buffers)."""


def is_float(array: np.ndarray) -> bool:
    """Whether ``array`` holds floating-point values (averaged; other dtypes are taken whole)."""
    return bool(np.issubdtype(array.dtype, np.floating))


def is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, not a Dice)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def float_names(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the float tensors of ``weights``."""
    return {name: array.shape for name, array in weights.items() if is_float(array)}


def cast_like(weights: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> Weights:
    """Every tensor as an ndarray of its dtype in ``dtypes`` (asarray: 0-d arithmetic yields numpy scalars)."""
    return {name: np.asarray(array, dtype=dtypes[name]) for name, array in weights.items()}


@dataclass
class RunningMean:
    """One round's weighted mean, folded one site at a time: a float64 accumulator per float tensor plus O(1) per site.

    The mean is kept incrementally, ``mean += w / W * (x - mean)``, rather than
    as ``sum(w x) / sum(w)``: no ``w * x`` product can underflow (hypothesis
    found Dice 2e-308 times 4e-38 rounding to 0), and identical updates leave
    the mean bit-for-bit equal to them.

    While every weight so far is 0, updates are averaged uniformly (weight 1)
    so an all-zero round can fall back to a plain mean; the first positive
    weight restarts the mean, which is exact because zero-weight updates add
    nothing to a weighted mean.

    Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``) are
    taken whole from the site with the largest weight: a mean of counters or
    indices is not a valid value of either, and one site's buffer is at least
    consistent with its own weights.
    """

    reference: Weights  # the global model the updates are checked against
    means: Weights  # float tensors: running weighted mean, float64
    total: float = 0.0  # sum of effective weights
    raw_total: float = 0.0  # sum of raw weights
    raw: dict[str, float] = field(default_factory=dict)  # site -> raw weight, in arrival order
    exact: Weights = field(default_factory=dict)  # non-float tensors of the heaviest site
    heaviest: tuple[float, str] | None = None  # (raw weight, site) that ``exact`` came from

    @classmethod
    def against(cls, global_weights: Mapping[str, np.ndarray]) -> RunningMean:
        """An empty mean shaped like ``global_weights`` (referenced, not copied)."""
        reference = dict(global_weights)
        means = {n: np.zeros(a.shape, dtype=np.float64) for n, a in reference.items() if is_float(a)}
        return cls(reference=reference, means=means)

    def fold(self, site: str, weights: Mapping[str, np.ndarray], raw: float) -> None:
        """Add one site's (validated) weights with raw weight ``raw`` >= 0."""
        if raw > 0 and self.raw_total == 0.0 and self.raw:
            for mean in self.means.values():
                mean.fill(0.0)
            self.total = 0.0
        weight = raw if raw > 0 or self.raw_total > 0 else 1.0
        if weight:
            self.total += weight
            share = weight / self.total
            for name, mean in self.means.items():
                mean += share * (weights[name].astype(np.float64) - mean)
        self.raw[site] = raw
        self.raw_total += raw
        # Heaviest site wins; ties go to the smallest name, so arrival order never matters.
        best = self.heaviest
        if best is None or raw > best[0] or (raw == best[0] and site < best[1]):
            self.heaviest = (raw, site)
            self.exact = {n: np.array(a, copy=True) for n, a in weights.items() if n not in self.means}

    def weights(self) -> Weights:
        """The mean so far: float tensors in float64, the others from the heaviest site."""
        return {name: self.means[name] if name in self.means else self.exact[name] for name in self.reference}
