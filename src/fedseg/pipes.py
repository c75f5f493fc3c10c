"""Child processes that talk JSON lines on their stdin and stdout, never pickles.

``multiprocessing`` and ``concurrent.futures.ProcessPoolExecutor`` pickle what
they pass between processes; fedseg's own helper processes (the study's
workers, the data-parallel training followers) are plain ``subprocess``
children instead: the parent writes one strict-JSON request per line on the
child's stdin and reads one JSON reply per line from its stdout, through a
reader thread, so every wait can have a timeout. A child sees its stdin
close when the parent goes away, which is how it knows to stop.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

from fedseg.errors import FedsegError
from fedseg.io import dumps_json, loads_json

__all__ = ["ChildEnded", "JsonLinesChild", "free_port"]

STOP_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for servers and rendezvous started next)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ChildEnded(FedsegError):
    """The child's stdout ended (it exited) while a reply was awaited."""


class JsonLinesChild:
    """One child process and the thread that turns its stdout lines into replies.

    Args:
        argv: the command.
        stderr: where the child's other output goes (a file, or None to share the parent's).
        env: its environment (default: the parent's).
        replies: a queue shared with other children, receiving ``(child, line or None)``;
            by default the child has its own, read with :meth:`receive`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stderr: IO[bytes] | None = None,
        env: Mapping[str, str] | None = None,
        replies: queue.Queue | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8",
            env=dict(env) if env is not None else None,
        )
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
            raise ChildEnded(f"child process {self.process.pid} is gone (exit code {self.process.poll()})") from exc

    def receive(self, timeout_s: float) -> Any:
        """The next reply of this child (own queue only).

        Raises:
            ChildEnded: the child exited first.
            FedsegError: no reply within ``timeout_s``.
        """
        try:
            _child, line = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            raise FedsegError(f"child process {self.process.pid} sent no reply within {timeout_s:.0f} s") from None
        if line is None:
            raise ChildEnded(f"child process {self.process.pid} exited with code {self.process.wait()}")
        return loads_json(line)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Close stdin (the child exits when idle); kill it if it has not within ``timeout_s``. Returns the exit code."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            return self.process.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            return self.process.wait()
