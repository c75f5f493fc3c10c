"""The process supervisor: logs, exit codes, the first failure, ask-then-kill and no orphans."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.processes import Child, Supervisor, stop_all, tail

pytestmark = pytest.mark.slow  # every test starts processes

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for_line(log: Path, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, f"{log} never said {text!r}"
        time.sleep(0.05)


def test_children_log_and_report_their_exit_codes(tmp_path: Path) -> None:
    ended: list[tuple[str, int]] = []
    with Supervisor() as children:
        children.start("one", python("print('hello from one')"), tmp_path / "logs" / "one.log")
        children.start("two", python("import sys; print('to stderr', file=sys.stderr)"), tmp_path / "logs" / "two.log")
        codes = children.wait_all(lambda name, code: ended.append((name, code)))
    assert codes == {"one": 0, "two": 0} and sorted(ended) == [("one", 0), ("two", 0)]
    assert (tmp_path / "logs" / "one.log").read_text() == "hello from one\n"
    assert (tmp_path / "logs" / "two.log").read_text() == "to stderr\n"  # stderr joins stdout in the log


def test_the_first_failure_ends_the_wait_and_nothing_outlives_the_supervisor(tmp_path: Path) -> None:
    with Supervisor() as children:
        slow = children.start("slow", python("import time; time.sleep(60)"), tmp_path / "slow.log")
        failing = children.start("failing", python("print('bad input'); raise SystemExit(3)"), tmp_path / "failing.log")
        started = time.monotonic()
        codes = children.wait_all()
        assert time.monotonic() - started < 30
        assert codes == {"failing": 3} and slow.poll() is None
    assert slow.poll() is not None  # terminated and reaped on leaving the block
    error = failing.failure(3)
    assert str(error).startswith(f"failing exited with code 3; last lines of {tmp_path / 'failing.log'}:")
    assert "    bad input" in str(error)


def test_an_exception_inside_the_block_still_reaps_every_child(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Supervisor() as children:
        child = children.start("sleeper", python("import time; time.sleep(60)"), tmp_path / "sleeper.log")
        raise RuntimeError("boom")
    assert child.poll() is not None


def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    child = Child.start("stubborn", python(IGNORES_SIGTERM), tmp_path / "stubborn.log")
    wait_for_line(tmp_path / "stubborn.log", "up")
    started = time.monotonic()
    code = child.stop(timeout_s=0.5)
    assert 0.4 < time.monotonic() - started < 10
    assert code == -9  # SIGKILL, after SIGTERM was ignored


def test_graces_run_concurrently(tmp_path: Path) -> None:
    children = [Child.start(f"stubborn {i}", python(IGNORES_SIGTERM), tmp_path / f"s{i}.log") for i in range(3)]
    for i in range(3):
        wait_for_line(tmp_path / f"s{i}.log", "up")
    for child in children:
        child.stop_timeout_s = 1.0
    started = time.monotonic()
    codes = stop_all(children)
    assert time.monotonic() - started < 2.5  # one grace for all, not three in a row
    assert codes == {f"stubborn {i}": -9 for i in range(3)}


def test_wait_all_with_a_deadline_names_what_still_runs(tmp_path: Path) -> None:
    with Supervisor() as children:
        children.start("quick", python("pass"), tmp_path / "quick.log")
        children.start("sleeper", python("import time; time.sleep(60)"), tmp_path / "sleeper.log")
        with pytest.raises(FedsegError, match=r"still running after 1 s: sleeper$"):
            children.wait_all(timeout_s=1.0)


def test_two_children_of_one_name_are_refused(tmp_path: Path) -> None:
    with Supervisor() as children:
        children.start("same", python("import time; time.sleep(60)"), tmp_path / "a.log")
        second = Child.start("same", python("import time; time.sleep(60)"), tmp_path / "b.log")
        with pytest.raises(FedsegError, match="'same' is already running"):
            children.add(second)
        assert second.poll() is not None  # stopped, not left behind


def test_tail_of_missing_empty_and_long_logs(tmp_path: Path) -> None:
    assert tail(tmp_path / "none.log") == "    (no log)" and tail(None) == "    (no log)"
    (tmp_path / "empty.log").write_text("")
    assert tail(tmp_path / "empty.log") == "    (empty log)"
    (tmp_path / "long.log").write_text("".join(f"line {i}\n" for i in range(40)))
    assert tail(tmp_path / "long.log", 3) == "    line 37\n    line 38\n    line 39"
