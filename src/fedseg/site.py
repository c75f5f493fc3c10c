"""What a site keeps and computes at the end of a federated study (no network here).

The client (:func:`fedseg.federation.transport.client.run_client`) hands every model the
server sends at the end to :meth:`SiteOutputs.on_model` and asks
:meth:`SiteOutputs.evaluate` for the per-case test Dice of the final model.

Models are written as model directories usable by ``fedseg predict`` and
``fedseg evaluate``::

    MODELS_DIR/final/model.json + fold<k>/best.safetensors   the last round's global model
    MODELS_DIR/best/model.json  + fold<k>/best.safetensors   the best round's (aggregated val Dice)
    MODELS_DIR/final/evaluation-fold<k>.json                  per-case test Dice, real case names

Each fold's study adds its fold to the same directories, so after the five
fold runs ``MODELS_DIR/best`` is the site's copy of the FL ensemble.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedseg.data.preprocess import PrepareConfig
from fedseg.evaluation.evaluate import evaluate_site
from fedseg.inference import Ensemble
from fedseg.models import build_model
from fedseg.training.checkpoint import save_weights
from fedseg.io import write_json
from fedseg.training.config import TrainConfig
from fedseg.training.data import PreparedSite
from fedseg.training.device import resolve_hardware
from fedseg.training.fit import FoldOutcome, model_record, open_model_dir, record_fold

__all__ = ["SiteOutputs"]


class SiteOutputs:
    """A site's end-of-study hooks for fold ``fold`` of study ``study``."""

    def __init__(
        self, models_dir: Path, site: PreparedSite, fold: int, train: TrainConfig, prepare: PrepareConfig, study: str
    ) -> None:
        self.models_dir = Path(models_dir)
        self.site = site
        self.fold = fold
        self.train = train
        self.prepare = prepare
        self.study = study

    def _record(self, name: str) -> dict:
        trained_on = [{"site": "federated", "source": f"fedseg study {self.study!r}"}]
        record = model_record(self.train, self.prepare, trained_on)
        record["ensemble"] = f"mean of the {name} federated fold models' softmax probabilities, threshold 0.5"
        record["federated"] = {"study": self.study, "model": name, "received_by": self.site.name}
        return record

    def on_model(self, name: str, round_: int | None, weights: dict[str, np.ndarray], val_dice: float | None) -> None:
        """Add the received ``final`` or ``best`` model as this fold of ``MODELS_DIR/<name>``."""
        folder = self.models_dir / name
        open_model_dir(folder, self._record(name))
        tensors = {key: torch.from_numpy(np.array(array, copy=True)) for key, array in weights.items()}
        save_weights(folder / f"fold{self.fold}" / "best.safetensors", tensors)
        rounds = round_ + 1 if round_ is not None else 0
        dice = float(val_dice) if val_dice is not None else 0.0
        record_fold(folder, FoldOutcome(self.fold, dice, rounds, rounds, 0.0, 0))

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        """Per-case Dice of ``weights`` on this site's held-out test cases, on their original grids."""
        hardware = resolve_hardware(self.train.device, self.train.amp)
        model = build_model(self.train.network)
        model.load_state_dict({key: torch.from_numpy(np.array(array, copy=True)) for key, array in weights.items()})
        record = self._record("final")
        inference = record["inference"]
        ensemble = Ensemble(
            [model.to(hardware.device).eval()], self.prepare, self.train.patch, self.train.sw_batch_size,
            self.train.sw_overlap, record, inference["keep_largest_component"], hardware,
        )
        scores = evaluate_site(ensemble, self.site, "test")
        write_json(
            self.models_dir / "final" / f"evaluation-fold{self.fold}.json",
            {"site": self.site.name, "fold": self.fold, "case_dice": scores},
        )
        return scores
