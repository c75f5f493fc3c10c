"""The study's settings: a named profile, overridden key by key from ``study.toml``.

``study.toml`` has the tables of a federated study (``[federation]``,
``[train]``, ``[prepare]``; see :mod:`fedseg.federation.config`) plus
``[study]`` (:class:`StudyPlan`). A profile supplies a value for every key;
the file only changes the keys it names::

    [study]
    cases = 30            # synthetic cases per site (ignored with --sites)
    workers = 2           # training processes at once

    [train]
    epochs = 40

Profiles:

* ``demo`` — sized for the whole study (synthesis, 3 private + FL + pooled
  2-fold ensembles, evaluation, report) on 2 CPU cores with models that
  converge: 40 synthetic cases per site (8 test cases each, for the paired
  t-tests' power) at twice Table 2's voxel size, 4 mm, ``unet-small`` with
  24 x 24 x 16 patches (96 x 96 x 64 mm), Adam 1e-2, 30 epochs/rounds
  (private and pooled folds stop after 8 epochs without a better validation
  Dice), the full BigAug stack. Each choice and every budget tried, with
  times and Dice: docs/results.md.
* ``small-sites`` — for ``--sites`` of a few cases each (e.g. PROMISE12's 5):
  the demo's network and voxels, starting from weights fedseg trains on its
  own phantom institutions (``init = "phantom"``), 16 crops per case per
  epoch, 60 epochs/rounds with plateau stopping, 2-fold ensembles.
* ``paper`` — Sarma et al.'s protocol: 100 cases per site, 1 mm, AH-Net,
  300 epochs and rounds; meant for a GPU machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.federation.config import FederationConfig, StudyConfig
from fedseg.schema import Integer, Number, Table, must_be, read_toml
from fedseg.training.config import TrainConfig
from fedseg.training.device import resolve_hardware

__all__ = ["PROFILES", "Settings", "StudyPlan", "load_settings"]

Count = Annotated[Integer, Field(ge=1)]
SEEDS = "distinct integers >= 0, e.g. [0, 1, 2]"


class StudyPlan(Table):
    """The ``[study]`` table: data to synthesise and how to run the steps.

    Attributes:
        cases: synthetic cases per institution (without ``--sites``).
        external_cases: cases of the synthetic external test set.
        resolution_scale: coarsening of the synthetic scans' voxels (>= 1; faster).
        seed: synthesis seed (the same seed gives identical scans).
        workers: training/evaluation processes run at once (each with
            ``train.threads`` torch threads).
        folds: fold models per ensemble (k of the k-fold ensembles); None = every
            fold of the sites' splits (5, fewer for small sites). The first k folds
            are used, so a smaller k is a subset of a larger one.
        seeds: run the whole study once per seed (``OUT/seed-N``; synthesis and
            training use seed N) and report in how many the finding held; None =
            one study with ``seed``.
    """

    toml_table = "study"

    cases: Annotated[Integer, Field(ge=3), must_be("an integer >= 3 (a site needs a test case and two folds)")] = 100
    external_cases: Count = 40
    resolution_scale: Annotated[Number, Field(ge=1)] = 1.0
    seed: Integer = 0
    workers: Count = 1
    folds: Annotated[Integer, Field(ge=1), must_be("an integer >= 1 (fold models per ensemble)")] | None = None
    seeds: Annotated[list[Annotated[Integer, Field(ge=0)]], must_be(SEEDS)] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError(f"must be {SEEDS}")
        return seeds


class StudyTables(Table):
    """What ``study.toml`` may hold: the ``[study]`` table and a federated study's three (validated together)."""

    entries = "table"

    study: StudyPlan = StudyPlan()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    prepare: PrepareConfig = PrepareConfig()


