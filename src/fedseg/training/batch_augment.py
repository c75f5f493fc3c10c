"""BigAug on whole batches of patches, with tensor ops on the training device.

The same stacked transformations as :mod:`fedseg.training.augment` (Zhang et
al., IEEE TMI 2020) — image quality (blur, sharpen, noise), appearance
(brightness, contrast, gamma), spatial (rotation + scaling, elastic
deformation) — applied to a batch ``{"image": (B, 1, X, Y, Z) float,
"label": (B, 1, X, Y, Z) float 0/1}`` at once instead of patch by patch:

* each transform is drawn **per sample** with its own probability and its
  own parameters, from the ranges of :class:`AugmentConfig`;
* intensity transforms touch the image only; spatial ones resample image
  (trilinear) and label (nearest) on the same grid, so they stay aligned;
* blur and sharpening are separable Gaussian convolutions with a
  per-sample kernel (grouped ``conv3d``); rotation + scaling is one
  ``affine_grid``; the elastic deformation is a coarse random displacement
  grid upsampled to the patch — not MONAI's dense per-voxel field that is
  then Gaussian-smoothed, which cost a quarter of a CPU epoch — with
  MONAI's displacement amplitude for the same ``elastic_sigma`` and
  ``elastic_magnitude``;
* randomness comes from one :class:`BatchRandom` per batch, seeded by the
  engine from (seed, epoch, batch): draws are made for the whole global batch
  and each process keeps its rows, so a batch split over several
  data-parallel processes is augmented exactly as in one process.

Every transform keeps the batch's shapes and dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedseg.training.augment import AugmentConfig

Batch = dict[str, torch.Tensor]

# MONAI's RandGaussianSharpen defaults (sigma1, sigma2 <= sigma1, alpha): the sharpening BigAug used
SHARPEN_SIGMA1 = (0.5, 1.0)
SHARPEN_SIGMA2_LOW = 0.5
SHARPEN_ALPHA = (10.0, 30.0)
TRUNCATE = 3.0  # Gaussian kernels reach 3 sigma


class BatchRandom:
    """Per-sample random draws for one batch, the same whichever rows of it a process holds.

    Args:
        generator: seeded torch generator on the batch's device.
        global_size: samples in the whole (global) batch.
        rows: the rows this process holds (all of them with one process).
    """

    def __init__(self, generator: torch.Generator, global_size: int, rows: slice | None = None) -> None:
        self.generator = generator
        self.global_size = global_size
        self.rows = rows if rows is not None else slice(0, global_size)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        """U(low, high) of shape (rows, *shape)."""
        draw = torch.rand((self.global_size, *shape), generator=self.generator, device=self.device)
        return (low + (high - low) * draw)[self.rows]

    def normal(self, *shape: int) -> torch.Tensor:
        """N(0, 1) of shape (rows, *shape)."""
        return torch.randn((self.global_size, *shape), generator=self.generator, device=self.device)[self.rows]

    def chosen(self, prob: float) -> torch.Tensor:
        """Which rows the transform applies to (bool, one per row)."""
        return torch.rand(self.global_size, generator=self.generator, device=self.device)[self.rows] < prob


class RandBatchTransform:
    """Base: draw who and with what parameters for the whole batch, apply to the chosen rows only.

    Subclasses set ``keys`` and implement :meth:`draw` (parameters per row)
    and :meth:`apply` (the transform of a sub-batch with its parameters).
    """

    keys: tuple[str, ...] = ("image",)

    def __init__(self, prob: float) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {prob}")
        self.prob = prob

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        raise NotImplementedError

    def __call__(self, batch: Batch, random: BatchRandom) -> Batch:
        if self.prob == 0.0:
            return batch
        chosen = random.chosen(self.prob)
        params = self.draw(random, batch["image"].shape[2:])  # drawn for every row: the streams never depend on who was chosen
        rows = chosen.nonzero().flatten()
        if rows.numel() == 0:
            return batch
        sub = {key: batch[key][rows] for key in self.keys}
        done = self.apply(sub, {name: value[rows] for name, value in params.items()})
        out = dict(batch)
        for key in self.keys:
            out[key] = batch[key].index_copy(0, rows, done[key].to(batch[key].dtype))
        return out


# ----------------------------------------------------------------- image quality


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (n, 2 radius + 1), one per sigma."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernels = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def separable_blur(image: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur of each sample (n, 1, X, Y, Z) with its own sigmas (n, 3), edges replicated."""
    n = image.shape[0]
    x = image.transpose(0, 1)  # (1, n, X, Y, Z): one group per sample
    for axis in range(3):
        kernel = gaussian_kernels(sigma[:, axis], radius)
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.reshape(shape), groups=n)
    return x.transpose(0, 1)


