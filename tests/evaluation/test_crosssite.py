"""Cross-site Tables 3/4: pooling, paired t-tests, marks, renderers and error cases."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

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
    write_tables,
)

PRIVATE = ["NCI", "SUNY", "UCLA"]
EXTERNAL = ["ProstateX"]
Dice = dict[str, dict[str, dict[str, float]]]  # model -> test set -> case id -> Dice


def _scores(
    rng: np.random.Generator, n: int, shift: float, noise: float, base: np.ndarray
) -> dict[str, float]:
    return {f"case{i:02d}": float(base[i] + shift + noise * rng.standard_normal()) for i in range(n)}


def _dice() -> Dice:
    """FL reference; 'Bad' is clearly lower (shift -0.05, tiny noise); 'Close' ≈ FL (no shift)."""
    rng = np.random.default_rng(42)
    sizes = {"NCI": 6, "SUNY": 5, "UCLA": 4, "ProstateX": 8}
    bases = {s: 0.88 + 0.03 * rng.standard_normal(n) for s, n in sizes.items()}
    fl = {s: _scores(rng, n, 0.0, 0.0, bases[s]) for s, n in sizes.items()}
    bad = {s: _scores(rng, n, -0.05, 0.002, bases[s]) for s, n in sizes.items()}
    close = {s: _scores(rng, n, 0.0, 0.02, bases[s]) for s, n in sizes.items()}
    # Reference deliberately NOT last in the dict: it must be moved last.
    return {"Bad": bad, "FL": fl, "Close": close}


def _table(dice: Dice | None = None, **kw: float) -> CrossSiteTable:
    dice = _dice() if dice is None else dice
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
    dice = _dice()
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
    dice = _dice()
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
    md = table.to_markdown()
    assert "*Significantly lower than FL" in md
    assert "†" not in md


def test_significantly_higher_gets_dagger() -> None:
    dice = _dice()
    # Bad = FL - 0.05 + small noise, so Good = FL + 0.05 + the same noise.
    dice["Good"] = {s: {c: v + 0.10 for c, v in cases.items()} for s, cases in dice["Bad"].items()}
    table = _table(dice)
    assert table.tests[("Good", OVERALL)].mean_diff > 0
    assert table.mark("Good", OVERALL) == "†"
    assert "†Significantly higher than FL" in table.to_markdown()


def test_mismatched_cases_raise_data_error_naming_model() -> None:
    dice = _dice()
    del dice["Close"]["SUNY"]["case03"]
    with pytest.raises(DataError, match=r"'Close'.*'SUNY'.*case03"):
        _table(dice)


def test_missing_test_set_and_unknown_reference() -> None:
    dice = _dice()
    del dice["Bad"]["ProstateX"]
    with pytest.raises(DataError, match=r"'Bad'.*'ProstateX'"):
        _table(dice)
    with pytest.raises(DataError, match="reference"):
        cross_site_table(_dice(), private_sets=PRIVATE, reference="Nope")
    with pytest.raises(DataError, match=r"'FL'.*'Nowhere'"):
        cross_site_table(_dice(), private_sets=["Nowhere"], reference="FL")


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


# ----- renderers ------------------------------------------------------------


def test_markdown_has_headers_with_n_and_numbers() -> None:
    table = _table()
    md = table.to_markdown()
    for header in ["NCI (n=6)", "SUNY (n=5)", "UCLA (n=4)", "Overall (n=15)", "ProstateX (n=8)"]:
        assert header in md
    s = table.overall["Bad"]
    assert f"{s.mean:.3f} ± {s.sd:.3f}*" in md
    # reference listed last in each table
    first_table = md.split("### Model evaluation results: external")[0]
    rows = [line.split("|")[1].strip() for line in first_table.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["Bad", "Close", "FL"]


def test_csv_round_trip() -> None:
    table = _table()
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert len(rows) == 3 * 5
    by_key = {(r["model"], r["test_set"]): r for r in rows}
    r = by_key[("Close", OVERALL)]
    assert int(r["n"]) == 15
    assert float(r["mean"]) == table.overall["Close"].mean
    assert float(r["p_vs_reference"]) == table.tests[("Close", OVERALL)].p
    assert float(r["t_vs_reference"]) == table.tests[("Close", OVERALL)].t
    assert by_key[("Bad", "UCLA")]["mark"] == "*"
    assert by_key[("FL", "NCI")]["p_vs_reference"] == ""


def test_json_round_trip_and_write_tables(tmp_path: Path) -> None:
    dice = _dice()
    table = _table(dice)
    paths = write_tables(table, tmp_path / "out")
    assert set(paths) == {"md", "csv", "json"} and all(p.is_file() for p in paths.values())
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["reference"] == "FL" and data["alpha"] == 0.001
    assert data["models"] == ["Bad", "Close", "FL"]
    assert data["cells"]["Bad"]["ProstateX"]["mean"] == pytest.approx(
        np.mean(list(dice["Bad"]["ProstateX"].values()))
    )
    assert data["overall"]["FL"]["n"] == 15
    ext = next(t for t in data["tests"] if t["model"] == "Bad" and t["test_set"] == "ProstateX")
    expected = stats.ttest_rel(
        list(dice["Bad"]["ProstateX"].values()),
        [dice["FL"]["ProstateX"][c] for c in dice["Bad"]["ProstateX"]],
    )
    assert ext["p"] == pytest.approx(expected.pvalue) and ext["mark"] == "*"
    assert paths["md"].read_text(encoding="utf-8") == table.to_markdown()
