"""One rendered case (:class:`Phantom`) and :func:`render`, which paints a patient and scans it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.data.phantom import imaging
from fedseg.data.phantom.anatomy import Anatomy
from fedseg.data.phantom.gland import paint_gland
from fedseg.data.phantom.grid import Acquisition, make_frame, warped_frame
from fedseg.data.phantom.pelvis import (
    paint_body,
    paint_coil,
    paint_pelvic_floor,
    paint_pelvic_organs,
    paint_pelvis,
    paint_rectum,
    paint_septa,
)
from fedseg.data.phantom.tissues import CODE, texture_amplitudes, tissue_signal
from fedseg.data.site_profiles import Annotation

__all__ = ["Phantom", "render"]


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

    Deterministic given ``rng``'s state (the order of the draws below is part
    of every seed's output: keep it). Memory is about 6 bytes per voxel times
    the through-slice samples.
    """
    fr = make_frame(anat, acq)
    nx, ny, nz = fr.shape
    tissue = np.zeros((nx, ny, nz * fr.n_sub), np.uint8)
    wf = warped_frame(fr, anat)  # irregular outlines for body, muscles and bones
    paint_body(tissue, wf, anat)
    paint_pelvis(tissue, wf, anat)
    del wf
    paint_septa(tissue, fr, rng)
    paint_pelvic_organs(tissue, fr, anat)
    y_rect = paint_rectum(tissue, fr, anat)
    coil_pos = paint_coil(tissue, fr, anat) if acq.coil else None
    paint_pelvic_floor(tissue, fr, anat, y_rect)
    box, label_sub = paint_gland(tissue, fr, anat, annotation)

    label = np.zeros((nx, ny, nz), np.uint8)
    occupancy = label_sub.reshape(*label_sub.shape[:2], -1, fr.n_sub).mean(axis=3)
    label[box[0], box[1], box[2].start // fr.n_sub : box[2].stop // fr.n_sub] = occupancy >= 0.5

    signal = tissue_signal(acq.tr_ms, acq.te_ms)
    image = imaging.partial_volume(tissue, signal, fr.n_sub)
    amp = imaging.partial_volume(tissue, texture_amplitudes(), fr.n_sub)
    image *= 1 + amp * imaging.texture(rng, fr, acq)
    del amp
    imaging.point_spread(image, acq.psf_sigma_vox)
    plane, along = imaging.bias_field(rng, fr, acq.bias_strength)
    image *= plane[:, :, None]
    image *= along[None, None, :]
    scale = acq.intensity_scale
    if coil_pos is not None:
        profile = imaging.coil_profile(fr, coil_pos[0], coil_pos[1], anat.coil_gain)
        image *= profile
        # scanners normalise coil images to the near field: stored gland ~ as bright as without coil
        near = profile[box[0], box[1], box[2].start // fr.n_sub : box[2].stop // fr.n_sub]
        near = near[label_sub[:, :, fr.n_sub // 2 :: fr.n_sub]]
        scale /= float(np.median(near)) if near.size else float(profile.max())
        del profile
    image = imaging.rician(rng, image, acq.noise_level * float(signal[CODE["fat"]]))
    image *= scale
    centre = tissue[:, :, fr.n_sub // 2 :: fr.n_sub]
    return Phantom(image, label, np.ascontiguousarray(centre), fr.affine, anat)
