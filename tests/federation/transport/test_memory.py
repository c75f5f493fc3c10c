"""A whole federated study in one process over the in-memory transport: no sockets, no torch, a few seconds.

The real shells run: :func:`serve_study` (ServerRounds, a real RunDir, the
Dice-weighted aggregator) and three :func:`join_study` pumps with numpy
participants whose "training" moves the weights half-way towards the site's own
target. Checked: every round's global model is the hand-computed Dice-weighted
mean of what the sites sent, the end of the study (MODEL final and best,
EVALUATE → RESULT, DONE, evaluation.json, the audit logs), and failures: a site
that dies, one whose update is rejected, one whose link drops and comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedseg.errors import FedsegError
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.protocol.participant import LocalUpdate, Weights
from fedseg.federation.protocol.rounds import RoundCompleted, RoundsConfig
from fedseg.federation.strategies import make_aggregator
from fedseg.federation.transport.client import join_study
from fedseg.federation.transport.memory import MemoryServer
from fedseg.federation.transport.retry import Backoff
from fedseg.federation.transport.server import serve_study

SITES = ("nci", "suny", "ucla")
ROUNDS = 3
TIMEOUT_S = 20.0
INITIAL = {"conv.weight": np.zeros((2, 3), np.float32), "conv.bias": np.zeros(2, np.float32)}


class NumpyParticipant:
    """Each epoch moves the weights half-way to this site's target; reports a fixed Dice per round."""

    def __init__(
        self, index: int, fail_in_round: int | None = None, error: BaseException | None = None, slow_round: int | None = None
    ) -> None:
        self.target = {name: np.full(array.shape, index + 1.0, np.float32) for name, array in INITIAL.items()}
        self.index = index
        self.fail_in_round = fail_in_round
        self.error = error
        self.slow_round = slow_round
        self.sent: dict[int, LocalUpdate] = {}
        self.models: dict[str, tuple[int | None, Weights, float | None]] = {}
        self.evaluated: list[Weights] = []

    def dice(self, round_: int) -> float:
        return 0.9 - 0.2 * self.index + 0.01 * round_

    def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
        if round == self.fail_in_round and self.error is not None:
            error, self.error = self.error, None
            raise error
        if round == self.slow_round:
            time.sleep(0.3)  # in a worker thread, as an epoch is: the event loop goes on
        new = {name: array.copy() for name, array in weights.items()}
        for _ in range(epochs):
            new = {name: new[name] + 0.5 * (self.target[name] - new[name]) for name in new}
        update = LocalUpdate(new, 10 + self.index, self.dice(round), {"train_loss": 1.0 / (round + 1)})
        self.sent[round] = update
        return update

    def keep_model(self, name: str, round: int | None, weights: Weights, val_dice: float | None) -> None:
        self.models[name] = (round, weights, val_dice)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        self.evaluated.append(weights)
        return {f"patient-{self.index}-{i}": 0.5 + 0.1 * i for i in range(3)}


async def study(
    tmp_path: Path, participants: dict[str, NumpyParticipant], *, min_sites: int = 2, local_epochs: int = 1,
    aggregator: str = "dice-weighted",
) -> tuple[dict[str, np.ndarray], dict[str, object], list[RoundCompleted]]:
    """Server and clients over one MemoryServer; returns (server weights, {site: weights or exception}, rounds)."""
    transport = MemoryServer()
    run = RunDir.create(tmp_path / "run", {"sites": list(SITES), "rounds": ROUNDS, "aggregator": aggregator})
    completed: list[RoundCompleted] = []
    server = asyncio.create_task(serve_study(
        transport, run, RoundsConfig(SITES, ROUNDS, min_sites), make_aggregator(aggregator), INITIAL,
        round_timeout_s=TIMEOUT_S, grace_s=TIMEOUT_S, local_epochs=local_epochs,
        on_event=lambda action: completed.append(action) if isinstance(action, RoundCompleted) else None,
    ))
    clients = {
        site: asyncio.create_task(join_study(
            transport.client(site), participant, site, audit_log=tmp_path / f"{site}.audit.jsonl",
            backoff=Backoff(50, 0.01, 0.05),
        ))
        for site, participant in participants.items()
    }
    async with asyncio.timeout(TIMEOUT_S):
        final = await server
        results = dict(zip(clients, await asyncio.gather(*clients.values(), return_exceptions=True), strict=True))
    return final, results, completed


