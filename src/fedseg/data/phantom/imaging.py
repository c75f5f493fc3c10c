"""Image formation: from a tissue map to the stored magnitude image, one scanner imperfection at a time.

In :func:`~fedseg.data.phantom.render.render`'s order: partial volume over the
through-slice samples, per-tissue texture, in-plane point-spread function, a
smooth multiplicative bias field, the endorectal coil's receive profile (the
image is then normalised to the gland's sensitivity, so it is dark away from
the coil) and Rician noise.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from fedseg.data.phantom.fields import smooth_field
from fedseg.data.phantom.grid import Acquisition, Frame

__all__ = [
    "COIL_D0_MM", "COIL_FLOOR", "bias_field", "coil_profile", "partial_volume", "point_spread", "rician", "texture",
]

COIL_FLOOR = 0.25  # far-field sensitivity (external array share) relative to the body-coil scale
COIL_D0_MM = 16.0


def partial_volume(tissue: np.ndarray, lut: np.ndarray, n_sub: int) -> np.ndarray:
    """Per-voxel mean of a per-tissue quantity over the through-slice samples."""
    out = lut[tissue[:, :, 0::n_sub]]
    for s in range(1, n_sub):
        out += lut[tissue[:, :, s::n_sub]]
    out *= np.float32(1.0 / n_sub)
    return out


def texture(rng: np.random.Generator, fr: Frame, acq: Acquisition) -> np.ndarray:
    """Fine tissue texture, ~2 mm grain; independent per slice when slices are thick."""
    corr = max(2.0, 1.5 * acq.pixel_mm)
    corr_z = None if acq.slice_mm >= 2 * corr else corr
    coords = [fr.world_x.astype(np.float64), fr.world_y.astype(np.float64), fr.z_centres.astype(np.float64)]
    return np.clip(smooth_field(rng, coords, [corr, corr, corr_z]), -3, 3)


def point_spread(image: np.ndarray, sigma_vox: float) -> None:
    """In-place in-plane Gaussian blur (finite k-space coverage + filtering), slice by slice."""
    if sigma_vox > 0:
        gaussian_filter(image, sigma=(sigma_vox, sigma_vox, 0), output=image, mode="nearest", truncate=3.0)


def bias_field(rng: np.random.Generator, fr: Frame, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth multiplicative bias: in-plane 2-D factor and a slow S-I factor."""
    ix = fr.world_x.astype(np.float64)
    iy = fr.world_y.astype(np.float64)
    plane = smooth_field(rng, [ix, iy], [60.0, 60.0])
    grad = rng.normal(0, 0.5) * (iy[None, :] / 70.0)  # anterior/posterior array asymmetry
    along = smooth_field(rng, [fr.z_centres.astype(np.float64)], [80.0])
    return (np.exp(strength * (plane + grad))).astype(np.float32), np.exp(0.5 * strength * along).astype(np.float32)


def coil_profile(fr: Frame, y_coil: float, z_coil: float, gain: float) -> np.ndarray:
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


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
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
