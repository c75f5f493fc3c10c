"""Balanced crops and the epoch plan: ratio, inside the volume, deterministic, split over processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import cube_case
from fedseg.training.config import TrainConfig
from fedseg.training.data import CaseArrays
from fedseg.training.patches import BalancedCrops, EpochPlan, PatchDataset, PlanSampler, Shard, patch_loader
from fedseg.training.pipelines import BatchedPipeline, MonaiPipeline

PATCH = (16, 16, 8)
CASES = [cube_case(i) for i in range(4)]


def test_crops_lie_inside_and_follow_the_foreground_ratio():
    """pos_neg_ratio 1: half the centres on prostate voxels; every patch fits in its volume."""
    crops = BalancedCrops(CASES, PATCH, samples=50, pos_neg_ratio=1.0)
    random = np.random.RandomState(0)
    on_prostate = []
    for case_index, case in enumerate(CASES):
        for _ in range(10):
            centre = crops.centre(case_index, random)
            on_prostate.append(case.label[0][centre] > 0)
        for corner in crops.corners(case_index, random):
            assert all(0 <= c and c + p <= n for c, p, n in zip(corner, PATCH, case.label.shape[1:], strict=True))
    # centres are shifted inwards, which can move a background centre onto the cube: at least half on prostate
    assert 0.45 < np.mean(on_prostate) < 0.8


def test_a_case_without_prostate_gives_background_crops():
    empty = CaseArrays("empty", np.zeros((1, 24, 24, 16), np.float32), np.zeros((1, 24, 24, 16), np.float32), np.eye(4))
    corners = BalancedCrops([empty], PATCH, 5, 1.0).corners(0, np.random.RandomState(0))
    assert len(corners) == 5


def test_plan_is_a_function_of_seed_and_epoch():
    crops = BalancedCrops(CASES, PATCH, samples=3, pos_neg_ratio=1.0)
    a, b, c = crops.plan(0, 1, 4), crops.plan(0, 1, 4), crops.plan(0, 2, 4)
    assert a == b and a != c
    assert sum(len(batch) for batch in a.batches) == 12 and [len(batch) for batch in a.batches] == [4, 4, 4]
    cases_in_first_batch = {case for case, _ in a.batches[0]}
    assert len(cases_in_first_batch) > 1  # patches are shuffled across cases


@pytest.mark.parametrize(("n", "world"), [(4, 2), (5, 2), (7, 3), (2, 2)])
def test_shards_cover_a_batch_once(n, world):
    rows = [Shard(rank, world).rows(n) for rank in range(world)]
    covered = [i for r in rows for i in range(n)[r]]
    assert covered == list(range(n)) and all(r.stop > r.start for r in rows)


def test_a_last_batch_smaller_than_the_group_is_left_out_for_every_process():
    refs = tuple((0, (0, 0, 0)) for _ in range(5))
    plan = EpochPlan(0, (refs[:4], refs[4:]))
    assert [i for i, _ in plan.for_shard(Shard(0, 2))] == [0] == [i for i, _ in plan.for_shard(Shard(1, 2))]
    assert len(plan.for_shard(Shard())) == 2


def test_loader_cuts_the_planned_patches():
    sampler = PlanSampler()
    loader = patch_loader(PatchDataset(CASES, PATCH), sampler, workers=0, pin_memory=False)
    plan = BalancedCrops(CASES, PATCH, 2, 1.0).plan(0, 0, 3)
    sampler.use(list(plan.batches))
    for refs, (images, labels) in zip(plan.batches, loader, strict=True):
        assert images.shape == (len(refs), 1, *PATCH) and images.dtype == torch.float32 and labels.dtype == torch.uint8
        case, (x, y, z) = refs[0]
        expected = CASES[case].image[:, x : x + PATCH[0], y : y + PATCH[1], z : z + PATCH[2]]
        assert np.array_equal(images[0].numpy(), expected)


@pytest.mark.slow  # DataLoader worker processes
def test_loader_worker_processes_cut_the_same_patches():
    """PyTorch's own worker processes (forked, fed patch references) give what the in-process loader gives."""
    plan = BalancedCrops(CASES, PATCH, 2, 1.0).plan(0, 0, 3)
    results = []
    for workers in (0, 1):
        sampler = PlanSampler()
        sampler.use(list(plan.batches))
        results.append(list(patch_loader(PatchDataset(CASES, PATCH), sampler, workers, pin_memory=False)))
    for (a, b), (c, d) in zip(*results, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("engine", [BatchedPipeline, MonaiPipeline])
def test_both_engines_give_float_batches_on_the_device(engine):
    config = TrainConfig(patch_size=PATCH, batch_size=3, samples_per_volume=2)
    batches = list(engine(CASES, config, torch.device("cpu")).batches(0))
    assert sum(images.shape[0] for images, _ in batches) == len(CASES) * 2
    for images, labels in batches:
        assert images.dtype == labels.dtype == torch.float32 and images.shape[1:] == (1, *PATCH)
        assert set(torch.unique(labels).tolist()) <= {0.0, 1.0}
