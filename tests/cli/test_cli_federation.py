"""``fedseg federate | server | client`` end to end: real processes, real mutual TLS, a tiny network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli as invoke
from conftest import TINY_SITES, tiny_study_toml, write_site, write_tiny_study

from fedseg.federation.deploy.rundir import RunDir

pytestmark = pytest.mark.slow  # fedseg federate: a server and a client process per site on loopback

FEDERATION = "rounds = 5\nround_timeout_s = 60.0\ngrace_s = 5.0"
SITES = TINY_SITES


@pytest.fixture(autouse=True, scope="module")
def commands():
    """Register server/client/federate on the app (main.py may not yet), restore torch threads afterwards."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_tiny_study(tmp_path_factory.mktemp("federate"), FEDERATION)


@pytest.fixture(scope="module")
def federated(work) -> tuple[Path, tuple[int, str, str]]:
    run = work / "run"
    result = invoke("federate", *(work / s for s in SITES), "--out", run, "--rounds", "2", "--fold", "0",
                    "--config", work / "study.toml", "--cache", work / "cache", "--threads", "1")
    return run, result


def test_federate_runs_two_rounds_and_writes_an_fl_model(federated, work):
    run, (code, stdout, err) = federated
    assert code == 0, stdout + err
    state = RunDir.open(run / "fold0").read_state()
    assert state.completed_rounds == 2
    assert (run / "fold0" / "final.safetensors").is_file() and (run / "fold0" / "best.safetensors").is_file()
    record = json.loads((run / "model" / "model.json").read_text())
    assert [f["fold"] for f in record["folds"]] == [0]
    assert sorted(t["site"] for t in record["trained_on"]) == list(SITES)
    assert record["preprocessing"]["spacing_mm"] == 2.0
    assert record["federated"]["federation"]["rounds"] == 2
    # the FL model's fold weights are the best round's global model
    from safetensors.numpy import load_file

    best = load_file(str(run / "fold0" / "rounds" / f"{state.best_round:04d}" / "global.safetensors"))
    model = load_file(str(run / "model" / "fold0" / "best.safetensors"))
    assert best.keys() == model.keys() and all(np.array_equal(best[k], model[k]) for k in best)
    for name in ("server", *SITES):
        assert (run / "logs" / "fold0" / f"{name}.log").is_file()


def test_sites_receive_final_and_best_models_and_evaluate_the_final_one(federated, work):
    """End of the study: each site keeps both models as model dirs and returns per-case test Dice."""
    run, (code, stdout, err) = federated
    assert code == 0, stdout + err
    from safetensors.numpy import load_file

    from fedseg.evaluation.evaluate import evaluate_site
    from fedseg.inference import Ensemble

    state = RunDir.open(run / "fold0").read_state()
    final = load_file(str(run / "fold0" / "final.safetensors"))
    best = load_file(str(run / "fold0" / "best.safetensors"))
    evaluation = json.loads((run / "fold0" / "evaluation.json").read_text())
    assert evaluation["left_out"] == {} and sorted(evaluation["sites"]) == list(SITES)
    for site in SITES:
        for name, expected in (("final", final), ("best", best)):
            received = load_file(str(run / "sites" / site / name / "fold0" / "best.safetensors"))
            assert all(np.array_equal(received[k], expected[k]) for k in expected), (site, name)
        record = json.loads((run / "sites" / site / "best" / "model.json").read_text())
        assert record["folds"][0]["best_epoch"] == state.best_round + 1
        # the Dice the site sent is the Dice of the final model on its test cases (local mode shares names)
        sent = evaluation["sites"][site]["case_dice"]
        prepared = _prepared(work, site)
        assert sorted(sent) == sorted(prepared.require_splits().test)
        ensemble = Ensemble.load(run / "sites" / site / "final")
        assert evaluate_site(ensemble, prepared, "test") == pytest.approx(sent, abs=1e-6)
    assert "final model on each site's held-out test set" in (run / "logs" / "fold0" / "server.log").read_text()


def _prepared(work: Path, site: str):
    from fedseg.cli.models import _resolve
    from fedseg.federation.config import load_study_config

    return _resolve(work / site, load_study_config(work / "study.toml").prepare, work / "cache")


def test_round_weights_are_dice_weights_of_what_the_sites_reported(federated):
    """The audit logs (what left each site) give the Dice the server weighted each site by."""
    run, (code, _, err) = federated
    assert code == 0, err
    audit = {s: [json.loads(line) for line in (run / "audit" / "fold0" / f"{s}.jsonl").read_text().splitlines()] for s in SITES}
    for number, entry in enumerate(RunDir.open(run / "fold0").round_records()):
        sent = {s: next(r for r in audit[s] if r["round"] == number)["scalars"] for s in SITES}
        assert {s: entry.sites[s].val_dice for s in SITES} == {s: sent[s]["val_dice"] for s in SITES}
        total = sum(sent[s]["val_dice"] for s in SITES)
        expected = {s: (sent[s]["val_dice"] / total if total > 0 else 1 / len(SITES)) for s in SITES}
        assert entry.site_weights == pytest.approx(expected, abs=1e-12)
        for s in SITES:
            record = next(r for r in audit[s] if r["round"] == number)
            assert record["bytes_sent"] > 0 and set(record["scalars"]) == {"num_samples", "val_dice", "train_loss"}


