"""Local mode: a whole federated study on this machine (``fedseg federate``).

The same code path as a real deployment: throw-away certificates for
``localhost`` (:func:`~fedseg.federation.deploy.provision.provision_study`), ONE
server process and one client process per site, each a separate
``fedseg server`` / ``fedseg client`` process talking mutual TLS over
127.0.0.1, supervised together (:class:`fedseg.processes.Supervisor`: the
first failure stops the others, and none outlives the fold). Layout of ``RUN_DIR``::

    RUN_DIR/kits/{ca,server,<site>}/     throw-away kits (study "local")
    RUN_DIR/fold<k>/                     the server's run directory of fold k (rounds/,
                                         state.json, final/best.safetensors, evaluation.json:
                                         the final model's per-case Dice on each site's test set)
    RUN_DIR/sites/<site>/{final,best}/   the models each site received (its copy of the FL model)
    RUN_DIR/audit/fold<k>/<site>.jsonl   each site's audit log (what left it)
    RUN_DIR/logs/fold<k>/<name>.log      stdout+stderr of every process
    RUN_DIR/model/                       model directory for predict/evaluate:
                                         fold<k>/best.safetensors = the run's best global model
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file

from fedseg.errors import FedsegError
from fedseg.federation.config import StudyConfig
from fedseg.io import FolderLock
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.transport.kit import load_kit, validate_site_names
from fedseg.io import write_json
from fedseg.modeldir import FoldOutcome, ModelRecord, open_model_dir, record_fold
from fedseg.models import weights_from_numpy
from fedseg.pipes import free_port
from fedseg.processes import Child, Supervisor
from fedseg.training.checkpoint import save_weights
from fedseg.training.device import resolve_hardware

__all__ = ["FoldRun", "fedseg_command", "free_port", "run_local", "site_names", "write_fl_model"]

SERVER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FoldRun:
    """One fold's federated run, as recorded by the server."""

    fold: int
    run_dir: Path
    rounds: int
    best_round: int
    best_dice: float
    seconds: float


def fedseg_command(*args: str | Path) -> list[str]:
    """``python -m fedseg ARGS``: the one entry point local mode starts its processes with."""
    return [sys.executable, "-m", "fedseg", *map(str, args)]


def site_names(site_dirs: Sequence[Path]) -> list[str]:
    """The study's site names: the site folders' names, which must be unique valid site names."""
    if not site_dirs:
        raise FedsegError("give at least one site folder")
    names = [Path(d).resolve().name for d in site_dirs]
    seen: dict[str, Path] = {}
    for name, folder in zip(names, site_dirs, strict=True):
        if name in seen:
            raise FedsegError(
                f"site folders {seen[name]} and {folder} have the same name {name!r}; "
                "each site is named after its folder, so rename one"
            )
        seen[name] = Path(folder)
        if not Path(folder).is_dir():
            raise FedsegError(f"site folder {folder} does not exist")
    try:
        return validate_site_names(names)
    except FedsegError as exc:
        raise FedsegError(f"site folder names must be usable as site names: {exc}") from exc


