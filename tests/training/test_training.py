"""Training: the engine learns, is reproducible, resumes exactly, and stores checkpoints without pickle."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from conftest import cube_case
from fedseg.errors import FedsegError
from fedseg.models import build_model
from fedseg.training.augment import AugmentConfig
from fedseg.training.checkpoint import load_checkpoint, save_checkpoint
from fedseg.training.config import TrainConfig, load_train_config
from fedseg.training.engine import LocalTrainer
from fedseg.training.fit import TrainingSet, train_fold

PATCH = (16, 16, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")



TRAIN = [cube_case(i) for i in range(3)]
VAL = [cube_case(10)]


def config(**changes) -> TrainConfig:
    """A tiny, fast configuration (unet-small, 16x16x8 patches)."""
    base = TrainConfig(
        patch_size=PATCH, batch_size=2, samples_per_volume=1, sw_batch_size=2, epochs=3, learning_rate=1e-2
    )
    return base.replace(**changes)


def trainer(cfg: TrainConfig, seed: int | None = None) -> LocalTrainer:
    return LocalTrainer(build_model(cfg.network, seed=cfg.seed if seed is None else seed), TRAIN, VAL, cfg)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def training_set(fingerprint: str = "data-v1") -> TrainingSet:
    return TrainingSet("cubes", TRAIN, VAL, fingerprint, [{"site": "cubes", "source": "memory"}])


def folder_state(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------- engine


def test_training_loss_falls_on_easy_data():
    """Soft-Dice loss of the last epochs is clearly below that of the first: the loop really optimises."""
    cfg = config(samples_per_volume=2, augment=AugmentConfig.off())
    local = trainer(cfg)
    losses = [local.train_one_epoch() for _ in range(6)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.75 * losses[0], losses


def test_same_seed_same_weights_other_seed_differs():
    """Two independent runs with one seed give bit-identical weights (augmentation on); another seed does not."""
    cfg = config(augment=AugmentConfig())
    runs = []
    for seed in (3, 3, 4):
        local = trainer(cfg.replace(seed=seed))
        local.run_epoch()
        runs.append(local.run_epoch().weights)
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])


def test_run_epoch_starts_from_given_weights():
    """run_epoch(weights=W) trains exactly as a trainer whose model already held W (the federated hand-over)."""
    cfg = config(augment=AugmentConfig.off())
    own = trainer(cfg, seed=0).run_epoch()
    handed = trainer(cfg, seed=1).run_epoch(weights=build_model(cfg.network, seed=0).state_dict())
    assert same_weights(own.weights, handed.weights)
    assert own.train_loss == handed.train_loss


def test_epoch_result_fields():
    """num_samples counts training cases (FedAvg weights by it); val_dice is a Dice; weights are CPU copies."""
    local = trainer(config(augment=AugmentConfig.off()))
    result = local.run_epoch()
    assert result.epoch == 1 and local.epoch == 1
    assert result.num_samples == len(TRAIN)
    assert 0.0 <= result.val_dice <= 1.0
    assert np.isfinite(result.train_loss) and result.learning_rate == pytest.approx(1e-2)
    name = next(iter(result.weights))
    result.weights[name].add_(1.0)  # a copy: changing it leaves the model alone
    assert not torch.equal(result.weights[name], local.model.state_dict()[name])


def test_weights_that_do_not_fit_are_refused():
    """Wrong parameter names or shapes raise FedsegError and leave the model untouched."""
    local = trainer(config())
    before = local.get_weights()
    renamed = {f"x.{k}": v for k, v in before.items()}
    with pytest.raises(FedsegError, match="unexpected"):
        local.run_epoch(weights=renamed)
    name = next(k for k, v in before.items() if v.ndim > 1)
    reshaped = {**before, name: torch.zeros(3, 3)}
    with pytest.raises(FedsegError, match=name.replace(".", r"\.")):
        local.run_epoch(weights=reshaped)
    assert same_weights(before, local.get_weights())


def test_crops_are_a_function_of_seed_and_epoch():
    """The same (seed, epoch) draws the same augmented batches; the next epoch draws others."""
    local = trainer(config(augment=AugmentConfig()))
    first, again, following = (list(local.pipeline.batches(e)) for e in (0, 0, 1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, following))


# ----------------------------------------------------------------- resume


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """3 epochs straight == 2 epochs, stop, resume to 3: same last weights, metrics for epochs 1..3 once each."""
    cfg = config(augment=AugmentConfig())
    straight, resumed = tmp_path / "A", tmp_path / "B"
    outcome_a = train_fold(training_set(), straight, cfg)
    train_fold(training_set(), resumed, cfg.replace(epochs=2))
    outcome_b = train_fold(training_set(), resumed, cfg)
    assert outcome_a.resumed_from == 0 and outcome_b.resumed_from == 2
    assert outcome_a.epochs == outcome_b.epochs == 3
    weights_a, sidecar_a, optim_a = load_checkpoint(straight, "last")
    weights_b, sidecar_b, optim_b = load_checkpoint(resumed, "last")
    assert same_weights(weights_a, weights_b)
    assert sidecar_a["scheduler"] == sidecar_b["scheduler"]
    assert (outcome_a.best_epoch, outcome_a.best_val_dice) == (outcome_b.best_epoch, outcome_b.best_val_dice)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert len((resumed / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_resume_drops_metrics_of_epochs_after_the_checkpoint(tmp_path):
    """Killed after logging epoch 2 but before its checkpoint: the resumed run logs epoch 2 once, anew."""
    cfg = config(augment=AugmentConfig.off())
    fold_dir = tmp_path / "fold0"
    train_fold(training_set(), fold_dir, cfg.replace(epochs=1))
    with (fold_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"epoch": 2, "train_loss": 123.0, "val_dice": 0.0}) + "\n")
    train_fold(training_set(), fold_dir, cfg.replace(epochs=2))
    rows = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_loss"] != 123.0


@pytest.mark.parametrize(
    ("change", "message"),
    [({"learning_rate": 5e-3}, "configuration"), ({"fingerprint": "data-v2"}, "other data")],
    ids=["config", "data"],
)
def test_resume_refuses_other_config_or_data(tmp_path, change, message):
    """A fold folder holding another run is never continued or overwritten."""
    cfg = config(epochs=1, augment=AugmentConfig.off())
    fold_dir = tmp_path / "fold0"
    train_fold(training_set(), fold_dir, cfg)
    before = folder_state(fold_dir)
    fingerprint = change.pop("fingerprint", "data-v1")
    with pytest.raises(FedsegError, match=message):
        train_fold(training_set(fingerprint), fold_dir, cfg.replace(epochs=2, **change))
    assert folder_state(fold_dir) == before


# ----------------------------------------------------------------- checkpoints


def _adam_after_steps() -> tuple[torch.nn.Module, torch.optim.Adam, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer, scheduler


def test_checkpoint_round_trip_restores_weights_and_adam(tmp_path):
    """Weights, Adam moments/steps and hyper-parameters come back; the optimizer accepts them."""
    model, optimizer, scheduler = _adam_after_steps()
    assert scheduler.state_dict()["best"] == float("-inf")
    save_checkpoint(tmp_path, "last", model.state_dict(), {"epoch": 2, "scheduler": scheduler.state_dict()}, optimizer.state_dict())
    weights, sidecar, optim_state = load_checkpoint(tmp_path, "last")
    assert same_weights(weights, model.state_dict())
    assert sidecar["epoch"] == 2 and sidecar["scheduler"]["best"] == float("-inf")
    original = optimizer.state_dict()
    assert optim_state["param_groups"] == original["param_groups"]
    assert isinstance(optim_state["param_groups"][0]["betas"], tuple)
    assert original["state"].keys() == optim_state["state"].keys()
    for index, entries in original["state"].items():
        assert entries.keys() == optim_state["state"][index].keys()
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(optim_state["state"][index][k])) for k, v in entries.items())
    _, fresh, fresh_scheduler = _adam_after_steps()
    fresh.load_state_dict(optim_state)
    fresh_scheduler.load_state_dict(sidecar["scheduler"])
    assert fresh_scheduler.best == float("-inf")


def test_checkpoint_files_are_strict_json_and_safetensors(tmp_path):
    """No pickle anywhere: the sidecar is strict JSON despite -inf; tensor files are safetensors (u64 length + JSON header)."""
    model, optimizer, scheduler = _adam_after_steps()
    save_checkpoint(tmp_path, "ck", model.state_dict(), {"scheduler": scheduler.state_dict()}, optimizer.state_dict())

    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    json.loads((tmp_path / "ck.json").read_text(), parse_constant=refuse)
    for name in ("ck.safetensors", "ck.optim.safetensors"):
        raw = (tmp_path / name).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert 0 < length < len(raw)
        assert isinstance(json.loads(raw[8 : 8 + length]), dict)
    assert not list(tmp_path.glob("*.partial"))


def test_corrupt_weights_file_is_a_fedseg_error_naming_it(tmp_path):
    model, optimizer, _ = _adam_after_steps()
    save_checkpoint(tmp_path, "ck", model.state_dict(), {}, optimizer.state_dict())
    (tmp_path / "ck.safetensors").write_bytes(b"\x00garbage, not a tensor file")
    with pytest.raises(FedsegError, match="ck.safetensors"):
        load_checkpoint(tmp_path, "ck")


# ----------------------------------------------------------------- configuration and models


def test_train_config_from_toml_with_augment_table(tmp_path):
    """[train] with an [train.augment] subtable; lists become tuples; unspecified fields keep defaults."""
    path = tmp_path / "run.toml"
    path.write_text(
        "[prepare]\nspacing_mm = 2.0\n\n"
        "[train]\nepochs = 7\nlearning_rate = 0.001\npatch_size = [16, 16, 8]\nseed = 5\n\n"
        "[train.augment]\nnoise_prob = 0.0\nblur_sigma = [0.5, 0.75]\n"
    )
    cfg = load_train_config(path)
    assert (cfg.epochs, cfg.learning_rate, cfg.patch, cfg.seed) == (7, 0.001, PATCH, 5)
    assert cfg.augment == AugmentConfig(noise_prob=0.0, blur_sigma=(0.5, 0.75))
    assert cfg.batch_size == TrainConfig().batch_size
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what a sidecar stores reads back


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[train]\nepoch = 3\n", "epoch"),
        ("[train]\n[train.augment]\nnoise = 0.5\n", "noise"),
        ("[train]\npatch_size = [20, 16, 8]\n", "patch size"),
        ("[train]\nepochs = 0\n", "epochs"),
        ("[train\n", "cannot read TOML"),
    ],
    ids=["unknown-key", "unknown-augment-key", "bad-patch", "zero-epochs", "broken-toml"],
)
def test_bad_train_config_is_a_fedseg_error(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FedsegError, match=named):
        load_train_config(path)


def test_patch_must_suit_the_network():
    with pytest.raises(FedsegError, match="multiple of"):
        TrainConfig(patch_size=(16, 16, 12))
    assert TrainConfig(network="unet", patch_size=(32, 32, 16)).patch == (32, 32, 16)
    assert TrainConfig().patch == (64, 64, 32)  # the network's default


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second, other = (build_model("unet-small", seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert same_weights(first, second)
    assert not same_weights(first, other)


def test_unknown_network_lists_the_choices():
    with pytest.raises(FedsegError, match="unet-small, unet, ahnet"):
        build_model("resnet")
    with pytest.raises(FedsegError, match="unet-small"):
        TrainConfig(network="nope")


# ----------------------------------------------------------------- regressions


def test_config_threads_are_applied_during_training(tmp_path, monkeypatch):
    """A [train] threads = N setting must govern torch's intra-op threads while the fold trains."""
    seen = []
    monkeypatch.setattr(LocalTrainer, "train_one_epoch", lambda self, new_anchor=False: seen.append(torch.get_num_threads()) or 0.5)
    monkeypatch.setattr(LocalTrainer, "validate", lambda self: 0.5)
    wanted = torch.get_num_threads() + 1
    try:
        train_fold(training_set(), tmp_path / "fold0", config(epochs=1, threads=wanted))
    finally:
        torch.set_num_threads(1)
    assert seen == [wanted]


