"""Cross-site statistics (Sarma et al. 2021, Tables 3 and 4) from per-case Dice: summaries, paired t-tests, marks.

Input layout: ``dice[model][test_set][case_id] = Dice`` for every model and
every requested test set. Every model must be scored on exactly the reference
model's cases of each test set, because the paper compares models with
two-sided *paired* t-tests ("compare the mean Dice coefficients from each
private model to the FL model, for both the combined private test set and the
held-out challenge dataset"). Beyond the paper, each private test set is also
tested on its own.

Statistical conventions (also written into the outputs):

* difference = other model - reference, paired by (test set, case id);
* n < 2 pairs: no test (``status = "n<2"``, t and p are None);
* all paired differences equal, to within float rounding (spread <= 16 ulps
  of the largest score), i.e. zero variance: the t statistic divides by a
  zero standard error, so it is undefined; scipy returns nan (identical
  scores) or +-inf with p = 0 (constant shift). We report ``status =
  "undefined"`` with t and p None and mark nothing, rather than claim p = 0;
* a tested cell is marked ``*`` when p < alpha and the model is lower than
  the reference, ``†`` when p < alpha and it is higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from fedseg.errors import DataError
from fedseg.metrics import Summary, summarize

__all__ = [
    "HIGHER_MARK",
    "LOWER_MARK",
    "OVERALL",
    "CrossSiteTable",
    "PairedTest",
    "cross_site_table",
    "paired_t_test",
]

OVERALL = "Overall"
LOWER_MARK = "*"
HIGHER_MARK = "†"

DiceScores = Mapping[str, Mapping[str, Mapping[str, float]]]
CaseKey = tuple[str, str]  # (test set, case id)
_ROUNDING_ULPS = 16  # paired differences spread within this many ulps count as constant


@dataclass(frozen=True)
class PairedTest:
    """Two-sided paired t-test of ``model`` against the reference on ``test_set``.

    ``mean_diff`` is mean(model - reference). ``status`` is ``"ok"`` (t, p set),
    ``"n<2"`` or ``"undefined"`` (zero variance of the differences); t and p
    are None unless ``status == "ok"``.
    """

    model: str
    test_set: str
    n: int
    mean_diff: float
    t: float | None
    p: float | None
    status: str


def paired_t_test(
    model: str, test_set: str, other: Sequence[float], reference: Sequence[float]
) -> PairedTest:
    """Two-sided paired t-test (scipy.stats.ttest_rel) of ``other`` vs ``reference``.

    The two sequences are aligned pairs. See the module docstring for the
    n < 2 and zero-variance conventions.

    Raises:
        ValueError: if the sequences differ in length or are empty.
    """
    a = np.asarray(other, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_t_test: need two equal-length 1-D samples, got {a.shape} and {b.shape}")
    diff = a - b
    mean_diff = float(np.mean(diff))
    if diff.size < 2:
        return PairedTest(model, test_set, int(diff.size), mean_diff, None, None, "n<2")
    # A constant difference has zero standard error. "Constant" allows float
    # rounding (x - 0.1 - x is not exactly -0.1), else t would be ~1e16 and p ~0.
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    if float(np.ptp(diff)) <= _ROUNDING_ULPS * np.finfo(float).eps * scale:
        return PairedTest(model, test_set, int(diff.size), mean_diff, None, None, "undefined")
    result = stats.ttest_rel(a, b)
    t, p = float(result.statistic), float(result.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        return PairedTest(model, test_set, int(diff.size), mean_diff, None, None, "undefined")
    return PairedTest(model, test_set, int(diff.size), mean_diff, t, p, "ok")


@dataclass(frozen=True)
class CrossSiteTable:
    """Mean ± SD Dice of every model on every test set, plus paired tests vs the reference.

    ``models`` lists the reference last; ``cells[model][test_set]`` and
    ``overall[model]`` (all private cases pooled) are Summaries;
    ``tests[(model, test_set)]`` holds a PairedTest for every non-reference
    model on each private set, on ``OVERALL`` and on each external set.
    """

    reference: str
    alpha_star: float
    private_sets: tuple[str, ...]
    external_sets: tuple[str, ...]
    models: tuple[str, ...]
    cells: dict[str, dict[str, Summary]]
    overall: dict[str, Summary]
    tests: dict[tuple[str, str], PairedTest]

    # ----- queries -------------------------------------------------------

    def summary(self, model: str, test_set: str) -> Summary:
        """The Summary of ``model`` on ``test_set`` (``OVERALL`` for the pooled private sets)."""
        return self.overall[model] if test_set == OVERALL else self.cells[model][test_set]

    def mark(self, model: str, test_set: str) -> str:
        """``*`` (significantly lower), ``†`` (significantly higher) or ``""``."""
        test = self.tests.get((model, test_set))
        if test is None or test.p is None or not test.p < self.alpha_star:
            return ""
        return LOWER_MARK if test.mean_diff < 0 else HIGHER_MARK

    def columns(self) -> list[str]:
        """Private sets, ``OVERALL``, external sets: the column order of every rendering."""
        return [*self.private_sets, OVERALL, *self.external_sets]

    def ordered_tests(self) -> list[PairedTest]:
        """Every paired test, by model then column."""
        return [self.tests[(m, c)] for m in self.models for c in self.columns() if (m, c) in self.tests]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict: reference, alpha, set/model order, cells, overall, tests.

        ``cells[model][test_set]`` and ``overall[model]`` hold the Summary
        fields plus ``mark``; ``tests`` is a list of PairedTest fields plus
        ``mark`` (t and p are null unless status is "ok").
        """
        def cell(model: str, column: str) -> dict[str, Any]:
            return {**asdict(self.summary(model, column)), "mark": self.mark(model, column)}

        return {
            "reference": self.reference,
            "alpha": self.alpha_star,
            "private_sets": list(self.private_sets),
            "external_sets": list(self.external_sets),
            "models": list(self.models),
            "cells": {
                m: {c: cell(m, c) for c in [*self.private_sets, *self.external_sets]}
                for m in self.models
            },
            "overall": {m: cell(m, OVERALL) for m in self.models},
            "tests": [
                {**asdict(t), "mark": self.mark(t.model, t.test_set)} for t in self.ordered_tests()
            ],
        }


