"""Analytic T2-weighted male pelvis phantom, evaluated on an acquisition grid.

Pure numpy/scipy, no file I/O. One call of :func:`render` turns a patient
(:class:`Anatomy`, drawn by :func:`sample_anatomy`) and a scan
(:class:`Acquisition`) into an image, a gland label and the affine.

Model, in a patient frame centred on the gland (mm, x = right, y = anterior,
z = superior; the patient may be rotated about z on the table):

* tissues are painted as a uint8 map on a grid that has the acquisition's
  in-plane pixels and ``n_sub`` points through each slice; each voxel's
  signal is the mean over its through-slice points (partial volume);
* signal per tissue from the spin-echo equation
  ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (3 T values in :data:`TISSUES`),
  so a site's TR/TE changes contrast;
* then per-tissue texture (smooth random field), an in-plane Gaussian
  point-spread function, a smooth multiplicative bias field, the endorectal
  coil receive profile (image normalised to the gland's sensitivity, so it is
  dark away from the coil), Rician noise.

The gland is a rounded inverted cone (wide base cranially, narrow apex
caudally) with random low-order shape harmonics; inside: bright peripheral
zone, darker transition zone that grows with gland volume and carries BPH
nodules, central zone at the base, dark anterior fibromuscular stroma,
urethra and a thin dark capsule. Around it: bladder, seminal vesicles,
rectum (or an endorectal balloon that pushes the posterior gland forward),
levator ani; a muscle mass under the subcutaneous fat with the pelvic
cavity, ischioanal fossae, femoral triangles and natal cleft carved out as
fat (leaving obturator internus and gluteus maximus), pubic symphysis, rami,
acetabula, femoral heads, ischia, coccyx, sacrum; fibrous septa in fat and
fat planes between muscles; skin and air. Body, muscles and bones are
painted on a smoothly warped grid so their outlines are irregular.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter

from fedseg.data.site_profiles import Annotation

# ----------------------------------------------------------------------------- tissues


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters at 3 T (ms), relative proton density, texture amplitude."""

    name: str
    pd: float
    t1: float
    t2: float
    texture: float


# Order defines the codes in the tissue map. T2 of fat and muscle are
# *effective* fast-spin-echo values (J-coupling keeps fat bright; stimulated
# echoes lengthen muscle T2), see docs/sites.md for sources.
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0.0, 1000, 1, 0.0),
    Tissue("skin", 0.7, 1200, 40, 0.05),
    Tissue("fat", 0.9, 380, 190, 0.06),
    Tissue("muscle", 0.75, 1420, 55, 0.08),
    Tissue("cortical_bone", 0.05, 1000, 5, 0.0),
    Tissue("marrow", 0.8, 550, 110, 0.10),
    Tissue("cartilage", 0.7, 1200, 40, 0.05),
    Tissue("bladder_wall", 0.75, 1500, 55, 0.05),
    Tissue("urine", 1.0, 3000, 1500, 0.01),
    Tissue("rectal_wall", 0.75, 1500, 55, 0.08),
    Tissue("rectal_content", 0.6, 1200, 80, 0.30),
    Tissue("gas", 0.0, 1000, 1, 0.0),
    Tissue("balloon", 0.0, 1000, 1, 0.0),
    Tissue("vessel", 0.9, 1900, 250, 0.05),
    Tissue("seminal_vesicle", 0.9, 2000, 220, 0.25),
    Tissue("capsule", 0.7, 1400, 45, 0.04),
    Tissue("peripheral_zone", 0.85, 1700, 160, 0.10),
    Tissue("transition_zone", 0.8, 1600, 90, 0.18),
    Tissue("central_zone", 0.8, 1600, 70, 0.10),
    Tissue("fibromuscular_stroma", 0.7, 1400, 50, 0.06),
    Tissue("bph_glandular", 0.85, 1900, 180, 0.20),
    Tissue("bph_stromal", 0.75, 1500, 60, 0.12),
    Tissue("urethra", 0.75, 1500, 60, 0.05),
    Tissue("fibrous_septum", 0.6, 1100, 35, 0.05),
    Tissue("artery", 0.05, 1000, 5, 0.0),
)
CODE: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}
GLAND_CODES: tuple[int, ...] = tuple(
    CODE[n]
    for n in (
        "peripheral_zone",
        "transition_zone",
        "central_zone",
        "fibromuscular_stroma",
        "bph_glandular",
        "bph_stromal",
        "urethra",
    )
)


