"""``fedseg study`` end to end on a minimal profile: synthetic sites, private + FL + pooled ensembles, report.

One module-scoped run (about a minute): three synthetic institutions of 3
cases each (1 test case, 2 folds), 1 epoch / 1 round, through the real
federated runtime (server and site processes over mutual TLS). The tests read
what it wrote: results.json must reproduce the report's tables, the model
directories must serve ``fedseg evaluate``, and a rerun must skip every step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli as invoke

from fedseg.metrics import format_mean_sd, summarize

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MINIMAL = """
[study]
cases = 3
external_cases = 3
resolution_scale = 4.0
workers = 2
[prepare]
spacing_mm = 4.0
[train]
epochs = {epochs}
patch_size = [16, 16, 16]
samples_per_volume = 1
batch_size = 2
[federation]
rounds = {epochs}
grace_s = 5.0
"""
SITES = ("nci", "suny", "ucla")
MODELS = ("private:nci", "private:suny", "private:ucla", "fl", "pooled")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, tuple[int, str, str]]:
    root = tmp_path_factory.mktemp("study")
    (root / "minimal.toml").write_text(MINIMAL.format(epochs=1))
    result = invoke("study", "--out", root / "out", "--config", root / "minimal.toml")
    return root, result


def table_rows(markdown: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """Column names and {model: cells} of the Markdown table under ``heading``."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def test_study_runs_every_step_and_writes_the_outputs(study):
    root, (code, stdout, err) = study
    assert code == 0, stdout + err
    out = root / "out"
    for name in ("results.json", "report.md", "report.html", "settings.json", "study.toml"):
        assert (out / name).is_file(), name
    for figure in ("dice_strip.png", "val_curves.png", "examples.png", "convergence_private.png",
                   "convergence_pooled.png", "convergence_fl.png"):
        assert (out / "figures" / figure).read_bytes().startswith(b"\x89PNG"), figure
    for model in MODELS:
        record = json.loads((out / "models" / model / "model.json").read_text())
        assert [f["fold"] for f in record["folds"]] == [0, 1], model
    # the tables are printed at the end
    assert "Model evaluation results: private test sets" in stdout and "Overall (n=3)" in stdout
    # every fold model's convergence, in the report and results.json
    convergence = json.loads((out / "results.json").read_text())["convergence"]
    assert sorted((c["model"], c["fold"]) for c in convergence) == sorted((m, k) for m in MODELS for k in (0, 1))
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Convergence" in report and "| private:nci | 0 |" in report and "fold models converged" in stdout
    assert "k-fold ensembles, k = 2 (folds used)" in report


def test_results_json_reproduces_the_report_tables(study):
    root, (code, stdout, err) = study
    assert code == 0, stdout + err
    results = json.loads((root / "out" / "results.json").read_text())
    dice = results["dice"]
    assert sorted(dice) == sorted(MODELS)
    assert results["test_sets"] == {"private": list(SITES), "external": ["prostatex"]}
    for model in MODELS:
        assert sorted(dice[model]) == sorted([*SITES, "prostatex"])
        assert len(dice[model]["prostatex"]) == 3 and all(len(dice[model][s]) == 1 for s in SITES)
        assert all(0.0 <= d <= 1.0 for scores in dice[model].values() for d in scores.values())
    report = (root / "out" / "report.md").read_text(encoding="utf-8")
    columns, rows = table_rows(report, "private test sets")
    assert columns == ["nci (n=1)", "suny (n=1)", "ucla (n=1)", "Overall (n=3)"]
    for model in MODELS:
        expected = [format_mean_sd(summarize(dice[model][s].values())) for s in SITES]
        expected.append(format_mean_sd(summarize([d for s in SITES for d in dice[model][s].values()])))
        assert [re.sub(r"[*†]$", "", cell) for cell in rows[model]] == expected, model
    columns, rows = table_rows(report, "external test sets")
    assert columns == ["prostatex (n=3)"]
    for model in MODELS:
        assert re.sub(r"[*†]$", "", rows[model][0]) == format_mean_sd(summarize(dice[model]["prostatex"].values()))


def test_the_fl_model_dir_serves_fedseg_evaluate_with_the_same_dice(study):
    root, (code, stdout, err) = study
    assert code == 0, stdout + err
    out = root / "out"
    target = root / "fl-on-ucla.json"
    code, _, err = invoke("evaluate", out / "models" / "fl", out / "data" / "ucla", "--json", target, "--cache", out / "cache")
    assert code == 0, err
    recomputed = json.loads(target.read_text())["dice"]
    assert recomputed == pytest.approx(json.loads((out / "results.json").read_text())["dice"]["fl"]["ucla"], abs=1e-9)


def test_fl_went_through_the_federated_runtime(study):
    root, (code, stdout, err) = study
    assert code == 0, stdout + err
    fl = root / "out" / "fl"
    for fold in (0, 1):
        state = json.loads((fl / f"fold{fold}" / "state.json").read_text())
        assert state["completed_rounds"] == 1 and state["finished"]
        evaluation = json.loads((fl / f"fold{fold}" / "evaluation.json").read_text())
        assert sorted(evaluation["sites"]) == list(SITES)
        for site in SITES:
            assert (fl / "audit" / f"fold{fold}" / f"{site}.jsonl").is_file()


