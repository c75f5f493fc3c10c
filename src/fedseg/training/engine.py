"""The training engine: one site, one fold, one epoch per call.

:class:`LocalTrainer` owns the model, Adam and the validation-Dice plateau
scheduler. :meth:`LocalTrainer.run_epoch` takes weights in (or keeps its
own), trains one epoch on random balanced crops with BigAug augmentation,
validates by sliding window over whole volumes, steps the scheduler and
returns the weights out, the number of training cases and the validation
Dice. Optimiser and scheduler state stay in the trainer between calls: that
is exactly what a federated round needs, and the local loop in
:mod:`fedseg.training.fit` calls it the same way.

Model, batches, loss and validation run on the configured device
(:mod:`fedseg.training.device`), with mixed precision on CUDA; weights leave
it as contiguous CPU tensors. With a :class:`~fedseg.training.distributed.DataParallel`
group, every process trains its rows of each batch under DDP and rank 0
alone validates, steps the scheduler and hands weights out.

Randomness is a function of (seed, epoch): crops, augmentation and case
order are re-seeded at the start of every epoch, so a run resumed from a
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fedseg.errors import FedsegError
from fedseg.metrics import dice_coefficient
from fedseg.models import sliding_window_logits
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays
from fedseg.training.device import Hardware, resolve_hardware, to_cpu
from fedseg.training.fedprox import FedProxLoss
from fedseg.training.losses import LossFn, soft_dice_loss
from fedseg.training.patches import Shard
from fedseg.training.pipelines import make_pipeline

if TYPE_CHECKING:
    from fedseg.training.distributed import DataParallel

__all__ = ["EpochResult", "LocalTrainer", "adam", "load_optimizer_state", "training_loss"]


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced; ``weights`` are CPU copies, safe to send or store.

    ``val_dice`` is NaN when the epoch was not validated (``validated``
    False, see ``val_every``) or there are no validation cases.
    """

    epoch: int
    weights: dict[str, torch.Tensor]
    num_samples: int  # training cases (what sample-weighted FedAvg weights by)
    val_dice: float
    train_loss: float
    learning_rate: float
    seconds: float
    validated: bool = True
    device: str = "cpu"


def training_loss(fedprox_mu: float = 0.0, parallel: DataParallel | None = None) -> LossFn:
    """Soft Dice (over the whole batch, across a data-parallel group), plus FedProx's term when mu > 0."""
    base = soft_dice_loss(parallel.sum_across, parallel.world_size) if parallel is not None else soft_dice_loss()
    return base if fedprox_mu == 0 else FedProxLoss(base, fedprox_mu)


IMPLEMENTATION_FLAGS = ("fused", "foreach")


