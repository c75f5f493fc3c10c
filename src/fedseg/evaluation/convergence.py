"""Did a fold model converge? Its validation-Dice curve (:class:`FoldCurve`) and issue #12's criterion.

A fold counts as converged when the mean validation Dice over its last 20 % of
epochs/rounds is within 0.02 of its best: a model still climbing at the end,
or one whose best was a lucky spike, fails it. Reading the curves from a
study's folders is :func:`fedseg.study.convergence.fold_curves`'s job;
rendering them is :mod:`fedseg.report`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TAIL_FRACTION", "WITHIN", "FoldCurve", "convergence_summary"]

TAIL_FRACTION = 0.2
WITHIN = 0.02


@dataclass(frozen=True)
class FoldCurve:
    """Validation Dice of one fold model, by epoch (private, pooled) or round (fl, aggregated over the sites)."""

    family: str  # "private", "pooled" or "fl"
    model: str  # "private:nci", "pooled", "fl"
    fold: int
    x: tuple[int, ...]  # 1-based epochs or rounds
    y: tuple[float, ...]

    @property
    def best(self) -> float:
        return max(self.y)

    @property
    def best_at(self) -> int:
        return self.x[int(np.argmax(self.y))]

    @property
    def tail_mean(self) -> float:
        """Mean over the last TAIL_FRACTION of the points (at least one)."""
        n = max(1, math.ceil(TAIL_FRACTION * len(self.y)))
        return float(np.mean(self.y[-n:]))

    @property
    def converged(self) -> bool:
        return self.tail_mean >= self.best - WITHIN


def convergence_summary(curves: Sequence[FoldCurve]) -> str:
    """One sentence: how many of the fold models converged, and by which criterion."""
    if not curves:
        return "No validation curves were recorded."
    converged = sum(c.converged for c in curves)
    return (
        f"{converged} of {len(curves)} fold models converged ({100 * converged / len(curves):.0f} %): the mean "
        f"validation Dice over their last {TAIL_FRACTION:.0%} of epochs/rounds is within {WITHIN:g} of their best."
    )