@dataclass(frozen=True)
class Settings:
    """Everything a study run is configured by."""

    profile: str
    plan: StudyPlan
    study: StudyConfig

    def describe(self, synthetic: bool = True) -> list[str]:
        """Lines for the top of the report and the console (``synthetic``: the study makes its own sites)."""
        train, prepare, federation = self.study.train, self.study.prepare, self.study.federation
        data = [
            f"synthetic data: {self.plan.cases} cases per site, {self.plan.external_cases} external cases, "
            f"voxels coarsened x{self.plan.resolution_scale:g}, "
            + (f"seeds {', '.join(map(str, self.plan.seeds))} (a whole study each)" if self.plan.seeds else f"seed {self.plan.seed}")
        ]
        return [
            f"profile: {self.profile}",
            *(data if synthetic else []),
            f"preprocessing: {prepare.spacing_mm:g} mm isotropic, "
            + ("z-score" if prepare.normalize == "zscore" else "z-score after clipping to the 0.5-99.5th percentiles"),
            f"network: {train.network}, patch {'x'.join(map(str, train.patch))}, batch {train.batch_size}, "
            f"{train.samples_per_volume} crops per case per epoch, Adam lr {train.learning_rate:g}",
            *(["starting weights: trained by fedseg on its own phantom institutions (init = phantom, "
                "cached; model.json records how)"] if train.init == "phantom" else []),
            f"augmentation: stacked transformations (BigAug, {train.augment_engine}), elastic deformation "
            + (f"p = {train.augment.elastic_prob:g}" if train.augment.elastic_prob > 0 else "off"),
            "ensembles: " + (f"k-fold, k = {self.plan.folds}" if self.plan.folds else "one model per fold of the splits"),
            f"private and pooled models: {train.epochs} epochs per fold"
            + (f" (or fewer: stopped once {train.stop_patience} epochs bring no better validation Dice)" if train.stop_patience else "")
            + f"; FL: {federation.rounds} rounds of "
            + ("one local epoch" if federation.local_epochs == 1 else f"{federation.local_epochs} local epochs")
            + f", aggregator {federation.aggregator}",
            *([_secure_line(federation)] if federation.secure_aggregation else []),
            f"{self.plan.workers} training process(es) at once, {train.threads or 'all'} torch thread(s) each, "
            f"on {resolve_hardware(train.device, train.amp).describe(threads=False)}",
        ]

    def with_seeds(self, seeds: tuple[int, ...] | list[int]) -> Settings:
        """These settings for a multi-seed study (``--seeds``)."""
        return dataclasses.replace(self, plan=self.plan.replace(seeds=list(seeds)))

    def for_seed(self, seed: int) -> Settings:
        """These settings for one seed of a multi-seed study: synthesis and training both use ``seed``."""
        plan = self.plan.replace(seed=seed, seeds=None)
        study = self.study.replace(train=self.study.train.replace(seed=seed))
        return dataclasses.replace(self, plan=plan, study=study)

    def on_device(self, device: str) -> Settings:
        """These settings with every training and evaluation process on ``device``, resolved here.

        ``auto`` becomes the device it means on this machine, so that the
        worker and site processes use, and the report names, the same one.

        Raises:
            FedsegError: a device this machine does not have.
        """
        hardware = resolve_hardware(device, self.study.train.amp)
        train = self.study.train.replace(device=str(hardware.device))
        return dataclasses.replace(self, study=self.study.replace(train=train))

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "study": self.plan.to_dict(),
            "federation": self.study.federation.to_dict(),
            "train": self.study.train.to_dict(),
            "prepare": self.study.prepare.to_dict(),
        }


_DEMO_EPOCHS = 30  # chosen by measurement (docs/results.md, 2026-12-02): FL's curve flattens by round ~25
_SMALL_SITES_EPOCHS = 60  # 3 training cases per fold: epochs are short, the prior does most of the work
_DEMO: dict[str, dict[str, Any]] = {
    "study": {"cases": 40, "external_cases": 16, "resolution_scale": 2.0, "workers": 2, "folds": 2},
    "prepare": {"spacing_mm": 4.0},
    "train": {
        "network": "unet-small",
        "epochs": _DEMO_EPOCHS,
        "patch_size": [24, 24, 16],
        "samples_per_volume": 4,
        "learning_rate": 1e-2,
        "lr_patience": 4,
        "stop_patience": 8,
        "threads": 1,
    },
    "federation": {"rounds": _DEMO_EPOCHS, "round_timeout_s": 600.0, "grace_s": 30.0},
}
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": _DEMO,
    # for --sites of a few cases each (docs/results.md: PROMISE12, 4 sites x 5 cases): the demo's network and
    # voxels, from the phantom prior, with more crops per case and more epochs
    "small-sites": {
        "study": {"workers": 2, "folds": 2},
        "prepare": dict(_DEMO["prepare"]),
        "train": {
            **_DEMO["train"], "epochs": _SMALL_SITES_EPOCHS, "samples_per_volume": 16, "stop_patience": 15, "init": "phantom",
        },
        "federation": {**_DEMO["federation"], "rounds": _SMALL_SITES_EPOCHS},
    },
    "paper": {
        "study": {"cases": 100, "external_cases": 40, "resolution_scale": 1.0, "workers": 1},
        "prepare": {"spacing_mm": 1.0},
        "train": {"network": "ahnet", "epochs": 300},
        "federation": {"rounds": 300},
    },
}
_TABLES = ("study", "federation", "train", "prepare")


def _merged(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The profile's tables with ``overrides``' keys in place of theirs (``[train.augment]`` key by key too)."""
    merged: dict[str, Any] = {**overrides, **{table: dict(PROFILES[profile].get(table, {})) for table in _TABLES}}
    for table in _TABLES:
        value = overrides.get(table, {})
        if not isinstance(value, dict):
            merged[table] = value  # reported by the validation, naming the table
            continue
        if table == "train" and isinstance(value.get("augment"), dict):
            merged[table]["augment"] = {**merged[table].get("augment", {}), **value["augment"]}
            value = {k: v for k, v in value.items() if k != "augment"}
        merged[table].update(value)
    return merged


def load_settings(profile: str = "demo", config: Path | None = None) -> Settings:
    """The profile's settings, with ``config``'s keys replacing the profile's.

    Raises:
        FedsegError: unknown profile, table or key; a value out of range.
    """
    if profile not in PROFILES:
        raise FedsegError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    overrides = read_toml(config) if config is not None else {}
    source = str(config) if config is not None else f"profile {profile}"
    tables = StudyTables.from_dict(_merged(profile, overrides), source)
    return Settings(profile, tables.study, StudyConfig(tables.federation, tables.train, tables.prepare))


def _secure_line(federation: FederationConfig) -> str:
    threshold = federation.secure_threshold or "a majority of the sites"
    return (
        "secure aggregation: on (pairwise masks; the server unmasked only the weighted sum of the sites' updates; "
        f"threshold {threshold}; each site clipped its change to {federation.clip_ratio:g} x the global model's norm)"
    )