def dice_weighted_mean(updates: dict[str, LocalUpdate]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The paper's rule by hand, in float64: each site weighs its validation Dice over the sum of them."""
    total = sum(u.val_dice for u in updates.values())
    share = {site: u.val_dice / total for site, u in updates.items()}
    mean = {name: sum(share[s] * updates[s].weights[name].astype(np.float64) for s in updates) for name in INITIAL}
    return share, mean


def assert_round(run_dir: Path, number: int, updates: dict[str, LocalUpdate]) -> dict[str, np.ndarray]:
    folder = run_dir / "rounds" / f"{number:04d}"
    record = json.loads((folder / "round.json").read_text())
    share, mean = dice_weighted_mean(updates)
    assert record["site_weights"] == pytest.approx(share)
    saved = load_file(str(folder / "global.safetensors"))
    assert saved.keys() == mean.keys()
    for name, array in saved.items():
        np.testing.assert_allclose(array, mean[name], rtol=1e-6, atol=1e-7)
    return saved


def test_three_site_study_in_memory(tmp_path: Path) -> None:
    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES)}
    final, results, completed = asyncio.run(study(tmp_path, participants))
    run_dir = tmp_path / "run"

    # every round: the Dice-weighted mean of exactly what the sites sent, from the previous global model
    assert [c.round for c in completed] == [0, 1, 2]
    previous = INITIAL
    for number in range(ROUNDS):
        updates = {site: p.sent[number] for site, p in participants.items()}
        previous = assert_round(run_dir, number, updates)
    for name, array in INITIAL.items():  # round 0's updates started from the initial model: 0 + 0.5 * (target - 0)
        np.testing.assert_array_equal(participants["suny"].sent[0].weights[name], np.full(array.shape, 1.0))
    for weights in (final, *results.values()):
        assert isinstance(weights, dict) and all(np.array_equal(weights[n], previous[n]) for n in previous)

    # the end: final and best models to every site, the final one evaluated, per-case Dice kept
    state = RunDir.open(run_dir).read_state()
    assert state.finished and state.completed_rounds == ROUNDS
    best = load_file(str(run_dir / "rounds" / f"{state.best_round:04d}" / "global.safetensors"))
    last_dice = json.loads((run_dir / "rounds" / f"{ROUNDS - 1:04d}" / "round.json").read_text())["aggregated_val_dice"]
    for participant in participants.values():
        round_, weights, dice = participant.models["final"]
        assert round_ == ROUNDS - 1 and dice == pytest.approx(last_dice)
        assert all(np.array_equal(weights[n], previous[n]) for n in previous)
        best_round, best_weights, best_dice = participant.models["best"]
        assert best_round == state.best_round and best_dice == pytest.approx(state.best_dice)
        assert all(np.array_equal(best_weights[n], best[n]) for n in best)
        assert len(participant.evaluated) == 1 and all(np.array_equal(participant.evaluated[0][n], previous[n]) for n in previous)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["left_out"] == {} and sorted(evaluation["sites"]) == sorted(SITES)
    assert evaluation["sites"]["ucla"] == {
        "n": 3, "mean_dice": pytest.approx(0.6), "case_dice": {"case-001": 0.5, "case-002": 0.6, "case-003": pytest.approx(0.7)}
    }

    # the audit log: every message that left, the HELLO, every UPDATE and the RESULT (under pseudonyms)
    lines = [json.loads(line) for line in (tmp_path / "nci.audit.jsonl").read_text().splitlines()]
    assert [(line["message"], line["round"]) for line in lines] == [
        ("HELLO", None), ("UPDATE", 0), ("UPDATE", 1), ("UPDATE", 2), ("RESULT", 2)
    ]
    assert lines[1]["server"] == "memory://server" and lines[1]["tensors"] == sorted(INITIAL)
    assert lines[1]["scalars"] == {"num_samples": 10, "val_dice": pytest.approx(0.9), "train_loss": 1.0}
    assert all(len(line["sha256"]) == 64 for line in lines)
    assert sorted(lines[-1]["scalars"]["case_dice"]) == ["case-001", "case-002", "case-003"]


