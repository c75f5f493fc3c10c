"""The names a study config uses for its aggregator and server optimiser, and the one function that builds them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from fedseg.errors import FedsegError
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.fedadam import AdamOptions, FedAdam
from fedseg.federation.strategies.mean import WEIGHTINGS, WeightedMean, Weighting

__all__ = ["AGGREGATORS", "SERVER_OPTIMIZERS", "make_aggregator"]

AGGREGATORS: Mapping[str, Weighting] = WEIGHTINGS
"""``federation.aggregator`` names: each a weighting of :class:`WeightedMean`."""
SERVER_OPTIMIZERS: Mapping[str, type[FedAdam]] = {FedAdam.name: FedAdam}
"""``federation.server_optimizer`` names: each composed over the aggregator."""


def make_aggregator(name: str, server_optimizer: str | None = None, **options: float) -> Aggregator:
    """Build the aggregator a study config names, e.g. ``make_aggregator("dice-weighted", "fedadam", eta=0.1)``.

    ``options`` are the server optimiser's (see :class:`AdamOptions`); the
    weighted means take none.

    Raises:
        FedsegError: unknown aggregator, server optimiser or option (the message
            lists the valid ones), or an option out of range.
    """
    if name not in AGGREGATORS:
        raise FedsegError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    aggregator = WeightedMean(AGGREGATORS[name])
    if server_optimizer is None:
        if options:
            raise FedsegError(f"aggregator {name!r} takes no options (got {', '.join(options)})")
        return aggregator
    if server_optimizer not in SERVER_OPTIMIZERS:
        raise FedsegError(
            f"unknown server optimizer {server_optimizer!r}; choose one of: {', '.join(SERVER_OPTIMIZERS)}"
        )
    known = [f.name for f in fields(AdamOptions)]
    unknown = [key for key in options if key not in known]
    if unknown:
        raise FedsegError(f"{server_optimizer}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return SERVER_OPTIMIZERS[server_optimizer](aggregator, AdamOptions(**options))
