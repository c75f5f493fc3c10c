"""The command line: help everywhere, version, one-line errors with exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [[], ["data"], ["data", "check"], ["data", "prepare"], ["data", "split"], ["data", "synth"], ["data", "import-dicom"], ["data", "preview"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedseg")
def test_help_on_every_command(command, run_cli):
    code, out, _ = run_cli(*command, "--help")
    assert code == 0 and "Usage" in out


def test_version(run_cli):
    from fedseg import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out


def test_installed_console_script_gives_one_line_error(tmp_path):
    """The real entry point: no traceback for a user mistake, exit code 1."""
    result = subprocess.run(
        [sys.executable, "-m", "fedseg.cli.main", "data", "check", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "nowhere" in result.stderr
