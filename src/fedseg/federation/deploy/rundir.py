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
safetensors, the rest in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedseg.errors import FedsegError
from fedseg.federation.protocol.rounds import EvaluationCompleted, RoundCompleted
from fedseg.io import commit_file, read_json, write_json

RUN_FORMAT = 1
STATE = "state.json"
RUN = "run.json"
EVALUATION = "evaluation.json"


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
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    commit_file(tmp, path)


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise FedsegError(f"{path}: committed round cannot be read ({exc})") from exc


def aggregated_dice(completed: RoundCompleted) -> float:
    """The round's validation Dice: site Dice weighted by the aggregation weights."""
    weights = completed.result.site_weights
    return float(sum(weights[site] * completed.updates[site].val_dice for site in weights))


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
        dice = aggregated_dice(completed)
        write_json(folder / "round.json", _round_record(completed, dice))
        state = self.state()
        best_round, best_dice = state.get("best_round", -1), state.get("best_dice", -1.0)
        if dice > best_dice:
            best_round, best_dice = completed.round, dice
        write_json(
            self.root / STATE,
            {"completed_rounds": completed.round + 1, "best_round": best_round, "best_dice": best_dice},
        )
        return folder

    def best(self) -> tuple[int, float, dict[str, np.ndarray]] | None:
        """(round, aggregated validation Dice, weights) of the best committed round, or None."""
        state = self.state()
        if state.get("best_round", -1) < 0:
            return None
        number = int(state["best_round"])
        return number, float(state["best_dice"]), _load(self.round_folder(number) / "global.safetensors")

    def save_evaluation(self, completed: EvaluationCompleted) -> Path:
        """Write the final step's per-case Dice (``evaluation.json``)."""
        sites = {
            site: {"n": len(scores), "mean_dice": float(np.mean(list(scores.values()))) if scores else None, "case_dice": scores}
            for site, scores in sorted(completed.case_dice.items())
        }
        record = {"model": "final", "rounds": self.state()["completed_rounds"], "sites": sites, "left_out": completed.left_out}
        write_json(self.root / EVALUATION, record)
        return self.root / EVALUATION

    def finish(self, final_weights: dict[str, np.ndarray]) -> None:
        """Keep the final and best models at the top of the run and mark the study finished."""
        _save_tensors(self.root / "final.safetensors", final_weights)
        best = self.best()
        if best is not None:
            _save_tensors(self.root / "best.safetensors", best[2])
        write_json(self.root / STATE, {**self.state(), "finished": True})

    @property
    def finished(self) -> bool:
        return bool(self.state().get("finished", False))

    def state(self) -> dict[str, Any]:
        path = self.root / STATE
        return read_json(path) if path.is_file() else {"completed_rounds": 0}

    def rounds(self) -> list[dict[str, Any]]:
        """``round.json`` of every committed round, in order (the run's history)."""
        done = self.state()["completed_rounds"]
        return [read_json(self.round_folder(n) / "round.json") for n in range(done)]

    def resume_point(self) -> ResumePoint | None:
        """The last committed round, or None when no round completed yet."""
        state = self.state()
        done = int(state["completed_rounds"])
        if done == 0:
            return None
        folder = self.round_folder(done - 1)
        weights = _load(folder / "global.safetensors")
        optimizer_path = folder / "server_optimizer.safetensors"
        optimizer = _load(optimizer_path) if optimizer_path.is_file() else None
        return ResumePoint(done, weights, optimizer, int(state["best_round"]), float(state["best_dice"]))


def _round_record(completed: RoundCompleted, dice: float) -> dict[str, Any]:
    return {
        "round": completed.round,
        "aggregated_val_dice": dice,
        "site_weights": completed.result.site_weights,
        "raw_weights": completed.result.raw_weights,
        "arrival_order": list(completed.result.sites),
        "sites": {
            site: {"num_samples": u.num_samples, "val_dice": u.val_dice, "metrics": dict(u.metrics)}
            for site, u in completed.updates.items()
        },
        "left_out": completed.left_out,
        "notes": list(completed.result.notes),
    }
