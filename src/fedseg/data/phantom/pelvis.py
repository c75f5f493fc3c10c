"""Everything around the gland: body, muscles, fat spaces, bony pelvis, pelvic organs, rectum or coil, septa.

Layout in the gland-centred patient frame (mm): a muscle mass under the
subcutaneous fat with the pelvic cavity, ischioanal fossae, femoral triangles
and natal cleft carved out as fat (leaving obturator internus and gluteus
maximus); pubic symphysis, rami, acetabula, femoral heads, ischia, coccyx,
sacrum; bladder, seminal vesicles, venous plexus; rectum (or an endorectal
balloon that pushes the posterior gland forward); levator ani; fibrous septa
in fat and fat planes between muscles. Body, muscles and bones are painted on
a warped frame (:func:`~fedseg.data.phantom.grid.warped_frame`) by the caller
so their outlines are irregular.
"""

from __future__ import annotations

import numpy as np

from fedseg.data.phantom.anatomy import Anatomy
from fedseg.data.phantom.fields import smooth_field
from fedseg.data.phantom.grid import Frame
from fedseg.data.phantom.paint import paint_bone, paint_bone_rod, paint_ellipsoid, paint_mask, paint_rod
from fedseg.data.phantom.tissues import CODE

__all__ = [
    "paint_body", "paint_coil", "paint_pelvic_floor", "paint_pelvic_organs", "paint_pelvis", "paint_rectum",
    "paint_septa",
]


def _sidewall(anat: Anatomy) -> float:
    """|x| of the obturator internus' inner surface (the fat-filled pelvic cavity is inside)."""
    return max(anat.pelvis_half_width - 30.0, anat.semi_axes[0] + 5.0)


def _superellipse(fr: Frame, cx: float, cy: float, rx: float, ry: float, power: float) -> np.ndarray:
    """In-plane mask of |dx/rx|^p + |dy/ry|^p <= 1 (the same at every z)."""
    return np.abs((fr.x - cx) / rx) ** power + np.abs((fr.y - cy) / ry) ** power <= 1


