"""Devices and precision: resolution and clear errors, device-agnostic weights, the loss, val_every, what is recorded.

The CUDA tests run only where PyTorch sees a GPU (never faked); the same
paths are exercised on the CPU by the others.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.losses import DiceLoss

from conftest import cube_case, write_site
from fedseg.errors import FedsegError
from fedseg.models import build_model
from fedseg.training.augment import AugmentConfig
from fedseg.training.checkpoint import load_checkpoint
from fedseg.training.config import TrainConfig
from fedseg.training.device import amp_dtype, resolve_device, resolve_hardware
from fedseg.training.engine import LocalTrainer
from fedseg.training.fit import TrainingSet, train_fold
from fedseg.training.losses import SoftDiceLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = [cube_case(i) for i in range(3)]
VAL = [cube_case(10)]
CONFIG = TrainConfig(patch_size=(16, 16, 8), batch_size=2, samples_per_volume=1, sw_batch_size=2, epochs=2, learning_rate=1e-2)
NO_CUDA = not torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")


def training() -> TrainingSet:
    return TrainingSet("cubes", TRAIN, VAL, "cubes-v1", [{"site": "cubes", "source": "memory"}])


# ----------------------------------------------------------------- resolution


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(FedsegError, match=f"device {name} was asked for.*no CUDA GPU.*--device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_names_list_the_choices(name):
    with pytest.raises(FedsegError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)
    with pytest.raises(FedsegError, match="train.device"):
        TrainConfig(device=name)


def test_amp_defaults_on_for_cuda_only_and_is_refused_on_the_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, None) is None and amp_dtype(cpu, False) is None
    with pytest.raises(FedsegError, match="train.amp = true needs a CUDA device"):
        amp_dtype(cpu, True)


def test_cli_device_cuda_without_cuda_is_one_error_line_and_writes_nothing(tmp_path, run_cli):
    if not NO_CUDA:
        pytest.skip("this machine has CUDA")
    site, other = write_site(tmp_path / "site", n_cases=5), write_site(tmp_path / "other", n_cases=5)
    for args in (
        ("train", site, "--out", tmp_path / "m", "--device", "cuda", "--cache", tmp_path / "cache"),
        ("study", "--out", tmp_path / "s", "--device", "cuda"),
        ("federate", site, other, "--out", tmp_path / "f", "--device", "cuda:1", "--cache", tmp_path / "cache"),
        ("predict", tmp_path / "m", site, tmp_path / "p", "--device", "cuda"),
    ):
        code, out, err = run_cli(*args)
        assert code == 1 and err.count("error:") == 1 and "no CUDA GPU" in err, (args, out, err)
    assert not any((tmp_path / name).exists() for name in ("m", "s", "f", "p", "cache"))


# ----------------------------------------------------------------- the loss


def test_soft_dice_equals_monai_dice_loss_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, 4, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8, 4) > 0.6).float()
    ours = SoftDiceLoss()(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    monai = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)(logits, target)
    (grad_monai,) = torch.autograd.grad(monai, logits)
    assert float(ours.detach()) == pytest.approx(float(monai.detach()), abs=1e-6)
    assert torch.allclose(grad_ours, grad_monai, atol=1e-7)


def test_soft_dice_over_two_processes_is_the_whole_batch_dice():
    """Process A holds rows 0-1, B row 2: A's loss is the loss of all 3 rows, its gradient twice A's share (DDP halves it)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 8, 8, 4)
    target = (torch.rand(3, 1, 8, 8, 4) > 0.6).float()
    whole = logits.clone().requires_grad_(True)
    full = SoftDiceLoss()(whole, target)
    (grad_full,) = torch.autograd.grad(full, whole)
    part_b = torch.softmax(logits[2:], dim=1)[:, 1:2]
    sums_b = torch.stack([(part_b * target[2:]).sum(), part_b.sum(), target[2:].sum()])
    part_a = logits[:2].clone().requires_grad_(True)
    loss_a = SoftDiceLoss(sum_across=lambda sums: sums + sums_b, world_size=2)(part_a, target[:2])
    (grad_a,) = torch.autograd.grad(loss_a, part_a)
    assert float(loss_a.detach()) == pytest.approx(float(full.detach()), abs=1e-6)
    assert torch.allclose(grad_a / 2, grad_full[:2], atol=1e-7)


# ----------------------------------------------------------------- weights leave the device as CPU tensors


def test_weights_leave_as_contiguous_cpu_tensors_whatever_the_layout():
    trainer = LocalTrainer(build_model(CONFIG.network), TRAIN, VAL, CONFIG)  # channels-last inside
    assert any(not p.is_contiguous() for p in trainer.model.parameters())
    weights = trainer.run_epoch().weights
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in weights.values())


