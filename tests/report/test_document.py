"""report.html is report.md rendered: figures embedded, raw HTML shown as text, a missing figure named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.report.document import report_html

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_figures_become_data_uris_and_raw_html_stays_text(tmp_path: Path) -> None:
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(PNG)
    page = report_html("# T <x>\n\n![cap](figures/a.png)\n\n<script>alert(1)</script>\n", "T <x>", tmp_path)
    assert '<img src="data:image/png;base64,iVBORw0KGgo' in page and 'alt="cap"' in page
    assert "figures/a.png" not in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>T &lt;x&gt;</title>" in page and "<h1>T &lt;x&gt;</h1>" in page


def test_a_missing_figure_is_named(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match=r"'figures/gone.png'.*not a PNG file"):
        report_html("![cap](figures/gone.png)\n", "t", tmp_path)
