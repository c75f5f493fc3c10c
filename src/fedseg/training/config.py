"""Training hyperparameters: one frozen dataclass, readable from TOML.

Defaults follow the paper where it says something (soft Dice, Adam,
validation-Dice-driven learning-rate decay, BigAug, crops balanced by
foreground/background) and are sized for a CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.models import check_patch, network_spec
from fedseg.training.augment import AugmentConfig
from fedseg.training.device import DEVICE_CHOICES, DEVICE_PATTERN

AUGMENT_ENGINES = ("batched", "monai")
INIT_CHOICES = ("random", "phantom")
MACHINE_OPTIONS = ("threads", "device", "amp", "channels_last", "loader_workers")
"""Options that say how this machine computes, not what: never compared across machines or on resume."""


@dataclass(frozen=True)
class TrainConfig:
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

    network: str = "unet-small"
    epochs: int = 40
    learning_rate: float = 2e-3
    batch_size: int = 4
    patch_size: tuple[int, int, int] | None = None
    samples_per_volume: int = 2
    pos_neg_ratio: float = 1.0
    lr_patience: int = 5
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    seed: int = 0
    threads: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_engine: str = "batched"
    val_every: int = 1
    init: str = "random"
    stop_patience: int | None = None
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool = True
    loader_workers: int | None = None

    def __post_init__(self) -> None:
        network_spec(self.network)
        self._check_engine_options()
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
            check_patch(self.network, self.patch)
        for name in ("epochs", "batch_size", "samples_per_volume", "sw_batch_size"):
            if getattr(self, name) < 1:
                raise FedsegError(f"training option {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise FedsegError(f"learning_rate must be positive, got {self.learning_rate}")

    def _check_engine_options(self) -> None:
        if self.augment_engine not in AUGMENT_ENGINES:
            raise FedsegError(f"train.augment_engine must be one of {', '.join(AUGMENT_ENGINES)}, got {self.augment_engine!r}")
        if type(self.val_every) is not int or self.val_every < 1:
            raise FedsegError(f"train.val_every must be an integer >= 1, got {self.val_every!r}")
        if self.init not in INIT_CHOICES:
            raise FedsegError(f"train.init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if self.stop_patience is not None and (type(self.stop_patience) is not int or self.stop_patience < 1):
            raise FedsegError(f"train.stop_patience must be an integer >= 1 (epochs), got {self.stop_patience!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise FedsegError(f"train.device must be {DEVICE_CHOICES}, got {self.device!r}")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise FedsegError(f"train.amp must be true or false, got {self.amp!r}")
        if not isinstance(self.channels_last, bool):
            raise FedsegError(f"train.channels_last must be true or false, got {self.channels_last!r}")
        if self.loader_workers is not None and (type(self.loader_workers) is not int or self.loader_workers < 0):
            raise FedsegError(f"train.loader_workers must be an integer >= 0, got {self.loader_workers!r}")

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
        """JSON-shaped (tuples as lists), so it compares equal to what a sidecar stores."""
        data = asdict(self)
        data["patch_size"] = list(self.patch)
        return json.loads(json.dumps(data))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a plain dict (TOML table or JSON sidecar); unknown keys are errors."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedsegError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")
        augment = data.pop("augment", {}) or {}
        aug_known = {f.name for f in dataclasses.fields(AugmentConfig)}
        if bad := sorted(set(augment) - aug_known):
            raise FedsegError(f"{source}: unknown augment option(s) {bad}")
        augment = {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}
        if isinstance(data.get("patch_size"), list):
            data["patch_size"] = tuple(data["patch_size"])
        try:
            return cls(**data, augment=AugmentConfig(**augment))
        except TypeError as exc:
            raise FedsegError(f"{source}: {exc}") from exc


def without_machine_options(train: dict[str, Any]) -> dict[str, Any]:
    """A ``[train]`` dict (a config's, or one recorded in JSON) less :data:`MACHINE_OPTIONS`."""
    return {k: v for k, v in train.items() if k not in MACHINE_OPTIONS}


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; an unreadable or malformed file raises FedsegError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedsegError(f"{path}: cannot read TOML ({exc})") from exc


def load_train_config(path: Path) -> TrainConfig:
    """Read the ``[train]`` table of a TOML file (defaults when it has none; other tables belong to others)."""
    return TrainConfig.from_dict(read_toml(path).get("train", {}), source=str(path))