class RandGaussianBlur(RandBatchTransform):
    """Gaussian blur, sigma per axis from ``sigma`` (voxels)."""

    def __init__(self, prob: float, sigma: tuple[float, float]) -> None:
        super().__init__(prob)
        self.sigma = sigma
        self.radius = max(1, math.ceil(TRUNCATE * sigma[1]))

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"sigma": random.uniform(*self.sigma, 3)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        return {"image": separable_blur(batch["image"], params["sigma"], self.radius)}


class RandGaussianSharpen(RandBatchTransform):
    """Unsharp masking as MONAI's RandGaussianSharpen: b1 + alpha (b1 - b2), b2 a further blur of b1."""

    def __init__(self, prob: float) -> None:
        super().__init__(prob)
        self.radius = math.ceil(TRUNCATE * SHARPEN_SIGMA1[1])

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        sigma1 = random.uniform(*SHARPEN_SIGMA1, 3)
        sigma2 = SHARPEN_SIGMA2_LOW + (sigma1 - SHARPEN_SIGMA2_LOW) * random.uniform(0.0, 1.0, 3)
        return {"sigma1": sigma1, "sigma2": sigma2, "alpha": random.uniform(*SHARPEN_ALPHA)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        blurred = separable_blur(batch["image"], params["sigma1"], self.radius)
        twice = separable_blur(blurred, params["sigma2"], self.radius)
        return {"image": blurred + _per_sample(params["alpha"]) * (blurred - twice)}


class RandGaussianNoise(RandBatchTransform):
    """Additive Gaussian noise; its standard deviation drawn from U(0, ``std``) per sample (as MONAI)."""

    def __init__(self, prob: float, std: float) -> None:
        super().__init__(prob)
        self.std = std

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"std": random.uniform(0.0, self.std), "noise": random.normal(1, *shape)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        return {"image": batch["image"] + _per_sample(params["std"]) * params["noise"]}


# ----------------------------------------------------------------- appearance


class RandShiftIntensity(RandBatchTransform):
    """Brightness: add U(-shift, shift)."""

    def __init__(self, prob: float, shift: float) -> None:
        super().__init__(prob)
        self.shift = shift

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"offset": random.uniform(-self.shift, self.shift)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        return {"image": batch["image"] + _per_sample(params["offset"])}


class RandScaleIntensity(RandBatchTransform):
    """Contrast: multiply by 1 + U(-scale, scale)."""

    def __init__(self, prob: float, scale: float) -> None:
        super().__init__(prob)
        self.scale = scale

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"factor": 1.0 + random.uniform(-self.scale, self.scale)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        return {"image": batch["image"] * _per_sample(params["factor"])}


class RandGamma(RandBatchTransform):
    """Gamma on the sample's own intensity range (MONAI's RandAdjustContrast): min and max are kept."""

    def __init__(self, prob: float, gamma: tuple[float, float]) -> None:
        super().__init__(prob)
        self.gamma = gamma

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"gamma": random.uniform(*self.gamma)}

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        image = batch["image"]
        low = image.amin(dim=(1, 2, 3, 4), keepdim=True)
        span = image.amax(dim=(1, 2, 3, 4), keepdim=True) - low
        unit = ((image - low) / (span + 1e-7)).clamp_(0.0, 1.0)
        return {"image": unit ** _per_sample(params["gamma"]) * span + low}


# ----------------------------------------------------------------- spatial


def resample(batch: Batch, grid: torch.Tensor) -> Batch:
    """Image trilinear, label nearest, on the same grid (edges replicated)."""
    out = {"image": F.grid_sample(batch["image"], grid, mode="bilinear", padding_mode="border", align_corners=True)}
    if "label" in batch:
        out["label"] = F.grid_sample(batch["label"], grid, mode="nearest", padding_mode="border", align_corners=True)
    return out


