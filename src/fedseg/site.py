"""A site's participant in torch: trains each round with a LocalTrainer, keeps and tests the models sent at the end.

:class:`TorchParticipant` is fedseg's :class:`~fedseg.federation.protocol.participant.Participant`
(no network here): the client pump (:func:`fedseg.federation.transport.client.run_client`)
hands it each round's global weights as numpy arrays, and it converts them to
torch once, runs the round's local epochs with the trainer (which anchors
FedProx to those weights) and converts the update back. At the end it hands
every model the server sends to :meth:`SiteOutputs.on_model` and asks
:meth:`SiteOutputs.evaluate` for the per-case test Dice of the final model.

Models are written as model directories usable by ``fedseg predict`` and
``fedseg evaluate``::

    MODELS_DIR/final/model.json + fold<k>/best.safetensors   the last round's global model
    MODELS_DIR/best/model.json  + fold<k>/best.safetensors   the best round's (highest median site val Dice)
    MODELS_DIR/final/evaluation-fold<k>.json                  per-case test Dice, real case names

Each fold's study adds its fold to the same directories, so after the five
fold runs ``MODELS_DIR/best`` is the site's copy of the FL ensemble.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.evaluation.evaluate import evaluate_site
from fedseg.federation.protocol.participant import LocalUpdate, Weights
from fedseg.inference import Ensemble
from fedseg.io import write_json
from fedseg.modeldir import FoldOutcome, ModelRecord, open_model_dir, record_fold
from fedseg.models import build_model, weights_from_numpy, weights_to_numpy
from fedseg.training.checkpoint import load_checkpoint, save_checkpoint, save_weights
from fedseg.training.config import TrainConfig
from fedseg.training.data import PreparedSite
from fedseg.training.device import resolve_hardware
from fedseg.training.engine import EpochResult

__all__ = ["SITE_STATE", "EndOfStudy", "SiteOutputs", "TorchParticipant"]

log = logging.getLogger("fedseg.client")
SITE_STATE = "site-state"  # STATE_DIR/site-state.{safetensors,optim.safetensors,json}


class EpochRunner(Protocol):
    """What :class:`TorchParticipant` needs of a :class:`~fedseg.training.engine.LocalTrainer`."""

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None, validate: bool | None = None) -> EpochResult:
        ...


class Resumable(EpochRunner, Protocol):
    """A trainer whose optimiser, schedule and epoch count can be saved and restored (a LocalTrainer)."""

    epoch: int
    optimizer: torch.optim.Optimizer

    def get_weights(self) -> dict[str, torch.Tensor]: ...

    def scheduler_state(self) -> dict: ...

    def scaler_state(self) -> dict | None: ...

    def restore(self, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler_state: dict, epoch: int,
                scaler_state: dict | None = None) -> None: ...


class EndOfStudy(Protocol):
    """What a site does with the models sent at the end (:class:`SiteOutputs` writes model directories)."""

    def on_model(self, name: str, round_: int | None, weights: Weights, val_dice: float | None) -> None:
        ...

    def evaluate(self, weights: Weights) -> dict[str, float]:
        ...


class TorchParticipant:
    """A :class:`~fedseg.federation.protocol.participant.Participant` that trains with ``trainer``.

    With ``state_dir``, the trainer's optimiser, learning-rate schedule and
    epoch count are saved after every round (``STATE_DIR/site-state.*``,
    safetensors + JSON), so a site process restarted mid-study continues
    exactly: the first TRAIN after a restart restores them when it is the
    round right after the saved one (else — another run, a server that went
    back — the site starts them afresh and says so).

    Args:
        trainer: the site's local trainer; it keeps its optimiser and schedule across rounds.
        outputs: keeps the final and best models and tests the final one; None: the site
            keeps nothing and answers an evaluation with no cases.
        state_dir: where the trainer's state is kept between rounds (None: nowhere).
    """

    def __init__(self, trainer: EpochRunner, outputs: EndOfStudy | None = None, state_dir: Path | None = None) -> None:
        self.trainer = trainer
        self.outputs = outputs
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._check_restore = self.state_dir is not None and (self.state_dir / f"{SITE_STATE}.json").is_file()

    def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
        """``epochs`` local epochs from the global ``weights``; the last epoch's result is the update.

        The global weights go into the first epoch only: that is what (re)anchors
        FedProx to them (:meth:`~fedseg.training.engine.LocalTrainer.run_epoch`
        anchors a loss with ``set_anchor`` whenever it is given weights); the later
        epochs of the round keep that anchor. The last local epoch is always
        validated (the update carries its Dice); the others as the trainer's
        ``val_every`` says.
        """
        if self._check_restore:
            self._restore(round)
        global_weights = weights_from_numpy(weights)
        for index in range(epochs):
            last = index == epochs - 1
            result = self.trainer.run_epoch(global_weights if index == 0 else None, validate=True if last else None)
        if self.state_dir is not None:
            self._save(round)
        return LocalUpdate(
            weights=weights_to_numpy(result.weights),
            num_samples=int(result.num_samples),
            val_dice=float(result.val_dice),
            metrics={"train_loss": float(result.train_loss)},
        )

    def _resumable(self) -> Resumable:
        trainer = self.trainer
        if not all(hasattr(trainer, name) for name in ("optimizer", "restore", "scheduler_state", "get_weights")):
            raise FedsegError(f"{type(trainer).__name__} cannot save its state between rounds; use a LocalTrainer")
        return trainer  # type: ignore[return-value]

    def _save(self, round_: int) -> None:
        trainer = self._resumable()
        assert self.state_dir is not None
        sidecar = {"round": round_, "epoch": trainer.epoch, "scheduler": trainer.scheduler_state(),
                   "grad_scaler": trainer.scaler_state()}
        save_checkpoint(self.state_dir, SITE_STATE, trainer.get_weights(), sidecar, trainer.optimizer.state_dict())

    def _restore(self, round_: int) -> None:
        self._check_restore = False
        trainer = self._resumable()
        assert self.state_dir is not None
        weights, sidecar, optimizer = load_checkpoint(self.state_dir, SITE_STATE)
        saved = int(sidecar["round"])
        if round_ != saved + 1 or optimizer is None:
            log.warning("the saved site state is of round %d, this is round %d: starting the optimiser afresh", saved, round_)
            return
        trainer.restore(weights, optimizer, sidecar["scheduler"], int(sidecar["epoch"]), sidecar.get("grad_scaler"))
        log.info("continuing from round %d's optimiser, schedule and epoch count (%d epochs)", saved, trainer.epoch)

    def keep_model(self, name: str, round: int | None, weights: Weights, val_dice: float | None) -> None:
        if self.outputs is not None:
            self.outputs.on_model(name, round, weights, val_dice)

    def evaluate(self, weights: Weights) -> dict[str, float] | None:
        return self.outputs.evaluate(weights) if self.outputs is not None else None


class SiteOutputs:
    """A site's end-of-study hooks for fold ``fold`` of study ``study``."""

    def __init__(
        self, models_dir: Path, site: PreparedSite, fold: int, train: TrainConfig, prepare: PrepareConfig, study: str
    ) -> None:
        self.models_dir = Path(models_dir)
        self.site = site
        self.fold = fold
        self.train = train
        self.prepare = prepare
        self.study = study

    def _record(self, name: str) -> ModelRecord:
        trained_on = [{"site": "federated", "source": f"fedseg study {self.study!r}"}]
        return ModelRecord.new(self.train, self.prepare, trained_on).model_copy(update={
            "ensemble": f"mean of the {name} federated fold models' softmax probabilities, threshold 0.5",
            "federated": {"study": self.study, "model": name, "received_by": self.site.name},
        })

    def _checked(self, name: str, weights: dict[str, np.ndarray], model: torch.nn.Module | None = None) -> None:
        """The server's ``name`` model must fit this site's own network (``model``, else a new one) exactly and be
        finite; else nothing is written."""
        own = (model if model is not None else build_model(self.train.network)).state_dict()
        problems = [f"missing {n}" for n in own if n not in weights] + [f"unexpected {n}" for n in weights if n not in own]
        for n, tensor in own.items():
            array = weights.get(n)
            if array is None:
                continue
            if tuple(array.shape) != tuple(tensor.shape) or str(array.dtype) != str(tensor.dtype).removeprefix("torch."):
                problems.append(f"{n} is {tuple(array.shape)} {array.dtype}, this site's network has {tuple(tensor.shape)} {tensor.dtype}")
            elif np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                problems.append(f"{n} has non-finite values")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise FedsegError(f"the server's {name} model does not fit this site's {self.train.network} network ({shown}); nothing written")

    def on_model(self, name: str, round_: int | None, weights: dict[str, np.ndarray], val_dice: float | None) -> None:
        """Add the received ``final`` or ``best`` model as this fold of ``MODELS_DIR/<name>`` (checked first)."""
        self._checked(name, weights)
        folder = self.models_dir / name
        open_model_dir(folder, self._record(name))
        save_weights(folder / f"fold{self.fold}" / "best.safetensors", weights_from_numpy(weights))
        rounds = round_ + 1 if round_ is not None else 0
        dice = float(val_dice) if val_dice is not None else 0.0
        record_fold(folder, FoldOutcome(self.fold, dice, rounds, rounds, 0.0, 0))

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        """Per-case Dice of ``weights`` on this site's held-out test cases, on their original grids."""
        hardware = resolve_hardware(self.train.device, self.train.amp)
        model = build_model(self.train.network)
        self._checked("evaluated", weights, model)
        model.load_state_dict(weights_from_numpy(weights))
        record = self._record("final")
        ensemble = Ensemble(
            [model.to(hardware.device).eval()], self.prepare, self.train.patch, self.train.sw_batch_size,
            self.train.sw_overlap, record.to_dict(), record.inference.keep_largest_component, hardware,
        )
        scores = evaluate_site(ensemble, self.site, "test")
        write_json(
            self.models_dir / "final" / f"evaluation-fold{self.fold}.json",
            {"site": self.site.name, "fold": self.fold, "case_dice": scores},
        )
        return scores
