"""The report's tables, rendered once: Tables 3/4, their footnotes, the paired tests, the p-values and convergence.

Every table is a :class:`Table` (header and rows of cell text) rendered to a
Markdown pipe table; ``report.md``, ``tables/crosssite.md``, the console and
(through Markdown) ``report.html`` all show that one rendering. The numbers
come from :mod:`fedseg.evaluation.crosssite` and
:mod:`fedseg.evaluation.convergence`; this module only lays them out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.evaluation.convergence import FoldCurve, convergence_summary
from fedseg.evaluation.crosssite import (
    HIGHER_MARK,
    LOWER_MARK,
    OVERALL,
    CrossSiteTable,
    PairedTest,
    cross_site_table,
)
from fedseg.io import write_json, write_text
from fedseg.metrics import format_mean_sd

__all__ = [
    "P_FLAG", "Table", "convergence_lines", "convergence_table", "crosssite_csv", "crosssite_markdown", "dice_table",
    "footnotes", "p_value_lines", "table_of", "tables_markdown", "tables_text", "tests_table", "write_tables",
]

DiceScores = Mapping[str, Mapping[str, Mapping[str, float]]]
P_FLAG = 0.05  # p-values below this are highlighted in the p-value lines


@dataclass(frozen=True)
class Table:
    """A table as cell texts (Markdown inline: ``**bold**`` is allowed); rendered as a pipe table."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> list[str]:
        return [_pipe_row(self.header), "|" + "---|" * len(self.header), *(_pipe_row(r) for r in self.rows)]


def _pipe_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # a "|" in a name must not split its cell


# ----- Tables 3 and 4 ---------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Table 3 (private sets and Overall) or Table 4 (external sets): its columns and the names it goes by."""

    heading: str  # of the dice table
    p_heading: str  # of its block of p-values
    columns: tuple[str, ...]


def _groups(table: CrossSiteTable) -> list[_Group]:
    groups = [_Group("Model evaluation results: private test sets", "Private test sets and Overall (Table 3)",
                     (*table.private_sets, OVERALL))]
    if table.external_sets:
        groups.append(_Group("Model evaluation results: external test sets", "External test sets (Table 4)",
                             table.external_sets))
    return groups


def dice_table(table: CrossSiteTable, columns: Sequence[str]) -> Table:
    """Mean ± SD Dice (with the significance mark) of every model on ``columns``; the reference's n in the header."""
    header = ("Model", *(f"{c} (n={table.summary(table.reference, c).n})" for c in columns))
    rows = tuple(
        (model, *(format_mean_sd(table.summary(model, c)) + table.mark(model, c) for c in columns))
        for model in table.models
    )
    return Table(header, rows)


def tests_table(table: CrossSiteTable) -> Table:
    """Every paired t-test against the reference: n, mean difference, t and P (or why there is none)."""
    rows = tuple(
        (test.model, test.test_set, str(test.n), f"{test.mean_diff:+.4f}",
         "—" if test.t is None else f"{test.t:.3f}", test.status if test.p is None else f"{test.p:.3g}")
        for test in table.ordered_tests()
    )
    return Table(("Model", "Test set", "n", "Mean diff", "t", "P"), rows)


def footnotes(table: CrossSiteTable) -> list[str]:
    """What the marks in use mean (or that no model differs), then how the values were obtained."""
    used = {table.mark(m, c) for m in table.models for c in table.columns()} - {""}
    test = f"two-sided paired t-test, P < {table.alpha_star:g}"
    notes = [
        f"{mark}Significantly {word} than {table.reference} ({test})."
        for mark, word in ((LOWER_MARK, "lower"), (HIGHER_MARK, "higher"))
        if mark in used
    ] or [f"No model differs significantly from {table.reference} ({test})."]
    notes.append(
        "Values are mean ± SD Dice over cases; Overall pools all private test cases. "
        "Tests pair cases by (test set, case id); 'undefined' = all paired differences "
        "equal (zero variance), 'n<2' = too few pairs to test."
    )
    return notes


def crosssite_markdown(table: CrossSiteTable) -> str:
    """Tables 3 (private sets + Overall) and 4 (external sets), footnotes, the paired-test table."""
    parts: list[str] = []
    for group in _groups(table):
        parts += ["", f"### {group.heading}", "", *dice_table(table, group.columns).markdown()]
    parts += ["", *footnotes(table), "", f"#### Paired t-tests against {table.reference}", ""]
    parts += tests_table(table).markdown()
    return "\n".join(parts[1:]) + "\n"


# ----- p-values -----------------------------------------------------------------


