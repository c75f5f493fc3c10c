"""Server round state machine: quorum, failures, timeouts, rejection, completion — no network."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.protocol.rounds import (
    EvaluationCompleted,
    Phase,
    RoundCompleted,
    RoundsConfig,
    SendFinal,
    SendTrain,
    ServerRounds,
    StudyDone,
    StudyFailed,
    UpdateRefused,
)
from fedseg.federation.strategies import Update, WeightedMean

SITES = ("nci", "suny", "ucla")
GLOBAL = {"w": np.zeros(3, np.float32)}


def update(site: str, value: float, dice: float = 0.5, samples: int = 10) -> Update:
    return Update(site, {"w": np.full(3, value, np.float32)}, samples, dice)


def server(
    rounds: int = 3, min_sites: int = 2, first_round: int = 0, evaluate: bool = True, finished: bool = False
) -> ServerRounds:
    config = RoundsConfig(SITES, rounds, min_sites, evaluate)
    return ServerRounds(config, WeightedMean("dice-weighted"), dict(GLOBAL), first_round, finished)


def test_first_round_starts_when_everyone_is_connected():
    rounds = server()
    assert rounds.site_connected("nci") == [] and not rounds.quorum_reached
    assert rounds.site_connected("suny") == [] and rounds.quorum_reached
    assert rounds.site_connected("ucla") == [SendTrain(site, 0) for site in SITES]
    assert rounds.round_open == 0


def test_round_starts_at_quorum_after_grace_and_late_joiner_waits_for_next_round():
    rounds = server()
    rounds.site_connected("nci")
    assert rounds.quorum_wait_expired() == []  # 1 < min_sites
    rounds.site_connected("suny")
    assert rounds.quorum_wait_expired() == [SendTrain("nci", 0), SendTrain("suny", 0)]
    assert rounds.round_open == 0
    assert rounds.site_connected("ucla") == []  # joins round 1
    rounds.update_received("nci", update("nci", 1.0, dice=0.9), rounds.round_open)
    actions = rounds.update_received("suny", update("suny", 4.0, dice=0.6), rounds.round_open)
    completed = actions[0]
    assert isinstance(completed, RoundCompleted) and completed.round == 0
    # dice-weighted by hand: (0.9 * 1 + 0.6 * 4) / 1.5 = 2.2
    assert np.allclose(completed.result.weights["w"], 2.2)
    assert completed.result.site_weights == pytest.approx({"nci": 0.6, "suny": 0.4})
    assert actions[1:] == [SendTrain("nci", 1), SendTrain("suny", 1), SendTrain("ucla", 1)]
    assert np.allclose(rounds.global_weights["w"], 2.2)


def test_rejected_update_never_reaches_the_global_model():
    rounds = server(min_sites=2)
    for site in SITES:
        rounds.site_connected(site)
    bad = Update("ucla", {"w": np.array([np.nan, 0, 0], np.float32)}, 10, 0.9)
    (refused,) = rounds.update_received("ucla", bad, rounds.round_open)  # the site is told why, the round goes on
    assert isinstance(refused, UpdateRefused) and (refused.site, refused.round) == ("ucla", 0)
    assert "non-finite" in refused.reason
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    completed = rounds.update_received("suny", update("suny", 3.0), rounds.round_open)[0]
    assert np.allclose(completed.result.weights["w"], 2.0)
    assert "ucla" in completed.left_out and "refused" in completed.left_out["ucla"]
    assert "non-finite" in completed.refused["ucla"]
    assert set(completed.updates) == {"nci", "suny"}


@pytest.mark.parametrize(
    "bad",
    [
        update("ucla", 1.0, dice=1.5),
        Update("ucla", {"w": np.zeros(4, np.float32)}, 10, 0.5),
        Update("ucla", {"w": np.zeros(3, np.float32), "extra": np.zeros(1, np.float32)}, 10, 0.5),
        update("ucla", 1.0, samples=0),
    ],
    ids=["dice>1", "wrong shape", "extra tensor", "no samples"],
)
def test_every_kind_of_bad_update_is_left_out(bad):
    rounds = server(min_sites=2)
    for site in SITES:
        rounds.site_connected(site)
    rounds.update_received("ucla", bad, rounds.round_open)
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    completed = rounds.update_received("suny", update("suny", 1.0), rounds.round_open)[0]
    assert np.allclose(completed.result.weights["w"], 1.0)
    assert list(completed.left_out) == ["ucla"]


def test_timeout_leaves_pending_sites_out_and_round_completes_with_quorum():
    rounds = server(min_sites=2)
    for site in SITES:
        rounds.site_connected(site)
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    rounds.update_received("suny", update("suny", 1.0), rounds.round_open)
    assert rounds.round_timed_out(5) == []  # another round's timer: ignored
    completed = rounds.round_timed_out(0)[0]
    assert completed.left_out == {"ucla": "timed out"}


def test_quorum_lost_fails_the_study_with_reasons():
    rounds = server(min_sites=3)
    for site in SITES:
        rounds.site_connected(site)
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    rounds.site_failed("suny", "connection lost")
    actions = rounds.round_timed_out(0)
    assert len(actions) == 1 and isinstance(actions[0], StudyFailed)
    assert "suny: connection lost" in actions[0].reason and "ucla: timed out" in actions[0].reason
    # what the sites are told gives counts, not the other sites' names
    assert "1 update(s) accepted, min_sites is 3" in actions[0].public_reason
    assert not any(site in actions[0].public_reason for site in SITES)
    assert rounds.phase == Phase.FAILED


def test_only_site_of_a_round_failing_fails_the_study():
    rounds = server(min_sites=1)
    rounds.site_connected("nci")
    rounds.quorum_wait_expired()
    rounds.site_connected("suny")  # waits for round 1
    actions = rounds.site_failed("nci", "killed")
    assert isinstance(actions[0], StudyFailed) and "nci: killed" in actions[0].reason


def test_site_reconnecting_mid_study_is_asked_again():
    rounds = server(min_sites=2)
    for site in SITES:
        rounds.site_connected(site)
    rounds.site_failed("ucla", "killed")
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    actions = rounds.update_received("suny", update("suny", 1.0), rounds.round_open)
    assert [a.site for a in actions if isinstance(a, SendTrain)] == ["nci", "suny"]
    assert rounds.site_connected("ucla") == []  # round 1 already open
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    actions = rounds.update_received("suny", update("suny", 1.0), rounds.round_open)
    assert [a.site for a in actions if isinstance(a, SendTrain)] == ["nci", "suny", "ucla"]


def test_last_round_without_evaluation_sends_the_models_and_ends_the_study():
    rounds = server(rounds=1, min_sites=2, evaluate=False)
    rounds.site_connected("nci")
    rounds.site_connected("suny")
    rounds.quorum_wait_expired()
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    actions = rounds.update_received("suny", update("suny", 1.0), rounds.round_open)
    assert isinstance(actions[0], RoundCompleted)
    assert actions[1:] == [SendFinal("nci", False), SendFinal("suny", False), StudyDone(1)]
    assert rounds.phase == Phase.DONE
    (late,) = rounds.update_received("nci", update("nci", 9.0), 0)  # refused (and told), never aggregated
    assert isinstance(late, UpdateRefused) and "no training round is open" in late.reason
    assert np.allclose(rounds.global_weights["w"], 1.0)


def finish_training(rounds: ServerRounds) -> list:
    for site in SITES:
        rounds.site_connected(site)
    rounds.update_received("nci", update("nci", 1.0), rounds.round_open)
    rounds.update_received("suny", update("suny", 1.0), rounds.round_open)
    return rounds.update_received("ucla", update("ucla", 1.0), rounds.round_open)


def test_final_step_collects_per_case_dice_from_every_site():
    rounds = server(rounds=1)
    actions = finish_training(rounds)
    assert actions[1:] == [SendFinal(site, True) for site in SITES]
    assert rounds.phase == Phase.FINISHING and rounds.round_open == 1
    (late,) = rounds.update_received("nci", update("nci", 5.0), 0)  # no training any more
    assert isinstance(late, UpdateRefused)
    assert rounds.result_received("nci", {"c1": 0.9, "c2": 0.8}) == []
    assert rounds.result_received("nci", {"c1": 0.0}) == []  # second answer ignored
    assert rounds.result_received("suny", {"c3": 0.7}) == []
    done = rounds.result_received("ucla", {})
    assert done == [EvaluationCompleted({"nci": {"c1": 0.9, "c2": 0.8}, "suny": {"c3": 0.7}, "ucla": {}}, {}), StudyDone(1)]
    assert rounds.phase == Phase.DONE


def test_final_step_reports_failed_sites_serves_rejoiners_and_never_fails_the_study():
    rounds = server(rounds=1, min_sites=3)
    finish_training(rounds)
    rounds.site_failed("ucla", "connection lost")
    assert rounds.site_connected("ucla") == [SendFinal("ucla", True)]  # rejoined during the final step
    rounds.result_received("nci", {"c1": 0.9})
    rounds.site_failed("suny", "site reported an error: no test cases")
    actions = rounds.round_timed_out(1)
    assert actions == [EvaluationCompleted({"nci": {"c1": 0.9}}, {"suny": "site reported an error: no test cases", "ucla": "timed out"}), StudyDone(1)]
    assert rounds.phase == Phase.DONE


def test_resumed_study_starts_at_its_next_round_and_unknown_sites_are_refused():
    rounds = server(rounds=3, first_round=2)
    rounds.site_connected("nci")
    rounds.site_connected("suny")
    assert rounds.quorum_wait_expired() == [SendTrain("nci", 2), SendTrain("suny", 2)]
    assert server(rounds=3, first_round=3, finished=True).phase == Phase.DONE
    # trained but the final step never ran (crash): it runs once the sites are back
    unfinished = server(rounds=3, first_round=3)
    assert unfinished.phase == Phase.WAITING
    assert [unfinished.site_connected(site) for site in SITES][-1] == [SendFinal(site, True) for site in SITES]
    with pytest.raises(FedsegError, match="not part of this study"):
        rounds.site_connected("mayo")
    with pytest.raises(FedsegError, match="min_sites"):
        RoundsConfig(SITES, 3, 4)


def test_completed_rounds_keep_the_sites_scalars_but_not_their_weights():
    """Memory must not grow with the number of sites: weights go into the running sum only."""
    rounds = server(rounds=2)
    for site in SITES:
        rounds.site_connected(site)
    rounds.update_received("nci", update("nci", 1.0, dice=0.9), rounds.round_open)
    rounds.update_received("suny", update("suny", 2.0, dice=0.8), rounds.round_open)
    completed = rounds.update_received("ucla", update("ucla", 3.0, dice=0.7), rounds.round_open)[0]
    assert isinstance(completed, RoundCompleted)
    assert all(u.weights == {} for u in completed.updates.values())
    assert {s: u.val_dice for s, u in completed.updates.items()} == {"nci": 0.9, "suny": 0.8, "ucla": 0.7}
    assert completed.result.weights["w"].shape == (3,)


def test_a_sample_count_above_the_declared_one_or_a_changed_one_is_refused():
    rounds = ServerRounds(
        RoundsConfig(SITES, 3, 2, declared_samples={"ucla": 10}), WeightedMean("sample-weighted"), {"w": np.zeros(3, np.float32)}
    )
    for site in SITES:
        rounds.site_connected(site)
    liar = Update("ucla", {"w": np.ones(3, np.float32)}, 2**63 - 1, 0.5)
    (refused, *_) = rounds.update_received("ucla", liar, 0)
    assert isinstance(refused, UpdateRefused) and "exceeds the 10 training cases declared" in refused.reason
    rounds.update_received("nci", Update("nci", {"w": np.ones(3, np.float32)}, 30, 0.5), 0)
    completed = rounds.update_received("suny", Update("suny", {"w": np.ones(3, np.float32)}, 20, 0.5), 0)[0]
    assert set(completed.refused) == {"ucla"}
    (changed, *_) = rounds.update_received("nci", Update("nci", {"w": np.ones(3, np.float32)}, 3000, 0.5), 1)
    assert isinstance(changed, UpdateRefused) and "changed from 30 to 3000" in changed.reason
