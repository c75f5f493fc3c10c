"""The run directory's records: typed readers, the files' shape, and runs written by older versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.deploy.rundir import RoundRecord, RunDir, RunState
from fedseg.federation.protocol.rounds import EvaluationCompleted, RoundCompleted
from fedseg.federation.strategies import RoundResult, Update


def completed(number: int, dices: dict[str, float]) -> RoundCompleted:
    weights = {site: 1 / len(dices) for site in dices}
    result = RoundResult({"w": np.zeros(2, np.float32)}, weights, dict(weights), list(dices), [])
    updates = {site: Update(site, {}, 5, dice, {"train_loss": 0.5}) for site, dice in dices.items()}
    return RoundCompleted(number, result, updates, {"ucla": "no update before the deadline"})


def test_state_and_rounds_read_back_typed_and_as_the_dicts_older_callers_use(tmp_path):
    run = RunDir.create(tmp_path / "run", {"sites": ["nci", "suny"]})
    assert run.read_state() == RunState() and not run.read_state().has_best
    run.save_round(completed(0, {"nci": 0.4, "suny": 0.6}))
    run.save_round(completed(1, {"nci": 0.2, "suny": 0.2}))
    state = run.read_state()
    # best by the lower median of the sites' Dice (0.4 of 0.4, 0.6); the aggregated Dice is 0.5
    assert (state.completed_rounds, state.best_round, state.best_dice, state.finished) == (2, 0, pytest.approx(0.4), False)
    assert json.loads((run.root / "state.json").read_text()) == {"completed_rounds": 2, "best_round": 0, "best_dice": 0.4}
    assert run.best_score() == (0, pytest.approx(0.4)) and run.round_dice(1) == pytest.approx(0.2)
    assert run.round_dice(0) == pytest.approx(0.5)
    first = run.round_records()[0]
    assert isinstance(first, RoundRecord) and first.sites["suny"].val_dice == 0.6 and first.left_out == {"ucla": "no update before the deadline"}
    assert run.round_records()[1].aggregated_val_dice == pytest.approx(0.2)
    run.finish({"w": np.ones(2, np.float32)})
    assert run.finished and run.read_state().best_round == 0


def test_evaluation_is_written_and_read_typed(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    assert run.evaluation() is None
    run.save_evaluation(EvaluationCompleted({"nci": {"case_0": 0.5, "case_1": 0.7}, "suny": {}}, {"ucla": "gone"}))
    evaluation = run.evaluation()
    assert evaluation.sites["nci"].mean_dice == pytest.approx(0.6) and evaluation.sites["suny"].mean_dice is None
    assert evaluation.left_out == {"ucla": "gone"} and evaluation.rounds == 0


def test_a_run_of_an_older_version_still_resumes(tmp_path):
    """state.json before the end-of-study step had no ``finished``; a round.json without the later lists still reads."""
    run = RunDir.create(tmp_path / "run", {})
    (run.root / "state.json").write_text(json.dumps({"completed_rounds": 1, "best_round": 0, "best_dice": 0.3}))
    folder = run.round_folder(0)
    folder.mkdir(parents=True)
    (folder / "round.json").write_text(json.dumps({
        "round": 0, "aggregated_val_dice": 0.3, "site_weights": {"nci": 1.0},
        "sites": {"nci": {"num_samples": 4, "val_dice": 0.3}},
    }))
    assert not run.finished
    (record,) = run.round_records()
    assert record.left_out == {} and record.notes == [] and record.sites["nci"].metrics == {}


def test_a_broken_state_names_the_file_and_the_field(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    (run.root / "state.json").write_text(json.dumps({"completed_rounds": "two"}))
    with pytest.raises(FedsegError, match=r"state.json: completed_rounds must be an integer"):
        run.resume_point()
