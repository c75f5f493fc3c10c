"""Dice of a model directory on a site's cases, on each case's ORIGINAL grid.

The prepared (isotropic) image is what the network sees; its probability map
is resampled back onto the original scan's grid and thresholded there, and
Dice is computed against the original, untouched label. That is the honest
number: it includes the resampling error a user of the mask would see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fedseg.data.layout import gland_mask
from fedseg.data.preprocess import read_case_meta
from fedseg.data.volume import load_volume
from fedseg.metrics import dice_coefficient
from fedseg.inference import Ensemble
from fedseg.training.data import PreparedSite

Split = Literal["test", "all"]


def cases_of(site: PreparedSite, split: Split) -> list[str]:
    """Case names of the held-out test split, or every case of the site."""
    if split == "test":
        return list(site.require_splits().test)
    return sorted(p.name.removesuffix(".json") for p in (site.prepared / "meta").glob("*.json"))


def evaluate_site(
    ensemble: Ensemble,
    site: PreparedSite,
    split: Split = "test",
    on_case: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Per-case Dice (the paper's Eq. 1) of ``ensemble`` on ``site``; keys in case order."""
    scores: dict[str, float] = {}
    for case_id in cases_of(site, split):
        meta = read_case_meta(site.prepared / "meta" / f"{case_id}.json")
        image = load_volume(site.prepared / "images" / f"{case_id}.nii.gz")
        truth = load_volume(meta.sources["label"].path)
        mask = ensemble.predict_prepared(image, truth.affine, truth.shape)
        scores[case_id] = dice_coefficient(mask, gland_mask(truth.array))
        if on_case is not None:
            on_case(case_id, scores[case_id])
    return scores
