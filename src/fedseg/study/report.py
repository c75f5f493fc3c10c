"""Report of ``fedseg study``: cross-site tables, figures, ``report.md`` and ``report.html``.

Layout written under ``out_dir``::

    report.md            title, settings, Tables 3/4, p-values, figure links, notes
    report.html          the same, self-contained (inline CSS, figures as data URIs)
    tables/crosssite.*   the tables as Markdown, CSV and JSON (crosssite.write_tables)
    figures/*.png        dice_strip.png, val_curves.png, examples.png (each when it has input)

Statistics come from :mod:`fedseg.evaluation.crosssite`; this module only
lays them out. A figure whose input is empty is not drawn (a stale PNG from an
earlier run is removed) and the report says so in a sentence.
"""

from __future__ import annotations

import base64
import html
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
from fedseg.evaluation.crosssite import (
    HIGHER_MARK,
    LOWER_MARK,
    OVERALL,
    CrossSiteTable,
    PairedTest,
    cross_site_table,
    write_tables,
)
from fedseg.metrics import format_mean_sd
from fedseg.study.convergence import FoldCurve, convergence_lines

__all__ = ["P_FLAG", "Curve", "ExampleSlice", "tables_text", "write_report"]

DiceScores = Mapping[str, Mapping[str, Mapping[str, float]]]
P_FLAG = 0.05  # p-values below this are highlighted in the p-value lines
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
class _Figure:
    """A figure of the report: drawn (``path``) or skipped (``path`` None, ``skipped`` says why)."""

    caption: str
    path: Path | None
    skipped: str = ""


# ----- public API -------------------------------------------------------------


def write_report(
    out_dir: Path,
    *,
    title: str,
    settings: Sequence[str],
    dice: DiceScores,
    private_sets: Sequence[str],
    external_sets: Sequence[str],
    reference: str = "fl",
    curves: Mapping[str, Sequence[Curve]],
    examples: Sequence[ExampleSlice],
    notes: Sequence[str] = (),
    fold_curves: Sequence[FoldCurve] = (),
    finding: Sequence[str] = (),
) -> dict[str, Path]:
    """Write tables, figures, ``report.md`` and ``report.html`` into ``out_dir``.

    ``dice[model][test_set][case]`` holds per-case Dice (models ``"private:<site>"``,
    ``"fl"``, ``"pooled"``); ``curves[site]`` the validation curves drawn in
    that site's panel; ``examples`` the slices of ``examples.png``;
    ``fold_curves`` every fold model's validation curve, for the convergence
    section and one figure per model family; ``finding`` the lines of
    :func:`fedseg.study.finding.finding_lines` (a section after the tables).

    Returns:
        ``{"markdown": report.md, "html": report.html, "figures": dir, "tables": dir}``.

    Raises:
        FedsegError: inconsistent Dice scores (DataError from crosssite), a
            curve whose x and y lengths differ, or an example slice with bad
            arrays (messages name the site, curve or case).
    """
    out_dir = Path(out_dir)
    table = _table(dice, private_sets, external_sets, reference)
    _check_curves(curves)
    _check_examples(examples)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    write_tables(table, tables_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        _dice_strip_figure(dice, table, figures_dir / "dice_strip.png"),
        _curves_figure(curves, figures_dir / "val_curves.png"),
        _examples_figure(examples, figures_dir / "examples.png"),
    ]
    convergence = [
        _convergence_figure(family, [c for c in fold_curves if c.family == family], figures_dir / f"convergence_{family}.png")
        for family in dict.fromkeys(c.family for c in fold_curves)
    ]
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    markdown_path.write_text(
        _report_markdown(title, settings, table, figures, notes, out_dir, fold_curves, convergence, finding), encoding="utf-8"
    )
    html_path.write_text(
        _report_html(title, settings, table, figures, notes, fold_curves, convergence, finding), encoding="utf-8"
    )
    return {"markdown": markdown_path, "html": html_path, "figures": figures_dir, "tables": tables_dir}


