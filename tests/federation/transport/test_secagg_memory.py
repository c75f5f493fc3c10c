"""A securely aggregated study in one process (in-memory transport): the real sessions, round machine and run directory.

Checked: every round's global model equals the plain Dice-weighted mean of what
the sites trained, within the fixed-point bound; round.json holds aggregate
values only and says secure aggregation was on; what the server received from
each site were masked ring elements (never a float tensor); each site's audit
log records the masked payload's hash and its clipping; a site that leaves
after masking is recovered from the others' shares.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedseg.errors import FedsegError
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.protocol.participant import LocalUpdate
from fedseg.federation.protocol.rounds import RoundCompleted, RoundsConfig
from fedseg.federation.protocol.schemas import MessageType
from fedseg.federation.protocol.secagg import SecureSettings
from fedseg.federation.protocol.secagg.masking import sum_error_bound
from fedseg.federation.protocol.session import SecureReceived, ServerSession, UpdateReceived
from fedseg.federation.strategies import make_aggregator
from fedseg.federation.transport.client import join_study
from fedseg.federation.transport.memory import MemoryServer
from fedseg.federation.transport.retry import Backoff
from fedseg.federation.transport.server import serve_study

sys.path.insert(0, str(Path(__file__).parents[1] / "protocol"))
from secagg_helpers import credentials_for  # noqa: E402
from test_memory import INITIAL, SITES, NumpyParticipant  # noqa: E402

ROUNDS = 3
TIMEOUT_S = 30.0


async def secure_study(tmp_path: Path, participants: dict[str, NumpyParticipant], *, round_timeout_s: float = TIMEOUT_S):
    ca, credentials = credentials_for(list(SITES))
    settings = SecureSettings("dice-weighted", clip_ratio=100.0)
    transport = MemoryServer()
    run = RunDir.create(tmp_path / "run", {"sites": list(SITES), "rounds": ROUNDS, "aggregator": "dice-weighted"})
    completed: list[RoundCompleted] = []
    received: list[tuple[str, object]] = []
    original = ServerSession.receive

    def spy(self: ServerSession, frame: bytes):  # what the server process is handed, event by event
        events = original(self, frame)
        received.extend((self.site, event) for event in events if isinstance(event, SecureReceived | UpdateReceived))
        return events

    ServerSession.receive = spy  # type: ignore[method-assign]
    try:
        server = asyncio.create_task(serve_study(
            transport, run, RoundsConfig(SITES, ROUNDS, 2, secure=settings, certificates=ca),
            make_aggregator("dice-weighted", secure=True), INITIAL, round_timeout_s=round_timeout_s, grace_s=TIMEOUT_S,
            on_event=lambda action: completed.append(action) if isinstance(action, RoundCompleted) else None,
        ))
        clients = {}
        for site, participant in participants.items():
            client = transport.client(site)
            clients[site] = asyncio.create_task(join_study(
                client, participant, site, audit_log=tmp_path / f"{site}.audit.jsonl", backoff=Backoff(50, 0.01, 0.05),
                secure=settings, credentials=credentials[site],
            ))
        async with asyncio.timeout(TIMEOUT_S):
            final = await server
            results = dict(zip(clients, await asyncio.gather(*clients.values(), return_exceptions=True), strict=True))
    finally:
        ServerSession.receive = original  # type: ignore[method-assign]
    return final, results, completed, received


def plain_mean(updates: dict[str, LocalUpdate]) -> dict[str, np.ndarray]:
    total = sum(u.val_dice for u in updates.values())
    return {name: sum(u.val_dice / total * u.weights[name].astype(np.float64) for u in updates.values()) for name in INITIAL}


def test_secure_study_matches_the_plain_mean_and_the_server_sees_only_masked_payloads(tmp_path: Path) -> None:
    participants = {site: NumpyParticipant(i) for i, site in enumerate(SITES)}
    final, results, completed, received = asyncio.run(secure_study(tmp_path, participants))
    assert [c.round for c in completed] == [0, 1, 2]
    for number in range(ROUNDS):
        folder = tmp_path / "run" / "rounds" / f"{number:04d}"
        record = json.loads((folder / "round.json").read_text())
        assert record["secure_aggregation"] is True and record["sites"] == {} and record["site_weights"] == {}
        updates = {site: p.sent[number] for site, p in participants.items()}
        dice = [u.val_dice for u in updates.values()]
        # the scalars share the round's fixed point (>= 20 fraction bits: each sum within 3 x 2^-21)
        assert record["aggregated_val_dice"] == pytest.approx(sum(d * d for d in dice) / sum(dice), abs=1e-5)
        assert record["mean_val_dice"] == pytest.approx(np.mean(dice), abs=1e-5)
        saved = load_file(str(folder / "global.safetensors"))
        bound = sum_error_bound(3, 16) / min(dice)  # generous: the actual scale has far more fraction bits
        for name, expected in plain_mean(updates).items():
            np.testing.assert_allclose(saved[name], expected, rtol=0, atol=bound + 1e-6)
    assert all(isinstance(w, dict) for w in results.values())

    # the server process was handed no UPDATE and no float tensor from any site: masked ring elements only
    assert not any(isinstance(event, UpdateReceived) for _, event in received)
    masked = [event.message for _, event in received if event.message.type is MessageType.MASKED]
    assert len(masked) == 3 * ROUNDS
    assert all(array.dtype.kind == "u" for message in masked for array in message.tensors.values())

    # each site's audit log: the MASKED message with the hash of the masked frames, the clip report, no plain UPDATE
    for site in SITES:
        lines = [json.loads(line) for line in (tmp_path / f"{site}.audit.jsonl").read_text().splitlines()]
        kinds = [line["message"] for line in lines]
        assert "UPDATE" not in kinds and kinds.count("MASKED") == ROUNDS and kinds.count("REVEAL") == ROUNDS
        for line in lines:
            if line["message"] == "MASKED":
                clip = line["secure_aggregation"]
                assert clip["sent_change_norm"] <= clip["clip_bound"] and len(line["sha256"]) == 64


class Crashes(NumpyParticipant):
    """Its process ends during the epoch of ``round`` (after it dealt its shares): its connection closes."""

    def __init__(self, index: int, round_: int) -> None:
        super().__init__(index)
        self.crash_round = round_

    def train(self, weights, round, epochs):  # noqa: A002 - the Participant interface's name
        if round == self.crash_round:
            raise FedsegError("the site's process died")
        return super().train(weights, round, epochs)


class Stalls(NumpyParticipant):
    """Hangs in the epoch of ``round`` far beyond the round's deadline (a paused process), then goes on."""

    def __init__(self, index: int, round_: int, seconds: float) -> None:
        super().__init__(index)
        self.stall_round, self.seconds = round_, seconds

    def train(self, weights, round, epochs):  # noqa: A002
        if round == self.stall_round:
            time.sleep(self.seconds)
        return super().train(weights, round, epochs)


