"""One federated study on the server, new or resumed: kit, run directory, settings, starting model, then serve.

``fedseg server`` is a thin shell around this::

    run = ServerRun.new(kit, config, out, fold=0, cache=cache)      # --out RUN_DIR
    run = ServerRun.resume(kit, run_dir, cache=cache)               # --resume RUN_DIR
    run.run(host="0.0.0.0")                                         # until the last round

A new run records its settings in ``run.json``; a resumed run takes them from
there (unless a config file is given), checks the kit's sites are the run's,
and continues after the last committed round with its global model and the
server optimiser's state. A fresh round-0 model is made only when no round was
committed: with ``train.init = "phantom"`` it may first have to be trained (minutes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.federation.config import StudyConfig, load_study_config
from fedseg.federation.deploy.lifecycle import explained_site_change
from fedseg.federation.deploy.spool import SPOOL, DiskStore
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.protocol.rounds import RoundsConfig
from fedseg.federation.strategies import Aggregator, Weights
from fedseg.federation.transport.kit import Kit, StudyCA, load_certificate, load_kit
from fedseg.federation.transport.server import run_server
from fedseg.io import FolderLock
from fedseg.models import build_model, weights_to_numpy
from fedseg.training.config import TrainConfig
from fedseg.training.pretrain import starting_weights

__all__ = ["ServerRun", "initial_global_weights"]

logger = logging.getLogger(__name__)

Say = Callable[[str], object]


def initial_global_weights(train: TrainConfig, prepare: PrepareConfig, cache: Path, say: Say | None = None) -> Weights:
    """Round 0's global model: the seeded initialisation, or the phantom starting weights (``init = "phantom"``)."""
    state = starting_weights(train, prepare, cache, say=say) or build_model(train.network, seed=train.seed).state_dict()
    return weights_to_numpy(state)


