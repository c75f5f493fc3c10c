"""Convert one DICOM series (a folder of 2-D slices) to a :class:`Volume`.

Sites often export scans as DICOM; training and inference read NIfTI. This
module is the bridge: it picks one series out of a folder, checks that its
slices form a regular 3-D grid, and returns the voxels with the voxel-to-RAS+
affine (oblique orientations included), so a NIfTI written from it lines up
with masks drawn on the original scan.

SimpleITK (GDCM) does the decoding and slice sorting; the slice-geometry
checks are done here because SimpleITK only warns about missing slices and
non-uniform spacing and then returns a volume with wrong positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedseg.data.volume import Volume, save_volume
from fedseg.errors import DataError

# DICOM tags as SimpleITK metadata keys.
TAG_IMAGE_POSITION = "0020|0032"
TAG_IMAGE_ORIENTATION = "0020|0037"
TAG_SERIES_DESCRIPTION = "0008|103e"

# DICOM stores positions as decimal strings with ~1e-6 mm noise (PROSTATEx:
# gaps of 3 mm +- 1.3e-6); a missing slice doubles a gap, so a 1 % relative
# tolerance separates the two with a wide margin either way.
SLICE_GAP_RELATIVE_TOLERANCE = 1e-2
# Slice origins off the slice normal by more than this mean a tilted/sheared
# stack (e.g. CT gantry tilt), which an affine cannot represent.
SLICE_SHEAR_TOLERANCE_MM = 1e-2
# Direction cosines equal to this precision count as the same orientation.
ORIENTATION_TOLERANCE = 1e-4

# LPS (DICOM/ITK patient frame) to RAS+ (nibabel): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def list_series(folder: Path) -> dict[str, list[str]]:
    """Series instance UID -> file names (no directory) of that series' slices.

    Files are in GDCM's slice order (sorted along the slice normal), which is
    the order the volume is assembled in. Non-DICOM files are ignored;
    subfolders are not searched.

    Raises:
        DataError: the folder does not exist or is not a directory.
    """
    folder = _existing_folder(folder)
    series: dict[str, list[str]] = {}
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        paths = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        series[uid] = [Path(p).name for p in paths]
    return series


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Volume:
    """Read one DICOM series as a Volume with a voxel-to-RAS+ affine.

    Array axes are (i, j, k) = (column, row, slice), matching the affine.
    Integer pixel data keep their stored integer dtype; data with a
    non-trivial rescale slope/intercept come back as float, as SimpleITK
    applies the rescale.

    Args:
        folder: directory holding the slice files (not searched recursively).
        series_uid: SeriesInstanceUID to read; may be None when the folder
            holds exactly one series.

    Raises:
        DataError: the folder is missing, holds no DICOM series, holds several
            series and ``series_uid`` is None, ``series_uid`` is not in it,
            the series has a single slice, its slices are not a regular grid
            (missing slice, non-uniform or duplicate positions, mixed
            orientations, sheared stack), or it cannot be decoded. The
            message names the folder.
    """
    folder = _existing_folder(folder)
    names = _pick_series(folder, list_series(folder), series_uid)
    paths = [folder / name for name in names]
    if len(paths) < 2:
        raise DataError(f"{folder}: series has a single slice ({paths[0].name}); expected a 3-D volume")
    _check_slice_geometry(folder, paths)
    image = _read_image(folder, paths)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    return Volume(array, _ras_affine(image))


def import_dicom_series(
    folder: Path, out: Path, series_uid: str | None = None, overwrite: bool = False
) -> Volume:
    """Convert a DICOM series to a NIfTI file and return the Volume written.

    The stored dtype is kept (e.g. uint16 MR stays uint16).

    Raises:
        DataError: ``out`` does not end in .nii/.nii.gz, ``out`` exists and
            ``overwrite`` is False, or any reason of :func:`read_dicom_series`.
    """
    out = Path(out)
    if not out.name.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{out}: output name must end in .nii or .nii.gz")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; choose another name or allow overwriting (--overwrite)")
    volume = read_dicom_series(folder, series_uid)
    save_volume(volume, out)
    return volume


def _existing_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "folder does not exist"
        raise DataError(f"{folder}: {what}")
    return folder


def _pick_series(folder: Path, series: dict[str, list[str]], series_uid: str | None) -> list[str]:
    """File names of the requested series, or of the only one."""
    if not series:
        raise DataError(f"{folder}: no DICOM series found (no readable DICOM image files)")
    if series_uid is None:
        if len(series) == 1:
            return next(iter(series.values()))
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series; choose one by series UID: "
            + _describe_series(folder, series)
        )
    if series_uid not in series:
        raise DataError(
            f"{folder}: no series with UID {series_uid}; available: " + _describe_series(folder, series)
        )
    return series[series_uid]


def _describe_series(folder: Path, series: dict[str, list[str]]) -> str:
    """'UID ("description", N files); ...' for error messages."""
    parts = []
    for uid, names in series.items():
        description = _read_header(folder / names[0]).get(TAG_SERIES_DESCRIPTION, "").strip()
        parts.append(f'{uid} ("{description}", {len(names)} files)')
    return "; ".join(parts)


def _read_header(path: Path) -> dict[str, str]:
    """All metadata tags of one DICOM file, without decoding pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read DICOM header ({exc})") from exc
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def _parse_numbers(path: Path, header: dict[str, str], tag: str, count: int) -> np.ndarray:
    """A backslash-separated DICOM decimal-string tag as `count` floats."""
    if tag not in header:
        raise DataError(f"{path}: DICOM tag ({tag}) is missing; cannot place the slice in space")
    try:
        values = np.array([float(v) for v in header[tag].strip().split("\\")])
    except ValueError as exc:
        raise DataError(f"{path}: DICOM tag ({tag}) is not numeric: {header[tag]!r}") from exc
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DataError(f"{path}: DICOM tag ({tag}) should hold {count} numbers: {header[tag]!r}")
    return values


def _check_slice_geometry(folder: Path, paths: list[Path]) -> None:
    """Raise DataError unless the slices are parallel, evenly spaced and unsheared.

    Works from each file's ImagePositionPatient / ImageOrientationPatient
    rather than SimpleITK's result, which averages over gaps with a warning.
    """
    positions, orientations = [], []
    for path in paths:
        header = _read_header(path)
        positions.append(_parse_numbers(path, header, TAG_IMAGE_POSITION, 3))
        orientations.append(_parse_numbers(path, header, TAG_IMAGE_ORIENTATION, 6))
    orientation = orientations[0]
    if any(not np.allclose(o, orientation, atol=ORIENTATION_TOLERANCE) for o in orientations):
        raise DataError(f"{folder}: slices have different orientations (ImageOrientationPatient)")
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = np.array(positions) - positions[0]
    along = offsets @ normal
    sheared = np.linalg.norm(offsets - np.outer(along, normal), axis=1).max()
    if sheared > SLICE_SHEAR_TOLERANCE_MM:
        raise DataError(f"{folder}: slice positions drift in-plane by up to {sheared:.3g} mm (tilted stack)")
    gaps = np.diff(np.sort(along))
    typical = float(np.median(gaps))
    if typical <= 0 or gaps.min() <= SLICE_GAP_RELATIVE_TOLERANCE * typical:
        raise DataError(f"{folder}: several slices share the same position (duplicate slices)")
    irregular = np.abs(gaps - typical) > SLICE_GAP_RELATIVE_TOLERANCE * typical
    if irregular.any():
        raise DataError(
            f"{folder}: slice spacing is not uniform (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm,"
            f" typical {typical:.4g} mm); a slice is missing or the series mixes acquisitions"
        )


def _read_image(folder: Path, paths: list[Path]) -> sitk.Image:
    """Decode the slices (already in slice order) as one 3-D image."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(p) for p in paths])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{folder}: cannot decode DICOM series ({exc})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{folder}: expected a scalar 3-D volume, got {image.GetDimension()}-D with"
            f" {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    return image


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS+ mm affine from SimpleITK's LPS geometry."""
    lps = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps
