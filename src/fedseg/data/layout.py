"""Find the cases of a site folder, in either layout fedseg accepts.

* fedseg layout: ``images/<case>.nii.gz`` and ``labels/<case>.nii.gz``,
  label 1 = prostate, 0 = background.
* Medical Segmentation Decathlon layout, as distributed: ``dataset.json``,
  ``imagesTr/``, ``labelsTr/``; 4-D multi-channel images whose T2 channel is
  found by name in ``dataset.json["modality"]``; multi-class labels where the
  whole gland is every label > 0.

Discovery only lists files; reading and validating them is :mod:`check`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedseg.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FEDSEG_LABEL_VALUES = frozenset({0, 1})


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. ``label`` is None when it is missing."""

    case_id: str
    image: Path
    label: Path | None
    channel: int | None = None  # channel of a 4-D image to use (Decathlon)


@dataclass(frozen=True)
class SiteLayout:
    """What a site folder holds, before any file is opened."""

    root: Path
    kind: Literal["fedseg", "msd"]
    cases: tuple[CaseFiles, ...]
    orphan_labels: tuple[Path, ...]  # labels without an image
    allowed_label_values: frozenset[int]

    @property
    def name(self) -> str:
        return self.root.name

    def case(self, case_id: str) -> CaseFiles:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DataError(f"{self.root}: no case named {case_id!r}")


def gland_mask(label: np.ndarray) -> np.ndarray:
    """Whole-gland mask from a label array of either layout (any label > 0)."""
    return np.asarray(label) > 0


def case_id_of(path: Path) -> str | None:
    """Case name of a NIfTI file name, or None for other files (and macOS '._' debris)."""
    name = path.name
    if name.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case_id = case_id_of(path)
        if case_id is not None and path.is_file():
            files[case_id] = path
    return files


def discover_site(root: Path, modality: str = "T2") -> SiteLayout:
    """List the cases of a site folder.

    Args:
        root: the site folder.
        modality: for Decathlon 4-D images, the channel name to use (matched
            case-insensitively as a prefix, so "T2" finds "T2" and "T2w").

    Raises:
        DataError: the folder is missing, is in neither layout, holds no
            images, or its ``dataset.json`` is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: site folder not found")
    if (root / "dataset.json").is_file():
        return _discover_msd(root, modality)
    if (root / "images").is_dir():
        return _discover_fedseg(root)
    raise DataError(
        f"{root}: not a site folder (expected images/ and labels/, "
        "or a Decathlon dataset.json with imagesTr/ and labelsTr/)"
    )


def _discover_fedseg(root: Path) -> SiteLayout:
    images = _nifti_files(root / "images")
    if not images:
        raise DataError(f"{root / 'images'}: no .nii or .nii.gz images")
    labels = _nifti_files(root / "labels") if (root / "labels").is_dir() else {}
    cases = tuple(CaseFiles(cid, path, labels.get(cid)) for cid, path in images.items())
    orphans = tuple(path for cid, path in labels.items() if cid not in images)
    return SiteLayout(root, "fedseg", cases, orphans, FEDSEG_LABEL_VALUES)


def _read_dataset_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(f"{path}: missing the 'training' list of image/label pairs")
    return meta


def _msd_channel(meta: dict, modality: str, path: Path) -> int | None:
    modalities = meta.get("modality") or {}
    if not isinstance(modalities, dict) or len(modalities) <= 1:
        return None
    wanted = modality.lower()
    for key, name in modalities.items():
        if str(name).lower().startswith(wanted):
            return int(key)
    raise DataError(f"{path}: no modality named {modality!r} in {modalities}")


def _msd_label_values(meta: dict, path: Path) -> frozenset[int]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: missing the 'labels' table")
    try:
        return frozenset(int(key) for key in labels)
    except ValueError as exc:
        raise DataError(f"{path}: label keys must be integers, got {list(labels)}") from exc


def _discover_msd(root: Path, modality: str) -> SiteLayout:
    meta_path = root / "dataset.json"
    meta = _read_dataset_json(meta_path)
    channel = _msd_channel(meta, modality, meta_path)
    cases = []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{meta_path}: malformed training entry {entry!r}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        case_id = case_id_of(image) or image.name
        cases.append(CaseFiles(case_id, image, label, channel))
    if not cases:
        raise DataError(f"{meta_path}: the training list is empty")
    return SiteLayout(root, "msd", tuple(cases), (), _msd_label_values(meta, meta_path))
