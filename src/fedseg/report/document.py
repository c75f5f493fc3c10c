"""The report documents: ``report.md`` and ``report.html``, the same text, the HTML made from the Markdown.

``report.md`` holds the title, settings, the cross-site tables and p-values
(:mod:`fedseg.report.tables`), the paper's finding (lines given by the
caller), figure links with captions, the convergence section, notes and how
to recompute. ``report.html`` is that Markdown rendered by markdown-it
(CommonMark + tables, raw HTML escaped) with every figure embedded as a data
URI and inline CSS, so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

from fedseg.errors import FedsegError
from fedseg.evaluation.convergence import FoldCurve
from fedseg.report.figures import FigureFile
from fedseg.report.tables import convergence_lines

__all__ = ["FINDING_TITLE", "report_html", "report_markdown"]

FINDING_TITLE = "The paper's finding in this study"

RECOMPUTE = (
    "results.json (next to this report) holds every per-case Dice score "
    "(dice[model][test_set][case]); tables/crosssite.md, .csv and .json hold the table "
    "values and every paired t-test, and fedseg.evaluation.crosssite.cross_site_table "
    "recomputes them from those scores."
)


def report_markdown(
    title: str,
    settings: Sequence[str],
    tables: str,
    figures: Sequence[FigureFile],
    notes: Sequence[str],
    out_dir: Path,
    fold_curves: Sequence[FoldCurve] = (),
    convergence: Sequence[FigureFile] = (),
    finding: Sequence[str] = (),
) -> str:
    """The text of ``report.md``; ``tables`` is :func:`~fedseg.report.tables.tables_markdown`'s."""
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- {s}" for s in settings] or ["No settings recorded."]
    lines += ["", "## Cross-site Dice", "", tables.rstrip("\n")]
    if finding:
        lines += ["", f"## {FINDING_TITLE}", "", finding[0], "", *(f"- {line}" for line in finding[1:])]
    lines += ["", "## Figures"]
    lines += _figures_markdown(figures, out_dir)
    if fold_curves:
        lines += ["", "## Convergence", "", *convergence_lines(fold_curves), *_figures_markdown(convergence, out_dir)]
    if notes:
        lines += ["", "## Notes"]
        for note in notes:
            lines += ["", note]
    lines += ["", "## How to recompute", "", RECOMPUTE]
    return "\n".join(lines) + "\n"


def _figures_markdown(figures: Sequence[FigureFile], out_dir: Path) -> list[str]:
    lines = []
    for figure in figures:
        lines.append("")
        if figure.path is None:
            lines.append(figure.skipped)
        else:
            link = figure.path.relative_to(out_dir).as_posix()
            lines += [f"![{figure.caption}]({link})", "", f"*{figure.caption}*"]
    return lines


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
li strong, td strong { color: #a00; }
img { max-width: 100%; border: 1px solid #ddd; }
p em { font-size: .9em; color: #444; }
"""

# Raw HTML in the text (a note, a title) is shown as text, never interpreted.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def report_html(markdown: str, title: str, out_dir: Path) -> str:
    """``markdown`` (the text of ``report.md`` in ``out_dir``) as one HTML page with its figures embedded.

    Raises:
        FedsegError: an image the Markdown links is not a PNG file under ``out_dir`` (the message names it).
    """
    tokens = _MARKDOWN.parse(markdown)
    for image in _images(tokens):
        image.attrSet("src", _data_uri(out_dir, str(image.attrGet("src"))))
    body = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + body
        + "</body>\n</html>\n"
    )


def _images(tokens: list[Token]) -> list[Token]:
    return [child for token in tokens for child in token.children or () if child.type == "image"]


def _data_uri(out_dir: Path, link: str) -> str:
    path = out_dir / link
    if path.suffix != ".png" or not path.is_file():
        raise FedsegError(f"report.md links the figure {link!r}, but {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
