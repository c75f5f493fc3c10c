"""``[train] init = "phantom"``: starting weights trained by fedseg on its own phantom, cached with provenance."""

from __future__ import annotations

import json

import pytest
import torch

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.training import pretrain
from fedseg.training.augment import AugmentConfig
from fedseg.training.config import TrainConfig
from fedseg.training.fit import TrainingSet, train_fold
from fedseg.training.pretrain import phantom_provenance, starting_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREPARE = PrepareConfig(spacing_mm=6.0)
TINY_RECIPE = {**pretrain.PHANTOM_RECIPE, "sites": ["suny", "ucla"], "cases_per_site": 3, "validation_cases_per_site": 1,
               "resolution_scale": 4.0, "epochs": 2, "stop_patience": None, "min_val_dice": 0.0}


def config(**changes) -> TrainConfig:
    base = TrainConfig(patch_size=(16, 16, 8), batch_size=2, samples_per_volume=1, sw_batch_size=2, epochs=2,
                       learning_rate=1e-2, augment=AugmentConfig.off(), init="phantom")
    return base.replace(**changes)


@pytest.fixture
def tiny_recipe(monkeypatch):
    monkeypatch.setattr(pretrain, "PHANTOM_RECIPE", TINY_RECIPE)


def test_a_random_start_needs_no_weights(tmp_path):
    assert starting_weights(config(init="random"), PREPARE, tmp_path) is None
    assert phantom_provenance(config(init="random"), PREPARE, tmp_path) is None
    assert not (tmp_path / "init").exists()


def test_phantom_weights_are_made_once_cached_and_described(tmp_path, tiny_recipe, monkeypatch):
    said = []
    weights = starting_weights(config(), PREPARE, tmp_path, say=said.append)
    folders = list((tmp_path / "init").glob("phantom-*/weights.safetensors"))
    assert len(folders) == 1 and not list((tmp_path / "init").glob("*.work"))  # synthetic scans removed
    assert any("synthesising 2 phantom institutions" in line for line in said)
    provenance = phantom_provenance(config(), PREPARE, tmp_path)
    assert provenance["recipe"]["sites"] == ["suny", "ucla"] and provenance["prepare"]["spacing_mm"] == 6.0
    assert "no scan of any site" in provenance["data"] and provenance["epochs"] == 2

    def no_training(*_args, **_kwargs):
        raise AssertionError("the cached weights should have been reused")

    monkeypatch.setattr("fedseg.training.fit.train_fold", no_training)
    again = starting_weights(  # none of these is part of the recipe
        config(epochs=50, seed=7, threads=1, samples_per_volume=16, learning_rate=1e-3), PREPARE, tmp_path
    )
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)


def test_another_network_patch_or_voxel_size_gets_its_own_weights(tmp_path, tiny_recipe):
    starting_weights(config(), PREPARE, tmp_path)
    starting_weights(config(patch_size=(16, 16, 16)), PREPARE, tmp_path)
    starting_weights(config(), PrepareConfig(spacing_mm=8.0), tmp_path)
    assert len(list((tmp_path / "init").glob("phantom-*/weights.safetensors"))) == 3


def test_a_prior_that_learnt_nothing_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "PHANTOM_RECIPE", {**TINY_RECIPE, "epochs": 1, "min_val_dice": 1.01})
    with pytest.raises(FedsegError, match="pre-training reached validation Dice"):
        starting_weights(config(), PREPARE, tmp_path)
    assert not list((tmp_path / "init").glob("phantom-*/weights.safetensors"))


def test_a_new_fold_starts_from_the_given_weights_and_a_resumed_one_from_its_checkpoint(tmp_path):
    from conftest import cube_case

    cfg = config(init="random", learning_rate=1e-12, epochs=1)  # Adam moves each weight by ~lr: it stays put
    start = {k: torch.full_like(v, 0.01) if v.is_floating_point() else v for k, v in _fresh_state(cfg).items()}
    cases = [cube_case(i) for i in range(3)]
    training = TrainingSet("cubes", cases, [cube_case(9)], "fp", [{"site": "cubes", "source": "memory"}])
    train_fold(training, tmp_path, cfg, init_weights=start)
    from fedseg.training.checkpoint import load_weights

    after = load_weights(tmp_path / "last.safetensors")
    assert all(torch.allclose(after[k].float(), start[k].float(), atol=1e-6) for k in start if start[k].is_floating_point())
    train_fold(training, tmp_path, cfg.replace(epochs=2), init_weights=_fresh_state(cfg))  # resumes: init ignored
    resumed = load_weights(tmp_path / "last.safetensors")
    assert all(torch.allclose(resumed[k].float(), start[k].float(), atol=1e-6) for k in start if start[k].is_floating_point())


def _fresh_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    from fedseg.models import build_model

    return build_model(cfg.network, seed=cfg.seed).state_dict()


def test_unknown_init_is_named():
    with pytest.raises(FedsegError, match="train.init must be one of random, phantom"):
        config(init="imagenet")


def test_model_json_records_the_provenance(tmp_path, tiny_recipe):
    from fedseg.modeldir import model_record

    starting_weights(config(), PREPARE, tmp_path)
    record = model_record(config(), PREPARE, [], phantom_provenance(config(), PREPARE, tmp_path))
    assert record["init"]["init"] == "phantom" and record["train_config"]["init"] == "phantom"
    json.dumps(record)


def test_the_servers_round_0_model_is_the_phantom_start(tmp_path, tiny_recipe):
    """With init = "phantom" the federated study's global model starts from the same weights as the private ones."""
    import numpy as np

    from fedseg.federation.deploy.serverrun import initial_global_weights

    cfg = config()
    phantom = starting_weights(cfg, PREPARE, tmp_path)
    global_weights = initial_global_weights(cfg, PREPARE, tmp_path)
    assert global_weights.keys() == phantom.keys()
    assert all(np.array_equal(global_weights[k], phantom[k].numpy()) for k in phantom)
    seeded = initial_global_weights(cfg.replace(init="random"), PREPARE, tmp_path)
    assert not all(np.array_equal(seeded[k], global_weights[k]) for k in seeded)
