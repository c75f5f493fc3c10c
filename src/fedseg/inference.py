"""Prediction with a model directory: the mean of the fold models' probabilities.

As in the paper, an ensemble outputs the mean of its five sub-models. Each
input is preprocessed exactly as in training (``model.json`` says how), the
foreground probability is computed by sliding window on the prepared grid,
mapped back onto the input's ORIGINAL grid by linear interpolation and
thresholded at 0.5 there, so the mask lies over the input image in any
viewer (3D Slicer, ITK-SNAP). Models that say so in ``model.json``
(``inference.keep_largest_component``, every model trained since fedseg
0.1's study step) then keep only the largest connected component: the gland
is one organ, and scattered false positives far from it are the typical
failure on scans from another site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from fedseg.data.preprocess import PrepareConfig, preprocess_case, resample_to_grid
from fedseg.data.volume import Volume
from fedseg.errors import FedsegError
from fedseg.modeldir import MODEL_JSON, read_model_record
from fedseg.models import build_model, sliding_window_logits
from fedseg.training.checkpoint import load_weights
from fedseg.training.device import Hardware

CPU = Hardware(torch.device("cpu"))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself when empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@dataclass
class Ensemble:
    """Fold models of one model directory and how to apply them."""

    models: list[nn.Module]
    prepare: PrepareConfig
    patch: tuple[int, int, int]
    sw_batch_size: int
    sw_overlap: float
    record: dict[str, Any]  # model.json's content
    keep_largest_component: bool = False
    hardware: Hardware = CPU

    @classmethod
    def load(cls, model_dir: Path, folds: list[int] | None = None, hardware: Hardware = CPU) -> Ensemble:
        """Load ``model.json`` and the fold weights it lists (all, or ``folds``), onto ``hardware``'s device.

        Raises:
            FedsegError: missing/invalid model.json, no trained fold, weights that do not fit.
        """
        model_dir = Path(model_dir)
        record = read_model_record(model_dir)
        entries = [f for f in record.folds if folds is None or f.fold in folds]
        if not entries:
            raise FedsegError(f"{model_dir / MODEL_JSON}: no trained fold models" + (f" among folds {folds}" if folds else ""))
        models = []
        for entry in entries:
            model = build_model(record.network, in_channels=record.in_channels, out_channels=record.out_channels)
            weights = load_weights(model_dir / entry.weights)
            try:
                model.load_state_dict(weights)
            except RuntimeError as exc:
                raise FedsegError(f"{model_dir / entry.weights}: weights do not fit {record.network}") from exc
            models.append(model.to(hardware.device).eval())
        inference = record.inference
        return cls(
            models, record.preprocessing, inference.patch_size, inference.sw_batch_size, inference.sw_overlap,
            record.to_dict(), inference.keep_largest_component, hardware,
        )

    @torch.no_grad()
    def probability(self, image: np.ndarray) -> np.ndarray:
        """Mean foreground probability over the fold models, on the prepared grid of ``image``."""
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(self.hardware.device)
        total = torch.zeros(image.shape, dtype=torch.float32, device=self.hardware.device)
        for model in self.models:
            with self.hardware.autocast():
                logits = sliding_window_logits(model, tensor, self.patch, self.sw_batch_size, self.sw_overlap)
            total += torch.softmax(logits.float(), dim=1)[0, 1]
        return (total / len(self.models)).cpu().numpy()

    def predict_prepared(self, image: Volume, original_affine: np.ndarray, original_shape: tuple[int, int, int]) -> np.ndarray:
        """Mask (uint8) on the original grid for an already prepared image."""
        probability = self.probability(image.array)
        on_original = resample_to_grid(probability, image.affine, original_affine, original_shape, order=1)
        mask = on_original > 0.5
        return (largest_component(mask) if self.keep_largest_component else mask).astype(np.uint8)

    def predict(self, image: Volume) -> Volume:
        """Mask on the original grid of a raw (unprepared) image."""
        prepared, _ = preprocess_case(image, None, self.prepare)
        mask = self.predict_prepared(prepared, image.affine, image.shape)
        return Volume(mask, image.affine)
