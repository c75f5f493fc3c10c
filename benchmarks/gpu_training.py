"""Benchmark: the paper's AH-Net at 1 mm on a GPU — fp32 vs AMP, utilisation, memory, epoch time, study wall time.

    bash benchmarks/gpu.sh                                        # on a GPU machine: everything, <= 8 minutes
    python benchmarks/gpu_training.py --device cpu --quick        # rehearsal on a CPU (tiny, minutes)

Workload: the ``paper`` profile's [train] table (AH-Net, 128 x 128 x 32
patches, batch 4, 2 crops per case, full BigAug stack) on phantom cases of
the three training institutions at full acquisition resolution, prepared at
1 mm and held in memory. An epoch of 80 cases cycles through ``--distinct``
distinct cases (the work per epoch is per patch, so this costs the GPU what 80
distinct cases would, without minutes of synthesis on the lease).

Measured, for fp32 and for AMP (bf16 where the GPU has it, else fp16):

* training patches/s and seconds per epoch of 80 cases (after one warm-up
  epoch, so cuDNN's autotuning is excluded), the median of ``--timed-epochs``;
* GPU utilisation sampled by ``nvidia-smi`` every 100 ms during the timed
  epochs (target >= 85 %: the data pipeline never starves the GPU), and the
  data pipeline alone (cut + move + augment, no network) in patches/s;
* peak GPU memory (torch's allocator) and validation seconds per 1 mm volume;
* the Dice cost of AMP: one fold trained from the same initial weights for
  the same number of epochs (as many as ``--dice-budget-s`` allows in fp32),
  fp32 vs AMP, best validation Dice of each;
* with more than one GPU: seconds per epoch on 2..N GPUs (DDP), scaling efficiency.

Then the projected wall time of the whole paper-profile study on one GPU
(see :func:`project_study`). Writes JSON and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_throughput import phantom_cases  # noqa: E402

from fedseg.models import build_model  # noqa: E402
from fedseg.study.profiles import load_settings  # noqa: E402
from fedseg.training.config import TrainConfig  # noqa: E402
from fedseg.training.data import CaseArrays  # noqa: E402
from fedseg.training.engine import LocalTrainer  # noqa: E402

SITES = ("nci", "suny", "ucla")
PAPER = {"cases": 100, "test": 20, "folds": 5, "epochs": 300, "sites": 3, "external": 40}
FL_ROUND_OVERHEAD_S = 2.448  # measured fedseg round overhead at AH-Net's size (docs/benchmarks.md, CPU server)


class UtilisationSampler:
    """``nvidia-smi`` polled every 100 ms in a child process; None where there is no nvidia-smi."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> UtilisationSampler:
        if shutil.which("nvidia-smi") is not None:
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
        self.samples: list[float] = []
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        for line in out.splitlines():
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean": statistics.fmean(self.samples), "median": statistics.median(self.samples), "samples": len(self.samples)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epochs(trainer: LocalTrainer, epochs: int) -> tuple[list[float], dict[str, float] | None]:
    """Seconds of ``epochs`` training epochs (after whatever warm-up the caller did), and GPU utilisation meanwhile."""
    device = trainer.hardware.device
    times = []
    with UtilisationSampler(device.index or 0) as sampler:
        for _ in range(epochs):
            synchronize(device)
            start = time.perf_counter()
            trainer.train_one_epoch()
            synchronize(device)
            times.append(time.perf_counter() - start)
            trainer.epoch += 1
    return times, sampler.summary()


def pipeline_rate(trainer: LocalTrainer, patches: int) -> float:
    """Patches/s of the data pipeline alone: crops cut, moved to the device and augmented, no network."""
    device = trainer.hardware.device
    synchronize(device)
    start = time.perf_counter()
    for images, _labels in trainer.pipeline.batches(trainer.epoch + 10_000):
        images.sum()  # make sure the work is done
    synchronize(device)
    return patches / (time.perf_counter() - start)