def _wait_listening(port: int, server: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.poll()
        if code is not None:
            raise FedsegError(f"the server exited with code {code}; last lines of {server.log}:\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FedsegError(f"the server did not listen on port {port} within {timeout_s:.0f} s; see {server.log}")


def run_fold(
    site_dirs: Sequence[Path],
    names: Sequence[str],
    out: Path,
    fold: int,
    *,
    rounds: int | None,
    config_file: Path | None,
    cache: Path,
    threads: int | None,
    on_exit: Callable[[str, int], None] | None = None,
    device: str | None = None,
    site_processes: int | None = None,
    deadline_s: float | None = None,
) -> FoldRun:
    """Run (or continue) one fold's study: server + one client per site as processes; raises if any fails.

    ``deadline_s``: the most the fold may take (every round is bounded by its own timeout; this bounds the
    whole, so a server that stopped answering cannot hang local mode).
    """
    start = time.perf_counter()
    run_dir = out / f"fold{fold}"
    resuming = (run_dir / "run.json").is_file()
    if run_dir.exists() and not resuming:
        shutil.rmtree(run_dir)  # created by a run killed before its first write: nothing to keep
    logs, port = out / "logs" / f"fold{fold}", free_port()
    common: list[str | Path] = ["--fold", str(fold)]
    if config_file is not None:
        common += ["--config", config_file]
    if threads is not None:
        common += ["--threads", str(threads)]
    server_args = _server_args(out, run_dir, resuming, port, cache, rounds)
    site_args: list[str | Path] = [*common]
    site_args += ["--device", device] if device is not None else []
    site_args += ["--processes", str(site_processes)] if site_processes is not None else []
    site_args += ["--rounds", str(rounds)] if rounds is not None else []  # a site refuses rounds beyond its own count
    with Supervisor() as children:
        server = children.start("server", fedseg_command(*server_args, *common), logs / "server.log")
        # the clients start alongside the server (their start-up overlaps its own; they retry until it listens)
        for name, site_dir in zip(names, site_dirs, strict=True):
            argv = fedseg_command(*_client_args(out, fold, name, site_dir, port, cache), *site_args)
            children.start(f"client {name}", argv, logs / f"{name}.log")
        _wait_listening(port, server, SERVER_START_TIMEOUT_S)
        codes = children.wait_all(on_exit, timeout_s=deadline_s)
    _raise_failures(fold, codes, children)
    state = RunDir.open(run_dir).read_state()
    return FoldRun(fold, run_dir, state.completed_rounds, state.best_round, state.best_dice, time.perf_counter() - start)


def _server_args(out: Path, run_dir: Path, resuming: bool, port: int, cache: Path, rounds: int | None) -> list[str | Path]:
    where = ["--resume", run_dir] if resuming else ["--out", run_dir]
    args: list[str | Path] = [
        "server", "--kit", out / "kits" / "server", *where, "--host", "127.0.0.1", "--port", str(port), "--cache", cache,
    ]
    return args + (["--rounds", str(rounds)] if rounds is not None else [])


def _client_args(out: Path, fold: int, name: str, site_dir: Path, port: int, cache: Path) -> list[str | Path]:
    return [
        "client", "--kit", out / "kits" / name, "--data", site_dir, "--cache", cache,
        "--audit-log", out / "audit" / f"fold{fold}" / f"{name}.jsonl", "--server-url", f"wss://localhost:{port}",
        "--models", out / "sites" / name, "--share-case-names",  # all on this machine
    ]


def _raise_failures(fold: int, codes: dict[str, int], children: Supervisor) -> None:
    """Raise for the failed processes, the server's reason first: it names the sites that failed and why."""
    failed = sorted(((name, code) for name, code in codes.items() if code != 0), key=lambda item: item[0] != "server")
    if not failed:
        return
    name, code = failed[0]
    others = ", ".join(f"{n} (exit {c})" for n, c in failed[1:])
    error = children.children[name].failure(code)
    raise FedsegError(f"fold {fold}: {error}" + (f"\nalso failed: {others}" if others else ""))


def write_fl_model(
    model_dir: Path, study: StudyConfig, site_dirs: Sequence[Path], names: Sequence[str], run: FoldRun,
    site_processes: int | None = None,
) -> None:
    """Add fold ``run.fold`` (its best global model) to the FL model directory ``model_dir``."""
    trained_on = [{"site": name, "source": str(Path(d).resolve())} for name, d in zip(names, site_dirs, strict=True)]
    record = ModelRecord.new(study.train, study.prepare, trained_on).model_copy(update={
        "ensemble": "mean of the federated fold models' softmax probabilities, threshold 0.5",
        "federated": {"federation": study.federation.to_dict(), "sites": list(names)},
    })
    model_dir.mkdir(parents=True, exist_ok=True)
    open_model_dir(model_dir, record)
    best = RunDir(run.run_dir).round_folder(run.best_round) / "global.safetensors"
    weights = weights_from_numpy(load_file(str(best)))
    save_weights(model_dir / f"fold{run.fold}" / "best.safetensors", weights)
    write_json(
        model_dir / f"fold{run.fold}" / "best.json",
        {"source": str(best), "round": run.best_round, "median_val_dice": run.best_dice, "rounds": run.rounds},
    )
    hardware = {**resolve_hardware(study.train.device, study.train.amp).record(), "processes": site_processes or 1, "where": "every site"}
    record_fold(model_dir, FoldOutcome(run.fold, run.best_dice, run.best_round + 1, run.rounds, run.seconds, 0, hardware))


def run_local(
    site_dirs: Sequence[Path],
    out: Path,
    study: StudyConfig,
    *,
    folds: Sequence[int],
    rounds: int | None = None,
    config_file: Path | None = None,
    cache: Path,
    threads: int | None = None,
    on_exit: Callable[[str, int], None] | None = None,
    resume: bool = False,
    device: str | None = None,
    site_processes: int | None = None,
) -> list[FoldRun]:
    """Provision throw-away kits, run each fold's study in turn, write ``out/model``.

    With ``resume``, an earlier run in ``out`` continues: its kits are reused,
    finished folds are kept, an interrupted fold's server resumes after its
    last completed round (the clients start their local state afresh).
    ``device`` is given to every site process (else each uses the config's),
    and so is ``site_processes`` (each site then trains in that many CPU processes, DDP).

    Raises:
        FedsegError: clashing or invalid site names, ``out`` not empty, a
            process that failed (named, with the last lines of its log).
    """
    site_dirs = [Path(d) for d in site_dirs]
    names = site_names(site_dirs)
    out = Path(out)
    if not (resume and (out / "kits").is_dir()) and out.exists() and any(out.iterdir()):
        raise FedsegError(f"{out}: not empty; choose a new --out folder")
    with FolderLock(out, "fedseg federate"):  # a second federate on this folder is refused, naming this one's pid
        if resume and (out / "kits").is_dir():
            _check_kits(out / "kits", names)
        else:
            provision_study("localhost", names, out / "kits", study="local", port=free_port(),
                            secure_aggregation=study.federation.secure_aggregation)
        results = []
        for fold in folds:
            finished = RunDir(out / f"fold{fold}")
            if resume and (finished.root / "run.json").is_file() and finished.finished:
                state = finished.read_state()
                run = FoldRun(fold, finished.root, state.completed_rounds, state.best_round, state.best_dice, 0.0)
            else:
                run = run_fold(
                    site_dirs, names, out, fold, rounds=rounds, config_file=config_file, cache=cache, threads=threads,
                    on_exit=on_exit, device=device, site_processes=site_processes, deadline_s=fold_deadline(study, rounds),
                )
            write_fl_model(out / "model", study, site_dirs, names, run, site_processes)
            results.append(run)
    return results


START_MARGIN_S = 3600.0  # the server's start (a phantom prior may be trained first) and the processes' own start


def fold_deadline(study: StudyConfig, rounds: int | None) -> float:
    """The longest a fold can legitimately take: every round and the final step at their timeout, the grace, a start."""
    federation = study.federation
    return ((rounds or federation.rounds) + 1) * federation.round_timeout_s + federation.grace_s + START_MARGIN_S


def _check_kits(kits: Path, names: Sequence[str]) -> None:
    """Kits of an earlier local run may be reused only for the same sites."""
    try:
        allowed = sorted(load_kit(kits / "server").allowed_sites)
    except FedsegError as exc:
        raise FedsegError(f"{kits}: cannot reuse the kits of the earlier run ({exc})") from exc
    if allowed != sorted(names):
        raise FedsegError(f"{kits}: made for sites {allowed}, not {sorted(names)}; choose a new --out folder")
