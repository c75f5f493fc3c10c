"""The command line: help everywhere, version, one-line errors with exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [[], ["provision"], ["data"], ["data", "check"], ["data", "prepare"], ["data", "split"], ["data", "synth"], ["data", "import-dicom"], ["data", "preview"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedseg")
def test_help_on_every_command(command, run_cli):
    code, out, _ = run_cli(*command, "--help")
    assert code == 0 and "Usage" in out


def test_version(run_cli):
    from fedseg import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out


@pytest.mark.slow  # runs the installed console script
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


def test_import_dicom_command_matches_label_grid(shared_data, tmp_path, run_cli):
    from fedseg.data.volume import load_volume, same_grid

    out = tmp_path / "ProstateX-0000.nii.gz"
    code, stdout, err = run_cli("data", "import-dicom", shared_data / "prostatex/dicom/ProstateX-0000", out)
    assert code == 0, err
    assert "(384, 384, 19)" in stdout
    label = load_volume(shared_data / "prostatex/labels/ProstateX-0000.nii.gz")
    assert same_grid(load_volume(out), label, atol_mm=1e-3)
    content = out.read_bytes()
    code, _, err = run_cli("data", "import-dicom", shared_data / "prostatex/dicom/ProstateX-0000", out)
    assert code == 1 and "already exists" in err
    assert out.read_bytes() == content



def test_os_error_is_a_one_line_error(make_site, tmp_path, run_cli):
    """A destination whose parent is a file fails in the OS; the user gets one line, not a traceback."""
    site = make_site(n_cases=1)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli("data", "prepare", site, blocker / "out")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "notes.txt" in last and "Traceback" not in err


def test_error_text_with_brackets_is_printed_verbatim(tmp_path, run_cli):
    """Rich markup must not eat parts of a message such as a TOML table name."""
    config = tmp_path / "bad.toml"
    config.write_text("[prepare]\nspacing = 1.0\n")
    (tmp_path / "site" / "images").mkdir(parents=True)
    code, _, err = run_cli("train", tmp_path / "site", "--out", tmp_path / "m", "--config", config)
    assert code == 1 and "[prepare]" in err


def test_log_lines_cannot_be_forged_by_a_peer() -> None:
    import logging

    from fedseg.cli.console import SafeFormatter, escape_controls

    assert escape_controls("ok\x1b[31mred\x00") == "ok\\x1b[31mred\\x00"
    record = logging.LogRecord("fedseg.server", logging.WARNING, __file__, 1, "site %s: %s", ("nci", "bad\n2026 INFO forged"), None)
    line = SafeFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING site nci: bad\\n2026 INFO forged" and "\n" not in line
