"""ServerRun: a new run records its settings after the starting model exists; a resumed one continues where it stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.deploy.serverrun import ServerRun
from fedseg.federation.protocol.rounds import RoundCompleted, RoundsConfig, ServerRounds
from fedseg.federation.strategies import Aggregator, FedAdam, Update, Weights

SITES = ("nci", "suny")
FEDADAM_TOML = """
[federation]
rounds = 5
server_optimizer = "fedadam"
[train]
seed = 3
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return provision_study("localhost", list(SITES), tmp_path_factory.mktemp("serverrun") / "kits")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(FEDADAM_TOML)
    return path


def commit_round(run: RunDir, aggregator: Aggregator, weights: Weights) -> RoundCompleted:
    """One round in which both sites return the global model plus 0.5 (floats) with Dice 0.5 and 0.7."""
    rounds = ServerRounds(RoundsConfig(SITES, 5, 2), aggregator, dict(weights), 0)
    for site in SITES:
        rounds.site_connected(site)
    moved = {n: a + np.asarray(0.5, a.dtype) if a.dtype.kind == "f" else a.copy() for n, a in weights.items()}
    actions = []
    for site, dice in zip(SITES, (0.5, 0.7), strict=True):
        actions = rounds.update_received(site, Update(site, moved, 4, dice), rounds.round_open)
    completed = next(a for a in actions if isinstance(a, RoundCompleted))
    run.save_round(completed, aggregator.state_dict())
    return completed


def test_the_server_needs_the_server_kit(kits: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="a site kit; the server needs the server kit"):
        ServerRun.new(kits["nci"], None, tmp_path / "run", cache=tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_new_run_is_recorded_once_its_starting_model_exists(kits: dict[str, Path], config: Path, tmp_path: Path) -> None:
    server_run = ServerRun.new(kits["server"], config, tmp_path / "run", fold=1, rounds=3, threads=1, cache=tmp_path)
    assert not (tmp_path / "run").exists()  # nothing on disk before the model is made
    assert (server_run.study.federation.rounds, server_run.study.train.threads, server_run.fold) == (3, 1, 1)
    run, weights, first_round = server_run.starting_point(server_run.study.federation.make_aggregator())
    assert first_round == 0 and run.root == tmp_path / "run"
    assert weights and all(isinstance(a, np.ndarray) for a in weights.values())
    recorded = run.study()
    assert recorded["sites"] == list(SITES) and recorded["rounds"] == 3 and recorded["fold"] == 1
    assert recorded["server_optimizer"] == "fedadam" and recorded["min_sites"] == 2
    assert recorded["train"]["seed"] == 3 and recorded["prepare"] == server_run.study.prepare.to_dict()
    _, same, _ = ServerRun.new(kits["server"], config, tmp_path / "other", cache=tmp_path).starting_point(FedAdam())
    for name, array in weights.items():  # the seeded initialisation
        np.testing.assert_array_equal(same[name], array)
    with pytest.raises(FedsegError, match="not empty"):
        server_run.starting_point(FedAdam())  # a second new run in the same folder


def test_resume_continues_after_the_last_committed_round(kits: dict[str, Path], config: Path, tmp_path: Path) -> None:
    first = ServerRun.new(kits["server"], config, tmp_path / "run", fold=1, cache=tmp_path)
    adam = first.study.federation.make_aggregator()
    run, weights, _ = first.starting_point(adam)
    completed = commit_round(run, adam, weights)
    said: list[str] = []
    resumed = ServerRun.resume(kits["server"], run.root, fold=0, cache=tmp_path, say=said.append)
    assert resumed.resuming and resumed.fold == 1  # the run's fold, not the argument
    assert resumed.study.federation.server_optimizer == "fedadam" and resumed.study.federation.rounds == 5
    assert resumed.study.train.seed == 3
    fresh = resumed.study.federation.make_aggregator()
    again, global_weights, first_round = resumed.starting_point(fresh)
    assert again.root == run.root and first_round == 1
    assert said == ["resuming after round 0 (1 completed)"]
    for name, array in completed.result.weights.items():
        np.testing.assert_array_equal(global_weights[name], array)
    restored, saved = fresh.state_dict(), adam.state_dict()
    assert restored is not None and saved is not None and restored.keys() == saved.keys() and saved
    assert all(np.array_equal(restored[k], saved[k]) for k in saved)
    assert ServerRun.resume(kits["server"], run.root, rounds=8, cache=tmp_path).study.federation.rounds == 8


def test_resume_refuses_a_run_of_other_sites(kits: dict[str, Path], config: Path, tmp_path: Path) -> None:
    run, _, _ = ServerRun.new(kits["server"], config, tmp_path / "run", cache=tmp_path).starting_point(FedAdam())
    other = provision_study("localhost", ["nci"], tmp_path / "other-kits")
    with pytest.raises(FedsegError, match=r"run of sites \['nci', 'suny'\], but the kit's study has \['nci'\]"):
        ServerRun.resume(other["server"], run.root, cache=tmp_path)
    with pytest.raises(FedsegError, match="not a fedseg run directory"):
        ServerRun.resume(kits["server"], tmp_path / "nowhere", cache=tmp_path)


def test_local_mode_waits_for_a_fold_no_longer_than_its_rounds_can_take():
    from fedseg.federation.config import FederationConfig, StudyConfig
    from fedseg.federation.deploy.local import START_MARGIN_S, fold_deadline

    study = StudyConfig(FederationConfig(rounds=4, round_timeout_s=100.0, grace_s=10.0))
    assert fold_deadline(study, None) == 5 * 100.0 + 10.0 + START_MARGIN_S
    assert fold_deadline(study, 2) == 3 * 100.0 + 10.0 + START_MARGIN_S
