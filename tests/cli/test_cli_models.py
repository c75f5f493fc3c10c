"""``fedseg train | predict | evaluate | tables`` end to end on a tiny site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ellipsoid_case, invoke_cli as invoke, oblique_affine
from fedseg.data.splits import load_splits
from fedseg.data.volume import Volume, save_volume

TRAIN_TOML = """
[train]
patch_size = [16, 16, 8]
batch_size = 2
samples_per_volume = 1
sw_batch_size = 2
[train.augment]
blur_prob = 0.0
elastic_prob = 0.0
"""


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """The commands run with --threads 1 (fast for tiny nets, immune to a busy machine); undo it afterwards."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A site of five oblique 0.6 x 0.6 x 3 mm cases, a training config and a cache folder."""
    root = tmp_path_factory.mktemp("cli")
    affine = oblique_affine((0.6, 0.6, 3.0))
    for i in range(5):
        image, mask = ellipsoid_case((24, 20, 8), seed=i)
        save_volume(Volume(image, affine), root / "site" / "images" / f"case{i:02d}.nii.gz")
        save_volume(Volume(mask, affine), root / "site" / "labels" / f"case{i:02d}.nii.gz")
    (root / "train.toml").write_text(TRAIN_TOML)
    return root


def train_args(work: Path, out: Path, *extra) -> list:
    return ["train", work / "site", "--out", out, "--spacing", "2", "--cache", work / "cache",
            "--config", work / "train.toml", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def trained(work) -> tuple[Path, tuple[int, str, str]]:
    """Fold 0 trained for one epoch by the command; (model dir, command result)."""
    model = work / "model"
    return model, invoke(*train_args(work, model, "--fold", "0", "--epochs", "1"))


# ----------------------------------------------------------------- train


def test_train_one_fold_writes_a_model_directory(trained):
    model, (code, stdout, err) = trained
    assert code == 0, err
    record = json.loads((model / "model.json").read_text())
    assert [f["fold"] for f in record["folds"]] == [0]
    assert (model / record["folds"][0]["weights"]).is_file()
    assert record["preprocessing"]["spacing_mm"] == 2.0
    assert record["inference"]["patch_size"] == [16, 16, 8]
    rows = (model / "fold0" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 2
    assert "resumed" not in stdout


def test_train_again_with_more_epochs_resumes(trained, work, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    code, stdout, err = run_cli(*train_args(work, model, "--fold", "0", "--epochs", "2"))
    assert code == 0, err
    assert "resumed after epoch 1" in stdout
    assert len((model / "fold0" / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((model / "model.json").read_text())["folds"][0]["epochs"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fold", "9"], "fold 9 does not exist"),
        (["--network", "nope"], "unet-small, unet, ahnet"),
        (["--fold", "0", "--all-folds"], "exclude each other"),
    ],
    ids=["missing-fold", "unknown-network", "fold-and-all-folds"],
)
def test_train_argument_errors(work, tmp_path, run_cli, extra, message):
    """Bad arguments: exit 1, one clear line, and no model directory left behind."""
    out = tmp_path / "model"
    code, _, err = run_cli(*train_args(work, out, "--epochs", "1", *extra))
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------- evaluate


def test_evaluate_writes_per_case_dice_of_the_test_split(trained, work, tmp_path, run_cli):
    out = tmp_path / "eval" / "result.json"
    code, stdout, err = run_cli("evaluate", trained[0], work / "site", "--json", out, "--cache", work / "cache", "--threads", "1")
    assert code == 0, err
    result = json.loads(out.read_text())
    (splits_file,) = (work / "cache").glob("*/splits.json")
    assert sorted(result["dice"]) == sorted(load_splits(splits_file).test)
    assert all(0.0 <= d <= 1.0 for d in result["dice"].values())
    assert result["mean"] == pytest.approx(np.mean(list(result["dice"].values())))
    assert result["test_set"] == "site" and result["model"] == "model" and result["grid"] == "original"
    assert "Dice" in stdout


def test_evaluate_rejects_unknown_split(trained, work, run_cli):
    code, _, err = run_cli("evaluate", trained[0], work / "site", "--split", "train", "--cache", work / "cache")
    assert code == 1 and "--split" in err


# ----------------------------------------------------------------- predict


def test_predict_survives_a_corrupt_image_and_keeps_existing_masks(trained, work, tmp_path, run_cli):
    """A corrupt file fails by name (exit 1) while the others get masks; masks are never silently replaced."""
    images, out = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(work / "site" / "images", images)
    (images / "broken.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    code, stdout, err = run_cli("predict", trained[0], images, out, "--threads", "1")
    assert code == 1
    assert "broken.nii.gz" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [f"case{i:02d}.nii.gz" for i in range(5)]
    assert "wrote 5 mask(s)" in stdout

    (images / "broken.nii.gz").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "case00.nii.gz").write_bytes(b"user's own edits")
    code, _, err = run_cli("predict", trained[0], images, out, "--threads", "1")
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "case00.nii.gz").read_bytes() == b"user's own edits"

    code, _, err = run_cli("predict", trained[0], images, out, "--overwrite", "--threads", "1")
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same model, same masks


# ----------------------------------------------------------------- tables


def test_tables_from_evaluate_json_files(tmp_path, run_cli):
    """Hand-made 'evaluate --json' files become the cross-site tables; Overall pools the private sets."""
    dice = {
        ("fl", "s1"): {"a": 0.90, "b": 0.80, "c": 0.85},
        ("fl", "s2"): {"a": 0.70, "d": 0.75},
        ("local", "s1"): {"a": 0.88, "b": 0.70, "c": 0.86},
        ("local", "s2"): {"a": 0.60, "d": 0.72},
    }
    files = []
    for (model, test_set), scores in dice.items():
        path = tmp_path / f"{model}-{test_set}.json"
        path.write_text(json.dumps({"model": model, "test_set": test_set, "dice": scores}))
        files.append(path)
    out = tmp_path / "tables"
    code, stdout, err = run_cli("tables", *files, "--reference", "fl", "--private", "s1,s2", "--out", out)
    assert code == 0, err
    assert all((out / f"crosssite.{ext}").is_file() for ext in ("md", "csv", "json"))
    table = json.loads((out / "crosssite.json").read_text())
    for model in ("fl", "local"):
        pooled = [v for (m, _), scores in dice.items() if m == model for v in scores.values()]
        assert table["overall"][model]["n"] == 5
        assert table["overall"][model]["mean"] == pytest.approx(np.mean(pooled), abs=1e-12)
    assert table["models"] == ["local", "fl"]  # reference last
    assert "Overall" in stdout


def test_tables_rejects_a_file_that_is_not_evaluate_output(tmp_path, run_cli):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scores": []}))
    code, _, err = run_cli("tables", bad, "--reference", "fl", "--private", "s1", "--out", tmp_path / "t")
    assert code == 1 and "bad.json" in err


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "tables"])
def test_help(command, run_cli):
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and "Usage" in out
