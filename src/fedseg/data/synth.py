"""Write synthetic multi-institution T2-weighted prostate MRI site folders.

Layout written per site (same as real sites)::

    <site>/images/<site>_<nnn>.nii.gz   int16/uint16 intensities
    <site>/labels/<site>_<nnn>.nii.gz   uint8, 1 = prostate
    <site>/site.json                    profile, seed, generator version, per-case metadata

Every case has its own random generator seeded from (seed, site name, case
index), so a case does not depend on generation order, on other sites or on
how many cases were asked for. Cases are rendered and written one at a time.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedseg.data.phantom import Acquisition, Phantom, draw_gland_volume, render, sample_anatomy
from fedseg.data.site_profiles import SiteProfile, get_profile
from fedseg.data.volume import Volume, save_volume
from fedseg.io import write_json
from fedseg.errors import DataError

GENERATOR_VERSION = "2"
SITE_JSON = "site.json"
DEFAULT_SITES = ("nci", "suny", "ucla")  # the paper's three institutions
DEFAULT_EXTERNAL = "prostatex"  # its external test set


def case_rng(seed: int, site: str, index: int) -> np.random.Generator:
    """Generator for one case; independent of every other (site, index)."""
    site_key = zlib.crc32(site.encode("utf-8"))  # stable, unlike hash()
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(site_key, int(index))))


def case_id(site: str, index: int) -> str:
    return f"{site}_{index:03d}"


def acquisition_for(
    profile: SiteProfile, index: int, fov_mm: float | None = None, resolution_scale: float = 1.0
) -> Acquisition:
    """The scan used for case ``index``; resolution_scale > 1 coarsens voxels (departs from Table 2)."""
    if resolution_scale < 1.0:
        raise DataError(f"resolution_scale must be >= 1, got {resolution_scale}")
    if fov_mm is not None and fov_mm <= 0:
        raise DataError(f"fov_mm must be positive, got {fov_mm}")
    proto = profile.protocol_for_case(index)
    return Acquisition(
        pixel_mm=proto.pixel_mm * resolution_scale,
        slice_mm=proto.slice_mm * resolution_scale,
        tr_ms=proto.tr_ms,
        te_ms=proto.te_ms,
        fov_mm=proto.fov_mm if fov_mm is None else float(fov_mm),
        si_coverage_mm=profile.si_coverage_mm,
        coil=proto.coil,
        noise_level=profile.noise_level,
        bias_strength=profile.bias_strength,
        intensity_scale=profile.intensity_scale,
        psf_sigma_vox=profile.psf_sigma_vox,
    )


def render_case(
    profile: SiteProfile, index: int, seed: int, *, fov_mm: float | None = None, resolution_scale: float = 1.0
) -> Phantom:
    """Render case ``index`` of a site in memory (no files)."""
    rng = case_rng(seed, profile.name, index)
    acq = acquisition_for(profile, index, fov_mm, resolution_scale)
    volume = draw_gland_volume(rng, profile.volume_median_ml, profile.volume_min_ml, profile.volume_max_ml)
    anatomy = sample_anatomy(rng, volume, acq.coil)
    return render(anatomy, acq, profile.annotation, rng)


def _check_empty(site_dir: Path) -> None:
    """Refuse to write where images or labels already exist (never overwrite data)."""
    for sub in ("images", "labels"):
        folder = site_dir / sub
        if folder.is_dir() and any(folder.iterdir()):
            raise DataError(f"{folder}: already contains files; refusing to overwrite an existing site")


def _to_stored(image: np.ndarray, dtype: str) -> np.ndarray:
    info = np.iinfo(np.dtype(dtype))
    return np.clip(np.rint(image), 0, info.max).astype(dtype)


def synthesize_site(
    out_dir: Path,
    profile: SiteProfile,
    n_cases: int,
    seed: int,
    *,
    fov_mm: float | None = None,
    resolution_scale: float = 1.0,
    on_case: Callable[[str], None] | None = None,
) -> Path:
    """Write ``n_cases`` synthetic cases of one institution into the site folder ``out_dir``.

    Returns ``out_dir``. Same arguments give byte-identical volumes.

    Raises:
        DataError: ``out_dir`` already holds images or labels; bad arguments.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise DataError(f"n_cases must be >= 1, got {n_cases}")
    _check_empty(out_dir)
    acquisition_for(profile, 0, fov_mm, resolution_scale)  # validate before writing anything
    cases: list[dict] = []

    def finish(job: Future) -> None:
        cases.append(job.result())
        if on_case is not None:
            on_case(cases[-1]["case"])

    # gzip (zlib releases the GIL) of case i overlaps rendering of case i+1;
    # at most two cases are in memory.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for index in range(n_cases):
            ph = render_case(profile, index, seed, fov_mm=fov_mm, resolution_scale=resolution_scale)
            if pending is not None:
                finish(pending)
            pending = writer.submit(_write_case, out_dir, profile, case_id(profile.name, index), ph)
        if pending is not None:
            finish(pending)
    write_json(out_dir / SITE_JSON, _site_record(profile, seed, fov_mm, resolution_scale, cases))
    return out_dir