def test_evaluate_the_fl_model(federated, work, tmp_path):
    run, (code, _, err) = federated
    assert code == 0, err
    out = tmp_path / "dice.json"
    code, _, err = invoke("evaluate", run / "model", work / "site_a", "--json", out, "--cache", work / "cache", "--threads", "1")
    assert code == 0, err
    dice = json.loads(out.read_text())["dice"]
    assert dice and all(0.0 <= d <= 1.0 for d in dice.values())


def test_resume_of_a_finished_run_trains_no_more(federated):
    run, (code, _, err) = federated
    assert code == 0, err
    before = RunDir.open(run / "fold0").read_state()
    code, stdout, err = invoke("server", "--kit", run / "kits" / "server", "--resume", run / "fold0", "--threads", "1")
    assert code == 0, stdout + err
    assert RunDir.open(run / "fold0").read_state() == before
    assert "resuming after round 1" in stdout


def test_fedprox_clients_and_fedadam_server(tmp_path, work):
    """FedProx on the clients and FedAdam on the server run end to end; the moments are kept and reloaded."""
    config = tmp_path / "prox.toml"
    config.write_text(tiny_study_toml(FEDERATION + '\nfedprox_mu = 0.01\nserver_optimizer = "fedadam"'))
    run = tmp_path / "run"
    code, stdout, err = invoke("federate", work / "site_a", work / "site_b", "--out", run, "--rounds", "1",
                               "--config", config, "--cache", work / "cache", "--threads", "1")
    assert code == 0, stdout + err
    assert (run / "fold0" / "rounds" / "0000" / "server_optimizer.safetensors").is_file()
    assert json.loads((run / "fold0" / "run.json").read_text())["federation"]["fedprox_mu"] == 0.01
    code, stdout, err = invoke("server", "--kit", run / "kits" / "server", "--resume", run / "fold0", "--threads", "1")
    assert code == 0, stdout + err


def test_all_folds_builds_the_fl_ensemble_centrally_and_at_every_site(tmp_path, work):
    """--all-folds on two 3-case sites: 2 folds each, so a 2-model FL ensemble, also in each site's best/ dir."""
    sites = [write_site(tmp_path / name, n_cases=3, seed=20 + k) for k, name in enumerate(("east", "west"))]
    run = tmp_path / "run"
    code, stdout, err = invoke("federate", *sites, "--out", run, "--rounds", "1", "--all-folds",
                               "--config", work / "study.toml", "--cache", tmp_path / "cache", "--threads", "1")
    assert code == 0, stdout + err
    assert [f["fold"] for f in json.loads((run / "model" / "model.json").read_text())["folds"]] == [0, 1]
    for fold in (0, 1):
        assert RunDir.open(run / f"fold{fold}").read_state().finished
    for site in ("east", "west"):
        assert [f["fold"] for f in json.loads((run / "sites" / site / "best" / "model.json").read_text())["folds"]] == [0, 1]
    out = tmp_path / "dice.json"
    code, _, err = invoke("evaluate", run / "model", sites[0], "--json", out, "--cache", tmp_path / "cache", "--threads", "1")
    assert code == 0, err
    assert len(json.loads(out.read_text())["dice"]) == 1  # the one test case of a 3-case site


def test_site_folder_name_clash_is_refused(tmp_path):
    a = write_site(tmp_path / "one" / "same", n_cases=1)
    b = write_site(tmp_path / "two" / "same", n_cases=1)
    code, _, err = invoke("federate", a, b, "--out", tmp_path / "run")
    assert code == 1
    assert "same name 'same'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_failing_client_fails_the_run_and_is_named(tmp_path, work):
    """A site that cannot train (one case: no split) stops the run; the error names it and its reason."""
    tiny = write_site(tmp_path / "tiny", n_cases=1)
    code, stdout, err = invoke("federate", work / "site_a", tiny, "--out", tmp_path / "run", "--rounds", "1",
                               "--config", work / "study.toml", "--cache", work / "cache", "--threads", "1")
    assert code == 1, stdout + err
    assert "client tiny exited with code 1" in err and "too few cases to split" in err
    assert "Traceback" not in err


def test_server_needs_out_or_resume(tmp_path, work):
    code, _, err = invoke("server", "--kit", tmp_path / "nokit")
    assert code == 1 and "--out" in err and "--resume" in err


def test_unknown_federation_option_is_an_error(tmp_path, work):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nround = 3\n")
    code, _, err = invoke("federate", work / "site_a", "--out", tmp_path / "run", "--config", bad)
    assert code == 1 and "unknown option(s) in the federation table ['round']" in err


@pytest.mark.parametrize("command", ["server", "client", "federate"])
def test_help(command):
    code, out, _ = invoke(command, "--help")
    assert code == 0 and "Usage" in out
