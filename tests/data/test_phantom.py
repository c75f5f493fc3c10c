"""Analytic pelvis phantom: contrast, coil, annotation conventions, volumes."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.data.phantom import CODE, draw_gland_volume, render, sample_anatomy, tissue_signal
from fedseg.data.site_profiles import SITE_PROFILES, Annotation, get_profile
from fedseg.data.synth import acquisition_for, case_rng, render_case
from fedseg.errors import DataError

QUICK = {"resolution_scale": 2.0, "fov_mm": 110.0}


def _mean(ph, name: str) -> float:
    return float(ph.image[ph.tissue == CODE[name]].mean())


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(DataError, match="nci, prostatex, suny, ucla"):
        get_profile("mgh")


def test_profiles_carry_table_values() -> None:
    nci = get_profile("NCI")
    assert [p.coil for p in nci.protocols] == [True, False]
    assert nci.protocols[0].pixel_mm == 0.273 and nci.protocols[1].tr_ms == 3686
    assert get_profile("ucla").protocols[0].slice_mm == 1.5
    assert (get_profile("suny").volume_median_ml, get_profile("suny").volume_max_ml) == (72.9, 210.0)
    assert get_profile("prostatex").external


def test_render_is_deterministic_and_label_on_grid() -> None:
    a = render_case(get_profile("suny"), 3, seed=7, **QUICK)
    b = render_case(get_profile("suny"), 3, seed=7, **QUICK)
    c = render_case(get_profile("suny"), 3, seed=8, **QUICK)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == a.label.shape == a.tissue.shape
    assert set(np.unique(a.label)) == {0, 1}


def test_spin_echo_contrast_follows_tr_te() -> None:
    """UCLA's long TE widens the PZ/TZ and gland/muscle gaps compared with SUNY."""
    ratios = {}
    for site in ("suny", "ucla"):
        ph = render_case(get_profile(site), 0, seed=1, **QUICK)
        ratios[site] = _mean(ph, "peripheral_zone") / _mean(ph, "transition_zone")
    assert ratios["ucla"] > 1.15 * ratios["suny"]
    # noiseless model: gland/muscle contrast grows with TE (noise floor hides part of it in images)
    suny, ucla = tissue_signal(5500, 136), tissue_signal(2230, 204)
    gm = lambda s: s[CODE["peripheral_zone"]] / s[CODE["muscle"]]  # noqa: E731
    assert gm(ucla) > 1.5 * gm(suny)
    s = tissue_signal(4775, 120)
    assert s[CODE["urine"]] > s[CODE["fat"]] > s[CODE["transition_zone"]] > s[CODE["muscle"]]


def test_endorectal_coil_brightens_near_field() -> None:
    nci = get_profile("nci")
    coil, plain = render_case(nci, 0, seed=2, **QUICK), render_case(nci, 1, seed=2, **QUICK)
    assert coil.anatomy.compression > 0 and plain.anatomy.compression == 0
    assert np.any(coil.tissue == CODE["balloon"]) and not np.any(plain.tissue == CODE["balloon"])
    near = lambda ph: _mean(ph, "peripheral_zone") / float(np.median(ph.image[ph.tissue == CODE["fat"]]))  # noqa: E731
    assert near(coil) > 1.5 * near(plain)


def test_ucla_annotation_is_shorter_for_same_anatomy() -> None:
    ucla = get_profile("ucla")
    acq = acquisition_for(ucla, 0)
    acq = type(acq)(**{**acq.__dict__, "fov_mm": 90.0})
    anatomy = sample_anatomy(case_rng(5, "ucla", 0), 50.0, coil=False)
    extent = {}
    for name, ann in (("nci", get_profile("nci").annotation), ("ucla", ucla.annotation)):
        ph = render(anatomy, acq, ann, np.random.default_rng(0))
        slices = np.flatnonzero(ph.label.any(axis=(0, 1)))
        extent[name] = slices[-1] - slices[0] + 1
    # 3 mm trimmed at each end of 1.5 mm slices: at least 3 slices fewer
    assert extent["ucla"] <= extent["nci"] - 3


def test_suny_mask_smaller_than_nci_for_same_anatomy() -> None:
    suny = get_profile("suny")
    acq = acquisition_for(suny, 0, fov_mm=90.0)
    anatomy = sample_anatomy(case_rng(5, "suny", 0), 50.0, coil=False)
    inside = render(anatomy, acq, Annotation(capsule_margin_mm=-1.0), np.random.default_rng(0)).label.sum()
    hugging = render(anatomy, acq, Annotation(capsule_margin_mm=0.8), np.random.default_rng(0)).label.sum()
    assert inside < 0.95 * hugging


