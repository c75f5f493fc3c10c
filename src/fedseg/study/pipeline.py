"""``fedseg study``: the paper's experiment as resumable steps.

Steps (each skipped when its output is already complete for these settings):

1. ``data``     synthesise the institutions and the external set (without ``--sites``);
2. ``prepare``  resample every site (cache) and make its 80/20 split and folds;
3. ``train``    the private ensemble of every site and the pooled ensemble,
                fold by fold in ``plan.workers`` processes;
4. ``federate`` the FL ensemble through the real runtime: one server and one
                client process per site over mutual TLS on 127.0.0.1;
5. ``evaluate`` every ensemble on every site's held-out test set and the external set;
6. ``report``   results.json, report.md, report.html, figures and tables.

Layout of ``OUT``::

    settings.json                 what this study was run with (a rerun must match)
    study.toml                    the federation/train/prepare tables the processes read
    data/<site>/                  synthetic sites (without --sites)
    cache/                        prepared copies of the sites
    models/private:<site>/ models/pooled/ models/fl/   model directories (fedseg predict/evaluate)
    fl/                           the federated runs (kits, fold<k>/rounds, logs, audit)
    eval/<model>.json             per-case Dice of a model on every test set
    results.json, report.md, report.html, figures/, tables/
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg import __version__
from fedseg.data.layout import discover_site
from fedseg.data.splits import small_site_warning
from fedseg.errors import FedsegError
from fedseg.federation.deploy.local import run_local, site_names
from fedseg.federation.protocol.settings import settings_differences
from fedseg.study.workers import run_jobs
from fedseg.study.profiles import Settings
from fedseg.io import read_json, write_json
from fedseg.modeldir import MODEL_JSON, FoldOutcome, ModelRecord, open_model_dir, read_model_record, record_fold
from fedseg.schema import write_toml
from fedseg.training.config import without_machine_options
from fedseg.training.data import PreparedSite, resolve_site
from fedseg.training.pretrain import phantom_provenance, starting_weights

SMALL_SITES_TRAIN_CASES = 10  # below this many training cases at a site, suggest the small-sites profile

__all__ = ["STEPS", "StudyRun", "StudySources"]

STEPS = ("data", "prepare", "train", "federate", "evaluate", "report")
FL, POOLED = "fl", "pooled"
Say = Callable[[str], None]


def private_model(site: str) -> str:
    return f"private:{site}"


@dataclass(frozen=True)
class StudySources:
    """Where the sites come from: given folders, or synthetic ones made in OUT/data."""

    sites: tuple[Path, ...] = ()
    external: Path | None = None

    @property
    def synthetic(self) -> bool:
        return not self.sites

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [str(Path(p).resolve()) for p in self.sites],
            "external": str(Path(self.external).resolve()) if self.external else None,
        }


class StudyRun:
    """One study in ``out``: the steps, their bookkeeping and the outputs they share."""

    def __init__(self, out: Path, settings: Settings, sources: StudySources, say: Say = print) -> None:
        self.out = Path(out)
        self.settings = settings
        self.sources = sources
        self.say = say
        self.sites: list[PreparedSite] = []
        self.external: PreparedSite | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------ bookkeeping

    @property
    def record(self) -> dict[str, Any]:
        return {"fedseg_version": __version__, **self.settings.to_dict(), "sources": self.sources.to_dict()}

    def check_sources(self) -> None:
        """Given site folders: at least two, distinct names, readable layouts (before anything is written)."""
        if self.sources.synthetic:
            return
        if len(self.site_dirs) < 2:
            raise FedsegError("a study needs at least two sites (--sites A B ...)")
        site_names(self.site_dirs)  # clear error for clashing or missing folders
        for folder in [*self.site_dirs, *([self.external_dir] if self.external_dir else [])]:
            if not Path(folder).is_dir():
                raise FedsegError(f"external test set folder {folder} does not exist")
            discover_site(folder, self.settings.study.prepare.modality)

    def claim(self) -> None:
        """Start a new study in ``out`` or check that ``out`` holds this same study."""
        self.check_sources()
        path = self.out / "settings.json"
        if path.is_file():
            earlier, now = _comparable(read_json(path)), _comparable(self.record)
            differences = settings_differences(now, earlier, common_only=True)
            if differences:
                shown = "; ".join(d.replace("on the server", "in the earlier run") for d in differences[:6])
                raise FedsegError(
                    f"{self.out} holds a study run with other settings ({shown}); "
                    "choose a new --out folder (nothing there was changed)"
                )
            self.say(f"continuing the study in {self.out}: finished steps are skipped")
        elif self.out.exists() and any(self.out.iterdir()):
            raise FedsegError(f"{self.out}: not empty and not a fedseg study; choose a new --out folder")
        else:
            write_json(path, self.record)
        write_toml(self.out / "study.toml", self.settings.study.tables())

    def _done(self, step: str) -> dict[str, Any] | None:
        path = self.out / "steps" / f"{step}.json"
        return read_json(path) if path.is_file() else None

    def _finish(self, step: str, seconds: float, **details: Any) -> None:
        write_json(self.out / "steps" / f"{step}.json", {"seconds": seconds, **details})

    def run(self, steps: Iterable[str] = STEPS) -> None:
        """Run ``steps`` in order, timing each."""
        self.claim()
        for step in steps:
            start = time.perf_counter()
            getattr(self, f"step_{step}")()
            self.timings[step] = time.perf_counter() - start
            self.say(f"step {step}: {self.timings[step]:.0f} s")

    # ------------------------------------------------------------ 1-2 data

    @property
    def site_dirs(self) -> list[Path]:
        if not self.sources.synthetic:
            return [Path(p) for p in self.sources.sites]
        from fedseg.data.synth import DEFAULT_SITES  # noqa: PLC0415 - only synthetic studies need it

        return [self.out / "data" / site for site in DEFAULT_SITES]

    @property
    def external_dir(self) -> Path | None:
        if not self.sources.synthetic:
            return Path(self.sources.external) if self.sources.external else None
        from fedseg.data.synth import DEFAULT_EXTERNAL

        return self.out / "data" / DEFAULT_EXTERNAL

    def step_data(self) -> None:
        if not self.sources.synthetic:
            return  # checked by check_sources
        if self._done("data"):
            self.say("data: synthetic institutions already written (skipped)")
            return
        from fedseg.data.synth import DEFAULT_EXTERNAL, DEFAULT_SITES, synthesize_study

        plan = self.settings.plan
        data = self.out / "data"
        if data.exists():
            shutil.rmtree(data)  # a synthesis interrupted midway: ours, and incomplete
        start = time.perf_counter()
        self.say(f"data: synthesising {', '.join(DEFAULT_SITES)} ({plan.cases} cases each) and "
                 f"{DEFAULT_EXTERNAL} ({plan.external_cases} cases)")
        if plan.workers <= 1:
            synthesize_study(
                data, list(DEFAULT_SITES), DEFAULT_EXTERNAL, plan.cases, plan.seed,
                external_cases=plan.external_cases, resolution_scale=plan.resolution_scale,
            )
        else:  # one institution per worker: the same files (seeds are per case), sooner
            counts = {site: plan.cases for site in DEFAULT_SITES} | {DEFAULT_EXTERNAL: plan.external_cases}
            specs = [
                {"out_dir": str(data / site), "profile": site, "cases": n, "seed": plan.seed,
                 "resolution_scale": plan.resolution_scale}
                for site, n in counts.items()
            ]
            for _ in self._pool("synth", specs):
                pass
        self._finish("data", time.perf_counter() - start)

    def step_prepare(self) -> None:
        prepare, cache = self.settings.study.prepare, self.out / "cache"
        self.sites = [resolve_site(d, prepare, cache) for d in self.site_dirs]
        for site in self.sites:
            site.require_splits()
        if self.external_dir is not None:
            self.external = resolve_site(self.external_dir, prepare, cache)
        folds = self.n_folds
        self.say("prepare: " + "; ".join(
            f"{s.name}: {len(s.require_splits().train)} train / {len(s.require_splits().test)} test, "
            f"{len(s.require_splits().folds)} folds" for s in self.sites
        ) + (f"; external {self.external.name}" if self.external else "") + f" -> {folds}-fold ensembles")
        for site in self.sites:
            splits = site.require_splits()
            warning = small_site_warning(site.name, len(splits.train) + len(splits.test))
            if warning:
                self.say(f"  warning: {warning}")
        smallest = min(len(site.require_splits().train) for site in self.sites)
        if smallest < SMALL_SITES_TRAIN_CASES and self.settings.study.train.init == "random":
            self.say(f"  tip: a site here has only {smallest} training cases; models trained from scratch on so few "
                     "are poor (docs/results.md). --profile small-sites starts every model from weights fedseg "
                     "trains on its own phantom institutions ([train] init = \"phantom\")")
        wanted = self.settings.plan.folds
        if wanted is not None and wanted > folds:
            self.say(f"  note: study.folds = {wanted}, but the smallest site has only {folds} folds; using {folds}")

    def _sites_ready(self) -> None:
        if not self.sites:
            self.step_prepare()

    @property
    def available_folds(self) -> int:
        """Folds every site's split has (small sites have fewer than five)."""
        return min(len(site.require_splits().folds) for site in self.sites)

    @property
    def n_folds(self) -> int:
        """k of the k-fold ensembles: ``[study] folds``, at most the folds every site has."""
        wanted = self.settings.plan.folds
        return self.available_folds if wanted is None else min(wanted, self.available_folds)

    # ------------------------------------------------------------ 3 private + pooled

    def model_dir(self, model: str) -> Path:
        return self.out / "models" / model

    def _open_model(self, model: str, sites: list[PreparedSite]) -> None:
        trained_on = [{"site": s.name, "source": str(s.source)} for s in sites]
        train, prepare = self.settings.study.train, self.settings.study.prepare
        init = phantom_provenance(train, prepare, self.out / "cache")
        open_model_dir(self.model_dir(model), ModelRecord.new(train, prepare, trained_on, init))

    def _starting_weights(self) -> None:
        """Make the phantom starting weights (``init = "phantom"``) once, here, before the workers need them."""
        train = self.settings.study.train.replace(threads=None)  # nothing else runs meanwhile: every core
        starting_weights(train, self.settings.study.prepare, self.out / "cache", say=self.say)

    def _train_spec(self, model: str, sites: list[PreparedSite], fold: int) -> dict[str, Any]:
        return {
            "model": model,
            "model_dir": str(self.model_dir(model)),
            "fold": fold,
            "sites": [str(s.prepared) for s in sites],
            "cache": str(self.out / "cache"),
            "train": self.settings.study.train.to_dict(),
            "prepare": self.settings.study.prepare.to_dict(),
        }

    def _fold_finished(self, model: str, fold: int) -> bool:
        train = self.settings.study.train
        return any(
            entry.fold == fold and train.training_done(entry.epochs, entry.best_epoch)
            for entry in read_model_record(self.model_dir(model)).folds
        )

    def step_train(self) -> None:
        self._sites_ready()
        self._starting_weights()
        groups = {private_model(s.name): [s] for s in self.sites} | {POOLED: list(self.sites)}
        jobs = []
        for model, sites in groups.items():
            self._open_model(model, sites)
            for fold in range(self.n_folds):
                if self._fold_finished(model, fold):
                    continue
                jobs.append(self._train_spec(model, sites, fold))
        total = len(groups) * self.n_folds
        if not jobs:
            self.say(f"train: all {total} private and pooled fold models already trained (skipped)")
            return
        self.say(f"train: {len(jobs)} of {total} fold models to train ({', '.join(groups)}), "
                 f"{self.settings.plan.workers} at a time")
        for result in self._pool("train", jobs):
            model = result.pop("model")
            outcome = FoldOutcome(**result)
            record_fold(self.model_dir(model), outcome)
            resumed = f", resumed after epoch {outcome.resumed_from}" if outcome.resumed_from else ""
            plateau = ", stopped on its validation plateau" if outcome.stopped_early else ""
            self.say(f"  {model} fold {outcome.fold}: best val Dice {outcome.best_val_dice:.3f} at epoch "
                     f"{outcome.best_epoch}/{outcome.epochs} ({outcome.seconds:.0f} s{resumed}{plateau})")

    def _pool(self, job: str, specs: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        """Run study job ``job`` on every spec in ``plan.workers`` processes; yield results as they come."""
        return run_jobs(job, specs, self.settings.plan.workers, self.out)

    # ------------------------------------------------------------ 4 federated

    def step_federate(self) -> None:
        self._sites_ready()
        fl_run, folds = self.out / "fl", list(range(self.n_folds))
        done = self._done("federate")
        if done and done.get("folds") == folds and (self.model_dir(FL) / MODEL_JSON).is_file():
            self.say("federate: FL ensemble already trained (skipped)")
            return
        self._starting_weights()  # the server starts the global model from them
        federation = self.settings.study.federation
        secure = ", secure aggregation" if federation.secure_aggregation else ""
        self.say(f"federate: {len(folds)} folds x {federation.rounds} rounds, {federation.aggregator}{secure}, "
                 f"server + {len(self.sites)} site processes over mutual TLS on 127.0.0.1")
        start = time.perf_counter()
        runs = run_local(
            self.site_dirs, fl_run, self.settings.study, folds=folds, config_file=self.out / "study.toml",
            cache=self.out / "cache", threads=self.settings.study.train.threads, resume=True,
        )
        score = "mean" if federation.secure_aggregation else "median"  # secure aggregation: the server knows the sum only
        for run in runs:
            self.say(f"  fl fold {run.fold}: best val Dice ({score} of the sites) {run.best_dice:.3f} at round "
                     f"{run.best_round + 1}/{run.rounds} ({run.seconds:.0f} s)")
        target = self.model_dir(FL)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fl_run / "model", target)
        self._finish("federate", time.perf_counter() - start, folds=folds)

    # ------------------------------------------------------------ 5 evaluate

    @property
    def models(self) -> list[str]:
        return [private_model(s.name) for s in self.sites] + [FL, POOLED]

    def test_sets(self) -> dict[str, tuple[str, str]]:
        """Test-set name -> (prepared folder, split): each site's test cases, then all external cases."""
        sets = {s.name: (str(s.prepared), "test") for s in self.sites}
        if self.external is not None:
            sets[self.external.name] = (str(self.external.prepared), "all")
        return sets

    def _model_stamp(self, model: str) -> str:
        return (self.model_dir(model) / MODEL_JSON).read_text(encoding="utf-8")  # the text: any change is a new model

    def step_evaluate(self) -> None:
        self._sites_ready()
        sets, specs = self.test_sets(), []
        for model in self.models:
            cached = self.out / "eval" / f"{model}.json"
            if cached.is_file():
                record = read_json(cached)
                if record.get("model_json") == self._model_stamp(model) and list(record["dice"]) == list(sets):
                    continue
            specs.append({
                "model": model, "model_dir": str(self.model_dir(model)), "test_sets": sets,
                "cache": str(self.out / "cache"), "prepare": self.settings.study.prepare.to_dict(),
                "threads": self.settings.study.train.threads,
                "device": self.settings.study.train.device, "amp": self.settings.study.train.amp,
            })
        if not specs:
            self.say("evaluate: every model already evaluated (skipped)")
            return
        self.say(f"evaluate: {len(specs)} model(s) on {', '.join(sets)}")
        for result in self._pool("evaluate", specs):
            model = result["model"]
            write_json(self.out / "eval" / f"{model}.json",
                       {"model": model, "model_json": self._model_stamp(model), "dice": result["dice"]})
            self.say(f"  {model}: " + ", ".join(
                f"{name} {sum(d.values()) / max(len(d), 1):.3f}" for name, d in result["dice"].items()
            ))

    def dice(self) -> dict[str, dict[str, dict[str, float]]]:
        """dice[model][test set][case] from the evaluation step."""
        return {model: read_json(self.out / "eval" / f"{model}.json")["dice"] for model in self.models}

    # ------------------------------------------------------------ 6 report

    def step_report(self) -> None:
        from fedseg.study.outputs import write_study_report

        self._sites_ready()
        write_study_report(self)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A settings record less what may change between runs of one study: version, threads, device and the like."""
    train = without_machine_options(record.get("train", {}))
    return {**{k: v for k, v in record.items() if k != "fedseg_version"}, "train": train}
