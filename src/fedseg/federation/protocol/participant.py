"""What a site must do to take part in a study: the :class:`Participant` interface, numpy weights in, an update out.

The client pump (:mod:`fedseg.federation.transport.client`) calls these
methods in a worker thread, so they may block for as long as an epoch takes.
fedseg's own implementation is :class:`fedseg.site.TorchParticipant`; tests use
numpy participants. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["LocalUpdate", "Participant", "Weights"]

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalUpdate:
    """What a site sends back for one round: its weights, training-set size, validation Dice and scalar metrics."""

    weights: Weights
    num_samples: int  # training cases (what sample-weighted FedAvg weights by)
    val_dice: float  # in [0, 1]; a NaN (no validation cases) is refused when the UPDATE is built
    metrics: dict[str, float] = field(default_factory=dict)


class Participant(Protocol):
    """A site's side of the study, free of any network code."""

    def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
        """Train ``epochs`` local epochs of round ``round`` from the global ``weights``.

        FedProx (when the site uses it) anchors to these ``weights``: the round's global model.
        """
        ...

    def keep_model(self, name: str, round: int | None, weights: Weights, val_dice: float | None) -> None:
        """Keep the ``"final"`` or ``"best"`` global model sent at the end of the study."""
        ...

    def evaluate(self, weights: Weights) -> dict[str, float] | None:
        """Per-case test Dice of ``weights`` (case name -> Dice), or None when the site has no test evaluation."""
        ...
