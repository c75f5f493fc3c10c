"""The server's run directory: every completed round on disk, and resume after a crash.

Layout::

    RUN_DIR/run.json                    study description (sites, rounds, aggregator, ...)
    RUN_DIR/rounds/0000/global.safetensors   global weights after round 0
    RUN_DIR/rounds/0000/server_optimizer.safetensors   FedAdam moments (when used)
    RUN_DIR/rounds/0000/round.json      per-site metrics, aggregation weights, left-out sites
    RUN_DIR/state.json                  commit point: completed rounds, best round, finished
    RUN_DIR/evaluation.json             final step: each site's per-case test Dice of the final model
    RUN_DIR/final.safetensors, best.safetensors   written when the study is finished

A round's files are written first and ``state.json`` is replaced atomically
last, so after a crash at any instant — ``kill -9`` included — the run
directory names the last round that is complete on disk; a half-written round
folder is simply overwritten when that round is redone. No pickle: tensors in
safetensors, the rest in JSON. ``state.json`` is a :class:`RunState`,
``round.json`` a :class:`RoundRecord`, ``evaluation.json`` an
:class:`EvaluationRecord` (read with :meth:`RunDir.read_state`,
:meth:`RunDir.round_records`, :meth:`RunDir.evaluation`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import c_contiguous
from fedseg.federation.protocol.rounds import EvaluationCompleted, RoundCompleted
from fedseg.io import commit_file, read_json, write_json
from fedseg.schema import Record

RUN_FORMAT = 1
STATE = "state.json"
RUN = "run.json"
EVALUATION = "evaluation.json"


class RunState(Record):
    """``state.json``, the commit point: rounds complete on disk, the best of them, whether the study finished."""

    optional_keys = ("finished",)

    completed_rounds: int = 0
    best_round: int = -1  # -1: no round yet
    best_dice: float = -1.0  # the score of ``best_round``: its median site validation Dice (see round_score)
    finished: bool = False  # older runs, and unfinished ones, lack it

    @property
    def has_best(self) -> bool:
        return self.best_round >= 0


class SiteRound(Record):
    """One site's contribution to a round."""

    num_samples: int
    val_dice: float
    metrics: dict[str, Any] = {}


class RoundRecord(Record):
    """``rounds/<n>/round.json``: what a committed round aggregated, and how."""

    optional_keys = ("median_val_dice", "refused", "late_updates", "update_norms", "secure_aggregation", "mean_val_dice")

    round: int
    aggregated_val_dice: float  # site Dice weighted by the aggregation weights (what the paper reports)
    median_val_dice: float | None = None  # lower median of the sites' Dice: the score that picks the best round
    # secure aggregation: the server learnt sums only, so no per-site entry; the mean site Dice picks the best round
    secure_aggregation: bool = False
    mean_val_dice: float | None = None
    site_weights: dict[str, float]
    raw_weights: dict[str, float] = {}
    arrival_order: list[str] = []
    sites: dict[str, SiteRound]
    left_out: dict[str, str] = {}  # site -> why it is not in this round
    refused: dict[str, str] = {}  # site -> why its update was refused (also in left_out)
    late_updates: list[str] = []  # "site: reason" for stale, duplicate or unasked updates refused
    update_norms: dict[str, float] = {}  # each received update's change from the global model (L2)
    notes: list[str] = []

    @property
    def score(self) -> float:
        """What the best round is chosen by: the median Dice (secure aggregation: the mean; older runs: the aggregated one)."""
        if self.median_val_dice is not None:
            return self.median_val_dice
        return self.aggregated_val_dice if self.mean_val_dice is None else self.mean_val_dice


class SiteEvaluation(Record):
    """One site's per-case test Dice of the final model."""

    n: int
    mean_dice: float | None  # None when the site has no test case
    case_dice: dict[str, float]


class EvaluationRecord(Record):
    """``evaluation.json``: the final step, every site's per-case test Dice of the final model."""

    model: str = "final"
    rounds: int
    sites: dict[str, SiteEvaluation]
    left_out: dict[str, str] = {}


@dataclass(frozen=True)
class ResumePoint:
    """What a restarted server needs: the round to run next and the model to start it from."""

    completed_rounds: int
    global_weights: dict[str, np.ndarray]
    server_optimizer: dict[str, np.ndarray] | None
    best_round: int
    best_dice: float


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file({k: c_contiguous(v) for k, v in tensors.items()}, str(tmp))
    commit_file(tmp, path)


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise FedsegError(f"{path}: committed round cannot be read ({exc})") from exc


def aggregated_dice(completed: RoundCompleted) -> float:
    """The round's validation Dice: site Dice weighted by the aggregation weights (secure: from the unmasked sums)."""
    sums = completed.result.secure_sums
    if sums is not None:
        return float(sums["weighted_dice"] / sums["weight"])
    weights = completed.result.site_weights
    return float(sum(weights[site] * completed.updates[site].val_dice for site in weights))


def round_score(completed: RoundCompleted) -> float:
    """The lower median of the aggregated sites' validation Dice: no one site can raise it alone (with >= 3 sites).

    Under secure aggregation the server knows the sum of the sites' Dice only: the score is their mean.
    """
    sums = completed.result.secure_sums
    if sums is not None:
        return float(sums["dice"] / sums["count"])
    return float(statistics.median_low([update.val_dice for update in completed.updates.values()]))