def adam(parameters, learning_rate: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where this torch and device have it (measured 10 % faster on a CPU)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(parameters, lr=learning_rate, foreach=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's state (moments move to the parameters' device), keeping this optimiser's own kernel
    choice: a state saved where Adam was fused must load where it is not, and the reverse."""
    own = [{flag: group.get(flag) for flag in IMPLEMENTATION_FLAGS} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, own, strict=True):
        group.update(flags)
        for parameter in group["params"]:
            entries = optimizer.state.get(parameter, {})
            for key, value in entries.items():
                # moments in the parameter's own memory layout: a fused kernel walks both as flat memory
                if isinstance(value, torch.Tensor):
                    same_shape = value.shape == parameter.shape
                    entries[key] = torch.empty_like(parameter).copy_(value) if same_shape else value.clone()


class LocalTrainer:
    """One site's model, optimiser and scheduler for one fold.

    Args:
        model: the network (see :func:`fedseg.models.build_model`), on any device.
        train_cases, val_cases: prepared cases in memory.
        config: hyper-parameters (``device`` and ``amp`` say where and how it trains).
        loss: ``loss(logits, target, model)``; soft Dice by default. A loss with
            ``set_anchor(weights)`` (FedProx) is given each round's global weights.
        parallel: this process's data-parallel group, or None to train alone.
    """

    def __init__(
        self,
        model: nn.Module,
        train_cases: list[CaseArrays],
        val_cases: list[CaseArrays],
        config: TrainConfig,
        loss: LossFn | None = None,
        parallel: DataParallel | None = None,
    ) -> None:
        if not train_cases:
            raise FedsegError("no training cases")
        self.config = config
        self.parallel = parallel
        self.hardware: Hardware = parallel.hardware if parallel is not None else resolve_hardware(config.device, config.amp)
        self.memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
        if parallel is not None and parallel.world_size > 1 and self.hardware.is_cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # AH-Net's batch norm sees the whole batch
        self.model = model.to(self.hardware.device, memory_format=self.memory_format)
        self.network: nn.Module = self.model
        if parallel is not None and parallel.world_size > 1:
            self.network = parallel.wrap(self.model)
            # Weights with a size-1 axis (1x1x1 kernels, one input channel) are contiguous in both layouts; their
            # gradients come back with the other layout's strides, a copy of a few bytes that DDP warns about.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.train_cases = train_cases
        self.val_cases = val_cases
        self.loss = loss or training_loss(0.0, parallel)
        self.optimizer = adam(self.model.parameters(), config.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda") if self.hardware.needs_grad_scaler else None
        self.scheduler = ReduceLROnPlateau(
            self.optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
        )
        self.epoch = 0  # epochs completed
        shard = parallel.shard if parallel is not None else Shard()
        self.pipeline = make_pipeline(train_cases, config, self.hardware.device, shard)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    # ---------------------------------------------------------------- one epoch

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None, validate: bool | None = None) -> EpochResult:
        """Train one epoch (starting from ``weights`` if given), validate, step the scheduler.

        ``validate`` None: every ``val_every`` epochs; True/False: as said.
        """
        start = time.perf_counter()
        if validate is None:
            validate = (self.epoch + 1) % self.config.val_every == 0
        if weights is not None:
            self.set_weights(weights)
        train_loss = self.train_one_epoch(new_anchor=weights is not None)
        val_dice = self.validate() if validate else float("nan")
        if validate:
            self.scheduler.step(val_dice)
        self.epoch += 1
        return EpochResult(
            epoch=self.epoch,
            weights=self.get_weights(),
            num_samples=len(self.train_cases),
            val_dice=val_dice,
            train_loss=train_loss,
            learning_rate=self.learning_rate,
            seconds=time.perf_counter() - start,
            validated=validate,
            device=str(self.hardware.device),
        )

    def train_one_epoch(self, new_anchor: bool = False) -> float:
        """One pass over the training cases; returns the mean loss.

        ``new_anchor``: the weights were just replaced by a round's global
        model, which a FedProx loss then anchors to.
        """
        with self.parallel.failures() if self.parallel is not None else nullcontext():
            if self.parallel is not None:
                self.parallel.start_epoch(self, new_anchor)
            if new_anchor and hasattr(self.loss, "set_anchor"):
                self.loss.set_anchor(self.model.state_dict())
            self.network.train()
            losses = [
                self._step(images.to(memory_format=self.memory_format), labels)
                for images, labels in self.pipeline.batches(self.epoch)
            ]
        if self.parallel is not None:
            self.parallel.end_epoch()
        if not losses:
            raise FedsegError(f"epoch {self.epoch + 1} had no batch to train on (too few patches for the processes)")
        return float(torch.stack(losses).mean())  # one device sync per epoch, not per step

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.hardware.autocast():
            logits = self.network(images)
        loss = self.loss(logits, labels, self.model)  # in fp32: the soft Dice sums are large
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Dice over the validation cases, sliding window over whole volumes (rank 0 only).

        Computed on the prepared (isotropic) grid: a training-time metric.
        Final evaluation maps predictions back to each case's original grid.
        """
        if not self.val_cases:
            return float("nan")
        model = self._inference_model()
        model.eval()
        scores = []
        for case in self.val_cases:
            image = torch.from_numpy(case.image)[None].to(self.hardware.device)
            with self.hardware.autocast():
                logits = sliding_window_logits(model, image, self.config.patch, self.config.sw_batch_size, self.config.sw_overlap)
            prediction = (logits[0, 1] > logits[0, 0]).cpu().numpy()  # argmax of two classes, ties to background
            scores.append(dice_coefficient(prediction, case.label[0] > 0))
        self.model.train()
        return float(np.mean(scores))

    def _inference_model(self) -> nn.Module:
        """The model to validate: on a CPU a contiguous copy, since channels-last (transposed) convolutions
        are slower there in inference (measured 20 % on the demo's validation), unlike in training."""
        if self.hardware.device.type == "cpu" and self.memory_format == torch.channels_last_3d:
            return copy.deepcopy(self.model).to(memory_format=torch.contiguous_format)
        return self.model

    # ---------------------------------------------------------------- state

    def get_weights(self) -> dict[str, torch.Tensor]:
        return to_cpu(self.model.state_dict())

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights; names, shapes and dtypes must match the model exactly."""
        own = self.model.state_dict()
        if set(own) != set(weights):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise FedsegError(f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in weights.items():
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise FedsegError(f"weights do not fit the model: {name} is {tuple(tensor.shape)} {tensor.dtype}")
        self.model.load_state_dict(weights)

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def scaler_state(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def restore(
        self,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict,
        scheduler_state: dict,
        epoch: int,
        scaler_state: dict[str, Any] | None = None,
    ) -> None:
        """Continue from a checkpoint written after ``epoch`` completed epochs (on any device)."""
        self.set_weights(weights)
        load_optimizer_state(self.optimizer, optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.epoch = epoch
        if self.parallel is not None:
            self.parallel.share_optimizer(self)
