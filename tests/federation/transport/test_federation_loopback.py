"""Federation over loopback: a real server and three site clients, mutual TLS, a tiny network.

Everything runs in one event loop on 127.0.0.1: the server and the clients
are asyncio tasks; each client's epoch runs in a worker thread, as in
production. The global model is checked against the aggregator's math
recomputed from what the sites actually sent. (The same study without sockets,
in a few seconds: test_memory.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from safetensors.numpy import load_file
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import cube_case
from fedseg.errors import FedsegError
from fedseg.federation.protocol.chunks import Reassembler
from fedseg.federation.protocol.errors import ErrorCode
from fedseg.federation.protocol.frames import encode
from fedseg.federation.transport.client import run_client
from fedseg.federation.deploy.certificates import issue_site_certificate, load_ca
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.transport.kit import Kit, load_kit
from fedseg.federation.protocol.rounds import RoundsConfig
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.transport.server import run_server
from fedseg.federation.strategies import make_aggregator
from fedseg.federation.transport.tls import client_context
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.models import build_model
from fedseg.site import TorchParticipant
from fedseg.training.augment import AugmentConfig
from fedseg.training.config import TrainConfig
from fedseg.training.engine import EpochResult, LocalTrainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SITES = ("nci", "suny", "ucla")
STUDY_TIMEOUT_S = 60.0
Tamper = Callable[[int, EpochResult], EpochResult]


# ----------------------------------------------------------------- helpers



CONFIG = TrainConfig(
    patch_size=(16, 16, 8),
    batch_size=2,
    samples_per_volume=1,
    sw_batch_size=2,
    learning_rate=1e-2,
    threads=1,
    augment=AugmentConfig.off(),
)


def initial_weights() -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in build_model(CONFIG.network, seed=0).state_dict().items()}


class RecordingTrainer:
    """A LocalTrainer that remembers every result it returned (and may tamper with it)."""

    def __init__(self, index: int, tamper: Tamper | None = None) -> None:
        model = build_model(CONFIG.network, seed=index)
        self.inner = LocalTrainer(model, [cube_case(index)], [cube_case(10 + index)], CONFIG)
        self.tamper = tamper
        self.results: list[EpochResult] = []

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None, validate: bool | None = None) -> EpochResult:
        result = self.inner.run_epoch(weights, validate)
        if self.tamper is not None:
            result = self.tamper(len(self.results), result)
        self.results.append(result)
        return result


def participant(index: int) -> TorchParticipant:
    return TorchParticipant(RecordingTrainer(index))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def kit_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return provision_study("localhost", list(SITES), tmp_path_factory.mktemp("study") / "kits", study="loopback")


@pytest.fixture(scope="module")
def kits(kit_paths: dict[str, Path]) -> dict[str, Kit]:
    return {name: load_kit(path) for name, path in kit_paths.items() if name != "ca"}


def expired_kit(kit_paths: dict[str, Path], site: str, folder: Path) -> Kit:
    """``site``'s kit with a certificate from the right CA that expired nine days ago."""
    ca_key, ca_cert = load_ca(kit_paths["ca"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    key, cert = issue_site_certificate(ca_key, ca_cert, site, days=1, not_before=past)
    key_path, cert_path = folder / "expired.key", folder / "expired.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return dataclasses.replace(load_kit(kit_paths[site]), cert=cert_path, key=key_path)  # bypasses load_kit's date check


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Kit]:
    paths = provision_study("localhost", ["nci"], tmp_path_factory.mktemp("other") / "kits", study="other")
    return {name: load_kit(path) for name, path in paths.items() if name != "ca"}


def server_task(
    kits: dict[str, Kit], run_dir: Path, port: int, *, sites=SITES, rounds: int = 2, min_sites: int = 2, settings=None,
    local_epochs: int = 1,
):
    config = RoundsConfig(sites=tuple(sites), rounds=rounds, min_sites=min_sites)
    run = RunDir.create(run_dir, {"sites": list(sites), "rounds": rounds, "aggregator": "dice-weighted"})
    return asyncio.create_task(
        run_server(
            kits["server"],
            run,
            config,
            make_aggregator("dice-weighted"),
            initial_weights(),
            host="127.0.0.1",
            port=port,
            round_timeout_s=30.0,
            grace_s=10.0,
            settings=settings,
            local_epochs=local_epochs,
        )
    )


def client_task(
    kit: Kit, trainer: RecordingTrainer, port: int, audit: Path | None = None, retries: int = 20, end: SiteEnd | None = None
):
    url = f"wss://localhost:{port}"
    participant = TorchParticipant(trainer, end)  # type: ignore[arg-type]
    client = run_client(kit, participant, server_url=url, audit_log=audit, retries=retries, retry_delay_s=0.1)
    return asyncio.create_task(client)


class SiteEnd:
    """A site's end-of-study hooks: keeps the models it receives, 'evaluates' with a fixed per-case Dice."""

    def __init__(self, index: int) -> None:
        self.models: dict[str, tuple[int | None, dict[str, np.ndarray], float | None]] = {}
        self.case_dice = {f"patient-{index}-{i}": 0.5 + 0.1 * i for i in range(3)}
        self.evaluated: list[dict[str, np.ndarray]] = []

    def on_model(self, name: str, round_: int | None, weights: dict[str, np.ndarray], dice: float | None) -> None:
        self.models[name] = (round_, weights, dice)

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        self.evaluated.append(weights)
        return dict(self.case_dice)


async def run_study(
    kits, tmp_path: Path, trainers: dict[str, RecordingTrainer], rounds: int, ends: dict[str, SiteEnd] | None = None,
    local_epochs: int = 1,
):
    """Server plus one client per site; returns (server weights, {site: client weights})."""
    port = free_port()
    server = server_task(kits, tmp_path / "run", port, rounds=rounds, local_epochs=local_epochs)
    audit = {site: tmp_path / f"{site}.audit.jsonl" for site in trainers}
    clients = {site: client_task(kits[site], t, port, audit[site], end=(ends or {}).get(site)) for site, t in trainers.items()}
    async with asyncio.timeout(STUDY_TIMEOUT_S):
        final = await server
        received = {site: await task for site, task in clients.items()}
    return final, received


def expected_mean(updates: dict[str, EpochResult]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Dice-weighted mean of the sites' weights, the paper's rule, recomputed by hand in float64."""
    total = sum(r.val_dice for r in updates.values())
    assert total > 0
    weights = {site: r.val_dice / total for site, r in updates.items()}
    names = next(iter(updates.values())).weights.keys()
    mean = {n: sum(weights[s] * updates[s].weights[n].double().numpy() for s in updates) for n in names}
    return weights, mean


def assert_round_matches(run_dir: Path, number: int, updates: dict[str, EpochResult]) -> None:
    folder = run_dir / "rounds" / f"{number:04d}"
    record = json.loads((folder / "round.json").read_text())
    weights, mean = expected_mean(updates)
    assert record["site_weights"] == pytest.approx(weights)
    saved = load_file(str(folder / "global.safetensors"))
    assert saved.keys() == mean.keys()
    for name, array in saved.items():
        assert np.allclose(array, mean[name], rtol=1e-6, atol=1e-7), name


# ----------------------------------------------------------------- a study


def test_three_sites_complete_rounds_and_global_is_dice_weighted_mean(kits, tmp_path):
    """Two rounds, three sites: every committed global model is the Dice-weighted mean of what the sites sent."""
    trainers = {site: RecordingTrainer(i) for i, site in enumerate(SITES)}
    ends = {site: SiteEnd(i) for i, site in enumerate(SITES)}
    final, received = asyncio.run(run_study(kits, tmp_path, trainers, rounds=2, ends=ends))

    run_dir = tmp_path / "run"
    assert RunDir.open(run_dir).read_state().completed_rounds == 2
    for number in range(2):
        assert_round_matches(run_dir, number, {site: t.results[number] for site, t in trainers.items()})
    last = load_file(str(run_dir / "rounds" / "0001" / "global.safetensors"))
    for site_weights in (final, *received.values()):
        assert site_weights.keys() == last.keys()
        assert all(np.array_equal(site_weights[n], last[n]) for n in last)

    names = sorted(initial_weights())
    for site, trainer in trainers.items():
        lines = [json.loads(line) for line in (tmp_path / f"{site}.audit.jsonl").read_text().splitlines()]
        assert [(line["message"], line["round"]) for line in lines] == [("HELLO", None), ("UPDATE", 0), ("UPDATE", 1), ("RESULT", 1)]
        lines = lines[1:]
        # the result left the site under pseudonyms, and the audit log says exactly that
        assert lines[-1]["tensors"] == [] and lines[-1]["scalars"]["case_dice"] == {
            "case-001": 0.5, "case-002": pytest.approx(0.6), "case-003": pytest.approx(0.7)
        }
        for line, result in zip(lines[:2], trainer.results, strict=True):
            assert line["tensors"] == names
            assert line["scalars"] == {
                "num_samples": result.num_samples,
                "val_dice": pytest.approx(result.val_dice),
                "train_loss": pytest.approx(result.train_loss),
            }
            assert line["bytes_sent"] > sum(t.numel() * t.element_size() for t in result.weights.values())

    # end of the study: every site got the final and the best model and evaluated the final one
    state = RunDir.open(run_dir).read_state()
    assert state.finished and state.best_round in (0, 1)
    best = load_file(str(run_dir / "rounds" / f"{state.best_round:04d}" / "global.safetensors"))
    for site, end in ends.items():
        assert end.models["final"][0] == 1 and all(np.array_equal(end.models["final"][1][n], last[n]) for n in last)
        assert end.models["best"][0] == state.best_round
        assert end.models["best"][2] == pytest.approx(state.best_dice)
        assert all(np.array_equal(end.models["best"][1][n], best[n]) for n in best)
        assert len(end.evaluated) == 1 and all(np.array_equal(end.evaluated[0][n], last[n]) for n in last)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["left_out"] == {} and sorted(evaluation["sites"]) == sorted(SITES)
    assert evaluation["sites"]["nci"]["mean_dice"] == pytest.approx(0.6) and evaluation["sites"]["nci"]["n"] == 3
    assert load_file(str(run_dir / "final.safetensors")).keys() == last.keys()


def test_update_with_nan_is_left_out_and_the_others_complete_the_round(kits, tmp_path, caplog):
    """ucla's training diverges (a NaN) in round 0: it says so, the round aggregates nci and suny only."""

    def poison_first_round(epoch: int, result: EpochResult) -> EpochResult:
        if epoch > 0:
            return result
        weights = dict(result.weights)
        name = next(iter(weights))
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = math.nan
        return dataclasses.replace(result, weights=weights)

    trainers = {site: RecordingTrainer(i, poison_first_round if site == "ucla" else None) for i, site in enumerate(SITES)}
    with caplog.at_level(logging.INFO, logger="fedseg"):
        asyncio.run(run_study(kits, tmp_path, trainers, rounds=2))

    run_dir = tmp_path / "run"
    rounds = RunDir.open(run_dir).round_records()
    assert set(rounds[0].left_out) == {"ucla"}
    # the site found it before sending (nothing non-finite left it), told the server and carried on
    told = [r.getMessage() for r in caplog.records if r.name == "fedseg.client" and "training failed" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("round 0:") and "non-finite" in told[0]
    assert "training failed at the site" in rounds[0].left_out["ucla"] and rounds[0].refused == {}
    assert set(rounds[0].site_weights) == {"nci", "suny"}
    assert_round_matches(run_dir, 0, {site: trainers[site].results[0] for site in ("nci", "suny")})
    assert set(rounds[1].site_weights) == set(SITES)  # asked again next round, and accepted
    audit = [json.loads(line)["message"] for line in (tmp_path / "ucla.audit.jsonl").read_text().splitlines()]
    assert audit[:3] == ["HELLO", "ERROR", "UPDATE"]


class FlakyTrainer(RecordingTrainer):
    """Fails once, at the start of round 0, with ``error`` (before any training)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.error: BaseException | None = error

    def run_epoch(self, weights: dict[str, torch.Tensor] | None = None, validate: bool | None = None) -> EpochResult:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return super().run_epoch(weights, validate)


def test_site_dropping_out_is_left_out_while_quorum_holds(kits, tmp_path):
    """ucla's client dies in round 0: the round completes with nci and suny (min_sites 2), so does round 1."""
    trainers = {site: RecordingTrainer(i) for i, site in enumerate(SITES[:2])}
    dying = FlakyTrainer(2, RuntimeError("disk failure at the site"))

    async def scenario() -> None:
        port = free_port()
        server = server_task(kits, tmp_path / "run", port, rounds=2)
        clients = [client_task(kits[site], t, port) for site, t in trainers.items()]
        ucla = client_task(kits["ucla"], dying, port)  # type: ignore[arg-type]
        async with asyncio.timeout(STUDY_TIMEOUT_S):
            with pytest.raises(RuntimeError, match="disk failure"):
                await ucla
            await server
            await asyncio.gather(*clients)

    asyncio.run(scenario())
    rounds = RunDir.open(tmp_path / "run").round_records()
    assert [set(r.site_weights) for r in rounds] == [{"nci", "suny"}, {"nci", "suny"}]
    assert "ucla" in rounds[0].left_out


def test_quorum_lost_stops_the_study_with_a_clear_error_on_both_sides(kits, tmp_path):
    """min_sites 3 and ucla dies: the server raises naming ucla; the other sites exit with the server's error."""
    trainers = {site: RecordingTrainer(i) for i, site in enumerate(SITES[:2])}

    async def scenario() -> None:
        port = free_port()
        server = server_task(kits, tmp_path / "run", port, rounds=2, min_sites=3)
        clients = [client_task(kits[site], t, port) for site, t in trainers.items()]
        ucla = client_task(kits["ucla"], FlakyTrainer(2, RuntimeError("disk failure")), port)
        async with asyncio.timeout(STUDY_TIMEOUT_S):
            with pytest.raises(FedsegError, match=r"round 0: 2 update\(s\) accepted, min_sites is 3 \(ucla: connection lost"):
                await server
            for client in clients:
                # the sites learn why, in counts, without the other sites' names
                with pytest.raises(FedsegError, match=r"server ended the session: round 0: 2 update\(s\) accepted, "
                                   r"min_sites is 3; the study stopped \(STUDY_FAILED 4409\)"):
                    await client
            with pytest.raises(RuntimeError):
                await ucla

    asyncio.run(scenario())
    assert RunDir.open(tmp_path / "run").read_state().completed_rounds == 0


def test_site_that_loses_its_connection_reconnects_and_continues(kits, tmp_path):
    """ucla's connection drops in round 0: left out of it, it reconnects and takes part in round 1."""

    def slow_first_round(epoch: int, result: EpochResult) -> EpochResult:
        if epoch == 0:
            time.sleep(1.0)  # leaves ucla ample time to reconnect before round 1 starts
        return result

    trainers = {site: RecordingTrainer(i, slow_first_round) for i, site in enumerate(SITES[:2])}
    trainers["ucla"] = FlakyTrainer(2, ConnectionResetError("link down"))
    final, received = asyncio.run(run_study(kits, tmp_path, trainers, rounds=2))

    rounds = RunDir.open(tmp_path / "run").round_records()
    assert set(rounds[0].site_weights) == {"nci", "suny"}
    assert "connection lost" in rounds[0].left_out["ucla"]
    assert set(rounds[1].site_weights) == set(SITES)
    assert all(np.array_equal(received["ucla"][n], final[n]) for n in final)
    lines = [json.loads(line) for line in (tmp_path / "ucla.audit.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines if line["message"] == "UPDATE"] == [1]


# ----------------------------------------------------------------- refusals


async def hello_with_versions(kit: Kit, port: int, versions: list[int]) -> tuple[Message, int | None]:
    """Speak raw frames: a HELLO offering ``versions``; returns the server's answer and close code."""
    async with connect(f"wss://localhost:{port}", ssl=client_context(kit)) as ws:
        hello = Message(MessageType.HELLO, site=kit.name, body={"versions": versions})
        await ws.send(encode(hello))
        answer = Reassembler().feed(await ws.recv())
        await ws.wait_closed()
        return answer, ws.close_code


def test_refusals_are_clear_and_the_server_keeps_running(kits, kit_paths, other_kits, tmp_path, caplog):
    """Another study's CA, an expired certificate, a site outside the study and a protocol mismatch are each refused."""
    expired = expired_kit(kit_paths, "nci", tmp_path)

    async def scenario() -> None:
        port = free_port()
        server = server_task(kits, tmp_path / "run", port, sites=("nci", "suny"), rounds=1, min_sites=2)
        url = f"wss://localhost:{port}"
        await asyncio.sleep(0.3)

        with pytest.raises(FedsegError, match="TLS handshake .* failed"):
            await run_client(other_kits["nci"], participant(0), server_url=url, retries=0)

        # the site is told before it even connects…
        with pytest.raises(FedsegError, match=r"certificate .*expired\.pem expired on"):
            await run_client(expired, participant(0), server_url=url, retries=3)
        # …and a client that connects anyway is refused in the handshake, the server saying why
        with pytest.raises((InvalidHandshake, ConnectionClosed, OSError)):
            async with connect(url, ssl=client_context(expired), open_timeout=5) as ws:
                await ws.recv()

        with pytest.raises(FedsegError, match="'ucla' is not a site of this study"):
            await run_client(kits["ucla"], participant(2), server_url=url, retries=0)

        answer, close_code = await hello_with_versions(kits["nci"], port, [2])
        assert answer is not None and answer.type is MessageType.REFUSE
        assert answer.body["code"] == ErrorCode.VERSION_MISMATCH == close_code
        assert "peer speaks protocol 2, this fedseg speaks 1" in answer.body["reason"]

        with pytest.raises(FedsegError, match="must start with wss://"):
            await run_client(kits["nci"], participant(0), server_url=f"ws://localhost:{port}")
        with pytest.raises((InvalidHandshake, ConnectionClosed, OSError)):  # plain ws:// against the TLS listener
            async with connect(f"ws://127.0.0.1:{port}", open_timeout=5) as ws:
                await ws.recv()

        assert not server.done()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server

    with caplog.at_level(logging.INFO, logger="fedseg.server"):
        asyncio.run(scenario())
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("not a site of this study" in text for text in refusals)
    assert any("refused a TLS connection: certificate has expired" in text for text in refusals)
    assert any("peer speaks protocol 2" in text for text in refusals)


def test_site_with_other_settings_refuses_to_train_and_says_which(kits, tmp_path, caplog):
    """A site whose study.toml or fold differs from the server's stops before training, naming the keys."""
    server_settings = {"fold": 0, "train": {"network": "unet-small", "patch_size": [16, 16, 8]}}
    site_settings = {"fold": 1, "train": {"network": "unet", "patch_size": [16, 16, 8]}}

    async def scenario() -> None:
        port = free_port()
        server = server_task(kits, tmp_path / "run", port, sites=("nci", "suny"), rounds=1, settings=server_settings)
        url = f"wss://localhost:{port}"
        trainer = RecordingTrainer(0)
        async with asyncio.timeout(STUDY_TIMEOUT_S):
            with pytest.raises(FedsegError, match=r"differ from the server's: fold: 1 here vs 0 on the server; "
                               r"train.network: 'unet' here vs 'unet-small' on the server"):
                await run_client(kits["nci"], TorchParticipant(trainer), server_url=url, settings=site_settings, retry_delay_s=0.1)  # type: ignore[arg-type]
            await asyncio.sleep(0.3)
        assert trainer.results == []  # nothing was trained, nothing was sent
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server

    with caplog.at_level(logging.INFO, logger="fedseg.server"):
        asyncio.run(scenario())
    assert any("site nci left: site reported an error: this site's study settings differ" in r.getMessage() for r in caplog.records)


def test_several_local_epochs_per_round_send_the_last_epochs_weights(kits, tmp_path):
    """local_epochs = 2: each site trains two epochs per round and its update is the second epoch's model."""
    trainers = {site: RecordingTrainer(i) for i, site in enumerate(SITES)}
    asyncio.run(run_study(kits, tmp_path, trainers, rounds=2, local_epochs=2))
    assert all(len(t.results) == 4 for t in trainers.values())
    for number in range(2):
        assert_round_matches(tmp_path / "run", number, {site: t.results[2 * number + 1] for site, t in trainers.items()})
