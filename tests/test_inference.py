"""Inference and evaluation: ensembles average probabilities; masks and Dice live on the ORIGINAL grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ellipsoid_case, oblique_affine
from fedseg.data.preprocess import PrepareConfig
from fedseg.data.volume import Volume, load_volume, save_volume
from fedseg.errors import FedsegError
from fedseg.metrics import dice_coefficient
from fedseg.evaluation.evaluate import evaluate_site
from fedseg.inference import Ensemble
from fedseg.modeldir import FoldOutcome, model_record, open_model_dir, record_fold
from fedseg.models import build_model
from fedseg.training.augment import AugmentConfig
from fedseg.training.checkpoint import save_weights
from fedseg.training.config import TrainConfig
from fedseg.training.data import SiteData, resolve_site
from fedseg.training.fit import fold_training_set, train_fold

SPACING = (0.6, 0.6, 3.0)  # anisotropic, like a clinical T2 stack
SHAPE = (24, 20, 8)
PREPARE = PrepareConfig(spacing_mm=1.0)
CONFIG = TrainConfig(
    patch_size=(16, 16, 8), batch_size=2, samples_per_volume=1, sw_batch_size=2, epochs=2, augment=AugmentConfig.off()
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Five oblique, anisotropic cases (0.6 x 0.6 x 3 mm) in the fedseg layout."""
    root = tmp_path_factory.mktemp("inference") / "site"
    affine = oblique_affine(SPACING)
    for i in range(5):
        image, mask = ellipsoid_case(SHAPE, seed=i)
        save_volume(Volume(image, affine), root / "images" / f"case{i:02d}.nii.gz")
        save_volume(Volume(mask, affine), root / "labels" / f"case{i:02d}.nii.gz")
    return root


@pytest.fixture(scope="module")
def prepared(site, tmp_path_factory):
    return resolve_site(site, PREPARE, tmp_path_factory.mktemp("cache"))


def write_model_dir(folder, fold_weights: list[dict[str, torch.Tensor]], prepare: PrepareConfig = PREPARE):
    """A model directory as 'fedseg train' writes it, with the given weights as folds 0..n-1."""
    open_model_dir(folder, model_record(CONFIG, prepare, [{"site": "test", "source": "nowhere"}]))
    for k, weights in enumerate(fold_weights):
        save_weights(folder / f"fold{k}" / "best.safetensors", weights)
        record_fold(folder, FoldOutcome(k, 0.5, 1, 1, 0.0, 0))
    return folder


def weights(seed: int) -> dict[str, torch.Tensor]:
    return build_model(CONFIG.network, seed=seed).state_dict()


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """Fold 0 of a tiny model trained for 2 epochs on the site, via the library's training loop."""
    model_dir = tmp_path_factory.mktemp("model")
    open_model_dir(model_dir, model_record(CONFIG, PREPARE, [{"site": prepared.name, "source": str(prepared.source)}]))
    data = SiteData(prepared, CONFIG.patch)
    record_fold(model_dir, train_fold(fold_training_set(prepared, data, 0), model_dir / "fold0", CONFIG))
    return model_dir


def prepared_image(prepared, case_id: str = "case00") -> np.ndarray:
    return load_volume(prepared.prepared / "images" / f"{case_id}.nii.gz").array


# ----------------------------------------------------------------- ensembles


def test_ensemble_of_identical_models_equals_one_model(tmp_path, prepared):
    """Three folds holding the same weights give the single model's probabilities."""
    single = Ensemble.load(write_model_dir(tmp_path / "one", [weights(1)]))
    triple = Ensemble.load(write_model_dir(tmp_path / "three", [weights(1)] * 3))
    assert len(triple.models) == 3
    image = prepared_image(prepared)
    p1, p3 = single.probability(image), triple.probability(image)
    assert p1.shape == image.shape and p1.dtype == np.float32
    assert np.all((p1 >= 0) & (p1 <= 1))
    np.testing.assert_allclose(p3, p1, atol=1e-6)


def test_ensemble_is_the_mean_of_its_members(tmp_path, prepared):
    """Folds 0 and 1 together give the mean of their separate foreground probabilities."""
    model_dir = write_model_dir(tmp_path / "two", [weights(1), weights(2)])
    image = prepared_image(prepared)
    first = Ensemble.load(model_dir, folds=[0]).probability(image)
    second = Ensemble.load(model_dir, folds=[1]).probability(image)
    both = Ensemble.load(model_dir).probability(image)
    assert np.abs(first - second).max() > 1e-3  # the members really differ
    np.testing.assert_allclose(both, (first + second) / 2, atol=1e-6)


