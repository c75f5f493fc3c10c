"""FedProx (Li et al., MLSys 2020) as a loss wrapper for the local trainer.

A federated client adds ``mu / 2 * ||w - w_global||^2`` to its local loss so
that sites with very different data do not drift far from the round's global
model. The term needs the global weights of the current round: call
:meth:`FedProxLoss.set_anchor` with them before each round's epoch, then pass
the wrapper as ``LocalTrainer(loss=...)``. With ``mu = 0`` it is the plain loss.
"""

from __future__ import annotations

import torch
from torch import nn

from fedseg.errors import FedsegError
from fedseg.training.losses import LossFn


class FedProxLoss:
    """``base(logits, target, model) + mu / 2 * sum((p - anchor)^2)`` over trainable parameters."""

    def __init__(self, base: LossFn, mu: float) -> None:
        if not mu >= 0:
            raise FedsegError(f"FedProx mu must be >= 0, got {mu}")
        self.base = base
        self.mu = float(mu)
        self._anchor: dict[str, torch.Tensor] = {}

    def set_anchor(self, weights: dict[str, torch.Tensor]) -> None:
        """Remember the round's global weights (detached copies, on the weights' own device)."""
        self._anchor = {name: tensor.detach().clone() for name, tensor in weights.items()}

    def proximal_term(self, model: nn.Module) -> torch.Tensor:
        """``mu / 2 * ||w - w_anchor||^2`` (a zero tensor when mu is 0)."""
        parameters = list(model.named_parameters())
        total = torch.zeros((), device=parameters[0][1].device if parameters else None)
        if self.mu == 0:
            return total
        if not self._anchor:
            raise FedsegError("FedProx needs the round's global weights: call set_anchor() first")
        for name, parameter in parameters:
            if parameter.requires_grad:
                total = total + ((parameter - self._anchor[name].to(parameter.device)) ** 2).sum()
        return 0.5 * self.mu * total

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return self.base(logits, target, model) + self.proximal_term(model)
