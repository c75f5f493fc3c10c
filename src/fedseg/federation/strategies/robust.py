"""Coordinate-wise robust aggregators (Yin et al., ICML 2018): median and trimmed mean.

Each coordinate of the new global model is the median (or the mean after
dropping the ``trim`` largest and smallest values) of the sites' values, so a
minority of sites sending anything at all moves no coordinate outside the
honest sites' range. Both are unweighted: neither a claimed Dice nor a
claimed sample count buys influence. They still pass the round's screening
(the norm bound), and read the round's updates one tensor at a time from the
store: memory is one tensor per site, not one model per site.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.screened import ScreenedAggregator
from fedseg.federation.strategies.screening import Screening
from fedseg.federation.strategies.store import UpdateStore
from fedseg.federation.strategies.updates import Update

__all__ = ["CoordinateMedian", "TrimmedMean"]


class CoordinateMedian(ScreenedAggregator):
    """Element-wise median of the accepted updates (the mean of the two middle values for an even count)."""

    name = "median"

    def raw_weight(self, update: Update) -> float:
        return 1.0

    def combine(self, shape: tuple[int, ...], arrays: Iterator[np.ndarray], shares: list[float]) -> np.ndarray:
        return np.median(np.stack(list(arrays)).astype(np.float64), axis=0)


class TrimmedMean(ScreenedAggregator):
    """Element-wise mean after dropping the ``ceil(trim_fraction * n)`` largest and smallest values (at least one each with n >= 3).

    Args:
        trim_fraction: the share of sites trimmed at each end, in [0, 0.5).
        screening, store: as :class:`ScreenedAggregator`.
    """

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.1, screening: Screening | None = None, store: UpdateStore | None = None) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise FedsegError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        super().__init__(screening, store)
        self.trim_fraction = trim_fraction

    def trimmed(self, n: int) -> int:
        """Values dropped at each end with ``n`` sites (never all of them)."""
        k = math.ceil(self.trim_fraction * n) if self.trim_fraction > 0 else 0
        if n >= 3:
            k = max(k, 1)
        return min(k, (n - 1) // 2)

    def raw_weight(self, update: Update) -> float:
        return 1.0

    def combine(self, shape: tuple[int, ...], arrays: Iterator[np.ndarray], shares: list[float]) -> np.ndarray:
        values = np.stack(list(arrays)).astype(np.float64)
        k = self.trimmed(len(values))
        return np.sort(values, axis=0)[k : len(values) - k].mean(axis=0)
