"""Balanced random crops: which patches an epoch trains on, and a loader that cuts them.

The paper's "random cropping based on the background/foreground ratio": each
training case gives ``samples_per_volume`` patches per epoch, each centred
on a prostate voxel with probability ratio / (1 + ratio) and on a
background voxel otherwise, shifted so that it lies inside the volume —
what MONAI's ``RandCropByPosNegLabeld`` does, without computing the
foreground and background indices of the whole volume at every crop.

An epoch's :class:`EpochPlan` — every patch's case and corner, in a shuffled
order, cut into batches — is a function of (seed, epoch) alone, so every
data-parallel process knows the whole plan and cuts only its rows of each
batch. :func:`patch_loader` cuts them in a ``torch.utils.data.DataLoader``:
in this process on a CPU, in worker processes with pinned memory and
prefetching when a GPU is to be fed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms.utils import correct_crop_centers
from torch.utils.data import DataLoader, Dataset

from fedseg.training.data import CaseArrays

Corner = tuple[int, int, int]
PatchRef = tuple[int, Corner]  # (case index, first voxel of the patch)


def seed_for(seed: int, epoch: int, *stream: int) -> int:
    """A 32-bit seed for (seed, epoch, stream...), as numpy's RandomState and torch generators want."""
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1)[0])


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel group: it trains rows ``rows(n)`` of every batch."""

    rank: int = 0
    world_size: int = 1

    def rows(self, n: int) -> slice:
        """Contiguous, nearly equal shares of a batch of ``n`` (as numpy.array_split)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


@dataclass(frozen=True)
class EpochPlan:
    """The patches of one epoch, batched: ``batches[i]`` lists (case, corner) of global batch i."""

    epoch: int
    batches: tuple[tuple[PatchRef, ...], ...]

    def for_shard(self, shard: Shard) -> list[tuple[int, tuple[PatchRef, ...]]]:
        """(global batch index, this shard's patches) for every batch every process has rows of."""
        if shard.world_size == 1:
            return list(enumerate(self.batches))
        # a last batch smaller than the group would leave a process without rows: DDP needs every process to step
        return [(i, batch[shard.rows(len(batch))]) for i, batch in enumerate(self.batches) if len(batch) >= shard.world_size]


class BalancedCrops:
    """Crop corners for every case, balanced between prostate- and background-centred patches.

    Prostate centres are drawn uniformly from the case's prostate voxels
    (their indices are kept: a few thousand per case), background centres
    uniformly from its background voxels by rejection (kept as indices they
    would take 8 bytes per voxel of every 1 mm volume). Centres are then
    shifted so that the patch lies inside the volume, as MONAI does.
    """

    def __init__(self, cases: Sequence[CaseArrays], patch: Corner, samples: int, pos_neg_ratio: float) -> None:
        self.patch = tuple(patch)
        self.samples = samples
        self.pos_ratio = pos_neg_ratio / (1.0 + pos_neg_ratio)
        self.shapes = [case.label.shape[1:] for case in cases]
        self.labels = [(case.label > 0).astype(np.uint8) for case in cases]  # (1, X, Y, Z); also what the loader cuts
        self.masks = [label.reshape(-1) for label in self.labels]  # flat views of the same bytes
        self.foreground = [np.flatnonzero(mask) for mask in self.masks]

    def _background_voxel(self, case: int, random: np.random.RandomState) -> int:
        mask = self.masks[case]
        for _ in range(1000):  # background is most of a pelvis scan: ~1 draw
            index = int(random.randint(mask.size))
            if not mask[index]:
                return index
        return int(random.choice(np.flatnonzero(~mask)))

    def centre(self, case: int, random: np.random.RandomState) -> Corner:
        """One patch centre (voxel indices), already shifted inside the volume."""
        foreground, background = self.foreground[case], self.masks[case].size - self.foreground[case].size
        use_foreground = random.rand() < self.pos_ratio
        if foreground.size == 0 or background == 0:  # one class only: crop where there is something
            use_foreground = foreground.size > 0
        flat = int(foreground[random.randint(foreground.size)]) if use_foreground else self._background_voxel(case, random)
        centre = np.unravel_index(flat, self.shapes[case])
        return tuple(int(c) for c in correct_crop_centers([int(c) for c in centre], self.patch, self.shapes[case]))

    def corners(self, case: int, random: np.random.RandomState) -> list[Corner]:
        return [
            tuple(c - p // 2 for c, p in zip(self.centre(case, random), self.patch, strict=True))
            for _ in range(self.samples)
        ]

    def plan(self, seed: int, epoch: int, batch_size: int) -> EpochPlan:
        """Every case in a random order gives its crops; the patches are shuffled and cut into batches."""
        crop_random = np.random.RandomState(seed_for(seed, epoch, 0))
        order = np.random.default_rng(seed_for(seed, epoch, 2)).permutation(len(self.shapes))
        patches = [(int(case), corner) for case in order for corner in self.corners(int(case), crop_random)]
        shuffled = [patches[i] for i in np.random.default_rng(seed_for(seed, epoch, 3)).permutation(len(patches))]
        return EpochPlan(epoch, tuple(tuple(shuffled[i : i + batch_size]) for i in range(0, len(shuffled), batch_size)))


class PatchDataset(Dataset):
    """``dataset[(case, corner)]`` -> (image patch float32, label patch uint8), each (1, *patch)."""

    def __init__(self, cases: Sequence[CaseArrays], patch: Corner, labels: Sequence[np.ndarray] | None = None) -> None:
        self.images = [case.image for case in cases]
        # uint8 labels: a quarter of the bytes to move (``labels``: already made, e.g. by BalancedCrops)
        self.labels = list(labels) if labels is not None else [(case.label > 0).astype(np.uint8) for case in cases]
        self.patch = tuple(patch)

    def __len__(self) -> int:
        """Cases; the dataset is indexed by patch references, which the batch sampler hands out."""
        return len(self.images)

    def __getitem__(self, ref: PatchRef) -> tuple[np.ndarray, np.ndarray]:
        case, corner = ref
        box = (slice(None),) + tuple(slice(c, c + p) for c, p in zip(corner, self.patch, strict=True))
        return np.ascontiguousarray(self.images[case][box]), np.ascontiguousarray(self.labels[case][box])


class PlanSampler:
    """Batch sampler that yields the current epoch's batches (set with :meth:`use`), for a persistent loader."""

    def __init__(self) -> None:
        self.batches: list[tuple[PatchRef, ...]] = []

    def use(self, batches: list[tuple[PatchRef, ...]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[PatchRef]]:
        return (list(batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([image for image, _ in items]))
    labels = torch.from_numpy(np.stack([label for _, label in items]))
    return images, labels


def patch_loader(dataset: PatchDataset, sampler: PlanSampler, workers: int, pin_memory: bool) -> DataLoader:
    """A loader of (images, labels) batches in the sampler's order; ``workers`` > 0 cuts them in worker processes.

    Worker processes are PyTorch's own (forked, fed only the patch
    references this process made), kept alive across epochs.
    """
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_stack, pin_memory=pin_memory, **extra)