def test_ensemble_load_errors(tmp_path):
    with pytest.raises(FedsegError, match="not a model directory"):
        Ensemble.load(tmp_path)
    model_dir = write_model_dir(tmp_path / "m", [weights(1)])
    with pytest.raises(FedsegError, match="no trained fold"):
        Ensemble.load(model_dir, folds=[3])
    save_weights(model_dir / "fold0" / "best.safetensors", {"conv.weight": torch.zeros(2, 2)})
    with pytest.raises(FedsegError, match="best.safetensors"):
        Ensemble.load(model_dir)


# ----------------------------------------------------------------- the original grid


def test_predict_returns_a_mask_on_the_original_grid(trained, site):
    """An oblique 0.6 x 0.6 x 3 mm input gets a 0/1 uint8 mask with exactly its shape and affine."""
    image = load_volume(site / "images" / "case01.nii.gz")
    mask = Ensemble.load(trained).predict(image)
    assert mask.shape == image.shape == SHAPE
    assert np.array_equal(mask.affine, image.affine)
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) <= {0, 1}


@pytest.fixture
def perfect(monkeypatch, prepared):
    """Make every ensemble a perfect predictor: its probability is the prepared label of the case it is shown."""
    cases = {
        p.name.removesuffix(".nii.gz"): (
            load_volume(p).array,
            load_volume(prepared.prepared / "labels" / p.name).array.astype(np.float32),
        )
        for p in sorted((prepared.prepared / "images").glob("*.nii.gz"))
    }

    def probability(self, image):
        matches = [label for array, label in cases.values() if array.shape == image.shape and np.allclose(array, image, atol=1e-5)]
        assert len(matches) == 1, "image is not one of the prepared cases"
        return matches[0]

    monkeypatch.setattr(Ensemble, "probability", probability)
    return cases


def test_perfect_predictor_mask_lies_over_the_original_label(trained, site, perfect):
    """Mapping the prepared-grid prediction back lands on the original label (orientation, obliquity, spacing)."""
    scores = []
    for i in range(5):
        image = load_volume(site / "images" / f"case{i:02d}.nii.gz")
        truth = load_volume(site / "labels" / f"case{i:02d}.nii.gz")
        scores.append(dice_coefficient(Ensemble.load(trained).predict(image).array, truth.array))
    assert np.mean(scores) > 0.9 and min(scores) > 0.85, scores


def test_evaluate_site_scores_exactly_the_split(trained, prepared):
    """split='test' scores the held-out cases only, split='all' every case; each a Dice in [0, 1]."""
    ensemble = Ensemble.load(trained)
    test_scores = evaluate_site(ensemble, prepared, "test")
    assert list(test_scores) == list(prepared.require_splits().test)
    seen = []
    all_scores = evaluate_site(ensemble, prepared, "all", on_case=lambda case, dice: seen.append(case))
    assert sorted(all_scores) == [f"case{i:02d}" for i in range(5)] == sorted(seen)
    assert all(0.0 <= d <= 1.0 for d in all_scores.values())
    assert test_scores == {c: all_scores[c] for c in test_scores}


def test_evaluate_site_is_on_the_original_grid(trained, prepared, perfect):
    """With a perfect predictor Dice is high but (in general) below 1: it includes the resampling back to the original grid."""
    scores = evaluate_site(Ensemble.load(trained), prepared, "all")
    assert np.mean(list(scores.values())) > 0.9
    assert min(scores.values()) < 1.0  # a prepared-grid comparison would give exactly 1


# ----------------------------------------------------------------- the command


def test_predict_command_writes_masks_on_the_input_grid(trained, site, tmp_path, run_cli):
    """'fedseg predict' writes one NIfTI per image with the input's shape, affine and axis codes."""
    out = tmp_path / "masks"
    code, stdout, err = run_cli("predict", trained, site / "images", out, "--threads", "1")
    assert code == 0, err
    assert "wrote 5 mask(s)" in stdout
    for i in range(5):
        source = nib.load(site / "images" / f"case{i:02d}.nii.gz")
        mask = nib.load(out / f"case{i:02d}.nii.gz")
        assert mask.shape == source.shape
        assert np.allclose(mask.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(source.affine) != ("R", "A", "S")
        assert mask.get_data_dtype() == np.uint8


def test_largest_component_keeps_the_gland_and_drops_scattered_false_positives():
    from fedseg.inference import largest_component

    mask = np.zeros((20, 20, 10), bool)
    mask[5:12, 5:12, 3:7] = True  # the gland
    mask[15:17, 15:17, 0:2] = True  # a false positive elsewhere
    mask[0, 0, 9] = True
    kept = largest_component(mask)
    assert kept.sum() == 7 * 7 * 4 and kept[5:12, 5:12, 3:7].all()
    # diagonal neighbours belong to the same component (26-connectivity)
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[3, 3, 3] = True
    assert largest_component(diagonal).sum() == 2
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()
