"""Gather a finished study's numbers and pictures and write its report.

Reads what the earlier steps left in ``OUT`` (fold metrics, federated rounds,
per-case Dice), builds the validation curves and one example slice per site,
writes ``results.json`` and hands everything to :func:`fedseg.report.write_report`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg import __version__
from fedseg.data.layout import gland_mask
from fedseg.data.preprocess import read_case_meta
from fedseg.data.volume import load_volume
from fedseg.metrics import dice_coefficient
from fedseg.federation.deploy.rundir import RunDir
from fedseg.inference import Ensemble
from fedseg.io import read_json, write_json
from fedseg.modeldir import MODEL_JSON, read_model_record
from fedseg.evaluation.convergence import FoldCurve
from fedseg.report import Curve, ExampleSlice, convergence_lines, tables_text, write_report
from fedseg.study.convergence import epoch_dice, fold_curves
from fedseg.study.finding import finding_lines, findings

if TYPE_CHECKING:
    from fedseg.study.pipeline import StudyRun

__all__ = ["example_slices", "validation_curves", "write_study_report"]


def _mean_curve(label: str, series: list[dict[int, float]]) -> Curve | None:
    """Mean over folds at every epoch/round that every fold has."""
    if not series:
        return None
    common = sorted(set.intersection(*(set(s) for s in series)))
    return Curve(label, common, [float(np.mean([s[x] for s in series])) for x in common]) if common else None


def validation_curves(run: StudyRun) -> dict[str, list[Curve]]:
    """Per site: its private model's validation Dice by epoch, and its local validation Dice in the FL rounds."""
    folds = range(run.n_folds)
    fl_by_site: dict[str, list[dict[int, float]]] = defaultdict(list)
    for fold in folds:
        rundir = RunDir(run.out / "fl" / f"fold{fold}")
        if not (rundir.root / "run.json").is_file():
            continue
        series: dict[str, dict[int, float]] = defaultdict(dict)
        for entry in rundir.round_records():
            for site, values in entry.sites.items():
                series[site][entry.round + 1] = values.val_dice
        for site, points in series.items():
            fl_by_site[site].append(points)
    curves: dict[str, list[Curve]] = {}
    for site in run.sites:
        private = [epoch_dice(run.model_dir(f"private:{site.name}") / f"fold{k}") for k in folds]
        candidates = [
            _mean_curve(f"private:{site.name}", [p for p in private if p]),
            _mean_curve("fl (site's local validation)", fl_by_site.get(site.name, [])),
        ]
        curves[site.name] = [c for c in candidates if c is not None]
    return curves


def _example(ensemble: Ensemble, site_name: str, prepared: Path, case: str) -> ExampleSlice:
    """The case on its original grid; a 4-D (Decathlon) source is shown on the prepared grid instead."""
    meta = read_case_meta(prepared / "meta" / f"{case}.json")
    image = load_volume(meta.sources["image"].path)
    if image.array.ndim == 4:
        image = load_volume(prepared / "images" / f"{case}.nii.gz")
        truth = load_volume(prepared / "labels" / f"{case}.nii.gz").array > 0
        return _slice(site_name, case, image.array, truth, ensemble.probability(image.array) > 0.5)
    truth = gland_mask(load_volume(meta.sources["label"].path).array) > 0
    return _slice(site_name, case, image.array, truth, ensemble.predict(image).array > 0)


