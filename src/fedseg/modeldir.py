"""The model-directory format: model.json and its fold entries (written by training and local mode, read by inference).

A model directory holds one folder per fold plus ``model.json``::

    MODEL_DIR/model.json                 how to use the model: network, preprocessing, inference, folds
    MODEL_DIR/fold<k>/best.safetensors   the fold model's weights (what ``fedseg predict`` loads)
    MODEL_DIR/fold<k>/...                whatever trained it left (checkpoints, metrics: see fedseg.training.fit)

``model.json`` is a :class:`ModelRecord`; each trained fold adds a
:class:`FoldEntry`. Training, local mode and every site write model
directories through :func:`open_model_dir` and :func:`record_fold`;
:func:`read_model_record` is the one reader. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedseg import __version__
from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.schema import Record

__all__ = [
    "MODEL_FORMAT", "MODEL_JSON", "FoldEntry", "FoldOutcome", "InferenceSettings", "ModelRecord", "model_record",
    "open_model_dir", "read_model_record", "record_fold",
]

MODEL_JSON = "model.json"
MODEL_FORMAT = 1
ENSEMBLE = "mean of the fold models' softmax probabilities, threshold 0.5"


class TrainSettings(Protocol):
    """What ``model.json`` takes from a training configuration (a :class:`fedseg.training.config.TrainConfig`)."""

    network: str
    sw_batch_size: int
    sw_overlap: float

    @property
    def patch(self) -> tuple[int, int, int]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FoldOutcome:
    """Summary of one fold's training (what its :class:`FoldEntry` records)."""

    fold: int
    best_val_dice: float
    best_epoch: int
    epochs: int
    seconds: float
    resumed_from: int  # 0 when started fresh
    hardware: dict[str, Any] | None = None  # device, amp and processes that trained it (None: not recorded)
    stopped_early: bool = False  # ended on a validation plateau (``stop_patience``) before ``epochs``


class InferenceSettings(Record):
    """How to apply the fold models: sliding window, and whether to keep only the largest component."""

    patch_size: tuple[int, int, int]
    sw_batch_size: int
    sw_overlap: float
    keep_largest_component: bool = False  # models written before fedseg learnt it keep every component


class FoldEntry(Record):
    """One trained fold in ``model.json``."""

    optional_keys = ("stopped_early", "trained_with")

    fold: int
    weights: str  # relative to the model directory
    best_val_dice: float  # NaN when the fold had no validation cases
    best_epoch: int
    epochs: int
    stopped_early: bool = False
    trained_with: dict[str, Any] | None = None  # device, precision, processes (see fedseg.training.device)

    @classmethod
    def from_outcome(cls, outcome: FoldOutcome) -> FoldEntry:
        return cls(
            fold=outcome.fold, weights=f"fold{outcome.fold}/best.safetensors", best_val_dice=outcome.best_val_dice,
            best_epoch=outcome.best_epoch, epochs=outcome.epochs, stopped_early=outcome.stopped_early,
            trained_with=outcome.hardware or None,
        )


class ModelRecord(Record):
    """``model.json``: everything needed to use the model, and how it came about."""

    optional_keys = ("init", "federated")

    format: int = MODEL_FORMAT
    fedseg_version: str
    network: str
    in_channels: int = 1
    out_channels: int = 2
    preprocessing: PrepareConfig
    inference: InferenceSettings
    ensemble: str = ENSEMBLE
    train_config: dict[str, Any]  # the TrainConfig as recorded (older records lack newer options)
    trained_on: list[dict[str, str]]
    init: dict[str, Any] | None = None  # the starting weights' provenance (fedseg.training.pretrain)
    federated: dict[str, Any] | None = None  # a federated model: the study, or which site received it
    folds: list[FoldEntry] = []

    @classmethod
    def new(
        cls, config: TrainSettings, prepare: PrepareConfig, trained_on: list[dict[str, str]],
        init: Record | Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """The record of a model before any fold is trained; ``init``: the starting weights' provenance."""
        if isinstance(init, Record):
            init = init.to_dict()
        inference = InferenceSettings(
            patch_size=config.patch, sw_batch_size=config.sw_batch_size, sw_overlap=config.sw_overlap,
            keep_largest_component=True,
        )
        return cls(
            fedseg_version=__version__, network=config.network, preprocessing=prepare, inference=inference,
            train_config=config.to_dict(), trained_on=trained_on, init=init,
        )

    def with_fold(self, entry: FoldEntry) -> ModelRecord:
        """This record with ``entry`` added, or in place of the fold's earlier entry."""
        folds = sorted([f for f in self.folds if f.fold != entry.fold] + [entry], key=lambda f: f.fold)
        return self.model_copy(update={"folds": folds})


def model_record(
    config: TrainSettings, prepare: PrepareConfig, trained_on: list[dict[str, str]],
    init: Record | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:meth:`ModelRecord.new` as a dict, for writers that add keys of their own (``federated``, ``ensemble``)."""
    return ModelRecord.new(config, prepare, trained_on, init).to_dict()


def read_model_record(model_dir: Path) -> ModelRecord:
    """The ``model.json`` of ``model_dir``.

    Raises:
        FedsegError: no model.json (not a model directory), or one that cannot be read.
    """
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise FedsegError(f"{model_dir}: not a model directory (no {MODEL_JSON})")
    return ModelRecord.read(path)


def open_model_dir(model_dir: Path, record: ModelRecord | Mapping[str, Any]) -> ModelRecord:
    """Create ``model.json`` or check that an existing one describes the same model (and return it)."""
    path = Path(model_dir) / MODEL_JSON
    if not isinstance(record, ModelRecord):
        record = ModelRecord.from_dict(record, source=f"{path} (new)")
    if not path.is_file():
        record.write(path)
        return record
    existing = ModelRecord.read(path)
    theirs, mine = existing.to_dict(), record.to_dict()
    for key in ("network", "preprocessing", "trained_on"):
        if theirs[key] != mine[key]:
            raise FedsegError(f"{path}: {key} differs from this run ({theirs[key]} vs {mine[key]}); use another --out")
    return existing


def record_fold(model_dir: Path, outcome: FoldOutcome) -> None:
    """Add or replace a fold's entry in ``model.json``."""
    path = Path(model_dir) / MODEL_JSON
    ModelRecord.read(path).with_fold(FoldEntry.from_outcome(outcome)).write(path)
