"""Batched BigAug: aligned image and label, per-sample probabilities and ranges, determinism, shapes and dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedseg.training.augment import AugmentConfig
from fedseg.training.batch_augment import (
    BatchRandom,
    RandAffine,
    RandElastic,
    RandGamma,
    RandGaussianBlur,
    RandGaussianNoise,
    RandGaussianSharpen,
    RandScaleIntensity,
    RandShiftIntensity,
    batched_bigaug,
    elastic_rms,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (24, 20, 12)


def random(seed: int, n: int, rows: slice | None = None) -> BatchRandom:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return BatchRandom(generator, n, rows)


def smooth_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth blobs (so that thresholding is stable under interpolation); the label is image > 0.5."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    images = []
    for _ in range(n):
        centre = rng.uniform(-0.3, 0.3, 3)[:, None, None, None]
        images.append(np.exp(-((grid - centre) ** 2).sum(0) / 0.25))
    image = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
    return {"image": image, "label": (image > 0.5).float()}


SPATIAL = [
    pytest.param(RandAffine(1.0, math.radians(15), 0.15), id="affine"),
    pytest.param(RandElastic(1.0, (5.0, 7.0), (50.0, 150.0)), id="elastic"),
    pytest.param(RandElastic(1.0, (3.0, 4.0), (100.0, 200.0)), id="elastic-3x-default-amplitude"),
]


@pytest.mark.parametrize("transform", SPATIAL)
def test_spatial_transforms_keep_label_and_image_aligned(transform):
    """label = (image > 0.5) before; after the transform, label == (transformed image > 0.5) except at the boundary."""
    batch = smooth_batch(8)
    out = transform(batch, random(1, 8))
    assert not torch.equal(out["image"], batch["image"])  # it did move something
    disagree = out["label"] != (out["image"] > 0.5).float()
    # a voxel may disagree only where the blob's edge passes: next to a voxel of the other class
    label = out["label"][:, 0]
    edge = torch.zeros_like(label, dtype=torch.bool)
    for axis in (1, 2, 3):
        for shift in (1, -1):
            edge |= label != torch.roll(label, shift, dims=axis)
    assert not (disagree[:, 0] & ~edge).any()
    assert disagree.float().mean() < 0.02
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}  # nearest: no interpolated label values


def test_every_transform_keeps_shapes_and_dtypes():
    batch = smooth_batch(6)
    stack = batched_bigaug(AugmentConfig(**{name: 1.0 for name in AugmentConfig.model_fields if name.endswith("_prob")}))
    for transform in stack.transforms:
        out = transform(batch, random(2, 6))
        for key in ("image", "label"):
            assert out[key].shape == batch[key].shape and out[key].dtype == batch[key].dtype, (type(transform), key)
        assert torch.isfinite(out["image"]).all()


def test_intensity_transforms_leave_the_label_alone():
    batch = smooth_batch(4)
    for transform in (RandGaussianBlur(1.0, (0.5, 1.0)), RandGaussianNoise(1.0, 0.1), RandGamma(1.0, (0.7, 1.5))):
        assert torch.equal(transform(batch, random(3, 4))["label"], batch["label"])


@pytest.mark.parametrize("prob", [0.1, 0.3, 0.7])
def test_each_sample_is_chosen_with_the_transform_probability(prob):
    """Over 4000 samples the share changed is within 4 binomial standard deviations of prob."""
    n = 4000
    batch = {"image": torch.zeros(n, 1, 2, 2, 2), "label": torch.zeros(n, 1, 2, 2, 2)}
    out = RandShiftIntensity(prob, 0.2)(batch, random(4, n))
    share = float((out["image"].flatten(1) != 0).any(1).float().mean())
    assert abs(share - prob) < 4 * math.sqrt(prob * (1 - prob) / n)


@pytest.mark.parametrize("index", range(8))
def test_every_transform_of_the_stack_applies_with_its_own_probability(index):
    """Each transform of batched_bigaug, at p = 0.3 and the others off, changes ~30 % of 1500 noise patches."""
    probabilities = {name: 0.0 for name in AugmentConfig.model_fields if name.endswith("_prob")}
    name = sorted(probabilities, key=list(AugmentConfig.model_fields).index)[index]
    stack = batched_bigaug(AugmentConfig(**{**probabilities, name: 0.3}))
    n = 1500
    image = torch.rand(n, 1, 8, 8, 6, generator=torch.Generator().manual_seed(index))
    batch = {"image": image, "label": (image > 0.5).float()}
    out = stack(dict(batch), random(40 + index, n))
    share = float(((out["image"] - image).abs().flatten(1).amax(1) > 1e-4).float().mean())
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), (name, share)


def test_parameters_stay_in_their_ranges():
    n = 2000
    zeros = {"image": torch.zeros(n, 1, 2, 2, 2), "label": torch.zeros(n, 1, 2, 2, 2)}
    shift = RandShiftIntensity(1.0, 0.2)(zeros, random(5, n))["image"][:, 0, 0, 0, 0]
    assert shift.min() >= -0.2 and shift.max() <= 0.2 and shift.min() < -0.18 and shift.max() > 0.18
    ones = {"image": torch.ones(n, 1, 2, 2, 2), "label": zeros["label"]}
    factor = RandScaleIntensity(1.0, 0.2)(ones, random(6, n))["image"][:, 0, 0, 0, 0]
    assert factor.min() >= 0.8 and factor.max() <= 1.2
    ramp = torch.linspace(0, 1, 8).reshape(1, 1, 2, 2, 2).expand(n, 1, 2, 2, 2).contiguous()
    gamma_out = RandGamma(1.0, (0.7, 1.5))({"image": ramp, "label": zeros["label"]}, random(7, n))["image"]
    middle = gamma_out.flatten(1)[:, 3]  # 3/7 ** gamma
    gammas = torch.log(middle) / math.log(3 / 7)
    assert gammas.min() >= 0.7 - 1e-4 and gammas.max() <= 1.5 + 1e-4
    assert torch.allclose(gamma_out.flatten(1)[:, [0, -1]], ramp.flatten(1)[:, [0, -1]], atol=1e-6)  # min and max kept
    noise = RandGaussianNoise(1.0, 0.1)(zeros, random(8, n))["image"].flatten(1).std(1)
    assert noise.max() <= 0.1 * 1.8  # std drawn from U(0, 0.1): 8 voxels per sample scatter around it


def test_affine_rotates_and_scales_within_range():
    """A point's distance from the centre changes by at most the scale range; angles stay within +-rotate."""
    n = 500
    transform = RandAffine(1.0, math.radians(15), 0.15)
    params = transform.draw(random(9, n), SHAPE)
    assert params["angles"].abs().max() <= math.radians(15) and params["scales"].min() >= 0.85 and params["scales"].max() <= 1.15


