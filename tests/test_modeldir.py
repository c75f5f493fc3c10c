"""model.json: one writer, one reader, the shape fedseg always wrote, and records of older versions still read."""

from __future__ import annotations

import json
import math

import pytest

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.io import read_json
from fedseg.modeldir import FoldOutcome, ModelRecord, model_record, open_model_dir, read_model_record, record_fold
from fedseg.training.config import TrainConfig

CONFIG = TrainConfig(patch_size=(16, 16, 8), sw_batch_size=2)
TRAINED_ON = [{"site": "nci", "source": "/data/nci"}]

# model.json as the first fedseg 0.1 that wrote one (commit f9e7057): no keep_largest_component, no
# normalize in preprocessing, no stopped_early / trained_with in its folds
OLD_RECORD = {
    "format": 1, "fedseg_version": "0.1.0", "network": "unet-small", "in_channels": 1, "out_channels": 2,
    "preprocessing": {"spacing_mm": 1.0, "image_order": 1, "modality": "T2"},
    "inference": {"patch_size": [16, 16, 8], "sw_batch_size": 2, "sw_overlap": 0.25},
    "ensemble": "mean of the fold models' softmax probabilities, threshold 0.5",
    "train_config": {"network": "unet-small", "epochs": 3}, "trained_on": TRAINED_ON,
    "folds": [{"fold": 0, "weights": "fold0/best.safetensors", "best_val_dice": 0.7, "best_epoch": 2, "epochs": 3}],
}


def test_a_new_record_round_trips_and_writes_optional_keys_only_when_set(tmp_path):
    record = ModelRecord.new(CONFIG, PrepareConfig(spacing_mm=2.0), TRAINED_ON)
    open_model_dir(tmp_path, record)
    record_fold(tmp_path, FoldOutcome(1, 0.8, 4, 5, 1.0, 0))
    record_fold(tmp_path, FoldOutcome(0, 0.6, 2, 5, 1.0, 0, {"device": "cpu", "description": "cpu, fp32"}, True))
    on_disk = read_json(tmp_path / "model.json")
    assert "init" not in on_disk and "federated" not in on_disk
    assert on_disk["inference"] == {"patch_size": [16, 16, 8], "sw_batch_size": 2, "sw_overlap": 0.25, "keep_largest_component": True}
    assert on_disk["folds"] == [
        {"fold": 0, "weights": "fold0/best.safetensors", "best_val_dice": 0.6, "best_epoch": 2, "epochs": 5,
         "stopped_early": True, "trained_with": {"device": "cpu", "description": "cpu, fp32"}},
        {"fold": 1, "weights": "fold1/best.safetensors", "best_val_dice": 0.8, "best_epoch": 4, "epochs": 5},
    ]
    assert read_model_record(tmp_path).to_dict() == on_disk  # what is read writes back unchanged
    assert model_record(CONFIG, PrepareConfig(spacing_mm=2.0), TRAINED_ON) == record.to_dict()


def test_a_record_of_fedseg_0_1_reads_with_defaults_and_keeps_what_it_does_not_know(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({**OLD_RECORD, "federated": {"study": "s"}, "added_by_a_site": 1}))
    record = read_model_record(tmp_path)
    assert record.inference.keep_largest_component is False  # as inference always read it
    assert record.preprocessing == PrepareConfig(spacing_mm=1.0)  # normalize: the only one there was, zscore
    assert record.folds[0].stopped_early is False and record.folds[0].trained_with is None
    record_fold(tmp_path, FoldOutcome(1, 0.5, 1, 1, 0.0, 0))
    again = read_json(tmp_path / "model.json")
    assert again["added_by_a_site"] == 1 and again["federated"] == {"study": "s"}
    assert [f["fold"] for f in again["folds"]] == [0, 1]


def test_a_fold_without_validation_is_written_as_strict_json(tmp_path):
    open_model_dir(tmp_path, model_record(CONFIG, PrepareConfig(), TRAINED_ON))
    record_fold(tmp_path, FoldOutcome(0, float("nan"), 3, 3, 1.0, 0))
    text = (tmp_path / "model.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in model.json"))
    assert math.isnan(read_model_record(tmp_path).folds[0].best_val_dice)


def test_another_model_in_the_same_folder_is_refused(tmp_path):
    open_model_dir(tmp_path, model_record(CONFIG, PrepareConfig(), TRAINED_ON))
    with pytest.raises(FedsegError, match="network differs from this run"):
        open_model_dir(tmp_path, model_record(CONFIG.replace(network="unet", patch_size=(32, 32, 16)), PrepareConfig(), TRAINED_ON))
    with pytest.raises(FedsegError, match="not a model directory"):
        read_model_record(tmp_path / "elsewhere")
    (tmp_path / "model.json").write_text(json.dumps({**OLD_RECORD, "folds": [{"fold": "zero"}]}))
    with pytest.raises(FedsegError, match=r"model.json: folds\[0\].fold must be an integer"):
        read_model_record(tmp_path)
