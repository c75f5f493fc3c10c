"""FedProx loss wrapper: the proximal term by hand, and its pull toward the global model."""

from __future__ import annotations

import pytest
import torch

from fedseg.errors import FedsegError
from fedseg.training.fedprox import FedProxLoss


def zero_loss(logits, target, model):
    return (logits * 0).sum()


def test_term_matches_hand_computation():
    model = torch.nn.Linear(2, 1, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    loss = FedProxLoss(zero_loss, mu=0.1)
    loss.set_anchor({"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([0.0])})
    # 0.1 / 2 * (1^2 + 2^2 + 0.5^2) = 0.05 * 5.25
    assert float(loss.proximal_term(model).detach()) == pytest.approx(0.2625)
    logits = model(torch.ones(1, 2))
    assert float(loss(logits, None, model).detach()) == pytest.approx(0.2625)


def test_zero_at_the_anchor_and_with_mu_zero():
    model = torch.nn.Linear(3, 2)
    loss = FedProxLoss(zero_loss, mu=1.0)
    loss.set_anchor(dict(model.named_parameters()))
    assert float(loss.proximal_term(model).detach()) == 0.0
    assert float(FedProxLoss(zero_loss, mu=0.0).proximal_term(model).detach()) == 0.0


def test_gradient_pulls_weights_toward_the_anchor():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    loss = FedProxLoss(zero_loss, mu=1.0)
    loss.set_anchor({"weight": torch.tensor([[1.0]])})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        loss(model(torch.ones(1, 1)), None, model).backward()
        optimizer.step()
    assert abs(float(model.weight.detach()) - 1.0) < 0.3


def test_anchor_is_required_and_mu_validated():
    with pytest.raises(FedsegError, match="set_anchor"):
        FedProxLoss(zero_loss, mu=0.5).proximal_term(torch.nn.Linear(1, 1))
    with pytest.raises(FedsegError, match="mu"):
        FedProxLoss(zero_loss, mu=-1.0)
