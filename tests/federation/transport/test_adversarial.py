"""The server against dishonest and broken peers, in memory: poisoned and false claims, replays, floods, a full disk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from test_memory import INITIAL, SITES, TIMEOUT_S, NumpyParticipant, study

from fedseg.errors import FedsegError
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.protocol.chunks import to_frames
from fedseg.federation.protocol.constants import MESSAGE_OVERHEAD, MiB
from fedseg.federation.protocol.errors import ErrorCode
from fedseg.federation.protocol.frames import decode
from fedseg.federation.protocol.participant import LocalUpdate, Weights
from fedseg.federation.protocol.rounds import RoundsConfig
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.session import SiteSession
from fedseg.federation.strategies import make_aggregator
from fedseg.federation.transport.connection import ConnectionClosed
from fedseg.federation.transport.memory import MemoryServer
from fedseg.federation.transport.server import serve_study


class Liar(NumpyParticipant):
    """Trains honestly, then sends its weights x1000 with Dice 1.0 and 2^63-1 samples."""

    def train(self, weights: Weights, round: int, epochs: int) -> LocalUpdate:
        honest = super().train(weights, round, epochs)
        return LocalUpdate({n: a * 1000 for n, a in honest.weights.items()}, 2**63 - 1, 1.0, honest.metrics)


@pytest.mark.parametrize("aggregator", ["dice-weighted", "sample-weighted", "median", "trimmed-mean"])
def test_a_scaled_update_with_false_claims_never_reaches_the_model(tmp_path: Path, aggregator: str) -> None:
    participants = {"nci": NumpyParticipant(0), "suny": NumpyParticipant(1), "ucla": Liar(2)}
    final, results, completed = asyncio.run(study(tmp_path, participants, aggregator=aggregator))
    for record in RunDir.open(tmp_path / "run").round_records():
        assert set(record.refused) == {"ucla"} and "exceeds 5 x" in record.refused["ucla"]
        assert set(record.site_weights) == {"nci", "suny"}
    # the global model stays inside the honest sites' range (targets 1 and 2, from 0)
    assert all(0.0 <= float(a.min()) and float(a.max()) <= 2.0 for a in final.values())
    # the best round is scored by the median Dice: the liar's 1.0 does not pick it
    state = RunDir.open(tmp_path / "run").read_state()
    assert state.best_dice < 1.0
    assert isinstance(results["ucla"], dict)  # told each round, never dropped: it stays in the study


async def joined(transport: MemoryServer, site: str):
    """A raw connection that has said HELLO and read the WELCOME; returns (connection context, connection)."""
    context = transport.client(site).connect()
    connection = await context.__aenter__()
    session = SiteSession(site)
    session.connect()
    for frame in session.data_to_send():
        await connection.send(frame)
    assert decode(await connection.recv(timeout=5), max_size=64 * MiB).type is MessageType.WELCOME
    return context, connection


async def next_message(connection, kind: MessageType) -> Message:
    while True:
        message = decode(await connection.recv(timeout=5), max_size=64 * MiB)
        if message.type is kind:
            return message


async def served(tmp_path: Path, transport: MemoryServer, rounds: int = 2, store=None) -> asyncio.Task:
    """The server, listening (a task of this loop)."""
    run = store or RunDir.create(tmp_path / "run", {"sites": list(SITES), "rounds": rounds})
    task = asyncio.create_task(serve_study(
        transport, run, RoundsConfig(SITES, rounds, 3), make_aggregator("uniform"), INITIAL,
        round_timeout_s=TIMEOUT_S, grace_s=TIMEOUT_S,
    ))
    for _ in range(10):
        await asyncio.sleep(0)
    return task


def update_frames(site: str, round_: int, value: float = 0.5) -> list[bytes]:
    body = {"num_samples": 10, "val_dice": 0.5, "metrics": {}}
    tensors = {n: np.full(a.shape, value, a.dtype) for n, a in INITIAL.items()}
    return to_frames(Message(MessageType.UPDATE, round=round_, site=site, body=body, tensors=tensors))


def test_stale_replayed_and_duplicate_updates_are_refused_and_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        transport = MemoryServer()
        server = await served(tmp_path, transport)
        peers = {site: await joined(transport, site) for site in SITES}
        connections = {site: conn for site, (_, conn) in peers.items()}
        for conn in connections.values():
            assert (await next_message(conn, MessageType.TRAIN)).round == 0
        nci = connections["nci"]
        for frame in update_frames("nci", 5):  # a round that is not open
            await nci.send(frame)
        refused = await next_message(nci, MessageType.ERROR)
        assert refused.body["code"] == ErrorCode.REJECTED_UPDATE and "the open round is 0" in refused.body["reason"]
        for site, conn in connections.items():
            for frame in update_frames(site, 0):
                await conn.send(frame)
        assert (await next_message(nci, MessageType.TRAIN)).round == 1
        for frame in update_frames("nci", 0):  # a replay of round 0, arriving during round 1
            await nci.send(frame)
        refused = await next_message(nci, MessageType.ERROR)
        assert "round 0, but the open round is 1" in refused.body["reason"]
        server.cancel()
        for context, _ in peers.values():
            await context.__aexit__(None, None, None)

    asyncio.run(scenario())
    record = RunDir.open(tmp_path / "run").round_records()[0]
    assert record.late_updates == ["nci: update for round 5, but the open round is 0"]
    assert set(record.site_weights) == set(SITES)


def test_connections_above_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        transport = MemoryServer()
        server = await served(tmp_path, transport)
        # connections of a site that never say HELLO: each holds a slot until its HELLO deadline
        contexts = [transport.client("nci").connect() for _ in range(2 * len(SITES) + 8 + 3)]
        connections = [await context.__aenter__() for context in contexts]
        codes = []
        for connection in connections[-3:]:  # over the cap: closed without waiting for a HELLO
            with pytest.raises(ConnectionClosed) as closed:
                await connection.recv(timeout=5)
            codes.append(closed.value.code)
        server.cancel()
        return codes

    assert asyncio.run(scenario()) == [1013, 1013, 1013]


def test_a_message_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    async def scenario() -> Message:
        transport = MemoryServer()
        server = await served(tmp_path, transport)
        context, nci = await joined(transport, "nci")  # (keep the context: dropping it closes the connection)
        huge = {"conv.weight": np.zeros(MESSAGE_OVERHEAD // 4 + 1024, np.float32)}  # the model is 32 bytes
        message = Message(MessageType.UPDATE, round=0, site="nci", body={"num_samples": 1, "val_dice": 0.5, "metrics": {}},
                          tensors=huge)
        for frame in to_frames(message):
            await nci.send(frame)
        error = await next_message(nci, MessageType.ERROR)
        server.cancel()
        return error

    assert asyncio.run(scenario()).body["code"] == ErrorCode.TOO_BIG


class FullDisk(RunDir):
    """A run directory whose disk fills up at the first round commit."""

    def save_round(self, completed, server_optimizer=None):
        raise OSError(28, "No space left on device")


def test_a_full_disk_stops_the_study_with_the_error_instead_of_hanging(tmp_path: Path) -> None:
    async def scenario() -> tuple[BaseException, Message]:
        transport = MemoryServer()
        store = FullDisk.create(tmp_path / "run", {"sites": list(SITES), "rounds": 2})
        server = await served(tmp_path, transport, store=store)
        peers = [await joined(transport, site) for site in SITES]  # (the contexts keep the connections open)
        connections = [conn for _, conn in peers]
        for site, conn in zip(SITES, connections, strict=True):
            await next_message(conn, MessageType.TRAIN)
            for frame in update_frames(site, 0):
                await conn.send(frame)
        async with asyncio.timeout(10):
            with pytest.raises(FedsegError) as failed:
                await server
        return failed.value, await next_message(connections[0], MessageType.ERROR)

    error, told = asyncio.run(scenario())
    assert "could not save round 0" in str(error) and "No space left on device" in str(error)
    assert told.body["code"] == ErrorCode.STUDY_FAILED
