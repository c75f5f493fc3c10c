"""FedAvg as one class: the weighted mean of the sites' updates, weighted by a parameter.

Weighting is a parameter, not a subclass (as Flower's ``FedAvg(weighted_by_key=...)``)::

    WeightedMean("dice-weighted")    weight = validation Dice (Sarma et al., JAMIA 2021)
    WeightedMean("sample-weighted")  weight = training samples (McMahan et al. 2017)
    WeightedMean("uniform")          weight = 1

Every update passes the round's screening first (norm bound, share cap:
:mod:`~fedseg.federation.strategies.screening`), so a site's claimed Dice or
sample count cannot buy it more than its capped share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.screened import ScreenedAggregator
from fedseg.federation.strategies.screening import Screening
from fedseg.federation.strategies.store import UpdateStore
from fedseg.federation.strategies.updates import Update

__all__ = ["DICE", "SAMPLES", "UNIFORM", "WEIGHTINGS", "WeightedMean", "Weighting", "weighted_mean"]


@dataclass(frozen=True)
class Weighting:
    """How much one site's validated update counts.

    Attributes:
        name: the config name (``federation.aggregator``) and the name in messages.
        weight: the raw (unnormalised) weight of an update: finite and >= 0.
        uniform_if_all_zero: if every raw weight of a round is 0, average
            uniformly (with a note) instead of raising.
    """

    name: str
    weight: Callable[[Update], float]
    uniform_if_all_zero: bool = False


def _dice(update: Update) -> float:
    return float(update.val_dice)


def _samples(update: Update) -> float:
    return float(update.num_samples)


def _one(update: Update) -> float:
    return 1.0


DICE = Weighting("dice-weighted", _dice, uniform_if_all_zero=True)
"""Validation Dice. Round 1 of an untrained network may give every site Dice 0
(weights 0/0): that round is then averaged uniformly and the result's notes say so."""
SAMPLES = Weighting("sample-weighted", _samples)
"""Training samples (FedAvg)."""
UNIFORM = Weighting("uniform", _one)
"""Every site counts the same."""
WEIGHTINGS: Mapping[str, Weighting] = {w.name: w for w in (DICE, SAMPLES, UNIFORM)}
"""The weightings a study config may name, by name."""


def weighted_mean(shape: tuple[int, ...], arrays: Iterable[np.ndarray], shares: list[float]) -> np.ndarray:
    """``sum_i s_i x_i`` in float64, folded incrementally (``mean += s / S * (x - mean)``).

    Incremental rather than ``sum(s x)``: no product can underflow (hypothesis
    found Dice 2e-308 times 4e-38 rounding to 0), and identical inputs give a
    mean bit-for-bit equal to them. Zero shares add nothing.
    """
    mean = np.zeros(shape, dtype=np.float64)
    total = 0.0
    for array, share in zip(arrays, shares, strict=True):
        if share:
            total += share
            mean += share / total * (array.astype(np.float64) - mean)
    return mean


class WeightedMean(ScreenedAggregator):
    """Weighted mean of site updates: ``sum_i w_i x_i / sum_i w_i`` per float tensor, after screening.

    Float tensors are combined in float64 and cast back to their dtype by
    :meth:`finish`; integer and bool tensors are the sites' element-wise lower
    median (see :class:`~fedseg.federation.strategies.screened.ScreenedAggregator`).

    Args:
        weight_by: a name of :data:`WEIGHTINGS` or a :class:`Weighting`.
        screening, store: as :class:`ScreenedAggregator`.

    Raises:
        FedsegError: an unknown weighting name (the message lists the known ones).
    """

    def __init__(
        self, weight_by: str | Weighting, screening: Screening | None = None, store: UpdateStore | None = None
    ) -> None:
        super().__init__(screening, store)
        if isinstance(weight_by, str):
            if weight_by not in WEIGHTINGS:
                raise FedsegError(f"unknown weighting {weight_by!r}; choose one of: {', '.join(WEIGHTINGS)}")
            weight_by = WEIGHTINGS[weight_by]
        self.weighting = weight_by
        self.name = weight_by.name
        self.uniform_if_all_zero = weight_by.uniform_if_all_zero

    def raw_weight(self, update: Update) -> float:
        return float(self.weighting.weight(update))

    def combine(self, shape: tuple[int, ...], arrays: Iterator[np.ndarray], shares: list[float]) -> np.ndarray:
        return weighted_mean(shape, arrays, shares)  # one site's tensor at a time
