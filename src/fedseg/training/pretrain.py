"""Starting weights learned on fedseg's own phantom (``[train] init = "phantom"``).

Sites of a few cases cannot train a 3-D network from scratch (on the shared
PROMISE12 sites, 3 training cases per fold: private Dice 0.2-0.3). A shape
prior helps, and fedseg makes one itself, without any download: it
synthesises three phantom institutions (NCI, SUNY, UCLA, docs/sites.md),
prepares them exactly as the study's own data (same voxel size and
normalisation), trains one pooled model with the study's network and patch
(the recipe's optimiser settings, :data:`PHANTOM_RECIPE`), and caches the
weights with their provenance::

    CACHE/init/phantom-<key>/weights.safetensors   the starting weights
    CACHE/init/phantom-<key>/provenance.json       recipe, validation Dice, time, fedseg version

``<key>`` hashes everything the weights depend on, so every fold, site and
server of a study starts from the same file, made once (a lock keeps two
processes from making it twice). No scan of any real site is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedseg import __version__
from fedseg.data.layout import discover_site
from fedseg.data.preprocess import PrepareConfig
from fedseg.data.site_profiles import get_profile
from fedseg.data.synth import synthesize_site
from fedseg.errors import FedsegError
from fedseg.schema import Record
from fedseg.training.checkpoint import load_weights, save_weights
from fedseg.training.config import MACHINE_OPTIONS, TrainConfig
from fedseg.training.data import SiteData, resolve_site
from fedseg.training.fit import TrainingSet, train_fold

__all__ = ["PHANTOM_RECIPE", "Provenance", "phantom_provenance", "starting_weights"]

PHANTOM_RECIPE: dict[str, Any] = {
    "sites": ["nci", "suny", "ucla"],
    "cases_per_site": 24,
    "validation_cases_per_site": 2,
    "resolution_scale": 2.0,
    "synthesis_seed": 9000,  # away from the study seeds 0, 1, 2, ...: never the study's own synthetic cases
    "epochs": 30,
    "learning_rate": 1e-2,
    "samples_per_volume": 4,
    "lr_patience": 4,
    "stop_patience": 8,
    "min_val_dice": 0.5,  # below this on the phantoms themselves the prior is not worth starting from
}


def starting_weights(
    config: TrainConfig, prepare: PrepareConfig, cache: Path, say: Callable[[str], None] | None = None
) -> dict[str, torch.Tensor] | None:
    """The weights a model of ``config`` starts from: None for ``init = "random"`` (the seeded initialisation),
    else the phantom weights, made and cached first if needed (minutes, once per network/patch/voxel size)."""
    if config.init == "random":
        return None
    folder = _folder(config, prepare, cache)
    with _locked(folder):
        if not (folder / "weights.safetensors").is_file():
            _make(config, prepare, folder, say or (lambda _line: None))
    return load_weights(folder / "weights.safetensors")


class Provenance(Record):
    """``provenance.json``: how the cached starting weights were made (``model.json`` keeps a copy as ``init``)."""

    init: str = "phantom"
    made_by: str
    recipe: dict[str, Any]
    train_config: dict[str, Any]
    prepare: dict[str, Any]
    best_val_dice: float
    best_epoch: int
    epochs: int
    seconds: float
    data: str = "synthetic phantoms only (no scan of any site)"


def phantom_provenance(config: TrainConfig, prepare: PrepareConfig, cache: Path) -> dict[str, Any] | None:
    """What ``model.json`` records as ``init`` about the starting weights: their checked ``provenance.json``
    (None for a random start or before they exist)."""
    path = _folder(config, prepare, cache) / "provenance.json"
    if config.init == "random" or not path.is_file():
        return None
    return Provenance.read(path).to_dict()


def _recipe_config(config: TrainConfig) -> TrainConfig:
    """The pre-training's own settings: the run's network and patch (the weights must fit them) and machine
    options, the recipe's for everything else, so that one cached prior serves runs that differ otherwise."""
    machine = {name: getattr(config, name) for name in MACHINE_OPTIONS}
    return TrainConfig(
        network=config.network, patch_size=config.patch, epochs=PHANTOM_RECIPE["epochs"],
        learning_rate=PHANTOM_RECIPE["learning_rate"], samples_per_volume=PHANTOM_RECIPE["samples_per_volume"],
        lr_patience=PHANTOM_RECIPE["lr_patience"], stop_patience=PHANTOM_RECIPE["stop_patience"],
        seed=PHANTOM_RECIPE["synthesis_seed"], **machine,
    )


def _folder(config: TrainConfig, prepare: PrepareConfig, cache: Path) -> Path:
    identity = {
        "fedseg_version": __version__,  # the phantom and the engine may change between versions
        "recipe": PHANTOM_RECIPE,
        "train": _recipe_config(config).without_machine_options(),
        "prepare": prepare.to_dict(),
    }
    # the key string must not change between versions of this code: every cached prior would be made again
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / "init" / f"phantom-{key}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s lock file (two study workers may ask for the weights at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the atomic writes still keep the cache consistent
        yield
        return
    with open(folder.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _make(config: TrainConfig, prepare: PrepareConfig, folder: Path, say: Callable[[str], None]) -> None:
    start = time.perf_counter()
    recipe = PHANTOM_RECIPE
    work = folder.with_name(folder.name + ".work")
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted run left
    say(f"init = phantom: synthesising {len(recipe['sites'])} phantom institutions x {recipe['cases_per_site']} cases "
        f"and training the starting weights once ({config.network}, {prepare.spacing_mm:g} mm; cached in {folder})")
    train, val, sources = [], [], []
    for name in recipe["sites"]:
        site_dir = synthesize_site(
            work / "sites" / name, get_profile(name), recipe["cases_per_site"], recipe["synthesis_seed"],
            resolution_scale=recipe["resolution_scale"],
        )
        site = resolve_site(site_dir, prepare, work / "cache")
        data = SiteData(site, config.patch)
        ids = sorted(c.case_id for c in discover_site(site.prepared).cases)
        held = recipe["validation_cases_per_site"]
        train += data.cases(ids[:-held])
        val += data.cases(ids[-held:])
        sources.append({"site": f"phantom:{name}", "source": "fedseg data synth"})
    recipe_config = _recipe_config(config)
    training = TrainingSet("phantom", train, val, f"phantom-{folder.name}", sources)
    outcome = train_fold(training, work / "fold", recipe_config)
    if not outcome.best_val_dice >= recipe["min_val_dice"]:  # also NaN
        raise FedsegError(f"init = phantom: pre-training reached validation Dice {outcome.best_val_dice:.3f} only; "
                          f"see {work / 'fold'}")
    weights = load_weights(work / "fold" / "best.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    Provenance(
        made_by=f"fedseg {__version__}", recipe=recipe, train_config=recipe_config.to_dict(), prepare=prepare.to_dict(),
        best_val_dice=outcome.best_val_dice, best_epoch=outcome.best_epoch, epochs=outcome.epochs,
        seconds=round(time.perf_counter() - start, 1),
    ).write(folder / "provenance.json")
    save_weights(folder / "weights.safetensors", weights)  # last: its presence means the folder is complete
    shutil.rmtree(work, ignore_errors=True)
    say(f"init = phantom: starting weights ready (phantom validation Dice {outcome.best_val_dice:.3f}, "
        f"{time.perf_counter() - start:.0f} s)")