def test_rerun_skips_finished_steps_and_other_settings_are_refused(study):
    root, (code, stdout, err) = study
    assert code == 0, stdout + err
    before = json.loads((root / "out" / "results.json").read_text())["dice"]
    code, again, err = invoke("study", "--out", root / "out", "--config", root / "minimal.toml")
    assert code == 0, again + err
    for message in ("already written (skipped)", "already trained (skipped)", "FL ensemble already trained (skipped)",
                    "every model already evaluated (skipped)"):
        assert message in again, message
    after = json.loads((root / "out" / "results.json").read_text())["dice"]
    assert after == before
    (root / "other.toml").write_text(MINIMAL.format(epochs=2))
    code, _, err = invoke("study", "--out", root / "out", "--config", root / "other.toml")
    assert code == 1
    assert "other settings" in err and "train.epochs: 2 here vs 1 in the earlier run" in err


def test_bad_arguments_are_clear(tmp_path):
    code, _, err = invoke("study", "--out", tmp_path / "x", "--profile", "huge")
    assert code == 1 and "unknown profile 'huge'" in err
    code, _, err = invoke("study", "--out", tmp_path / "x", "--external", tmp_path)
    assert code == 1 and "--external goes with --sites" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\ncase = 4\n")
    code, _, err = invoke("study", "--out", tmp_path / "x", "--config", bad)
    assert code == 1 and "unknown option(s) in the study table ['case']" in err
    code, _, err = invoke("study", "--out", tmp_path / "y", "--sites", tmp_path / "only-one")
    assert code == 1 and "at least two sites" in err
    assert not (tmp_path / "y").exists()  # nothing written for a study that cannot run


def test_paper_profile_is_the_papers_protocol_and_starts_on_cpu(tmp_path):
    """The paper profile: AH-Net, 1 mm, 100 cases, 300 epochs/rounds; one tiny round of it runs here."""
    from fedseg.study.profiles import load_settings

    paper = load_settings("paper")
    assert (paper.study.train.network, paper.study.prepare.spacing_mm) == ("ahnet", 1.0)
    assert (paper.plan.cases, paper.study.train.epochs, paper.study.federation.rounds) == (100, 300, 300)
    assert paper.study.federation.aggregator == "dice-weighted"
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(
        "[study]\ncases = 3\nexternal_cases = 2\nresolution_scale = 4.0\n"
        "[prepare]\nspacing_mm = 4.0\n[train]\nepochs = 1\nsamples_per_volume = 1\n"
        "[federation]\nrounds = 1\nevaluate = false\ngrace_s = 5.0\n"
    )
    code, stdout, err = invoke("study", "--profile", "paper", "--config", tiny, "--out", tmp_path / "out",
                               "--steps", "data,prepare,federate")
    assert code == 0, stdout + err
    record = json.loads((tmp_path / "out" / "models" / "fl" / "model.json").read_text())
    assert record["network"] == "ahnet" and len(record["folds"]) == 2
    from fedseg.inference import Ensemble

    assert len(Ensemble.load(tmp_path / "out" / "models" / "fl").models) == 2


def test_parallel_synthesis_writes_the_same_scans_as_serial(tmp_path):
    """With 2 workers each institution is synthesised in its own process: same cases, same voxels."""
    from fedseg.data.synth import synthesize_study
    from fedseg.data.volume import load_volume
    from fedseg.study.pipeline import StudyRun, StudySources
    from fedseg.study.profiles import load_settings

    config = tmp_path / "tiny.toml"
    config.write_text("[study]\ncases = 3\nexternal_cases = 2\nresolution_scale = 4.0\nworkers = 2\n")
    run = StudyRun(tmp_path / "out", load_settings("demo", config), StudySources(), say=lambda _: None)
    run.run(["data"])
    synthesize_study(tmp_path / "serial", ["nci", "suny", "ucla"], "prostatex", 3, 0, external_cases=2, resolution_scale=4.0)
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.nii.gz"))
    parallel = sorted(p.relative_to(tmp_path / "out" / "data") for p in (tmp_path / "out" / "data").rglob("*.nii.gz"))
    assert serial == parallel and len(serial) == 2 * (3 * 3 + 2)
    for relative in serial:
        a, b = load_volume(tmp_path / "serial" / relative), load_volume(tmp_path / "out" / "data" / relative)
        assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine), relative


def test_seeds_run_the_whole_study_per_seed_and_count_the_finding(tmp_path):
    """--seeds 0,1: two whole minimal studies (own scans, own training seed), then robustness.md."""
    config = tmp_path / "minimal.toml"
    config.write_text(MINIMAL.format(epochs=1))
    code, stdout, err = invoke("study", "--out", tmp_path / "out", "--config", config, "--seeds", "0,1")
    assert code == 0, stdout + err
    out = tmp_path / "out"
    for seed in (0, 1):
        settings = json.loads((out / f"seed-{seed}" / "settings.json").read_text())
        assert settings["study"]["seed"] == seed and settings["train"]["seed"] == seed
        assert (out / f"seed-{seed}" / "report.md").is_file()
    scan = Path("data") / "nci" / "images"
    first = sorted((out / "seed-0" / scan).iterdir())[0]
    assert first.read_bytes() != (out / "seed-1" / scan / first.name).read_bytes()  # each seed synthesises its own
    robustness = (out / "robustness.md").read_text(encoding="utf-8")
    assert "| fl > private:nci, Overall, p < 0.05 |" in robustness and "seed 0" in robustness and "seed 1" in robustness
    assert "The finding across 2 seeds" in stdout and "held in" in stdout