def tissue_signal(tr_ms: float, te_ms: float) -> np.ndarray:
    """Spin-echo signal of every tissue (index = code) for one TR/TE, float32."""
    pd = np.array([t.pd for t in TISSUES])
    t1 = np.array([t.t1 for t in TISSUES])
    t2 = np.array([t.t2 for t in TISSUES])
    return (pd * (1 - np.exp(-tr_ms / t1)) * np.exp(-te_ms / t2)).astype(np.float32)


def draw_gland_volume(rng: np.random.Generator, median: float, low: float, high: float) -> float:
    """Log-normal gland volume (mL) with the given median, clipped to [low, high].

    The log-sd puts the farther range end at the 99.5th percentile, i.e. the
    Table 1 range is what ~100 patients would show.
    """
    sigma = max(np.log(high / median), np.log(median / low)) / 2.576
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), low, high))


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Acquisition:
    """One scan: grid, contrast and scanner imperfections (see SiteProfile)."""

    pixel_mm: float
    slice_mm: float
    tr_ms: float
    te_ms: float
    fov_mm: float
    si_coverage_mm: float
    coil: bool
    noise_level: float
    bias_strength: float
    intensity_scale: float
    psf_sigma_vox: float = 0.6  # in-plane Gaussian point-spread function (voxels)


@dataclass(frozen=True)
class Anatomy:
    """One patient's random parameters (mm, gland-centred patient frame)."""

    gland_volume_ml: float
    semi_axes: tuple[float, float, float]  # gland half-widths L-R, A-P, S-I
    harmonics: tuple[tuple[float, float, float], ...]  # (order, amplitude, phase) at mid, slope over t
    harmonics_slope: tuple[tuple[float, float, float], ...]
    taper: float  # how much wider the base is than the apex
    anterior_narrowing: float
    tz_fraction: float  # 0 small gland .. 1 large BPH gland
    nodules: tuple[tuple[float, float, float, float, int], ...]  # u, v, t, radius, tissue code
    compression: float  # kappa of the endorectal balloon indentation (0 without coil)
    rotation_deg: float
    gland_ras: tuple[float, float, float]  # gland centre in scanner RAS coordinates
    fov_offset: tuple[float, float, float]  # FOV centre minus gland centre
    body: tuple[float, float, float]  # half-width, anterior and posterior skin distance
    pelvis_half_width: float  # sets the pelvic sidewall (obturator internus inner surface)
    retropubic_gap: float  # gland front to the posterior surface of the pubic bones
    subcutaneous_fat: tuple[float, float, float]  # thickness lateral, anterior, posterior
    femoral_head: tuple[float, float]  # radius, A-P position of the centre
    bladder: tuple[float, float, float]  # semi-axes
    rectum: tuple[float, float, float]  # semi-axes L-R, A-P outer, wall thickness
    rectal_gas: bool
    balloon: tuple[float, float, float]  # semi-axes
    coil_gain: float
    vessels: tuple[tuple[float, float, float, float], ...]  # x, y, z, radius of venous plexus dots
    warp: tuple[tuple[float, float, float, float, float], ...]  # kx, ky (rad/mm), phase, amp x, amp y (mm)


def _sample_shape(rng: np.random.Generator) -> dict:
    """Gland shape coefficients (normalised units)."""
    orders = (2.0, 3.0, 4.0)
    mid = tuple((k, float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 2 * np.pi))) for k in orders)
    slope = tuple((k, float(rng.uniform(0.0, 0.04)), float(rng.uniform(0, 2 * np.pi))) for k in orders)
    return {
        "harmonics": mid,
        "harmonics_slope": slope,
        "taper": float(rng.uniform(0.2, 0.35)),
        "anterior_narrowing": float(rng.uniform(0.15, 0.35)),
    }


def _sample_nodules(rng: np.random.Generator, volume_ml: float, tz: float) -> tuple:
    """BPH nodules inside the transition zone; more of them in larger glands."""
    count = int(rng.poisson(np.clip((volume_ml - 25.0) / 12.0, 0.3, 12.0)))
    nodules = []
    for _ in range(count):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        pos = direction * rng.uniform(0, 0.55) * np.array([0.6, 0.45, 0.6]) * (0.7 + 0.4 * tz)
        code = CODE["bph_glandular"] if rng.random() < 0.5 else CODE["bph_stromal"]
        radius = float(rng.uniform(0.1, 0.16 + 0.14 * tz))
        nodules.append((float(pos[0]), float(pos[1] + 0.15), float(pos[2] + 0.1), radius, code))
    return tuple(nodules)


