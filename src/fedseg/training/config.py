"""Training hyperparameters: the ``[train]`` table (with ``[train.augment]``), frozen and validated.

Defaults follow the paper where it says something (soft Dice, Adam,
validation-Dice-driven learning-rate decay, BigAug, crops balanced by
foreground/background) and are sized for a CPU otherwise. Types, ranges and
choices are the fields' own (pydantic); :func:`fedseg.schema.explain` turns a
mistake into a message naming the file, the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator

from fedseg.errors import FedsegError
from fedseg.models import check_patch, network_spec
from fedseg.schema import Bool, Integer, Number, Table, Text, must_be, read_toml
from fedseg.training.device import DEVICE_CHOICES, DEVICE_PATTERN

__all__ = [
    "AUGMENT_ENGINES", "INIT_CHOICES", "MACHINE_OPTIONS", "AugmentConfig", "TrainConfig", "load_train_config", "read_toml",
    "without_machine_options",
]

AugmentEngine = Literal["batched", "monai"]
Init = Literal["random", "phantom"]
AUGMENT_ENGINES: tuple[str, ...] = get_args(AugmentEngine)
INIT_CHOICES: tuple[str, ...] = get_args(Init)
MACHINE_OPTIONS = ("threads", "device", "amp", "channels_last", "loader_workers")
"""Options that say how this machine computes, not what: never compared across machines or on resume."""

Probability = Annotated[Number, Field(ge=0, le=1)]
NonNegative = Annotated[Number, Field(ge=0)]
Range = tuple[NonNegative, NonNegative]
Count = Annotated[Integer, Field(ge=1)]


class AugmentConfig(Table):
    """Probabilities and ranges of the stacked BigAug transforms (0 disables one; see :mod:`fedseg.training.augment`)."""

    toml_table = "train.augment"

    blur_prob: Probability = 0.2
    blur_sigma: Range = (0.25, 1.0)
    sharpen_prob: Probability = 0.1
    noise_prob: Probability = 0.2
    noise_std: NonNegative = 0.1
    brightness_prob: Probability = 0.3
    brightness_shift: NonNegative = 0.2
    contrast_prob: Probability = 0.3
    contrast_scale: NonNegative = 0.2
    gamma_prob: Probability = 0.2
    gamma_range: Range = (0.7, 1.5)
    affine_prob: Probability = 0.3
    rotate_deg: NonNegative = 15.0
    scale_range: NonNegative = 0.15
    elastic_prob: Probability = 0.1
    elastic_sigma: Range = (5.0, 7.0)
    elastic_magnitude: Range = (50.0, 150.0)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all (cropping still happens)."""
        return cls(**{name: 0.0 for name in cls.model_fields if name.endswith("_prob")})