def test_a_site_that_dies_is_left_out_and_the_study_goes_on(tmp_path: Path) -> None:
    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES)}
    participants["ucla"] = NumpyParticipant(2, fail_in_round=1, error=RuntimeError("disk failure at the site"))
    final, results, completed = asyncio.run(study(tmp_path, participants))

    assert isinstance(results["ucla"], RuntimeError)  # not a connection problem: not retried
    assert [sorted(c.result.sites) for c in completed] == [sorted(SITES), ["nci", "suny"], ["nci", "suny"]]
    assert "connection lost" in completed[1].left_out["ucla"]
    for number in (1, 2):
        assert_round(tmp_path / "run", number, {site: participants[site].sent[number] for site in ("nci", "suny")})
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert sorted(evaluation["sites"]) == ["nci", "suny"]
    assert all(np.array_equal(results["nci"][n], final[n]) for n in final)  # type: ignore[index]


def test_a_rejected_update_leaves_the_site_out_of_that_round_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Misshapen(NumpyParticipant):
        def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
            update = super().train(weights, round, epochs)
            if round == 0:
                update.weights["conv.bias"] = np.zeros(7, np.float32)  # the server refuses it, the site cannot tell
            return update

    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES[:2])}
    participants["ucla"] = Misshapen(2)
    with caplog.at_level(logging.WARNING, logger="fedseg.client"):
        _, results, completed = asyncio.run(study(tmp_path, participants))
    assert sorted(completed[0].result.sites) == ["nci", "suny"] and "shape" in completed[0].refused["ucla"]
    assert [sorted(c.result.sites) for c in completed[1:]] == [sorted(SITES)] * 2
    told = [r.getMessage() for r in caplog.records if "rejected this site's update" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("round 0:")
    assert all(isinstance(weights, dict) for weights in results.values())


def test_a_site_whose_training_diverges_reports_it_and_stays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Diverging(NumpyParticipant):
        def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
            update = super().train(weights, round, epochs)
            if round == 0:
                update.weights["conv.bias"][0] = np.nan
            return update

    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES[:2])}
    participants["ucla"] = Diverging(2)
    with caplog.at_level(logging.WARNING):
        _, results, completed = asyncio.run(study(tmp_path, participants))
    # nothing non-finite left the site: it said its round failed, and trained the next rounds
    assert sorted(completed[0].result.sites) == ["nci", "suny"] and completed[0].refused == {}
    assert "training failed at the site" in completed[0].left_out["ucla"] and "NaN" in completed[0].left_out["ucla"]
    assert [sorted(c.result.sites) for c in completed[1:]] == [sorted(SITES)] * 2
    assert all(isinstance(weights, dict) for weights in results.values())
    audit = [json.loads(line) for line in (tmp_path / "ucla.audit.jsonl").read_text().splitlines()]
    assert [line["message"] for line in audit[:3]] == ["HELLO", "ERROR", "UPDATE"]
    assert audit[1]["scalars"]["code"] == 4424 and audit[1]["tensors"] == []


def test_a_dropped_link_is_retried_and_the_site_rejoins(tmp_path: Path) -> None:
    # nci and suny take long enough over round 0 for ucla to be back before round 1
    participants = {site: NumpyParticipant(i, slow_round=0) for i, site in enumerate(SITES)}
    participants["ucla"] = NumpyParticipant(2, fail_in_round=0, error=ConnectionResetError("link down"))
    _, results, completed = asyncio.run(study(tmp_path, participants, local_epochs=2))
    assert sorted(completed[0].result.sites) == ["nci", "suny"] and "connection lost" in completed[0].left_out["ucla"]
    assert sorted(completed[1].result.sites) == sorted(SITES)
    assert all(isinstance(weights, dict) for weights in results.values())
    # two local epochs: three quarters of the way to the target from round 0's start
    np.testing.assert_allclose(participants["nci"].sent[0].weights["conv.weight"], np.full((2, 3), 0.75))


