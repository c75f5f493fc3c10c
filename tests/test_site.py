"""fedseg.site.TorchParticipant: numpy in, torch once, FedProx anchored to each round's global model, numpy out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cube_case

from fedseg.models import build_model
from fedseg.site import TorchParticipant
from fedseg.training.augment import AugmentConfig
from fedseg.training.config import TrainConfig
from fedseg.training.engine import EpochResult, LocalTrainer, training_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = TrainConfig(
    patch_size=(16, 16, 8), batch_size=2, samples_per_volume=1, sw_batch_size=2, learning_rate=1e-2, threads=1,
    augment=AugmentConfig.off(),
)


class Spy:
    """A LocalTrainer wrapper that records how it was called and what FedProx was anchored to."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer
        self.calls: list[tuple[bool, bool | None]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None, validate: bool | None = None) -> EpochResult:
        self.calls.append((weights is not None, validate))
        result = self.trainer.run_epoch(weights, validate)
        self.anchors.append({k: v.clone() for k, v in self.trainer.loss._anchor.items()})  # type: ignore[attr-defined]
        return result


def global_model(seed: int) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in build_model(CONFIG.network, seed=seed).state_dict().items()}


def test_rounds_anchor_fedprox_to_the_global_model_and_send_numpy() -> None:
    trainer = LocalTrainer(build_model(CONFIG.network, seed=0), [cube_case(0)], [cube_case(10)], CONFIG, loss=training_loss(0.5))
    spy = Spy(trainer)
    participant = TorchParticipant(spy)  # type: ignore[arg-type]
    parameters = {name for name, _ in trainer.model.named_parameters()}
    for round_, seed in enumerate((1, 2)):
        weights = global_model(seed)
        received = {k: v.copy() for k, v in weights.items()}
        update = participant.train(weights, round_, epochs=2)
        # the global weights went into the first epoch only, the last epoch was validated
        assert spy.calls[-2:] == [(True, None), (False, True)]
        # both epochs of the round were pulled towards this round's global model, not the first epoch's result
        for anchor in spy.anchors[-2:]:
            assert all(np.array_equal(anchor[name].numpy(), weights[name]) for name in parameters)
        assert all(np.array_equal(weights[k], received[k]) for k in weights)  # the received arrays are not trained in place
        assert update.weights.keys() == weights.keys()
        assert all(isinstance(a, np.ndarray) and a.dtype == weights[k].dtype for k, a in update.weights.items())
        assert not all(np.array_equal(update.weights[k], weights[k]) for k in parameters)  # it trained
        assert update.num_samples == 1 and 0.0 <= update.val_dice <= 1.0 and set(update.metrics) == {"train_loss"}
    assert trainer.epoch == 4


class Outputs:
    def __init__(self) -> None:
        self.models: list[tuple[str, int | None, float | None]] = []

    def on_model(self, name: str, round_: int | None, weights: dict[str, np.ndarray], val_dice: float | None) -> None:
        self.models.append((name, round_, val_dice))

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        return {"case": float(len(weights))}


def test_end_of_study_goes_to_the_outputs() -> None:
    outputs = Outputs()
    participant = TorchParticipant(object(), outputs)  # type: ignore[arg-type]
    participant.keep_model("best", 3, {"w": np.zeros(2)}, 0.8)
    assert outputs.models == [("best", 3, 0.8)]
    assert participant.evaluate({"w": np.zeros(2), "b": np.zeros(1)}) == {"case": 2.0}
    alone = TorchParticipant(object())  # type: ignore[arg-type]
    alone.keep_model("final", 3, {"w": np.zeros(2)}, None)
    assert alone.evaluate({"w": np.zeros(2)}) is None


def test_a_restarted_site_continues_from_the_saved_optimiser_state(tmp_path) -> None:
    """Round 1 after a restart equals round 1 of an uninterrupted site: optimiser, schedule and epochs restored."""

    def participant(state_dir=None) -> TorchParticipant:
        trainer = LocalTrainer(build_model(CONFIG.network, seed=0), [cube_case(0)], [cube_case(10)], CONFIG)
        return TorchParticipant(trainer, state_dir=state_dir)

    start = global_model(seed=1)
    uninterrupted = participant()
    first = uninterrupted.train(start, 0, 1)
    second = uninterrupted.train(first.weights, 1, 1)

    before = participant(tmp_path / "state")
    assert before.train(start, 0, 1).val_dice == pytest.approx(first.val_dice)
    after = participant(tmp_path / "state")  # a new process: a fresh trainer, the saved state on disk
    resumed = after.train(first.weights, 1, 1)
    assert after.trainer.epoch == 2
    for name, array in second.weights.items():
        np.testing.assert_allclose(resumed.weights[name], array, rtol=1e-5, atol=1e-6)

    fresh = participant(tmp_path / "state")  # the saved round is 1: a TRAIN of round 5 starts afresh
    fresh.train(first.weights, 5, 1)
    assert fresh.trainer.epoch == 1
