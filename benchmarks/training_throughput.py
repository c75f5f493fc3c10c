"""Benchmark: CPU training throughput of fedseg's engine, the previous engine, and a bare MONAI loop.

    python benchmarks/training_throughput.py            # the demo workload, 8 timed epochs per loop
    python benchmarks/training_throughput.py --quick    # smoke run

Workload: the demo profile's training (``unet-small``, its patch, crops per
case, batch and learning rate, one torch thread as each demo worker has) on
15 SUNY phantom cases prepared at 3 mm and held in memory — one demo fold's
training set — with the FULL BigAug stack, elastic deformation included
(``AugmentConfig()`` defaults; the demo had switched elastic off to save
time). The loops, each from the same initial weights, timed in turns (one
epoch of each, then again) so that a busy machine slows all alike:

* ``engine``: fedseg now — planned balanced crops, the BigAug stack batched
  in torch, channels-last activations, fused Adam;
* ``previous``: fedseg 0.1's engine — MONAI's per-patch transforms on the CPU
  (``augment_engine = "monai"``), contiguous activations, Adam's for-loop;
* two halves of the change, to attribute it: ``batched aug only`` (previous
  layout and Adam) and ``layout + fused Adam only`` (MONAI transforms);
* ``engine, 1 loader worker``: patches cut in a DataLoader worker process
  (the GPU path's default) instead of in the training process;
* ``bare MONAI``: the textbook ``Dataset`` + ``DataLoader(num_workers=0)`` +
  ``list_data_collate`` loop with the previous stack (one case per item, its
  crops re-batched to the workload's batch size).

Per loop: median training-epoch seconds (validation excluded), patches/s and
the share of the epoch spent producing augmented batches (the batch
iterator alone, timed separately). Validation of 4 cases is timed once per
engine. Target ([engine] issue): engine >= 2x previous per epoch, elastic on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
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
from fedseg.study.profiles import load_settings
from fedseg.training.augment import AugmentConfig, training_transforms
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays, pad_to
from fedseg.training.engine import LocalTrainer
from fedseg.training.losses import soft_dice_loss


def phantom_cases(
    n: int, spacing: float, patch: tuple[int, int, int], sites: tuple[str, ...] = ("suny",), resolution_scale: float = 1.0
) -> list[CaseArrays]:
    """``n`` phantom cases (the ``sites`` in turn), prepared in memory as training would see them."""
    cases = []
    for index in range(n):
        site = sites[index % len(sites)]
        ph = render_case(get_profile(site), index // len(sites), seed=0, resolution_scale=resolution_scale)
        image, label = preprocess_case(Volume(ph.image, ph.affine), Volume(ph.label, ph.affine), PrepareConfig(spacing_mm=spacing))
        img = image.array[None].astype(np.float32)
        cases.append(CaseArrays(f"{site}{index}", pad_to(img, patch, float(img.min())), pad_to(label.array[None].astype(np.float32), patch, 0.0), image.affine))
    return cases


def demo_workload() -> TrainConfig:
    """The demo profile's [train] table, with the full BigAug stack (elastic on)."""
    return load_settings("demo").study.train.replace(augment=AugmentConfig(), device="cpu")


class EngineLoop:
    """A LocalTrainer timed epoch by epoch; ``plain_adam`` swaps in Adam's for-loop as fedseg 0.1 used it."""

    def __init__(self, cases: list[CaseArrays], config: TrainConfig, plain_adam: bool = False) -> None:
        self.trainer = LocalTrainer(build_model(config.network, seed=0), cases, cases[:4], config)
        if plain_adam:
            self.trainer.optimizer = torch.optim.Adam(self.trainer.model.parameters(), lr=config.learning_rate)

    def epoch(self) -> float:
        start = time.perf_counter()
        self.trainer.train_one_epoch()
        self.trainer.epoch += 1
        return time.perf_counter() - start

    def batches_only(self) -> float:
        start = time.perf_counter()
        for _ in self.trainer.pipeline.batches(self.trainer.epoch + 10_000):  # an epoch it never trains
            pass
        return time.perf_counter() - start

    def validation(self) -> float:
        start = time.perf_counter()
        self.trainer.validate()
        return time.perf_counter() - start


