"""Painting primitives: set a tissue code inside a solid (ellipsoid, rod, bone) of the tissue map.

The tissue map is a uint8 array on a :class:`~fedseg.data.phantom.grid.Frame`;
each primitive touches only the frame's box around its solid, and later paint
covers earlier paint (``only`` restricts it to given tissues underneath).
"""

from __future__ import annotations

import numpy as np

from fedseg.data.phantom.grid import Frame
from fedseg.data.phantom.tissues import CODE

__all__ = ["paint_bone", "paint_bone_rod", "paint_ellipsoid", "paint_mask", "paint_rod"]


def paint_mask(tissue: np.ndarray, box, mask: np.ndarray, code: int, only: tuple[int, ...] | None = None) -> None:
    """Set ``code`` where mask (box-shaped) holds, optionally only over given tissues."""
    sub = tissue[box]
    if only is not None:
        mask = mask & np.isin(sub, only)
    sub[mask] = code


def paint_ellipsoid(tissue, fr: Frame, centre, radii, code: int, only=None, keep=None) -> None:
    """Axis-aligned (patient frame) ellipsoid; ``keep(x, y)`` optionally limits it in-plane."""
    cx, cy, cz = centre
    rx, ry, rz = radii
    box = fr.box(cx, cy, max(rx, ry), cz - rz, cz + rz)
    if box is None:
        return
    q2 = ((fr.x[box[0], box[1]] - cx) / rx) ** 2 + ((fr.y[box[0], box[1]] - cy) / ry) ** 2
    if keep is not None:
        q2 = np.where(keep(fr.x[box[0], box[1]], fr.y[box[0], box[1]]), q2, np.float32(2.0))
    qz = ((fr.z[box[2]] - cz) / rz) ** 2
    paint_mask(tissue, box, q2[:, :, None] + qz[None, None, :] <= 1, code, only)


def paint_bone(tissue, fr: Frame, centre, radii, cortex: float = 2.0) -> None:
    """Ellipsoidal bone: dark cortex around intermediate fatty marrow."""
    paint_ellipsoid(tissue, fr, centre, radii, CODE["cortical_bone"])
    inner = tuple(max(r - cortex, 0.5) for r in radii)
    paint_ellipsoid(tissue, fr, centre, inner, CODE["marrow"])


def paint_rod(tissue, fr: Frame, a, b, radius: float, code: int, only=None) -> None:
    """Capsule (segment a-b thickened by radius)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    mid, half = (a + b) / 2, float(np.linalg.norm((b - a)[:2])) / 2 + radius
    box = fr.box(mid[0], mid[1], half, min(a[2], b[2]) - radius, max(a[2], b[2]) + radius)
    if box is None:
        return
    ab = b - a
    px = (fr.x[box[0], box[1]] - a[0])[:, :, None]
    py = (fr.y[box[0], box[1]] - a[1])[:, :, None]
    pz = (fr.z[box[2]] - a[2])[None, None, :]
    h = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0, 1)
    d2 = (px - h * ab[0]) ** 2 + (py - h * ab[1]) ** 2 + (pz - h * ab[2]) ** 2
    paint_mask(tissue, box, d2 <= radius**2, code, only)


def paint_bone_rod(tissue, fr: Frame, a, b, radius: float) -> None:
    """Rod-shaped bone (femoral neck, pubic rami): 2 mm cortex around marrow."""
    paint_rod(tissue, fr, a, b, radius, CODE["cortical_bone"])
    paint_rod(tissue, fr, a, b, radius - 2.0, CODE["marrow"])
