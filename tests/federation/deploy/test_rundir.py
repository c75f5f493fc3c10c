"""Run directory: committed rounds survive a crash at any point; resume starts after the last one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.protocol.rounds import RoundCompleted, RoundsConfig, ServerRounds
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.strategies import FedAdam, Update, WeightedMean

SITES = ("nci", "suny")


def run_round(rounds: ServerRounds, values: dict[str, float], dices: dict[str, float]) -> RoundCompleted:
    actions = []
    for site in SITES:
        actions = rounds.update_received(site, Update(site, {"w": np.full(2, values[site], np.float32)}, 5, dices[site]), rounds.round_open)
    return next(a for a in actions if isinstance(a, RoundCompleted))


def started(aggregator=None, first_round=0, weights=None) -> ServerRounds:
    rounds = ServerRounds(RoundsConfig(SITES, 5, 2), aggregator or WeightedMean("dice-weighted"), weights or {"w": np.zeros(2, np.float32)}, first_round)
    for site in SITES:
        rounds.site_connected(site)
    return rounds


def test_rounds_are_persisted_and_resume_starts_after_the_last(tmp_path):
    run = RunDir.create(tmp_path / "run", {"sites": list(SITES), "rounds": 5})
    rounds = started()
    run.save_round(run_round(rounds, {"nci": 1, "suny": 3}, {"nci": 0.5, "suny": 0.5}))
    run.save_round(run_round(rounds, {"nci": 2, "suny": 2}, {"nci": 0.9, "suny": 0.7}))
    point = RunDir.open(tmp_path / "run").resume_point()
    assert point.completed_rounds == 2
    assert np.array_equal(point.global_weights["w"], rounds.global_weights["w"])
    # the best round is scored by the lower median of the sites' Dice (with two sites, the smaller one)
    assert point.best_round == 1 and point.best_dice == pytest.approx(0.7)
    assert run.round_records()[1].aggregated_val_dice == pytest.approx((0.9 * 0.9 + 0.7 * 0.7) / 1.6)
    history = run.round_records()
    assert [h.round for h in history] == [0, 1]
    assert history[0].site_weights == pytest.approx({"nci": 0.5, "suny": 0.5})
    assert history[1].sites["suny"].val_dice == 0.7


def test_crash_mid_round_write_keeps_the_last_committed_round(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    rounds = started()
    run.save_round(run_round(rounds, {"nci": 1, "suny": 1}, {"nci": 0.5, "suny": 0.5}))
    committed = rounds.global_weights["w"].copy()
    # simulate kill -9 after round 1's weights hit the disk but before the commit
    half = run.round_folder(1)
    half.mkdir()
    (half / "global.safetensors").write_bytes(b"half-written")
    point = run.resume_point()
    assert point.completed_rounds == 1 and np.array_equal(point.global_weights["w"], committed)
    # the resumed server redoes round 1 and overwrites the half-written folder
    resumed = started(first_round=point.completed_rounds, weights=point.global_weights)
    run.save_round(run_round(resumed, {"nci": 4, "suny": 4}, {"nci": 0.5, "suny": 0.5}))
    assert run.resume_point().completed_rounds == 2
    assert np.allclose(run.resume_point().global_weights["w"], 4.0)


def test_server_optimizer_moments_survive(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    adam = FedAdam()
    rounds = started(aggregator=adam)
    run.save_round(run_round(rounds, {"nci": 1, "suny": 1}, {"nci": 0.5, "suny": 0.5}), adam.state_dict())
    point = run.resume_point()
    restored = FedAdam()
    restored.load_state_dict(point.server_optimizer)
    assert all(np.array_equal(restored.state_dict()[k], adam.state_dict()[k]) for k in adam.state_dict())


def test_new_run_refuses_a_non_empty_folder_and_open_needs_a_run(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(FedsegError, match="--resume"):
        RunDir.create(tmp_path / "busy", {})
    with pytest.raises(FedsegError, match="not a fedseg run directory"):
        RunDir.open(tmp_path / "busy")
    run = RunDir.create(tmp_path / "run", {"rounds": 3})
    assert run.resume_point() is None
    (tmp_path / "run" / "state.json").write_text("{broken")
    with pytest.raises(FedsegError, match="cannot read"):
        run.resume_point()


def test_files_are_json_and_safetensors_only(tmp_path):
    run = RunDir.create(tmp_path / "run", {"sites": list(SITES)})
    run.save_round(run_round(started(), {"nci": 1, "suny": 2}, {"nci": 0.4, "suny": 0.6}))
    for path in (tmp_path / "run").rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.is_file():
            assert path.suffix == ".safetensors"