def sample_anatomy(rng: np.random.Generator, gland_volume_ml: float, coil: bool) -> Anatomy:
    """Draw one patient whose gland (capsule excluded) has ``gland_volume_ml``."""
    shape = _sample_shape(rng)
    ratios = np.array([1.35, 1.0, 1.15]) * rng.uniform(0.9, 1.1, 3)
    tz = float(np.clip(np.log(gland_volume_ml / 20.0) / np.log(8.0), 0.0, 1.0))
    compression = float(rng.uniform(0.2, 0.3)) if coil else 0.0
    unit = _unit_volume(shape, compression)
    scale = (gland_volume_ml * 1000.0 / (np.prod(ratios) * unit)) ** (1 / 3)
    semi = tuple(float(r * scale) for r in ratios)
    gap = float(rng.uniform(14, 24))
    vessels = tuple(
        (float(rng.uniform(-0.7, 0.7) * semi[0]), float(semi[1] + rng.uniform(2, gap - 3)),
         float(rng.uniform(-0.9, 0.9) * semi[2]), float(rng.uniform(0.8, 2.5)))
        for _ in range(int(rng.integers(5, 13)))
    )
    warp = []
    for _ in range(6):  # smooth random displacement of the painting coordinates, ~3 mm
        wavelength, angle = rng.uniform(45, 130), rng.uniform(0, np.pi)
        k = 2 * np.pi / wavelength
        warp.append((float(k * np.cos(angle)), float(k * np.sin(angle)), float(rng.uniform(0, 2 * np.pi)),
                     float(rng.normal(0, 1.4)), float(rng.normal(0, 1.4))))
    return Anatomy(
        gland_volume_ml=float(gland_volume_ml),
        semi_axes=semi,  # type: ignore[arg-type]
        tz_fraction=tz,
        nodules=_sample_nodules(rng, gland_volume_ml, tz),
        compression=compression,
        rotation_deg=float(rng.uniform(-6, 6)),
        gland_ras=(float(rng.normal(0, 8)), float(rng.normal(-15, 10)), float(rng.normal(-40, 15))),
        fov_offset=tuple(float(v) for v in rng.uniform(-5, 5, 3)),  # type: ignore[arg-type]
        body=(float(rng.uniform(150, 195)), float(rng.uniform(62, 105)), float(rng.uniform(85, 130))),
        pelvis_half_width=float(rng.uniform(58, 68)),
        retropubic_gap=gap,
        subcutaneous_fat=(float(rng.uniform(12, 30)), float(rng.uniform(15, 40)), float(rng.uniform(15, 35))),
        femoral_head=(float(rng.uniform(20, 25)), float(rng.uniform(-2, 8))),
        bladder=(float(rng.uniform(32, 50)), float(rng.uniform(25, 38)), float(rng.uniform(22, 38))),
        rectum=(float(rng.uniform(14, 20)), float(rng.uniform(8, 13)), float(rng.uniform(2.5, 3.5))),
        rectal_gas=bool(rng.random() < 0.4),
        balloon=(float(rng.uniform(26, 32)), float(rng.uniform(18, 23)), float(rng.uniform(26, 32))),
        coil_gain=float(rng.uniform(14.0, 24.0)),
        vessels=vessels,
        warp=tuple(warp),
        **shape,
    )


# ----------------------------------------------------------------------------- gland shape


def _profile(t: np.ndarray, taper: float) -> np.ndarray:
    """In-plane gland radius along the S-I axis: flat broad base, pointed apex."""
    e = np.where(t > 0, 3.0, 2.0)
    core = np.clip(1 - np.abs(t) ** e, 0, None) ** (1 / e)
    return core * (1 + taper * t)


def _warp(u: np.ndarray, v: np.ndarray, t: np.ndarray, kappa: float) -> np.ndarray:
    """A-P sampling coordinate after the balloon pushed the posterior gland forward.

    Tissue that sat at v now appears at a more anterior position: the
    posterior surface moves forward by up to ~2*kappa/(1+kappa) (normalised),
    the anterior surface (v = 1) stays.
    """
    if kappa <= 0:
        return v
    g = np.exp(-0.5 * (u / 0.75) ** 2) * np.exp(-0.5 * ((t + 0.1) / 0.7) ** 2)
    return v + kappa * g * (v - 1)


