"""The phantom's tissues: relaxation parameters at 3 T, their codes in the tissue map, and spin-echo signal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CODE", "GLAND_CODES", "TISSUES", "Tissue", "texture_amplitudes", "tissue_signal"]


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


def texture_amplitudes() -> np.ndarray:
    """Texture amplitude of every tissue (index = code), float32."""
    return np.array([t.texture for t in TISSUES], np.float32)