def measure_precision(config: TrainConfig, cases: list[CaseArrays], val: list[CaseArrays], epochs: int) -> dict[str, Any]:
    device = torch.device(config.device)
    trainer = LocalTrainer(build_model(config.network, seed=0), cases, val, config)
    trainer.train_one_epoch()  # warm-up: cuDNN autotuning, allocator, loader workers
    trainer.epoch += 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, utilisation = timed_epochs(trainer, epochs)
    patches = len(cases) * config.samples_per_volume
    start = time.perf_counter()
    trainer.validate()
    synchronize(device)
    validation = (time.perf_counter() - start) / max(1, len(val))
    return {
        "precision": trainer.hardware.amp_name or "fp32",
        "epoch_s": statistics.median(times),
        "epoch_times_s": times,
        "patches_per_s": patches / statistics.median(times),
        "pipeline_patches_per_s": pipeline_rate(trainer, patches),
        "gpu_utilisation_pct": utilisation,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "validation_s_per_case": validation,
        "device": trainer.hardware.describe(),
    }


def dice_cost(config: TrainConfig, train: list[CaseArrays], val: list[CaseArrays], precisions: list[bool], epochs: int) -> list[dict[str, Any]]:
    """One fold, same initial weights, same epochs: best validation Dice per precision."""
    rows = []
    for amp in precisions:
        trainer = LocalTrainer(build_model(config.network, seed=0), train, val, config.replace(amp=amp))
        start = time.perf_counter()
        results = [trainer.run_epoch(validate=(e + 1) % 5 == 0 or e + 1 == epochs) for e in range(epochs)]
        dice = [r.val_dice for r in results if r.validated]
        rows.append({
            "precision": trainer.hardware.amp_name or "fp32", "epochs": epochs, "best_val_dice": max(dice),
            "last_val_dice": dice[-1], "val_dice_every_5": dice, "seconds": time.perf_counter() - start,
        })
    return rows


def ddp_scaling(config: TrainConfig, cases: list[CaseArrays], work: Path, epochs: int) -> list[dict[str, Any]]:
    """Seconds per epoch on 1..N GPUs (each a DDP process); the followers read a prepared site from disk."""
    from fedseg.data.preprocess import PrepareConfig
    from fedseg.data.synth import synthesize_site
    from fedseg.data.site_profiles import get_profile
    from fedseg.training.data import resolve_site
    from fedseg.training.distributed import place_training
    from fedseg.training.fit import training_set

    prepare = PrepareConfig(spacing_mm=1.0)
    synthesize_site(work / "suny", get_profile("suny"), 20, 0)
    site = resolve_site(work / "suny", prepare, work / "cache")
    rows = []
    for gpus in range(1, torch.cuda.device_count() + 1):
        placement = place_training(config.replace(device="cuda"), gpus=gpus if gpus > 1 else None)
        training = training_set([site], 0, config.patch, validation=False)
        with placement.group([str(site.prepared)], 0, prepare.to_dict(), str(work / "cache")) as parallel:
            trainer = LocalTrainer(build_model(config.network, seed=0), training.train, [], placement.config, parallel=parallel)
            trainer.train_one_epoch()
            trainer.epoch += 1
            times, _ = timed_epochs(trainer, epochs)
        rows.append({"gpus": gpus, "epoch_s": statistics.median(times), "cases": len(training.train)})
    for row in rows:
        row["efficiency"] = rows[0]["epoch_s"] / (row["epoch_s"] * row["gpus"])
    return rows


