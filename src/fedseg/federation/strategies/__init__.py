"""Server-side aggregation: how the sites' updates become the next global model.

Pure numpy: no torch, no network, no file I/O. One round is::

    aggregator.start_round(global_weights)
    aggregator.add(update)        # once per site, in order of arrival
    result = aggregator.finish()  # RoundResult: new global weights + site weights

Every update is checked by :func:`validate_update` first; a rejected one
raises :class:`UpdateRejected` and never touches the running sum. Aggregation
is streaming: each update is folded into one float64 accumulator per tensor
as it arrives, so memory does not grow with the number of sites.

    Aggregator (ABC)   streaming weighted mean; subclasses choose site_weight()
    ├── DiceWeighted   "dice-weighted": weight = validation Dice (Sarma et al. 2021)
    ├── SampleWeighted "sample-weighted": weight = training samples (FedAvg)
    ├── Uniform        "uniform": weight = 1
    └── FedAdam        server optimiser around any of the above (Reddi et al. 2021)

FedProx is not here: it is a client-side proximal term ``mu/2 ||w - w_global||²``
added to the local loss (a loss wrapper in :mod:`fedseg.training`); the server
combines FedProx updates with any aggregator of this module.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import ClassVar

import numpy as np

from fedseg.errors import FedsegError

__all__ = [
    "AGGREGATORS",
    "SERVER_OPTIMIZERS",
    "AdamOptions",
    "Aggregator",
    "DiceWeighted",
    "FedAdam",
    "RoundResult",
    "SampleWeighted",
    "Uniform",
    "Update",
    "UpdateRejected",
    "Weights",
    "make_aggregator",
    "validate_update",
]

Weights = dict[str, np.ndarray]
"""A model state dict as numpy arrays (float tensors, plus integer/bool buffers)."""

_MAX_LISTED = 5  # problems named in one rejection message


class UpdateRejected(FedsegError):
    """A site's update failed :func:`validate_update`; ``site`` and ``reason`` say why."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"update from site {site!r} rejected: {reason}")
        self.site = site
        self.reason = reason


@dataclass(frozen=True)
class Update:
    """What one site returns after a round of local training.

    Attributes:
        site: the site's identity (its certificate name).
        weights: its model state dict, same names/shapes/dtypes as the global model.
        num_samples: training samples it used (> 0).
        val_dice: its latest validation Dice, in [0, 1].
        metrics: other declared scalars (e.g. loss), passed through, never aggregated here.
    """

    site: str
    weights: Weights
    num_samples: int
    val_dice: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round.

    Attributes:
        weights: the new global weights, each tensor in its original dtype.
        site_weights: normalised aggregation weight per site (sums to 1).
        raw_weights: each site's weight before normalisation (``site_weight``).
        sites: the sites that contributed, in order of arrival.
        notes: human-readable remarks for the run log (e.g. a uniform fallback).
    """

    weights: Weights
    site_weights: dict[str, float]
    raw_weights: dict[str, float]
    sites: list[str]
    notes: list[str] = field(default_factory=list)


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _scalar_problems(update: Update) -> list[str]:
    problems = [] if isinstance(update.site, str) and update.site else [f"site {update.site!r} is not a name"]
    dice = update.val_dice
    if not _is_real(dice) or not math.isfinite(dice) or not 0.0 <= dice <= 1.0:
        problems.append(f"val_dice {dice!r} is not a finite number in [0, 1]")
    n = update.num_samples
    if not isinstance(n, Integral) or isinstance(n, bool) or n <= 0:
        problems.append(f"num_samples {n!r} is not an integer > 0")
    if not isinstance(update.metrics, Mapping) or not all(
        isinstance(k, str) and _is_real(v) for k, v in update.metrics.items()
    ):
        problems.append("metrics must map names to numbers")
    return problems


def _tensor_problems(global_weights: Mapping[str, np.ndarray], weights: Mapping[str, object]) -> list[str]:
    problems = []
    missing = [name for name in global_weights if name not in weights]
    extra = [name for name in weights if name not in global_weights]
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listed(extra)}")
    bad = []
    for name, reference in global_weights.items():
        if name not in weights:
            continue
        tensor = weights[name]
        if not isinstance(tensor, np.ndarray):
            bad.append(f"{name} is a {type(tensor).__name__}, not a numpy array")
        elif tensor.shape != reference.shape:
            bad.append(f"{name} has shape {tensor.shape}, expected {reference.shape}")
        elif tensor.dtype != reference.dtype:
            bad.append(f"{name} has dtype {tensor.dtype}, expected {reference.dtype}")
        elif _is_float(tensor) and not np.isfinite(tensor).all():
            bad.append(f"{name} has non-finite values (NaN or inf)")
    if bad:
        problems.append(_listed(bad))
    return problems


def validate_update(global_weights: Mapping[str, np.ndarray], update: Update) -> None:
    """Check ``update`` against the global model; modifies nothing.

    Accepted when: the tensor names equal the global model's, each tensor is a
    numpy array of the same shape and dtype, every float value is finite,
    ``val_dice`` is a finite number in [0, 1], ``num_samples`` an integer > 0
    and ``metrics`` maps strings to numbers.

    Raises:
        UpdateRejected: naming the site and every problem found (missing and
            extra tensor names listed).
    """
    problems = _scalar_problems(update)
    if not isinstance(update.weights, Mapping):
        problems.append(f"weights is a {type(update.weights).__name__}, not a mapping of arrays")
    else:
        problems += _tensor_problems(global_weights, update.weights)
    if problems:
        raise UpdateRejected(str(update.site), "; ".join(problems))


@dataclass
class _RunningSum:
    """One round's state: a float64 accumulator per float tensor plus O(1) per site.

    The weighted mean is kept incrementally, ``mean += w / W * (x - mean)``,
    rather than as ``sum(w x) / sum(w)``: no ``w * x`` product can underflow
    (hypothesis found Dice 2e-308 times 4e-38 rounding to 0), and identical
    updates leave the mean bit-for-bit equal to them.

    While every weight so far is 0, updates are averaged uniformly (weight 1)
    so an all-zero round can fall back to a plain mean; the first positive
    weight restarts the mean, which is exact because zero-weight updates add
    nothing to a weighted mean.
    """

    reference: Weights  # the global model the updates are checked against
    means: Weights  # float tensors: running weighted mean, float64
    total: float = 0.0  # sum of effective weights
    raw_total: float = 0.0  # sum of raw weights
    raw: dict[str, float] = field(default_factory=dict)  # site -> raw weight, in arrival order
    exact: Weights = field(default_factory=dict)  # non-float tensors of the heaviest site
    heaviest: tuple[float, str] | None = None  # (raw weight, site) that ``exact`` came from

    def fold(self, update: Update, raw: float) -> None:
        if raw > 0 and self.raw_total == 0.0 and self.raw:
            for mean in self.means.values():
                mean.fill(0.0)
            self.total = 0.0
        weight = raw if raw > 0 or self.raw_total > 0 else 1.0
        if weight:
            self.total += weight
            share = weight / self.total
            for name, mean in self.means.items():
                mean += share * (update.weights[name].astype(np.float64) - mean)
        self.raw[update.site] = raw
        self.raw_total += raw
        # Heaviest site wins; ties go to the smallest name, so arrival order never matters.
        best = self.heaviest
        if best is None or raw > best[0] or (raw == best[0] and update.site < best[1]):
            self.heaviest = (raw, update.site)
            self.exact = {n: np.array(a, copy=True) for n, a in update.weights.items() if n not in self.means}


class Aggregator(ABC):
    """Streaming weighted mean of site updates; subclasses define :meth:`site_weight`.

    Float tensors become ``sum_i w_i x_i / sum_i w_i`` (accumulated in float64,
    cast back to each tensor's dtype). Integer and bool tensors (e.g.
    BatchNorm's ``num_batches_tracked``) are taken whole from the site with the
    largest weight: a mean of counters or indices is not a valid value of
    either, and one site's buffer is at least consistent with its own weights.

    Attributes:
        name: the registry name used in the study config.
        uniform_if_all_zero: if every raw weight of a round is 0, average
            uniformly (with a note) instead of raising.
    """

    name: ClassVar[str]
    uniform_if_all_zero: ClassVar[bool] = False

    def __init__(self) -> None:
        self._running: _RunningSum | None = None

    @abstractmethod
    def site_weight(self, update: Update) -> float:
        """The raw (unnormalised) weight of a validated update: finite and >= 0."""

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round against ``global_weights``, discarding any unfinished one.

        The arrays are referenced, not copied: do not modify them until :meth:`finish`.
        """
        reference = dict(global_weights)
        means = {n: np.zeros(a.shape, dtype=np.float64) for n, a in reference.items() if _is_float(a)}
        self._running = _RunningSum(reference=reference, means=means)

    def add(self, update: Update) -> float:
        """Validate ``update`` and fold it into the running sum; returns its raw weight.

        Raises:
            UpdateRejected: the update is invalid, its site already contributed
                this round, or its weight is negative or not finite; the running
                sum is then unchanged.
            FedsegError: no round is open.
        """
        running = self._open_round()
        validate_update(running.reference, update)
        if update.site in running.raw:
            raise UpdateRejected(update.site, "this site already contributed to the round")
        raw = float(self.site_weight(update))
        if not math.isfinite(raw) or raw < 0:
            raise UpdateRejected(update.site, f"{self.name} weight {raw!r} is not a finite number >= 0")
        running.fold(update, raw)
        return raw

    def finish(self) -> RoundResult:
        """Close the round and return the new global weights (original dtypes).

        Raises:
            FedsegError: no round is open, no update was added, or every weight is
                0 and the aggregator has no uniform fallback.
        """
        result, dtypes = self._finish_exact()
        # asarray: arithmetic on 0-d arrays yields numpy scalars; keep every tensor an ndarray.
        cast = {name: np.asarray(array, dtype=dtypes[name]) for name, array in result.weights.items()}
        return replace(result, weights=cast)

    def _finish_exact(self) -> tuple[RoundResult, dict[str, np.dtype]]:
        """Like :meth:`finish`, with float tensors left in float64; also returns the dtypes."""
        running = self._open_round()
        if not running.raw:
            raise FedsegError(f"{self.name}: no update was added this round")
        raw_total, notes = math.fsum(running.raw.values()), []
        if raw_total > 0:
            site_weights = {site: w / raw_total for site, w in running.raw.items()}
        elif self.uniform_if_all_zero:
            site_weights = {site: 1.0 / len(running.raw) for site in running.raw}
            notes.append(f"{self.name}: every site's weight is 0; averaged the {len(running.raw)} sites uniformly")
        else:
            raise FedsegError(f"{self.name}: every site's weight is 0; cannot aggregate")
        weights = {
            name: running.means[name] if name in running.means else running.exact[name]
            for name in running.reference
        }
        dtypes = {name: array.dtype for name, array in running.reference.items()}
        self._running = None
        result = RoundResult(weights, site_weights, dict(running.raw), list(running.raw), notes)
        return result, dtypes

    def _open_round(self) -> _RunningSum:
        if self._running is None:
            raise FedsegError(f"{self.name}: no round is open; call start_round() first")
        return self._running


class DiceWeighted(Aggregator):
    """Each site weighted by its latest validation Dice (Sarma et al., JAMIA 2021).

    If every site reports Dice 0 (e.g. round 1 of an untrained network) the
    weights are undefined (0/0); the round is then averaged uniformly and
    :attr:`RoundResult.notes` says so.
    """

    name = "dice-weighted"
    uniform_if_all_zero = True

    def site_weight(self, update: Update) -> float:
        return float(update.val_dice)


class SampleWeighted(Aggregator):
    """FedAvg (McMahan et al. 2017): each site weighted by its training samples."""

    name = "sample-weighted"

    def site_weight(self, update: Update) -> float:
        return float(update.num_samples)


class Uniform(Aggregator):
    """Every site counts the same."""

    name = "uniform"

    def site_weight(self, update: Update) -> float:
        return 1.0


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
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise FedsegError(f"fedadam: {name} must be a number > 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                raise FedsegError(f"fedadam: {name} must be in [0, 1), got {value!r}")


class FedAdam(Aggregator):
    """Adaptive server optimiser on top of a weighting aggregator (Reddi et al. 2021).

    With ``x`` the global float tensors and ``mean`` the inner aggregator's
    result, each round does (no bias correction, as in the paper's Algorithm 2
    and Flower's ``fedadam.py``; ``m`` and ``v`` start at 0)::

        delta = mean - x
        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta**2
        x = x + eta * m / (sqrt(v) + tau)

    Integer and bool tensors are taken from the inner result unchanged. The
    moments persist between rounds (float64) and, unlike Flower's, survive a
    server restart through :meth:`state_dict` / :meth:`load_state_dict`.
    """

    name = "fedadam"

    def __init__(self, inner: Aggregator | None = None, options: AdamOptions | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else DiceWeighted()
        self.options = options if options is not None else AdamOptions()
        self._m: Weights = {}
        self._v: Weights = {}
        self._global: Weights | None = None

    def site_weight(self, update: Update) -> float:
        return self.inner.site_weight(update)

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round (see :meth:`Aggregator.start_round`).

        Raises:
            FedsegError: the stored moments do not match the model's float tensors.
        """
        floats = {n: a.shape for n, a in global_weights.items() if _is_float(a)}
        if self._m and floats != {n: m.shape for n, m in self._m.items()}:
            raise FedsegError("fedadam: the stored moments do not match the model's float tensors")
        self.inner.start_round(global_weights)
        self._global = dict(global_weights)

    def add(self, update: Update) -> float:
        """Fold ``update`` into the inner aggregator (see :meth:`Aggregator.add`)."""
        return self.inner.add(update)

    def _finish_exact(self) -> tuple[RoundResult, dict[str, np.dtype]]:
        if self._global is None:
            raise FedsegError(f"{self.name}: no round is open; call start_round() first")
        mean, dtypes = self.inner._finish_exact()
        o, weights, m_new, v_new = self.options, dict(mean.weights), {}, {}
        for name, x in self._global.items():
            if not _is_float(x):
                continue
            x64 = x.astype(np.float64)
            delta = mean.weights[name] - x64
            m = o.beta1 * self._m.get(name, 0.0) + (1 - o.beta1) * delta
            v = o.beta2 * self._v.get(name, 0.0) + (1 - o.beta2) * np.square(delta)
            weights[name] = x64 + o.eta * m / (np.sqrt(v) + o.tau)
            m_new[name], v_new[name] = m, v
        self._m, self._v, self._global = m_new, v_new, None
        return replace(mean, weights=weights), dtypes

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


AGGREGATORS: dict[str, type[Aggregator]] = {
    DiceWeighted.name: DiceWeighted,
    SampleWeighted.name: SampleWeighted,
    Uniform.name: Uniform,
}
SERVER_OPTIMIZERS: dict[str, type[FedAdam]] = {FedAdam.name: FedAdam}


def make_aggregator(name: str, server_optimizer: str | None = None, **options: float) -> Aggregator:
    """Build the aggregator a study config names, e.g. ``make_aggregator("dice-weighted", "fedadam", eta=0.1)``.

    ``options`` are the server optimiser's (see :class:`AdamOptions`); the
    weighting aggregators take none.

    Raises:
        FedsegError: unknown aggregator, server optimiser or option (the message
            lists the valid ones), or an option out of range.
    """
    if name not in AGGREGATORS:
        raise FedsegError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    aggregator = AGGREGATORS[name]()
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
