"""What server and sites agree on for secure aggregation: the threshold, the weights, the clip bound, the ring's scale."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseg.federation.protocol.secagg.masking import CHUNK, Ring

__all__ = ["DICE_FLOOR", "MAX_SAMPLE_WEIGHT", "SecureSettings", "float_norm", "update_change"]

DICE_FLOOR = 1e-3  # a Dice-weighted site weighs at least this: the server cannot see a round where every Dice is 0
MAX_SAMPLE_WEIGHT = 2**20  # sample-weighted: a site's weight is its sample count, at most this
WEIGHTINGS = ("dice-weighted", "sample-weighted", "uniform")


@dataclass(frozen=True)
class SecureSettings:
    """``[federation]``'s secure-aggregation settings, the same at the server and at every site (sent in WELCOME).

    Attributes:
        weighting: how a site weighs its own update before masking (the aggregator's name).
        clip_ratio: each site scales its change from the global model down to at most this times the
            global model's norm (float tensors, L2; at least 1) before masking: the bound the server can no
            longer check.
        threshold: shares needed to unmask; None: a majority of the round's roster (at least 2).
        ring_bits: 64 (the default: the sum is exact to float64's precision, the model the same as the
            plain weighted mean's) or 32 (half the bytes on the wire, a coarser fixed point; refused where
            fewer than 16 fraction bits would be left). docs/benchmarks.md measures both.
    """

    weighting: str = "dice-weighted"
    clip_ratio: float = 2.5
    threshold: int | None = None
    ring_bits: int = 64

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"secure aggregation weights by {', '.join(WEIGHTINGS)}, not {self.weighting!r}")
        if not (math.isfinite(self.clip_ratio) and self.clip_ratio > 0):
            raise ValueError(f"clip_ratio must be a finite number > 0, got {self.clip_ratio!r}")
        if self.threshold is not None and self.threshold < 2:
            raise ValueError(f"the secure-aggregation threshold must be >= 2, got {self.threshold}")
        Ring(self.ring_bits)  # 32 or 64

    def threshold_for(self, roster_size: int) -> int:
        """Shares needed to unmask a round whose roster has ``roster_size`` sites."""
        return self.threshold if self.threshold is not None else max(2, roster_size // 2 + 1)

    @property
    def max_weight(self) -> float:
        return float(MAX_SAMPLE_WEIGHT) if self.weighting == "sample-weighted" else 1.0

    def weight(self, num_samples: int, val_dice: float) -> float:
        """This site's aggregation weight (the server only ever learns the sum of them)."""
        if self.weighting == "dice-weighted":
            return max(float(val_dice), DICE_FLOOR)
        if self.weighting == "sample-weighted":
            return float(min(int(num_samples), MAX_SAMPLE_WEIGHT))
        return 1.0

    def clip_norm(self, global_weights: Mapping[str, np.ndarray]) -> float:
        """The bound on a site's change: ``clip_ratio`` x the global model's norm (a norm below 1 counts as 1,
        so a model initialised at zero can still move)."""
        return self.clip_ratio * max(float_norm(global_weights), 1.0)

    def scale(self, clip_norm: float, roster_size: int) -> tuple[Ring, int]:
        """The round's ring and fixed-point fraction bits: every weighted, clipped value (and every scalar) is
        within ±max_weight x max(clip_norm, 1).

        Raises:
            ValueError: the configured ring cannot hold the values with 16 fraction bits.
        """
        ring = Ring(self.ring_bits)
        return ring, ring.fraction_bits(self.max_weight * max(clip_norm, 1.0), roster_size)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"weighting": self.weighting, "clip_ratio": self.clip_ratio}
        if self.ring_bits != 64:  # the default's settings read as before the option existed
            body["ring_bits"] = self.ring_bits
        if self.threshold is not None:
            body["threshold"] = self.threshold
        return body


def _floats(weights: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(name for name, array in weights.items() if np.asarray(array).dtype.kind == "f")


def _sum_of_squares(flat: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Σ (flat - reference)² in float64, one chunk at a time (no model-sized float64 copy)."""
    total = 0.0
    for start in range(0, flat.size, CHUNK):
        part = flat[start : start + CHUNK].astype(np.float64)
        if reference is not None:
            part -= reference[start : start + CHUNK]
        total += float(np.dot(part, part))
    return total


def float_norm(weights: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the float tensors, in float64, in name order."""
    return math.sqrt(sum(_sum_of_squares(np.asarray(weights[name]).ravel()) for name in _floats(weights)))


def update_change(weights: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``weights - global_weights`` over the float tensors."""
    return math.sqrt(sum(
        _sum_of_squares(np.asarray(weights[name]).ravel(), np.asarray(global_weights[name]).ravel())
        for name in _floats(global_weights)
    ))
