"""``[study] folds``: k of the k-fold ensembles, checked, described and capped by the smallest site."""

from __future__ import annotations

import pytest
from conftest import write_site

from fedseg.errors import FedsegError
from fedseg.study.pipeline import StudyRun, StudySources
from fedseg.study.profiles import load_settings

SMALL = "[study]\nfolds = {folds}\n[prepare]\nspacing_mm = 4.0\n"


def settings(tmp_path, folds):
    path = tmp_path / f"study{folds}.toml"
    path.write_text(SMALL.format(folds=folds))
    return load_settings("demo", path)


@pytest.fixture
def sites(tmp_path):
    # 6 cases: 1 test + 5 training cases, 5 folds; 4 cases: 1 test + 3, 3 folds
    return [write_site(tmp_path / "big", n_cases=6), write_site(tmp_path / "small", n_cases=4, seed=3)]


def prepared_run(tmp_path, sites, folds):
    said = []
    run = StudyRun(tmp_path / f"out{folds}", settings(tmp_path, folds), StudySources(tuple(sites)), say=said.append)
    run.step_prepare()
    return run, said


def test_folds_picks_the_ensemble_size_and_the_report_says_so(tmp_path, sites):
    run, said = prepared_run(tmp_path, sites, 2)
    assert run.available_folds == 3 and run.n_folds == 2
    assert "-> 2-fold ensembles" in said[0]
    assert "ensembles: k-fold, k = 2" in run.settings.describe(synthetic=False)


def test_more_folds_than_the_smallest_site_has_are_capped_with_a_note(tmp_path, sites):
    run, said = prepared_run(tmp_path, sites, 5)
    assert run.n_folds == 3
    assert any("study.folds = 5, but the smallest site has only 3 folds; using 3" in line for line in said)


def test_the_paper_keeps_every_fold_and_the_demo_says_its_k():
    """The paper profile ensembles every fold (5); the demo's smaller k is named in its settings lines."""
    assert load_settings("paper").plan.folds is None
    demo = load_settings("demo")
    assert demo.plan.folds == 2 and "ensembles: k-fold, k = 2" in demo.describe()


@pytest.mark.parametrize("value", ["0", "2.5", '"two"'])
def test_bad_folds_are_named(tmp_path, value):
    path = tmp_path / "bad.toml"
    path.write_text(f"[study]\nfolds = {value}\n")
    with pytest.raises(FedsegError, match="study.folds must be an integer >= 1"):
        load_settings("demo", path)


def test_a_site_of_fewer_than_five_cases_is_warned_about_in_the_study(tmp_path, sites):
    _run, said = prepared_run(tmp_path, sites, 2)
    warnings = [line for line in said if "warning:" in line]
    assert len(warnings) == 1 and "small has only 4 cases (fewer than 5): 1 held out for testing, 3 folds" in warnings[0]


def test_data_check_warns_about_a_small_site_and_still_passes(tmp_path, run_cli):
    from fedseg.data.splits import small_site_warning

    code, out, err = run_cli("data", "check", write_site(tmp_path / "tiny", n_cases=3))
    assert code == 0, out + err
    assert "warning:" in err and "tiny has only 3 cases" in err and "2 folds training on 1 case(s) each" in err
    code, _out, err = run_cli("data", "check", write_site(tmp_path / "five", n_cases=5))
    assert code == 0 and "warning" not in err
    assert small_site_warning("x", 5) is None and small_site_warning("x", 2) is None


def test_the_settings_name_the_local_epochs_per_round(tmp_path):
    path = tmp_path / "local.toml"
    path.write_text("[federation]\nrounds = 8\nlocal_epochs = 2\n")
    assert any("FL: 8 rounds of 2 local epochs" in line for line in load_settings("demo", path).describe())
    assert any("rounds of one local epoch" in line for line in load_settings("demo").describe())


def test_the_settings_say_when_the_fl_model_is_trained_with_secure_aggregation(tmp_path):
    path = tmp_path / "secure.toml"
    path.write_text("[federation]\nsecure_aggregation = true\nsecure_threshold = 3\n")
    lines = load_settings("demo", path).describe()
    assert any(line.startswith("secure aggregation: on") and "threshold 3" in line for line in lines)
    assert not any("secure aggregation" in line for line in load_settings("demo").describe())


def test_small_sites_get_a_tip_for_the_small_sites_profile(tmp_path, sites):
    """Sites of a few training cases trained from scratch: the study names the profile that starts from the phantom."""
    _run, said = prepared_run(tmp_path, sites, 2)
    tips = [line for line in said if "tip:" in line]
    assert len(tips) == 1 and "only 3 training cases" in tips[0] and "--profile small-sites" in tips[0]
    small = load_settings("small-sites")
    assert small.study.train.init == "phantom" and small.plan.folds == 2
    run = StudyRun(tmp_path / "out-small", small, StudySources(tuple(sites)), say=(said := []).append)
    run.step_prepare()
    assert not [line for line in said if "tip:" in line]
    assert any("starting weights: trained by fedseg on its own phantom" in line for line in small.describe(False))
