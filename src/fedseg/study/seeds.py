"""The study repeated over seeds: does the paper's finding hold in each, and how much do the numbers move?

``fedseg study --seeds 0,1,2`` runs the whole study once per seed, in
``OUT/seed-N`` (synthesis, when the study makes its sites, and training both
use seed N), then writes ``OUT/robustness.md`` and ``OUT/robustness.json``
from the seeds' ``results.json``: for every comparison the finding is made
of, whether it held in each seed and in how many, plus each seed's means.

The comparisons are :mod:`fedseg.study.finding`'s.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.evaluation.crosssite import OVERALL, CrossSiteTable
from fedseg.io import write_json, write_text
from fedseg.study.finding import Finding, findings_of_table, results_table

__all__ = ["parse_seeds", "seed_folder", "write_robustness"]

NUMERICS_NOTE = (
    "Per-case Dice depends on the floating-point kernels of the CPU or GPU that trained the models (on two "
    "CPUs, the same commit and seed moved per-case Dice by up to 0.2), so a finding is only as solid as the "
    "number of seeds it holds in; the spread across seeds below is the honest error bar."
)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); distinct non-negative integers.

    Raises:
        FedsegError: anything else (the message shows what was given).
    """
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FedsegError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    return check_seeds(seeds, "--seeds")


def check_seeds(seeds: Sequence[Any], where: str) -> tuple[int, ...]:
    if not seeds or any(type(s) is not int or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise FedsegError(f"{where} must be distinct integers >= 0, e.g. [0, 1, 2]; got {list(seeds)!r}")
    return tuple(seeds)


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def _means(table: CrossSiteTable) -> dict[str, dict[str, float]]:
    """{model: {"Overall": mean, external set: mean, ...}} of one seed."""
    columns = [OVERALL, *table.external_sets]
    return {model: {c: table.summary(model, c).mean for c in columns} for model in table.models}


def write_robustness(out: Path, per_seed: Mapping[int, Mapping[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Write ``robustness.md`` and ``robustness.json`` into ``out`` from each seed's results; returns the .md path.

    Raises:
        FedsegError: no seeds, or seeds whose studies compared different models or test sets.
    """
    if not per_seed:
        raise FedsegError("no seed has results to compare")
    seeds = sorted(per_seed)
    tables = {s: results_table(per_seed[s]) for s in seeds}
    by_seed = {s: findings_of_table(tables[s]) for s in seeds}
    claims = [f.claim for f in by_seed[seeds[0]]]
    for s in seeds:
        if [f.claim for f in by_seed[s]] != claims:
            raise FedsegError(f"seed {s} compared other models or test sets than seed {seeds[0]}; see {seed_folder(out, s)}")
    means = {s: _means(tables[s]) for s in seeds}
    record = {
        "seeds": seeds,
        "findings": {s: [asdict(f) for f in by_seed[s]] for s in seeds},
        "held": {claim: sum(by_seed[s][i].held for s in seeds) for i, claim in enumerate(claims)},
        "means": means,
        "note": NUMERICS_NOTE,
    }
    path = Path(out) / "robustness.md"
    write_text(path, _markdown(seeds, claims, by_seed, means))
    write_json(Path(out) / "robustness.json", record)
    return path, record


def _markdown(seeds: list[int], claims: list[str], by_seed: dict[int, list[Finding]], means: dict) -> str:
    lines = [f"# The finding across seeds {', '.join(map(str, seeds))}", "", NUMERICS_NOTE, "", "## Did it hold?", ""]
    lines.append("| Comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | held in |")
    lines.append("|---" * (len(seeds) + 2) + "|")
    for i, claim in enumerate(claims):
        cells = [("yes" if by_seed[s][i].held else "**no**") + f" ({by_seed[s][i].detail})" for s in seeds]
        held = sum(by_seed[s][i].held for s in seeds)
        lines.append(f"| {claim} | " + " | ".join(cells) + f" | {held} of {len(seeds)} |")
    columns = list(next(iter(means[seeds[0]].values())))
    lines += ["", "## Mean Dice per seed, and the spread across seeds", ""]
    lines.append("| Model | Test set | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |")
    lines.append("|---" * (len(seeds) + 4) + "|")
    for model in means[seeds[0]]:
        for column in columns:
            values = [means[s][model][column] for s in seeds]
            spread = f"{min(values):.3f}-{max(values):.3f}"
            lines.append(f"| {model} | {column} | " + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {statistics.fmean(values):.3f} | {spread} |")
    lines += ["", "Each seed's full report: " + ", ".join(f"[seed {s}](seed-{s}/report.md)" for s in seeds), ""]
    return "\n".join(lines)
