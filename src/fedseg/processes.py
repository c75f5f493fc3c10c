"""Supervising child processes: start one with its log file, wait with a deadline, stop it (ask, then kill), never leave one behind.

Local mode's server and site processes and the study's worker processes are
all :class:`Child` objects, and every group of them lives in a
:class:`Supervisor`::

    with Supervisor() as children:
        children.start("server", argv, logs / "server.log")
        children.start("client nci", argv, logs / "nci.log")
        codes = children.wait_all()          # the first failure ends the wait
    # leaving the block: whatever still runs is asked to stop, killed after its grace, and reaped

Stopping is one escalation for every child: ask (SIGTERM by default; a child
that reads its stdin is asked by closing it), wait up to its grace period —
all children's graces run concurrently — then SIGKILL, then reap. Exceptions,
Ctrl-C and SIGTERM (:func:`terminate_like_interrupt`, installed by the CLI)
included, no child outlives the supervisor; and on Linux every child is also
started with a parent-death signal, so even a ``kill -9`` of the supervising
process stops its children (:data:`CHILD_OPTIONS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from fedseg.errors import FedsegError

__all__ = [
    "CHILD_OPTIONS", "LOG_TAIL_LINES", "POLL_S", "STOP_TIMEOUT_S", "Child", "Supervisor", "Terminated", "stop_all",
    "tail", "terminate_like_interrupt",
]

STOP_TIMEOUT_S = 10.0
"""Grace a child gets to exit after being asked, before it is killed."""
POLL_S = 0.2
LOG_TAIL_LINES = 15

C = TypeVar("C", bound="Child")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """In the child, before exec: SIGTERM when the parent dies (Linux ``prctl``), so no child is orphaned."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


CHILD_OPTIONS: dict[str, object] = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
"""Extra ``Popen`` options for every child fedseg starts (the parent-death signal, where the OS has one)."""


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM): unwinds like Ctrl-C, so supervisors stop their children."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` in the main thread (the CLI's entry point uses it).

    Outside the main thread (where Python cannot set handlers) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

ExitHook = Callable[[str, int], None]
"""Told each child's name and exit code as it ends."""


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, indented, for an error message."""
    if path is None:
        return "    (no log)"
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


class Child:
    """One child process: its name, its ``Popen`` and the log file its output goes to (if any).

    Attributes:
        name: how messages name it (``"server"``, ``"client nci"``).
        process: the running process.
        log: its log file, or None.
        stop_timeout_s: grace between being asked to stop and being killed.
    """

    def __init__(
        self, name: str, process: subprocess.Popen, log: Path | None = None, stop_timeout_s: float = STOP_TIMEOUT_S
    ) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.stop_timeout_s = stop_timeout_s

    @classmethod
    def start(cls, name: str, argv: Sequence[str | Path], log: Path, *, env: Mapping[str, str] | None = None) -> Child:
        """Start ``argv`` with stdout and stderr in the new file ``log`` and no stdin."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [str(a) for a in argv], stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, **CHILD_OPTIONS,  # type: ignore[call-overload]
            )
        return cls(name, process, log)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll()

    def ask_to_stop(self) -> None:
        """The polite stop: SIGTERM (subclasses may ask otherwise)."""
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout_s: float | None = None) -> int:
        """Ask, wait up to ``timeout_s`` (default :attr:`stop_timeout_s`), kill; returns the exit code."""
        return stop_all([self], timeout_s)[self.name]

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of its log, indented (see :func:`tail`)."""
        return tail(self.log, lines)

    def failure(self, code: int) -> FedsegError:
        """The error of this child having exited with ``code``, with the end of its log."""
        return FedsegError(f"{self.name} exited with code {code}; last lines of {self.log}:\n{self.log_tail()}")


def stop_all(children: Iterable[Child], timeout_s: float | None = None) -> dict[str, int]:
    """Ask every running child to stop, give each its grace (concurrently), kill the rest; reap all.

    Returns:
        Every child's exit code, by name.
    """
    children = list(children)
    for child in children:
        child.ask_to_stop()
    asked = time.monotonic()
    codes = {}
    for child in children:
        grace = child.stop_timeout_s if timeout_s is None else timeout_s
        try:
            codes[child.name] = child.process.wait(timeout=max(0.0, asked + grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            codes[child.name] = child.process.wait()
    return codes


class Supervisor:
    """A group of named children; leaving the ``with`` block stops and reaps every one still running."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str | Path], log: Path, *, env: Mapping[str, str] | None = None) -> Child:
        """Start a child (see :meth:`Child.start`) and supervise it."""
        return self.add(Child.start(name, argv, log, env=env))

    def add(self, child: C) -> C:
        """Supervise a child started elsewhere.

        Raises:
            FedsegError: a child of that name is already supervised.
        """
        if child.name in self.children:
            child.stop()
            raise FedsegError(f"a child process named {child.name!r} is already running")
        self.children[child.name] = child
        return child

    def wait_all(self, on_exit: ExitHook | None = None, *, timeout_s: float | None = None) -> dict[str, int]:
        """Wait for the children to end; the first non-zero exit ends the wait (the job cannot succeed then).

        Returns:
            The exit codes of the children that ended, by name (all of them unless one failed).

        Raises:
            FedsegError: ``timeout_s`` passed with children still running (named).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        while len(codes) < len(self.children):
            for name, child in self.children.items():
                if name not in codes and (code := child.poll()) is not None:
                    codes[name] = code
                    if on_exit is not None:
                        on_exit(name, code)
            if any(code != 0 for code in codes.values()):
                break
            if deadline is not None and time.monotonic() > deadline:
                running = ", ".join(n for n in self.children if n not in codes)
                raise FedsegError(f"still running after {timeout_s:.0f} s: {running}")
            if len(codes) < len(self.children):
                time.sleep(POLL_S)
        return codes

    def stop_all(self, timeout_s: float | None = None) -> dict[str, int]:
        """Stop every child (see :func:`stop_all`); returns all exit codes."""
        return stop_all(self.children.values(), timeout_s)
