"""Server-side aggregation: how the sites' updates become the next global model.

Pure numpy: no torch, no network, no file I/O. One small module per idea::

    updates.py   Update, RoundResult, UpdateRejected, validate_update (every update is checked first)
    arrays.py    plain numpy helpers: the streaming RunningMean, dtype casts
    base.py      Aggregator: start_round / add / aggregate / finish, state_dict / load_state_dict
    mean.py      WeightedMean(weight_by=...): "dice-weighted", "sample-weighted", "uniform"
    fedadam.py   FedAdam: server optimiser composed over any aggregator (Reddi et al. 2021)
    registry.py  the config names and make_aggregator()

A rejected update raises :class:`UpdateRejected` and never touches the running
mean. Aggregation is streaming: memory does not grow with the number of sites.
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
    "SAMPLES",
    "SERVER_OPTIMIZERS",
    "UNIFORM",
    "WEIGHTINGS",
    "AdamOptions",
    "Aggregator",
    "FedAdam",
    "RoundResult",
    "Update",
    "UpdateRejected",
    "WeightedMean",
    "Weighting",
    "Weights",
    "make_aggregator",
    "validate_update",
]
