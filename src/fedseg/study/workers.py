"""Run a study's jobs in worker processes that talk JSON lines, never pickles.

``concurrent.futures.ProcessPoolExecutor`` would pickle every spec and result
between the processes; fedseg keeps pickle out entirely. Each worker is
``python -m fedseg.study.jobs --serve``: it reads one JSON request per line on
stdin (``{"job": ..., "spec": {...}}``) and answers one JSON line on stdout
(``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": traceback}``);
its other output goes to a log file. Workers stay up for all the jobs of a
step, so torch and MONAI are imported once per worker, not once per job.
The first failure stops the others and raises with the job's traceback.
"""

from __future__ import annotations

import queue
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.pipes import STOP_TIMEOUT_S, JsonLinesChild
from fedseg.io import loads_json

__all__ = ["run_jobs"]

LOG_TAIL_LINES = 25


class _Worker(JsonLinesChild):
    """One ``--serve`` process; its replies go to the pool's shared queue."""

    def __init__(self, log: Path, replies: queue.Queue) -> None:
        self.log = log
        self.job_index: int | None = None
        with log.open("wb") as err:
            super().__init__([sys.executable, "-m", "fedseg.study.jobs", "--serve"], stderr=err, replies=replies)

    def submit(self, job: str, index: int, spec: dict[str, Any]) -> None:
        self.job_index = index
        self.send({"job": job, "spec": spec})

    def log_tail(self) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(f"    {line}" for line in lines) or "    (no output)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """An idle worker gets time to exit; one still busy with a job is killed at once."""
        return super().stop(timeout_s if self.job_index is None else 0.1)


def run_jobs(job: str, specs: list[dict[str, Any]], workers: int, work_dir: Path) -> Iterator[dict[str, Any]]:
    """Run ``JOBS[job]`` on every spec, ``workers`` at a time; yield each result as its job ends.

    ``workers <= 1`` runs them here, in order. ``work_dir`` holds the workers'
    logs while the jobs run, in a temporary folder removed afterwards.

    Raises:
        FedsegError: a job failed or a worker died; the message has the traceback or log tail.
    """
    from fedseg.study.jobs import JOBS

    if job not in JOBS:
        raise FedsegError(f"unknown study job {job!r}; known: {', '.join(sorted(JOBS))}")
    if workers <= 1 or len(specs) <= 1:
        yield from map(JOBS[job], specs)
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{job}-jobs-", dir=work_dir) as tmp:
        yield from _run_in_workers(job, specs, min(workers, len(specs)), Path(tmp))


def _run_in_workers(job: str, specs: list[dict[str, Any]], workers: int, folder: Path) -> Iterator[dict[str, Any]]:
    replies: queue.Queue = queue.Queue()
    waiting = list(enumerate(specs))
    pool = [_Worker(folder / f"worker{i}.log", replies) for i in range(workers)]
    try:
        for worker in pool:
            worker.submit(job, *waiting.pop(0))
        for _ in specs:
            worker, line = replies.get()
            if line is None:
                code = worker.process.wait()
                raise FedsegError(f"a study {job} worker stopped (exit code {code}) during job {worker.job_index}; "
                                  f"its output ended with:\n{worker.log_tail()}")
            reply = loads_json(line)
            if not reply.get("ok"):
                tail = "\n".join(f"    {x}" for x in str(reply.get("error")).splitlines()[-LOG_TAIL_LINES:])
                raise FedsegError(f"study {job} job {worker.job_index} failed:\n{tail}")
            worker.job_index = None
            if waiting:  # keep the worker busy while the caller handles this result
                worker.submit(job, *waiting.pop(0))
            yield reply["result"]
    finally:
        for worker in pool:  # done, failed, interrupted or abandoned: no orphans
            worker.stop()