class RunDir:
    """A server run directory (create a new one, or open one to resume)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls, root: Path, study: dict[str, Any]) -> RunDir:
        """Start a new run; refuses a folder that already holds anything."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise FedsegError(f"{root}: not empty; to continue a run use --resume {root}, else choose a new folder")
        (root / "rounds").mkdir(parents=True, exist_ok=True)
        write_json(root / RUN, {"format": RUN_FORMAT, **study})
        return cls(root)

    @classmethod
    def open(cls, root: Path) -> RunDir:
        """Open an existing run for resuming."""
        root = Path(root)
        if not (root / RUN).is_file():
            raise FedsegError(f"{root}: not a fedseg run directory (no {RUN})")
        run = cls(root)
        if run.study().get("format") != RUN_FORMAT:
            raise FedsegError(f"{root / RUN}: unsupported run format")
        return run

    def study(self) -> dict[str, Any]:
        return read_json(self.root / RUN)

    def round_folder(self, number: int) -> Path:
        return self.root / "rounds" / f"{number:04d}"

    def save_round(self, completed: RoundCompleted, server_optimizer: dict[str, np.ndarray] | None = None) -> Path:
        """Persist a completed round, then commit it in ``state.json``."""
        folder = self.round_folder(completed.round)
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(folder / "global.safetensors", completed.result.weights)
        if server_optimizer is not None:
            _save_tensors(folder / "server_optimizer.safetensors", server_optimizer)
        dice, score = aggregated_dice(completed), round_score(completed)
        _round_record(completed, dice, score).write(folder / "round.json")
        state = self.read_state()
        best_round, best_dice = (completed.round, score) if score > state.best_dice else (state.best_round, state.best_dice)
        RunState(completed_rounds=completed.round + 1, best_round=best_round, best_dice=best_dice).write(self.root / STATE)
        return folder

    def round_dice(self, number: int) -> float:
        """The aggregated validation Dice of committed round ``number`` (its ``round.json``)."""
        return RoundRecord.read(self.round_folder(number) / "round.json").aggregated_val_dice

    def best_score(self) -> tuple[int, float] | None:
        """(round, score) of the best committed round (score: its median site validation Dice), or None before any."""
        state = self.read_state()
        return (state.best_round, state.best_dice) if state.has_best else None

    def best(self) -> tuple[int, float, dict[str, np.ndarray]] | None:
        """(round, score, weights) of the best committed round (as :meth:`best_score`), or None."""
        state = self.read_state()
        if not state.has_best:
            return None
        return state.best_round, state.best_dice, _load(self.round_folder(state.best_round) / "global.safetensors")

    def save_evaluation(self, completed: EvaluationCompleted) -> Path:
        """Write the final step's per-case Dice (``evaluation.json``)."""
        sites = {
            site: SiteEvaluation(
                n=len(scores), mean_dice=float(np.mean(list(scores.values()))) if scores else None, case_dice=scores
            )
            for site, scores in sorted(completed.case_dice.items())
        }
        record = EvaluationRecord(rounds=self.read_state().completed_rounds, sites=sites, left_out=completed.left_out)
        record.write(self.root / EVALUATION)
        return self.root / EVALUATION

    def evaluation(self) -> EvaluationRecord | None:
        """The final step's ``evaluation.json``; None before it, or without it (``evaluate = false``)."""
        path = self.root / EVALUATION
        return EvaluationRecord.read(path) if path.is_file() else None

    def finish(self, final_weights: dict[str, np.ndarray]) -> None:
        """Keep the final and best models at the top of the run and mark the study finished."""
        _save_tensors(self.root / "final.safetensors", final_weights)
        best = self.best()
        if best is not None:
            _save_tensors(self.root / "best.safetensors", best[2])
        self.read_state().model_copy(update={"finished": True}).write(self.root / STATE)

    @property
    def finished(self) -> bool:
        return self.read_state().finished

    def read_state(self) -> RunState:
        """``state.json`` (a new run's state before it exists)."""
        path = self.root / STATE
        return RunState.read(path) if path.is_file() else RunState()

    def round_records(self) -> list[RoundRecord]:
        """``round.json`` of every committed round, in order (the run's history)."""
        done = self.read_state().completed_rounds
        return [RoundRecord.read(self.round_folder(n) / "round.json") for n in range(done)]

    def resume_point(self) -> ResumePoint | None:
        """The last committed round, or None when no round completed yet."""
        state = self.read_state()
        if state.completed_rounds == 0:
            return None
        folder = self.round_folder(state.completed_rounds - 1)
        weights = _load(folder / "global.safetensors")
        optimizer_path = folder / "server_optimizer.safetensors"
        optimizer = _load(optimizer_path) if optimizer_path.is_file() else None
        return ResumePoint(state.completed_rounds, weights, optimizer, state.best_round, state.best_dice)


def _round_record(completed: RoundCompleted, dice: float, score: float) -> RoundRecord:
    secure = completed.result.secure_sums is not None
    return RoundRecord(
        round=completed.round,
        aggregated_val_dice=dice,
        median_val_dice=None if secure else score,
        secure_aggregation=secure,
        mean_val_dice=score if secure else None,
        site_weights=completed.result.site_weights,
        raw_weights=completed.result.raw_weights,
        arrival_order=list(completed.result.sites),
        sites={
            site: SiteRound(num_samples=u.num_samples, val_dice=u.val_dice, metrics=dict(u.metrics))
            for site, u in completed.updates.items()
        },
        left_out=completed.left_out,
        refused=dict(completed.refused),
        late_updates=list(completed.late),
        update_norms=dict(completed.result.update_norms),
        notes=list(completed.result.notes),
    )
