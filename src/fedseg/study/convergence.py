"""Did each fold model converge? Its validation Dice per epoch (or FL round) and where its best was reached.

A fold counts as converged when the mean validation Dice over its last 20 % of
epochs/rounds is within 0.02 of its best (issue #12's criterion): a model
still climbing at the end, or one whose best was a lucky spike, fails it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedseg.federation.deploy.rundir import RunDir

if TYPE_CHECKING:
    from fedseg.study.pipeline import StudyRun

__all__ = ["TAIL_FRACTION", "WITHIN", "FoldCurve", "convergence_lines", "epoch_dice", "fold_curves"]

TAIL_FRACTION = 0.2
WITHIN = 0.02
FAMILIES = ("private", "pooled", "fl")


@dataclass(frozen=True)
class FoldCurve:
    """Validation Dice of one fold model, by epoch (private, pooled) or round (fl, aggregated over the sites)."""

    family: str  # "private", "pooled" or "fl"
    model: str  # "private:nci", "pooled", "fl"
    fold: int
    x: tuple[int, ...]  # 1-based epochs or rounds
    y: tuple[float, ...]

    @property
    def best(self) -> float:
        return max(self.y)

    @property
    def best_at(self) -> int:
        return self.x[int(np.argmax(self.y))]

    @property
    def tail_mean(self) -> float:
        """Mean over the last TAIL_FRACTION of the points (at least one)."""
        n = max(1, math.ceil(TAIL_FRACTION * len(self.y)))
        return float(np.mean(self.y[-n:]))

    @property
    def converged(self) -> bool:
        return self.tail_mean >= self.best - WITHIN


def epoch_dice(fold_dir: Path) -> dict[int, float]:
    """{epoch: validation Dice} of one fold's ``metrics.jsonl`` (epochs without validation left out)."""
    path = fold_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["epoch"]): float(r["val_dice"]) for r in rows if r.get("val_dice") is not None}


def _epochs(fold_dir: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    points = sorted(epoch_dice(fold_dir).items())
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def _rounds(run_dir: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    rundir = RunDir(run_dir)
    if not (rundir.root / "run.json").is_file():
        return (), ()
    points = [(int(r["round"]) + 1, float(r["aggregated_val_dice"])) for r in rundir.rounds()]
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


def convergence_lines(curves: Sequence[FoldCurve]) -> list[str]:
    """A Markdown summary and table: per fold, the best and where, the tail mean, converged or not."""
    if not curves:
        return ["No validation curves were recorded."]
    converged = sum(c.converged for c in curves)
    lines = [
        f"{converged} of {len(curves)} fold models converged ({100 * converged / len(curves):.0f} %): the mean "
        f"validation Dice over their last {TAIL_FRACTION:.0%} of epochs/rounds is within {WITHIN:g} of their best.",
        "",
        "| Model | Fold | Best val Dice | at epoch/round | last 20 % mean | converged |",
        "|---|---|---|---|---|---|",
    ]
    for c in curves:
        lines.append(f"| {c.model} | {c.fold} | {c.best:.3f} | {c.best_at} of {c.x[-1]} | {c.tail_mean:.3f} | "
                     + ("yes" if c.converged else "**no**") + " |")
    return lines
