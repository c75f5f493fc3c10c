"""The training engine: one site, one fold, one epoch per call.

:class:`LocalTrainer` owns the model, Adam and the validation-Dice plateau
scheduler. :meth:`LocalTrainer.run_epoch` takes weights in (or keeps its
own), trains one epoch on random balanced crops with BigAug augmentation,
validates by sliding window over whole volumes, steps the scheduler and
returns the weights out, the number of training cases and the validation
Dice. Optimiser and scheduler state stay in the trainer between calls: that
is exactly what a federated round needs, and the local loop in
:mod:`fedseg.training.fit` calls it the same way.

Randomness is a function of (seed, epoch): crops, augmentation and case
order are re-seeded at the start of every epoch, so a run resumed from a
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fedseg.errors import FedsegError
from fedseg.evaluation.dice import dice_coefficient
from fedseg.inference import sliding_window_logits
from fedseg.training.augment import training_transforms
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays

LossFn = Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced; ``weights`` are CPU copies, safe to send or store."""

    epoch: int
    weights: dict[str, torch.Tensor]
    num_samples: int  # training cases (what sample-weighted FedAvg weights by)
    val_dice: float
    train_loss: float
    learning_rate: float
    seconds: float


def soft_dice_loss() -> LossFn:
    """Soft Dice on the prostate channel, computed over the whole batch.

    Batch Dice keeps background-only crops from producing 0/0 terms.
    """
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    return lambda logits, target, _model: dice(logits, target)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 32-bit seed for (seed, epoch, stream), as MONAI's set_random_state wants."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class LocalTrainer:
    """One site's model, optimiser and scheduler for one fold.

    Args:
        model: the network (see :func:`fedseg.models.build_model`).
        train_cases, val_cases: prepared cases in memory.
        config: hyper-parameters.
        loss: ``loss(logits, target, model)``; soft Dice by default. The model
            is passed so that a wrapper can add a term on the weights (FedProx).
    """

    def __init__(
        self,
        model: nn.Module,
        train_cases: list[CaseArrays],
        val_cases: list[CaseArrays],
        config: TrainConfig,
        loss: LossFn | None = None,
    ) -> None:
        if not train_cases:
            raise FedsegError("no training cases")
        self.model = model
        self.train_cases = train_cases
        self.val_cases = val_cases
        self.config = config
        self.loss = loss or soft_dice_loss()
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.scheduler = ReduceLROnPlateau(
            self.optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
        )
        self.epoch = 0  # epochs completed
        self._crop, self._augment = training_transforms(
            config.patch, config.samples_per_volume, config.pos_neg_ratio, config.augment
        )

    # ---------------------------------------------------------------- one epoch

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None) -> EpochResult:
        """Train one epoch (starting from ``weights`` if given), validate, step the scheduler."""
        start = time.perf_counter()
        if weights is not None:
            self.set_weights(weights)
        train_loss = self.train_one_epoch()
        val_dice = self.validate()
        self.scheduler.step(val_dice)
        self.epoch += 1
        return EpochResult(
            epoch=self.epoch,
            weights=self.get_weights(),
            num_samples=len(self.train_cases),
            val_dice=val_dice,
            train_loss=train_loss,
            learning_rate=float(self.optimizer.param_groups[0]["lr"]),
            seconds=time.perf_counter() - start,
        )

    def train_one_epoch(self) -> float:
        """One pass over the training cases; returns the mean loss."""
        self.model.train()
        losses = []
        for images, labels in self._batches(self.epoch):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model(images), labels, self.model)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Dice over the validation cases, sliding window over whole volumes.

        Computed on the prepared (isotropic) grid: a training-time metric.
        Final evaluation maps predictions back to each case's original grid.
        """
        if not self.val_cases:
            return float("nan")
        self.model.eval()
        scores = []
        for case in self.val_cases:
            image = torch.from_numpy(case.image)[None]
            logits = sliding_window_logits(self.model, image, self.config.patch, self.config.sw_batch_size, self.config.sw_overlap)
            prediction = logits.argmax(dim=1)[0].numpy() > 0
            scores.append(dice_coefficient(prediction, case.label[0] > 0))
        self.model.train()
        return float(np.mean(scores))

    # ---------------------------------------------------------------- batches

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented patch batches for ``epoch``, deterministic in (seed, epoch)."""
        self._crop.set_random_state(epoch_seed(self.config.seed, epoch, stream=0))
        self._augment.set_random_state(epoch_seed(self.config.seed, epoch, stream=1))
        order = np.random.default_rng(epoch_seed(self.config.seed, epoch, stream=2)).permutation(len(self.train_cases))
        pending: list[dict] = []
        for index in order:
            case = self.train_cases[index]
            for patch in self._crop({"image": case.image, "label": case.label}):
                pending.append(self._augment(patch))
                if len(pending) == self.config.batch_size:
                    yield _stack(pending)
                    pending = []
        if pending:
            yield _stack(pending)

    # ---------------------------------------------------------------- state

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

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

    def restore(self, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler_state: dict, epoch: int) -> None:
        """Continue from a checkpoint written after ``epoch`` completed epochs."""
        self.set_weights(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        self.epoch = epoch


def _stack(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples]).float()
    labels = torch.stack([torch.as_tensor(s["label"]).as_subclass(torch.Tensor) for s in samples]).float()
    return images.contiguous(), labels.contiguous()
