"""What a site hands the aggregator and what a round gives back, and the check every update passes first."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import Weights, is_float, is_real

__all__ = ["RoundResult", "Update", "UpdateRejected", "validate_update"]

_MAX_LISTED = 5  # problems named in one rejection message


class UpdateRejected(FedsegError):
    """A site's update failed :func:`validate_update`; ``site`` and ``reason`` say why."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"update from site {site!r} rejected: {reason}")
        self.site = site
        self.reason = reason


@dataclass(frozen=True)
class Update:
    """What one site returns after a round of local training.

    Attributes:
        site: the site's identity (its certificate name).
        weights: its model state dict, same names/shapes/dtypes as the global model.
        num_samples: training samples it used (> 0).
        val_dice: its latest validation Dice, in [0, 1].
        metrics: other declared scalars (e.g. loss), passed through, never aggregated here.
    """

    site: str
    weights: Weights
    num_samples: int
    val_dice: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round.

    Attributes:
        weights: the new global weights (each tensor in its original dtype from
            :meth:`~fedseg.federation.strategies.base.Aggregator.finish`).
        site_weights: normalised aggregation weight per site (sums to 1).
        raw_weights: each site's weight before normalisation.
        sites: the sites that contributed, in order of arrival.
        notes: human-readable remarks for the run log (e.g. a uniform fallback, a capped share).
        refused: site -> reason, for updates the round's screening refused (e.g. too large);
            they are in none of the other fields but ``update_norms``.
        update_norms: each kept update's change from the global model (L2 norm), refused ones too.
        secure_sums: under secure aggregation, what the server learnt instead of per-site values: the
            sums over the sites of their ``weight``, ``weighted_dice``, ``dice`` and ``count``; None otherwise.
    """

    weights: Weights
    site_weights: dict[str, float]
    raw_weights: dict[str, float]
    sites: list[str]
    notes: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)
    secure_sums: dict[str, float] | None = None


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _scalar_problems(update: Update) -> list[str]:
    problems = [] if isinstance(update.site, str) and update.site else [f"site {update.site!r} is not a name"]
    dice = update.val_dice
    if not is_real(dice) or not math.isfinite(dice) or not 0.0 <= dice <= 1.0:
        problems.append(f"val_dice {dice!r} is not a finite number in [0, 1]")
    n = update.num_samples
    if not isinstance(n, Integral) or isinstance(n, bool) or n <= 0:
        problems.append(f"num_samples {n!r} is not an integer > 0")
    if not isinstance(update.metrics, Mapping) or not all(
        isinstance(k, str) and is_real(v) for k, v in update.metrics.items()
    ):
        problems.append("metrics must map names to numbers")
    return problems


def _tensor_problem(name: str, tensor: object, reference: np.ndarray) -> str | None:
    if not isinstance(tensor, np.ndarray):
        return f"{name} is a {type(tensor).__name__}, not a numpy array"
    if tensor.shape != reference.shape:
        return f"{name} has shape {tensor.shape}, expected {reference.shape}"
    if tensor.dtype != reference.dtype:
        return f"{name} has dtype {tensor.dtype}, expected {reference.dtype}"
    if is_float(tensor) and not np.isfinite(tensor).all():
        return f"{name} has non-finite values (NaN or inf)"
    return None


def _tensor_problems(global_weights: Mapping[str, np.ndarray], weights: Mapping[str, object]) -> list[str]:
    problems = []
    missing = [name for name in global_weights if name not in weights]
    extra = [name for name in weights if name not in global_weights]
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listed(extra)}")
    bad = [
        problem
        for name, reference in global_weights.items()
        if name in weights and (problem := _tensor_problem(name, weights[name], reference)) is not None
    ]
    if bad:
        problems.append(_listed(bad))
    return problems


def validate_update(global_weights: Mapping[str, np.ndarray], update: Update) -> None:
    """Check ``update`` against the global model; modifies nothing.

    Accepted when: the tensor names equal the global model's, each tensor is a
    numpy array of the same shape and dtype, every float value is finite,
    ``val_dice`` is a finite number in [0, 1], ``num_samples`` an integer > 0
    and ``metrics`` maps strings to numbers.

    Raises:
        UpdateRejected: naming the site and every problem found (missing and
            extra tensor names listed).
    """
    problems = _scalar_problems(update)
    if not isinstance(update.weights, Mapping):
        problems.append(f"weights is a {type(update.weights).__name__}, not a mapping of arrays")
    else:
        problems += _tensor_problems(global_weights, update.weights)
    if problems:
        raise UpdateRejected(str(update.site), "; ".join(problems))
