"""One 3-D image or mask with its geometry, read from and written to NIfTI.

A :class:`Volume` is the unit every data step passes around: the voxel array
and the 4x4 affine that maps voxel indices (i, j, k) to RAS+ millimetres,
the nibabel convention. Keeping the affine next to the array is what lets a
prediction be put back on a case's original grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedseg.errors import DataError

# Affines of an image and its mask written by different tools differ in the
# last float32 digits (seen in PROSTATEx: 2e-4 mm); anything above this is a
# real misalignment.
AFFINE_TOLERANCE_MM = 1e-2


@dataclass(frozen=True)
class Volume:
    """Voxel data plus the voxel-to-RAS+ (mm) affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    norms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def same_grid(a: Volume, b: Volume, atol_mm: float = AFFINE_TOLERANCE_MM) -> bool:
    """True when both volumes sample the same points in space."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol_mm))


def grid_difference(a: Volume, b: Volume) -> str:
    """Human-readable reason why two grids differ ('' when they match)."""
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if not np.allclose(a.spacing, b.spacing, atol=AFFINE_TOLERANCE_MM):
        fmt = lambda s: "x".join(f"{v:.3g}" for v in s)  # noqa: E731
        return f"spacing {fmt(a.spacing)} != {fmt(b.spacing)} mm"
    worst = float(np.max(np.abs(a.affine - b.affine)))
    if worst > AFFINE_TOLERANCE_MM:
        return f"affine differs by up to {worst:.3g} mm (position or orientation)"
    return ""


def load_volume(path: Path, channel: int | None = None) -> Volume:
    """Read a NIfTI file as a 3-D volume.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        channel: for a 4-D file (Decathlon multi-modal images), the index of
            the channel to keep along the 4th axis. Must be None for 3-D files.

    Raises:
        DataError: unreadable file, wrong dimensionality, non-finite values;
            the message names the file.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and channel is not None:
        if not 0 <= channel < data.shape[3]:
            raise DataError(f"{path}: channel {channel} requested but the image has {data.shape[3]}")
        data = data[..., channel]
    elif data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{path}: invalid affine (singular or non-finite)")
    return Volume(np.asarray(data), affine)


def save_volume(volume: Volume, path: Path, dtype: np.dtype | type | None = None) -> None:
    """Write a volume as NIfTI (gzip when the name ends in .gz), atomically.

    The affine is stored as both sform and qform with the scanner code, which
    3D Slicer and ITK-SNAP read as the patient coordinate frame.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(path.name[: -len(suffix)] + ".partial" + suffix)
    nib.save(image, str(tmp))
    tmp.replace(path)
