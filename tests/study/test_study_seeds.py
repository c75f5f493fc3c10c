"""``fedseg study --seeds``: the finding's comparisons per seed, counted, with the spread of the means."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.study.profiles import load_settings
from fedseg.study.finding import findings
from fedseg.study.seeds import parse_seeds, write_robustness

SITES = ("nci", "suny", "ucla")


def results(
    fl: float, private: float, external_private: float, pooled: float, seed: int = 0, own_site_bonus: float = 0.1
) -> dict:
    """A results.json content: 5 test cases per site and 6 external cases, Dice around the given means
    (a private model ``own_site_bonus`` higher on its own site: the domain shift)."""
    rng = np.random.default_rng(seed)

    def scores(mean: float, n: int, prefix: str) -> dict[str, float]:
        return {f"{prefix}{i}": float(np.clip(mean + rng.normal(0, 0.02), 0, 1)) for i in range(n)}

    dice = {}
    for model, mean, ext in [("fl", fl, fl), ("pooled", pooled, pooled),
                             *((f"private:{s}", private, external_private) for s in SITES)]:
        bonus = {s: own_site_bonus if model == f"private:{s}" else 0.0 for s in SITES}
        dice[model] = {s: scores(mean + bonus[s], 5, s) for s in SITES} | {"prostatex": scores(ext, 6, "px")}
    return {"dice": dice, "test_sets": {"private": list(SITES), "external": ["prostatex"]}, "reference": "fl"}


def test_a_clear_win_holds_every_comparison():
    found = findings(results(fl=0.88, private=0.70, external_private=0.65, pooled=0.89))
    claims = [f.claim for f in found]
    assert claims[:3] == [f"fl > private:{s}, Overall, p < 0.05" for s in SITES]
    assert claims[3:6] == [f"fl > private:{s}, prostatex" for s in SITES]
    assert claims[6] == "fl >= pooled - 0.03, Overall"
    assert claims[7] == "domain shift kept: >= 2 of 3 private models lose >= 0.05 away from their site"
    assert all(f.held for f in found), found


def test_alike_institutions_fail_the_domain_shift_check():
    """Private models as good away as at home: the study's sites no longer differ, which the report says."""
    alike = findings(results(fl=0.88, private=0.70, external_private=0.65, pooled=0.89, own_site_bonus=0.0))[-1]
    assert alike.claim.startswith("domain shift kept") and not alike.held
    shifted = findings(results(fl=0.88, private=0.70, external_private=0.65, pooled=0.89, own_site_bonus=0.2))[-1]
    assert shifted.held and "nci 0.9" in shifted.detail and "-> 0.7" in shifted.detail


def test_a_loss_or_a_tie_does_not_hold():
    found = {f.claim: f for f in findings(results(fl=0.80, private=0.80, external_private=0.90, pooled=0.90))}
    assert not found["fl > private:nci, Overall, p < 0.05"].held  # level: no significant win
    assert not found["fl > private:nci, prostatex"].held  # externally below
    assert not found["fl >= pooled - 0.03, Overall"].held


def test_robustness_counts_the_seeds_each_comparison_held_in(tmp_path):
    per_seed = {
        0: results(0.88, 0.70, 0.65, 0.89, seed=0),
        1: results(0.88, 0.70, 0.95, 0.89, seed=1),  # externally the private models win in this seed
        2: results(0.88, 0.70, 0.65, 0.89, seed=2),
    }
    path, record = write_robustness(tmp_path, per_seed)
    assert record["held"]["fl > private:nci, Overall, p < 0.05"] == 3
    assert record["held"]["fl > private:suny, prostatex"] == 2
    text = path.read_text(encoding="utf-8")
    assert "| fl > private:suny, prostatex |" in text and "2 of 3" in text and "**no**" in text
    assert "floating-point" in text and "range" in text
    assert json.loads((tmp_path / "robustness.json").read_text())["seeds"] == [0, 1, 2]


def test_seeds_that_compared_other_models_are_refused(tmp_path):
    other = results(0.88, 0.70, 0.65, 0.89)
    del other["dice"]["pooled"]
    with pytest.raises(FedsegError, match="seed 1 compared other models"):
        write_robustness(tmp_path, {0: results(0.88, 0.70, 0.65, 0.89), 1: other})


@pytest.mark.parametrize("text", ["a,b", "1,1", "-1", ""])
def test_bad_seeds_are_named(text):
    with pytest.raises(FedsegError, match="seeds"):
        parse_seeds(text)


def test_each_seed_seeds_synthesis_and_training(tmp_path):
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    path = tmp_path / "s.toml"
    path.write_text("[study]\nseeds = [3, 4]\n")
    settings = load_settings("demo", path)
    assert settings.plan.seeds == [3, 4]
    one = settings.for_seed(4)
    assert one.plan.seed == 4 and one.study.train.seed == 4 and one.plan.seeds is None
    assert any("seeds 3, 4 (a whole study each)" in line for line in settings.describe())
    assert any("seed 4" in line and "seeds" not in line for line in one.describe())
    assert load_settings("demo").with_seeds((0, 1)).plan.seeds == [0, 1]
    path.write_text("[study]\nseeds = [1, 1]\n")
    with pytest.raises(FedsegError, match="study.seeds must be distinct integers"):
        load_settings("demo", path)