def test_a_checkpoint_moves_between_layouts_and_devices_unchanged(tmp_path):
    """Saved from a channels-last trainer, loaded into a contiguous one (and back): same weights and moments."""
    fold = tmp_path / "fold0"
    train_fold(training(), fold, CONFIG.replace(epochs=1))
    weights, sidecar, optimizer = load_checkpoint(fold, "last")
    for layout in (False, True):
        other = LocalTrainer(build_model(CONFIG.network), TRAIN, VAL, CONFIG.replace(channels_last=layout))
        other.restore(weights, optimizer, sidecar["scheduler"], sidecar["epoch"])
        again = other.get_weights()
        assert all(torch.equal(weights[k], again[k]) for k in weights)
        for parameter in other.model.parameters():
            for value in other.optimizer.state[parameter].values():
                if value.shape == parameter.shape:
                    assert value.stride() == parameter.stride()  # fused Adam walks both as flat memory


def test_model_json_and_metrics_record_the_device(tmp_path, run_cli):
    site = write_site(tmp_path / "site", n_cases=5)
    config = tmp_path / "t.toml"
    config.write_text("[train]\npatch_size = [16, 16, 8]\nbatch_size = 2\nsamples_per_volume = 1\nthreads = 1\n[prepare]\nspacing_mm = 2.0\n")
    code, out, err = run_cli("train", site, "--out", tmp_path / "m", "--fold", "0", "--epochs", "1", "--device", "cpu",
                             "--config", config, "--cache", tmp_path / "cache")
    assert code == 0, out + err
    assert "training on cpu" in out and "fp32" in out
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    assert record["folds"][0]["trained_with"] == {"device": "cpu", "amp": None, "description": "cpu, fp32", "processes": 1}
    row = json.loads((tmp_path / "m" / "fold0" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["device"] == "cpu"
    code, out, err = run_cli("evaluate", tmp_path / "m", site, "--device", "cpu", "--cache", tmp_path / "cache")
    assert code == 0 and "computing on cpu" in out, out + err


# ----------------------------------------------------------------- val_every


def test_val_every_validates_every_kth_epoch_and_the_last(tmp_path):
    config = CONFIG.replace(epochs=5, val_every=2, augment=AugmentConfig.off())
    seen = []
    outcome = train_fold(training(), tmp_path / "fold0", config, on_epoch=seen.append)
    assert [r.validated for r in seen] == [False, True, False, True, True]
    rows = [json.loads(line) for line in (tmp_path / "fold0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_dice"] is None for r in rows] == [True, False, True, False, False]
    assert outcome.best_epoch in (2, 4, 5)
    scheduler = json.loads((tmp_path / "fold0" / "last.json").read_text())["scheduler"]
    assert scheduler["last_epoch"] == 3  # stepped on the 3 validations only


def test_val_every_must_be_a_positive_integer():
    with pytest.raises(FedsegError, match="val_every"):
        TrainConfig(val_every=0)


def test_resume_accepts_another_device_but_not_another_training_setting(tmp_path):
    fold = tmp_path / "fold0"
    train_fold(training(), fold, CONFIG.replace(epochs=1))
    outcome = train_fold(training(), fold, CONFIG.replace(epochs=2, channels_last=False, device="cpu", threads=1))
    assert outcome.resumed_from == 1
    with pytest.raises(FedsegError, match="another configuration.*val_every"):
        train_fold(training(), fold, CONFIG.replace(epochs=3, val_every=2))


# ----------------------------------------------------------------- on a GPU (skipped here)


@needs_cuda
def test_cuda_training_with_amp_and_a_checkpoint_that_loads_on_the_cpu(tmp_path):
    hardware = resolve_hardware("cuda", None)
    assert hardware.amp_dtype in (torch.bfloat16, torch.float16)
    fold = tmp_path / "fold0"
    train_fold(training(), fold, CONFIG.replace(device="cuda", epochs=2))
    weights, sidecar, optimizer = load_checkpoint(fold, "last")
    assert sidecar["hardware"]["device"].startswith("cuda") and sidecar["hardware"]["amp"] in ("bf16", "fp16")
    cpu = LocalTrainer(build_model(CONFIG.network), TRAIN, VAL, CONFIG.replace(device="cpu"))
    cpu.restore(weights, optimizer, sidecar["scheduler"], sidecar["epoch"], sidecar.get("grad_scaler"))
    assert all(torch.equal(weights[k], cpu.get_weights()[k]) for k in weights)
    assert 0.0 <= cpu.validate() <= 1.0


@needs_cuda
def test_cuda_and_cpu_give_the_same_validation_dice_for_the_same_weights():
    weights = build_model(CONFIG.network).state_dict()
    dice = []
    for device in ("cpu", "cuda"):
        trainer = LocalTrainer(build_model(CONFIG.network), TRAIN, VAL, CONFIG.replace(device=device, amp=False))
        trainer.set_weights(weights)
        dice.append(trainer.validate())
    assert dice[0] == pytest.approx(dice[1], abs=0.02)
