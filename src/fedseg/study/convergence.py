"""A study's validation curves, read back from its folders: one :class:`~fedseg.evaluation.convergence.FoldCurve` per fold model.

Private and pooled folds log their validation Dice per epoch in
``metrics.jsonl``; a federated fold's run directory logs the aggregated
validation Dice per round. Whether a curve converged is
:mod:`fedseg.evaluation.convergence`'s criterion.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedseg.evaluation.convergence import FoldCurve
from fedseg.federation.deploy.rundir import RunDir
from fedseg.io import read_jsonl

if TYPE_CHECKING:
    from fedseg.study.pipeline import StudyRun

__all__ = ["epoch_dice", "fold_curves"]

FAMILIES = ("private", "pooled", "fl")


def epoch_dice(fold_dir: Path) -> dict[int, float]:
    """{epoch: validation Dice} of one fold's ``metrics.jsonl`` (epochs without validation left out)."""
    rows = read_jsonl(fold_dir / "metrics.jsonl")
    return {int(r["epoch"]): float(r["val_dice"]) for r in rows if r.get("val_dice") is not None}


def _epochs(fold_dir: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    points = sorted(epoch_dice(fold_dir).items())
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def _rounds(run_dir: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    rundir = RunDir(run_dir)
    if not (rundir.root / "run.json").is_file():
        return (), ()
    points = [(r.round + 1, r.aggregated_val_dice) for r in rundir.round_records()]
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def fold_curves(run: StudyRun) -> list[FoldCurve]:
    """Every fold of every private, pooled and FL model the study trained (folds without validation left out)."""
    curves = []
    for fold in range(run.n_folds):
        for model in run.models:
            if model == "fl":
                x, y = _rounds(run.out / "fl" / f"fold{fold}")
            else:
                x, y = _epochs(run.model_dir(model) / f"fold{fold}")
            if y:
                family = "private" if model.startswith("private:") else model
                curves.append(FoldCurve(family, model, fold, x, y))
    return sorted(curves, key=lambda c: (FAMILIES.index(c.family), c.model, c.fold))
