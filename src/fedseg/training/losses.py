"""The training loss: soft Dice on the prostate channel over the whole batch.

Numerically the same as MONAI's ``DiceLoss(to_onehot_y=True, softmax=True,
include_background=False, batch=True)`` (tested), written from its sums so
that a batch split over several processes (DDP) still gets the Dice of the
*whole* batch: each process sums intersection and volumes over its share,
the sums are added across processes, and every process gets the global
loss. Batch Dice keeps background-only crops from producing 0/0 terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
"""``loss(logits, target, model)``; the (unwrapped) model lets a wrapper add a term on the weights (FedProx)."""

SumAcross = Callable[[torch.Tensor], torch.Tensor]
"""Sum of a tensor over every process of a data-parallel group (detached result)."""

SMOOTH = 1e-5  # MONAI's smooth_nr = smooth_dr


class SoftDiceLoss:
    """``1 - (2 Σ p·t + s) / (Σ p + Σ t + s)`` over batch and voxels, p = softmax foreground probability.

    Args:
        sum_across: with data parallelism, adds the three sums over the
            processes (their gradient flows through this process's share only);
            None for one process.
        world_size: number of processes. DDP averages gradients over
            processes, so each one's gradient is scaled by ``world_size`` to make
            the average the gradient of the whole batch's loss.

    Shapes: logits (B, 2, X, Y, Z), target (B, 1, X, Y, Z) with values 0/1.
    """

    def __init__(self, sum_across: SumAcross | None = None, world_size: int = 1) -> None:
        self.sum_across = sum_across
        self.world_size = world_size

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, _model: nn.Module | None = None) -> torch.Tensor:
        foreground = torch.softmax(logits.float(), dim=1)[:, 1:2]
        target = target.float()
        sums = torch.stack([(foreground * target).sum(), foreground.sum(), target.sum()])
        if self.sum_across is None:
            return _dice(sums)
        total = self.sum_across(sums.detach())
        # value: the global loss; gradient: world_size x d(global loss)/d(this process's sums)
        global_sums = sums + (total - sums).detach()
        loss = _dice(global_sums)
        return self.world_size * loss - (self.world_size - 1) * loss.detach()


def _dice(sums: torch.Tensor) -> torch.Tensor:
    intersection, predicted, truth = sums[0], sums[1], sums[2]
    return 1.0 - (2.0 * intersection + SMOOTH) / (predicted + truth + SMOOTH)


def soft_dice_loss(sum_across: SumAcross | None = None, world_size: int = 1) -> LossFn:
    """The paper's soft Dice loss (see :class:`SoftDiceLoss`)."""
    return SoftDiceLoss(sum_across, world_size)