def tables_text(
    dice: DiceScores,
    private_sets: Sequence[str],
    external_sets: Sequence[str],
    reference: str = "fl",
) -> str:
    """The two tables as Markdown, for printing at the end of the command.

    Tables 3 and 4 with footnotes and the paired-test table (crosssite's
    ``to_markdown``), then the p-values against ``reference`` per table.
    """
    return _tables_markdown(_table(dice, private_sets, external_sets, reference))


# ----- tables and p-values ----------------------------------------------------


def _table(
    dice: DiceScores, private_sets: Sequence[str], external_sets: Sequence[str], reference: str
) -> CrossSiteTable:
    return cross_site_table(
        dice, private_sets=list(private_sets), reference=reference, external_sets=list(external_sets)
    )


def _table_groups(table: CrossSiteTable) -> list[tuple[str, list[str]]]:
    """(heading, columns) of Table 3 and, when there are external sets, Table 4."""
    groups = [("Private test sets and Overall (Table 3)", [*table.private_sets, OVERALL])]
    if table.external_sets:
        groups.append(("External test sets (Table 4)", list(table.external_sets)))
    return groups


def _p_text(column: str, test: PairedTest) -> tuple[str, bool]:
    """``("a: p = 0.012, lower", True)``; the flag is True when p < P_FLAG."""
    if test.p is None:
        return f"{column}: {test.status}", False
    if test.p >= P_FLAG:
        return f"{column}: p = {test.p:.3g}", False
    return f"{column}: p = {test.p:.3g}, {'lower' if test.mean_diff < 0 else 'higher'}", True


