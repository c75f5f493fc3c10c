"""The paper's finding, comparison by comparison, in one study's cross-site results.

The comparisons are the paper's claims, with fixed thresholds written before
any result was seen (issue #12): the FL model above every private model on the
combined private test sets (paired t-test p < 0.05) and on every external
set, and level with the pooled model (at most 0.03 below it, Overall). A last
row checks the study itself rather than a claim: the institutions still
differ (at least two-thirds of the private models lose >= 0.05 Dice on the
other institutions' test cases), since a finding on alike sites is hollow.

The same list is printed at the end of a study, written into its report and
counted over seeds by :mod:`fedseg.study.seeds`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedseg.evaluation.crosssite import OVERALL, CrossSiteTable, cross_site_table

__all__ = ["Finding", "domain_shift", "finding_lines", "findings", "findings_of_table", "results_table"]

P_FINDING = 0.05
POOLED_MARGIN = 0.03
SHIFT_DROP = 0.05  # a private model "feels" the domain shift when it loses this much away from its own site


@dataclass(frozen=True)
class Finding:
    """One comparison of one seed's study: what was claimed, whether it held, and the numbers."""

    claim: str
    held: bool
    detail: str


def results_table(results: Mapping[str, Any]) -> CrossSiteTable:
    sets = results["test_sets"]
    return cross_site_table(
        results["dice"], private_sets=sets["private"], external_sets=sets["external"], reference=results["reference"]
    )


def findings(results: Mapping[str, Any]) -> list[Finding]:
    """The paper's finding, comparison by comparison, in one study's ``results.json`` content."""
    return findings_of_table(results_table(results))


def findings_of_table(table: CrossSiteTable) -> list[Finding]:
    reference = table.reference
    fl = table.summary(reference, OVERALL).mean
    out = []
    for model in table.models[:-1]:
        if model.startswith("private:"):
            other, test = table.summary(model, OVERALL).mean, table.tests[(model, OVERALL)]
            held = fl > other and test.p is not None and test.p < P_FINDING
            p = "p undefined" if test.p is None else f"p = {test.p:.3g}"
            out.append(Finding(f"{reference} > {model}, Overall, p < {P_FINDING:g}", held, f"{fl:.3f} vs {other:.3f}, {p}"))
    for external in table.external_sets:
        fl_ext = table.summary(reference, external).mean
        for model in table.models[:-1]:
            if model.startswith("private:"):
                other = table.summary(model, external).mean
                out.append(Finding(f"{reference} > {model}, {external}", fl_ext > other, f"{fl_ext:.3f} vs {other:.3f}"))
    if "pooled" in table.models:
        pooled = table.summary("pooled", OVERALL).mean
        out.append(Finding(
            f"{reference} >= pooled - {POOLED_MARGIN:g}, Overall", fl >= pooled - POOLED_MARGIN, f"{fl:.3f} vs {pooled:.3f}"
        ))
    if shift := domain_shift(table):
        losing = [model for model, (_, _, drop) in shift.items() if drop >= SHIFT_DROP]
        needed = math.ceil(2 * len(shift) / 3)
        detail = ", ".join(f"{model.removeprefix('private:')} {own:.2f} -> {away:.2f}" for model, (own, away, _) in shift.items())
        out.append(Finding(
            f"domain shift kept: >= {needed} of {len(shift)} private models lose >= {SHIFT_DROP:g} away from their site",
            len(losing) >= needed, detail,
        ))
    return out


def domain_shift(table: CrossSiteTable) -> dict[str, tuple[float, float, float]]:
    """{private model: (Dice on its own site's test set, on the other private sets' cases, the drop)}.

    Only private models named ``private:<set>`` after one of the private test sets count.
    """
    shift: dict[str, tuple[float, float, float]] = {}
    if len(table.private_sets) < 2:
        return shift  # no site to be away at
    for model in table.models:
        own_set = model.removeprefix("private:")
        if not model.startswith("private:") or own_set not in table.private_sets:
            continue
        own = table.summary(model, own_set).mean
        away = [table.summary(model, other) for other in table.private_sets if other != own_set]
        away_mean = sum(s.mean * s.n for s in away) / sum(s.n for s in away)  # case-weighted, like Overall
        shift[model] = (own, away_mean, own - away_mean)
    return shift


def finding_lines(found: list[Finding]) -> list[str]:
    """One line per comparison, for the console and the report: held or not, and the numbers."""
    held = sum(f.held for f in found)
    return [f"{held} of {len(found)} checks held:", *(("held: " if f.held else "NOT held: ") + f"{f.claim} ({f.detail})" for f in found)]
