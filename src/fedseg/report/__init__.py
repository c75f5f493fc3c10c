"""A finished study's report: figures, tables rendered once for Markdown and HTML, report.md and report.html.

Layout written under ``out_dir`` by :func:`write_report`::

    report.md            title, settings, Tables 3/4, p-values, finding, figure links, convergence, notes
    report.html          the same Markdown as HTML, self-contained (inline CSS, figures as data URIs)
    tables/crosssite.*   the tables as Markdown, CSV and JSON (:func:`write_tables`)
    figures/*.png        dice_strip, val_curves, examples, convergence_<family> (each when it has input)

Modules: :mod:`~fedseg.report.tables` (every table, rendered once to
Markdown), :mod:`~fedseg.report.figures` (matplotlib), and
:mod:`~fedseg.report.document` (report.md, and report.html made from it).
Statistics come from :mod:`fedseg.evaluation`; what to report comes from the
caller as plain data (this package imports nothing from :mod:`fedseg.study`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fedseg.evaluation.convergence import FoldCurve
from fedseg.io import write_text
from fedseg.report.document import report_html, report_markdown
from fedseg.report.figures import (
    Curve,
    ExampleSlice,
    check_curves,
    check_examples,
    convergence_figures,
    curves_figure,
    dice_strip_figure,
    examples_figure,
)
from fedseg.report.tables import (
    DiceScores,
    convergence_lines,
    crosssite_markdown,
    table_of,
    tables_markdown,
    tables_text,
    write_tables,
)

__all__ = [
    "Curve", "ExampleSlice", "convergence_lines", "crosssite_markdown", "tables_text", "write_report", "write_tables",
]


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
    section and one figure per model family; ``finding`` the lines of the
    paper's finding (first line a summary, then one per comparison; a section
    after the tables, left out when empty).

    Returns:
        ``{"markdown": report.md, "html": report.html, "figures": dir, "tables": dir}``.

    Raises:
        FedsegError: inconsistent Dice scores (DataError from crosssite), a
            curve whose x and y lengths differ, or an example slice with bad
            arrays (messages name the site, curve or case).
    """
    out_dir = Path(out_dir)
    table = table_of(dice, private_sets, external_sets, reference)
    check_curves(curves)
    check_examples(examples)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    write_tables(table, tables_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        dice_strip_figure(dice, table, figures_dir / "dice_strip.png"),
        curves_figure(curves, figures_dir / "val_curves.png"),
        examples_figure(examples, figures_dir / "examples.png"),
    ]
    convergence = convergence_figures(fold_curves, figures_dir)
    markdown = report_markdown(
        title, settings, tables_markdown(table), figures, notes, out_dir, fold_curves, convergence, finding
    )
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    write_text(markdown_path, markdown)
    write_text(html_path, report_html(markdown, title, out_dir))
    return {"markdown": markdown_path, "html": html_path, "figures": figures_dir, "tables": tables_dir}
