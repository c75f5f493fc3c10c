"""The report's figures (matplotlib, Agg, files only) and the inputs they are drawn from.

``dice_strip.png`` (per-case Dice of every model on every test set),
``val_curves.png`` (validation curves per site), ``examples.png`` (test slices
with truth and FL contours) and ``convergence_<family>.png`` (every fold
model's curve). A figure whose input is empty is not drawn (a stale PNG from
an earlier run is removed) and the report says so in a sentence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from fedseg.errors import FedsegError
from fedseg.evaluation.convergence import FoldCurve
from fedseg.evaluation.crosssite import CrossSiteTable

__all__ = [
    "Curve", "ExampleSlice", "FigureFile", "check_curves", "check_examples", "convergence_figures", "curves_figure",
    "dice_strip_figure", "examples_figure",
]

DiceScores = Mapping[str, Mapping[str, Mapping[str, float]]]
FIGURE_DPI = 110
JITTER_SEED = 20210301  # fixed: the strip plot is identical run to run
TRUTH_COLOR = "lime"
PREDICTION_COLOR = "red"


@dataclass(frozen=True)
class Curve:
    """One validation-Dice curve: mean over folds at each epoch/round."""

    label: str  # e.g. "private:nci", "fl (nci's local val)", "fl aggregated", "pooled"
    x: list[int]  # epoch or round numbers, 1-based
    y: list[float]  # validation Dice


@dataclass(frozen=True)
class ExampleSlice:
    """One axial slice of a test case with ground truth and FL prediction."""

    site: str
    case: str
    image: np.ndarray  # 2-D float (any range; displayed with a percentile 1-99 window)
    truth: np.ndarray  # 2-D bool
    prediction: np.ndarray  # 2-D bool
    dice: float  # the case's 3-D Dice of the FL model


@dataclass(frozen=True)
class FigureFile:
    """A figure of the report: drawn (``path``) or skipped (``path`` None, ``skipped`` says why)."""

    caption: str
    path: Path | None
    skipped: str = ""


def check_curves(curves: Mapping[str, Sequence[Curve]]) -> None:
    """Every curve has as many y as x values (the message names the curve and its site)."""
    for site, site_curves in curves.items():
        for curve in site_curves:
            if len(curve.x) != len(curve.y):
                raise FedsegError(
                    f"validation curve {curve.label!r} of site {site!r}: "
                    f"{len(curve.x)} x values but {len(curve.y)} y values"
                )


def check_examples(examples: Sequence[ExampleSlice]) -> None:
    """Every example is a finite, non-empty 2-D image with masks of its shape (the message names site and case)."""
    for ex in examples:
        where = f"example slice of site {ex.site!r}, case {ex.case!r}"
        image = np.asarray(ex.image)
        if image.ndim != 2 or image.size == 0:
            raise FedsegError(f"{where}: image must be a non-empty 2-D array, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise FedsegError(f"{where}: image holds NaN or inf")
        for name, mask in (("truth", ex.truth), ("prediction", ex.prediction)):
            if np.shape(mask) != image.shape:
                raise FedsegError(f"{where}: {name} shape {np.shape(mask)} differs from image {image.shape}")
        if not math.isfinite(float(ex.dice)):
            raise FedsegError(f"{where}: Dice is not finite ({ex.dice})")


def _grid(n: int, max_cols: int, panel: tuple[float, float]) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure with ``n`` panels in rows of at most ``max_cols``; unused axes are hidden."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight", pad_inches=0.1, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def _skip(path: Path, caption: str, sentence: str) -> FigureFile:
    path.unlink(missing_ok=True)  # never leave a stale figure from an earlier run
    return FigureFile(caption, None, sentence)


def dice_strip_figure(dice: DiceScores, table: CrossSiteTable, path: Path) -> FigureFile:
    """One panel per test set (private, then external): box + jittered per-case Dice per model."""
    caption = "Per-case Dice of every model on every test set (box: quartiles; points: cases)."
    sets = [*table.private_sets, *table.external_sets]
    models = list(table.models)
    rng = np.random.default_rng(JITTER_SEED)
    fig, axes = _grid(len(sets), 4, (max(3.0, 0.55 * len(models) + 1.2), 3.6))
    for i, (ax, test_set) in enumerate(zip(axes, sets)):
        cases = list(dice[table.reference][test_set])  # reference order: same cases for all models
        values = [[float(dice[m][test_set][c]) for c in cases] for m in models]
        external = " (external)" if test_set in table.external_sets else ""
        _strip_panel(ax, models, values, rng, f"{test_set}{external}, n={len(cases)}")
        if i % 4 == 0:
            ax.set_ylabel("Dice")
    fig.tight_layout()
    return FigureFile(caption, _save(fig, path))


def _strip_panel(
    ax: plt.Axes, models: list[str], values: list[list[float]], rng: np.random.Generator, title: str
) -> None:
    positions = np.arange(1, len(models) + 1)
    ax.boxplot(values, positions=positions, widths=0.55, showfliers=False, medianprops={"color": "black"})
    for pos, vals, color in zip(positions, values, _colors(len(models))):
        jitter = rng.uniform(-0.16, 0.16, size=len(vals))
        ax.scatter(pos + jitter, vals, s=12, color=color, alpha=0.75, zorder=3, clip_on=False)
    ax.set_xticks(positions)
    ax.set_xticklabels(models, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def curves_figure(curves: Mapping[str, Sequence[Curve]], path: Path) -> FigureFile:
    """One panel per site with its validation-Dice curves."""
    caption = "Validation Dice (mean over folds) per epoch or FL round, one panel per site."
    if not any(len(c.x) for site_curves in curves.values() for c in site_curves):
        return _skip(path, caption, "No validation curves were recorded; val_curves.png was not drawn.")
    fig, axes = _grid(len(curves), 3, (4.2, 3.3))
    for ax, (site, site_curves) in zip(axes, curves.items()):
        _curve_panel(ax, site, [c for c in site_curves if len(c.x)])
    fig.tight_layout()
    return FigureFile(caption, _save(fig, path))


def _curve_panel(ax: plt.Axes, site: str, site_curves: list[Curve]) -> None:
    for curve, color in zip(site_curves, _colors(len(site_curves))):
        ax.plot(curve.x, curve.y, marker="o", markersize=2.5, linewidth=1.2, color=color, label=curve.label)
    if site_curves:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(site, fontsize=9)
    ax.set_xlabel("epoch / round")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)


def convergence_figure(family: str, curves: list[FoldCurve], path: Path) -> FigureFile:
    """One panel per model of the family, one line per fold, the best of each fold marked."""
    unit = "round" if family == "fl" else "epoch"
    caption = f"Validation Dice of every {family} fold model per {unit} (dot: the fold's best)."
    models = list(dict.fromkeys(c.model for c in curves))
    fig, axes = _grid(len(models), 3, (4.2, 3.3))
    for ax, model in zip(axes, models):
        folds = [c for c in curves if c.model == model]
        for curve, color in zip(folds, _colors(len(folds))):
            ax.plot(curve.x, curve.y, linewidth=1.2, color=color, label=f"fold {curve.fold}")
            ax.plot([curve.best_at], [curve.best], "o", color=color, markersize=4)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return FigureFile(caption, _save(fig, path))


def examples_figure(examples: Sequence[ExampleSlice], path: Path) -> FigureFile:
    """One panel per example slice: image, truth contour (green), FL prediction contour (red)."""
    caption = "Example test slices: ground truth (green) and FL prediction (red) contours."
    if not examples:
        return _skip(path, caption, "No example slices were given; examples.png was not drawn.")
    fig, axes = _grid(len(examples), 4, (3.2, 3.5))
    for ax, example in zip(axes, examples):
        _example_panel(ax, example)
    handles = [
        Line2D([], [], color=TRUTH_COLOR, label="ground truth"),
        Line2D([], [], color=PREDICTION_COLOR, label="FL prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0.0, 0.06, 1.0, 1.0))
    return FigureFile(caption, _save(fig, path))


def _example_panel(ax: plt.Axes, example: ExampleSlice) -> None:
    image = np.asarray(example.image, dtype=float)
    lo, hi = np.percentile(image, [1, 99])
    ax.imshow(image.T, origin="lower", cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
    for mask, color in ((example.truth, TRUTH_COLOR), (example.prediction, PREDICTION_COLOR)):
        mask = np.asarray(mask, dtype=bool)
        if mask.any() and not mask.all():  # a constant mask has no contour
            ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=color, linewidths=1.0)
    ax.set_title(f"{example.site} · {example.case} · Dice {example.dice:.2f}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def convergence_figures(fold_curves: Sequence[FoldCurve], figures_dir: Path) -> list[FigureFile]:
    """``convergence_<family>.png`` for each model family with curves, in the order the families first appear."""
    families = dict.fromkeys(c.family for c in fold_curves)
    return [
        convergence_figure(f, [c for c in fold_curves if c.family == f], figures_dir / f"convergence_{f}.png")
        for f in families
    ]