def _p_rows(table: CrossSiteTable, columns: list[str]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """Per non-reference model, the p-value texts of its tests on ``columns``."""
    return [
        (model, [_p_text(c, table.tests[(model, c)]) for c in columns if (model, c) in table.tests])
        for model in table.models
        if model != table.reference
    ]


def _p_intro(table: CrossSiteTable) -> str:
    return (
        f"Two-sided paired t-tests of each model against {table.reference}; "
        f"p < {P_FLAG:g} is highlighted with its direction (the table marks only "
        f"p < {table.alpha_star:g})."
    )


def _p_markdown(table: CrossSiteTable) -> list[str]:
    lines = [f"### P-values against {table.reference}", "", _p_intro(table)]
    for heading, columns in _table_groups(table):
        lines += ["", f"**{heading}**", ""]
        for model, items in _p_rows(table, columns):
            texts = [f"**{text}**" if flagged else text for text, flagged in items]
            lines.append(f"- {model} — " + "; ".join(texts))
    return lines


def _tables_markdown(table: CrossSiteTable) -> str:
    return table.to_markdown() + "\n" + "\n".join(_p_markdown(table)) + "\n"


# ----- input checks -----------------------------------------------------------


def _check_curves(curves: Mapping[str, Sequence[Curve]]) -> None:
    for site, site_curves in curves.items():
        for curve in site_curves:
            if len(curve.x) != len(curve.y):
                raise FedsegError(
                    f"validation curve {curve.label!r} of site {site!r}: "
                    f"{len(curve.x)} x values but {len(curve.y)} y values"
                )


def _check_examples(examples: Sequence[ExampleSlice]) -> None:
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


# ----- figures ----------------------------------------------------------------


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


def _skip(path: Path, caption: str, sentence: str) -> _Figure:
    path.unlink(missing_ok=True)  # never leave a stale figure from an earlier run
    return _Figure(caption, None, sentence)


def _dice_strip_figure(dice: DiceScores, table: CrossSiteTable, path: Path) -> _Figure:
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
    return _Figure(caption, _save(fig, path))


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


def _curves_figure(curves: Mapping[str, Sequence[Curve]], path: Path) -> _Figure:
    """One panel per site with its validation-Dice curves."""
    caption = "Validation Dice (mean over folds) per epoch or FL round, one panel per site."
    if not any(len(c.x) for site_curves in curves.values() for c in site_curves):
        return _skip(path, caption, "No validation curves were recorded; val_curves.png was not drawn.")
    fig, axes = _grid(len(curves), 3, (4.2, 3.3))
    for ax, (site, site_curves) in zip(axes, curves.items()):
        _curve_panel(ax, site, [c for c in site_curves if len(c.x)])
    fig.tight_layout()
    return _Figure(caption, _save(fig, path))


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


def _convergence_figure(family: str, curves: list[FoldCurve], path: Path) -> _Figure:
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
    return _Figure(caption, _save(fig, path))


def _examples_figure(examples: Sequence[ExampleSlice], path: Path) -> _Figure:
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
    return _Figure(caption, _save(fig, path))


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


# ----- report.md --------------------------------------------------------------


_FINDING_TITLE = "## The paper's finding in this study"


def _report_markdown(
    title: str,
    settings: Sequence[str],
    table: CrossSiteTable,
    figures: list[_Figure],
    notes: Sequence[str],
    out_dir: Path,
    fold_curves: Sequence[FoldCurve] = (),
    convergence: Sequence[_Figure] = (),
    finding: Sequence[str] = (),
) -> str:
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- {s}" for s in settings] or ["No settings recorded."]
    lines += ["", "## Cross-site Dice", "", _tables_markdown(table).rstrip("\n")]
    if finding:
        lines += ["", _FINDING_TITLE, "", finding[0], "", *(f"- {line}" for line in finding[1:])]
    lines += ["", "## Figures"]
    lines += _figures_markdown(figures, out_dir)
    if fold_curves:
        lines += ["", "## Convergence", "", *convergence_lines(fold_curves), *_figures_markdown(convergence, out_dir)]
    if notes:
        lines += ["", "## Notes"]
        for note in notes:
            lines += ["", note]
    lines += ["", "## How to recompute", "", _RECOMPUTE]
    return "\n".join(lines) + "\n"


def _figures_markdown(figures: Sequence[_Figure], out_dir: Path) -> list[str]:
    lines = []
    for figure in figures:
        lines.append("")
        if figure.path is None:
            lines.append(figure.skipped)
        else:
            link = figure.path.relative_to(out_dir).as_posix()
            lines += [f"![{figure.caption}]({link})", "", f"*{figure.caption}*"]
    return lines


_RECOMPUTE = (
    "results.json (next to this report) holds every per-case Dice score "
    "(dice[model][test_set][case]); tables/crosssite.md, .csv and .json hold the table "
    "values and every paired t-test, and fedseg.evaluation.crosssite.cross_site_table "
    "recomputes them from those scores."
)


# ----- report.html ------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #bbb; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eee; }
caption { text-align: left; font-weight: bold; padding-bottom: .3em; }
.reference td { font-weight: bold; }
.flag { font-weight: bold; color: #a00; }
.footnote { font-size: .88em; color: #444; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _report_html(
    title: str,
    settings: Sequence[str],
    table: CrossSiteTable,
    figures: list[_Figure],
    notes: Sequence[str],
    fold_curves: Sequence[FoldCurve] = (),
    convergence: Sequence[_Figure] = (),
    finding: Sequence[str] = (),
) -> str:
    body = [f"<h1>{_e(title)}</h1>", "<h2>Settings</h2>", _html_list(settings, "No settings recorded.")]
    body += ["<h2>Cross-site Dice</h2>", *_html_tables(table), _html_footnote(table)]
    body += [*_html_p_values(table), *_html_tests(table)]
    if finding:
        body += [f"<h2>{_e(_FINDING_TITLE.removeprefix('## '))}</h2>", f"<p>{_e(finding[0])}</p>", _html_list(finding[1:], "")]
    body += ["<h2>Figures</h2>"]
    body += [_html_figure(f) for f in figures]
    if fold_curves:
        body += ["<h2>Convergence</h2>", _html_convergence(fold_curves), *(_html_figure(f) for f in convergence)]
    if notes:
        body += ["<h2>Notes</h2>", *(f"<p>{_e(n)}</p>" for n in notes)]
    body += ["<h2>How to recompute</h2>", f"<p>{_e(_RECOMPUTE)}</p>"]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_convergence(curves: Sequence[FoldCurve]) -> str:
    summary = convergence_lines(curves)[0]
    rows = "\n".join(
        f"<tr><td>{_e(c.model)}</td><td>{c.fold}</td><td>{c.best:.3f}</td><td>{c.best_at} of {c.x[-1]}</td>"
        f"<td>{c.tail_mean:.3f}</td><td>{'yes' if c.converged else '<strong>no</strong>'}</td></tr>"
        for c in curves
    )
    return (
        f"<p>{_e(summary)}</p>\n<table>\n<thead><tr><th>Model</th><th>Fold</th><th>Best val Dice</th>"
        f"<th>at epoch/round</th><th>last 20 % mean</th><th>converged</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"
    )


def _html_list(items: Sequence[str], empty: str) -> str:
    if not items:
        return f"<p>{_e(empty)}</p>"
    return "<ul>\n" + "\n".join(f"<li>{_e(item)}</li>" for item in items) + "\n</ul>"


def _html_tables(table: CrossSiteTable) -> list[str]:
    return [_html_table(table, heading, columns) for heading, columns in _table_groups(table)]


def _html_table(table: CrossSiteTable, caption: str, columns: list[str]) -> str:
    header = "".join(
        f"<th>{_e(c)} (n={table.summary(table.reference, c).n})</th>" for c in columns
    )
    rows = []
    for model in table.models:
        cells = "".join(
            f"<td>{_e(format_mean_sd(table.summary(model, c)) + table.mark(model, c))}</td>"
            for c in columns
        )
        css = ' class="reference"' if model == table.reference else ""
        rows.append(f"<tr{css}><td>{_e(model)}</td>{cells}</tr>")
    return (
        f"<table>\n<caption>{_e(caption)}: mean ± SD Dice</caption>\n"
        f"<thead><tr><th>Model</th>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def _html_footnote(table: CrossSiteTable) -> str:
    """The table footnote: meaning of the marks in use, or that no model differs."""
    columns = [*table.private_sets, OVERALL, *table.external_sets]
    used = {table.mark(m, c) for m in table.models for c in columns}
    test = f"two-sided paired t-test, P < {table.alpha_star:g}"
    meanings = [
        f"{mark} significantly {word} than {table.reference}"
        for mark, word in ((LOWER_MARK, "lower"), (HIGHER_MARK, "higher"))
        if mark in used
    ]
    first = "; ".join(meanings) or f"No model differs significantly from {table.reference}"
    text = (
        f"{first} ({test}). Values are mean ± SD Dice over cases; Overall pools all private "
        f"test cases; tests pair cases by (test set, case id)."
    )
    return f'<p class="footnote">{_e(text)}</p>'


def _html_p_values(table: CrossSiteTable) -> list[str]:
    parts = [f"<h3>P-values against {_e(table.reference)}</h3>", f"<p>{_e(_p_intro(table))}</p>"]
    for heading, columns in _table_groups(table):
        items = []
        for model, texts in _p_rows(table, columns):
            shown = "; ".join(
                f'<span class="flag">{_e(t)}</span>' if flagged else _e(t) for t, flagged in texts
            )
            items.append(f"<li>{_e(model)} — {shown}</li>")
        parts += [f"<p><strong>{_e(heading)}</strong></p>", "<ul>\n" + "\n".join(items) + "\n</ul>"]
    return parts


def _html_tests(table: CrossSiteTable) -> list[str]:
    columns = [*table.private_sets, OVERALL, *table.external_sets]
    rows = []
    for model in table.models:
        for column in columns:
            test = table.tests.get((model, column))
            if test is None:
                continue
            t = "—" if test.t is None else f"{test.t:.3f}"
            p = test.status if test.p is None else f"{test.p:.3g}"
            cells = [model, column, test.n, f"{test.mean_diff:+.4f}", t, p]
            rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("Model", "Test set", "n", "Mean diff", "t", "P"))
    return [
        f"<table>\n<caption>Paired t-tests against {_e(table.reference)}</caption>\n"
        f"<thead><tr>{header}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    ]


def _html_figure(figure: _Figure) -> str:
    if figure.path is None:
        return f"<p>{_e(figure.skipped)}</p>"
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )
