"""Benchmark: the federation under attack — one table of attacks tried, refused, crashes, hangs and poisoned models.

    python benchmarks/robustness.py                  # the whole suite (~2 min), writes docs/reliability.md
    python benchmarks/robustness.py --quick          # fewer mutated frames and floods, no federate kills (CI smoke)

Against the real server (``run_server``: websockets over mutual TLS on
127.0.0.1, a provisioned study with real kits) with three honest sites and
one dishonest but authenticated site, ``mallory``, all in this process. The
honest sites are numpy participants (each round moves the weights half-way to
its own target), so "poisoned" has an exact meaning: a round's global model
outside the element-wise range of the honest sites' updates. Sections:

* TLS matrix and identity: no certificate, another study's CA, expired,
  not yet valid, the server's certificate as a client, a revoked site, TLS
  1.2, plain ``ws://``, a site's certificate with a HELLO naming another site;
* poisoned updates and false claims from mallory, one per round (x1e6, x1000
  with Dice 1.0 and 2^63-1 samples, sign flip, float32 max, NaN, Inf, wrong
  shape, wrong dtype, missing tensor), and stale, replayed, duplicate and
  unasked updates;
* mutated frames: every frame type mutated (bit flips, truncation, appended
  bytes, header JSON edits) through the sans-I/O server session, and a sample
  through real connections;
* floods during a study: idle TCP connections, stalled ClientHellos,
  authenticated connections that never speak, a site that never reads;
* a full disk at a round commit, two servers on one run, a malicious server
  against a site, and (full mode) SIGTERM and SIGKILL of ``fedseg federate``.

Every study must still finish; "hangs" counts studies that did not finish in
time, "crashes" a server that raised anything but the study's own outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.client import connect

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import issue_site_certificate, load_ca
from fedseg.federation.deploy.lifecycle import revoke
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.deploy.spool import SPOOL, DiskStore
from fedseg.federation.protocol.chunks import to_frames
from fedseg.federation.protocol.constants import PROTOCOL_VERSION
from fedseg.federation.protocol.errors import ErrorCode
from fedseg.federation.protocol.frames import decode, encode
from fedseg.federation.protocol.participant import LocalUpdate
from fedseg.federation.protocol.rounds import RoundsConfig
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.session import ServerSession, SiteLimits, SiteSession
from fedseg.federation.strategies import make_aggregator
from fedseg.federation.transport.client import run_client
from fedseg.federation.transport.kit import load_kit
from fedseg.federation.transport.server import run_server
from fedseg.federation.transport.tls import client_context
from fedseg.io import FolderLock, write_text

HONEST = ("nci", "suny", "ucla")
SITES = (*HONEST, "mallory")
INITIAL = {"conv.weight": np.zeros((4, 8), np.float32), "conv.bias": np.zeros(4, np.float32), "steps": np.zeros((), np.int64)}
MiB = 1 << 20


@dataclass
class Row:
    attack: str
    tried: int = 0
    refused: int = 0
    crashes: int = 0
    hangs: int = 0
    poisoned: int = 0
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    completed_rounds_lost: int = 0
    orphans: int = 0
    peak_rss_mib: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.attack}: tried {row.tried}, refused {row.refused}, crashes {row.crashes}, hangs {row.hangs}, "
              f"poisoned {row.poisoned} {row.note}", flush=True)
        return row


# --------------------------------------------------------------------------- participants


class Honest:
    """Moves the weights half-way to its target every round; remembers what it sent."""

    def __init__(self, index: int) -> None:
        self.target = index + 1.0
        self.sent: dict[int, dict[str, np.ndarray]] = {}

    def train(self, weights, round, epochs):  # noqa: A002 - the Participant interface
        new = {n: np.asarray(a + 0.5 * (self.target - a) if a.dtype.kind == "f" else a + 1, a.dtype) for n, a in weights.items()}
        self.sent[round] = new
        return LocalUpdate(new, 10, 0.6 + 0.1 * self.target / 3, {"train_loss": 1.0})

    def keep_model(self, name, round, weights, val_dice):  # noqa: A002
        pass

    def evaluate(self, weights):
        return {"a": 0.5}


def attack_update(kind: str, weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, body) of one poisoned UPDATE built from the global ``weights``."""
    honest = {n: (a + 0.5 * (2.0 - a)).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in weights.items()}
    body = {"num_samples": 10, "val_dice": 0.7, "metrics": {}}
    floats = [n for n, a in weights.items() if a.dtype.kind == "f"]
    tensors = dict(honest)
    if kind == "x1e6":
        tensors = {n: (a * 1e6).astype(a.dtype) if n in floats else a for n, a in honest.items()}
    elif kind == "x1000, Dice 1.0, 2^63-1 samples":
        tensors = {n: (a * 1000).astype(a.dtype) if n in floats else a for n, a in honest.items()}
        body = {"num_samples": 2**63 - 1, "val_dice": 1.0, "metrics": {}}
    elif kind == "sign flip x10":
        tensors = {n: (-10 * a).astype(a.dtype) if n in floats else a for n, a in honest.items()}
    elif kind == "float32 max":
        tensors = {n: np.full_like(a, np.finfo(np.float32).max) if n in floats else a for n, a in honest.items()}
    elif kind == "NaN":
        tensors[floats[0]] = np.full_like(honest[floats[0]], np.nan)
    elif kind == "Inf":
        tensors[floats[0]] = np.full_like(honest[floats[0]], np.inf)
    elif kind == "wrong shape":
        tensors[floats[0]] = np.zeros(3, np.float32)
    elif kind == "wrong dtype":
        tensors[floats[0]] = honest[floats[0]].astype(np.float64)
    elif kind == "missing tensor":
        tensors.pop(floats[0])
    elif kind == "huge integer buffer":
        tensors["steps"] = np.asarray(2**62, np.int64)
    elif kind == "honest weights, 2^63-1 samples":
        body = {"num_samples": 2**63 - 1, "val_dice": 0.7, "metrics": {}}
    elif kind == "honest weights, Dice 1.0":
        body = {"num_samples": 10, "val_dice": 1.0, "metrics": {}}
    return tensors, body


