"""Writing synthetic site folders: layout, determinism, grids, refusal, preview."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.preview import save_site_preview
from fedseg.data.site_profiles import get_profile
from fedseg.data.synth import render_case, synthesize_site, synthesize_study
from fedseg.data.volume import load_volume, same_grid
from fedseg.errors import DataError

QUICK = {"resolution_scale": 3.0, "fov_mm": 100.0}


def _arrays(site: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(site.glob("*/*.nii.gz"))}


def test_same_seed_same_files_different_seed_differs(tmp_path: Path) -> None:
    nci = get_profile("nci")
    a = synthesize_site(tmp_path / "a", nci, 2, seed=3, **QUICK)
    b = synthesize_site(tmp_path / "b", nci, 2, seed=3, **QUICK)
    c = synthesize_site(tmp_path / "c", nci, 2, seed=4, **QUICK)
    arr_a, arr_b, arr_c = _arrays(a), _arrays(b), _arrays(c)
    assert sorted(arr_a) == ["nci_000.nii.gz", "nci_001.nii.gz"] and len(list(a.glob("*/*.nii.gz"))) == 4
    assert all(np.array_equal(arr_a[k], arr_b[k]) for k in arr_a)
    assert not np.array_equal(arr_a["nci_000.nii.gz"], arr_c["nci_000.nii.gz"])


def test_case_does_not_depend_on_count_or_other_sites(tmp_path: Path) -> None:
    dirs = synthesize_study(tmp_path / "s", ["suny", "ucla"], None, 2, seed=1, **QUICK)
    alone = render_case(get_profile("ucla"), 1, seed=1, **QUICK)
    stored = load_volume(dirs[1] / "labels" / "ucla_001.nii.gz")
    assert np.array_equal(stored.array, alone.label)


@pytest.mark.parametrize("site", ["nci", "suny", "ucla", "prostatex"])
def test_grid_spacing_labels_and_metadata(tmp_path: Path, site: str) -> None:
    profile = get_profile(site)
    out = synthesize_site(tmp_path / site, profile, 2, seed=0, **QUICK)
    meta = json.loads((out / "site.json").read_text())
    assert meta["profile"]["name"] == site and meta["seed"] == 0 and meta["generator_version"]
    for index, case in enumerate(meta["cases"]):
        image = load_volume(out / "images" / f"{case['case']}.nii.gz")
        label = load_volume(out / "labels" / f"{case['case']}.nii.gz")
        assert same_grid(image, label)
        assert image.array.dtype == np.dtype(profile.dtype) and label.array.dtype == np.uint8
        assert set(np.unique(label.array)) == {0, 1}
        proto = profile.protocol_for_case(index)
        expected = np.array([proto.pixel_mm, proto.pixel_mm, proto.slice_mm]) * QUICK["resolution_scale"]
        assert np.allclose(image.spacing, expected)
        assert image.spacing[2] > 1.5 * image.spacing[0]  # anisotropic: preprocessing must resample
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        assert not np.allclose(image.affine[:3, 3], 0)
        assert case["coil"] == proto.coil
        assert profile.volume_min_ml <= case["anatomical_gland_volume_ml"] <= profile.volume_max_ml
        assert 0.6 < case["gland_volume_ml"] / case["anatomical_gland_volume_ml"] < 1.4


def test_gland_volume_median_over_many_cases(tmp_path: Path) -> None:
    profile = get_profile("suny")
    out = synthesize_site(tmp_path / "suny", profile, 30, seed=11, resolution_scale=3.0, fov_mm=90.0)
    cases = json.loads((out / "site.json").read_text())["cases"]
    anatomical = np.median([c["anatomical_gland_volume_ml"] for c in cases])
    masked = np.median([c["gland_volume_ml"] for c in cases])
    assert abs(anatomical / profile.volume_median_ml - 1) < 0.3
    assert abs(masked / profile.volume_median_ml - 1) < 0.4


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    site = tmp_path / "nci"
    (site / "images").mkdir(parents=True)
    (site / "images" / "mine.nii.gz").write_bytes(b"user data")
    with pytest.raises(DataError, match=str(site / "images")):
        synthesize_site(site, get_profile("nci"), 1, seed=0, **QUICK)
    with pytest.raises(DataError, match="refusing"):
        synthesize_study(tmp_path, ["suny", "nci"], None, 1, seed=0, **QUICK)
    assert not (tmp_path / "suny").exists()  # checked before writing anything
    assert (site / "images" / "mine.nii.gz").read_bytes() == b"user data"


def test_study_order_callback_and_bad_arguments(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    dirs = synthesize_study(
        tmp_path, ["ucla"], "prostatex", 1, seed=0, external_cases=2, on_case=lambda s, c: seen.append((s, c)), **QUICK
    )
    assert [d.name for d in dirs] == ["ucla", "prostatex"]
    assert seen == [("ucla", "ucla_000"), ("prostatex", "prostatex_000"), ("prostatex", "prostatex_001")]
    with pytest.raises(DataError, match="known profiles"):
        synthesize_study(tmp_path / "x", ["nowhere"], None, 1, seed=0)
    with pytest.raises(DataError, match="resolution_scale"):
        synthesize_site(tmp_path / "y", get_profile("nci"), 1, seed=0, resolution_scale=0.5)


def test_preview_synthetic_sites(tmp_path: Path) -> None:
    dirs = synthesize_study(tmp_path, ["nci", "suny", "ucla"], "prostatex", 1, seed=0, **QUICK)
    png = save_site_preview(dirs, tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_real_promise12_site(tmp_path: Path, shared_data: Path) -> None:
    site = shared_data / "promise12" / "bidmc"
    png = save_site_preview([site], tmp_path / "real.png", cases_per_site=2)
    assert png.stat().st_size > 10_000


def test_preview_rejects_folder_without_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images/ and labels/"):
        save_site_preview([tmp_path], tmp_path / "p.png")
