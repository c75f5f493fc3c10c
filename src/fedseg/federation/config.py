"""A federated study's configuration: one TOML file with three tables.

```toml
[federation]             # the server's side (FederationConfig)
rounds = 40
local_epochs = 1         # local epochs per round (the paper: 1)
min_sites = 2            # default: every site
aggregator = "dice-weighted"   # or sample-weighted, uniform
server_optimizer = "fedadam"   # optional
server_optimizer_options = { eta = 0.01 }   # optional: eta, beta1, beta2, tau
round_timeout_s = 3600.0
grace_s = 60.0
fedprox_mu = 0.0         # > 0: FedProx proximal term in every site's local loss
evaluate = true          # at the end, every site tests the final model on its held-out cases

[train]                  # every site's local trainer (TrainConfig)
[prepare]                # preprocessing (PrepareConfig)
```

Unknown keys are errors (a typo must not silently fall back to a default).

Error messages avoid square brackets: the CLI prints them with rich, which
would take ``[federation]`` for markup.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.federation.strategies import AGGREGATORS, SERVER_OPTIMIZERS, Aggregator, make_aggregator
from fedseg.training.config import TrainConfig, read_toml

__all__ = ["FederationConfig", "StudyConfig", "load_study_config", "read_toml"]


@dataclass(frozen=True)
class FederationConfig:
    """The server's settings of a study (the ``[federation]`` table).

    Attributes:
        rounds: number of rounds.
        local_epochs: local epochs each site trains per round (the paper: 1).
        min_sites: quorum; None = every site of the study.
        aggregator: ``dice-weighted`` (the paper), ``sample-weighted`` or ``uniform``.
        server_optimizer: None, or ``fedadam``.
        server_optimizer_options: the server optimiser's settings (FedAdam: eta, beta1, beta2, tau).
        round_timeout_s: a site that has not answered a round by then is left out of it.
        grace_s: once the quorum is connected, how long to wait for the others.
        fedprox_mu: FedProx coefficient used by the clients (0 = off).
        evaluate: after the last round, each site tests the final model on its
            held-out test cases and returns per-case Dice (kept in evaluation.json).
    """

    rounds: int = 40
    local_epochs: int = 1
    min_sites: int | None = None
    aggregator: str = "dice-weighted"
    server_optimizer: str | None = None
    server_optimizer_options: dict[str, float] = field(default_factory=dict)
    round_timeout_s: float = 3600.0
    grace_s: float = 60.0
    fedprox_mu: float = 0.0
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise FedsegError(f"federation.rounds must be an integer >= 1, got {self.rounds!r}")
        if type(self.local_epochs) is not int or self.local_epochs < 1:
            raise FedsegError(f"federation.local_epochs must be an integer >= 1, got {self.local_epochs!r}")
        if self.min_sites is not None and (not isinstance(self.min_sites, int) or self.min_sites < 1):
            raise FedsegError(f"federation.min_sites must be an integer >= 1, got {self.min_sites!r}")
        if self.aggregator not in AGGREGATORS:
            raise FedsegError(f"federation.aggregator: unknown {self.aggregator!r}; choose one of: {', '.join(AGGREGATORS)}")
        if self.server_optimizer is not None and self.server_optimizer not in SERVER_OPTIMIZERS:
            raise FedsegError(
                f"federation.server_optimizer: unknown {self.server_optimizer!r}; choose one of: {', '.join(SERVER_OPTIMIZERS)}"
            )
        for name in ("round_timeout_s", "grace_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
                raise FedsegError(f"federation.{name} must be a positive number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.fedprox_mu, int | float) or not (math.isfinite(self.fedprox_mu) and self.fedprox_mu >= 0):
            raise FedsegError(f"federation.fedprox_mu must be >= 0, got {self.fedprox_mu!r}")
        object.__setattr__(self, "fedprox_mu", float(self.fedprox_mu))
        if not isinstance(self.evaluate, bool):
            raise FedsegError(f"federation.evaluate must be true or false, got {self.evaluate!r}")
        if not isinstance(self.server_optimizer_options, dict):
            raise FedsegError("federation.server_optimizer_options must be a table, e.g. { eta = 0.01 }")
        if self.server_optimizer_options and self.server_optimizer is None:
            raise FedsegError("federation.server_optimizer_options is set but federation.server_optimizer is not")
        try:
            self.make_aggregator()
        except (FedsegError, TypeError, ValueError) as exc:
            raise FedsegError(f"federation.server_optimizer_options: {exc}") from exc

    def make_aggregator(self) -> Aggregator:
        """A fresh aggregator as configured (a new one per run)."""
        return make_aggregator(self.aggregator, self.server_optimizer, **self.server_optimizer_options)

    def quorum(self, n_sites: int) -> int:
        """``min_sites``, or every site when unset."""
        return n_sites if self.min_sites is None else self.min_sites

    def replace(self, **changes: Any) -> FederationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FederationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedsegError(f"{source}: unknown option(s) in the federation table {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study's TOML file says."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def to_toml(self) -> str:
        """This configuration as a study TOML file (unset options left out, so defaults apply)."""
        train = self.train.to_dict()
        augment = train.pop("augment")
        tables = [
            ("federation", self.federation.to_dict()),
            ("train", train),
            ("train.augment", augment),
            ("prepare", asdict(self.prepare)),
        ]
        return "\n".join(f"[{name}]\n" + _toml_lines(values) for name, values in tables)

    def site_settings(self, fold: int) -> dict[str, Any]:
        """What every site must share with the server (sent in WELCOME; threads, device and the like are each machine's own)."""
        train = self.train.without_machine_options()
        return {"fold": fold, "fedprox_mu": self.federation.fedprox_mu, "train": train, "prepare": asdict(self.prepare)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise FedsegError(f"{value!r} cannot be written to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    raise FedsegError(f"cannot write {value!r} to TOML")


def _toml_lines(values: dict[str, Any]) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items() if value is not None)


def load_study_config(path: Path | None) -> StudyConfig:
    """Read ``[federation]``, ``[train]`` and ``[prepare]`` from ``path`` (defaults when None).

    Raises:
        FedsegError: unreadable TOML, an unknown table or key, a value out of range.
    """
    if path is None:
        return StudyConfig()
    data = read_toml(path)
    unknown = sorted(set(data) - {"federation", "train", "prepare"})
    if unknown:
        raise FedsegError(f"{path}: unknown table(s) {unknown}; a study config has the tables federation, train and prepare")
    for name in ("federation", "train", "prepare"):
        if not isinstance(data.get(name, {}), dict):
            raise FedsegError(f"{path}: {name} must be a TOML table")
    federation = FederationConfig.from_dict(data.get("federation", {}), source=str(path))
    train = TrainConfig.from_dict(data.get("train", {}), source=str(path))
    try:
        prepare = PrepareConfig(**data.get("prepare", {}))
    except TypeError as exc:
        raise FedsegError(f"{path}: [prepare] {exc}") from exc
    return StudyConfig(federation, train, prepare)
