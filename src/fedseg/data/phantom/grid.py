"""The scan's sampling grid: the protocol (:class:`Acquisition`) and where it samples the patient (:class:`Frame`).

Tissues are painted on a grid with the acquisition's in-plane pixels and
``n_sub`` points through each slice (for partial volume). The grid has L, P, S
axes like scanner NIfTI and is centred near the gland; the patient may be
rotated about z on the table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedseg.data.phantom.anatomy import Anatomy

__all__ = ["Acquisition", "Frame", "make_frame", "through_slice_samples", "warped_frame"]


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