def test_a_site_dying_after_dealing_its_shares_is_recovered_and_the_study_goes_on(tmp_path: Path) -> None:
    participants = {"nci": NumpyParticipant(0), "suny": Crashes(1, round_=1), "ucla": NumpyParticipant(2)}
    final, results, completed, _ = asyncio.run(secure_study(tmp_path, participants))
    assert [c.round for c in completed] == [0, 1, 2]
    assert isinstance(results["suny"], FedsegError)
    record = json.loads((tmp_path / "run" / "rounds" / "0001" / "round.json").read_text())
    assert record["arrival_order"] == ["nci", "ucla"] and "suny" in record["left_out"]
    assert any("suny dropped out after dealing shares" in note for note in record["notes"])
    updates = {site: participants[site].sent[1] for site in ("nci", "ucla")}
    saved = load_file(str(tmp_path / "run" / "rounds" / "0001" / "global.safetensors"))
    for name, expected in plain_mean(updates).items():
        np.testing.assert_allclose(saved[name], expected, atol=1e-6)


def test_a_stalled_site_is_left_out_at_the_deadline_and_the_round_unmasks_without_it(tmp_path: Path) -> None:
    participants = {"nci": NumpyParticipant(0), "suny": NumpyParticipant(1), "ucla": Stalls(2, round_=1, seconds=6.0)}
    start = time.monotonic()
    final, results, completed, _ = asyncio.run(secure_study(tmp_path, participants, round_timeout_s=3.0))
    assert time.monotonic() - start < TIMEOUT_S
    record = json.loads((tmp_path / "run" / "rounds" / "0001" / "round.json").read_text())
    assert record["left_out"]["ucla"].startswith("timed out (secure aggregation, stage MASKED)")
    assert record["arrival_order"] == ["nci", "suny"]
    assert [c.round for c in completed] == [0, 1, 2]


def test_the_server_accepts_a_masked_update_of_a_model_above_the_flat_message_limit() -> None:
    """A 150 M-parameter masked update is 1.2 GB (8 bytes a value): more than the 1 GiB default, within its own limit."""
    from fedseg.federation.protocol.constants import DEFAULT_MAX_MESSAGE, message_limit
    from fedseg.federation.protocol.rounds import ServerRounds
    from fedseg.federation.transport.server import _largest_upload

    ca, _ = credentials_for(list(SITES))
    big = {"w": np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(150_000_000,), strides=(0,))}
    secure = ServerRounds(RoundsConfig(SITES, 1, 2, secure=SecureSettings(), certificates=ca), make_aggregator("uniform", secure=True), big)
    plain = ServerRounds(RoundsConfig(SITES, 1, 2), make_aggregator("uniform"), big)
    assert _largest_upload(secure) == 8 * 150_000_000 + 64 and _largest_upload(plain) == 4 * 150_000_000
    assert message_limit(_largest_upload(secure)) > DEFAULT_MAX_MESSAGE > message_limit(_largest_upload(plain))
