"""The report's tables, rendered once: Tables 3/4 and tests as Markdown, CSV and JSON files, p-values, convergence."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedseg.evaluation import OVERALL, CrossSiteTable, cross_site_table
from fedseg.evaluation.convergence import FoldCurve
from fedseg.report.document import report_html
from fedseg.report.tables import (
    Table,
    convergence_lines,
    crosssite_csv,
    crosssite_markdown,
    tables_markdown,
    write_tables,
)

from conftest import crosssite_dice  # noqa: E402

PRIVATE = ["NCI", "SUNY", "UCLA"]
EXTERNAL = ["ProstateX"]
Dice = dict[str, dict[str, dict[str, float]]]  # model -> test set -> case id -> Dice


def _table(dice: Dice | None = None) -> CrossSiteTable:
    dice = crosssite_dice() if dice is None else dice
    return cross_site_table(dice, private_sets=PRIVATE, reference="FL", external_sets=EXTERNAL)


def test_a_table_is_a_pipe_table() -> None:
    table = Table(("Model", "a (n=2)"), (("fl", "0.900 ± 0.010"), ("x", "**no**")))
    assert table.markdown() == ["| Model | a (n=2) |", "|---|---|", "| fl | 0.900 ± 0.010 |", "| x | **no** |"]
    assert Table(("a|b",), ()).markdown()[0] == "| a\\|b |"  # a "|" in a name stays inside its cell


def test_footnote_names_only_the_marks_in_use() -> None:
    md = crosssite_markdown(_table())
    assert "*Significantly lower than FL" in md
    assert "†" not in md
    dice = crosssite_dice()
    dice["Good"] = {s: {c: v + 0.10 for c, v in cases.items()} for s, cases in dice["Bad"].items()}
    assert "†Significantly higher than FL" in crosssite_markdown(_table(dice))
    alike = {"A": {"X": {"c1": 0.7, "c2": 0.8}}, "FL": {"X": {"c1": 0.71, "c2": 0.79}}}
    plain = crosssite_markdown(cross_site_table(alike, private_sets=["X"], reference="FL"))
    assert "No model differs significantly from FL" in plain and "external" not in plain


def test_markdown_has_headers_with_n_and_numbers() -> None:
    table = _table()
    md = crosssite_markdown(table)
    for header in ["NCI (n=6)", "SUNY (n=5)", "UCLA (n=4)", "Overall (n=15)", "ProstateX (n=8)"]:
        assert header in md
    s = table.overall["Bad"]
    assert f"{s.mean:.3f} ± {s.sd:.3f}*" in md
    # reference listed last in each table
    first_table = md.split("### Model evaluation results: external")[0]
    rows = [line.split("|")[1].strip() for line in first_table.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["Bad", "Close", "FL"]


def test_the_report_section_starts_with_the_tables_file_and_adds_p_values() -> None:
    """One rendering: the report's "Cross-site Dice" text is crosssite.md's text plus the p-value lines."""
    table = _table()
    text = tables_markdown(table)
    assert text.startswith(crosssite_markdown(table) + "\n### P-values against FL\n")
    assert "**Private test sets and Overall (Table 3)**" in text and "**External test sets (Table 4)**" in text
    assert "- Bad — **NCI: p = " in text and ", lower**" in text
    assert "- Close — NCI: p = " in text  # not flagged


def test_html_of_the_markdown_has_the_same_cells(tmp_path: Path) -> None:
    """The HTML is the Markdown's rendering: every Markdown cell is an HTML cell, in order."""
    md = crosssite_markdown(_table())
    cells = [c.strip() for line in md.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")]
    page = report_html(md, "tables", tmp_path)
    assert re.findall(r"<t[hd]>(.*?)</t[hd]>", page) == cells and len(cells) == 4 * 5 + 4 * 2 + 11 * 6


def test_csv_round_trip() -> None:
    table = _table()
    rows = list(csv.DictReader(io.StringIO(crosssite_csv(table))))
    assert len(rows) == 3 * 5
    by_key = {(r["model"], r["test_set"]): r for r in rows}
    r = by_key[("Close", OVERALL)]
    assert int(r["n"]) == 15
    assert float(r["mean"]) == table.overall["Close"].mean
    assert float(r["p_vs_reference"]) == table.tests[("Close", OVERALL)].p
    assert float(r["t_vs_reference"]) == table.tests[("Close", OVERALL)].t
    assert by_key[("Bad", "UCLA")]["mark"] == "*"
    assert by_key[("FL", "NCI")]["p_vs_reference"] == ""
    assert by_key[("FL", "NCI")]["test_status"] == "reference"


def test_json_round_trip_and_write_tables(tmp_path: Path) -> None:
    dice = crosssite_dice()
    table = _table(dice)
    paths = write_tables(table, tmp_path / "out")
    assert set(paths) == {"md", "csv", "json"} and all(p.is_file() for p in paths.values())
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["reference"] == "FL" and data["alpha"] == 0.001
    assert data["models"] == ["Bad", "Close", "FL"]
    assert data["cells"]["Bad"]["ProstateX"]["mean"] == pytest.approx(
        np.mean(list(dice["Bad"]["ProstateX"].values()))
    )
    assert data["overall"]["FL"]["n"] == 15
    ext = next(t for t in data["tests"] if t["model"] == "Bad" and t["test_set"] == "ProstateX")
    expected = stats.ttest_rel(
        list(dice["Bad"]["ProstateX"].values()),
        [dice["FL"]["ProstateX"][c] for c in dice["Bad"]["ProstateX"]],
    )
    assert ext["p"] == pytest.approx(expected.pvalue) and ext["mark"] == "*"
    assert paths["md"].read_text(encoding="utf-8") == crosssite_markdown(table)
    assert paths["csv"].read_text(encoding="utf-8") == crosssite_csv(table)
    assert not list(paths["md"].parent.glob("*.partial"))  # written atomically, nothing left over


def _curve(y, model="private:nci", fold=0) -> FoldCurve:
    return FoldCurve("private", model, fold, tuple(range(1, len(y) + 1)), tuple(y))


def test_the_convergence_table_marks_the_folds_that_did_not():
    lines = convergence_lines([_curve([0.5, 0.8, 0.8, 0.8, 0.8]), _curve([0.1, 0.5, 0.9, 0.5, 0.5], fold=1)])
    assert lines[0].startswith("1 of 2 fold models converged (50 %)")
    assert "| private:nci | 0 | 0.800 | 2 of 5 | 0.800 | yes |" in lines
    assert "| private:nci | 1 | 0.900 | 3 of 5 | 0.500 | **no** |" in lines
    assert convergence_lines([]) == ["No validation curves were recorded."]
