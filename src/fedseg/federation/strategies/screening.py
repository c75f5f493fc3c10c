"""What stops one site from taking over the global model: a bound on each update's size and a cap on each site's share.

Both are decided when the round closes, from statistics one site cannot move
alone:

* **Norm bound.** An update's size is the L2 norm of its change from the
  round's global model (float tensors). With three or more updates, an update
  more than ``max_norm_ratio`` times the round's *upper median* change is
  refused: a scaled (x1000) or exploded update stands out however the others
  trained, and while the honest sites are a majority a liar cannot move the
  median outside their own changes. (The upper, not the lower, median: late
  in a study of different sites, the sites closest to the global model barely
  change it, and the lower median of four — 0.09 against 3.1 and 2.9 in
  ``benchmarks/robustness.py`` — refused the honest sites farther away.)
  The reference never falls below ``norm_floor`` (0.5) times the global
  model's own norm: in a round where most sites barely move the model (one
  Adam step on a case without foreground), an honest site that moved it 700 x
  more — one Adam step at lr 1e-2 moves unet-small by 0.33 x its norm — was
  refused (tests/study, 3 cases per site; a floor of 0.05 still refused it).
  With the floor an update may change the model by up to 5 x 0.5 = 2.5 x its
  norm whatever the others did (the demo's honest first rounds: 1.9 x), while
  a sign-flipped x10 update (11 x) or a scaled one is still far beyond.
  With one or two updates no median is trustworthy: the previous round's
  median is used if there is one, else no bound applies (the result's notes
  say so; of two sites, neither can be told to be the honest one).
* **Share cap.** With three or more accepted updates no site's normalised
  weight exceeds ``max_site_share`` (default 1/2); the excess goes to the
  others in proportion to their weights (water-filling). A site claiming Dice
  1.0 or 2^63 samples gets at most that share.

Both are on by default; ``Screening(None, None)`` turns them off.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import is_float

__all__ = ["NO_SCREENING", "Screening", "cap_shares", "delta_norm", "norm", "upper_median"]

MIN_FOR_MEDIAN = 3  # fewer updates than this: one liar is half the sample or more


def _sum_of_squares(array: np.ndarray) -> float:
    # in float32 or the tensor's own wider precision: a screening threshold needs no more, and it halves the
    # memory traffic of a float64 copy (half-precision tensors are widened: their squares overflow at 65504)
    flat = array.ravel() if array.dtype.itemsize >= 4 else array.ravel().astype(np.float32)
    return float(np.dot(flat, flat))


def delta_norm(global_weights: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``weights - global_weights`` over the float tensors (inf if it overflows)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for name, reference in global_weights.items():
            if is_float(reference):
                total += _sum_of_squares(np.subtract(weights[name], reference))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def norm(weights: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the float tensors of ``weights``."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(_sum_of_squares(array) for array in weights.values() if is_float(array))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def upper_median(values: list[float]) -> float:
    """The upper median: an element of ``values`` (of an even count, the larger middle one)."""
    return float(statistics.median_high(values))


def cap_shares(shares: Mapping[str, float], cap: float) -> dict[str, float]:
    """``shares`` (summing to 1) with none above ``cap``, the excess spread over the others in proportion.

    Raises:
        FedsegError: ``cap`` is below 1/len(shares) (no way to satisfy it).
    """
    if cap * len(shares) < 1 - 1e-12:
        raise FedsegError(f"a share cap of {cap} cannot hold with {len(shares)} sites (needs >= 1/{len(shares)})")
    capped: dict[str, float] = {}
    free = dict(shares)
    while True:
        left = 1.0 - sum(capped.values())
        total = math.fsum(free.values())
        scaled = {site: (w / total * left if total > 0 else left / len(free)) for site, w in free.items()}
        over = [site for site, w in scaled.items() if w > cap]
        if not over:
            return {site: capped.get(site, scaled.get(site, 0.0)) for site in shares}
        for site in over:
            capped[site] = cap
            del free[site]


@dataclass(frozen=True)
class Screening:
    """The defaults of the round-closing checks (see the module docstring); None turns one off.

    Attributes:
        max_norm_ratio: refuse an update whose change exceeds this many times the round's reference change (>= 1; inf = off).
        max_site_share: no site's normalised weight above this, with three or more accepted updates (in (0, 1]).
        norm_floor: the reference change is the round's upper-median change, but at least this fraction of the
            global model's norm (>= 0).
    """

    max_norm_ratio: float | None = 5.0
    max_site_share: float | None = 0.5
    norm_floor: float = 0.5

    def __post_init__(self) -> None:
        ratio, share = self.max_norm_ratio, self.max_site_share
        if ratio is not None and not ratio >= 1:  # NaN fails too
            raise FedsegError(f"max_norm_ratio must be a number >= 1 (inf: no bound), got {ratio}")
        if ratio == math.inf:
            object.__setattr__(self, "max_norm_ratio", None)
        if share is not None and not (0 < share <= 1):
            raise FedsegError(f"max_site_share must be in (0, 1], got {share}")
        if not (math.isfinite(self.norm_floor) and self.norm_floor >= 0):
            raise FedsegError(f"norm_floor must be a number >= 0, got {self.norm_floor}")

    def norm_reference(
        self, norms: Mapping[str, float], previous: float | None, global_norm: float = 0.0
    ) -> tuple[float | None, float | None, str | None]:
        """(the change the bound is relative to, the round's own median or None, a note when it is not that median).

        With fewer than three updates there is no median a liar cannot move: the
        previous round's is used when there is one, else no bound applies (a
        two-site study cannot tell an honest outlier from a dishonest one).
        """
        if self.max_norm_ratio is None:
            return None, None, None
        floor = self.norm_floor * global_norm
        if len(norms) >= MIN_FOR_MEDIAN:
            median = upper_median(list(norms.values()))
            note = None if median >= floor else (
                f"norm bound from the floor ({self.norm_floor:g} x the model's norm): the median change is smaller"
            )
            return (max(median, floor) or None), median, note
        if previous is not None:
            note = f"norm bound from the previous round's median change ({len(norms)} update(s) this round)"
            return max(previous, floor) or None, None, note
        return None, None, f"no norm bound this round: {len(norms)} update(s), a median needs {MIN_FOR_MEDIAN}"

    def oversized(self, norms: Mapping[str, float], reference: float | None) -> dict[str, str]:
        """Site -> refusal reason for every update bigger than the bound."""
        if reference is None or self.max_norm_ratio is None:
            return {}
        bound = self.max_norm_ratio * reference
        return {
            site: (
                f"update norm {change:.4g} (change from the global model) exceeds {self.max_norm_ratio:g} x the round's "
                f"reference change {reference:.4g}"
            )
            for site, change in norms.items()
            if change > bound
        }

    def capped(self, shares: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
        """``shares`` under the cap, with a note naming the capped sites.

        The cap holds among the sites with a positive share (a site that reports
        Dice 0 keeps weight 0); with fewer than three of them it is at least
        1/their number, so it can always be met.
        """
        cap = self.max_site_share
        positive = {site: w for site, w in shares.items() if w > 0}
        if cap is None or len(shares) < MIN_FOR_MEDIAN or not positive or max(positive.values()) <= cap:
            return dict(shares), []
        capped = cap_shares(positive, max(cap, 1.0 / len(positive)))
        over = sorted(site for site, w in positive.items() if w > capped[site] + 1e-12)
        if not over:
            return dict(shares), []
        return {site: capped.get(site, 0.0) for site in shares}, [f"share of {', '.join(over)} capped at {capped[over[0]]:.4g}"]


NO_SCREENING = Screening(None, None)
"""No norm bound and no share cap (the paper's plain weighted mean)."""