def _write_case(out_dir: Path, profile: SiteProfile, cid: str, ph: Phantom) -> dict:
    """Save image and label of a rendered case, return the case's metadata."""
    save_volume(Volume(_to_stored(ph.image, profile.dtype), ph.affine), out_dir / "images" / f"{cid}.nii.gz")
    save_volume(Volume(ph.label, ph.affine), out_dir / "labels" / f"{cid}.nii.gz", np.uint8)
    voxel_ml = float(abs(np.linalg.det(ph.affine[:3, :3]))) / 1000.0
    return {
        "case": cid,
        "gland_volume_ml": round(float(ph.label.sum()) * voxel_ml, 2),
        "anatomical_gland_volume_ml": round(ph.anatomy.gland_volume_ml, 2),
        "coil": bool(ph.anatomy.compression > 0),
        "shape": list(ph.label.shape),
        "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(ph.affine[:3, :3], axis=0)],
    }


def _site_record(profile: SiteProfile, seed: int, fov_mm, resolution_scale: float, cases: list[dict]) -> dict:
    return {
        "generator": "fedseg.data.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "fov_mm_override": fov_mm,
        "resolution_scale": float(resolution_scale),
        "profile": profile.to_dict(),
        "cases": cases,
    }


def synthesize_study(
    out: Path,
    sites: list[str],
    external: str | None,
    n_cases: int,
    seed: int,
    *,
    external_cases: int | None = None,
    fov_mm: float | None = None,
    resolution_scale: float = 1.0,
    on_case: Callable[[str, str], None] | None = None,
) -> list[Path]:
    """Write one folder per site under ``out`` (``out/<site>``), the external set last.

    ``on_case(site, case_id)`` is called after each case is written.
    All target folders are checked before anything is written.

    Raises:
        DataError: unknown profile, duplicate site, or a target folder with data.
    """
    out = Path(out)
    names = [get_profile(s).name for s in sites]
    plan = [(get_profile(s), n_cases) for s in names]
    if external is not None:
        plan.append((get_profile(external), external_cases or n_cases))
    seen = [p.name for p, _ in plan]
    if len(set(seen)) != len(seen):
        raise DataError(f"each site may appear once, got {', '.join(seen)}")
    for profile, _ in plan:
        _check_empty(out / profile.name)
    written = []
    for profile, count in plan:
        callback = None if on_case is None else (lambda cid, name=profile.name: on_case(name, cid))
        written.append(
            synthesize_site(
                out / profile.name, profile, count, seed,
                fov_mm=fov_mm, resolution_scale=resolution_scale, on_case=callback,
            )
        )
    return written


__all__ = ["DEFAULT_EXTERNAL", "DEFAULT_SITES", "synthesize_site", "synthesize_study", "render_case", "case_rng", "acquisition_for"]
