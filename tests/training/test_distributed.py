"""Data parallelism at one site on CPUs (gloo): 2 processes train as 1 does, resume, and fail loudly, never hang."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_site
from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.models import build_model
from fedseg.training.config import TrainConfig
from fedseg.training.data import resolve_site
from fedseg.training.device import Hardware
from fedseg.training.distributed import FollowerSpec, start_data_parallel
from fedseg.training.engine import LocalTrainer
from fedseg.training.fit import training_set

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # DDP: rank 0 starts follower processes

CPU = Hardware(torch.device("cpu"))
PREPARE = PrepareConfig(spacing_mm=1.0)
CONFIG = TrainConfig(
    patch_size=(16, 16, 8), batch_size=4, samples_per_volume=1, sw_batch_size=2, epochs=2, learning_rate=1e-2, threads=1
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    prepared = resolve_site(write_site(root / "site", n_cases=6), PREPARE, root / "cache")
    return prepared, root / "cache"


def spec(site, config: TrainConfig) -> FollowerSpec:
    prepared, cache = site
    return FollowerSpec([str(prepared.prepared)], 0, PREPARE.to_dict(), str(cache), config.to_dict(), "cpu")


def share_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> float:
    """Share of weight values that agree within ``atol``."""
    close = torch.cat([((a[k] - b[k]).abs() <= atol).flatten() for k in a])
    return float(close.float().mean())


def test_two_gloo_processes_compute_the_gradient_of_the_whole_batch(site):
    """One step on a batch of 4 split 2 + 2: rank 0's all-reduced gradient equals one process's on all 4 patches.

    Then a longer epoch (batches of 5, 5 and a last one of 2, each split over the two processes): the same
    losses, and the weights agree but for a few values (Adam normalises each gradient, so a value whose
    gradient is ~0 can step either way on a rounding difference).
    """
    prepared, _cache = site
    one_step = CONFIG  # 4 training cases x 1 crop = one batch of 4
    training = training_set([prepared], 0, one_step.patch)
    assert len(training.train) == 4
    alone = LocalTrainer(build_model(one_step.network), training.train, training.val, one_step)
    alone.run_epoch()
    longer = one_step.replace(samples_per_volume=3, batch_size=5, epochs=1)  # 12 patches: 5 + 5 + 2, split 3+2, 3+2, 1+1
    result_alone = LocalTrainer(build_model(longer.network), training.train, training.val, longer).run_epoch()

    with start_data_parallel(spec(site, one_step), 2, CPU) as group:
        together = LocalTrainer(build_model(one_step.network), training.train, training.val, one_step, parallel=group)
        together.run_epoch()
        for (name, p), q in zip(together.model.named_parameters(), alone.model.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    with start_data_parallel(spec(site, longer), 2, CPU) as group:
        result_together = LocalTrainer(build_model(longer.network), training.train, training.val, longer, parallel=group).run_epoch()
    assert result_together.train_loss == pytest.approx(result_alone.train_loss, abs=1e-5)
    assert result_together.val_dice == pytest.approx(result_alone.val_dice, abs=1e-3)
    assert share_equal(result_alone.weights, result_together.weights) > 0.995


def test_fedseg_train_with_two_processes_resumes_like_one_process(tmp_path, run_cli):
    """--processes 2: 1 epoch, then resumed to 2 (the optimiser state goes to the follower); vs 1 process, 2 epochs."""
    data = write_site(tmp_path / "site", n_cases=6)
    config = tmp_path / "train.toml"
    config.write_text("[train]\npatch_size = [16, 16, 8]\nbatch_size = 4\nsamples_per_volume = 2\nsw_batch_size = 2\n"
                      "learning_rate = 0.01\nthreads = 1\n[prepare]\nspacing_mm = 1.0\n")
    common = ["--fold", "0", "--config", config, "--cache", tmp_path / "cache"]
    code, out, err = run_cli("train", data, "--out", tmp_path / "one", "--epochs", "2", *common)
    assert code == 0, out + err
    code, out, err = run_cli("train", data, "--out", tmp_path / "two", "--epochs", "1", "--processes", "2", *common)
    assert code == 0, out + err
    assert "2 processes (DDP)" in out
    code, out, err = run_cli("train", data, "--out", tmp_path / "two", "--epochs", "2", "--processes", "2", *common)
    assert code == 0, out + err
    assert "resumed after epoch 1" in out
    one = load_file(str(tmp_path / "one" / "fold0" / "last.safetensors"))
    two = load_file(str(tmp_path / "two" / "fold0" / "last.safetensors"))
    assert share_equal(one, two) > 0.99
    record = json.loads((tmp_path / "two" / "model.json").read_text())
    assert record["folds"][0]["trained_with"]["processes"] == 2
    assert record["folds"][0]["trained_with"]["device"] == "cpu"


def test_a_follower_that_dies_at_start_is_reported_and_nothing_is_left_running(site):
    argv = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
    with pytest.raises(FedsegError, match="process 1 failed to start.*code 3"):
        start_data_parallel(spec(site, CONFIG), 2, CPU, follower_argv=argv)


def test_a_follower_that_dies_mid_training_fails_rank_0_quickly(site, tmp_path):
    """The follower joins, then exits at its first epoch: rank 0 gets a FedsegError naming it, within the timeout."""
    script = tmp_path / "dying_follower.py"
    script.write_text(
        "import os\n"
        "import fedseg.training.distributed as d\n"
        "import fedseg.training.follower as f\n"
        "def die(self, trainer, new_anchor):\n"
        "    os._exit(5)\n"
        "d.DataParallel.start_epoch = die\n"
        "f.main()\n"
    )
    prepared, _cache = site
    training = training_set([prepared], 0, CONFIG.patch)
    start = time.monotonic()
    group = start_data_parallel(spec(site, CONFIG), 2, CPU, follower_argv=[sys.executable, str(script)], timeout_s=30)
    try:
        trainer = LocalTrainer(build_model(CONFIG.network), training.train, training.val, CONFIG, parallel=group)
        with pytest.raises(FedsegError, match="process 1 (exited with code 5|stopped|is gone)"):
            trainer.run_epoch()
        follower = group.followers[0].process
    finally:
        group.close()
    assert time.monotonic() - start < 60
    assert follower.poll() is not None


def test_gpus_without_gpus_is_one_clear_error(tmp_path, run_cli):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    data = write_site(tmp_path / "site", n_cases=5)
    code, out, err = run_cli("train", data, "--out", tmp_path / "m", "--gpus", "2", "--cache", tmp_path / "cache")
    assert code == 1 and err.count("error:") == 1 and "--gpus 2" in err and "CUDA GPU" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run_cli("train", data, "--out", tmp_path / "m", "--gpus", "1", "--processes", "2")
    assert code == 1 and "exclude each other" in err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_train_as_one(site):
    prepared, _cache = site
    config = CONFIG.replace(device="cuda:0", amp=False)
    training = training_set([prepared], 0, config.patch)
    alone = LocalTrainer(build_model(config.network), training.train, training.val, config).run_epoch()
    cuda = Hardware(torch.device("cuda", 0))
    follower_spec = FollowerSpec(**{**asdict(spec(site, config)), "device_type": "cuda"})
    with start_data_parallel(follower_spec, 2, cuda) as group:
        together = LocalTrainer(build_model(config.network), training.train, training.val, config, parallel=group).run_epoch()
    assert together.train_loss == pytest.approx(alone.train_loss, abs=1e-4)
    assert share_equal(alone.weights, together.weights, atol=1e-4) > 0.99


def test_federated_sites_training_in_two_processes_send_what_one_process_sends(tmp_path, run_cli):
    """fedseg federate --processes 2: each client is rank 0 of a DDP pair and alone talks to the server.

    One round, two sites: the aggregated global model agrees with the one-process run but for the few
    Adam-sign values (see the first test), and the FL model records the processes.
    """
    sites = [write_site(tmp_path / name, n_cases=6, seed=10 * k) for k, name in enumerate(("site_a", "site_b"))]
    study = tmp_path / "study.toml"
    study.write_text(
        "[federation]\nrounds = 1\nround_timeout_s = 120.0\ngrace_s = 5.0\nevaluate = false\n"
        "[prepare]\nspacing_mm = 1.0\n"
        "[train]\npatch_size = [16, 16, 8]\nbatch_size = 4\nsamples_per_volume = 2\nsw_batch_size = 2\nthreads = 1\n"
    )
    finals = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        extra = ["--processes", "2"] if processes == 2 else []
        code, stdout, err = run_cli("federate", *sites, "--out", out, "--fold", "0", "--config", study,
                                    "--cache", tmp_path / "cache", "--threads", "1", *extra)
        assert code == 0, stdout + err
        finals[processes] = load_file(str(out / "fold0" / "final.safetensors"))
    assert share_equal(finals[1], finals[2]) > 0.99
    initial = build_model("unet-small", seed=0).state_dict()
    assert share_equal(finals[1], initial) < 0.5  # the round did train
    record = json.loads((tmp_path / "run2" / "model" / "model.json").read_text())
    assert record["folds"][0]["trained_with"]["processes"] == 2
    assert "2 processes (DDP)" in (tmp_path / "run2" / "logs" / "fold0" / "site_a.log").read_text(encoding="utf-8", errors="replace")