def test_fresh_start_does_not_keep_stale_metrics(tmp_path):
    """Killed between the first metrics row and the first checkpoint, a rerun must not log epoch 1 twice."""
    fold_dir = tmp_path / "fold0"
    fold_dir.mkdir()
    (fold_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.9, "val_dice": 0.1}) + "\n")
    train_fold(training_set(), fold_dir, config(epochs=1, augment=AugmentConfig.off()))
    rows = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_sidecar_strings_that_look_like_floats_stay_strings(tmp_path):
    """A case or site literally named 'nan' or 'inf' must survive a JSON round trip."""
    from fedseg.io import read_json, write_json

    data = {"train_cases": ["nan", "case01"], "trained_on": [{"site": "inf"}], "best": float("-inf")}
    write_json(tmp_path / "x.json", data)
    assert read_json(tmp_path / "x.json") == data


@pytest.mark.parametrize(("name", "low", "high"), [("unet-small", 0.1e6, 0.2e6), ("ahnet", 37e6, 39e6)])
def test_network_sizes_match_the_documentation(name, low, high):
    """`ahnet` is the paper's 38 M-parameter 3-D AH-Net; `unet-small` stays CPU-sized."""
    parameters = sum(p.numel() for p in build_model(name).parameters())
    assert low < parameters < high