def paint_body(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
    """Skin outline (superellipse), subcutaneous fat, then a muscle mass filling the rest; air outside."""
    half_w, ant, post = anat.body
    yc, ry = (ant - post) / 2, (ant + post) / 2
    lat, front, back = anat.subcutaneous_fat
    tissue[_superellipse(fr, 0, yc, half_w, ry, 2.5)] = CODE["skin"]
    tissue[_superellipse(fr, 0, yc, half_w - 2.5, ry - 2.5, 2.5)] = CODE["fat"]
    inner_yc = yc + (back - front) / 2
    inner_ry = ry - (front + back) / 2
    tissue[_superellipse(fr, 0, inner_yc, half_w - lat, inner_ry, 2.2)] = CODE["muscle"]


def paint_pelvis(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
    """Fat spaces carved out of the muscle mass, then the bony pelvis.

    Mid-gland axial layout (|x| from the midline): fat-filled pelvic cavity
    inside the sidewall w, obturator internus from w to ~w+21, acetabular
    wall, femoral head; pubic bones and symphysis ``retropubic_gap`` in front
    of the gland; ischioanal fossae (fat) posterolaterally, gluteus maximus
    behind them, natal cleft in the midline.
    """
    a, b, c = anat.semi_axes
    fat = CODE["fat"]
    w = _sidewall(anat)
    yp = b + anat.retropubic_gap  # back of the pubic bones
    y_back = -(b + 2 * anat.rectum[1] + 22.0)  # back of the pelvic cavity (presacral space)
    radius, yh = anat.femoral_head
    hx, zh = w + 21.0 + radius, 0.3 * c + 6.0
    post = anat.body[2]

    # pelvic cavity: box-like, narrowing below the apex (urogenital diaphragm / perineum)
    box = fr.box(0.0, (yp + y_back) / 2, max(w, (yp - y_back) / 2) + 2, -c - 60, 1e4)
    if box is not None:
        x = fr.x[box[0], box[1]][:, :, None]
        y = (fr.y[box[0], box[1]] - (yp + y_back) / 2)[:, :, None]
        z = fr.z[box[2]][None, None, :]
        width = w * np.clip(1 - 0.5 * (-c - z) / 35.0, 0.45, 1.0)
        cavity = np.abs(x / width) ** 3 + np.abs(y / ((yp - y_back) / 2)) ** 3 <= 1
        paint_mask(tissue, box, cavity, fat)
    for s in (-1.0, 1.0):
        paint_ellipsoid(tissue, fr, (s * (w - 2), -(b + 24), -c + 5), (17, 25, c + 32), fat)  # ischioanal fossa
        paint_ellipsoid(tissue, fr, (s * (w + 10), yp + 20, zh), (13, 9, 60), fat)  # femoral triangle
        paint_ellipsoid(tissue, fr, (s * (w + 6), yp + 18, 0), (4, 4, 1e4), CODE["artery"])  # femoral artery
        paint_ellipsoid(tissue, fr, (s * (w + 15), yp + 17, 0), (5, 5, 1e4), CODE["vessel"])  # femoral vein
    ncy = (y_back - 10 - post) / 2
    paint_ellipsoid(tissue, fr, (0, ncy, 0), (7, (post + y_back + 10) / 2 + 5, 1e3), fat)  # natal cleft

    for s in (-1.0, 1.0):
        head = (s * hx, yh, zh)
        keep_medial = (lambda xx, yy, s=s: s * xx < hx - 0.35 * radius)
        paint_ellipsoid(tissue, fr, head, (radius + 7, radius + 7, radius + 7), CODE["cortical_bone"], keep=keep_medial)
        paint_ellipsoid(tissue, fr, head, (radius + 5, radius + 5, radius + 5), CODE["marrow"], keep=keep_medial)
        paint_bone(tissue, fr, (s * (w + 24), yh - 22, -0.6 * c), (8, 14, c + 10))  # ischium body
        paint_bone(tissue, fr, (s * (w + 16), yh - 32, -c - 28), (15, 14, 20))  # ischial tuberosity
        paint_bone(tissue, fr, head, (radius, radius, radius), cortex=1.5)  # femoral head
        paint_bone_rod(tissue, fr, head, (s * (hx + 40), yh + 18, zh - 22), 15.0)  # femoral neck
        paint_bone(tissue, fr, (s * 14, yp + 10, -0.2 * c), (14, 10, 26))  # pubic body
        paint_bone_rod(tissue, fr, (s * 14, yp + 10, 0.2 * c + 12), (s * (w + 22), yh + 12, zh + 8), 9.0)  # sup. ramus
        paint_bone_rod(tissue, fr, (s * 13, yp + 8, -0.2 * c - 20), (s * (w + 14), yh - 30, -c - 30), 7.0)  # inf. ramus
    paint_ellipsoid(tissue, fr, (0, yp + 10, -0.2 * c), (2.5, 9, 24), CODE["cartilage"])  # symphysis disc
    paint_bone(tissue, fr, (0, y_back - 6, c + 10), (9, 7, 30))  # coccyx
    paint_bone(tissue, fr, (0, y_back - 16, c + 70), (45, 14, 40))  # sacrum


def _rectum_centre(z: np.ndarray, y0: float) -> np.ndarray:
    """A-P position of the rectal axis: curves backwards above the gland (sacral curve)."""
    return y0 - 0.25 * np.clip(z, 0, None)


def paint_rectum(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> float:
    """Rectal wall with content and optional gas; returns the axis A-P position."""
    a, b, c = anat.semi_axes
    rx, ry, wall = anat.rectum
    y0 = -(b + 3.0 + ry)
    box = fr.box(0.0, y0 - 8, max(rx, ry + 10) + 2, -1e4, 1e4)
    if box is None:
        return y0
    x = fr.x[box[0], box[1]][:, :, None]
    y = fr.y[box[0], box[1]][:, :, None] - _rectum_centre(fr.z[box[2]], y0)[None, None, :]
    q_out = (x / rx) ** 2 + (y / ry) ** 2
    q_in = (x / (rx - wall)) ** 2 + (y / max(ry - wall, 1.0)) ** 2
    paint_mask(tissue, box, q_out <= 1, CODE["rectal_wall"])
    paint_mask(tissue, box, q_in <= 1, CODE["rectal_content"])
    if anat.rectal_gas:  # gas rises anteriorly in a supine patient
        paint_mask(tissue, box, (q_in <= 1) & (y > 0.2 * ry) & (np.abs(fr.z[box[2]] - c) < 25), CODE["gas"])
    return y0


def paint_coil(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> tuple[float, float]:
    """Endorectal balloon (dark) with a thin stretched rectal wall and the shaft.

    Returns the coil loop's (y, z) position.
    """
    a, b, c = anat.semi_axes
    k = anat.compression
    bx, by, bz = anat.balloon
    zc = -0.1 * c
    y_bal = -(b * (1 - k) / (1 + k) + 2.0 + by)
    paint_ellipsoid(tissue, fr, (0, y_bal, zc), (bx + 1.5, by + 1.5, bz + 1.5), CODE["rectal_wall"])
    paint_ellipsoid(tissue, fr, (0, y_bal, zc), (bx, by, bz), CODE["balloon"])
    paint_rod(tissue, fr, (0, y_bal, zc - bz), (0, y_bal - 8, -400), 7.0, CODE["rectal_wall"])
    paint_rod(tissue, fr, (0, y_bal, zc - bz), (0, y_bal - 8, -400), 5.0, CODE["balloon"])
    return y_bal + 0.4 * by, zc


def paint_pelvic_floor(tissue: np.ndarray, fr: Frame, anat: Anatomy, y_rect: float) -> None:
    """Levator ani: a 4 mm funnel around gland and rectum, over fat only."""
    a, b, c = anat.semi_axes
    zlo, zhi = -c - 20, 0.2 * c
    box = fr.box(0, y_rect / 2, 60, zlo, zhi)
    if box is None:
        return
    frac = np.clip((fr.z[box[2]] - zlo) / (zhi - zlo), 0, 1)[None, None, :]
    ax = anat.rectum[0] + 6 + (_sidewall(anat) - 6 - anat.rectum[0]) * frac
    ay = abs(y_rect) / 2 + anat.rectum[1] + 5 + 6 * frac
    x = fr.x[box[0], box[1]][:, :, None]
    y = fr.y[box[0], box[1]][:, :, None] - y_rect / 2
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    ring = (r >= 1) & (r <= 1 + 5.0 / ay) & (y < b * 0.3 - y_rect / 2)
    paint_mask(tissue, box, ring, CODE["muscle"], only=(CODE["fat"],))


def paint_pelvic_organs(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
    """Bladder, seminal vesicles, periprostatic veins (behind the gland in paint order)."""
    a, b, c = anat.semi_axes
    bx, by, bz = anat.bladder
    bx = min(bx, _sidewall(anat) + 8.0)
    centre = (0.0, 0.25 * b + 4, c + bz - 8)
    paint_ellipsoid(tissue, fr, centre, (bx, by, bz), CODE["bladder_wall"])
    paint_ellipsoid(tissue, fr, centre, (bx - 3, by - 3, bz - 3), CODE["urine"])
    fat = (CODE["fat"],)
    for s in (-1.0, 1.0):
        paint_ellipsoid(tissue, fr, (s * 19, -0.55 * b, c + 4), (15, 5.5, 8), CODE["seminal_vesicle"], fat)
        paint_ellipsoid(tissue, fr, (s * 30, -0.45 * b, c + 9), (9, 6, 7), CODE["seminal_vesicle"], fat)
        # neurovascular bundles, posterolateral
        paint_rod(tissue, fr, (s * 0.8 * a, -0.75 * b, -c), (s * 0.85 * a, -0.8 * b, c + 8), 2.0, CODE["vessel"], fat)
    for x, y, z, r in anat.vessels:  # Santorini plexus in front of the gland
        paint_ellipsoid(tissue, fr, (x, y, z), (r, r, 3 * r), CODE["vessel"], fat)


def paint_septa(tissue: np.ndarray, fr: Frame, rng: np.random.Generator) -> None:
    """Thin fibrous septa in fat and fat planes between muscle bellies.

    Both are narrow bands around the zero level of smooth random fields
    (fine grain for fat septa, coarse for intermuscular planes), mixed slowly
    along S-I so they change from slice to slice.
    """
    coords = [fr.world_x.astype(np.float64), fr.world_y.astype(np.float64)]
    fine = [smooth_field(rng, coords, [7.0, 7.0]) for _ in range(2)]
    coarse = [smooth_field(rng, coords, [24.0, 24.0]) for _ in range(2)]
    fat, muscle, septum = CODE["fat"], CODE["muscle"], CODE["fibrous_septum"]
    z = fr.z_centres.astype(np.float32)
    mix = lambda pair, period: (  # noqa: E731
        pair[0][:, :, None] * np.cos(z / period)[None, None, :] + pair[1][:, :, None] * np.sin(z / period)[None, None, :]
    )
    f, g = mix(fine, 9.0), mix(coarse, 30.0)
    lines = (np.abs(f) < 0.06) & (f + g > -0.6)
    planes = (np.abs(g) < 0.04) & (f > -0.3)
    del f, g
    view = tissue.reshape(*lines.shape, fr.n_sub)
    view[lines[..., None] & (view == fat)] = septum
    view[planes[..., None] & (view == muscle)] = fat
