"""Files without pickle, written so a crash never leaves half a record: strict JSON, JSON lines, atomic commits.

Owns the on-disk text formats every layer shares (and needs no torch):

* :func:`dumps_json` / :func:`loads_json` — strict JSON (``allow_nan=False``);
  non-finite floats are tagged ``{"$float": "-inf"}`` so they survive a round trip;
* :func:`write_json` / :func:`read_json` — one record per file, written to a
  ``.partial`` name, fsynced and renamed into place (:func:`commit_file`);
* :func:`write_text` — the same commit for any text (TOML, Markdown);
* :func:`append_jsonl` / :func:`read_jsonl` — append-only logs, one JSON object per line;
* :class:`FolderLock` — one process at a time on a folder (a run directory), naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedseg.errors import FedsegError

__all__ = [
    "FLOAT_TAG", "LOCK_FILE", "FolderLock", "append_jsonl", "commit_file", "dumps_json", "loads_json", "partial_path", "read_json",
    "read_jsonl", "write_json", "write_text",
]

FLOAT_TAG = "$float"  # {"$float": "-inf"}: unambiguous, a plain string "inf" stays a string


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before :func:`commit_file` puts it in place."""
    return path.with_name(path.name + ".partial")


def commit_file(tmp: Path, path: Path) -> None:
    """Make ``tmp`` durable, then put it in place of ``path`` (and make the rename durable).

    The rename alone survives ``kill -9``; the fsyncs make a commit survive a
    power loss too, so a state file never names a round whose weights were lost.
    """
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _json_safe(value: Any) -> Any:
    """Non-finite floats tagged: strict JSON has no Infinity (the scheduler's mode_worse is -inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT_TAG: repr(value)}  # 'inf', '-inf', 'nan'
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_restore(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {FLOAT_TAG} and value[FLOAT_TAG] in ("inf", "-inf", "nan"):
        return float(value[FLOAT_TAG])
    if isinstance(value, dict):
        return {k: _json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_restore(v) for v in value]
    return value


def dumps_json(data: Any, indent: int | None = None) -> str:
    """Strict JSON text, non-finite floats tagged; one line unless ``indent`` (e.g. for a pipe)."""
    return json.dumps(_json_safe(data), indent=indent, allow_nan=False)


def loads_json(text: str) -> Any:
    """The inverse of :func:`dumps_json`."""
    return _json_restore(json.loads(text))


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) in place of ``path``, atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(text, encoding="utf-8")
    commit_file(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON, written atomically."""
    write_text(path, dumps_json(data, indent=1))


def read_json(path: Path) -> Any:
    """A file written by :func:`write_json`; unreadable or malformed → :class:`FedsegError` naming it."""
    try:
        return loads_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{path}: cannot read JSON ({exc})") from exc


def append_jsonl(path: Path, record: Any) -> None:
    """One strict-JSON line appended to ``path`` and flushed to disk (an audit or metrics log)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(dumps_json(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[Any]:
    """Every record of a JSON-lines file (blank lines skipped); a missing file is an empty log."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return [loads_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{path}: cannot read JSON lines ({exc})") from exc


LOCK_FILE = ".fedseg.lock"


class FolderLock:
    """An exclusive lock on a folder, held by this process until :meth:`release` (or its death).

    ``flock`` on ``FOLDER/.fedseg.lock``, which holds the holder's pid: the kernel
    drops the lock when the process ends however it ends (``kill -9`` too), so
    a stale file never blocks a later run, and a second process is refused at
    once with the holder's pid instead of both writing the same files.
    """

    def __init__(self, folder: Path, what: str = "fedseg") -> None:
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self._handle: Any = None

    def acquire(self) -> Self:
        """Take the lock.

        Raises:
            FedsegError: another process holds it (its pid named).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FedsegError(
                f"{self.path.parent} is in use by another {self.what} (pid {holder}); stop it first, or use another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
