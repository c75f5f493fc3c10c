"""A federated study's configuration: one TOML file with three tables.

```toml
[federation]             # the server's side (FederationConfig)
rounds = 40
local_epochs = 1         # local epochs per round (the paper: 1)
min_sites = 2            # default: every site
aggregator = "dice-weighted"   # or sample-weighted, uniform, median, trimmed-mean
max_norm_ratio = 5.0     # refuse an update changing the model > 5 x the round's reference change (inf: off)
norm_floor = 0.5         # the reference: the median change, but at least 0.5 x the global model's norm
max_site_share = 0.5     # with >= 3 sites no site weighs more than this (1: off)
trim_fraction = 0.1      # trimmed-mean: share of sites dropped at each end per coordinate
server_optimizer = "fedadam"   # optional
server_optimizer_options = { eta = 0.01 }   # optional: eta, beta1, beta2, tau
round_timeout_s = 3600.0
grace_s = 60.0
fedprox_mu = 0.0         # > 0: FedProx proximal term in every site's local loss
evaluate = true          # at the end, every site tests the final model on its held-out cases
secure_aggregation = false   # true: the server learns only the weighted sum of the updates (protocol/secagg)
secure_threshold = 2     # secure aggregation: shares needed to unmask (default: a majority of the round's sites)
clip_ratio = 2.5         # secure aggregation: each site clips its change to 2.5 x the global model's norm
secure_ring_bits = 64    # secure aggregation: 64 (exact) or 32 (the bytes of float32 weights, a coarser fixed point)

[train]                  # every site's local trainer (TrainConfig)
[prepare]                # preprocessing (PrepareConfig)
```

Unknown tables and keys are errors (a typo must not silently fall back to a
default); every table is a :class:`fedseg.schema.Table`, so a mistake reads
``study.toml: federation.rounds must be an integer >= 1, got 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.federation.protocol.secagg import SecureSettings
from fedseg.federation.strategies import (
    AGGREGATORS,
    SERVER_OPTIMIZERS,
    WEIGHTINGS,
    Aggregator,
    Screening,
    UpdateStore,
    make_aggregator,
)
from fedseg.schema import Bool, Integer, Number, Table, Text, must_be, read_toml, toml_text
from fedseg.training.config import TrainConfig

__all__ = ["FederationConfig", "StudyConfig", "load_study_config", "read_toml"]


Count = Annotated[Integer, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True), must_be("a positive number of seconds")]


class FederationConfig(Table):
    """The server's settings of a study (the ``[federation]`` table).

    Attributes:
        rounds: number of rounds.
        local_epochs: local epochs each site trains per round (the paper: 1).
        min_sites: quorum; None = every site of the study.
        aggregator: ``dice-weighted`` (the paper), ``sample-weighted``, ``uniform``, ``median`` or ``trimmed-mean``.
        max_norm_ratio: an update whose change from the global model exceeds this many times the
            round's reference change is refused (inf: no bound).
        norm_floor: the reference change is the round's upper-median change, but at least this
            fraction of the global model's norm.
        max_site_share: with three or more updates, no site's aggregation weight exceeds this (1: no cap).
        trim_fraction: ``trimmed-mean`` only: share of the sites' values dropped at each end.
        server_optimizer: None, or ``fedadam``.
        server_optimizer_options: the server optimiser's settings (FedAdam: eta, beta1, beta2, tau).
        round_timeout_s: a site that has not answered a round by then is left out of it.
        grace_s: once the quorum is connected, how long to wait for the others.
        fedprox_mu: FedProx coefficient used by the clients (0 = off).
        evaluate: after the last round, each site tests the final model on its
            held-out test cases and returns per-case Dice (kept in evaluation.json).
        secure_aggregation: pairwise-masked secure aggregation: the server unmasks only the weighted
            sum of the sites' updates (and the sums of their weights and Dice). Needs a weighted-mean
            aggregator; the server's norm bound and share cap give way to clipping at each site.
        secure_threshold: secure aggregation: how many sites' shares unmask a round (>= 2); None: a
            majority of the round's sites. Up to (sites - threshold) may drop out after masking.
        clip_ratio: secure aggregation: each site scales its change from the global model down to at most
            this many times the global model's norm before masking (the server cannot check it).
        secure_ring_bits: secure aggregation: the masked payload's integers, 64 bits (default: the same
            model as the plain weighted mean) or 32 (the same bytes as float32 weights, a coarser fixed point;
            faster, but it moves per-case Dice: docs/benchmarks.md).
    """

    toml_table = "federation"

    rounds: Count = 40
    local_epochs: Count = 1
    min_sites: Count | None = None
    aggregator: Text = "dice-weighted"
    max_norm_ratio: Annotated[float, Field(ge=1, strict=True), must_be("a number >= 1 (inf: no bound)")] = 5.0
    norm_floor: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True), must_be("a number >= 0")] = 0.5
    max_site_share: Annotated[float, Field(gt=0, le=1, strict=True), must_be("a number in (0, 1]")] = 0.5
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5, strict=True), must_be("a number in [0, 0.5)")] = 0.1
    server_optimizer: Text | None = None
    server_optimizer_options: Annotated[dict[str, Number], must_be("a table of numbers, e.g. { eta = 0.01 }")] = {}
    round_timeout_s: Seconds = 3600.0
    grace_s: Seconds = 60.0
    fedprox_mu: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.0
    evaluate: Bool = True
    secure_aggregation: Bool = False
    secure_threshold: Annotated[Integer, Field(ge=2)] | None = None
    clip_ratio: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True), must_be("a finite number > 0")] = 2.5
    secure_ring_bits: Annotated[Integer, must_be("32 or 64")] = 64

    @field_validator("secure_ring_bits")
    @classmethod
    def _ring_width(cls, bits: int) -> int:
        if bits not in (32, 64):
            raise ValueError(f"must be 32 or 64, got {bits}")
        return bits

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, name: str) -> str:
        if name not in AGGREGATORS:
            raise ValueError(f"unknown {name!r}; choose one of: {', '.join(AGGREGATORS)}")
        return name

    @field_validator("server_optimizer")
    @classmethod
    def _known_server_optimizer(cls, name: str | None) -> str | None:
        if name is not None and name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown {name!r}; choose one of: {', '.join(SERVER_OPTIMIZERS)}")
        return name

    @model_validator(mode="after")
    def _secure_needs_a_mean(self) -> FederationConfig:
        if self.secure_aggregation and self.aggregator == "sample-weighted" and self.secure_ring_bits == 32:
            raise ValueError(
                f"{self.toml_table}.secure_ring_bits = 32 cannot hold sample-weighted updates (weights up to 2^20); "
                "use 64 or another aggregator"
            )
        if self.secure_aggregation and self.aggregator not in WEIGHTINGS:
            raise ValueError(
                f"{self.toml_table}.aggregator {self.aggregator!r} needs every site's update, which "
                f"{self.toml_table}.secure_aggregation hides from the server; choose one of: {', '.join(WEIGHTINGS)}"
            )
        return self

    @model_validator(mode="after")
    def _options_fit_the_optimizer(self) -> FederationConfig:
        table = self.toml_table
        if self.server_optimizer_options and self.server_optimizer is None:
            raise ValueError(f"{table}.server_optimizer_options is set but {table}.server_optimizer is not")
        try:
            self.make_aggregator()
        except (FedsegError, TypeError, ValueError) as exc:
            raise ValueError(f"{table}.server_optimizer_options: {exc}") from None
        return self

    def make_aggregator(self, store: UpdateStore | None = None) -> Aggregator:
        """A fresh aggregator as configured (a new one per run); its updates wait in ``store`` (default: memory)."""
        screening = Screening(self.max_norm_ratio, self.max_site_share, self.norm_floor)
        return make_aggregator(
            self.aggregator, self.server_optimizer, screening=screening, store=store, trim_fraction=self.trim_fraction,
            secure=self.secure_aggregation, **self.server_optimizer_options,
        )

    def secure_settings(self) -> SecureSettings | None:
        """What server and sites agree on for secure aggregation, or None when it is off."""
        if not self.secure_aggregation:
            return None
        return SecureSettings(self.aggregator, self.clip_ratio, self.secure_threshold, self.secure_ring_bits)

    def quorum(self, n_sites: int) -> int:
        """``min_sites``, or every site when unset."""
        return n_sites if self.min_sites is None else self.min_sites


class StudyConfig(Table):
    """Everything a study's TOML file says: its three tables (``StudyConfig(federation, train, prepare)``)."""

    entries = "table"
    positional = ("federation", "train", "prepare")

    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    prepare: PrepareConfig = PrepareConfig()

    def tables(self) -> dict[str, dict[str, Any]]:
        """The three tables as dicts (what :func:`fedseg.schema.write_toml` writes)."""
        return {"federation": self.federation.to_dict(), "train": self.train.to_dict(), "prepare": self.prepare.to_dict()}

    def to_toml(self) -> str:
        """This configuration as a study TOML file (unset options left out, so defaults apply)."""
        return toml_text(self.tables())

    def site_settings(self, fold: int) -> dict[str, Any]:
        """What every site must share with the server (sent in WELCOME; threads, device and the like are each machine's own)."""
        train = self.train.without_machine_options()
        settings = {"fold": fold, "fedprox_mu": self.federation.fedprox_mu, "train": train, "prepare": self.prepare.to_dict()}
        secure = self.federation.secure_settings()
        if secure is not None:  # a site without it (or with other values) refuses the server's WELCOME
            settings["secure_aggregation"] = secure.to_dict()
        return settings


def load_study_config(path: Path | None) -> StudyConfig:
    """Read ``[federation]``, ``[train]`` and ``[prepare]`` from ``path`` (defaults when None).

    Raises:
        FedsegError: unreadable TOML, an unknown table or key, a value out of range.
    """
    if path is None:
        return StudyConfig()
    return StudyConfig.from_dict(read_toml(path), source=str(path))
