"""Real-time augmentation after the Deep Stacked Transformation (BigAug) recipe.

Zhang et al., IEEE TMI 2020: stacked image-quality, appearance and spatial
transforms, each applied with its own probability, generalise a segmentation
network to unseen sites. fedseg composes MONAI dictionary transforms so image
and label stay aligned:

1. random crop balanced by foreground/background ratio (``RandCropByPosNegLabeld``);
2. image quality: Gaussian blur, sharpening, Gaussian noise;
3. appearance: brightness shift, contrast scaling, gamma;
4. spatial: rotation and scaling (one affine), elastic deformation.

Spatial transforms run on the cropped patch, not the whole volume, which is
what keeps augmentation cheaper than the network step on a CPU. The
probabilities and ranges are :class:`fedseg.training.config.AugmentConfig`
(the ``[train.augment]`` table).
"""

from __future__ import annotations

import numpy as np
from monai.transforms import (
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from fedseg.training.config import AugmentConfig  # the [train.augment] table: probabilities and ranges

KEYS = ("image", "label")


def crop_transform(patch: tuple[int, int, int], samples: int, pos_neg_ratio: float) -> RandCropByPosNegLabeld:
    """``samples`` patches per volume, centred on foreground with probability ratio/(1+ratio)."""
    return RandCropByPosNegLabeld(
        keys=KEYS, label_key="label", spatial_size=patch, pos=pos_neg_ratio, neg=1.0, num_samples=samples, allow_smaller=False
    )


def stacked_transforms(patch: tuple[int, int, int], config: AugmentConfig) -> list:
    """The BigAug stack applied to each cropped patch (image quality → appearance → spatial)."""
    rad = np.deg2rad(config.rotate_deg)
    return [
        RandGaussianSmoothd(
            keys="image", prob=config.blur_prob, sigma_x=config.blur_sigma, sigma_y=config.blur_sigma, sigma_z=config.blur_sigma
        ),
        RandGaussianSharpend(keys="image", prob=config.sharpen_prob),
        RandGaussianNoised(keys="image", prob=config.noise_prob, std=config.noise_std),
        RandShiftIntensityd(keys="image", prob=config.brightness_prob, offsets=config.brightness_shift),
        RandScaleIntensityd(keys="image", prob=config.contrast_prob, factors=config.contrast_scale),
        RandAdjustContrastd(keys="image", prob=config.gamma_prob, gamma=config.gamma_range),
        RandAffined(
            keys=KEYS,
            prob=config.affine_prob,
            rotate_range=(rad, rad, rad),
            scale_range=(config.scale_range,) * 3,
            mode=("bilinear", "nearest"),
            padding_mode="border",
            spatial_size=patch,
            cache_grid=True,
        ),
        Rand3DElasticd(
            keys=KEYS,
            prob=config.elastic_prob,
            sigma_range=config.elastic_sigma,
            magnitude_range=config.elastic_magnitude,
            mode=("bilinear", "nearest"),
            padding_mode="border",
            spatial_size=patch,
        ),
    ]


def training_transforms(
    patch: tuple[int, int, int], samples: int, pos_neg_ratio: float, config: AugmentConfig
) -> tuple[RandCropByPosNegLabeld, Compose]:
    """(crop, per-patch augmentation). Seed both with ``set_random_state`` for reproducibility."""
    return crop_transform(patch, samples, pos_neg_ratio), Compose(stacked_transforms(patch, config))