def project_study(epoch80_s: float, validation_s: float) -> dict[str, float]:
    """Hours of the paper-profile study on one GPU, from one epoch of 80 cases and one validation volume.

    100 cases per site: 20 test, 80 in 5 folds of 64 training + 16 validation
    cases. Private: 3 sites x 5 folds x 300 epochs x (64 cases + 16 validations);
    pooled: 5 folds x 300 x (192 + 48); FL: 5 folds x 300 rounds x (3 sites x
    (64 + 16) + fedseg's measured round overhead at AH-Net's size); evaluation:
    5 ensembles of 5 folds on 3 x 20 test + 40 external cases.
    """
    train_case = epoch80_s / 80
    fold_epoch = 64 * train_case + 16 * validation_s
    private = PAPER["sites"] * PAPER["folds"] * PAPER["epochs"] * fold_epoch
    pooled = PAPER["folds"] * PAPER["epochs"] * PAPER["sites"] * fold_epoch
    federated = PAPER["folds"] * PAPER["epochs"] * (PAPER["sites"] * fold_epoch + FL_ROUND_OVERHEAD_S)
    evaluation = 5 * PAPER["folds"] * (PAPER["sites"] * PAPER["test"] + PAPER["external"]) * validation_s
    total = private + pooled + federated + evaluation
    return {"private_h": private / 3600, "pooled_h": pooled / 3600, "federated_h": federated / 3600,
            "evaluation_h": evaluation / 3600, "total_h": total / 3600, "total_days": total / 86400}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--network", default=None, help="default: the paper profile's (ahnet)")
    parser.add_argument("--distinct", type=int, default=6, help="distinct training cases the 80-case epoch cycles through")
    parser.add_argument("--epoch-cases", type=int, default=80)
    parser.add_argument("--timed-epochs", type=int, default=2)
    parser.add_argument("--dice-budget-s", type=float, default=110.0, help="fp32 training time for the AMP Dice comparison")
    parser.add_argument("--quick", action="store_true", help="tiny rehearsal (e.g. with --device cpu)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_training.json")
    args = parser.parse_args()
    config = load_settings("paper").study.train.replace(device=args.device)
    spacing, scale = 1.0, 1.0
    if args.network:
        config = config.replace(network=args.network, patch_size=None)
    if args.quick:
        args.distinct, args.epoch_cases, args.timed_epochs, args.dice_budget_s = 2, 4, 1, 0.0
        config = config.replace(batch_size=2, samples_per_volume=1)
        spacing, scale = 3.0, 3.0
    device = torch.device(config.device)
    start = time.perf_counter()
    distinct = phantom_cases(args.distinct + 2, spacing, config.patch, SITES, resolution_scale=scale)
    train, val = distinct[:-2], distinct[-2:]
    cases = [train[i % len(train)] for i in range(args.epoch_cases)]
    data_s = time.perf_counter() - start
    print(f"{len(distinct)} phantom cases at {spacing:g} mm in {data_s:.0f} s; epoch of {len(cases)} cases, "
          f"{len(cases) * config.samples_per_volume} patches of {config.patch}", flush=True)
    precisions = [False, True] if device.type == "cuda" else [False]
    rows = [measure_precision(config.replace(amp=amp), cases, val, args.timed_epochs) for amp in precisions]
    for row in rows:
        row["epoch80_s"] = row["epoch_s"] * 80 / len(cases)
        print(json.dumps(row), flush=True)
    dice_rows = []
    if args.dice_budget_s > 0 or args.quick:
        epochs = max(1, int(args.dice_budget_s / rows[0]["epoch_s"])) if not args.quick else 1
        dice_rows = dice_cost(config, cases, val, precisions, epochs)
        print(json.dumps(dice_rows), flush=True)
    scaling = []
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        with tempfile.TemporaryDirectory() as work:
            scaling = ddp_scaling(config, cases, Path(work), args.timed_epochs)
    fastest = min(rows, key=lambda row: row["epoch_s"])
    projection = project_study(fastest["epoch80_s"], fastest["validation_s_per_case"])
    record = {
        "benchmark": "gpu_training", "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
                   + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
        "workload": {"network": config.network, "patch": list(config.patch), "batch_size": config.batch_size,
                     "samples_per_volume": config.samples_per_volume, "spacing_mm": spacing, "distinct_cases": len(train),
                     "epoch_cases": len(cases)},
        "rows": rows, "amp_dice": dice_rows, "ddp_scaling": scaling, "projection": projection,
        "projection_from": fastest["precision"], "seconds": time.perf_counter() - start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print("\n| precision | patches/s | s per epoch of 80 cases | GPU utilisation (mean %) | pipeline alone (patches/s) | peak GPU memory (GiB) | validation s/volume |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        util, memory = row["gpu_utilisation_pct"], row["peak_memory_gib"]
        cells = [row["precision"], f"{row['patches_per_s']:.1f}", f"{row['epoch80_s']:.1f}",
                 f"{util['mean']:.0f}" if util else "-", f"{row['pipeline_patches_per_s']:.0f}",
                 f"{memory:.1f}" if memory is not None else "-", f"{row['validation_s_per_case']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for row in dice_rows:
        print(f"AMP Dice check: {row['precision']} {row['epochs']} epochs, best val Dice {row['best_val_dice']:.3f} ({row['seconds']:.0f} s)")
    for row in scaling:
        print(f"DDP: {row['gpus']} GPU(s) {row['epoch_s']:.1f} s per epoch, efficiency {row['efficiency']:.2f}")
    print(f"paper-profile study on one GPU ({fastest['precision']}): {projection['total_h']:.0f} h "
          f"({projection['total_days']:.1f} days): private {projection['private_h']:.0f} h, pooled {projection['pooled_h']:.0f} h, "
          f"FL {projection['federated_h']:.0f} h, evaluation {projection['evaluation_h']:.1f} h")
    print(f"total benchmark time {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