def _p_text(column: str, test: PairedTest) -> str:
    """``"a: p = 0.3"``, or in bold with the direction when p < P_FLAG: ``"**a: p = 0.012, lower**"``."""
    if test.p is None:
        return f"{column}: {test.status}"
    if test.p >= P_FLAG:
        return f"{column}: p = {test.p:.3g}"
    return f"**{column}: p = {test.p:.3g}, {'lower' if test.mean_diff < 0 else 'higher'}**"


def p_value_lines(table: CrossSiteTable) -> list[str]:
    """Per table, one line per non-reference model with its p-values against the reference."""
    lines = [
        f"### P-values against {table.reference}",
        "",
        (
            f"Two-sided paired t-tests of each model against {table.reference}; p < {P_FLAG:g} is highlighted with "
            f"its direction (the table marks only p < {table.alpha_star:g})."
        ),
    ]
    for group in _groups(table):
        lines += ["", f"**{group.p_heading}**", ""]
        for model in table.models:
            if model != table.reference:
                texts = [_p_text(c, table.tests[(model, c)]) for c in group.columns if (model, c) in table.tests]
                lines.append(f"- {model} — " + "; ".join(texts))
    return lines


def tables_markdown(table: CrossSiteTable) -> str:
    """:func:`crosssite_markdown` followed by the p-value lines (the report's "Cross-site Dice" section)."""
    return crosssite_markdown(table) + "\n" + "\n".join(p_value_lines(table)) + "\n"


def tables_text(
    dice: DiceScores,
    private_sets: Sequence[str],
    external_sets: Sequence[str],
    reference: str = "fl",
) -> str:
    """The two tables as Markdown, for printing at the end of the command (:func:`tables_markdown`).

    Raises:
        DataError: inconsistent Dice scores (see :func:`~fedseg.evaluation.crosssite.cross_site_table`).
    """
    return tables_markdown(table_of(dice, private_sets, external_sets, reference))


def table_of(
    dice: DiceScores, private_sets: Sequence[str], external_sets: Sequence[str], reference: str
) -> CrossSiteTable:
    """The cross-site statistics the tables show (:func:`~fedseg.evaluation.crosssite.cross_site_table`)."""
    return cross_site_table(
        dice, private_sets=list(private_sets), reference=reference, external_sets=list(external_sets)
    )


# ----- convergence --------------------------------------------------------------


def convergence_table(curves: Sequence[FoldCurve]) -> Table:
    """Per fold model: its best validation Dice and where, the tail mean, and whether it converged (**no** in bold)."""
    rows = tuple(
        (c.model, str(c.fold), f"{c.best:.3f}", f"{c.best_at} of {c.x[-1]}", f"{c.tail_mean:.3f}",
         "yes" if c.converged else "**no**")
        for c in curves
    )
    return Table(("Model", "Fold", "Best val Dice", "at epoch/round", "last 20 % mean", "converged"), rows)


def convergence_lines(curves: Sequence[FoldCurve]) -> list[str]:
    """A Markdown summary and table: per fold, the best and where, the tail mean, converged or not."""
    if not curves:
        return [convergence_summary(curves)]
    return [convergence_summary(curves), "", *convergence_table(curves).markdown()]


# ----- files --------------------------------------------------------------------


def crosssite_csv(table: CrossSiteTable) -> str:
    """Long format, one row per model × column (private sets, Overall, external sets).

    Columns: model, test_set, n, mean, sd, p_vs_reference, t_vs_reference,
    mark, mean_diff_vs_reference, test_status. Untested values are empty;
    the reference's test_status is ``"reference"``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "test_set", "n", "mean", "sd", "p_vs_reference", "t_vs_reference",
                     "mark", "mean_diff_vs_reference", "test_status"])
    for model in table.models:
        for column in table.columns():
            s = table.summary(model, column)
            test = table.tests.get((model, column))
            writer.writerow([
                model, column, s.n, repr(s.mean), repr(s.sd),
                _blank(test.p if test else None), _blank(test.t if test else None),
                table.mark(model, column), _blank(test.mean_diff if test else None),
                test.status if test else "reference",
            ])
    return buffer.getvalue()


def _blank(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_tables(table: CrossSiteTable, out_dir: Path, stem: str = "crosssite") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` (:meth:`CrossSiteTable.to_json`) into ``out_dir``.

    Returns the written paths keyed by ``"md"``, ``"csv"`` and ``"json"``.
    """
    paths = {ext: Path(out_dir) / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    write_text(paths["md"], crosssite_markdown(table))
    write_text(paths["csv"], crosssite_csv(table))
    write_json(paths["json"], table.to_json())
    return paths
