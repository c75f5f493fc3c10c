"""DICOM series -> Volume conversion: geometry, voxels, and user-facing errors.

Real-data tests read the PROSTATEx series from the shared data folder (never
copied into the repo); the synthetic tests write their own series to tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from fedseg.data.dicom import import_dicom_series, list_series, read_dicom_series
from fedseg.data.volume import Volume, load_volume, same_grid
from fedseg.errors import DataError

# The shared data folder sits next to the repository (../shared/data), in CI too.
PROSTATEX = Path(__file__).resolve().parents[3] / "shared" / "data" / "prostatex"
CASES = ["ProstateX-0000", "ProstateX-0001"]
needs_real_data = pytest.mark.skipif(not PROSTATEX.is_dir(), reason="shared PROSTATEx data not available")

# The label headers were written in float32 (and ProstateX-0000's via the
# quaternion qform), so their affines differ from the exact DICOM geometry by
# up to ~1e-4 mm; 1e-3 mm allows that rounding yet is 500x below half a voxel.
LABEL_AFFINE_TOLERANCE_MM = 1e-3

SYNTHETIC_UID = "1.2.826.0.1.3680043.2.1125.1.424242"
SYNTHETIC_SPACING = (0.6, 0.8, 2.5)  # all different, so a swapped axis shows
SYNTHETIC_ORIGIN = (-10.0, 20.0, 5.0)  # LPS mm
SYNTHETIC_DIRECTION = Rotation.from_euler("xyz", [20, -10, 30], degrees=True).as_matrix()


def dicom_dir(case: str) -> Path:
    return PROSTATEX / "dicom" / case


def copy_files(names: list[str], source: Path, dest: Path, prefix: str = "") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / name, dest / f"{prefix}{name}")
    return dest


def error_for(folder: Path, **kwargs: object) -> str:
    """The DataError message of reading `folder`, checked to name the folder."""
    with pytest.raises(DataError) as info:
        read_dicom_series(folder, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert str(folder) in message
    return message


# --- real PROSTATEx series -------------------------------------------------


@needs_real_data
@pytest.mark.parametrize("case", CASES)
def test_real_series_matches_label_grid_and_reference_voxels(case: str) -> None:
    volume = read_dicom_series(dicom_dir(case))
    label = load_volume(PROSTATEX / "labels" / f"{case}.nii.gz")
    reference = load_volume(PROSTATEX / "images" / f"{case}.nii.gz")

    assert volume.shape == label.shape == (384, 384, 19)
    assert same_grid(volume, label, atol_mm=LABEL_AFFINE_TOLERANCE_MM)
    assert np.allclose(volume.spacing, (0.5, 0.5, 3.0), atol=1e-6)
    assert volume.array.dtype == np.uint16  # stored integers, not float
    assert np.array_equal(volume.array, reference.array)


@needs_real_data
@pytest.mark.parametrize("case", CASES)
def test_real_affine_is_oblique_with_label_axis_codes(case: str) -> None:
    volume = read_dicom_series(dicom_dir(case))
    label = load_volume(PROSTATEX / "labels" / f"{case}.nii.gz")
    rotation = volume.affine[:3, :3] / np.array(volume.spacing)
    off_diagonal = rotation[~np.eye(3, dtype=bool)]
    assert np.abs(off_diagonal).max() > 0.05  # tilted by several degrees
    assert nib.aff2axcodes(volume.affine) == nib.aff2axcodes(label.affine) == ("L", "P", "S")


@needs_real_data
def test_list_series_gives_uid_and_slice_files() -> None:
    series = list_series(dicom_dir(CASES[0]))
    assert len(series) == 1
    (names,) = series.values()
    assert sorted(names) == [f"1-{n:02d}.dcm" for n in range(1, 20)]


@needs_real_data
def test_import_writes_nifti_that_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "case.nii.gz"
    volume = import_dicom_series(dicom_dir(CASES[0]), out)
    back = load_volume(out)
    assert back.array.dtype == volume.array.dtype
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-4)  # NIfTI stores float32


@needs_real_data
def test_import_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "case.nii"
    out.write_bytes(b"keep me")
    with pytest.raises(DataError, match="already exists"):
        import_dicom_series(dicom_dir(CASES[0]), out)
    assert out.read_bytes() == b"keep me"
    import_dicom_series(dicom_dir(CASES[0]), out, overwrite=True)
    assert load_volume(out).shape == (384, 384, 19)


def test_import_rejects_non_nifti_output_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.nii"):
        import_dicom_series(tmp_path, tmp_path / "case.nrrd")


@needs_real_data
def test_missing_middle_slice_is_an_error(tmp_path: Path) -> None:
    source = dicom_dir(CASES[0])
    names = next(iter(list_series(source).values()))
    folder = copy_files(names[:9] + names[10:], source, tmp_path / "gap")
    assert "not uniform" in error_for(folder)


@needs_real_data
def test_single_slice_is_an_error(tmp_path: Path) -> None:
    folder = copy_files(["1-10.dcm"], dicom_dir(CASES[0]), tmp_path / "one")
    assert "single slice" in error_for(folder)


@needs_real_data
def test_two_series_need_a_uid(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    uids = {}
    for case in CASES:
        ((uid, names),) = list_series(dicom_dir(case)).items()
        copy_files(names, dicom_dir(case), folder, prefix=f"{case}-")
        uids[case] = uid

    message = error_for(folder)
    assert all(uid in message for uid in uids.values())
    assert "t2_tse_tra" in message and "19 files" in message

    assert "no series with UID" in error_for(folder, series_uid="1.2.3")
    chosen = read_dicom_series(folder, series_uid=uids[CASES[1]])
    assert np.array_equal(chosen.array, read_dicom_series(dicom_dir(CASES[1])).array)


# --- folders without a usable series ----------------------------------------


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    assert "does not exist" in error_for(tmp_path / "nope")


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    assert "no DICOM series" in error_for(tmp_path)


def test_folder_of_non_dicom_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "scan.dcm").write_bytes(b"\x00" * 512)
    assert "no DICOM series" in error_for(tmp_path)


# --- synthetic oblique series (no real data needed) --------------------------


def synthetic_image() -> sitk.Image:
    """A 5x6x4 (i, j, k) int16 volume with a known oblique LPS geometry."""
    array = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) * 7 - 100  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SYNTHETIC_SPACING)
    image.SetOrigin(SYNTHETIC_ORIGIN)
    image.SetDirection(SYNTHETIC_DIRECTION.ravel().tolist())
    return image


def write_series(image: sitk.Image, folder: Path, skip: int | None = None) -> Path:
    """Write `image` as one DICOM file per slice with explicit geometry tags."""
    folder.mkdir(parents=True, exist_ok=True)
    cosines = SYNTHETIC_DIRECTION[:, 0].tolist() + SYNTHETIC_DIRECTION[:, 1].tolist()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # else GDCM gives every file a new series UID
    for k in range(image.GetDepth()):
        if k == skip:
            continue
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|103e": "synthetic",
            "0020|000d": SYNTHETIC_UID + ".1",
            "0020|000e": SYNTHETIC_UID,
            "0008|0018": f"{SYNTHETIC_UID}.2.{k}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{c:.8f}" for c in cosines),
            "0028|0030": f"{SYNTHETIC_SPACING[1]}\\{SYNTHETIC_SPACING[0]}",  # row\column
            "0018|0050": str(SYNTHETIC_SPACING[2]),
        }
        slice_ = image[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:02d}.dcm"))
        writer.Execute(slice_)
    return folder


def expected_ras_affine() -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = SYNTHETIC_DIRECTION @ np.diag(SYNTHETIC_SPACING)
    lps[:3, 3] = SYNTHETIC_ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_synthetic_oblique_series_round_trip(tmp_path: Path) -> None:
    image = synthetic_image()
    volume = read_dicom_series(write_series(image, tmp_path / "series"))
    # Positions are written with 6 decimals and cosines with 8.
    assert np.allclose(volume.affine, expected_ras_affine(), atol=1e-5)
    assert volume.array.dtype == np.int16
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def test_synthetic_list_series(tmp_path: Path) -> None:
    folder = write_series(synthetic_image(), tmp_path / "series")
    assert list_series(folder) == {SYNTHETIC_UID: [f"slice{k:02d}.dcm" for k in range(4)]}


def test_synthetic_missing_slice_is_an_error(tmp_path: Path) -> None:
    folder = write_series(synthetic_image(), tmp_path / "gap", skip=2)
    assert "not uniform" in error_for(folder)


def test_import_synthetic_series_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "out.nii"
    written = import_dicom_series(write_series(synthetic_image(), tmp_path / "series"), out)
    back = load_volume(out)
    assert isinstance(written, Volume)
    assert np.array_equal(back.array, written.array)
    assert np.allclose(back.affine, written.affine, atol=1e-4)
