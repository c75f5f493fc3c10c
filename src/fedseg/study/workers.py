"""Run a study's jobs in worker processes that talk JSON lines, never pickles.

``concurrent.futures.ProcessPoolExecutor`` would pickle every spec and result
between the processes; fedseg keeps pickle out entirely. Each worker is
``python -m fedseg.study.jobs --serve``: it reads one JSON request per line on
stdin (``{"job": ..., "spec": {...}}``) and answers one JSON line on stdout
(``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": traceback}``);
its other output goes to a log file. Workers stay up for all the jobs of a
step, so torch and MONAI are imported once per worker, not once per job.
The first failure stops the others and raises with the job's traceback;
whatever ends the run, every worker is stopped and reaped (:mod:`fedseg.processes`).
"""

from __future__ import annotations

import queue
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.io import loads_json
from fedseg.pipes import JsonLinesChild
from fedseg.processes import STOP_TIMEOUT_S, Supervisor

__all__ = ["run_jobs"]

LOG_TAIL_LINES = 25
BUSY_STOP_S = 0.1  # a worker stopped in the middle of a job is killed at once: its result is not wanted


class _Worker(JsonLinesChild):
    """One ``--serve`` process; its replies go to the pool's shared queue."""

    def __init__(self, number: int, log: Path, replies: queue.Queue) -> None:
        super().__init__([sys.executable, "-m", "fedseg.study.jobs", "--serve"], log=log, replies=replies, name=f"worker {number}")
        self.job_index: int | None = None

    def submit(self, job: str, index: int, spec: dict[str, Any]) -> None:
        self.job_index, self.stop_timeout_s = index, BUSY_STOP_S
        self.send({"job": job, "spec": spec})

    def done(self) -> None:
        """The job's reply arrived: idle again, and given time to exit when stopped."""
        self.job_index, self.stop_timeout_s = None, STOP_TIMEOUT_S


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
    with Supervisor() as pool:  # done, failed, interrupted or abandoned: no orphans
        for i in range(workers):
            pool.add(_Worker(i, folder / f"worker{i}.log", replies)).submit(job, *waiting.pop(0))
        for _ in specs:
            worker, line = replies.get()
            if line is None:
                code = worker.process.wait()
                raise FedsegError(f"a study {job} worker stopped (exit code {code}) during job {worker.job_index}; "
                                  f"its output ended with:\n{worker.log_tail(LOG_TAIL_LINES)}")
            reply = loads_json(line)
            if not reply.get("ok"):
                tail = "\n".join(f"    {x}" for x in str(reply.get("error")).splitlines()[-LOG_TAIL_LINES:])
                raise FedsegError(f"study {job} job {worker.job_index} failed:\n{tail}")
            worker.done()
            if waiting:  # keep the worker busy while the caller handles this result
                worker.submit(job, *waiting.pop(0))
            yield reply["result"]
