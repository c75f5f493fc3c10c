"""Study worker processes exchange JSON lines, never pickles; a failing job stops the run with its traceback."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.study.workers import run_jobs

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "fedseg"


def synth_spec(out: Path, profile: str = "suny", cases: int = 1) -> dict:
    return {"out_dir": str(out), "profile": profile, "cases": cases, "seed": 0, "resolution_scale": 4.0}


@pytest.mark.slow  # starts worker processes
def test_jobs_in_processes_return_the_same_results_as_in_process(tmp_path):
    specs = [synth_spec(tmp_path / "a" / "suny"), synth_spec(tmp_path / "a" / "ucla", "ucla", 2)]
    in_processes = sorted(run_jobs("synth", specs, workers=2, work_dir=tmp_path / "work"), key=lambda r: r["profile"])
    here = [synth_spec(tmp_path / "b" / "suny"), synth_spec(tmp_path / "b" / "ucla", "ucla", 2)]
    assert in_processes == list(run_jobs("synth", here, workers=1, work_dir=tmp_path / "work"))
    assert in_processes == [{"profile": "suny", "cases": 1}, {"profile": "ucla", "cases": 2}]
    for site in ("suny", "ucla"):
        written = sorted(p.name for p in (tmp_path / "a" / site / "images").iterdir())
        assert written == sorted(p.name for p in (tmp_path / "b" / site / "images").iterdir()) and written
    assert list((tmp_path / "work").iterdir()) == []  # the workers' logs are removed


@pytest.mark.slow  # starts worker processes
def test_a_failing_job_raises_with_its_output(tmp_path):
    specs = [synth_spec(tmp_path / "bad", profile="no-such-site"), synth_spec(tmp_path / "ok")]
    with pytest.raises(FedsegError) as caught:
        list(run_jobs("synth", specs, workers=2, work_dir=tmp_path / "work"))
    message = str(caught.value)
    assert "study synth job 0 failed" in message
    assert "unknown site profile 'no-such-site'" in message and "Traceback" in message  # the worker's own traceback


@pytest.mark.slow  # starts worker processes
def test_unknown_job_and_bad_worker_arguments_are_refused(tmp_path):
    with pytest.raises(FedsegError, match="unknown study job 'fit'"):
        list(run_jobs("fit", [{}], workers=2, work_dir=tmp_path))
    usage = subprocess.run([sys.executable, "-m", "fedseg.study.jobs", "train", "spec.json"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_the_package_imports_no_pickle_based_module():
    """pickle itself, or what pickles behind the scenes (multiprocessing queues, process pools, shelve)."""
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "multiprocessing", "concurrent.futures.process"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                if node.module == "concurrent.futures" and any(a.name == "ProcessPoolExecutor" for a in node.names):
                    names.append("concurrent.futures.process")
            found += [f"{path.relative_to(PACKAGE)}: {name}" for name in names if name.split(".")[0] in banned or name in banned]
    assert found == []