def test_ahnet_patch_depth_must_be_a_multiple_of_32():
    """16 and 48 pass a 'multiple of 16' check but fail inside MONAI's AHNet: the check must refuse them."""
    for depth in (16, 48):
        with pytest.raises(FedsegError, match="multiple of"):
            TrainConfig(network="ahnet", patch_size=(128, 128, depth))
    TrainConfig(network="ahnet", patch_size=(128, 128, 64))


# ----------------------------------------------------------------- plateau stopping


def scripted_validation(monkeypatch, dice: list[float]) -> None:
    """Every validation returns the next value of ``dice``: a plateau drawn by hand."""
    values = iter(dice)
    monkeypatch.setattr(LocalTrainer, "validate", lambda self: next(values))


def test_training_stops_on_a_validation_plateau(tmp_path, monkeypatch):
    """Best at epoch 2, then two epochs without better Dice: stop_patience = 2 ends the fold after epoch 4 of 10."""
    scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.99])
    outcome = train_fold(training_set(), tmp_path, config(epochs=10, stop_patience=2, augment=AugmentConfig.off()))
    assert (outcome.epochs, outcome.best_epoch, outcome.best_val_dice, outcome.stopped_early) == (4, 2, 0.6, True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_a_stopped_fold_stays_stopped_and_a_longer_patience_continues_it(tmp_path, monkeypatch):
    """Rerun with the same patience: nothing trains; with a longer one it resumes and stops on the new rule."""
    cfg = config(epochs=12, stop_patience=2, augment=AugmentConfig.off())
    scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.58])
    train_fold(training_set(), tmp_path, cfg)
    again = train_fold(training_set(), tmp_path, cfg)  # validate() would raise StopIteration if it ran
    assert (again.epochs, again.resumed_from, again.stopped_early) == (4, 4, True)
    scripted_validation(monkeypatch, [0.57, 0.7, 0.6, 0.6, 0.6, 0.6])
    longer = train_fold(training_set(), tmp_path, cfg.replace(stop_patience=4))
    assert (longer.epochs, longer.best_epoch, longer.best_val_dice, longer.stopped_early) == (10, 6, 0.7, True)


