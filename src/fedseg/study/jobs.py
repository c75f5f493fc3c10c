"""Work units of a study that run in worker processes: train one fold, evaluate one model.

Each job takes and returns plain JSON-shaped dicts (worker processes get
specs and return results as JSON lines: see fedseg.study.workers and
:func:`serve`), prepares nothing new (the sites are already in the cache) and
writes only inside its own fold folder — the parent process owns every
``model.json``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedseg.data.preprocess import PrepareConfig
from fedseg.io import dumps_json, loads_json
from fedseg.training.config import TrainConfig
from fedseg.training.data import PreparedSite, resolve_site
from fedseg.training.fit import train_fold, training_set
from fedseg.training.pretrain import starting_weights

__all__ = ["JOBS", "evaluate_job", "synth_job", "train_job"]


def _sites(spec: dict[str, Any]) -> tuple[list[PreparedSite], PrepareConfig]:
    prepare = PrepareConfig.from_dict(spec["prepare"], source="the study's prepare settings")
    return [resolve_site(Path(d), prepare, Path(spec["cache"])) for d in spec["sites"]], prepare


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or find finished) fold ``spec["fold"]`` of ``spec["model_dir"]``.

    ``spec``: model_dir, fold, sites (one site folder, or several to pool),
    cache, train (TrainConfig dict), prepare (PrepareConfig dict).
    Returns the FoldOutcome as a dict plus the job's ``model`` name.
    """
    config = TrainConfig.from_dict(spec["train"], source="the study's train settings")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    sites, prepare = _sites(spec)
    fold = int(spec["fold"])
    training = training_set(sites, fold, config.patch)
    init = starting_weights(config, prepare, Path(spec["cache"]))  # made by the pipeline before the jobs
    outcome = train_fold(training, Path(spec["model_dir"]) / f"fold{fold}", config, fold=fold, init_weights=init)
    return {"model": spec["model"], **asdict(outcome)}


def evaluate_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-case Dice of model ``spec["model_dir"]`` on each test set of ``spec["test_sets"]``.

    ``test_sets`` maps a test-set name to (site folder, split) with split
    ``"test"`` (a site's held-out cases) or ``"all"`` (an external set).
    """
    from fedseg.evaluation.evaluate import evaluate_site
    from fedseg.inference import Ensemble
    from fedseg.training.device import resolve_hardware

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    prepare = PrepareConfig.from_dict(spec["prepare"], source="the study's prepare settings")
    hardware = resolve_hardware(spec.get("device", "cpu"), spec.get("amp"))
    ensemble = Ensemble.load(Path(spec["model_dir"]), hardware=hardware)
    dice = {}
    for name, (site_dir, split) in spec["test_sets"].items():
        site = resolve_site(Path(site_dir), prepare, Path(spec["cache"]))
        dice[name] = evaluate_site(ensemble, site, split)
    return {"model": spec["model"], "dice": dice}


def synth_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Synthesise one institution (``spec``: out_dir, profile, cases, seed, resolution_scale)."""
    from fedseg.data.site_profiles import get_profile
    from fedseg.data.synth import synthesize_site

    synthesize_site(
        Path(spec["out_dir"]), get_profile(spec["profile"]), int(spec["cases"]), int(spec["seed"]),
        resolution_scale=float(spec["resolution_scale"]),
    )
    return {"profile": spec["profile"], "cases": int(spec["cases"])}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"synth": synth_job, "train": train_job, "evaluate": evaluate_job}


def serve() -> int:
    """Worker loop of fedseg.study.workers: one JSON request per stdin line, one JSON reply per stdout line."""
    replies = sys.stdout
    sys.stdout = sys.stderr  # a job's own prints must not corrupt the reply stream
    for line in sys.stdin:
        request = loads_json(line)
        try:
            reply = {"ok": True, "result": JOBS[request["job"]](request["spec"])}
        except Exception:  # noqa: BLE001 -- the parent reports it, with the traceback
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(dumps_json(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        print("usage: python -m fedseg.study.jobs --serve   (started by fedseg study; requests on stdin)", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve())