UPDATE_ATTACKS = [
    "x1e6", "x1000, Dice 1.0, 2^63-1 samples", "sign flip x10", "float32 max", "NaN", "Inf", "wrong shape",
    "wrong dtype", "missing tensor", "huge integer buffer", "honest weights, 2^63-1 samples",
    "honest weights, Dice 1.0",
]
PROTOCOL_ATTACKS = ["stale (a later round)", "replay of the previous round", "duplicate", "unasked (before TRAIN)"]


# --------------------------------------------------------------------------- mallory: a raw, authenticated site


class Mallory:
    """An authenticated site that speaks the protocol by hand and sends one attack per round."""

    def __init__(self, kit_dir: Path, url: str, attacks: list[str]) -> None:
        self.kit = load_kit(kit_dir)
        self.url = url
        self.attacks = attacks
        self.told: dict[str, int] = {}  # attack -> REJECTED_UPDATE answers received
        self.sent: dict[str, int] = {}
        self.round_of: dict[int, str] = {}  # round -> the attack mallory sent in it

    async def run(self) -> None:
        async with connect(self.url, ssl=client_context(self.kit), max_size=64 * MiB, compression=None) as ws:
            await ws.send(encode(Message(MessageType.HELLO, site="mallory", body={"versions": [PROTOCOL_VERSION]})))
            previous: dict[str, np.ndarray] | None = None
            queue = list(self.attacks)
            async for frame in self._messages(ws):
                if frame.type is MessageType.TRAIN:
                    kind = queue.pop(0) if queue else "x1e6"
                    self.round_of[frame.round] = kind
                    await self._attack(ws, kind, frame.round, dict(frame.tensors), previous)
                    previous = dict(frame.tensors)
                elif frame.type is MessageType.ERROR and frame.body["code"] == ErrorCode.REJECTED_UPDATE:
                    kind = self.round_of.get(frame.round, "?") if frame.round is not None else "?"
                    if "round" in frame.body["reason"] or "second update" in frame.body["reason"] or "not asked" in frame.body["reason"]:
                        kind = next((k for k in PROTOCOL_ATTACKS if k in self.sent and self.told.get(k, 0) < self.sent[k]), kind)
                    self.told[kind] = self.told.get(kind, 0) + 1
                elif frame.type in (MessageType.DONE, MessageType.ERROR):
                    return

    async def _messages(self, ws):
        from fedseg.federation.protocol.chunks import Reassembler

        reassembler = Reassembler(64 * MiB)
        async for data in ws:
            message = reassembler.feed(data)
            if message is not None:
                yield message

    async def _send(self, ws, kind: str, round_: int, tensors, body) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1
        for frame in to_frames(Message(MessageType.UPDATE, round=round_, site="mallory", body=body, tensors=tensors)):
            await ws.send(frame)

    async def _attack(self, ws, kind: str, round_: int, weights, previous) -> None:
        if kind in UPDATE_ATTACKS:
            tensors, body = attack_update(kind, weights)
            await self._send(ws, kind, round_, tensors, body)
            return
        honest, body = attack_update("honest", weights)
        if kind == "stale (a later round)":
            await self._send(ws, kind, round_ + 5, honest, body)
        elif kind == "replay of the previous round":
            await self._send(ws, kind, round_ - 1, attack_update("honest", previous or weights)[0], body)
        elif kind == "unasked (before TRAIN)":
            await self._send(ws, kind, round_ + 1, honest, body)
        await self._send(ws, "honest", round_, honest, body)  # then an honest one for the open round
        if kind == "duplicate":
            await self._send(ws, kind, round_, attack_update("x1e6", weights)[0], body)


