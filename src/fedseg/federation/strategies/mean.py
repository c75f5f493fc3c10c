"""FedAvg as one class: the streaming weighted mean of the sites' updates, weighted by a parameter.

Weighting is a parameter, not a subclass (as Flower's ``FedAvg(weighted_by_key=...)``)::

    WeightedMean("dice-weighted")    weight = validation Dice (Sarma et al., JAMIA 2021)
    WeightedMean("sample-weighted")  weight = training samples (McMahan et al. 2017)
    WeightedMean("uniform")          weight = 1

Aggregation is streaming: each update is folded into one float64 accumulator
per tensor as it arrives (:class:`~fedseg.federation.strategies.arrays.RunningMean`),
so memory does not grow with the number of sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import RunningMean
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.updates import (
    RoundResult,
    Update,
    UpdateRejected,
    validate_update,
)

__all__ = ["DICE", "SAMPLES", "UNIFORM", "WEIGHTINGS", "WeightedMean", "Weighting"]


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


class WeightedMean(Aggregator):
    """Streaming weighted mean of site updates: ``sum_i w_i x_i / sum_i w_i`` per float tensor.

    Float tensors are accumulated in float64 and cast back to their dtype by
    :meth:`finish`; integer and bool tensors come whole from the heaviest site
    (see :class:`~fedseg.federation.strategies.arrays.RunningMean`).

    Args:
        weight_by: a name of :data:`WEIGHTINGS` or a :class:`Weighting`.

    Raises:
        FedsegError: an unknown weighting name (the message lists the known ones).
    """

    def __init__(self, weight_by: str | Weighting) -> None:
        super().__init__()
        if isinstance(weight_by, str):
            if weight_by not in WEIGHTINGS:
                raise FedsegError(f"unknown weighting {weight_by!r}; choose one of: {', '.join(WEIGHTINGS)}")
            weight_by = WEIGHTINGS[weight_by]
        self.weighting = weight_by
        self.name = weight_by.name
        self._running: RunningMean | None = None

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round (see :meth:`Aggregator.start_round`)."""
        super().start_round(global_weights)
        self._running = RunningMean.against(global_weights)

    def add(self, update: Update) -> float:
        """Validate ``update`` and fold it into the running mean; returns its raw weight.

        Raises:
            UpdateRejected: the update is invalid, its site already contributed
                this round, or its weight is negative or not finite; the running
                mean is then unchanged.
            FedsegError: no round is open.
        """
        running = self._open_round()
        validate_update(running.reference, update)
        if update.site in running.raw:
            raise UpdateRejected(update.site, "this site already contributed to the round")
        raw = float(self.weighting.weight(update))
        if not math.isfinite(raw) or raw < 0:
            raise UpdateRejected(update.site, f"{self.name} weight {raw!r} is not a finite number >= 0")
        running.fold(update.site, update.weights, raw)
        return raw

    def aggregate(self) -> RoundResult:
        """Close the round (see :meth:`Aggregator.aggregate`).

        Raises:
            FedsegError: no round is open, no update was added, or every weight is
                0 and the weighting has no uniform fallback.
        """
        running = self._open_round()
        if not running.raw:
            raise FedsegError(f"{self.name}: no update was added this round")
        site_weights, notes = self._site_weights(running.raw)
        self._running = None
        return RoundResult(running.weights(), site_weights, dict(running.raw), list(running.raw), notes)

    def _site_weights(self, raw: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        total = math.fsum(raw.values())
        if total > 0:
            return {site: w / total for site, w in raw.items()}, []
        if not self.weighting.uniform_if_all_zero:
            raise FedsegError(f"{self.name}: every site's weight is 0; cannot aggregate")
        note = f"{self.name}: every site's weight is 0; averaged the {len(raw)} sites uniformly"
        return {site: 1.0 / len(raw) for site in raw}, [note]

    def _open_round(self) -> RunningMean:
        if self._running is None:
            raise self._closed()
        return self._running
