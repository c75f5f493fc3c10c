"""Segmentation networks by name, with seeded, deterministic initialisation.

Every network follows MONAI's signature ``(spatial_dims, in_channels,
out_channels, ...)`` and outputs ``out_channels`` logits per voxel (channel 0
background, channel 1 prostate).

| name         | network                              | parameters | use                         |
|--------------|--------------------------------------|-----------:|-----------------------------|
| `unet-small` | MONAI UNet, channels 8-16-32-64      |     0.15 M | CPU demo default            |
| `unet`       | MONAI UNet, channels 16-32-64-128-256|     4.8 M  | larger CPU/GPU runs         |
| `ahnet`      | MONAI AHNet (3-D AH-Net, the paper)  |      38 M  | paper protocol, GPU         |

Also the two conversions between a model's weights and the numpy arrays the
federation protocol carries (:func:`weights_to_numpy`, :func:`weights_from_numpy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import AHNet, UNet
from torch import nn

from fedseg.errors import FedsegError


@dataclass(frozen=True)
class NetworkSpec:
    """How to build a network and which patch sizes it accepts."""

    build: Callable[[int, int], nn.Module]  # (in_channels, out_channels) -> module
    patch_multiple: tuple[int, int, int]  # every patch/ROI axis must be a multiple of this
    default_patch: tuple[int, int, int]
    description: str


def _unet_small(in_channels: int, out_channels: int) -> nn.Module:
    return UNet(3, in_channels, out_channels, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="instance")


def _unet(in_channels: int, out_channels: int) -> nn.Module:
    return UNet(3, in_channels, out_channels, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance")


def _ahnet(in_channels: int, out_channels: int) -> nn.Module:
    # pretrained=False: weights are never downloaded; the paper's AH-Net is
    # initialised from a 2-D network, which fedseg leaves to the user.
    return AHNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, pretrained=False)


NETWORKS: dict[str, NetworkSpec] = {
    "unet-small": NetworkSpec(_unet_small, (8, 8, 8), (64, 64, 32), "MONAI UNet 8-16-32-64, 0.15 M parameters"),
    "unet": NetworkSpec(_unet, (16, 16, 16), (96, 96, 48), "MONAI UNet 16-...-256, 4.8 M parameters"),
    # AH-Net's pyramid pooling needs in-plane sizes that are multiples of 128, and its encoder
    # depths that are multiples of 32 (16 and 48 fail inside the network).
    "ahnet": NetworkSpec(_ahnet, (128, 128, 32), (128, 128, 32), "3-D AH-Net (MONAI AHNet), 38 M parameters"),
}


def network_spec(name: str) -> NetworkSpec:
    """Spec of a registered network; FedsegError listing the names otherwise."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise FedsegError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}") from None


def build_model(name: str, *, in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> nn.Module:
    """Build a registered network with weights drawn from ``seed`` (same seed, same weights).

    The global torch RNG is restored afterwards, so building a model does not
    change any other random stream.
    """
    spec = network_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(in_channels, out_channels)


def check_patch(name: str, patch: tuple[int, int, int]) -> None:
    """Raise FedsegError unless every patch axis is a positive multiple the network accepts."""
    multiple = network_spec(name).patch_multiple
    if len(patch) != 3 or any(p <= 0 or p % m for p, m in zip(patch, multiple)):
        raise FedsegError(f"patch size {tuple(patch)} does not suit {name}: each axis must be a multiple of {multiple}")


def sliding_window_logits(
    model: nn.Module, image: torch.Tensor, patch: tuple[int, int, int], sw_batch_size: int, overlap: float
) -> torch.Tensor:
    """Logits (1, C, X, Y, Z) of a (1, 1, X, Y, Z) volume; volumes smaller than a patch are padded."""
    return sliding_window_inference(image, patch, sw_batch_size, model, overlap=overlap, mode="gaussian")


def weights_to_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays on the CPU (copies: later training never changes them)."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in weights.items()}


def weights_from_numpy(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Writable torch copies of numpy arrays (received or read-only memory-mapped arrays are never aliased)."""
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in arrays.items()}
