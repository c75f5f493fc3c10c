"""The gland in the tissue map: capsule, zones, BPH nodules, urethra, and the label a site's annotators would draw.

Inside the gland: bright peripheral zone, darker transition zone that grows
with gland volume and carries BPH nodules, central zone at the base, dark
anterior fibromuscular stroma, urethra and a thin dark capsule. The label
follows the site's :class:`~fedseg.data.site_profiles.Annotation` (margin
around the capsule, trimmed ends).
"""

from __future__ import annotations

import numpy as np

from fedseg.data.phantom.anatomy import Anatomy, balloon_warp, gland_level
from fedseg.data.phantom.grid import Frame
from fedseg.data.phantom.tissues import CODE
from fedseg.data.site_profiles import Annotation

__all__ = ["paint_gland"]


def _gland_coords(fr: Frame, anat: Anatomy, margin: float):
    """Box around the gland (whole slices) and normalised u, v (2-D) and t (1-D)."""
    a, b, c = anat.semi_axes
    box = fr.box(0.0, 0.0, 1.4 * max(a, b) + margin, -c - margin, c + margin, whole_slices=True)
    u = fr.x[box[0], box[1]][:, :, None] / a
    v = fr.y[box[0], box[1]][:, :, None] / b
    t = (fr.z[box[2]] / c)[None, None, :]
    return box, u, v, t


def paint_gland(tissue: np.ndarray, fr: Frame, anat: Anatomy, annotation: Annotation) -> tuple:
    """Gland zones, capsule; returns (box, label sub-samples) for the site's convention."""
    a, b, c = anat.semi_axes
    mean_r = (a + b) / 2
    box, u, v, t = _gland_coords(fr, anat, margin=4.0)
    level = gland_level(u, v, t, anat, anat.compression)
    vw = balloon_warp(u, v, t, anat.compression)
    sub = tissue[box]
    sub[level < 1.0 / mean_r] = CODE["capsule"]  # ~1 mm dark rim
    inside = level < 0
    sub[inside] = CODE["peripheral_zone"]
    _paint_zones(sub, inside, u, vw, t, anat)
    label = level < annotation.capsule_margin_mm / mean_r
    if annotation.trim_ends_mm > 0:
        label = _trim_ends(label, fr.z[box[2]], annotation.trim_ends_mm)
    return box, label


def _paint_zones(sub: np.ndarray, inside: np.ndarray, u, v, t, anat: Anatomy) -> None:
    """Central zone, transition zone + nodules, stroma and urethra inside the gland."""
    tz = anat.tz_fraction
    cz = ((u / 0.4) ** 2 + ((v + 0.3) / 0.35) ** 2 < (t - 0.25) / 0.75) & inside
    sub[cz] = CODE["central_zone"]
    ru, rv, rt = 0.45 + 0.4 * tz, 0.38 + 0.37 * tz, 0.5 + 0.35 * tz
    tz_mask = ((u / ru) ** 2 + ((v - 0.2) / rv) ** 2 + ((t - 0.15) / rt) ** 2 < 1) & inside
    sub[tz_mask] = CODE["transition_zone"]
    for nu, nv, nt, r, code in anat.nodules:
        nod = ((u - nu) ** 2 + (v - nv) ** 2 + (t - nt) ** 2 < r * r) & tz_mask
        sub[nod] = code
    afms = (v > 0.62 + 0.5 * u**2 - 0.1 * tz) & inside
    sub[afms] = CODE["fibromuscular_stroma"]
    ur = 2.5 / anat.semi_axes[0]
    urethra = ((u / ur) ** 2 + ((v - 0.15 * (1 - t)) * anat.semi_axes[1] / anat.semi_axes[0] / ur) ** 2 < 1) & inside
    sub[urethra] = CODE["urethra"]


def _trim_ends(label: np.ndarray, z: np.ndarray, trim_mm: float) -> np.ndarray:
    """Drop labelled samples within trim_mm of the most caudal and cranial labelled sample."""
    rows = np.flatnonzero(label.any(axis=(0, 1)))
    if rows.size == 0:
        return label
    keep = (z >= z[rows[0]] + trim_mm) & (z <= z[rows[-1]] - trim_mm)
    return label & keep[None, None, :]
