"""The round every built-in aggregator runs: validate and keep each update, then screen and combine them when the round closes.

::

    add(update)   validate_update, refuse a second update of a site, measure its change from the
                  global model, keep its tensors in the round's UpdateStore
    aggregate()   refuse oversized updates (Screening), normalise and cap the shares, then build
                  the new global model one tensor at a time: float tensors by the strategy's
                  combine(), integer/bool buffers by their element-wise lower median (a count a
                  site can inflate is not taken whole from any one site)

A strategy says only how much an update weighs (:meth:`ScreenedAggregator.raw_weight`)
and how one tensor's site values become the global one (:meth:`ScreenedAggregator.combine`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import Weights, is_float
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.screening import Screening, delta_norm, norm
from fedseg.federation.strategies.store import MemoryStore, UpdateStore
from fedseg.federation.strategies.updates import RoundResult, Update, UpdateRejected, validate_update

__all__ = ["ScreenedAggregator"]


@dataclass(frozen=True)
class _Kept:
    raw: float  # the strategy's weight of the update
    norm: float  # its change from the round's global model


def lower_median_elements(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise lower median of same-shaped arrays (each value is one of the sites' own)."""
    return np.sort(np.stack(arrays), axis=0)[(len(arrays) - 1) // 2]


class ScreenedAggregator(Aggregator):
    """An aggregator that keeps the round's updates, screens them and combines them tensor by tensor.

    Args:
        screening: the norm bound and share cap (default: both on, see :class:`Screening`).
        store: where the round's updates wait (default: in memory; the server passes a disk store).
    """

    uniform_if_all_zero = False  # every raw weight 0: average uniformly (with a note) instead of failing

    def __init__(self, screening: Screening | None = None, store: UpdateStore | None = None) -> None:
        super().__init__()
        self.screening = screening if screening is not None else Screening()
        self.store: UpdateStore = store if store is not None else MemoryStore()
        self._global: Weights | None = None
        self._kept: dict[str, _Kept] = {}
        self._previous_reference: float | None = None

    @abstractmethod
    def raw_weight(self, update: Update) -> float:
        """How much ``update`` counts before normalisation (finite, >= 0)."""

    @abstractmethod
    def combine(self, shape: tuple[int, ...], arrays: Iterator[np.ndarray], shares: list[float]) -> np.ndarray:
        """One float tensor of the new global model (float64, ``shape``) from the accepted sites' values and shares.

        ``arrays`` reads each site's value from the store when it is next asked for: a strategy that can fold
        them one at a time holds one at a time (a median must hold them all).
        """

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round (see :meth:`Aggregator.start_round`); any kept update is forgotten."""
        super().start_round(global_weights)
        self._global = dict(global_weights)
        self._kept = {}
        self.store.clear()

    def add(self, update: Update) -> float:
        """Validate ``update`` and keep it for the end of the round; returns its raw weight.

        Raises:
            UpdateRejected: invalid, a second update of its site this round, or a weight
                that is negative or not finite; nothing is kept.
            FedsegError: no round is open.
        """
        reference = self._open_round()
        validate_update(reference, update)
        if update.site in self._kept:
            raise UpdateRejected(update.site, "this site already contributed to the round")
        raw = float(self.raw_weight(update))
        if not math.isfinite(raw) or raw < 0:
            raise UpdateRejected(update.site, f"{self.name} weight {raw!r} is not a finite number >= 0")
        norm = delta_norm(reference, update.weights)
        self.store.put(update.site, update.weights)
        self._kept[update.site] = _Kept(raw, norm)
        return raw

    def aggregate(self) -> RoundResult:
        """Close the round: screen, weigh and combine (float tensors stay float64; see :meth:`Aggregator.aggregate`).

        Raises:
            FedsegError: no round is open, no update was added, or every weight is 0 and
                the strategy has no uniform fallback.
        """
        reference = self._open_round()
        if not self._kept:
            raise FedsegError(f"{self.name}: no update was added this round")
        norms = {site: kept.norm for site, kept in self._kept.items()}
        bound_reference, median, note = self.screening.norm_reference(norms, self._previous_reference, norm(reference))
        refused = self.screening.oversized(norms, bound_reference)
        accepted = [site for site in self._kept if site not in refused]
        raw = {site: self._kept[site].raw for site in accepted}
        shares, notes = self._shares(raw)
        shares, cap_notes = self.screening.capped(shares)
        # every update refused (possible only below three updates): the model stays; the round machine fails the round
        weights = (
            {name: self._tensor(name, array, accepted, shares) for name, array in reference.items()}
            if accepted else {name: np.array(array, dtype=np.float64 if is_float(array) else array.dtype) for name, array in reference.items()}
        )
        if median is not None:
            self._previous_reference = median
        self._global = None
        self.store.clear()
        notes = [*([note] if note else []), *notes, *cap_notes]
        return RoundResult(weights, shares, raw, accepted, notes, refused=refused, update_norms=norms)

    def _tensor(self, name: str, reference: np.ndarray, sites: list[str], shares: Mapping[str, float]) -> np.ndarray:
        arrays = (self.store.get(site, name) for site in sites)
        if is_float(reference):
            return self.combine(reference.shape, arrays, [shares[site] for site in sites])
        return lower_median_elements(list(arrays))

    def _shares(self, raw: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
        total = math.fsum(raw.values())
        if total > 0:
            return {site: w / total for site, w in raw.items()}, []
        if not self.uniform_if_all_zero:
            raise FedsegError(f"{self.name}: every site's weight is 0; cannot aggregate")
        note = f"{self.name}: every site's weight is 0; averaged the {len(raw)} sites uniformly"
        return {site: 1.0 / len(raw) for site in raw}, [note]

    def _open_round(self) -> Weights:
        if self._global is None:
            raise self._closed()
        return self._global
