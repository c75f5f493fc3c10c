"""The local training loop: epochs of :class:`LocalTrainer`, checkpoints, metrics, resume.

A fold folder of a model directory (:mod:`fedseg.modeldir` owns the format
and ``model.json``) holds what training leaves::

    MODEL_DIR/fold<k>/best.safetensors   weights with the best validation Dice (+ best.json)
    MODEL_DIR/fold<k>/last.*             weights, optimiser, scheduler after the last epoch
    MODEL_DIR/fold<k>/metrics.jsonl|csv  one row per epoch (strict JSON: a NaN is written as null)

Training a fold whose ``last`` checkpoint exists continues after its epoch
(same configuration and data required), so an interrupted run loses at most
the epoch in progress.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedseg import __version__
from fedseg.errors import FedsegError
from fedseg.io import append_jsonl, dumps_json, read_jsonl, write_text
from fedseg.modeldir import FoldOutcome, model_record, open_model_dir, record_fold
from fedseg.models import build_model
from fedseg.training.checkpoint import load_checkpoint, save_checkpoint
from fedseg.training.config import MACHINE_OPTIONS, TrainConfig
from fedseg.training.data import CaseArrays, PreparedSite, SiteData
from fedseg.training.engine import EpochResult, LocalTrainer

if TYPE_CHECKING:
    from fedseg.training.distributed import DataParallel

__all__ = [  # FoldOutcome, model_record, open_model_dir, record_fold: fedseg.modeldir's, still importable from here
    "METRIC_FIELDS", "FoldOutcome", "MetricsLog", "TrainingSet", "config_differences", "fold_training_set", "hardware_record",
    "model_record", "open_model_dir", "record_fold", "train_fold", "training_set",
]

METRIC_FIELDS = ("epoch", "train_loss", "val_dice", "learning_rate", "seconds", "device")


@dataclass(frozen=True)
class TrainingSet:
    """The cases one model trains and validates on (one site, or several pooled)."""

    name: str
    train: list[CaseArrays]
    val: list[CaseArrays]
    fingerprint: str
    sources: list[dict[str, str]]


def fold_training_set(site: PreparedSite, data: SiteData, fold: int, validation: bool = True) -> TrainingSet:
    """Training and validation cases of ``fold`` at one site (``validation`` False: leave the latter unloaded)."""
    split = site.require_splits().fold(fold)
    return TrainingSet(
        site.name,
        data.cases(split.train),
        data.cases(split.val) if validation else [],
        data.fingerprint(split.train + split.val),
        [{"site": site.name, "source": str(site.source)}],
    )


def training_set(sites: list[PreparedSite], fold: int, patch: tuple[int, int, int], validation: bool = True) -> TrainingSet:
    """Fold ``fold`` of one site, or of several put together (the pooled, centralised model's data)."""
    parts = [fold_training_set(site, SiteData(site, patch), fold, validation) for site in sites]
    if len(parts) == 1:
        return parts[0]
    return TrainingSet(
        "+".join(part.name for part in parts),
        [case for part in parts for case in part.train],
        [case for part in parts for case in part.val],
        "+".join(part.fingerprint for part in parts),
        [source for part in parts for source in part.sources],
    )


def _number_or_none(value: Any) -> Any:
    """A metric as strict JSON: NaN or infinity (no validation cases, a diverged loss) becomes null, "no number"."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Per-epoch metrics as JSONL and CSV (and TensorBoard when asked)."""

    def __init__(self, folder: Path, tensorboard: bool = False) -> None:
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self._writer = _tensorboard_writer(folder) if tensorboard else None

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs not covered by the checkpoint being resumed."""
        rows = [r for r in self.rows() if r["epoch"] <= epoch]
        write_text(self.jsonl, "".join(dumps_json(r) + "\n" for r in rows))
        self._rewrite_csv(rows)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.jsonl)

    def append(self, result: EpochResult) -> None:
        row = {name: _number_or_none(getattr(result, name)) for name in METRIC_FIELDS}
        if not result.validated:
            row["val_dice"] = None  # not validated this epoch (val_every): no number
        append_jsonl(self.jsonl, row)
        self._rewrite_csv(self.rows())
        if self._writer is not None:
            for name in ("train_loss", "val_dice", "learning_rate", "seconds"):
                if row[name] is not None:
                    self._writer.add_scalar(name, row[name], result.epoch)
            self._writer.flush()

    def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv, text.getvalue())


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FedsegError("TensorBoard logging needs the tensorboard package: pip install 'fedseg[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


_HOW_LONG = ("epochs", "stop_patience")  # when to stop, not what is trained: may change on resume


def config_differences(recorded: dict[str, Any], config: TrainConfig) -> list[str]:
    """Options that differ between a recorded run and ``config`` (resuming needs none).

    More epochs or another plateau patience are fine, and so are the machine
    options (another device or thread count); an option the recorded run
    predates must have its default.
    """
    defaults, now = TrainConfig().to_dict(), config.to_dict()
    return sorted(
        key for key, value in now.items()
        if key not in _HOW_LONG and key not in MACHINE_OPTIONS and recorded.get(key, defaults[key]) != value
    )


def _resume(trainer: LocalTrainer, fold_dir: Path, config: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    """Restore the trainer from ``last`` if present; returns its sidecar."""
    if not (fold_dir / "last.json").is_file():
        return None
    weights, sidecar, optimizer = load_checkpoint(fold_dir, "last")
    if differences := config_differences(sidecar["config"], config):
        raise FedsegError(
            f"{fold_dir}: holds a run with another configuration ({', '.join(differences)}); train into a new --out folder"
        )
    if sidecar["data_fingerprint"] != fingerprint:
        raise FedsegError(f"{fold_dir}: holds a run on other data (fingerprint differs); train into a new --out folder")
    if optimizer is None:
        raise FedsegError(f"{fold_dir}/last.json: no optimiser state; cannot resume")
    trainer.restore(weights, optimizer, sidecar["scheduler"], sidecar["epoch"], sidecar.get("grad_scaler"))
    return sidecar


def hardware_record(trainer: LocalTrainer) -> dict[str, Any]:
    """Device, precision and process count that trained a model (model.json, reports)."""
    processes = trainer.parallel.world_size if trainer.parallel is not None else 1
    return {**trainer.hardware.record(), "processes": processes}


def train_fold(
    training: TrainingSet,
    fold_dir: Path,
    config: TrainConfig,
    *,
    fold: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
    tensorboard: bool = False,
    parallel: DataParallel | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
) -> FoldOutcome:
    """Train (or resume) one fold model into ``fold_dir`` for ``config.epochs`` epochs
    (fewer when ``config.stop_patience`` epochs pass without a better validation Dice).

    With ``parallel`` (this process being rank 0), the group's processes
    train every epoch together and this one validates and checkpoints.
    ``init_weights``: where a new fold starts (``init = "phantom"``, see
    :func:`fedseg.training.pretrain.starting_weights`); a resumed fold continues from its checkpoint.
    """
    start = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    fold_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(config.network, seed=config.seed)
    if init_weights is not None:
        model.load_state_dict(init_weights)  # before the trainer: data-parallel followers copy rank 0's weights
    trainer = LocalTrainer(model, training.train, training.val, config, parallel=parallel)
    previous = _resume(trainer, fold_dir, config, training.fingerprint)
    log = MetricsLog(fold_dir, tensorboard)
    log.truncate_after(trainer.epoch)  # rows written after the checkpoint (or before any) are stale
    best_dice, best_epoch = -1.0, 0
    if previous is not None:
        best_dice, best_epoch = previous["best_val_dice"], previous["best_epoch"]
    resumed_from = trainer.epoch
    sidecar_base = {
        "fedseg_version": __version__,
        "config": config.to_dict(),
        "data_fingerprint": training.fingerprint,
        "trained_on": training.sources,
        "train_cases": [c.case_id for c in training.train],
        "val_cases": [c.case_id for c in training.val],
    }
    while not config.training_done(trainer.epoch, best_epoch):
        last = trainer.epoch + 1 >= config.epochs
        result = trainer.run_epoch(validate=True if last else None)  # every val_every epochs, and the last
        log.append(result)
        metrics = {"epoch": result.epoch, "val_dice": result.val_dice, "train_loss": result.train_loss}
        # without validation cases (NaN) the latest epoch is the best one known
        if result.validated and (math.isnan(result.val_dice) or result.val_dice > best_dice):
            best_dice, best_epoch = result.val_dice, result.epoch
            save_checkpoint(fold_dir, "best", result.weights, {**sidecar_base, **metrics})
        save_checkpoint(
            fold_dir,
            "last",
            result.weights,
            {
                **sidecar_base, **metrics, "best_val_dice": best_dice, "best_epoch": best_epoch,
                "scheduler": trainer.scheduler_state(), "grad_scaler": trainer.scaler_state(),
                "hardware": hardware_record(trainer),
            },
            optimizer_state=trainer.optimizer.state_dict(),
        )
        if on_epoch is not None:
            on_epoch(result)
    return FoldOutcome(
        fold, best_dice, best_epoch, trainer.epoch, time.perf_counter() - start, resumed_from, hardware_record(trainer),
        config.stopped_early(trainer.epoch, best_epoch),
    )