@dataclass(frozen=True)
class ServerRun:
    """A server's study, ready to serve: made by :meth:`new` or :meth:`resume`, served by :meth:`run`.

    Attributes:
        kit: the server's kit.
        root: the run directory.
        study: the settings, with the command line's overrides applied.
        fold: the cross-validation fold the sites train.
        resuming: whether ``root`` is an existing run.
        cache: folder of cached starting weights (``train.init = "phantom"``).
        say: where progress lines go (the CLI passes its console).
    """

    kit: Kit
    root: Path
    study: StudyConfig
    fold: int
    resuming: bool
    cache: Path
    say: Say = logger.info

    @property
    def sites(self) -> list[str]:
        """The study's sites, sorted: those the kit allows to connect."""
        return sorted(self.kit.allowed_sites)

    @classmethod
    def new(
        cls, kit: Path, config: Path | None, out: Path, *, fold: int = 0, rounds: int | None = None,
        threads: int | None = None, cache: Path, say: Say = logger.info,
    ) -> ServerRun:
        """A new study in the new folder ``out`` with the settings of ``config`` (None: the defaults).

        Raises:
            FedsegError: ``kit`` is not a usable server kit, or ``config`` is invalid.
        """
        server_kit = _server_kit(kit)
        study = _overridden(load_study_config(config), rounds, threads)
        return cls(server_kit, Path(out), study, fold, False, Path(cache), say)

    @classmethod
    def resume(
        cls, kit: Path, run_dir: Path, *, config: Path | None = None, fold: int = 0, rounds: int | None = None,
        threads: int | None = None, cache: Path, say: Say = logger.info,
    ) -> ServerRun:
        """Continue the run in ``run_dir`` with its recorded settings (or those of ``config``).

        ``rounds`` defaults to the run's; ``fold`` is the run's (the argument only
        for runs that recorded none).

        Raises:
            FedsegError: not a run directory, or a run of other sites than the kit's study.
        """
        server_kit = _server_kit(kit)
        recorded = RunDir.open(run_dir).study()
        study = load_study_config(config) if config is not None else _recorded_study(recorded, str(run_dir))
        sites = sorted(server_kit.allowed_sites)
        if recorded.get("sites") != sites:
            change = explained_site_change(server_kit, list(recorded.get("sites") or []))
            if change is None:
                raise FedsegError(
                    f"{run_dir}: run of sites {recorded.get('sites')}, but the kit's study has {sites} "
                    "(only 'fedseg provision add-site' and 'revoke --remove' may change them)"
                )
            say(f"the study's sites changed since the last round ({change}): continuing with {', '.join(sites)}")
        rounds = int(recorded["rounds"]) if rounds is None else rounds
        run_fold = int(recorded.get("fold", fold))
        return cls(server_kit, Path(run_dir), _overridden(study, rounds, threads), run_fold, True, Path(cache), say)

    def run(self, *, host: str = "0.0.0.0", port: int | None = None) -> RunDir:
        """Serve the study until its last round (and the final evaluation); returns its run directory.

        ``port`` defaults to the kit's.

        Raises:
            FedsegError: the study failed (e.g. quorum lost), or ``root`` of a new run is not empty.
        """
        federation, train = self.study.federation, self.study.train
        self.kit.require_secure_aggregation(federation.secure_aggregation, "the run's study settings")
        if train.threads is not None:
            torch.set_num_threads(train.threads)
        # the round's updates wait on disk, not in memory (scratch, emptied every round)
        aggregator = federation.make_aggregator(DiskStore(self.root / SPOOL))
        run, weights, first_round = self.starting_point(aggregator)
        lock = FolderLock(run.root, "fedseg server").acquire()  # a second server on this run is refused
        n_sites = len(self.sites)
        rounds = RoundsConfig(
            sites=tuple(self.sites), rounds=federation.rounds, min_sites=federation.quorum(n_sites),
            evaluate=federation.evaluate, declared_samples=self.kit.declared_cases,
            secure=federation.secure_settings(),
            certificates=StudyCA(load_certificate(self.kit.ca)) if federation.secure_aggregation else None,
        )
        try:
            asyncio.run(
                run_server(
                    self.kit, run, rounds, aggregator, weights,
                    host=host, port=port if port is not None else int(self.kit.study["port"]),
                    round_timeout_s=federation.round_timeout_s, grace_s=federation.grace_s, first_round=first_round,
                    settings=self.study.site_settings(self.fold), local_epochs=federation.local_epochs,
                )
            )
        finally:
            lock.release()
        return run

    def starting_point(self, aggregator: Aggregator) -> tuple[RunDir, Weights, int]:
        """The run directory, the global model to start from and the first round to run.

        Resuming after a committed round: that round's global model, and
        ``aggregator`` gets back the server optimiser's state. Otherwise a fresh
        round-0 model, and a new run's directory is created (only now).
        """
        run = RunDir.open(self.root) if self.resuming else None
        point = run.resume_point() if run is not None else None
        if point is not None:
            self._restore(aggregator, point.server_optimizer)
            self.say(f"resuming after round {point.completed_rounds - 1} ({point.completed_rounds} completed)")
            return run, point.global_weights, point.completed_rounds
        # only now: with init = "phantom" the round-0 model may first have to be trained (minutes)
        weights = initial_global_weights(self.study.train, self.study.prepare, self.cache, say=self.say)
        if run is None:  # created after the model: a failed start leaves no half-made run behind
            run = RunDir.create(self.root, self._record())
        return run, weights, 0

    def _restore(self, aggregator: Aggregator, state: Weights | None) -> None:
        if state is None:
            return
        if aggregator.state_dict() is None:  # e.g. a fedadam run resumed with a plain aggregator
            logger.warning("%s: the run's server optimiser state is not used by %s", self.root, aggregator.name)
            return
        aggregator.load_state_dict(state)

    def _record(self) -> dict[str, Any]:
        """``run.json`` of a new run: what a resume needs to continue it as it was."""
        federation, train, prepare = self.study.federation, self.study.train, self.study.prepare
        return {
            "sites": self.sites, "rounds": federation.rounds, "aggregator": federation.aggregator,
            "server_optimizer": federation.server_optimizer, "min_sites": federation.quorum(len(self.sites)),
            "fold": self.fold, "federation": federation.to_dict(), "train": train.to_dict(), "prepare": prepare.to_dict(),
            "study": self.kit.study.get("study"),
        }


def _server_kit(path: Path) -> Kit:
    kit = load_kit(path)
    if kit.role != "server":
        raise FedsegError(f"{path}: a {kit.role} kit; the server needs the server kit")
    return kit


def _overridden(study: StudyConfig, rounds: int | None, threads: int | None) -> StudyConfig:
    """``study`` with the command line's ``--rounds`` and ``--threads`` (None: keep)."""
    federation = study.federation if rounds is None else study.federation.replace(rounds=rounds)
    train = study.train if threads is None else study.train.replace(threads=threads)
    return StudyConfig(federation, train, study.prepare)


def _recorded_study(recorded: dict[str, Any], source: str) -> StudyConfig:
    """The settings a run recorded in ``run.json`` (runs of fedseg 0.1 may lack ``prepare``: its defaults)."""
    tables = {"federation": recorded["federation"], "train": recorded["train"], "prepare": recorded.get("prepare", {})}
    return StudyConfig.from_dict(tables, source)
