"""JSON-lines children: strict JSON both ways, timeouts that name the child, and a stop that closes stdin first."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.pipes import ChildEnded, JsonLinesChild

pytestmark = pytest.mark.slow  # every test starts a process

ECHO = """
import sys
from fedseg.io import dumps_json, loads_json
for line in sys.stdin:
    request = loads_json(line)
    print("got", request, file=sys.stderr, flush=True)
    print(dumps_json({"echo": request}), flush=True)
"""


def test_requests_and_replies_are_strict_json_lines(tmp_path: Path) -> None:
    child = JsonLinesChild([sys.executable, "-c", ECHO], log=tmp_path / "echo.log")
    try:
        child.send({"x": [1, 2.5], "inf": float("inf")})
        assert child.receive(30) == {"echo": {"x": [1, 2.5], "inf": float("inf")}}  # tagged, not Infinity
    finally:
        assert child.stop() == 0  # stdin closed: the loop ends by itself
    assert "got" in (tmp_path / "echo.log").read_text()  # stderr went to the log, stdout stayed the channel


def test_no_reply_in_time_names_the_child() -> None:
    child = JsonLinesChild([sys.executable, "-c", "import time; time.sleep(60)"], name="worker 7")
    try:
        with pytest.raises(FedsegError, match="worker 7 sent no reply within 1 s"):
            child.receive(1.0)
    finally:
        child.stop(timeout_s=0.2)


def test_a_child_that_exits_ends_the_wait_and_refuses_requests() -> None:
    child = JsonLinesChild([sys.executable, "-c", "raise SystemExit(4)"])
    with pytest.raises(ChildEnded, match=rf"child process {child.process.pid} exited with code 4"):
        child.receive(30)
    with pytest.raises(ChildEnded, match="is gone"):
        for _ in range(100):  # the pipe may take a few writes to break
            child.send({"after": "exit"})
            time.sleep(0.01)
    assert child.stop() == 4


def test_a_child_that_ignores_its_closed_stdin_is_killed() -> None:
    child = JsonLinesChild([sys.executable, "-c", "import time; print('{}', flush=True); time.sleep(60)"])
    assert child.receive(30) == {}
    started = time.monotonic()
    assert child.stop(timeout_s=0.5) == -9
    assert time.monotonic() - started < 10
