"""One patient of the phantom: its random parameters (:class:`Anatomy`) and the gland shape they describe.

Coordinates are mm in a patient frame centred on the gland (x = right,
y = anterior, z = superior). The gland is a rounded inverted cone (wide base
cranially, narrow apex caudally) with random low-order shape harmonics; its
size is scaled so that the gland, capsule excluded, has the drawn volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.data.phantom.tissues import CODE

__all__ = ["Anatomy", "balloon_warp", "draw_gland_volume", "gland_level", "sample_anatomy"]


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


def draw_gland_volume(rng: np.random.Generator, median: float, low: float, high: float) -> float:
    """Log-normal gland volume (mL) with the given median, clipped to [low, high].

    The log-sd puts the farther range end at the 99.5th percentile, i.e. the
    Table 1 range is what ~100 patients would show.
    """
    sigma = max(np.log(high / median), np.log(median / low)) / 2.576
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), low, high))


# ----------------------------------------------------------------------------- sampling


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


def balloon_warp(u: np.ndarray, v: np.ndarray, t: np.ndarray, kappa: float) -> np.ndarray:
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
    vw = balloon_warp(u, v, t, kappa)
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
