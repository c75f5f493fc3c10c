"""FedAdam: an adaptive server optimiser composed over any aggregator (Reddi et al. 2021).

FedProx is not a server strategy: it is a client-side proximal term
``mu/2 ||w - w_global||²`` added to the local loss (:mod:`fedseg.training.fedprox`);
the server combines FedProx updates with any aggregator, FedAdam included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import Weights, float_names, is_float, is_real
from fedseg.federation.strategies.base import Aggregator
from fedseg.federation.strategies.mean import DICE, WeightedMean
from fedseg.federation.strategies.updates import RoundResult, Update

__all__ = ["AdamOptions", "FedAdam"]


@dataclass(frozen=True)
class AdamOptions:
    """Server-side Adam hyperparameters (Reddi et al. 2021, Algorithm 2).

    Attributes:
        eta: server learning rate (> 0).
        beta1: first-moment decay, in [0, 1).
        beta2: second-moment decay, in [0, 1).
        tau: adaptivity constant added to sqrt(v) (> 0).

    Raises:
        FedsegError: a value is out of range.
    """

    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("eta", "tau"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value <= 0:
                raise FedsegError(f"fedadam: {name} must be a number > 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not is_real(value) or not 0 <= value < 1:
                raise FedsegError(f"fedadam: {name} must be in [0, 1), got {value!r}")


class FedAdam(Aggregator):
    """Adam on the server, stepping from what an inner aggregator returns.

    With ``x`` the global float tensors and ``mean`` the inner aggregator's
    :meth:`~Aggregator.aggregate` (float64), each round does (no bias
    correction, as in the paper's Algorithm 2 and Flower's ``fedadam.py``;
    ``m`` and ``v`` start at 0)::

        delta = mean - x
        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta**2
        x = x + eta * m / (sqrt(v) + tau)

    Integer and bool tensors are taken from the inner result unchanged. The
    moments persist between rounds (float64) and, unlike Flower's, survive a
    server restart through :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        inner: the aggregator whose result is the pseudo-gradient's target
            (default: the Dice-weighted mean).
        options: the Adam hyperparameters.
    """

    name = "fedadam"

    def __init__(self, inner: Aggregator | None = None, options: AdamOptions | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else WeightedMean(DICE)
        self.options = options if options is not None else AdamOptions()
        self._m: Weights = {}
        self._v: Weights = {}
        self._global: Weights | None = None

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round (see :meth:`Aggregator.start_round`).

        Raises:
            FedsegError: the stored moments do not match the model's float tensors.
        """
        if self._m and float_names(global_weights) != {n: m.shape for n, m in self._m.items()}:
            raise FedsegError("fedadam: the stored moments do not match the model's float tensors")
        super().start_round(global_weights)
        self.inner.start_round(global_weights)
        self._global = dict(global_weights)

    def add(self, update: Update) -> float:
        """Fold ``update`` into the inner aggregator (see :meth:`Aggregator.add`)."""
        return self.inner.add(update)

    def aggregate(self) -> RoundResult:
        """The inner aggregator's result, moved by one Adam step from the global model."""
        if self._global is None:
            raise self._closed()
        mean = self.inner.aggregate()
        o, weights, m_new, v_new = self.options, dict(mean.weights), {}, {}
        for name, x in self._global.items():
            if not is_float(x):
                continue
            x64 = x.astype(np.float64)
            delta = mean.weights[name] - x64
            m = o.beta1 * self._m.get(name, 0.0) + (1 - o.beta1) * delta
            v = o.beta2 * self._v.get(name, 0.0) + (1 - o.beta2) * np.square(delta)
            weights[name] = x64 + o.eta * m / (np.sqrt(v) + o.tau)
            m_new[name], v_new[name] = m, v
        self._m, self._v, self._global = m_new, v_new, None
        return replace(mean, weights=weights)

    def state_dict(self) -> Weights:
        """The moments as flat arrays (``m/NAME``, ``v/NAME``), safe to save with safetensors."""
        state = {f"m/{n}": a.copy() for n, a in self._m.items()}
        state.update({f"v/{n}": a.copy() for n, a in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore moments saved by :meth:`state_dict` (an empty mapping resets them).

        Raises:
            FedsegError: unknown keys, unpaired m/v, mismatched shapes, non-finite
                values or a negative second moment.
        """
        m: Weights = {}
        v: Weights = {}
        for key, array in state.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise FedsegError(f"fedadam state: unexpected key {key!r} (expected m/NAME or v/NAME)")
            (m if kind == "m" else v)[name] = np.array(array, dtype=np.float64, copy=True)
        if m.keys() != v.keys() or any(m[n].shape != v[n].shape for n in m):
            raise FedsegError("fedadam state: first and second moments do not pair up")
        if not all(np.isfinite(a).all() for a in (*m.values(), *v.values())) or any((a < 0).any() for a in v.values()):
            raise FedsegError("fedadam state: moments must be finite and v >= 0")
        self._m, self._v = m, v
