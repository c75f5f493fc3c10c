"""Benchmark: training-step throughput of fedseg's engine vs a bare MONAI loop.

    python benchmarks/training_throughput.py                 # 12 phantom cases at 2 mm, 3 timed epochs each
    python benchmarks/training_throughput.py --quick         # smoke run

Both loops train the same network from the same weights on the same
in-memory cases with the same crop (RandCropByPosNegLabeld), the same BigAug
transform stack, batch size, soft Dice loss and Adam. The bare loop is the
textbook MONAI one: ``Dataset`` + ``DataLoader(num_workers=0)`` +
``list_data_collate``. Throughput = training patches per second, validation
excluded. Target ([train] issue): engine ≥ 0.9 × bare MONAI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.transforms import Compose

from fedseg.data.preprocess import PrepareConfig, preprocess_case
from fedseg.data.site_profiles import get_profile
from fedseg.data.synth import render_case
from fedseg.data.volume import Volume
from fedseg.models import build_model
from fedseg.training.augment import training_transforms
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays, pad_to
from fedseg.training.engine import LocalTrainer, soft_dice_loss


def phantom_cases(n: int, spacing: float, patch: tuple[int, int, int]) -> list[CaseArrays]:
    """``n`` SUNY phantom cases, prepared in memory as training would see them."""
    cases = []
    for index in range(n):
        ph = render_case(get_profile("suny"), index, seed=0)
        image, label = preprocess_case(Volume(ph.image, ph.affine), Volume(ph.label, ph.affine), PrepareConfig(spacing_mm=spacing))
        img = image.array[None].astype(np.float32)
        cases.append(CaseArrays(f"c{index}", pad_to(img, patch, float(img.min())), pad_to(label.array[None].astype(np.float32), patch, 0.0), image.affine))
    return cases


def engine_epoch(trainer: LocalTrainer) -> float:
    start = time.perf_counter()
    trainer.train_one_epoch()
    trainer.epoch += 1
    return time.perf_counter() - start


def monai_epoch(model, loader, optimizer, loss_fn) -> float:
    start = time.perf_counter()
    model.train()
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["image"]), batch["label"], model)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs per loop (after one warm-up epoch)")
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.epochs, args.spacing = 2, 1, 4.0
    config = TrainConfig(seed=0)
    cases = phantom_cases(args.cases, args.spacing, config.patch)
    patches = len(cases) * config.samples_per_volume

    trainer = LocalTrainer(build_model(config.network, seed=0), cases, [], config)
    engine_times = [engine_epoch(trainer) for _ in range(args.epochs + 1)][1:]

    model = build_model(config.network, seed=0)
    crop, augment = training_transforms(config.patch, config.samples_per_volume, config.pos_neg_ratio, config.augment)
    transform = Compose([crop, augment])
    transform.set_random_state(0)
    data = [{"image": c.image, "label": c.label} for c in cases]
    loader = DataLoader(Dataset(data, transform), batch_size=config.batch_size // config.samples_per_volume, shuffle=True, num_workers=0, collate_fn=list_data_collate)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    monai_times = [monai_epoch(model, loader, optimizer, soft_dice_loss()) for _ in range(args.epochs + 1)][1:]

    engine_rate = patches / statistics.median(engine_times)
    monai_rate = patches / statistics.median(monai_times)
    record = {
        "benchmark": "training_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "network": config.network,
        "patch": list(config.patch),
        "batch_size": config.batch_size,
        "cases": len(cases),
        "patches_per_epoch": patches,
        "engine_patches_per_s": engine_rate,
        "monai_patches_per_s": monai_rate,
        "ratio": engine_rate / monai_rate,
        "engine_epoch_s": engine_times,
        "monai_epoch_s": monai_times,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print("| loop | patches/s | median epoch (s) |\n|---|---|---|")
    print(f"| fedseg engine | {engine_rate:.1f} | {statistics.median(engine_times):.2f} |")
    print(f"| bare MONAI | {monai_rate:.1f} | {statistics.median(monai_times):.2f} |")
    print(f"\nratio engine / MONAI: {engine_rate / monai_rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