def test_elastic_displacement_matches_monai_amplitude():
    """RMS displacement of the coarse field is within 25 % of MONAI's for the same sigma and magnitude."""
    transform = RandElastic(1.0, (5.0, 7.0), (50.0, 150.0))
    shape = (32, 32, 16)
    params = transform.draw(random(10, 400), shape)
    field = transform.displacement(params, shape)
    measured = field.pow(2).mean(dim=(2, 3, 4)).sqrt()  # (n, 3) per-axis RMS
    expected = elastic_rms(params["sigma"], params["magnitude"])[:, None].expand_as(measured)
    ratio = float(measured.mean() / expected.mean())
    assert 0.75 < ratio < 1.25, ratio


def test_same_seed_same_batch_other_seed_differs():
    stack = batched_bigaug(AugmentConfig())
    batch = smooth_batch(8)
    first, again, other = (stack(dict(batch), random(seed, 8)) for seed in (11, 11, 12))
    assert all(torch.equal(first[k], again[k]) for k in batch)
    assert not torch.equal(first["image"], other["image"])


def test_rows_of_a_batch_are_augmented_as_in_the_whole_batch():
    """A data-parallel process holding rows 3..5 of a batch of 8 gets exactly those rows of the 1-process result."""
    config = AugmentConfig(**{name: 0.5 for name in AugmentConfig.model_fields if name.endswith("_prob")})
    stack = batched_bigaug(config)
    batch = smooth_batch(8)
    whole = stack(dict(batch), random(13, 8))
    part = stack({k: v[3:6] for k, v in batch.items()}, random(13, 8, slice(3, 6)))
    for key in batch:
        assert torch.allclose(part[key], whole[key][3:6], atol=1e-6)


def test_sharpen_keeps_a_flat_image_flat():
    flat = {"image": torch.full((3, 1, *SHAPE), 2.0), "label": torch.zeros(3, 1, *SHAPE)}
    assert torch.allclose(RandGaussianSharpen(1.0)(flat, random(14, 3))["image"], flat["image"], atol=1e-5)


def test_blur_smooths_noise():
    noise = {"image": torch.randn(4, 1, *SHAPE, generator=torch.Generator().manual_seed(0)), "label": torch.zeros(4, 1, *SHAPE)}
    blurred = RandGaussianBlur(1.0, (0.8, 1.0))(noise, random(15, 4))["image"]
    assert blurred.std() < 0.6 * noise["image"].std()


def test_probability_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="probability"):
        RandShiftIntensity(1.5, 0.2)