@pytest.mark.parametrize("site", sorted(SITE_PROFILES))
def test_volume_draw_median_and_range(site: str) -> None:
    p = get_profile(site)
    rng = np.random.default_rng(0)
    draws = np.array([draw_gland_volume(rng, p.volume_median_ml, p.volume_min_ml, p.volume_max_ml) for _ in range(2000)])
    assert draws.min() >= p.volume_min_ml and draws.max() <= p.volume_max_ml
    assert abs(np.median(draws) / p.volume_median_ml - 1) < 0.05


def test_anatomy_hits_requested_gland_volume() -> None:
    """Rendered gland (all zones, capsule excluded) matches the drawn volume."""
    p = get_profile("prostatex")
    acq = acquisition_for(p, 0, fov_mm=100.0)
    for volume in (25.0, 120.0):
        anatomy = sample_anatomy(np.random.default_rng(int(volume)), volume, coil=False)
        ph = render(anatomy, acq, Annotation(), np.random.default_rng(0))
        measured = ph.label.sum() * abs(np.linalg.det(ph.affine[:3, :3])) / 1000
        assert abs(measured / volume - 1) < 0.1


def test_endorectal_coil_image_is_dark_away_from_the_coil() -> None:
    """Receive profile dominates: tissue far from the balloon is much darker than near it."""
    ph = render_case(get_profile("nci"), 0, seed=3, **QUICK)
    assert ph.anatomy.compression > 0
    balloon = np.argwhere(ph.tissue == CODE["balloon"]).mean(axis=0)
    spacing = np.linalg.norm(ph.affine[:3, :3], axis=0)
    idx = np.indices(ph.image.shape, dtype=np.float32)
    dist = np.sqrt(sum(((idx[i] - balloon[i]) * spacing[i]) ** 2 for i in range(3)))
    body = ph.tissue != CODE["air"]
    soft = body & ~np.isin(ph.tissue, [CODE["balloon"], CODE["gas"], CODE["cortical_bone"], CODE["artery"]])
    near = np.median(ph.image[soft & (dist < 35)])
    far = np.median(ph.image[soft & (dist > 60)])
    assert far < 0.25 * near


def test_pelvic_anatomy_proportions_and_bone_contrast() -> None:
    """Muscle and bone, not fat, fill most of the pelvis; femoral marrow is brighter than muscle."""
    ph = render_case(get_profile("prostatex"), 0, seed=4, resolution_scale=2.0)
    body = ph.tissue != CODE["air"]
    fat = np.isin(ph.tissue, [CODE["fat"], CODE["fibrous_septum"]]).sum() / body.sum()
    muscle = (ph.tissue == CODE["muscle"]).sum() / body.sum()
    assert 0.15 < fat < 0.6 and muscle > 0.25
    for code in ("marrow", "cortical_bone", "fibrous_septum", "cartilage"):
        assert np.any(ph.tissue == CODE[code]), code
    assert _mean(ph, "marrow") > 2 * _mean(ph, "muscle")
    assert _mean(ph, "fat") > 3 * _mean(ph, "muscle")


def test_point_spread_blurs_edges() -> None:
    """In-plane PSF: neighbouring pixels of a noiseless phantom are correlated across tissue edges."""
    from dataclasses import replace

    p = get_profile("suny")
    acq = replace(acquisition_for(p, 0, fov_mm=90.0), noise_level=0.0, bias_strength=0.0)
    anatomy = sample_anatomy(case_rng(1, "suny", 0), 40.0, coil=False)
    sharp = render(anatomy, replace(acq, psf_sigma_vox=0.0), p.annotation, np.random.default_rng(0)).image
    soft = render(anatomy, acq, p.annotation, np.random.default_rng(0)).image
    grad = lambda im: float(np.abs(np.diff(im, axis=0)).mean())  # noqa: E731
    assert grad(soft) < 0.85 * grad(sharp)


def test_a_seed_renders_the_case_it_always_rendered() -> None:
    """Values recorded from the single-module phantom before it became a package (issue #13).

    Air far from the body is pure Rician noise, so its voxels pin the order of
    every random draw; the tissue histogram and the label pin the geometry
    (a little slack for float rounding at tissue edges on other CPUs).
    """
    ph = render_case(get_profile("suny"), 3, seed=7, resolution_scale=3.0)
    assert ph.image.shape == (107, 107, 10)
    assert ph.tissue[0, 0, :3].tolist() == [CODE["air"]] * 3
    np.testing.assert_allclose(ph.image[0, 0, :3], [20.972759246826172, 5.192048072814941, 17.45994758605957], rtol=1e-5)
    histogram = np.bincount(ph.tissue.ravel(), minlength=25)
    expected = [4130, 2230, 38209, 52538, 3153, 6714, 48, 469, 1494, 631, 577, 109, 0, 543, 85, 186, 1302, 353, 61,
                139, 6, 1, 27, 1185, 300]
    assert np.all(np.abs(histogram - expected) <= np.maximum(2, 0.005 * np.array(expected))), histogram.tolist()
    assert abs(int(ph.label.sum()) - 1709) <= 10
