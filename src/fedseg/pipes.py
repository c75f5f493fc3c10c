"""Child processes that talk JSON lines on their stdin and stdout, never pickles.

``multiprocessing`` and ``concurrent.futures.ProcessPoolExecutor`` pickle what
they pass between processes; fedseg's own helper processes (the study's
workers, the data-parallel training followers) are plain ``subprocess``
children instead: the parent writes one strict-JSON request per line on the
child's stdin and reads one JSON reply per line from its stdout, through a
reader thread, so every wait can have a timeout. A child sees its stdin
close when the parent goes away, which is how it knows to stop. Starting,
stopping and reaping are :mod:`fedseg.processes`'.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.io import dumps_json, loads_json
from fedseg.processes import CHILD_OPTIONS, STOP_TIMEOUT_S, Child

__all__ = ["STOP_TIMEOUT_S", "ChildEnded", "JsonLinesChild", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for servers and rendezvous started next)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ChildEnded(FedsegError):
    """The child's stdout ended (it exited) while a reply was awaited."""


class JsonLinesChild(Child):
    """One child process and the thread that turns its stdout lines into replies.

    Asked to stop, it sees its stdin close (and exits when idle); it is killed
    if it has not exited within its grace (:func:`fedseg.processes.stop_all`).

    Args:
        argv: the command.
        log: file for the child's other output (stderr), or None to share the parent's.
        env: its environment (default: the parent's).
        replies: a queue shared with other children, receiving ``(child, line or None)``;
            by default the child has its own, read with :meth:`receive`.
        name: how messages name it (default ``child process PID``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        replies: queue.Queue | None = None,
        name: str | None = None,
    ) -> None:
        process = _popen(argv, log, env)
        super().__init__(name or f"child process {process.pid}", process, log)
        self.replies: queue.Queue = replies if replies is not None else queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.replies.put((self, line))
        self.replies.put((self, None))  # end of output: the process has ended

    def send(self, message: Any) -> None:
        """Write one JSON line to the child's stdin."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(dumps_json(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:  # ValueError: stdin already closed
            raise ChildEnded(f"{self.name} is gone (exit code {self.process.poll()})") from exc

    def receive(self, timeout_s: float) -> Any:
        """The next reply of this child (own queue only).

        Raises:
            ChildEnded: the child exited first.
            FedsegError: no reply within ``timeout_s``.
        """
        try:
            _child, line = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            raise FedsegError(f"{self.name} sent no reply within {timeout_s:.0f} s") from None
        if line is None:
            raise ChildEnded(f"{self.name} exited with code {self.process.wait()}")
        return loads_json(line)

    def ask_to_stop(self) -> None:
        """Close stdin: the child's loop ends when it is idle."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:  # a broken pipe while flushing: the child is gone already
            pass


def _popen(argv: Sequence[str], log: Path | None, env: Mapping[str, str] | None) -> subprocess.Popen:
    """The child with stdin and stdout as text pipes, stderr to ``log`` (None: the parent's)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") if log is not None else contextlib.nullcontext() as err:  # the child keeps its own copy
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8",
            env=dict(env) if env is not None else None, **CHILD_OPTIONS,  # type: ignore[call-overload]
        )
