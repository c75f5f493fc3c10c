"""Cache keys derived from configurations must not change with the code that holds them.

The expected strings were computed with fedseg at commit 6141df4 (the frozen dataclasses, before the
configs became pydantic models). A different string means every cached prepared site and phantom
prior would silently be made again: change them only together with ``fedseg.__version__``
(which is part of the phantom key on purpose).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.data.preprocess import PrepareConfig
from fedseg.study.profiles import load_settings
from fedseg.training.config import TrainConfig
from fedseg.training.data import cache_folder
from fedseg.training.pretrain import _folder


def _configs(name: str) -> tuple[TrainConfig, PrepareConfig]:
    if name == "default":
        return TrainConfig(), PrepareConfig()
    if name == "demo":
        settings = load_settings("demo")
        return settings.study.train, settings.study.prepare
    # an integer spacing, as a study.toml may write it: recorded (and hashed) as written
    return TrainConfig(network="unet", patch_size=(32, 32, 16)), PrepareConfig(spacing_mm=2, normalize="percentile")


@pytest.mark.parametrize(
    ("name", "phantom", "prepared"),
    [
        ("default", "phantom-69c787b2d1fab024", "nci-1mm-07cc7cf4df"),
        ("demo", "phantom-6504fcd331e88969", "nci-4mm-fbc6dc0c48"),
        ("integer-spacing", "phantom-1ac8bc13398dbc9b", "nci-2mm-e6935e4dbc"),
    ],
)
def test_cache_keys_are_those_of_fedseg_0_1(name, phantom, prepared):
    train, prepare = _configs(name)
    assert _folder(train, prepare, Path("/c")).name == phantom
    assert cache_folder(Path("/c"), Path("/sites/nci"), prepare).name == prepared


def test_recorded_configs_keep_their_json_shape():
    """What sidecars, model.json and meta/<case>.json record (and resuming compares)."""
    assert PrepareConfig().to_dict() == {"spacing_mm": 1.0, "image_order": 1, "modality": "T2", "normalize": "zscore"}
    train = TrainConfig().to_dict()
    assert train["patch_size"] == [64, 64, 32] and train["augment"]["blur_sigma"] == [0.25, 1.0]
    assert list(train)[:4] == ["network", "epochs", "learning_rate", "batch_size"] and len(train) == 23
