"""Cross-site Tables 3/4: pooling, paired t-tests, marks and error cases (renderers: tests/report/test_tables.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from fedseg.errors import DataError
from fedseg.evaluation import (
    OVERALL,
    CrossSiteTable,
    cross_site_table,
    paired_t_test,
    summarize,
)

from conftest import crosssite_dice  # noqa: E402

PRIVATE = ["NCI", "SUNY", "UCLA"]
EXTERNAL = ["ProstateX"]
Dice = dict[str, dict[str, dict[str, float]]]  # model -> test set -> case id -> Dice


def _table(dice: Dice | None = None, **kw: float) -> CrossSiteTable:
    dice = crosssite_dice() if dice is None else dice
    return cross_site_table(dice, private_sets=PRIVATE, reference="FL", external_sets=EXTERNAL, **kw)


# ----- the t-test itself ----------------------------------------------------


def test_paired_t_matches_hand_formula() -> None:
    other = [0.91, 0.85, 0.88, 0.79, 0.93]
    ref = [0.92, 0.89, 0.90, 0.85, 0.93]
    d = np.subtract(other, ref)
    n = d.size
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    p_hand = 2 * stats.t.sf(abs(t_hand), df=n - 1)
    test = paired_t_test("m", "s", other, ref)
    assert test.status == "ok" and test.n == n
    assert test.t == pytest.approx(t_hand, rel=1e-12)
    assert test.p == pytest.approx(p_hand, rel=1e-12)
    assert test.mean_diff == pytest.approx(d.mean())


def test_paired_t_known_literal() -> None:
    # d = [0.02, 0.03, 0.01]: mean 0.02, sd = sqrt((0 + 0.01² + 0.01²)/2) = 0.01,
    # t = 0.02 / (0.01/√3) = 2√3 = 3.4641016151377544.
    # df = 2: P(T > t) = ½(1 - t/√(t²+2)) so p = 1 - √(12/14) = 1 - √(6/7) = 0.07417990022744858.
    test = paired_t_test("m", "s", [0.83, 0.85, 0.84], [0.81, 0.82, 0.83])
    assert test.t == pytest.approx(3.4641016151377544, rel=1e-9)
    assert test.p == pytest.approx(0.07417990022744858, rel=1e-9)


def test_n_below_two_is_not_tested() -> None:
    test = paired_t_test("m", "s", [0.8], [0.9])
    assert (test.status, test.t, test.p, test.n) == ("n<2", None, None, 1)
    assert test.mean_diff == pytest.approx(-0.1)


@pytest.mark.parametrize("shift", [0.0, -0.1])
def test_zero_variance_of_differences_is_undefined(shift: float) -> None:
    ref = [0.5, 0.75, 0.25]
    test = paired_t_test("m", "s", [v + shift for v in ref], ref)
    assert (test.status, test.t, test.p) == ("undefined", None, None)


# ----- table contents -------------------------------------------------------


def test_cells_and_overall_pool_private_sets_only() -> None:
    dice = crosssite_dice()
    table = _table(dice)
    assert table.models == ("Bad", "Close", "FL")
    for model in table.models:
        for s in PRIVATE + EXTERNAL:
            direct = summarize(dice[model][s].values())
            assert table.cells[model][s] == direct
        pooled = [v for s in PRIVATE for v in dice[model][s].values()]
        assert table.overall[model].n == 6 + 5 + 4 == len(pooled)
        assert table.overall[model].mean == pytest.approx(np.mean(pooled))
        assert table.overall[model].sd == pytest.approx(np.std(pooled, ddof=1))
        # the external set stays out of Overall
        assert table.overall[model].mean != pytest.approx(
            np.mean(pooled + list(dice[model]["ProstateX"].values()))
        )


def test_overall_test_pairs_pooled_cases() -> None:
    dice = crosssite_dice()
    table = _table(dice)
    other = [dice["Close"][s][c] for s in PRIVATE for c in dice["FL"][s]]
    ref = [dice["FL"][s][c] for s in PRIVATE for c in dice["FL"][s]]
    expected = stats.ttest_rel(other, ref)
    test = table.tests[("Close", OVERALL)]
    assert test.n == 15
    assert test.t == pytest.approx(expected.statistic)
    assert test.p == pytest.approx(expected.pvalue)
    assert ("FL", OVERALL) not in table.tests


def test_star_only_where_significant() -> None:
    table = _table()
    for column in PRIVATE + [OVERALL] + EXTERNAL:
        bad, close = table.tests[("Bad", column)], table.tests[("Close", column)]
        assert bad.p < 0.001 and table.mark("Bad", column) == "*"
        assert close.p >= 0.001 and table.mark("Close", column) == ""
        assert table.mark("FL", column) == ""


def test_significantly_higher_gets_dagger() -> None:
    dice = crosssite_dice()
    # Bad = FL - 0.05 + small noise, so Good = FL + 0.05 + the same noise.
    dice["Good"] = {s: {c: v + 0.10 for c, v in cases.items()} for s, cases in dice["Bad"].items()}
    table = _table(dice)
    assert table.tests[("Good", OVERALL)].mean_diff > 0
    assert table.mark("Good", OVERALL) == "†"


def test_mismatched_cases_raise_data_error_naming_model() -> None:
    dice = crosssite_dice()
    del dice["Close"]["SUNY"]["case03"]
    with pytest.raises(DataError, match=r"'Close'.*'SUNY'.*case03"):
        _table(dice)


def test_missing_test_set_and_unknown_reference() -> None:
    dice = crosssite_dice()
    del dice["Bad"]["ProstateX"]
    with pytest.raises(DataError, match=r"'Bad'.*'ProstateX'"):
        _table(dice)
    with pytest.raises(DataError, match="reference"):
        cross_site_table(crosssite_dice(), private_sets=PRIVATE, reference="Nope")
    with pytest.raises(DataError, match=r"'FL'.*'Nowhere'"):
        cross_site_table(crosssite_dice(), private_sets=["Nowhere"], reference="FL")


def test_single_case_sets_are_not_tested() -> None:
    dice = {
        "A": {"X": {"c1": 0.7}, "Y": {"c1": 0.8}},
        "FL": {"X": {"c1": 0.9}, "Y": {"c1": 0.85}},
    }
    table = cross_site_table(dice, private_sets=["X"], reference="FL", external_sets=["Y"])
    assert table.tests[("A", "X")].status == "n<2"
    assert table.tests[("A", "Y")].status == "n<2"
    assert table.tests[("A", OVERALL)].status == "n<2"
    assert table.mark("A", OVERALL) == ""
    statuses = {(t["test_set"], t["status"]) for t in table.to_json()["tests"]}
    assert ("Y", "n<2") in statuses
    json.dumps(table.to_json(), allow_nan=False)
