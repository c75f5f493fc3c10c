"""Preprocessing as in the paper: canonical orientation, isotropic voxels, z-score.

``prepare_site(SRC, DST)`` writes, per case,

* ``DST/images/<case>.nii.gz`` float32, isotropic, zero mean / unit variance;
* ``DST/labels/<case>.nii.gz`` uint8 whole-gland mask (nearest neighbour);
* ``DST/meta/<case>.json`` the original grid (shape, affine), the source
  files and their fingerprints, and the configuration used.

The per-case JSON (a :class:`CaseMeta`, read by :func:`read_case_meta`) is
the cache key: a case is redone only when its source files or the
configuration change. It is also what lets a prediction on the prepared grid
be mapped back onto the original one (:func:`to_original_grid`).
``DST/prepared.json`` (a :class:`PreparedManifest`) says which site the
folder holds and how it was prepared.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import nibabel as nib
import numpy as np
from pydantic import Field, field_validator
from scipy import ndimage

from fedseg.data.layout import CaseFiles, discover_site, gland_mask
from fedseg.data.splits import MIN_CASES_TO_SPLIT, SPLITS_FILE, ensure_splits
from fedseg.data.volume import Volume, load_volume, save_volume
from fedseg.errors import DataError, FedsegError
from fedseg.schema import Integer, Number, Record, Table, Text, must_be

PREPARED_FORMAT = 1
MANIFEST = "prepared.json"
Normalisation = Literal["zscore", "percentile"]
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
CLIP_PERCENTILES = (0.5, 99.5)


class PrepareConfig(Table):
    """How a site is preprocessed; part of every cache key.

    Attributes:
        spacing_mm: isotropic voxel size of the output (the paper: 1 mm).
        image_order: spline order for image resampling (1 = linear, 3 = cubic).
        modality: Decathlon channel name to use for 4-D images.
        normalize: ``zscore`` (the paper's, over the whole image) or
            ``percentile`` (intensities first clipped to the image's 0.5th and
            99.5th percentiles: a coil's flare or a few bright voxels then no
            longer squash the gland's contrast).
    """

    toml_table = "prepare"
    error = DataError

    spacing_mm: Number = 1.0
    image_order: Annotated[Integer, Field(ge=1, le=3), must_be("1 (linear), 2 or 3 (cubic)")] = 1
    modality: Text = "T2"
    normalize: Normalisation = "zscore"

    @field_validator("spacing_mm")
    @classmethod
    def _plausible_spacing(cls, mm: float) -> float:
        if not 0.1 <= mm <= 10.0:
            raise ValueError(f"spacing must be between 0.1 and 10 mm, got {mm}")
        return mm


class SourceFile(Record):
    """A file a prepared case was made from: where it is and its fingerprint."""

    path: str  # absolute: evaluation reads the original label from here, from any working directory
    sha256: str


class OriginalGrid(Record):
    """The grid of the case's original image (what a prediction is mapped back onto)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: list[list[float]]


class CaseMeta(Record):
    """``meta/<case>.json``: how one case was prepared, and from what."""

    format: int = PREPARED_FORMAT
    case: str
    config: dict[str, Any]  # the PrepareConfig as recorded: compared as written (it is part of cache keys)
    sources: dict[str, SourceFile]
    channel: int | None = None
    original: OriginalGrid


class PreparedManifest(Record):
    """``prepared.json``: which site a prepared folder holds, prepared how."""

    format: int = PREPARED_FORMAT
    source: str
    config: dict[str, Any]


def read_case_meta(path: Path) -> CaseMeta:
    """A prepared case's ``meta/<case>.json``."""
    return CaseMeta.read(path)


def read_manifest(folder: Path) -> PreparedManifest | None:
    """The ``prepared.json`` of ``folder``, or None when it is not a prepared folder."""
    path = Path(folder) / MANIFEST
    return PreparedManifest.read(path) if path.is_file() else None


@dataclass(frozen=True)
class PreparedCase:
    """Paths of one prepared case and the metadata needed to map back."""

    case_id: str
    image: Path
    label: Path
    meta: Path


def to_canonical(volume: Volume) -> Volume:
    """Reorder/flip axes so that they run closest to R, A, S (no resampling)."""
    current = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    array = nib.orientations.apply_orientation(volume.array, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return Volume(np.ascontiguousarray(array), affine)


def isotropic_grid(volume: Volume, spacing_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of an isotropic grid covering the same field of view.

    Axis directions are kept (oblique stays oblique); the outer voxel edges
    of the new grid line up with those of the old one.
    """
    old = np.array(volume.spacing)
    shape = tuple(max(1, int(round(n * s / spacing_mm))) for n, s in zip(volume.shape, old))
    directions = volume.affine[:3, :3] / old
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing_mm
    half_shift = (spacing_mm - old) / 2.0  # move first centre from old to new half-voxel
    affine[:3, 3] = volume.affine[:3, 3] + directions @ half_shift
    return affine, shape  # type: ignore[return-value]


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    order: int,
) -> np.ndarray:
    """Sample ``array`` (on ``affine``) at the voxel centres of a target grid.

    ``order`` 0 is nearest neighbour (labels), 1 linear, 3 cubic. Points
    outside the source take the nearest edge value.
    """
    voxel_map = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    source = array.astype(np.float32, copy=False)
    return ndimage.affine_transform(
        source,
        voxel_map[:3, :3],
        offset=voxel_map[:3, 3],
        output_shape=target_shape,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def zscore(array: np.ndarray, clip_percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """Whole-image zero mean, unit variance (the paper's normalisation), after clipping to the
    image's ``clip_percentiles`` when given."""
    array = array.astype(np.float32)
    if clip_percentiles is not None:
        low, high = np.percentile(array, clip_percentiles)
        array = np.clip(array, low, high)
    std = float(array.std())
    if std == 0.0:
        raise DataError("image is constant: cannot normalise to unit variance")
    return (array - float(array.mean())) / std


def preprocess_case(image: Volume, label: Volume | None, config: PrepareConfig) -> tuple[Volume, Volume | None]:
    """Canonical orientation, isotropic resampling and z-score of one case."""
    canonical = to_canonical(image)
    affine, shape = isotropic_grid(canonical, config.spacing_mm)
    resampled = resample_to_grid(canonical.array, canonical.affine, affine, shape, config.image_order)
    clip = CLIP_PERCENTILES if config.normalize == "percentile" else None
    out_image = Volume(zscore(resampled, clip), affine)
    if label is None:
        return out_image, None
    mask = gland_mask(label.array).astype(np.uint8)
    out_label = resample_to_grid(mask, label.affine, affine, shape, order=0)
    return out_image, Volume(out_label.astype(np.uint8), affine)


def to_original_grid(
    array: np.ndarray, prepared_affine: np.ndarray, meta: CaseMeta | Mapping[str, Any], order: int = 1
) -> np.ndarray:
    """Map an array on the prepared grid (e.g. probabilities) back onto the case's original grid.

    ``meta`` is the case's ``meta/<case>.json`` (or a dict with its ``original``
    shape and affine). Use order 1 for probabilities and threshold afterwards; order 0 for labels.
    """
    original = meta.original.model_dump() if isinstance(meta, CaseMeta) else meta["original"]
    original_affine = np.array(original["affine"], dtype=np.float64)
    return resample_to_grid(array, prepared_affine, original_affine, tuple(original["shape"]), order)


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes: what makes a cached case stale."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _case_meta(case: CaseFiles, image: Volume, config: PrepareConfig) -> CaseMeta:
    sources = {"image": case.image, "label": case.label}
    return CaseMeta(
        case=case.case_id,
        config=config.to_dict(),
        sources={
            role: SourceFile(path=str(Path(path).resolve()), sha256=file_fingerprint(path))
            for role, path in sources.items()
            if path is not None
        },
        channel=case.channel,
        original=OriginalGrid(
            shape=image.shape, spacing=image.spacing, affine=np.asarray(image.affine).tolist()
        ),
    )


def _cached(meta_path: Path, case: CaseFiles, config: PrepareConfig) -> bool:
    if not meta_path.is_file():
        return False
    try:
        meta = read_case_meta(meta_path)
    except FedsegError:  # unreadable or from an unknown version: prepared again
        return False
    sources = {"image": case.image, "label": case.label}
    expected = {role: file_fingerprint(p) for role, p in sources.items() if p is not None}
    where = {role: str(Path(p).resolve()) for role, p in sources.items() if p is not None}
    return (
        meta.config == config.to_dict()
        and {role: entry.sha256 for role, entry in meta.sources.items()} == expected
        and {role: entry.path for role, entry in meta.sources.items()} == where
        and meta.format == PREPARED_FORMAT
    )


def prepare_case(case: CaseFiles, dst: Path, config: PrepareConfig) -> tuple[PreparedCase, bool]:
    """Prepare one case into ``dst``; returns its paths and whether it was computed (False = cached)."""
    prepared = PreparedCase(
        case.case_id,
        dst / "images" / f"{case.case_id}.nii.gz",
        dst / "labels" / f"{case.case_id}.nii.gz",
        dst / "meta" / f"{case.case_id}.json",
    )
    if _cached(prepared.meta, case, config) and prepared.image.is_file() and prepared.label.is_file():
        return prepared, False
    if case.label is None:
        raise DataError(f"{case.image}: no label file with the same case name")
    image = load_volume(case.image, case.channel)
    label = load_volume(case.label)
    try:
        out_image, out_label = preprocess_case(image, label, config)
    except DataError as exc:
        raise DataError(f"{case.image}: {exc}") from exc
    save_volume(out_image, prepared.image, np.float32)
    save_volume(out_label, prepared.label, np.uint8)  # type: ignore[arg-type]
    _case_meta(case, image, config).write(prepared.meta)
    return prepared, True


def _claim_destination(src: Path, dst: Path, config: PrepareConfig) -> None:
    """Refuse a destination that holds something else; record what it holds."""
    if dst.resolve() == src.resolve():
        raise DataError(f"{dst}: the destination must differ from the source site folder")
    recorded = read_manifest(dst)
    if recorded is not None:
        if recorded.config != config.to_dict() or recorded.source != str(src.resolve()):
            raise DataError(
                f"{dst}: already holds {recorded.source} prepared with {recorded.config}; choose another destination"
            )
        return  # already ours: rewriting it would race with concurrent readers
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"{dst}: exists and is not a fedseg prepared folder; choose an empty or new folder")
    PreparedManifest(source=str(src.resolve()), config=config.to_dict()).write(dst / MANIFEST)


def _carry_splits(src: Path, dst: Path) -> None:
    """Copy the site's own splits.json; never replace a different one silently."""
    source, target = src / SPLITS_FILE, dst / SPLITS_FILE
    if not source.is_file():
        return
    if target.is_file() and target.read_bytes() != source.read_bytes():
        raise DataError(f"{target}: differs from {source}; remove one of them to choose which split to use")
    shutil.copyfile(source, target)


def prepare_site(
    src: Path,
    dst: Path,
    config: PrepareConfig = PrepareConfig(),
    on_case: Callable[[str, bool], None] | None = None,
    split_seed: int = 0,
) -> list[PreparedCase]:
    """Prepare every case of site ``src`` into ``dst`` (cached per case and config).

    A ``splits.json`` in ``src`` is copied to ``dst`` so the prepared folder
    trains on the site's own split; without one, ``dst/splits.json`` is made
    from ``split_seed`` (unless the site is too small to split, e.g. a
    two-case external test set). ``src`` is never written to.

    Raises:
        DataError: ``dst`` holds other data, or a case cannot be read.
    """
    src, dst = Path(src), Path(dst)
    layout = discover_site(src, config.modality)
    _claim_destination(src, dst, config)
    prepared = []
    for case in layout.cases:
        result, computed = prepare_case(case, dst, config)
        prepared.append(result)
        if on_case is not None:
            on_case(case.case_id, computed)
    _carry_splits(src, dst)
    if len(prepared) >= MIN_CASES_TO_SPLIT or (dst / SPLITS_FILE).exists():
        ensure_splits(dst / SPLITS_FILE, [p.case_id for p in prepared], seed=split_seed)
    return prepared

