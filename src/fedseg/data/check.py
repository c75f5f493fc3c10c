"""Validate a site folder before anyone trains on it.

Every problem is collected (not just the first) and names its file; nothing
is ever modified or deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedseg.data.layout import CaseFiles, SiteLayout, discover_site, gland_mask
from fedseg.data.volume import Volume, grid_difference, load_volume
from fedseg.errors import DataError


@dataclass(frozen=True)
class Problem:
    """One unusable file and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class CaseSummary:
    """Geometry and gland size of one valid case."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    gland_ml: float


@dataclass
class CheckReport:
    """Outcome of :func:`check_site`: valid cases and problems found."""

    layout: SiteLayout
    cases: list[CaseSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.cases)


def gland_volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Volume of a boolean mask in millilitres (1 mL = 1000 mm^3)."""
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def _label_problem(label: np.ndarray, allowed: frozenset[int]) -> str:
    """Reason the label array is unusable, or ''."""
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        return "label has non-integer values"
    values = {int(v) for v in np.unique(label)}
    unexpected = sorted(values - allowed)
    if unexpected:
        return f"label values {unexpected} not allowed (allowed: {sorted(allowed)})"
    if not gland_mask(label).any():
        return "mask is empty (no prostate voxels)"
    return ""


def _image_problem(image: Volume) -> str:
    if float(np.std(image.array)) == 0.0:
        return "image is constant (cannot be normalised)"
    return ""


def check_case(case: CaseFiles, allowed: frozenset[int]) -> tuple[CaseSummary | None, list[Problem]]:
    """Validate one case; returns its summary (None when invalid) and its problems."""
    if case.label is None:
        return None, [Problem(case.image, "no label file with the same case name")]
    problems = []
    volumes: dict[str, Volume] = {}
    for role, path in (("image", case.image), ("label", case.label)):
        if not path.is_file():
            problems.append(Problem(path, f"{role} file not found"))
            continue
        try:
            volumes[role] = load_volume(path, case.channel if role == "image" else None)
        except DataError as exc:
            problems.append(Problem(path, str(exc).removeprefix(f"{path}: ")))
    if problems:
        return None, problems
    image, label = volumes["image"], volumes["label"]
    if reason := grid_difference(image, label):
        return None, [Problem(case.label, f"grid does not match the image: {reason}")]
    if reason := _image_problem(image):
        return None, [Problem(case.image, reason)]
    if reason := _label_problem(label.array, allowed):
        return None, [Problem(case.label, reason)]
    summary = CaseSummary(case.case_id, image.shape, image.spacing, gland_volume_ml(gland_mask(label.array), label.spacing))
    return summary, []


def check_site(
    root: Path,
    modality: str = "T2",
    on_case: Callable[[str], None] | None = None,
) -> CheckReport:
    """Validate every case of a site folder.

    Checks that every image has a label, both files are readable 3-D NIfTI,
    image and label share shape, spacing and affine, label values are
    allowed for the layout, the gland mask is not empty and the image is not
    constant. Labels without an image are reported too.

    Raises:
        DataError: the folder itself is not a site folder (see
            :func:`discover_site`). Per-file problems are returned, not raised.
    """
    layout = discover_site(root, modality)
    report = CheckReport(layout)
    report.problems.extend(Problem(path, "label has no image with the same case name") for path in layout.orphan_labels)
    for case in layout.cases:
        summary, problems = check_case(case, layout.allowed_label_values)
        if summary is not None:
            report.cases.append(summary)
        report.problems.extend(problems)
        if on_case is not None:
            on_case(case.case_id)
    return report
