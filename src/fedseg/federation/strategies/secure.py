"""The aggregator of a securely aggregated study: it is handed the unmasked weighted mean, never an update.

Under secure aggregation (:mod:`fedseg.federation.protocol.secagg`) the server
never holds one site's weights, so :meth:`SecureMean.add` refuses every
update; the round machine hands over the weighted mean the masked sum gave
(:meth:`SecureMean.set_mean`), and FedAdam composes over it as over any
aggregator. Integer buffers (BatchNorm's ``num_batches_tracked``) are not
aggregated: the global model keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import Weights, is_float
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.updates import RoundResult, Update, UpdateRejected

__all__ = ["SecureMean", "secure_mean_of"]


class SecureMean(Aggregator):
    """The weighted mean a secure round unmasked (``name``: the weighting the sites applied before masking)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._global: Weights | None = None
        self._result: RoundResult | None = None

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        super().start_round(global_weights)
        self._global, self._result = dict(global_weights), None

    def add(self, update: Update) -> float:
        raise UpdateRejected(update.site, "this study aggregates securely: the server takes masked updates only")

    def set_mean(self, mean: Mapping[str, np.ndarray], sites: list[str], sums: Mapping[str, float], notes: list[str]) -> None:
        """The round's unmasked weighted mean of the float tensors (float64) and the sums of the sites' scalars."""
        if self._global is None:
            raise self._closed()
        weights = {name: (np.asarray(mean[name], dtype=np.float64) if is_float(array) else array) for name, array in self._global.items()}
        self._result = RoundResult(weights, {}, {}, list(sites), list(notes), secure_sums=dict(sums))

    def aggregate(self) -> RoundResult:
        if self._global is None or self._result is None:
            raise FedsegError(f"{self.name}: no unmasked sum for this round")
        result, self._global, self._result = self._result, None, None
        return result


def secure_mean_of(aggregator: Aggregator) -> SecureMean:
    """The :class:`SecureMean` inside ``aggregator`` (itself, or the one a server optimiser wraps)."""
    found: object = aggregator
    while not isinstance(found, SecureMean):
        found = getattr(found, "inner", None)
        if found is None:
            raise FedsegError(f"{aggregator.name} cannot aggregate securely")
    return found
