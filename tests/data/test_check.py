"""`fedseg data check`: valid sites pass; each kind of corruption names its file and exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import PROMISE12_SITES, ellipsoid_case, oblique_affine
from fedseg.data.check import check_site
from fedseg.data.layout import discover_site
from fedseg.data.volume import Volume, load_volume, save_volume
from fedseg.errors import DataError


def test_valid_site_passes_with_summary(make_site, run_cli):
    site = make_site(n_cases=3)
    report = check_site(site)
    assert report.ok and len(report.cases) == 3
    assert report.cases[0].spacing == pytest.approx((0.6, 0.6, 3.0))
    mask = load_volume(site / "labels" / "case00.nii.gz").array
    assert report.cases[0].gland_ml == pytest.approx(mask.sum() * 0.6 * 0.6 * 3.0 / 1000)
    code, out, _ = run_cli("data", "check", site)
    assert code == 0
    assert "3 of 3" in out and "gland volume (mL)" in out


def _corrupt_missing_label(site: Path) -> Path:
    (site / "labels" / "case01.nii.gz").unlink()
    return site / "images" / "case01.nii.gz"


def _corrupt_grid(site: Path) -> Path:
    path = site / "labels" / "case01.nii.gz"
    label = load_volume(path)
    shifted = label.affine.copy()
    shifted[:3, 3] += 2.0
    save_volume(Volume(label.array, shifted), path)
    return path


def _corrupt_shape(site: Path) -> Path:
    path = site / "labels" / "case01.nii.gz"
    label = load_volume(path)
    save_volume(Volume(label.array[:-2], label.affine), path)
    return path


def _corrupt_empty_mask(site: Path) -> Path:
    path = site / "labels" / "case01.nii.gz"
    label = load_volume(path)
    save_volume(Volume(np.zeros_like(label.array), label.affine), path)
    return path


def _corrupt_unreadable(site: Path) -> Path:
    path = site / "images" / "case01.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    return path


def _corrupt_label_values(site: Path) -> Path:
    path = site / "labels" / "case01.nii.gz"
    label = load_volume(path)
    save_volume(Volume(label.array * 2, label.affine), path)  # 0/2 instead of 0/1
    return path


def _corrupt_truncated(site: Path) -> Path:
    path = site / "images" / "case01.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt_orphan_label(site: Path) -> Path:
    path = site / "labels" / "extra.nii.gz"
    path.write_bytes((site / "labels" / "case00.nii.gz").read_bytes())
    return path


CORRUPTIONS = {
    "missing label": (_corrupt_missing_label, "no label"),
    "shifted affine": (_corrupt_grid, "grid does not match"),
    "different shape": (_corrupt_shape, "shape"),
    "empty mask": (_corrupt_empty_mask, "empty"),
    "unreadable file": (_corrupt_unreadable, "cannot read"),
    "truncated file": (_corrupt_truncated, "cannot read"),
    "wrong label values": (_corrupt_label_values, "label values [2]"),
    "label without image": (_corrupt_orphan_label, "no image"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_site_names_the_file(kind, make_site, run_cli):
    site = make_site(n_cases=3)
    corrupt, reason = CORRUPTIONS[kind]
    bad_file = corrupt(site)
    before = {p: p.read_bytes() for p in site.rglob("*.nii.gz")}

    code, _, err = run_cli("data", "check", site)

    assert code != 0
    bad_lines = [line for line in err.splitlines() if str(bad_file) in line]
    assert bad_lines, f"{bad_file} not named in:\n{err}"
    assert reason in bad_lines[0]
    assert {p: p.read_bytes() for p in site.rglob("*.nii.gz")} == before  # nothing modified or deleted
    report = check_site(site)
    assert not report.ok and len(report.problems) == 1
    if kind not in ("label without image",):
        assert len(report.cases) == 2  # the other cases are still valid


def test_every_problem_is_reported_not_just_the_first(make_site):
    site = make_site(n_cases=4)
    bad = {_corrupt_empty_mask(site), _corrupt_unreadable(site)}  # both hit case01
    _corrupt_label_values_of(site, "case02")
    report = check_site(site)
    named = {p.path for p in report.problems}
    assert site / "labels" / "case02.nii.gz" in named
    assert named & bad


def _corrupt_label_values_of(site: Path, case: str) -> None:
    path = site / "labels" / f"{case}.nii.gz"
    label = load_volume(path)
    save_volume(Volume(label.array * 3, label.affine), path)


def test_constant_image_is_reported(make_site):
    site = make_site(n_cases=2)
    path = site / "images" / "case00.nii.gz"
    image = load_volume(path)
    save_volume(Volume(np.full_like(image.array, 7), image.affine), path)
    report = check_site(site)
    assert [p.path for p in report.problems] == [path]
    assert "constant" in report.problems[0].reason


def test_not_a_site_folder(tmp_path, run_cli):
    (tmp_path / "random").mkdir()
    code, _, err = run_cli("data", "check", tmp_path / "random")
    assert code == 1 and "not a site folder" in err
    code, _, err = run_cli("data", "check", tmp_path / "missing")
    assert code == 1 and "not found" in err


def _write_msd_site(root: Path, n_cases: int = 3) -> Path:
    """A Decathlon-style Task05 folder: 4-D (T2, ADC) images, labels 0/1/2 (PZ, TZ)."""
    affine = oblique_affine((0.6, 0.6, 3.6))
    training = []
    for i in range(n_cases):
        image, mask = ellipsoid_case((20, 18, 8), seed=10 + i)
        zones = mask.copy()
        zones[: image.shape[0] // 2][mask[: image.shape[0] // 2] > 0] = 2
        adc = np.full_like(image, 1000)
        four_d = np.stack([adc, image], axis=-1)  # T2 deliberately second
        save_volume(Volume(four_d, affine), root / "imagesTr" / f"prostate_{i:02d}.nii.gz")
        save_volume(Volume(zones.astype(np.uint8), affine), root / "labelsTr" / f"prostate_{i:02d}.nii.gz")
        training.append({"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"})
    # macOS AppleDouble debris, as shipped in the Decathlon tarball
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    meta = {
        "name": "Prostate",
        "modality": {"0": "ADC", "1": "T2"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n_cases,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_decathlon_layout_picks_t2_channel_and_merges_zones(tmp_path, run_cli):
    root = _write_msd_site(tmp_path / "Task05_Prostate")
    layout = discover_site(root)
    assert layout.kind == "msd" and [c.channel for c in layout.cases] == [1, 1, 1]
    assert [c.case_id for c in layout.cases] == ["prostate_00", "prostate_01", "prostate_02"]
    report = check_site(root)
    assert report.ok, report.problems
    label = load_volume(root / "labelsTr" / "prostate_00.nii.gz").array
    assert report.cases[0].gland_ml == pytest.approx((label > 0).sum() * 0.6 * 0.6 * 3.6 / 1000)
    code, out, _ = run_cli("data", "check", root)
    assert code == 0 and "msd layout" in out


def test_decathlon_unknown_modality_and_bad_label(tmp_path):
    root = _write_msd_site(tmp_path / "Task05_Prostate")
    with pytest.raises(DataError, match="no modality named 'DWI'"):
        discover_site(root, modality="DWI")
    path = root / "labelsTr" / "prostate_01.nii.gz"
    label = load_volume(path)
    save_volume(Volume(label.array * 3, label.affine), path)  # 3 and 6 are not in the labels table
    report = check_site(root)
    assert [p.path for p in report.problems] == [path]
    assert "label values [3, 6]" in report.problems[0].reason


def test_decathlon_missing_listed_file(tmp_path):
    root = _write_msd_site(tmp_path / "Task05_Prostate")
    missing = root / "labelsTr" / "prostate_02.nii.gz"
    missing.unlink()
    report = check_site(root)
    assert [p.path for p in report.problems] == [missing.resolve()]
    assert "not found" in report.problems[0].reason


@pytest.mark.parametrize("site", [f"promise12/{s}" for s in PROMISE12_SITES] + ["prostatex"])
def test_real_sites_pass(site, shared_data, run_cli):
    code, out, err = run_cli("data", "check", shared_data / site)
    assert code == 0, err
    report = check_site(shared_data / site)
    assert report.ok
    assert all(5 < c.gland_ml < 250 for c in report.cases)