def test_quorum_lost_fails_on_both_sides(tmp_path: Path) -> None:
    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES)}
    participants["ucla"] = NumpyParticipant(2, fail_in_round=0, error=RuntimeError("disk failure"))

    async def scenario() -> None:
        with pytest.raises(FedsegError, match=r"round 0: 2 update\(s\) accepted, min_sites is 3 \(ucla: connection lost"):
            await study(tmp_path, participants, min_sites=3)

    asyncio.run(scenario())
    assert RunDir.open(tmp_path / "run").read_state().completed_rounds == 0


def test_unknown_identity_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        transport = MemoryServer()
        run = RunDir.create(tmp_path / "run", {"sites": ["nci"], "rounds": 1})
        server = asyncio.create_task(serve_study(
            transport, run, RoundsConfig(("nci",), 1, 1), make_aggregator("dice-weighted"), INITIAL,
            round_timeout_s=TIMEOUT_S, grace_s=TIMEOUT_S,
        ))
        await asyncio.sleep(0)
        for identity, reason in [("mallory", "identity 'mallory' is not a site of this study"), (None, "plain connections")]:
            with pytest.raises(FedsegError, match=f"server refused the connection: {reason}"):
                await join_study(transport.client(identity), NumpyParticipant(0), identity or "nci", backoff=Backoff(0))
        assert not server.done()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server

    asyncio.run(scenario())


# ----------------------------------------------------------------- the transport itself


def test_connections_deliver_in_order_then_the_close() -> None:
    from fedseg.federation.protocol.errors import UnknownSite
    from fedseg.federation.transport.connection import ConnectionClosed
    from fedseg.federation.transport.memory import MemoryConnection

    async def scenario() -> None:
        client, server = MemoryConnection.pair("nci", "peer 1")
        assert server.peer_site(frozenset({"nci"})) == "nci"
        with pytest.raises(UnknownSite, match="'nci' is not a site of this study"):
            server.peer_site(frozenset({"suny"}))
        with pytest.raises(UnknownSite, match="plain connections"):
            client.peer_site(frozenset({"nci"}))
        await client.send(b"one")
        await client.send(b"two")
        await client.close(4409, "quorum lost")
        with pytest.raises(ConnectionClosed):
            await client.send(b"three")
        assert [await server.recv(), await server.recv()] == [b"one", b"two"]
        with pytest.raises(ConnectionClosed) as closed:
            await server.recv()
        assert (closed.value.code, closed.value.reason, closed.value.clean) == (4409, "quorum lost", False)
        with pytest.raises(ConnectionClosed):
            await server.send(b"late")  # the peer is gone
        with pytest.raises(TimeoutError):
            await MemoryConnection.pair(None, "peer 2")[0].recv(timeout=0.01)

    asyncio.run(scenario())


def test_a_closed_connection_wakes_its_own_reader_and_abort_is_not_clean() -> None:
    from fedseg.federation.transport.connection import ConnectionClosed
    from fedseg.federation.transport.memory import MemoryConnection

    async def scenario() -> None:
        _, server = MemoryConnection.pair("nci", "peer 1")
        reader = asyncio.create_task(server.recv())
        await asyncio.sleep(0)
        await server.close(1000, "replaced by a new connection")
        with pytest.raises(ConnectionClosed) as closed:
            await reader
        assert closed.value.clean
        other, peer = MemoryConnection.pair("nci", "peer 2")
        await other.abort()
        with pytest.raises(ConnectionClosed) as aborted:
            await peer.recv()
        assert aborted.value.code == 1006 and not aborted.value.clean

    asyncio.run(scenario())
