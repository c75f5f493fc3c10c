"""Report writer of `fedseg study`: tables, p-values, figures, report.md and report.html."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.report import Curve, ExampleSlice, tables_text, write_report

PRIVATE = ["a", "b"]
EXTERNAL = ["ext"]
MODELS = ["private:a", "private:b", "pooled", "fl"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Dice = dict[str, dict[str, dict[str, float]]]


def _dice() -> Dice:
    """6 cases per set; private:b is 0.3 below fl everywhere (tiny noise) -> '*' marks;
    pooled is 0.05 above fl with tiny noise -> '†' marks; private:a is fl plus noise."""
    rng = np.random.default_rng(7)
    base = {s: 0.6 + 0.05 * rng.standard_normal(6) for s in [*PRIVATE, *EXTERNAL]}
    shift = {"private:a": 0.0, "private:b": -0.3, "pooled": 0.05, "fl": 0.0}
    noise = {"private:a": 0.03, "private:b": 0.002, "pooled": 0.002, "fl": 0.0}
    def scores(m: str, s: str) -> dict[str, float]:
        values = base[s] + shift[m] + noise[m] * rng.standard_normal(6)
        return {f"{s}{i:02d}": float(v) for i, v in enumerate(values)}

    return {m: {s: scores(m, s) for s in base} for m in MODELS}


def _disk(n: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _examples() -> list[ExampleSlice]:
    truth = _disk(32, 16, 16, 8)
    image = truth * 100.0 + np.random.default_rng(0).normal(0, 10, truth.shape)
    return [
        ExampleSlice("a", "a00", image, truth, _disk(32, 17, 15, 7), 0.91),
        ExampleSlice("b", "b03", image, truth, np.zeros_like(truth), 0.0),
    ]


def _curves() -> dict[str, list[Curve]]:
    epochs = list(range(1, 6))
    return {
        "a": [
            Curve("private:a", epochs, [0.2, 0.4, 0.6, 0.7, 0.75]),
            Curve("fl (a's local val)", epochs, [0.1, 0.3, 0.5, 0.7, 0.8]),
        ],
        "b": [Curve("private:b", epochs, [0.3, 0.5, 0.6, 0.6, 0.65])],
    }


def _write(tmp_path: Path, **overrides) -> dict[str, Path]:
    kwargs = {
        "title": "Study <demo>",
        "settings": ["profile: tiny", "cases: 6 per site"],
        "dice": _dice(),
        "private_sets": PRIVATE,
        "external_sets": EXTERNAL,
        "curves": _curves(),
        "examples": _examples(),
        "notes": ["Skipped: nothing. <b>bold?</b> & more"],
    }
    kwargs.update(overrides)
    return write_report(tmp_path / "out", **kwargs)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write(tmp_path_factory.mktemp("report"))


def _row(markdown: str, model: str) -> list[list[str]]:
    """Cells of every table row of ``model`` (Table 3 row first, then Table 4)."""
    rows = [ln for ln in markdown.splitlines() if ln.startswith(f"| {model} |") and "±" in ln]
    return [[c.strip() for c in r.strip("|").split("|")][1:] for r in rows]


def test_returned_paths(written: dict[str, Path]) -> None:
    assert set(written) == {"markdown", "html", "figures", "tables"}
    assert written["markdown"].name == "report.md" and written["html"].name == "report.html"
    assert (written["tables"] / "crosssite.md").is_file()
    assert (written["tables"] / "crosssite.json").is_file()


def test_markdown_tables_have_recomputed_mean_sd(written: dict[str, Path]) -> None:
    md = written["markdown"].read_text(encoding="utf-8")
    dice = _dice()
    assert "Overall (n=12)" in md and "ext (n=6)" in md
    for model in MODELS:
        table3, table4 = _row(md, model)
        samples = [list(dice[model][s].values()) for s in PRIVATE]
        samples.append([v for s in PRIVATE for v in dice[model][s].values()])  # Overall
        samples.append(list(dice[model]["ext"].values()))
        for cell, values in zip([*table3, *table4], samples, strict=True):
            assert cell.startswith(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"), (model, cell)
    # Systematic differences are marked; fl (reference) and noise-only private:a are not.
    assert all(c.endswith("*") for row in _row(md, "private:b") for c in row)
    assert all(c.endswith("†") for row in _row(md, "pooled") for c in row)
    assert not any(c[-1] in "*†" for row in _row(md, "fl") for c in row)


def test_markdown_sections_p_values_figures_notes(written: dict[str, Path]) -> None:
    md = written["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# Study <demo>\n")
    assert "- profile: tiny" in md and "- cases: 6 per site" in md
    assert "### P-values against fl" in md
    assert re.search(r"- private:b — .*\*\*a: p = [0-9.e-]+, lower\*\*", md)
    assert re.search(r"- pooled — .*\*\*ext: p = [0-9.e-]+, higher\*\*", md)
    for name in ("dice_strip", "val_curves", "examples"):
        assert f"](figures/{name}.png)" in md
    assert "Skipped: nothing." in md
    assert "results.json" in md


def test_figures_are_pngs(written: dict[str, Path]) -> None:
    for name in ("dice_strip", "val_curves", "examples"):
        data = (written["figures"] / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC), name


def test_html_is_self_contained_and_escaped(written: dict[str, Path]) -> None:
    page = written["html"].read_text(encoding="utf-8")
    assert 'src="figures/' not in page
    assert page.count("data:image/png;base64,") == 3
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text.lower()
    assert "<script" not in text.lower()
    for model in MODELS:
        assert f"<td>{model}</td>" in page
    assert "&lt;b&gt;bold?&lt;/b&gt; &amp; more" in page and "<b>bold?" not in page
    assert "Study &lt;demo&gt;" in page
    assert "<table>" in page and "Overall (n=12)" in page and "0." in page
    assert "†" in page and "*" in page


def test_empty_examples_and_curves_are_skipped(tmp_path: Path) -> None:
    paths = _write(tmp_path, examples=[], curves={})
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "No example slices" in md and "examples.png" not in md.replace("examples.png was not drawn", "")
    assert "No validation curves" in md
    assert not (paths["figures"] / "examples.png").exists()
    assert (paths["figures"] / "dice_strip.png").read_bytes().startswith(PNG_MAGIC)
    page = paths["html"].read_text(encoding="utf-8")
    assert "No example slices" in page and page.count("data:image/png;base64,") == 1


def test_tables_text_has_both_tables() -> None:
    text = tables_text(_dice(), PRIVATE, EXTERNAL)
    assert "private test sets" in text and "external test sets" in text
    assert "Overall (n=12)" in text and "ext (n=6)" in text
    assert len(_row(text, "pooled")) == 2
    assert "P-values against fl" in text


def test_bad_inputs_name_the_culprit(tmp_path: Path) -> None:
    dice = _dice()
    del dice["pooled"]["b"]["b03"]
    with pytest.raises(FedsegError, match=r"pooled.*'b'"):
        _write(tmp_path, dice=dice)
    with pytest.raises(FedsegError, match=r"'bad'.*site 'a'"):
        _write(tmp_path, curves={"a": [Curve("bad", [1, 2], [0.5])]})
    ex = _examples()[0]
    wrong = ExampleSlice("a", "a07", ex.image, ex.truth[:5], ex.prediction, 0.5)
    with pytest.raises(FedsegError, match=r"site 'a', case 'a07'.*truth"):
        _write(tmp_path, examples=[wrong])


def test_the_finding_is_a_section_of_both_reports(tmp_path: Path) -> None:
    """The lines of finding_lines appear under their own heading, escaped in HTML; none given, no section."""
    from fedseg.study.finding import finding_lines, findings

    dice = _dice()
    lines = finding_lines(findings({
        "dice": dice, "test_sets": {"private": list(PRIVATE), "external": list(EXTERNAL)}, "reference": "fl",
    }))
    paths = _write(tmp_path, finding=lines)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## The paper's finding in this study" in markdown and lines[0] in markdown
    assert all(f"- {line}" in markdown for line in lines[1:]) and lines[1].startswith(("held: ", "NOT held: "))
    html = paths["html"].read_text(encoding="utf-8")
    assert "<h2>The paper's finding in this study</h2>" in html and "fl &gt; private:" in html
    plain = _write(tmp_path / "plain")["markdown"].read_text(encoding="utf-8")
    assert "finding in this study" not in plain
