"""Server-side aggregation: how the sites' updates become the next global model.

Pure numpy: no torch, no network, no file I/O. One small module per idea::

    updates.py   Update, RoundResult, UpdateRejected, validate_update (every update is checked first)
    arrays.py    plain numpy helpers: dtype tests and casts
    base.py      Aggregator: start_round / add / aggregate / finish, state_dict / load_state_dict
    store.py     UpdateStore: where a round's updates wait (MemoryStore here; a disk one in deploy)
    screening.py Screening: the norm bound and the share cap, decided when the round closes
    screened.py  ScreenedAggregator: keep, screen, then combine tensor by tensor
    mean.py      WeightedMean(weight_by=...): "dice-weighted", "sample-weighted", "uniform"
    robust.py    CoordinateMedian ("median"), TrimmedMean ("trimmed-mean")
    secure.py    SecureMean: handed the unmasked mean of a securely aggregated round (never an update)
    fedadam.py   FedAdam: server optimiser composed over any aggregator (Reddi et al. 2021)
    registry.py  the config names and make_aggregator()

A rejected update raises :class:`UpdateRejected` and is never kept; an update
the round's screening refuses is named in :attr:`RoundResult.refused`. The
round's updates are read back one tensor at a time, so with a disk store the
server's memory does not grow with the number of sites.
FedProx is client-side (:mod:`fedseg.training.fedprox`) and combines with any
aggregator here.
"""

from fedseg.federation.strategies.arrays import Weights
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.fedadam import AdamOptions, FedAdam
from fedseg.federation.strategies.mean import (
    DICE,
    SAMPLES,
    UNIFORM,
    WEIGHTINGS,
    WeightedMean,
    Weighting,
)
from fedseg.federation.strategies.robust import CoordinateMedian, TrimmedMean
from fedseg.federation.strategies.screened import ScreenedAggregator
from fedseg.federation.strategies.screening import NO_SCREENING, Screening
from fedseg.federation.strategies.secure import SecureMean, secure_mean_of
from fedseg.federation.strategies.store import MemoryStore, UpdateStore
from fedseg.federation.strategies.registry import (
    AGGREGATORS,
    SERVER_OPTIMIZERS,
    make_aggregator,
)
from fedseg.federation.strategies.updates import (
    RoundResult,
    Update,
    UpdateRejected,
    validate_update,
)

__all__ = [
    "AGGREGATORS",
    "DICE",
    "NO_SCREENING",
    "SAMPLES",
    "SERVER_OPTIMIZERS",
    "UNIFORM",
    "WEIGHTINGS",
    "AdamOptions",
    "Aggregator",
    "SecureMean",
    "secure_mean_of",
    "CoordinateMedian",
    "FedAdam",
    "MemoryStore",
    "RoundResult",
    "ScreenedAggregator",
    "Screening",
    "TrimmedMean",
    "Update",
    "UpdateRejected",
    "UpdateStore",
    "WeightedMean",
    "Weighting",
    "Weights",
    "make_aggregator",
    "validate_update",
]