class TrainConfig(Table):
    """Everything that determines a training run (with the data and the seed).

    Attributes:
        network: registered network name (see :mod:`fedseg.models`).
        epochs: local epochs (the paper: 300).
        learning_rate: Adam's initial learning rate.
        batch_size: patches per optimiser step.
        patch_size: crop size in voxels; None = the network's default.
        samples_per_volume: crops drawn from each training case per epoch.
        pos_neg_ratio: foreground-centred to background-centred crops.
        lr_patience, lr_factor, min_lr: ReduceLROnPlateau on validation Dice (mode max).
        sw_batch_size, sw_overlap: sliding-window validation/inference.
        seed: initialisation, crop and augmentation randomness.
        threads: torch intra-op threads (None = all cores).
        augment: the BigAug stack.
        augment_engine: ``batched`` (the whole batch at once, with tensor ops on
            the training device) or ``monai`` (MONAI's per-patch dictionary
            transforms on the CPU: fedseg's engine before 0.2, kept for comparison).
        val_every: validate every k epochs (and after the last); the paper: 1.
            The learning-rate schedule counts validations, not epochs.
        init: the starting weights: ``random`` (seeded initialisation) or
            ``phantom`` (trained by fedseg on its own synthetic institutions,
            cached; see :mod:`fedseg.training.pretrain`): a shape prior for
            sites of a few cases.
        stop_patience: stop a fold once its best validation Dice is this many
            epochs old (a plateau), before ``epochs``; None = always ``epochs``.
            Federated rounds are the server's and do not stop early.
        device: ``auto`` (CUDA when available, else the CPU), ``cpu``,
            ``cuda``, ``cuda:N`` or ``mps``.
        amp: mixed precision (bf16 where the GPU has it, else fp16 with a
            gradient scaler); None = on for CUDA, off elsewhere.
        channels_last: keep 3-D activations channels-last (faster convolutions
            on CPUs and tensor cores; same results up to rounding).
        loader_workers: processes cutting patches for the GPU; None = none on
            a CPU (measured faster on 2 cores), a few per GPU on CUDA.

    ``threads``, ``device``, ``amp``, ``channels_last`` and ``loader_workers``
    are :data:`MACHINE_OPTIONS`: each machine picks its own, so they are
    not compared when resuming or between the sites of a study.
    """

    toml_table = "train"

    network: Text = "unet-small"
    epochs: Count = 40
    learning_rate: Annotated[Number, Field(gt=0)] = 2e-3
    batch_size: Count = 4
    patch_size: tuple[Integer, Integer, Integer] | None = None
    samples_per_volume: Count = 2
    pos_neg_ratio: NonNegative = 1.0
    lr_patience: Annotated[Integer, Field(ge=0)] = 5
    lr_factor: Annotated[Number, Field(gt=0, lt=1)] = 0.5
    min_lr: NonNegative = 1e-5
    sw_batch_size: Count = 4
    sw_overlap: Annotated[Number, Field(ge=0, lt=1)] = 0.25
    seed: Annotated[Integer, Field(ge=0)] = 0
    threads: Count | None = None
    augment: AugmentConfig = AugmentConfig()
    augment_engine: AugmentEngine = "batched"
    val_every: Count = 1
    init: Init = "random"
    stop_patience: Annotated[Integer, Field(ge=1), must_be("an integer >= 1 (epochs)")] | None = None
    device: Annotated[Text, Field(pattern=f"^(?:{DEVICE_PATTERN.pattern})$"), must_be(DEVICE_CHOICES)] = "auto"
    amp: Bool | None = None
    channels_last: Bool = True
    loader_workers: Annotated[Integer, Field(ge=0)] | None = None

    @field_validator("network")
    @classmethod
    def _registered(cls, network: str) -> str:
        try:
            network_spec(network)
        except FedsegError as exc:
            raise ValueError(str(exc)) from None
        return network

    @field_validator("patch_size")
    @classmethod
    def _suits_the_network(cls, patch: tuple[int, int, int] | None, info: ValidationInfo) -> tuple[int, int, int] | None:
        if patch is not None and "network" in info.data:  # an unknown network is reported on its own
            try:
                check_patch(info.data["network"], patch)
            except FedsegError as exc:
                raise ValueError(str(exc)) from None
        return patch

    def without_machine_options(self) -> dict[str, Any]:
        """:meth:`to_dict` less the options each machine chooses for itself."""
        return without_machine_options(self.to_dict())

    def training_done(self, epoch: int, best_epoch: int) -> bool:
        """After ``epoch`` completed epochs with the best validation Dice at ``best_epoch`` (0: none yet)."""
        if epoch >= self.epochs:
            return True
        return self.stop_patience is not None and best_epoch > 0 and epoch - best_epoch >= self.stop_patience

    def stopped_early(self, epoch: int, best_epoch: int) -> bool:
        """Training ended on a validation plateau before ``epochs``."""
        return epoch < self.epochs and self.training_done(epoch, best_epoch)

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size or network_spec(self.network).default_patch

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped, with the patch the network will use written out (what a sidecar stores)."""
        return {**super().to_dict(), "patch_size": list(self.patch)}


def without_machine_options(train: dict[str, Any]) -> dict[str, Any]:
    """A ``[train]`` dict (a config's, or one recorded in JSON) less :data:`MACHINE_OPTIONS`."""
    return {k: v for k, v in train.items() if k not in MACHINE_OPTIONS}


def load_train_config(path: Path) -> TrainConfig:
    """Read the ``[train]`` table of a TOML file (defaults when it has none; other tables belong to others)."""
    return TrainConfig.from_dict(read_toml(path).get("train", {}), source=str(path))
