"""Preprocessing: canonical orientation, isotropic spacing, z-score, caching, and the way back."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import oblique_affine
from fedseg.data.layout import discover_site
from fedseg.data.preprocess import (
    PrepareConfig,
    isotropic_grid,
    prepare_site,
    preprocess_case,
    resample_to_grid,
    to_canonical,
    to_original_grid,
)
from fedseg.data.splits import load_splits
from fedseg.data.volume import Volume, load_volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_canonical_orientation_keeps_world_positions():
    affine = oblique_affine((0.5, 0.7, 3.0))
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    canonical = to_canonical(Volume(array, affine))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    # the same voxel value sits at the same point in space
    i, j, k = 1, 3, 4
    world = affine @ [i, j, k, 1]
    ci, cj, ck = np.round(np.linalg.inv(canonical.affine) @ world)[:3].astype(int)
    assert canonical.array[ci, cj, ck] == array[i, j, k]


def test_isotropic_grid_covers_the_same_field_of_view():
    volume = Volume(np.zeros((100, 80, 20)), oblique_affine((0.5, 0.5, 3.0)))
    affine, shape = isotropic_grid(volume, 1.0)
    assert shape == (50, 40, 60)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.0)
    # first voxel edges line up: corner of voxel (-0.5,-0.5,-0.5) is the same point
    old_corner = volume.affine @ [-0.5, -0.5, -0.5, 1]
    new_corner = affine @ [-0.5, -0.5, -0.5, 1]
    assert np.allclose(old_corner, new_corner)


def test_resampling_a_linear_ramp_is_exact():
    """Linear interpolation reproduces a linear function of world position."""
    affine = oblique_affine((0.6, 0.6, 2.5))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 20, 10)], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    ramp = (0.3 * world[..., 0] - 0.2 * world[..., 1] + 0.1 * world[..., 2]).astype(np.float32)
    target, shape = isotropic_grid(Volume(ramp, affine), 1.0)
    out = resample_to_grid(ramp, affine, target, shape, order=1)
    tidx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    tworld = tidx @ target[:3, :3].T + target[:3, 3]
    expected = 0.3 * tworld[..., 0] - 0.2 * tworld[..., 1] + 0.1 * tworld[..., 2]
    inner = (slice(2, -2),) * 3  # edges are clamped, not extrapolated
    assert np.allclose(out[inner], expected[inner], atol=1e-3)


@pytest.mark.parametrize("spacing", [1.0, 1.5])
def test_prepared_site_has_requested_spacing_and_zscore(make_site, tmp_path, spacing, run_cli):
    site = make_site(n_cases=3, shape=(30, 30, 8), spacing=(0.5, 0.5, 3.0))
    dst = tmp_path / f"prepared{spacing}"
    code, out, err = run_cli("data", "prepare", site, dst, "--spacing", spacing)
    assert code == 0, err
    assert "3 computed" in out
    for case in discover_site(dst).cases:
        image, label = load_volume(case.image), load_volume(case.label)
        assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
        assert np.allclose(image.spacing, spacing) and image.shape == label.shape
        assert np.allclose(image.affine, label.affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert abs(float(image.array.mean())) < 1e-4
        assert float(image.array.std()) == pytest.approx(1.0, abs=1e-4)
        assert set(np.unique(label.array)) == {0, 1}
    assert load_splits(dst / "splits.json").cases == {"case00", "case01", "case02"}


def test_cache_reuses_cases_and_detects_changed_sources(make_site, tmp_path, run_cli):
    site = make_site(n_cases=3)
    dst = tmp_path / "prepared"
    assert run_cli("data", "prepare", site, dst)[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in (dst / "images").iterdir()}
    code, out, _ = run_cli("data", "prepare", site, dst)
    assert code == 0 and "0 computed, 3 reused" in out
    assert {p: p.stat().st_mtime_ns for p in (dst / "images").iterdir()} == stamps
    # a changed source image is recomputed, the others are not
    path = site / "images" / "case01.nii.gz"
    image = load_volume(path)
    from fedseg.data.volume import save_volume

    save_volume(Volume(image.array + 5, image.affine), path)
    code, out, _ = run_cli("data", "prepare", site, dst)
    assert "1 computed, 2 reused" in out


def test_destination_with_another_config_is_refused(make_site, tmp_path, run_cli):
    site = make_site(n_cases=2)
    dst = tmp_path / "prepared"
    assert run_cli("data", "prepare", site, dst, "--spacing", "1.0")[0] == 0
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    code, _, err = run_cli("data", "prepare", site, dst, "--spacing", "2.0")
    assert code == 1 and "choose another destination" in err
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    other = tmp_path / "not_empty"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli("data", "prepare", site, other)
    assert code == 1 and "not a fedseg prepared folder" in err


def test_bad_spacing_is_a_clear_error(make_site, tmp_path, run_cli):
    code, _, err = run_cli("data", "prepare", make_site(), tmp_path / "p", "--spacing", "0")
    assert code == 1 and "spacing must be between" in err


def test_site_split_is_carried_into_the_prepared_folder(make_site, tmp_path, run_cli):
    site = make_site(n_cases=5)
    assert run_cli("data", "split", site, "--seed", "7")[0] == 0
    dst = tmp_path / "prepared"
    assert run_cli("data", "prepare", site, dst)[0] == 0
    assert (dst / "splits.json").read_bytes() == (site / "splits.json").read_bytes()


def test_meta_maps_prediction_back_to_original_grid(make_site, tmp_path):
    site = make_site(n_cases=1, shape=(40, 36, 10), spacing=(0.5, 0.5, 3.0))
    dst = tmp_path / "prepared"
    prepared = prepare_site(site, dst, PrepareConfig(spacing_mm=1.0))[0]
    meta = json.loads(prepared.meta.read_text())
    original = load_volume(site / "labels" / "case00.nii.gz")
    assert meta["original"]["shape"] == list(original.shape)
    assert np.allclose(meta["original"]["affine"], original.affine)
    label = load_volume(prepared.label)
    back = to_original_grid(label.array.astype(np.float32), label.affine, meta, order=1) > 0.5
    assert back.shape == original.shape
    assert dice(back, original.array > 0) > 0.9


@pytest.mark.parametrize("site", ["promise12/bidmc", "promise12/hk", "prostatex"])
def test_real_cases_prepare_and_map_back(site, shared_data, tmp_path):
    src = shared_data / site
    case = discover_site(src).cases[0]
    image, label = load_volume(case.image), load_volume(case.label)
    out_image, out_label = preprocess_case(image, label, PrepareConfig(spacing_mm=1.0))
    assert np.allclose(out_image.spacing, 1.0)
    assert abs(float(out_image.array.mean())) < 1e-4 and float(out_image.array.std()) == pytest.approx(1, abs=1e-4)
    original_ml = (label.array > 0).sum() * np.prod(label.spacing) / 1000
    assert out_label.array.sum() / 1000 == pytest.approx(original_ml, rel=0.05)
    meta = {"original": {"affine": image.affine.tolist(), "shape": list(image.shape)}}
    back = to_original_grid(out_label.array.astype(np.float32), out_label.affine, meta) > 0.5
    assert dice(back, label.array > 0) > 0.95


def test_prepare_whole_real_site_via_cli(shared_data, tmp_path, run_cli):
    dst = tmp_path / "runmc"
    code, out, err = run_cli("data", "prepare", shared_data / "promise12" / "runmc", dst, "--spacing", "1.5")
    assert code == 0, err
    assert len(list((dst / "images").glob("*.nii.gz"))) == 5
    splits = load_splits(dst / "splits.json")
    assert len(splits.test) == 1 and len(splits.folds) == 4
    assert run_cli("data", "check", dst)[0] == 0


def test_percentile_normalisation_is_robust_to_a_few_bright_voxels():
    """A coil flare of 0.1 % of voxels at 100x the tissue squashes the plain z-score's contrast, not the clipped one."""
    from fedseg.data.preprocess import zscore

    rng = np.random.default_rng(0)
    tissue = rng.normal(100.0, 10.0, (40, 40, 20)).astype(np.float32)
    tissue[:20] += 40.0  # two tissues, 4 SD apart
    flared = tissue.copy()
    flared.flat[rng.choice(flared.size, flared.size // 1000, replace=False)] = 10_000.0

    def contrast(image):
        return float(image[:20].mean() - image[20:].mean())

    plain, clipped = zscore(flared), zscore(flared, (0.5, 99.5))
    assert contrast(clipped) > 1.5 and contrast(plain) < 0.3
    assert abs(float(clipped.mean())) < 1e-4 and abs(float(clipped.std()) - 1.0) < 1e-3
    assert contrast(zscore(tissue, (0.5, 99.5))) == pytest.approx(contrast(zscore(tissue)), rel=0.02)  # clean: same


def test_unknown_normalisation_is_named():
    from fedseg.errors import DataError

    with pytest.raises(DataError, match="prepare.normalize must be one of zscore, percentile"):
        PrepareConfig(normalize="minmax")


def test_case_meta_is_a_typed_record_and_a_broken_one_is_prepared_again(make_site, tmp_path):
    from fedseg.data.preprocess import CaseMeta, read_case_meta, read_manifest

    site, dst = make_site(n_cases=2), tmp_path / "prepared"
    prepared = prepare_site(site, dst, PrepareConfig(spacing_mm=2))
    meta = read_case_meta(prepared[0].meta)
    assert isinstance(meta, CaseMeta) and meta.config == {"spacing_mm": 2, "image_order": 1, "modality": "T2", "normalize": "zscore"}
    assert meta.sources["label"].path == str((site / "labels" / "case00.nii.gz").resolve())
    assert read_manifest(dst).source == str(site.resolve()) and read_manifest(tmp_path) is None
    prepared[0].meta.write_text('{"format": 1, "case": "case00"}')  # e.g. cut short by a crash of an older version
    computed = {}
    prepare_site(site, dst, PrepareConfig(spacing_mm=2), on_case=lambda case, done: computed.setdefault(case, done))
    assert computed == {"case00": True, "case01": False}
    assert read_case_meta(prepared[0].meta).original == meta.original