# --------------------------------------------------------------------------- the study


def poisoned_rounds(run: Path, honest: dict[str, Honest]) -> int:
    """Rounds whose global tensors (integer buffers too) left the element-wise range of the honest sites' updates."""
    from safetensors.numpy import load_file

    bad = 0
    for record in RunDir.open(run).round_records():
        weights = load_file(str(run / "rounds" / f"{record.round:04d}" / "global.safetensors"))
        sent = [p.sent[record.round] for p in honest.values() if record.round in p.sent]
        for name, array in weights.items():
            if not sent:
                continue
            slack = 1e-6 if array.dtype.kind == "f" else 0  # integer buffers: exactly within the honest values
            lo = np.minimum.reduce([s[name] for s in sent]) - slack
            hi = np.maximum.reduce([s[name] for s in sent]) + slack
            if not (np.isfinite(array).all() and (array >= lo).all() and (array <= hi).all()):
                bad += 1
                break
    return bad


def _final_weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    last = RunDir.open(run).read_state().completed_rounds - 1
    return load_file(str(run / "rounds" / f"{last:04d}" / "global.safetensors"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def study(
    kits: dict[str, Path], work: Path, rounds: int, *, attacks: list[str] | None = None,
    side: Callable[[int], Any] | None = None, timeout_s: float = 120.0, round_timeout_s: float = 10.0,
    honest: dict[str, Any] | None = None, initial: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One study on the real server; ``side(port)`` runs alongside (connection attacks, floods).

    Without ``attacks`` (None) mallory is not part of the study at all (a clean run).
    """
    port = free_port()
    run = work / f"run-{port}"
    sites = SITES if attacks is not None or side is not None else HONEST
    store = RunDir.create(run, {"sites": list(sites), "rounds": rounds})
    declared = load_kit(kits["server"]).declared_cases
    server = asyncio.create_task(run_server(
        load_kit(kits["server"]), store, RoundsConfig(sites, rounds, 3, declared_samples=declared),
        make_aggregator("dice-weighted", store=DiskStore(run / SPOOL)), initial if initial is not None else INITIAL,
        host="127.0.0.1", port=port, round_timeout_s=round_timeout_s, grace_s=1.0,
    ))
    await asyncio.sleep(0.3)
    url = f"wss://localhost:{port}"
    honest = honest if honest is not None else {site: Honest(i) for i, site in enumerate(HONEST)}
    tasks = [asyncio.create_task(run_client(load_kit(kits[s]), p, server_url=url, retries=20, retry_delay_s=0.2,
                                            limits=SiteLimits(1, rounds)))
             for s, p in honest.items()]
    mallory = Mallory(kits["mallory"], url, attacks or []) if attacks is not None else None
    if mallory is not None:
        tasks.append(asyncio.create_task(mallory.run()))
    extra = asyncio.create_task(side(port)) if side is not None else None
    outcome: dict[str, Any] = {"crash": 0, "hang": 0}
    try:
        async with asyncio.timeout(timeout_s):
            await server
    except TimeoutError:
        outcome["hang"] = 1
    except FedsegError as exc:
        outcome["failed"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a crash is what this counts
        outcome["crash"] = 1
        outcome["error"] = repr(exc)
    for task in [*tasks, *([extra] if extra else [])]:
        task.cancel()
    await asyncio.gather(*tasks, *([extra] if extra else []), return_exceptions=True)
    server.cancel()
    state = RunDir.open(run).read_state()
    final = RunDir.open(run).round_records()
    outcome.update(run=run, honest=honest, mallory=mallory, completed=state.completed_rounds, finished=state.finished,
                   final_weights=_final_weights(run) if final else None,
                   extra=extra.result() if extra is not None and extra.done() and not extra.cancelled() and extra.exception() is None else None)
    return outcome


# --------------------------------------------------------------------------- sections


def tls_contexts(kits: dict[str, Path], other: dict[str, Path], work: Path) -> dict[str, ssl.SSLContext | None]:
    """Client contexts that must each be refused (None: plain ws://)."""
    nci = load_kit(kits["nci"])
    base = lambda: client_context(nci)  # noqa: E731
    contexts: dict[str, ssl.SSLContext | None] = {}
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=str(nci.ca))
    contexts["no client certificate"] = bare
    contexts["another study's CA"] = client_context(load_kit(other["nci"]))
    ca_key, ca_cert = load_ca(kits["ca"])
    now = dt.datetime.now(dt.UTC)
    for label, start in (("expired certificate", now - dt.timedelta(days=10)), ("not yet valid", now + dt.timedelta(days=10))):
        key, cert = issue_site_certificate(ca_key, ca_cert, "nci", days=2, not_before=start)
        from cryptography.hazmat.primitives import serialization

        folder = work / label.replace(" ", "-")
        folder.mkdir()
        (folder / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(folder / "c.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(nci.ca))
        context.load_cert_chain(str(folder / "c.pem"), str(folder / "c.key"))
        contexts[label] = context
    server = load_kit(kits["server"])
    as_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    as_client.load_verify_locations(cafile=str(server.ca))
    as_client.load_cert_chain(str(server.cert), str(server.key))
    contexts["the server's certificate as a client"] = as_client
    contexts["a revoked site certificate"] = client_context(load_kit(kits["revoked"]))
    tls12 = base()
    tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    contexts["TLS 1.2"] = tls12
    contexts["plain ws:// (no TLS)"] = None
    return contexts


async def refused_connection(port: int, context: ssl.SSLContext | None, hello_site: str = "nci") -> bool:
    """Whether the server refuses this peer (no WELCOME ever arrives)."""
    url = f"wss://localhost:{port}" if context is not None else f"ws://localhost:{port}"
    try:
        async with asyncio.timeout(15):
            async with connect(url, ssl=context, max_size=MiB, compression=None) as ws:
                await ws.send(encode(Message(MessageType.HELLO, site=hello_site, body={"versions": [PROTOCOL_VERSION]})))
                reply = decode(await ws.recv(), max_size=MiB)
                return reply.type is not MessageType.WELCOME
    except (OSError, ssl.SSLError, websockets.exceptions.WebSocketException, TimeoutError, FedsegError):
        return True


async def tls_section(kits, other, work, report: Report) -> None:
    contexts = tls_contexts(kits, other, work)

    async def attempts(port: int) -> dict[str, bool]:
        await asyncio.sleep(0.5)
        results = {label: await refused_connection(port, context) for label, context in contexts.items()}
        results["identity spoofing (nci's certificate, HELLO as suny)"] = await refused_connection(
            port, client_context(load_kit(kits["nci"])), hello_site="suny")
        return results

    outcome = await study(kits, work, 3, attacks=["x1e6"] * 3, side=attempts)
    results = outcome["extra"] or {}
    for label, refused in results.items():
        report.add(Row(f"TLS/identity: {label}", 1, int(refused), outcome["crash"], outcome["hang"]))


async def update_section(kits, work, report: Report) -> None:
    attacks = UPDATE_ATTACKS + PROTOCOL_ATTACKS
    outcome = await study(kits, work, len(attacks) + 1, attacks=attacks)
    mallory: Mallory = outcome["mallory"]
    poisoned = poisoned_rounds(outcome["run"], outcome["honest"])
    for kind in attacks:
        tried = mallory.sent.get(kind, 0)
        refused = min(mallory.told.get(kind, 0), tried)
        note = {
            "huge integer buffer": "accepted: the element-wise median keeps an honest value",
            "honest weights, Dice 1.0": "accepted: its share is capped at 1/2 and the best round is picked by the median Dice",
        }.get(kind, "")
        report.add(Row(f"update: {kind}", tried, refused, outcome["crash"], outcome["hang"],
                       poisoned if kind == attacks[0] else 0, note))
    if not outcome["finished"]:
        report.rows[-1].note = f"study did not finish: {outcome.get('failed') or outcome.get('error')}"


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    choice = rng.randrange(5)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        data = data[: rng.randrange(len(data))]
    elif choice == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif choice == 3:
        text = bytes(data).replace(b'"round": 0', b'"round": -1').replace(b'"val_dice"', b'"val_dicee"')
        data = bytearray(text.replace(b'"F32"', b'"F64"').replace(b'"shape":[4,8]', b'"shape":[8,8]'))
        if rng.random() < 0.5:
            data[rng.randrange(len(data))] = rng.randrange(256)
    else:
        start = rng.randrange(len(data))
        data[start:start + 4] = (rng.getrandbits(32)).to_bytes(4, "little")
    return bytes(data)


def valid_frames() -> list[bytes]:
    tensors = {n: np.ones(a.shape, a.dtype) for n, a in INITIAL.items()}
    messages = [
        Message(MessageType.UPDATE, round=0, site="nci", body={"num_samples": 5, "val_dice": 0.5, "metrics": {"l": 1.0}}, tensors=tensors),
        Message(MessageType.RESULT, round=0, site="nci", body={"model": "final", "case_dice": {"case-001": 0.5}}),
        Message(MessageType.ERROR, round=0, body={"code": 4424, "reason": "NaN"}),
        Message(MessageType.HEARTBEAT, body={"seq": 3}),
    ]
    frames = [encode(m) for m in messages]
    frames += to_frames(messages[0], max_frame=700)  # CHUNK frames
    return frames


def mutation_section(count: int, report: Report) -> None:
    rng = random.Random(0)
    frames = valid_frames()
    hello = encode(Message(MessageType.HELLO, site="nci", body={"versions": [PROTOCOL_VERSION]}))
    crashes = refused = 0
    for i in range(count):
        session = ServerSession(rounds=3, max_message=MiB)
        session.peer_identified("nci")
        try:
            if i % 10 == 0:
                events = session.receive(mutate(hello, rng))
            else:
                session.receive(hello)
                session.data_to_send()
                events = session.receive(mutate(rng.choice(frames), rng))
        except Exception:  # noqa: BLE001 - anything but a refusal is a crash
            crashes += 1
            continue
        names = {type(e).__name__ for e in events}
        refused += int(bool(names & {"Refused", "SiteLeft"}) or session.close_code is not None)
    report.add(Row("mutated frames (sans-I/O server session)", count, refused, crashes, 0,
                   note="the rest decoded as valid messages or incomplete chunks"))


async def mutation_wire_section(kits, work, count: int, report: Report) -> None:
    rng = random.Random(1)
    frames = valid_frames()

    async def send_mutated(port: int) -> tuple[int, int]:
        await asyncio.sleep(0.5)
        refused = 0
        for _ in range(count):
            try:
                async with asyncio.timeout(10):
                    async with connect(f"wss://localhost:{port}", ssl=client_context(load_kit(kits["nci"])), max_size=MiB) as ws:
                        await ws.send(mutate(rng.choice(frames), rng))
                        await ws.recv()
                        await ws.recv()
            except (websockets.exceptions.WebSocketException, OSError, TimeoutError):
                refused += 1
        return count, refused

    outcome = await study(kits, work, 3, attacks=["x1e6"] * 3, side=send_mutated, timeout_s=240)
    tried, refused = outcome["extra"] or (count, 0)
    report.add(Row("mutated frames as a site's first message (real server)", tried, refused, outcome["crash"], outcome["hang"]))


async def flood_section(kits, work, quick: bool, report: Report) -> None:
    idle, stalled, silent = (100, 20, 10) if quick else (1000, 200, 50)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))

    async def flood(port: int) -> dict[str, int]:
        await asyncio.sleep(0.5)
        opened: list[Any] = []
        for _ in range(idle):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append(writer)
        for _ in range(stalled):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the first bytes of a ClientHello, then nothing
            opened.append(writer)
        quiet = []
        for _ in range(silent):
            try:
                quiet.append(await connect(f"wss://localhost:{port}", ssl=client_context(load_kit(kits["suny"])), open_timeout=15))
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError):
                pass
        await asyncio.sleep(5)
        for writer in opened:
            writer.close()
        for ws in quiet:
            await ws.close()
        return {"idle": idle, "stalled": stalled, "silent": silent}

    outcome = await study(kits, work, 4, attacks=["x1e6"] * 4, side=flood, timeout_s=180)
    ok = int(outcome["finished"])
    report.add(Row(f"flood: {idle} idle TCP + {stalled} stalled ClientHellos + {silent} silent authenticated", 1, ok,
                   outcome["crash"], outcome["hang"], poisoned_rounds(outcome["run"], outcome["honest"]),
                   note="refused = the study finished regardless"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def slow_reader_section(kits, work, report: Report) -> None:
    async def never_reads(port: int) -> float:
        kit = load_kit(kits["mallory"])
        async with connect(f"wss://localhost:{port}", ssl=client_context(kit), max_size=MiB) as ws:
            await ws.send(encode(Message(MessageType.HELLO, site="mallory", body={"versions": [PROTOCOL_VERSION]})))
            await asyncio.sleep(300)  # reads nothing: TRAIN piles up in its buffers
        return 0.0

    start = time.perf_counter()
    outcome = await study(kits, work, 3, side=never_reads, round_timeout_s=3.0)
    seconds = time.perf_counter() - start
    report.add(Row("a site that never reads (rounds of 3 s deadline)", 1, int(outcome["finished"]), outcome["crash"],
                   outcome["hang"], note=f"3 rounds in {seconds:.1f} s"))


async def full_disk_section(report: Report, work: Path) -> None:
    from fedseg.federation.transport.memory import MemoryServer
    from fedseg.federation.transport.server import serve_study

    class FullDisk(RunDir):
        def save_round(self, completed, server_optimizer=None):
            raise OSError(28, "No space left on device")

    transport = MemoryServer()
    store = FullDisk.create(work / "full-disk", {"sites": list(HONEST), "rounds": 2})
    server = asyncio.create_task(serve_study(transport, store, RoundsConfig(HONEST, 2, 3), make_aggregator("uniform"),
                                             INITIAL, round_timeout_s=10, grace_s=1))
    from fedseg.federation.transport.client import join_study

    clients = [asyncio.create_task(join_study(transport.client(s), Honest(i), s)) for i, s in enumerate(HONEST)]
    hang = crash = stopped = 0
    try:
        async with asyncio.timeout(30):
            await server
    except TimeoutError:
        hang = 1
    except FedsegError as exc:
        stopped = int("No space left" in str(exc))
    except Exception:  # noqa: BLE001
        crash = 1
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    report.add(Row("disk full at a round commit", 1, stopped, crash, hang, note="refused = stopped with the error"))


def two_servers_section(work: Path, report: Report) -> None:
    with FolderLock(work / "shared-run", "fedseg server"):
        try:
            FolderLock(work / "shared-run", "fedseg server").acquire()
            refused = 0
        except FedsegError:
            refused = 1
    report.add(Row("two servers on one run directory", 1, refused))


def malicious_server_section(report: Report) -> None:
    weights = {n: np.ones(a.shape, a.dtype) for n, a in INITIAL.items()}
    attacks = {
        "TRAIN with 2^62 local epochs": Message(MessageType.TRAIN, round=0, body={"epochs": 2**62}, tensors=weights),
        "TRAIN beyond the study's rounds": Message(MessageType.TRAIN, round=99, body={"epochs": 1}, tensors=weights),
    }
    refused = 0
    for message in attacks.values():
        session = SiteSession("nci", limits=SiteLimits(1, 5))
        session.connect()
        session.receive(encode(Message(MessageType.WELCOME, site="nci", body={"version": PROTOCOL_VERSION, "rounds": 5})))
        events = session.receive(encode(message))
        refused += int(any(type(e).__name__ == "ServerError" for e in events))
    session = SiteSession("nci")
    session.connect()
    session.receive(encode(Message(MessageType.WELCOME, site="nci", body={"version": PROTOCOL_VERSION})))
    session.receive(encode(Message(MessageType.EVALUATE, round=5, body={"model": "final"}, tensors=weights)))
    session.send_result(5, "final", {"p": 0.5})
    other = {n: np.asarray(a * 2, a.dtype) for n, a in weights.items()}
    events = session.receive(encode(Message(MessageType.EVALUATE, round=5, body={"model": "final"}, tensors=other)))
    refused += int(any(type(e).__name__ == "ServerError" for e in events))
    report.add(Row("malicious server: unbounded epochs, extra rounds, a Dice oracle", 3, refused))


def federate_kill_section(work: Path, report: Report) -> None:
    """SIGTERM and SIGKILL of `fedseg federate` mid-study: no process left, and --resume loses no completed round."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_SITES, write_tiny_study  # the test suite's tiny sites and study

    root = write_tiny_study(work / "sites", "rounds = 30\nround_timeout_s = 60.0\ngrace_s = 5.0")
    sites, toml = [root / name for name in TINY_SITES], root / "study.toml"
    for how in (signal.SIGTERM, signal.SIGKILL):
        out = work / f"federate-{how.name}"
        argv = [sys.executable, "-m", "fedseg", "federate", *map(str, sites), "--out", str(out), "--config", str(toml),
                "--cache", str(work / "cache"), "--threads", "1"]
        first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = out / "fold0" / "state.json"
        deadline = time.monotonic() + 300
        while not (state.is_file() and json.loads(state.read_text())["completed_rounds"] >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(first.pid, how)
        first.wait(60)
        time.sleep(3)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(out))]
        report.orphans += len(left)
        before = json.loads(state.read_text())["completed_rounds"]
        resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=900)
        after = RunDir.open(out / "fold0")
        lost = 0 if resumed.returncode == 0 and after.finished and len(after.round_records()) == 30 else 1
        report.completed_rounds_lost += lost
        report.add(Row(f"{how.name} of fedseg federate mid-study", 1, int(not left), 0, 0,
                       note=f"{before} rounds committed before; resumed to 30: {'yes' if not lost else 'NO'}; "
                            f"processes left: {len(left)}"))


async def network_dice_section(kits, work, report: Report) -> None:
    """The tiny segmentation network on synthetic cubes: the final Dice with mallory's x1000 updates vs without mallory."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import cube_case

    from fedseg.models import build_model
    from fedseg.site import TorchParticipant
    from fedseg.training.augment import AugmentConfig
    from fedseg.training.config import TrainConfig
    from fedseg.training.engine import LocalTrainer

    torch.set_num_threads(1)
    config = TrainConfig(patch_size=(16, 16, 8), batch_size=2, samples_per_volume=2, sw_batch_size=2,
                         learning_rate=1e-2, threads=1, augment=AugmentConfig.off())
    initial = {k: v.numpy().copy() for k, v in build_model(config.network, seed=0).state_dict().items()}

    def trainer(i: int) -> LocalTrainer:
        return LocalTrainer(build_model(config.network, seed=i), [cube_case(i), cube_case(20 + i)], [cube_case(10 + i)], config)

    def participants() -> dict[str, TorchParticipant]:
        return {site: TorchParticipant(trainer(i)) for i, site in enumerate(HONEST)}

    rounds = 4
    clean = await study(kits, work, rounds, honest=participants(), initial=initial, timeout_s=300)
    attacked = await study(kits, work, rounds, attacks=["x1000, Dice 1.0, 2^63-1 samples"] * rounds,
                           honest=participants(), initial=initial, timeout_s=300)

    def dice(weights: dict[str, np.ndarray]) -> list[float]:
        scores = []
        for i in range(len(HONEST)):
            t = trainer(i)
            t.set_weights({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            scores.append(t.validate())
        return scores

    ok = clean["finished"] and attacked["finished"]
    before, after = (dice(clean["final_weights"]), dice(attacked["final_weights"])) if ok else ([0.0], [1.0])
    gap = max(abs(a - b) for a, b in zip(before, after, strict=True))
    mallory: Mallory = attacked["mallory"]
    report.add(Row("tiny network: x1000 + Dice 1.0 + 2^63-1 samples every round", sum(mallory.sent.values()),
                   sum(mallory.told.values()), attacked["crash"] + clean["crash"], attacked["hang"] + clean["hang"],
                   int(gap > 0.01),
                   note=f"final validation Dice per site {', '.join(f'{d:.3f}' for d in after)} vs clean "
                        f"{', '.join(f'{d:.3f}' for d in before)}: largest difference {gap:.4f} (poisoned if > 0.01)"))


def kill_section(work: Path, kills: int, report: Report) -> None:
    """``kills`` random ``kill -9`` of the server or a site during rounds; each restarted as a service manager would."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_SITES, write_tiny_study

    rng = random.Random(7)
    root, names, rounds = work / "kills", TINY_SITES, 40
    write_tiny_study(root, f"rounds = {rounds}\nround_timeout_s = 20.0\ngrace_s = 2.0")
    sites, toml = {n: root / n for n in names}, root / "study.toml"
    port = free_port()
    kits = provision_study("localhost", list(names), root / "kits", study="kills", port=port)
    run = root / "run"
    common = ["--config", str(toml), "--cache", str(root / "cache"), "--threads", "1"]
    fedseg = [sys.executable, "-m", "fedseg"]

    def server(resume: bool) -> subprocess.Popen:
        where = ["--resume", str(run)] if resume else ["--out", str(run)]
        return subprocess.Popen([*fedseg, "server", "--kit", str(kits["server"]), *where, "--host", "127.0.0.1", *common],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(name: str) -> subprocess.Popen:
        return subprocess.Popen([*fedseg, "client", "--kit", str(kits[name]), "--data", str(sites[name]), "--retries", "100",
                                 "--server-url", f"wss://localhost:{port}", *common],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs: dict[str, subprocess.Popen] = {"server": server(False), **{n: client(n) for n in names}}
    state = run / "state.json"
    committed = lambda: json.loads(state.read_text())["completed_rounds"] if state.is_file() else 0  # noqa: E731

    def restart(name: str) -> None:  # as a service manager would (Restart=on-failure)
        procs[name] = (server((run / "run.json").is_file()) if name == "server" else client(name))

    seen, lost, done_kills, hang, deadline = 0, 0, 0, 0, time.monotonic() + 900
    try:
        while done_kills < kills and time.monotonic() < deadline and committed() < rounds:
            time.sleep(rng.uniform(1.0, 3.0))
            now = committed()
            lost += int(now < seen)
            seen = max(seen, now)
            for name, p in procs.items():
                if p.poll() not in (None, 0):
                    restart(name)
            victim = rng.choice(list(procs))
            procs[victim].kill()
            procs[victim].wait()
            done_kills += 1
            restart(victim)
        while procs["server"].poll() != 0 and time.monotonic() < deadline:  # let the study finish, restarting failures
            time.sleep(1.0)
            for name, p in procs.items():
                if p.poll() not in (None, 0):
                    restart(name)
        hang = int(procs["server"].poll() != 0)
        for name in names:  # a site restarted after the end finds no server: stop it
            try:
                procs[name].wait(timeout=60)
            except subprocess.TimeoutExpired:
                procs[name].kill()
        codes = {name: p.wait() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    final = RunDir.open(run)
    records = [r.round for r in final.round_records()]
    lost += int(records != list(range(rounds)))
    report.completed_rounds_lost += lost
    report.add(Row(f"kill -9 of the server or a site, {done_kills} times during rounds", done_kills,
                   done_kills if final.finished and not hang and not lost else 0, 0, hang,
                   note=f"each restarted (server with --resume); finished {final.finished}, rounds 0..{records[-1] if records else '-'}"
                        f" committed once each, exit codes {sorted(set(codes.values()))}; refused = survived: the study finished, no round lost"))


def _mentions(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------- report


DOC = """# Reliability: the federation under attack

Made by `{command}` on {date} (one process: the real server over mutual TLS
on 127.0.0.1 with a provisioned study, three honest numpy sites and one
dishonest authenticated site, `mallory`; see the script's docstring for every
section). "Refused" counts attacks the server (or, for a malicious server, the
site) turned away; "poisoned" counts rounds whose global model left the
element-wise range of the honest sites' updates; "hangs" studies that did not
end in time; "crashes" a server that failed with anything but the study's own
outcome. The columns crashes, hangs and poisoned must be 0.

{table}
Where the same attacks are also tested (in CI): `tests/federation/transport/test_adversarial.py`
(in memory, with every aggregator), `tests/federation/transport/test_federation_crash.py`
(`kill -9` of the server and of a client, resumed with no completed round lost),
`tests/cli/test_cli_signals.py` (SIGTERM and SIGKILL of `fedseg federate`, no
process left, `--resume` finishes); `tests/benchmarks/` runs this script in
`--quick` mode. Not in the suite: a read-only run directory (refused at start,
since the lock file cannot be written, but the suite runs as root, which
ignores file modes); the final Dice of the demo's phantom study under attack
(the "tiny network" row measures it on the test suite's synthetic cubes); the
server's own memory under the floods (the peak below is the whole process).
"""


def markdown(report: Report, seconds: float, quick: bool) -> str:
    lines = [
        "| attack | tried | refused | crashes | hangs | poisoned global models |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        note = f" ({row.note})" if row.note else ""
        lines.append(f"| {row.attack}{note} | {row.tried} | {row.refused} | {row.crashes} | {row.hangs} | {row.poisoned} |")
    total = {k: sum(getattr(r, k) for r in report.rows) for k in ("tried", "refused", "crashes", "hangs", "poisoned")}
    lines.append(f"| **total** | {total['tried']} | {total['refused']} | {total['crashes']} | {total['hangs']} | {total['poisoned']} |")
    lines += [
        "",
        f"Completed rounds lost after the federate kills: {report.completed_rounds_lost}. "
        f"Orphan processes: {report.orphans}. Peak RSS of this one process (server, four sites and the attackers): "
        f"{report.peak_rss_mib:.0f} MiB. {'Quick mode. ' if quick else ''}Ran in {seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


async def network_sections(kits, other, work, quick: bool, report: Report) -> None:
    print("TLS and identity", flush=True)
    await tls_section(kits, other, work, report)
    print("poisoned updates, false claims, stale and duplicate updates", flush=True)
    await update_section(kits, work, report)
    print("mutated frames on the wire", flush=True)
    await mutation_wire_section(kits, work, 20 if quick else 200, report)
    print("floods", flush=True)
    await flood_section(kits, work, quick, report)
    print("a site that never reads", flush=True)
    await slow_reader_section(kits, work, report)
    await full_disk_section(report, work)
    print("the tiny network, clean and under attack", flush=True)
    await network_dice_section(kits, work, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer mutations and floods, no federate kills")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write docs/reliability.md here: the table with how it was made (default: print only)")
    args = parser.parse_args()
    start = time.perf_counter()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="fedseg-robustness-") as tmp:
        work = Path(tmp)
        kits = provision_study("localhost", [*SITES, "revoked"], work / "kits", study="robustness",
                               cases={site: 10 for site in SITES})
        revoke(kits["ca"], kits["server"], "revoked")
        other = provision_study("localhost", ["nci"], work / "other", study="another")
        print("mutated frames (sans-I/O)", flush=True)
        mutation_section(1000 if args.quick else 10_000, report)
        asyncio.run(network_sections(kits, other, work, args.quick, report))
        two_servers_section(work, report)
        malicious_server_section(report)
        if not args.quick:
            print("SIGTERM and SIGKILL of fedseg federate", flush=True)
            federate_kill_section(work, report)
            print("kill -9, restarted, many times", flush=True)
            kill_section(work, 50, report)
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = markdown(report, time.perf_counter() - start, args.quick)
    print(table)
    if args.markdown is not None:
        write_text(args.markdown, DOC.format(command=" ".join(["python benchmarks/robustness.py", *sys.argv[1:]]),
                                             date=dt.date.today().isoformat(), table=table))
    if args.json is not None:
        write_text(args.json, json.dumps({**asdict(report), "seconds": time.perf_counter() - start}, indent=2))


if __name__ == "__main__":
    main()
