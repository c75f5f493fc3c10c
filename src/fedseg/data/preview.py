"""One-look PNG of several site folders: an axial slice per case with the mask contour.

Works on any ``<site>/images`` + ``<site>/labels`` folder (synthetic or real).
Slices are shown in radiological convention: anterior up, patient left on
the image right, derived from each file's affine (reoriented to RAS first).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from fedseg.errors import DataError  # noqa: E402

_SUFFIXES = (".nii.gz", ".nii")


def _case_pairs(site_dir: Path, limit: int) -> list[tuple[Path, Path]]:
    """First ``limit`` (image, label) pairs of a site, sorted by name."""
    images, labels = site_dir / "images", site_dir / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise DataError(f"{site_dir}: expected images/ and labels/ folders")
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.name.endswith(_SUFFIXES)):
        label = labels / image.name
        if label.exists():
            pairs.append((image, label))
        if len(pairs) == limit:
            break
    if not pairs:
        raise DataError(f"{site_dir}: no image with a matching label")
    return pairs


def _load_ras(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Array reoriented to RAS (axis 0 -> right, 1 -> anterior, 2 -> superior) and its zooms."""
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types
        raise DataError(f"{path}: cannot read as NIfTI ({exc})") from exc
    if data.ndim == 4:
        data = data[..., 0]
    return np.asarray(data, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def _display(plane: np.ndarray) -> np.ndarray:
    """RAS axial plane (x, y) -> rows anterior-to-posterior, columns patient right-to-left."""
    return plane[::-1, ::-1].T


def _window(plane: np.ndarray) -> tuple[float, float]:
    """1st-99.5th percentile of the non-zero (body) pixels."""
    body = plane[plane > 0]
    if body.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(body, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _draw_case(ax, image: Path, label: Path, title: str) -> None:
    img, zooms = _load_ras(image)
    lab, _ = _load_ras(label)
    if img.shape != lab.shape:
        raise DataError(f"{label}: shape {lab.shape} differs from image {img.shape}")
    mask = lab > 0
    k = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else img.shape[2] // 2
    plane, outline = _display(img[:, :, k]), _display(mask[:, :, k])
    lo, hi = _window(plane)
    ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=zooms[1] / zooms[0], interpolation="bilinear")
    if outline.any():
        ax.contour(outline.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"{title}\n{zooms[0]:.3g}x{zooms[1]:.3g} mm, {zooms[2]:.3g} mm slices\n{image.name}", fontsize=8)
    ax.text(0.5, 0.98, "A", color="yellow", ha="center", va="top", transform=ax.transAxes, fontsize=8)
    ax.text(0.98, 0.5, "L", color="yellow", ha="right", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def save_site_preview(site_dirs: list[Path], out_png: Path, cases_per_site: int = 1) -> Path:
    """Save a grid (rows = cases, columns = sites) of axial slices through the largest mask section.

    Returns ``out_png``.

    Raises:
        DataError: a folder without images/labels or unreadable files.
    """
    if not site_dirs:
        raise DataError("no site folders to preview")
    site_dirs = [Path(s) for s in site_dirs]
    columns = [_case_pairs(s, cases_per_site) for s in site_dirs]
    rows = max(len(c) for c in columns)
    fig, axes = plt.subplots(rows, len(site_dirs), figsize=(3.6 * len(site_dirs), 3.9 * rows), squeeze=False)
    try:
        for col, (site, pairs) in enumerate(zip(site_dirs, columns)):
            for row in range(rows):
                ax = axes[row][col]
                if row < len(pairs):
                    _draw_case(ax, *pairs[row], title=site.name)
                else:
                    ax.axis("off")
        fig.tight_layout()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
    finally:
        plt.close(fig)
    return out_png