def gland_level(u: np.ndarray, v: np.ndarray, t: np.ndarray, shape: Anatomy | dict, kappa: float) -> np.ndarray:
    """Normalised level set of the gland: < 0 inside, ~distance/semi-axis outside.

    ``u, v, t`` are coordinates divided by the semi-axes (broadcastable; u and
    v may be 2-D and t 1-D, which keeps the angular terms cheap).
    """
    get = shape.get if isinstance(shape, dict) else lambda k: getattr(shape, k)
    theta = np.arctan2(v, u)
    vw = _warp(u, v, t, kappa)
    uu = np.abs(u) * (1 + get("anterior_narrowing") * np.clip(vw, 0, None))
    # flatter posterior surface: superellipse power 3 behind the centre
    rho = np.where(vw < 0, np.cbrt(uu**3 + np.abs(vw) ** 3), np.hypot(uu, vw))
    pert0 = sum(a * np.cos(k * theta + p) for k, a, p in get("harmonics"))
    pert1 = sum(a * np.cos(k * theta + p) for k, a, p in get("harmonics_slope"))
    return rho / (1 + pert0 + t * pert1) - _profile(t, get("taper"))


def _unit_volume(shape: dict, kappa: float, step: float = 0.04) -> float:
    """Volume of the gland with unit semi-axes (normalised units cubed)."""
    axis = np.arange(-1.7, 1.7, step, dtype=np.float32) + step / 2
    u, v, t = axis[:, None, None], axis[None, :, None], axis[None, None, :]
    inside = gland_level(u, v, t, shape, kappa) < 0
    return float(inside.sum()) * step**3


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Frame:
    """Sample positions in the patient frame.

    x, y: (nx, ny) in-plane coordinates of each pixel; z: (nz * n_sub,)
    through-slice sample positions, n_sub consecutive ones per slice.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    n_sub: int
    shape: tuple[int, int, int]
    affine: np.ndarray
    world_x: np.ndarray  # (nx,) unrotated R offset of column i from the gland centre
    world_y: np.ndarray  # (ny,)
    cos: float
    sin: float
    pad: float = 0.0  # largest displacement of x, y from the true positions (warped frames)

    @property
    def z_centres(self) -> np.ndarray:
        return self.z.reshape(-1, self.n_sub).mean(axis=1)

    def box(self, cx: float, cy: float, r: float, zlo: float, zhi: float, whole_slices: bool = False):
        """Index slices covering a disc of radius r at (cx, cy) and z in [zlo, zhi]; None if empty."""
        wx = self.cos * cx + self.sin * cy
        wy = -self.sin * cx + self.cos * cy
        r = r + self.pad
        si = _axis_range(self.world_x, wx, r)
        sj = _axis_range(self.world_y, wy, r)
        k0, k1 = int(np.searchsorted(self.z, zlo, "left")), int(np.searchsorted(self.z, zhi, "right"))
        if whole_slices:
            k0, k1 = (k0 // self.n_sub) * self.n_sub, -(-k1 // self.n_sub) * self.n_sub
        if si is None or sj is None or k1 <= k0:
            return None
        return si, sj, slice(k0, k1)


def _axis_range(coords: np.ndarray, centre: float, r: float) -> slice | None:
    """Index range of a monotone 1-D coordinate array within centre +- r."""
    step = coords[1] - coords[0]
    a = (centre - r - coords[0]) / step
    b = (centre + r - coords[0]) / step
    lo, hi = int(np.floor(min(a, b))), int(np.ceil(max(a, b))) + 1
    lo, hi = max(lo, 0), min(hi, coords.size)
    return slice(lo, hi) if hi > lo else None


def through_slice_samples(slice_mm: float) -> int:
    """Points per slice for partial volume: about one per 1.2 mm, 2 to 5."""
    return int(min(5, max(2, np.ceil(slice_mm / 1.2))))


def make_frame(anatomy: Anatomy, acq: Acquisition) -> Frame:
    """Axial grid with L, P, S axes (like scanner NIfTI), centred near the gland."""
    n = max(16, int(round(acq.fov_mm / acq.pixel_mm)))
    length = max(acq.si_coverage_mm, 2 * anatomy.semi_axes[2] + 30.0)
    nz = max(4, int(np.ceil(length / acq.slice_mm)))
    d, dz = acq.pixel_mm, acq.slice_mm
    centre = np.add(anatomy.gland_ras, anatomy.fov_offset)
    affine = np.diag([-d, -d, dz, 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ np.array([(n - 1) / 2, (n - 1) / 2, (nz - 1) / 2])
    gland = np.asarray(anatomy.gland_ras)
    world_x = (affine[0, 3] - d * np.arange(n) - gland[0]).astype(np.float32)
    world_y = (affine[1, 3] - d * np.arange(n) - gland[1]).astype(np.float32)
    n_sub = through_slice_samples(dz)
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * dz
    z = (affine[2, 3] + dz * np.arange(nz)[:, None] + offsets[None, :] - gland[2]).ravel().astype(np.float32)
    angle = np.deg2rad(anatomy.rotation_deg)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    x2 = c * world_x[:, None] - s * world_y[None, :]
    y2 = s * world_x[:, None] + c * world_y[None, :]
    return Frame(x2, y2, z, n_sub, (n, n, nz), affine, world_x, world_y, c, s)


# ----------------------------------------------------------------------------- painting


def _paint(tissue: np.ndarray, box, mask: np.ndarray, code: int, only: tuple[int, ...] | None = None) -> None:
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
    _paint(tissue, box, q2[:, :, None] + qz[None, None, :] <= 1, code, only)


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
    _paint(tissue, box, d2 <= radius**2, code, only)


def paint_bone_rod(tissue, fr: Frame, a, b, radius: float) -> None:
    paint_rod(tissue, fr, a, b, radius, CODE["cortical_bone"])
    paint_rod(tissue, fr, a, b, radius - 2.0, CODE["marrow"])


def _sidewall(anat: Anatomy) -> float:
    """|x| of the obturator internus' inner surface (the fat-filled pelvic cavity is inside)."""
    return max(anat.pelvis_half_width - 30.0, anat.semi_axes[0] + 5.0)


