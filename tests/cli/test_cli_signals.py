"""``fedseg federate`` stopped from outside: SIGTERM and SIGKILL leave no process behind, the run resumes, one run at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SITES, write_tiny_study

from fedseg.errors import FedsegError
from fedseg.federation.deploy.rundir import RunDir
from fedseg.io import FolderLock

pytestmark = pytest.mark.slow  # real federate processes on loopback

ROUNDS = 60
SITES = TINY_SITES


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_tiny_study(tmp_path_factory.mktemp("signals"), f"rounds = {ROUNDS}\nround_timeout_s = 60.0\ngrace_s = 5.0")


def federate(work: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fedseg", "federate", *(str(work / s) for s in SITES), "--out", str(out),
            "--config", str(work / "study.toml"), "--cache", str(work / "cache"), "--threads", "1", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def processes_of(out: Path) -> list[int]:
    """Live processes whose command line names ``out`` (the server and the clients), zombies excluded."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(out).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def still_running(out: Path) -> list[str]:
    """The command lines of the run's processes still alive (for a failure message)."""
    lines = []
    for pid in processes_of(out):
        try:
            lines.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return lines


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.2)


def committed(out: Path) -> int:
    state = out / "fold0" / "state.json"
    return RunDir.open(out / "fold0").read_state().completed_rounds if state.is_file() else 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_federate_leaves_no_process_and_resumes(work: Path, tmp_path: Path, how: signal.Signals) -> None:
    out = tmp_path / "run"
    first = federate(work, out)
    try:
        wait_for(lambda: committed(out) >= 1, 240, "the first committed round")
        # one run at a time: another process cannot take the folder, and is told who holds it
        with pytest.raises(FedsegError, match=rf"in use by another fedseg federate \(pid {first.pid}\)"):
            FolderLock(out, "fedseg federate").acquire()
        assert len(processes_of(out)) >= 4  # the server and three clients are running
        os.kill(first.pid, how)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == (143 if how == signal.SIGTERM else -signal.SIGKILL), err
    # SIGTERM: the supervisor stops them at once; SIGKILL: their parent-death signal, then their own shutdown
    # (2.4 s here; once over 30 s in CI under load, cause not found: the failure names what is still running)
    wait_for(lambda: processes_of(out) == [], 90, lambda: f"no process of the run after {how.name}: {still_running(out)}")
    done = committed(out)
    assert done >= 1
    resumed = federate(work, out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    state = RunDir.open(out / "fold0").read_state()
    assert state.finished and state.completed_rounds == ROUNDS
    assert processes_of(out) == []
