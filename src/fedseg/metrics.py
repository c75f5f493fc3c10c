"""Dice overlap (Sarma et al. 2021, Eq. 1) and per-case score summaries.

Pure functions over arrays: no file I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Summary", "dice_coefficient", "format_mean_sd", "summarize"]


def _foreground(mask: np.ndarray) -> np.ndarray:
    """Boolean view of ``mask``: non-zero voxels are foreground (no copy for bool input)."""
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask != 0


def dice_coefficient(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|A ∩ B| / (|A| + |B|) of two masks of the same shape.

    Any non-zero voxel counts as foreground (labels, probabilities > 0 and NaN
    alike), so threshold soft predictions before calling. Conventions for empty
    masks, where the formula is 0/0 or trivially 0:

    * both empty -> 1.0 (the model correctly found nothing);
    * exactly one empty -> 0.0.

    Raises:
        ValueError: if the shapes differ (the message names both).
    """
    pred = _foreground(prediction)
    true = _foreground(truth)
    if pred.shape != true.shape:
        raise ValueError(f"dice: prediction shape {pred.shape} != truth shape {true.shape}")
    # count_nonzero on bool arrays is far faster than .sum() on 512x512x60 volumes.
    size_pred = int(np.count_nonzero(pred))
    size_true = int(np.count_nonzero(true))
    total = size_pred + size_true
    if total == 0:
        return 1.0
    if size_pred == 0 or size_true == 0:
        return 0.0
    overlap = int(np.count_nonzero(np.logical_and(pred, true)))
    return 2.0 * overlap / total


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of a set of scores; ``sd`` is the sample SD (ddof=1), 0 for n=1."""

    n: int
    mean: float
    sd: float
    median: float
    min: float
    max: float


def summarize(values: Iterable[float]) -> Summary:
    """Summarise finite scores (e.g. per-case Dice) as n, mean, sample SD, median, min, max.

    Raises:
        ValueError: if ``values`` is empty or holds a non-finite number.
    """
    array = np.asarray(list(values), dtype=float).ravel()
    if array.size == 0:
        raise ValueError("summarize: no values")
    if not np.all(np.isfinite(array)):
        raise ValueError("summarize: values must be finite (got NaN or inf)")
    sd = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return Summary(
        n=int(array.size),
        mean=float(np.mean(array)),
        sd=sd,
        median=float(np.median(array)),
        min=float(np.min(array)),
        max=float(np.max(array)),
    )


def format_mean_sd(summary: Summary, digits: int = 3) -> str:
    """``"mean ± sd"`` with ``digits`` decimals, as in the paper's tables (``"0.925 ± 0.016"``)."""
    if digits < 0 or not math.isfinite(summary.mean):
        raise ValueError(f"format_mean_sd: bad digits {digits} or mean {summary.mean}")
    return f"{summary.mean:.{digits}f} ± {summary.sd:.{digits}f}"