def _slice(site_name: str, case: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> ExampleSlice:
    """The axial slice with the most gland, and the case's 3-D Dice."""
    z = int(np.argmax(truth.sum(axis=(0, 1))))
    return ExampleSlice(
        site_name, case, image[:, :, z].astype(np.float32), truth[:, :, z], prediction[:, :, z],
        float(dice_coefficient(prediction, truth)),
    )


def example_slices(run: StudyRun, dice: dict[str, dict[str, dict[str, float]]]) -> list[ExampleSlice]:
    """For each site, the FL model on its test case of median FL Dice (a typical case, not the best)."""
    ensemble = Ensemble.load(run.model_dir("fl"))
    examples = []
    for site in run.sites:
        scores = dice["fl"].get(site.name, {})
        if not scores:
            continue
        ordered = sorted(scores, key=lambda case: scores[case])
        examples.append(_example(ensemble, site.name, site.prepared, ordered[len(ordered) // 2]))
    return examples


def write_study_report(run: StudyRun) -> None:
    """results.json, the report and its figures; prints the two tables."""
    curves = fold_curves(run)
    results, record = write_results(run, curves)
    dice = record["dice"]
    private, external = record["test_sets"]["private"], record["test_sets"]["external"]
    notes = [
        "Every per-case Dice is in results.json; the models are in models/ (usable by fedseg predict and "
        "fedseg evaluate); the federated runs, with every round, their logs and each site's audit log, are in fl/.",
        "Step times (s): " + ", ".join(f"{step} {seconds:.0f}" for step, seconds in record["timings_s"].items()),
    ]
    finding = finding_lines(findings(record))
    paths = write_report(
        run.out,
        title="fedseg study: federated vs private vs pooled prostate segmentation",
        settings=[
            *run.settings.describe(run.sources.synthetic), f"k-fold ensembles, k = {record['folds']} (folds used)", *_sources(run),
            *hardware_lines(run),
        ],
        dice=dice,
        private_sets=private,
        external_sets=external,
        reference="fl",
        curves=validation_curves(run),
        examples=example_slices(run, dice),
        notes=notes,
        fold_curves=curves,
        finding=finding,
    )
    run.say(tables_text(dice, private, external, reference="fl"))
    run.say("the paper's finding in this study: " + "\n  ".join(finding))
    run.say(convergence_lines(curves)[0])
    run.say(f"report: {paths['markdown']} and {paths['html']}; every number in {results}")


def hardware_lines(run: StudyRun) -> list[str]:
    """What each model's folds were actually trained on, as model.json recorded it."""
    lines = []
    for model in run.models:
        path = run.model_dir(model) / MODEL_JSON
        folds = read_model_record(run.model_dir(model)).folds if path.is_file() else []
        used = sorted({
            f"{entry.trained_with['description']}"
            + (f", {entry.trained_with['processes']} processes" if entry.trained_with.get("processes", 1) > 1 else "")
            for entry in folds if entry.trained_with
        })
        if used:
            lines.append(f"{model} trained on: {'; '.join(used)}")
    return lines


def _sources(run: StudyRun) -> list[str]:
    if run.sources.synthetic:
        return ["data: synthetic institutions NCI, SUNY, UCLA and external PROSTATEx-like set (docs/sites.md)"]
    lines = ["sites: " + ", ".join(str(p) for p in run.sources.sites)]
    if run.sources.external is not None:
        lines.append(f"external: {run.sources.external}")
    return lines


def results_record(run: StudyRun, curves: Sequence[FoldCurve]) -> dict[str, Any]:
    """The content of results.json: every per-case Dice, and how it was obtained."""
    dice = run.dice()
    return {
        "fedseg_version": __version__,
        "settings": run.settings.to_dict(),
        "sources": run.sources.to_dict(),
        "models": {model: f"models/{model}" for model in run.models},
        "test_sets": {
            "private": [s.name for s in run.sites],
            "external": [run.external.name] if run.external else [],
        },
        "folds": run.n_folds,
        "dice": dice,
        "timings_s": {**{k: read_json(p)["seconds"] for k, p in _step_files(run.out)}, **run.timings},
        "reference": "fl",
        "n_test_cases": {name: len(dice["fl"][name]) for name in run.test_sets()},
        "convergence": [
            {"model": c.model, "fold": c.fold, "best_val_dice": c.best, "best_at": c.best_at, "of": c.x[-1],
             "tail_mean": c.tail_mean, "converged": c.converged}
            for c in curves
        ],
    }


def _step_files(out: Path) -> list[tuple[str, Path]]:
    folder = out / "steps"
    return [(p.stem, p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def write_results(run: StudyRun, curves: Sequence[FoldCurve]) -> tuple[Path, dict[str, Any]]:
    """Write results.json; returns its path and its content."""
    path, record = run.out / "results.json", results_record(run, curves)
    write_json(path, record)
    return path, record