def test_without_stop_patience_every_epoch_is_trained(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.9, 0.1, 0.1, 0.1])
    outcome = train_fold(training_set(), tmp_path, config(epochs=4, augment=AugmentConfig.off()))
    assert (outcome.epochs, outcome.stopped_early) == (4, False)


def test_training_done_rule():
    cfg = config(epochs=10, stop_patience=3)
    assert not cfg.training_done(0, 0) and not cfg.training_done(5, 3) and cfg.training_done(6, 3)
    assert cfg.training_done(10, 10) and not cfg.stopped_early(10, 2) and cfg.stopped_early(6, 3)
    assert not config(epochs=10).training_done(9, 1)
    with pytest.raises(FedsegError, match="stop_patience"):
        config(stop_patience=0)


def test_metrics_are_strict_json_without_validation_cases(tmp_path):
    """No validation cases: the Dice is NaN, written as null in metrics.jsonl and tagged in the sidecars, never as NaN."""
    fold_dir = tmp_path / "fold0"
    outcome = train_fold(TrainingSet("cubes", TRAIN, [], "data-v1", []), fold_dir, config(epochs=2, augment=AugmentConfig.off()))
    assert np.isnan(outcome.best_val_dice) and outcome.best_epoch == 2  # the latest epoch is the best one known

    def refuse(name):
        raise AssertionError(f"{name} written to strict JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_dice"] for r in rows] == [None, None] and all(r["train_loss"] is not None for r in rows)
    for sidecar in ("best.json", "last.json"):
        json.loads((fold_dir / sidecar).read_text(), parse_constant=refuse)
    assert (fold_dir / "metrics.csv").read_text().splitlines()[0] == "epoch,train_loss,val_dice,learning_rate,seconds,device"