# ----- construction ---------------------------------------------------------


def cross_site_table(
    dice: DiceScores,
    *,
    private_sets: Sequence[str],
    reference: str,
    external_sets: Sequence[str] = (),
    alpha_star: float = 0.001,
) -> CrossSiteTable:
    """Build the paper's Tables 3 and 4 from per-case Dice ``dice[model][test_set][case_id]``.

    Models keep the dict's insertion order with ``reference`` moved last;
    columns keep the order of ``private_sets`` then ``external_sets``.

    Raises:
        DataError: unknown reference or test set, a set listed twice or named
            ``"Overall"``, an empty test set, a non-finite Dice value, or a
            model whose case ids on a test set differ from the reference's
            (the message names the model, the test set and the missing/extra
            cases).
    """
    private, external = tuple(private_sets), tuple(external_sets)
    _check_arguments(dice, private, external, reference, alpha_star)
    models = tuple([m for m in dice if m != reference] + [reference])
    for model in (reference, *models[:-1]):  # reference first: the others are compared to it
        for test_set in (*private, *external):
            _check_cases(dice, model, test_set, reference)

    cells = {
        m: {s: summarize(dice[m][s].values()) for s in (*private, *external)} for m in models
    }
    overall = {m: summarize(_pooled(dice[m], private).values()) for m in models}
    tests: dict[tuple[str, str], PairedTest] = {}
    # Overall is the paper's "combined private test set"; per-private-set tests are extra.
    columns = [*((s, (s,)) for s in private), (OVERALL, private), *((s, (s,)) for s in external)]
    for model in models[:-1]:
        for column, sets in columns:
            tests[(model, column)] = _test(
                model, column, _pooled(dice[model], sets), _pooled(dice[reference], sets)
            )
    return CrossSiteTable(reference, alpha_star, private, external, models, cells, overall, tests)


def _check_arguments(
    dice: DiceScores,
    private: tuple[str, ...],
    external: tuple[str, ...],
    reference: str,
    alpha_star: float,
) -> None:
    if reference not in dice:
        raise DataError(f"reference model {reference!r} has no Dice scores (models: {list(dice)})")
    if not private:
        raise DataError("cross-site table needs at least one private test set")
    names = [*private, *external]
    if len(set(names)) != len(names):
        raise DataError(f"test sets listed more than once: {names}")
    if OVERALL in names:
        raise DataError(f"{OVERALL!r} is reserved for the pooled private column; rename that test set")
    if not 0.0 < alpha_star < 1.0:
        raise DataError(f"alpha_star must lie in (0, 1), got {alpha_star}")


def _check_cases(dice: DiceScores, model: str, test_set: str, reference: str) -> None:
    """Every model must score exactly the reference's cases, with finite values."""
    if test_set not in dice[model]:
        raise DataError(f"model {model!r} has no Dice scores for test set {test_set!r}")
    scores = dice[model][test_set]
    if not scores:
        raise DataError(f"model {model!r}, test set {test_set!r}: no cases")
    expected, got = set(dice[reference][test_set]), set(scores)
    if expected != got:
        missing, extra = sorted(expected - got, key=str), sorted(got - expected, key=str)
        raise DataError(
            f"model {model!r}, test set {test_set!r}: cases differ from reference {reference!r}; "
            f"missing {_some(missing)}, extra {_some(extra)}"
        )
    bad = sorted((c for c, v in scores.items() if not math.isfinite(float(v))), key=str)
    if bad:
        raise DataError(f"model {model!r}, test set {test_set!r}: non-finite Dice for cases {_some(bad)}")


def _some(items: list[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"


def _pooled(by_set: Mapping[str, Mapping[str, float]], sets: Sequence[str]) -> dict[CaseKey, float]:
    """All cases of ``sets`` keyed by (test set, case id), so equal ids in two sets stay apart."""
    return {(s, c): float(v) for s in sets for c, v in by_set[s].items()}


def _test(
    model: str, test_set: str, other: Mapping[CaseKey, float], reference: Mapping[CaseKey, float]
) -> PairedTest:
    keys = list(reference)  # same key set (checked); reference order fixes the pairing
    return paired_t_test(model, test_set, [other[k] for k in keys], [reference[k] for k in keys])
