"""Where an epoch's augmented patch batches come from: two engines, one interface.

``batched`` (default): the epoch's balanced crops are planned from (seed,
epoch) (:mod:`fedseg.training.patches`), cut on the host — in this process on
a CPU, in DataLoader worker processes with pinned memory when feeding a GPU
— moved to the training device, and augmented there a whole batch at a time
(:mod:`fedseg.training.batch_augment`). Under data parallelism each process
cuts and augments only its rows of every batch.

``monai``: the engine of fedseg 0.1, MONAI's per-patch dictionary
transforms on the CPU (``RandCropByPosNegLabeld`` then the BigAug stack),
kept so that benchmarks can compare the two on the same workload.

Both yield ``(images, labels)`` as float32 tensors (B, 1, X, Y, Z) on the
device, deterministic in (seed, epoch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from fedseg.errors import FedsegError
from fedseg.training.augment import training_transforms
from fedseg.training.batch_augment import BatchRandom, batched_bigaug
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays
from fedseg.training.patches import BalancedCrops, PatchDataset, PlanSampler, Shard, patch_loader, seed_for

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
AUGMENT_STREAM = 1  # seed_for(seed, epoch, AUGMENT_STREAM, batch): augmentation of one batch


class PatchPipeline(Protocol):
    def batches(self, epoch: int) -> Batches: ...


def loader_workers(config: TrainConfig, device: torch.device, world_size: int) -> int:
    """Patch-cutting worker processes: as configured, else none on a CPU and a few per GPU process on CUDA."""
    if config.loader_workers is not None:
        return config.loader_workers
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // world_size - 1))


class BatchedPipeline:
    """Planned balanced crops, cut by a DataLoader, augmented as a batch on the device."""

    def __init__(self, cases: Sequence[CaseArrays], config: TrainConfig, device: torch.device, shard: Shard = Shard()) -> None:
        self.config = config
        self.device = device
        self.shard = shard
        self.crops = BalancedCrops(cases, config.patch, config.samples_per_volume, config.pos_neg_ratio)
        self.sampler = PlanSampler()
        workers = loader_workers(config, device, shard.world_size)
        dataset = PatchDataset(cases, config.patch, labels=self.crops.labels)
        self.loader = patch_loader(dataset, self.sampler, workers, pin_memory=device.type == "cuda")
        self.augment = batched_bigaug(config.augment)

    def random(self, epoch: int, batch: int, global_size: int) -> BatchRandom:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed_for(self.config.seed, epoch, AUGMENT_STREAM, batch))
        return BatchRandom(generator, global_size, self.shard.rows(global_size))

    def batches(self, epoch: int) -> Batches:
        plan = self.crops.plan(self.config.seed, epoch, self.config.batch_size)
        mine = plan.for_shard(self.shard)
        self.sampler.use([refs for _, refs in mine])
        for (index, _refs), (images, labels) in zip(mine, self.loader, strict=True):
            batch = {
                "image": images.to(self.device, non_blocking=True),
                "label": labels.to(self.device, non_blocking=True).float(),
            }
            batch = self.augment(batch, self.random(epoch, index, len(plan.batches[index])))
            yield batch["image"], batch["label"]


class MonaiPipeline:
    """fedseg 0.1's engine: per-patch MONAI crops and transforms on the CPU, cases in a random order."""

    def __init__(self, cases: Sequence[CaseArrays], config: TrainConfig, device: torch.device, shard: Shard = Shard()) -> None:
        if shard.world_size > 1:
            raise FedsegError("train.augment_engine = 'monai' trains in one process; use 'batched' for several GPUs or processes")
        self.cases = list(cases)
        self.config = config
        self.device = device
        self._crop, self._augment = training_transforms(
            config.patch, config.samples_per_volume, config.pos_neg_ratio, config.augment
        )

    def batches(self, epoch: int) -> Batches:
        seed = self.config.seed
        self._crop.set_random_state(seed_for(seed, epoch, 0))
        self._augment.set_random_state(seed_for(seed, epoch, 1))
        order = np.random.default_rng(seed_for(seed, epoch, 2)).permutation(len(self.cases))
        pending: list[dict] = []
        for index in order:
            case = self.cases[index]
            for patch in self._crop({"image": case.image, "label": case.label}):
                pending.append(self._augment(patch))
                if len(pending) == self.config.batch_size:
                    yield self._stack(pending)
                    pending = []
        if pending:
            yield self._stack(pending)

    def _stack(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples]).float()
        labels = torch.stack([torch.as_tensor(s["label"]).as_subclass(torch.Tensor) for s in samples]).float()
        return images.contiguous().to(self.device), labels.contiguous().to(self.device)


PIPELINES = {"batched": BatchedPipeline, "monai": MonaiPipeline}


def make_pipeline(cases: Sequence[CaseArrays], config: TrainConfig, device: torch.device, shard: Shard = Shard()) -> PatchPipeline:
    return PIPELINES[config.augment_engine](cases, config, device, shard)