class MonaiLoop:
    """MONAI's textbook loop over the previous engine's crop + stack."""

    def __init__(self, cases: list[CaseArrays], config: TrainConfig) -> None:
        self.model = build_model(config.network, seed=0)
        crop, augment = training_transforms(config.patch, config.samples_per_volume, config.pos_neg_ratio, config.augment)
        transform = Compose([crop, augment])
        transform.set_random_state(0)
        data = [{"image": c.image, "label": c.label} for c in cases]
        # one case per item (its crops come out together); steps re-batch them to the workload's batch size
        self.loader = DataLoader(Dataset(data, transform), batch_size=1, shuffle=True, num_workers=0, collate_fn=list_data_collate)
        self.batch_size = config.batch_size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.loss = soft_dice_loss()

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(images), labels, self.model)
        loss.backward()
        self.optimizer.step()

    def epoch(self) -> float:
        start = time.perf_counter()
        self.model.train()
        images, labels = [], []
        for batch in self.loader:
            images += list(batch["image"].as_tensor())
            labels += list(batch["label"].as_tensor())
            while len(images) >= self.batch_size:
                self._step(torch.stack(images[: self.batch_size]), torch.stack(labels[: self.batch_size]))
                images, labels = images[self.batch_size :], labels[self.batch_size :]
        if images:
            self._step(torch.stack(images), torch.stack(labels))
        return time.perf_counter() - start

    def batches_only(self) -> float:
        start = time.perf_counter()
        for _ in self.loader:
            pass
        return time.perf_counter() - start


def interleaved(loops: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each loop once per round, ``repeats`` rounds after one warm-up round."""
    for run in loops.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, run in loops.items():
            times[name].append(run())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=15, help="training cases (a demo fold has 15)")
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs per loop (after one warm-up epoch)")
    parser.add_argument("--spacing", type=float, default=3.0, help="mm (the demo's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.epochs, args.spacing = 4, 1, 6.0
    config = demo_workload()
    torch.set_num_threads(config.threads or 1)
    cases = phantom_cases(args.cases, args.spacing, config.patch)
    patches = len(cases) * config.samples_per_volume
    previous = config.replace(augment_engine="monai", channels_last=False)
    loops = {
        "engine": EngineLoop(cases, config),
        "previous engine": EngineLoop(cases, previous, plain_adam=True),
        "batched aug only": EngineLoop(cases, config.replace(channels_last=False), plain_adam=True),
        "layout + fused Adam only": EngineLoop(cases, config.replace(augment_engine="monai")),
        "engine, 1 loader worker": EngineLoop(cases, config.replace(loader_workers=1)),
        "bare MONAI": MonaiLoop(cases, previous),
    }
    epochs = interleaved({name: loop.epoch for name, loop in loops.items()}, args.epochs)
    data = interleaved({name: loop.batches_only for name, loop in loops.items()}, max(2, args.epochs // 2))
    validation = {name: statistics.median(loops[name].validation() for _ in range(3)) for name in ("engine", "previous engine")}
    rows = []
    for name in loops:
        epoch_s, data_s = statistics.median(epochs[name]), statistics.median(data[name])
        rows.append({"loop": name, "epoch_s": epoch_s, "patches_per_s": patches / epoch_s, "batches_s": data_s,
                     "augmentation_share": data_s / epoch_s, "epoch_times_s": epochs[name]})
    by_name = {row["loop"]: row for row in rows}
    speedup = by_name["previous engine"]["epoch_s"] / by_name["engine"]["epoch_s"]
    record = {
        "benchmark": "training_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "workload": {"network": config.network, "patch": list(config.patch), "batch_size": config.batch_size,
                     "samples_per_volume": config.samples_per_volume, "cases": len(cases), "spacing_mm": args.spacing,
                     "patches_per_epoch": patches, "augment": "full BigAug stack, elastic p = %g" % config.augment.elastic_prob},
        "rows": rows,
        "validation_s": validation,
        "speedup_engine_vs_previous": speedup,
        "ratio_previous_vs_bare_monai": by_name["bare MONAI"]["epoch_s"] / by_name["previous engine"]["epoch_s"],
        "ratio_engine_vs_bare_monai": by_name["bare MONAI"]["epoch_s"] / by_name["engine"]["epoch_s"],
        # kept for the smoke test and older readers
        "engine_patches_per_s": by_name["engine"]["patches_per_s"],
        "monai_patches_per_s": by_name["bare MONAI"]["patches_per_s"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print("| loop | median epoch (s) | patches/s | producing batches (s) | share of the epoch |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['loop']} | {row['epoch_s']:.3f} | {row['patches_per_s']:.1f} | {row['batches_s']:.3f} | {row['augmentation_share']:.0%} |")
    print(f"\nvalidation of 4 cases (s): engine {validation['engine']:.3f}, previous engine {validation['previous engine']:.3f}")
    print(f"engine / previous engine: {speedup:.2f}x faster per epoch (target >= 2)")
    print(f"ratio engine / MONAI: {record['ratio_engine_vs_bare_monai']:.2f}; previous engine / MONAI: {record['ratio_previous_vs_bare_monai']:.2f}")


if __name__ == "__main__":
    main()