def warped_frame(fr: Frame, anat: Anatomy) -> Frame:
    """The frame with smoothly displaced x, y (a few mm) so that solids painted on it are irregular."""
    dx = np.zeros_like(fr.x)
    dy = np.zeros_like(fr.y)
    for kx, ky, phase, ax, ay in anat.warp:
        wave = np.cos(kx * fr.x + ky * fr.y + phase)
        dx += ax * wave
        dy += ay * wave
    pad = float(max(np.abs(dx).max(), np.abs(dy).max()))
    return replace(fr, x=fr.x + dx, y=fr.y + dy, pad=pad)


def _superellipse(fr: Frame, cx: float, cy: float, rx: float, ry: float, power: float) -> np.ndarray:
    return np.abs((fr.x - cx) / rx) ** power + np.abs((fr.y - cy) / ry) ** power <= 1


def _paint_body(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
    """Skin outline (superellipse), subcutaneous fat, then a muscle mass filling the rest; air outside."""
    half_w, ant, post = anat.body
    yc, ry = (ant - post) / 2, (ant + post) / 2
    lat, front, back = anat.subcutaneous_fat
    tissue[_superellipse(fr, 0, yc, half_w, ry, 2.5)] = CODE["skin"]
    tissue[_superellipse(fr, 0, yc, half_w - 2.5, ry - 2.5, 2.5)] = CODE["fat"]
    inner_yc = yc + (back - front) / 2
    inner_ry = ry - (front + back) / 2
    tissue[_superellipse(fr, 0, inner_yc, half_w - lat, inner_ry, 2.2)] = CODE["muscle"]


def _paint_pelvis(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
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
        _paint(tissue, box, cavity, fat)
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


def _paint_rectum(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> float:
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
    _paint(tissue, box, q_out <= 1, CODE["rectal_wall"])
    _paint(tissue, box, q_in <= 1, CODE["rectal_content"])
    if anat.rectal_gas:  # gas rises anteriorly in a supine patient
        _paint(tissue, box, (q_in <= 1) & (y > 0.2 * ry) & (np.abs(fr.z[box[2]] - c) < 25), CODE["gas"])
    return y0


def _paint_coil(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> tuple[float, float]:
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


def _paint_pelvic_floor(tissue: np.ndarray, fr: Frame, anat: Anatomy, y_rect: float) -> None:
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
    _paint(tissue, box, ring, CODE["muscle"], only=(CODE["fat"],))


def _paint_pelvic_organs(tissue: np.ndarray, fr: Frame, anat: Anatomy) -> None:
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


# ----------------------------------------------------------------------------- gland


def _gland_coords(fr: Frame, anat: Anatomy, margin: float):
    """Box around the gland (whole slices) and normalised u, v (2-D) and t (1-D)."""
    a, b, c = anat.semi_axes
    box = fr.box(0.0, 0.0, 1.4 * max(a, b) + margin, -c - margin, c + margin, whole_slices=True)
    u = fr.x[box[0], box[1]][:, :, None] / a
    v = fr.y[box[0], box[1]][:, :, None] / b
    t = (fr.z[box[2]] / c)[None, None, :]
    return box, u, v, t


def _paint_gland(tissue: np.ndarray, fr: Frame, anat: Anatomy, annotation: Annotation) -> tuple:
    """Gland zones, capsule; returns (box, label sub-samples) for the site's convention."""
    a, b, c = anat.semi_axes
    mean_r = (a + b) / 2
    box, u, v, t = _gland_coords(fr, anat, margin=4.0)
    level = gland_level(u, v, t, anat, anat.compression)
    vw = _warp(u, v, t, anat.compression)
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


# ----------------------------------------------------------------------------- image formation


def smooth_field(rng: np.random.Generator, coords: list[np.ndarray], corr_mm: list[float | None]) -> np.ndarray:
    """Unit-variance Gaussian random field on a separable grid (float32).

    Built as a tensor product of Gaussian radial basis functions spaced one
    correlation length apart with iid weights, so cost is a few matrix
    products instead of a 3-D convolution. ``corr_mm[i] = None`` makes the
    field independent along axis i.
    """
    mats = []
    for x, corr in zip(coords, corr_mm):
        if corr is None:
            mats.append(None)
            continue
        centres = np.arange(x.min() - 2 * corr, x.max() + 2 * corr + corr, corr)
        w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (0.7 * corr)) ** 2)
        mats.append((w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32))
    sizes = [x.size if m is None else m.shape[1] for x, m in zip(coords, mats)]
    field = rng.standard_normal(sizes, dtype=np.float32)
    for axis, m in enumerate(mats):
        if m is not None:
            field = np.moveaxis(np.tensordot(m, field, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(field)


def _partial_volume(tissue: np.ndarray, lut: np.ndarray, n_sub: int) -> np.ndarray:
    """Per-voxel mean of a per-tissue quantity over the through-slice samples."""
    out = lut[tissue[:, :, 0::n_sub]]
    for s in range(1, n_sub):
        out += lut[tissue[:, :, s::n_sub]]
    out *= np.float32(1.0 / n_sub)
    return out


COIL_FLOOR = 0.25  # far-field sensitivity (external array share) relative to the body-coil scale
COIL_D0_MM = 16.0


def _coil_profile(fr: Frame, y_coil: float, z_coil: float, gain: float) -> np.ndarray:
    """Receive sensitivity of the endorectal loop: floor + gain / (1 + (d/d0)^2)^1.5.

    Steep near-field fall-off (roughly a small loop's): about 10x from the
    posterior gland to the pelvic sidewall, so the image is dark away from the coil.
    """
    d2_plane = (fr.x**2 + (fr.y - y_coil) ** 2) / COIL_D0_MM**2
    dz = np.clip(np.abs(fr.z_centres - z_coil) - 20.0, 0, None) / COIL_D0_MM
    q = 1 + d2_plane[:, :, None] + (dz**2)[None, None, :]
    q = q * np.sqrt(q)
    np.divide(np.float32(gain), q, out=q)
    q += np.float32(COIL_FLOOR)
    return q.astype(np.float32, copy=False)


def _point_spread(image: np.ndarray, sigma_vox: float) -> None:
    """In-place in-plane Gaussian blur (finite k-space coverage + filtering), slice by slice."""
    if sigma_vox > 0:
        gaussian_filter(image, sigma=(sigma_vox, sigma_vox, 0), output=image, mode="nearest", truncate=3.0)


def _paint_septa(tissue: np.ndarray, fr: Frame, acq: Acquisition, rng: np.random.Generator) -> None:
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


def _bias_field(rng: np.random.Generator, fr: Frame, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth multiplicative bias: in-plane 2-D factor and a slow S-I factor."""
    ix = fr.world_x.astype(np.float64)
    iy = fr.world_y.astype(np.float64)
    plane = smooth_field(rng, [ix, iy], [60.0, 60.0])
    grad = rng.normal(0, 0.5) * (iy[None, :] / 70.0)  # anterior/posterior array asymmetry
    along = smooth_field(rng, [fr.z_centres.astype(np.float64)], [80.0])
    return (np.exp(strength * (plane + grad))).astype(np.float32), np.exp(0.5 * strength * along).astype(np.float32)


@dataclass(frozen=True)
class Phantom:
    """A rendered case.

    image: float32 magnitude in stored units (vendor-scaled, not rounded).
    label: uint8 {0, 1}, the gland per the site's annotation convention.
    tissue: uint8 tissue code at each slice's centre (for tests and QA).
    affine: voxel to RAS+ mm, axes L, P, S.
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    anatomy: Anatomy


def render(anat: Anatomy, acq: Acquisition, annotation: Annotation, rng: np.random.Generator) -> Phantom:
    """Image, label and affine of one patient scanned with one protocol.

    Deterministic given ``rng``'s state. Memory is about 6 bytes per voxel
    times the through-slice samples.
    """
    fr = make_frame(anat, acq)
    nx, ny, nz = fr.shape
    tissue = np.zeros((nx, ny, nz * fr.n_sub), np.uint8)
    wf = warped_frame(fr, anat)  # irregular outlines for body, muscles and bones
    _paint_body(tissue, wf, anat)
    _paint_pelvis(tissue, wf, anat)
    del wf
    _paint_septa(tissue, fr, acq, rng)
    _paint_pelvic_organs(tissue, fr, anat)
    y_rect = _paint_rectum(tissue, fr, anat)
    coil_pos = _paint_coil(tissue, fr, anat) if acq.coil else None
    _paint_pelvic_floor(tissue, fr, anat, y_rect)
    box, label_sub = _paint_gland(tissue, fr, anat, annotation)

    label = np.zeros((nx, ny, nz), np.uint8)
    occupancy = label_sub.reshape(*label_sub.shape[:2], -1, fr.n_sub).mean(axis=3)
    label[box[0], box[1], box[2].start // fr.n_sub : box[2].stop // fr.n_sub] = occupancy >= 0.5

    signal = tissue_signal(acq.tr_ms, acq.te_ms)
    image = _partial_volume(tissue, signal, fr.n_sub)
    amp = _partial_volume(tissue, np.array([t.texture for t in TISSUES], np.float32), fr.n_sub)
    image *= 1 + amp * _texture(rng, fr, acq)
    del amp
    _point_spread(image, acq.psf_sigma_vox)
    plane, along = _bias_field(rng, fr, acq.bias_strength)
    image *= plane[:, :, None]
    image *= along[None, None, :]
    scale = acq.intensity_scale
    if coil_pos is not None:
        profile = _coil_profile(fr, coil_pos[0], coil_pos[1], anat.coil_gain)
        image *= profile
        # scanners normalise coil images to the near field: stored gland ~ as bright as without coil
        near = profile[box[0], box[1], box[2].start // fr.n_sub : box[2].stop // fr.n_sub]
        near = near[label_sub[:, :, fr.n_sub // 2 :: fr.n_sub]]
        scale /= float(np.median(near)) if near.size else float(profile.max())
        del profile
    image = _rician(rng, image, acq.noise_level * float(signal[CODE["fat"]]))
    image *= scale
    centre = tissue[:, :, fr.n_sub // 2 :: fr.n_sub]
    return Phantom(image, label, np.ascontiguousarray(centre), fr.affine, anat)


def _texture(rng: np.random.Generator, fr: Frame, acq: Acquisition) -> np.ndarray:
    """Fine tissue texture, ~2 mm grain; independent per slice when slices are thick."""
    corr = max(2.0, 1.5 * acq.pixel_mm)
    corr_z = None if acq.slice_mm >= 2 * corr else corr
    coords = [fr.world_x.astype(np.float64), fr.world_y.astype(np.float64), fr.z_centres.astype(np.float64)]
    return np.clip(smooth_field(rng, coords, [corr, corr, corr_z]), -3, 3)


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (float32, in place where possible)."""
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= sigma
    real += image
    np.square(real, out=real)
    imag = rng.standard_normal(image.shape, dtype=np.float32)
    imag *= sigma
    np.square(imag, out=imag)
    real += imag
    return np.sqrt(real, out=real)
