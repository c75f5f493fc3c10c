"""The names a study config uses for its aggregator and server optimiser, and the one function that builds them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields

from fedseg.errors import FedsegError
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.fedadam import AdamOptions, FedAdam
from fedseg.federation.strategies.mean import WEIGHTINGS, WeightedMean
from fedseg.federation.strategies.robust import CoordinateMedian, TrimmedMean
from fedseg.federation.strategies.screened import ScreenedAggregator
from fedseg.federation.strategies.screening import Screening
from fedseg.federation.strategies.secure import SecureMean
from fedseg.federation.strategies.store import UpdateStore

__all__ = ["AGGREGATORS", "SERVER_OPTIMIZERS", "make_aggregator"]

_Factory = Callable[[Screening | None, UpdateStore | None, float], ScreenedAggregator]


def _weighted(name: str) -> _Factory:
    return lambda screening, store, trim: WeightedMean(WEIGHTINGS[name], screening, store)


AGGREGATORS: Mapping[str, _Factory] = {
    **{name: _weighted(name) for name in WEIGHTINGS},
    CoordinateMedian.name: lambda screening, store, trim: CoordinateMedian(screening, store),
    TrimmedMean.name: lambda screening, store, trim: TrimmedMean(trim, screening, store),
}
"""``federation.aggregator`` names: the weightings of :class:`WeightedMean`, ``median`` and ``trimmed-mean``."""
SERVER_OPTIMIZERS: Mapping[str, type[FedAdam]] = {FedAdam.name: FedAdam}
"""``federation.server_optimizer`` names: each composed over the aggregator."""


def make_aggregator(
    name: str,
    server_optimizer: str | None = None,
    *,
    screening: Screening | None = None,
    store: UpdateStore | None = None,
    trim_fraction: float = 0.1,
    secure: bool = False,
    **options: float,
) -> Aggregator:
    """Build the aggregator a study config names, e.g. ``make_aggregator("dice-weighted", "fedadam", eta=0.1)``.

    ``options`` are the server optimiser's (see :class:`AdamOptions`); the
    aggregators themselves take ``screening`` (default: on), ``store`` (default:
    in memory) and, for ``trimmed-mean``, ``trim_fraction``. ``secure``: the
    study aggregates securely, so the weighting is applied at the sites and the
    server is handed the unmasked mean (:class:`SecureMean`); the robust
    aggregators need every update and are refused.

    Raises:
        FedsegError: unknown aggregator, server optimiser or option (the message
            lists the valid ones), or an option out of range.
    """
    if name not in AGGREGATORS:
        raise FedsegError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    if secure and name not in WEIGHTINGS:
        raise FedsegError(
            f"aggregator {name!r} needs every site's update, which secure aggregation hides from the server; "
            f"choose one of: {', '.join(WEIGHTINGS)}"
        )
    aggregator = SecureMean(name) if secure else AGGREGATORS[name](screening, store, trim_fraction)
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