def _half_sizes(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Voxels from the patch centre to its edge, in grid_sample's coordinate order (last axis first)."""
    return torch.tensor([(n - 1) / 2 for n in reversed(shape)], device=device, dtype=torch.float32).clamp_(min=0.5)


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotations about the three axes by ``angles`` (n, 3) radians, applied in turn."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).reshape(-1, 3, 3)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).reshape(-1, 3, 3)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).reshape(-1, 3, 3)
    return rz @ ry @ rx


class RandAffine(RandBatchTransform):
    """Rotation by U(-rotate, rotate) about each axis and scaling by 1 + U(-scale, scale) per axis.

    Built in voxel units about the patch centre (so a 32 x 32 x 16 patch is
    rotated, not sheared) and expressed in grid_sample's normalised units.
    """

    keys = ("image", "label")

    def __init__(self, prob: float, rotate_rad: float, scale: float) -> None:
        super().__init__(prob)
        self.rotate_rad = rotate_rad
        self.scale = scale

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {
            "angles": random.uniform(-self.rotate_rad, self.rotate_rad, 3),
            "scales": 1.0 + random.uniform(-self.scale, self.scale, 3),
        }

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        image = batch["image"]
        half = _half_sizes(image.shape[2:], image.device)
        linear = rotation_matrices(params["angles"]) @ torch.diag_embed(params["scales"])
        theta = torch.diag(1.0 / half) @ linear @ torch.diag(half)  # normalised -> voxels -> transform -> normalised
        theta = torch.cat([theta, torch.zeros_like(theta[:, :, :1])], dim=2)
        grid = F.affine_grid(theta, list(image.shape), align_corners=True)
        return resample(batch, grid)


def elastic_rms(sigma: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """RMS displacement per axis (voxels) of MONAI's Rand3DElastic for these parameters.

    MONAI draws U(-1, 1) per voxel (SD 1/sqrt 3), smooths it with a
    normalised Gaussian of ``sigma`` voxels (SD falls by (2 sqrt(pi) sigma)^(3/2)
    in 3-D) and multiplies by ``magnitude``.
    """
    return magnitude / math.sqrt(3.0) / (2.0 * math.sqrt(math.pi) * sigma) ** 1.5


class RandElastic(RandBatchTransform):
    """Elastic deformation from a coarse random displacement grid, upsampled trilinearly to the patch.

    Control points are ``2.4 sigma`` voxels apart (then the displacement's
    correlation at a lag of sigma matches that of a Gaussian-smoothed field,
    exp(-1/4)); their displacements are Gaussian with MONAI's RMS for the
    sample's (sigma, magnitude), corrected for the variance that trilinear
    interpolation between independent points loses ((2/3)^3).
    """

    keys = ("image", "label")
    SPACING_PER_SIGMA = 2.4

    def __init__(self, prob: float, sigma: tuple[float, float], magnitude: tuple[float, float]) -> None:
        super().__init__(prob)
        self.sigma = sigma
        self.magnitude = magnitude
        self.spacing = self.SPACING_PER_SIGMA * (sigma[0] + sigma[1]) / 2

    def control_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(max(2, math.ceil((n - 1) / self.spacing) + 1) for n in shape)

    def draw(self, random: BatchRandom, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        return {
            "sigma": random.uniform(*self.sigma),
            "magnitude": random.uniform(*self.magnitude),
            "points": random.normal(3, *self.control_shape(shape)),
        }

    def displacement(self, params: dict[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """(n, 3, X, Y, Z) displacement in voxels along X, Y, Z."""
        rms = elastic_rms(params["sigma"], params["magnitude"]) / (2.0 / 3.0) ** 1.5
        coarse = params["points"] * _per_sample(rms)
        return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)

    def apply(self, batch: Batch, params: dict[str, torch.Tensor]) -> Batch:
        image = batch["image"]
        shape = image.shape[2:]
        n = image.shape[0]
        identity = torch.eye(3, 4, device=image.device).expand(n, 3, 4)
        grid = F.affine_grid(identity, list(image.shape), align_corners=True)
        offset = self.displacement(params, shape).flip(1) / _half_sizes(shape, image.device)[None, :, None, None, None]
        return resample(batch, grid + offset.permute(0, 2, 3, 4, 1))


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1, 1) for broadcasting over a batch of images."""
    return values.reshape(-1, 1, 1, 1, 1)


# ----------------------------------------------------------------- the stack


class BatchCompose:
    """Transforms applied in turn, each with the batch's one :class:`BatchRandom`."""

    def __init__(self, transforms: Sequence[RandBatchTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, batch: Batch, random: BatchRandom) -> Batch:
        for transform in self.transforms:
            batch = transform(batch, random)
        return batch


def batched_bigaug(config: AugmentConfig) -> BatchCompose:
    """The BigAug stack of ``config`` (image quality -> appearance -> spatial), batched."""
    return BatchCompose(
        [
            RandGaussianBlur(config.blur_prob, config.blur_sigma),
            RandGaussianSharpen(config.sharpen_prob),
            RandGaussianNoise(config.noise_prob, config.noise_std),
            RandShiftIntensity(config.brightness_prob, config.brightness_shift),
            RandScaleIntensity(config.contrast_prob, config.contrast_scale),
            RandGamma(config.gamma_prob, config.gamma_range),
            RandAffine(config.affine_prob, math.radians(config.rotate_deg), config.scale_range),
            RandElastic(config.elastic_prob, config.elastic_sigma, config.elastic_magnitude),
        ]
    )
