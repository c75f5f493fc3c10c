"""The data pipeline end to end through the CLI: synth → check → split → prepare → check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.data.layout import discover_site
from fedseg.data.splits import load_splits
from fedseg.data.volume import load_volume

SITES = ("nci", "suny", "ucla")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A quick synthetic study: 5 cases per site, 3 external cases, coarse voxels."""
    from fedseg.data.synth import synthesize_study

    out = tmp_path_factory.mktemp("study")
    synthesize_study(out, list(SITES), "prostatex", 5, seed=0, external_cases=3, fov_mm=100.0, resolution_scale=3.0)
    return out


@pytest.mark.parametrize("site", SITES + ("prostatex",))
def test_synthetic_site_passes_check_and_prepares_to_spec(site, study, tmp_path, run_cli):
    src = study / site
    code, out, err = run_cli("data", "check", src)
    assert code == 0, err
    spacing = 2.0
    dst = tmp_path / "prepared"
    code, out, err = run_cli("data", "prepare", src, dst, "--spacing", spacing)
    assert code == 0, err
    for case in discover_site(dst).cases:
        image, label = load_volume(case.image), load_volume(case.label)
        assert np.allclose(image.spacing, spacing, atol=1e-6)
        assert abs(float(image.array.mean())) < 1e-4
        assert float(image.array.std()) == pytest.approx(1.0, abs=1e-4)
        assert label.array.any() and image.shape == label.shape
        meta = json.loads((dst / "meta" / f"{case.case_id}.json").read_text())
        original = load_volume(src / "images" / f"{case.case_id}.nii.gz")
        assert np.allclose(meta["original"]["affine"], original.affine)
    assert run_cli("data", "check", dst)[0] == 0
    splits = load_splits(dst / "splits.json")
    assert splits.cases == {c.case_id for c in discover_site(src).cases}


def test_synth_command_refuses_to_overwrite_and_writes_preview(tmp_path, run_cli):
    out = tmp_path / "demo"
    args = ("data", "synth", out, "--sites", "suny", "--external", "none", "--cases", "1",
            "--fov", "80", "--resolution-scale", "3", "--preview")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert (out / "preview.png").stat().st_size > 10_000
    before = (out / "suny" / "images" / "suny_000.nii.gz").read_bytes()
    code, _, err = run_cli(*args)
    assert code == 1 and str(out / "suny") in err
    assert (out / "suny" / "images" / "suny_000.nii.gz").read_bytes() == before


def test_synth_unknown_site_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("data", "synth", tmp_path / "x", "--sites", "mayo", "--cases", "1")
    assert code == 1 and "mayo" in err and "nci" in err
    assert not (tmp_path / "x" / "nci").exists()
