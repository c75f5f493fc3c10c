"""Smooth Gaussian random fields: the phantom's texture, bias field and fibrous septa all start from one."""

from __future__ import annotations

import numpy as np

__all__ = ["smooth_field"]


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
