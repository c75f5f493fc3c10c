"""The narrow interface every aggregation strategy implements; the round loop that drives it lives in the protocol.

One round is::

    aggregator.start_round(global_weights)
    aggregator.add(update)        # once per site, in order of arrival
    result = aggregator.finish()  # RoundResult: new global weights + site weights

A strategy implements :meth:`Aggregator.start_round`, :meth:`Aggregator.add`
and :meth:`Aggregator.aggregate`; :meth:`Aggregator.finish` is written once
here. A strategy that keeps something between rounds (FedAdam's moments)
returns it from :meth:`Aggregator.state_dict` so the server can save it with
every round and give it back through :meth:`Aggregator.load_state_dict` after
a restart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import Weights, cast_like
from fedseg.federation.strategies.updates import RoundResult, Update

__all__ = ["Aggregator"]


class Aggregator(ABC):
    """Turns one round's site updates into the next global model.

    Attributes:
        name: the name used in the study config and in every message.
    """

    name: str

    def __init__(self) -> None:
        self._dtypes: dict[str, np.dtype] = {}

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round against ``global_weights``, discarding any unfinished one.

        The arrays are referenced, not copied: do not modify them until :meth:`finish`.
        Subclasses extend this (calling ``super().start_round`` first).
        """
        self._dtypes = {name: array.dtype for name, array in global_weights.items()}

    @abstractmethod
    def add(self, update: Update) -> float:
        """Validate ``update`` and fold it into the round; returns its raw weight.

        Raises:
            UpdateRejected: the update is invalid or its site already contributed;
                the round is then unchanged.
            FedsegError: no round is open.
        """

    @abstractmethod
    def aggregate(self) -> RoundResult:
        """Close the round; float tensors stay float64 (a server optimiser steps from this exact mean).

        Raises:
            FedsegError: no round is open or no update was added.
        """

    def finish(self) -> RoundResult:
        """Close the round and return the new global weights, each tensor in the global model's dtype.

        Raises:
            FedsegError: as :meth:`aggregate`.
        """
        result = self.aggregate()
        return replace(result, weights=cast_like(result.weights, self._dtypes))

    def state_dict(self) -> Weights | None:
        """What this strategy keeps between rounds, as flat arrays (safetensors-safe); None: nothing."""
        return None

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (an empty mapping resets it).

        Raises:
            FedsegError: this strategy keeps no state, yet ``state`` is not empty.
        """
        if state:
            raise FedsegError(f"{self.name} keeps nothing between rounds; cannot load a saved state ({len(state)} arrays)")

    def _closed(self) -> FedsegError:
        """The error of :meth:`add` or :meth:`aggregate` outside a round."""
        return FedsegError(f"{self.name}: no round is open; call start_round() first")
