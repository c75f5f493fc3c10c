"""A site's federated client: connect, train each round it is asked to, send the update.

The client connects to the study server over mutual TLS
(:func:`fedseg.federation.transport.tls.client_context`), says HELLO with its site name
and protocol version, and then answers every TRAIN with one local epoch of
the [train] engine and an UPDATE (weights, number of training samples,
validation Dice, declared scalar metrics). The epoch runs in a worker thread
(:func:`asyncio.to_thread`), so the event loop keeps answering websockets'
pings however long it lasts.

At the end the server sends the final and the best global models (MODEL),
which the client hands to ``on_model`` (the CLI writes model directories),
and asks for an evaluation of the final model (EVALUATE): ``evaluate`` runs
it on the site's held-out test cases and the client answers with per-case
Dice only (RESULT) — case names replaced by pseudonyms unless
``share_case_names``.

What leaves the site is written to an audit log, one JSON line per UPDATE or
RESULT: bytes sent, tensor names and the scalar keys and values — nothing
else is sent besides the HELLO (site name and protocol version).

Failures: a TLS failure (unknown CA, wrong host name, expired certificate), a
REFUSE or an ERROR from the server raise :class:`FedsegError` with the reason
at once; a lost connection is retried up to ``retries`` times in a row, with
a delay that doubles up to :data:`MAX_RETRY_DELAY_S` (the server
leaves the site out of the open round and asks it again in the next one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage

from fedseg.errors import FedsegError
from fedseg.federation.protocol import wire
from fedseg.federation.deploy.provision import Kit, check_kit_dates
from fedseg.federation.transport.server import PING_INTERVAL_S, PING_TIMEOUT_S  # one keepalive setting for both ends
from fedseg.federation.strategies import Weights
from fedseg.federation.protocol.settings import settings_differences
from fedseg.federation.transport.tls import client_context
from fedseg.federation.protocol.wire import ErrorCode, Message, MessageType
from fedseg.training.engine import EpochResult, LocalTrainer

__all__ = ["PING_INTERVAL_S", "PING_TIMEOUT_S", "ConnectionLost", "ModelHook", "TestEvaluator", "pseudonymise", "run_client"]

log = logging.getLogger("fedseg.client")

OPEN_TIMEOUT_S = 30.0
MAX_RETRY_DELAY_S = 30.0


class ConnectionLost(FedsegError):
    """The connection dropped before DONE; worth reconnecting."""


ModelHook = Callable[[str, int | None, Weights, float | None], None]
"""Called with (``"final"`` or ``"best"``, round, weights, aggregated validation Dice) for each model received."""
TestEvaluator = Callable[[Weights], dict[str, float]]
"""Per-case Dice of the given weights on the site's held-out test cases (case name -> Dice)."""


@dataclass
class _Session:
    """What one connection needs besides the socket; ``models`` and ``joined`` outlive reconnections."""

    kit: Kit
    trainer: LocalTrainer
    audit_log: Path | None
    on_model: ModelHook | None = None
    evaluate: TestEvaluator | None = None
    share_case_names: bool = False
    settings: dict[str, Any] | None = None
    models: dict[str, Weights] = field(default_factory=dict)
    joined: int = 0  # WELCOMEs received: a connection that got one was not a failed attempt


# --------------------------------------------------------------------------- helpers


def _to_torch(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Writable copies of the received arrays as torch tensors."""
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in tensors.items()}


def _to_numpy(weights: dict[str, torch.Tensor]) -> Weights:
    return {name: tensor.detach().cpu().numpy() for name, tensor in weights.items()}


def update_message(site: str, round_number: int, result: EpochResult) -> Message:
    """The UPDATE for ``result``: weights, sample count, validation Dice and the training loss.

    Raises:
        BadMessage: e.g. the validation Dice is NaN (no validation cases).
    """
    body = {
        "num_samples": int(result.num_samples),
        "val_dice": float(result.val_dice),
        "metrics": {"train_loss": float(result.train_loss)},
    }
    return Message(MessageType.UPDATE, round=round_number, site=site, body=body, tensors=_to_numpy(result.weights))


def pseudonymise(case_dice: dict[str, float]) -> dict[str, float]:
    """``case-001``, ``case-002``… in the evaluator's order: case names may identify patients."""
    return {f"case-{i:03d}": dice for i, dice in enumerate(case_dice.values(), start=1)}


def audit_record(message: Message, bytes_sent: int, server: str) -> dict[str, Any]:
    """One audit line: everything an UPDATE or RESULT carried off the site, except tensor values."""
    scalars = {key: value for key, value in message.body.items() if key != "metrics"}
    scalars.update(message.body.get("metrics", {}))
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "server": server,
        "round": message.round,
        "site": message.site,
        "message": message.type.value,
        "bytes_sent": bytes_sent,
        "tensors": sorted(message.tensors),
        "scalars": scalars,
    }


def _append_audit(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, allow_nan=False) + "\n")


def _server_error(message: Message) -> FedsegError:
    code = ErrorCode(message.body["code"])
    verb = "refused the connection" if message.type is MessageType.REFUSE else "ended the session"
    reason = message.body["reason"] or "no detail given; see the server log"
    return FedsegError(f"server {verb}: {reason} ({code.name} {int(code)})")


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if any (not worth retrying: certificates do not fix themselves)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_CLOSED_AFTER_HANDSHAKE = (
    "the server closed the connection right after the TLS handshake; under TLS 1.3 that is how "
    "it refuses a site certificate (another study's, revoked, or not valid on the server's clock), "
    "and the server's log names the reason"
)


# --------------------------------------------------------------------------- one session


async def _send(ws: ClientConnection, message: Message) -> int:
    """Send ``message`` (chunked when needed); returns the bytes sent."""
    frames = wire.to_frames(message)
    for frame in frames:
        await ws.send(frame)
    return sum(len(frame) for frame in frames)


def _local_epochs(trainer: LocalTrainer, weights: dict[str, torch.Tensor], epochs: int) -> EpochResult:
    """``epochs`` epochs from the global ``weights``; the last epoch's result is the update.

    The last local epoch is always validated (the update carries its Dice);
    the others as the trainer's ``val_every`` says.
    """
    for index in range(epochs):
        last = index == epochs - 1
        result = trainer.run_epoch(weights if index == 0 else None, validate=True if last else None)
    return result


async def _train_round(ws: ClientConnection, session: _Session, message: Message, server: str) -> None:
    """Answer one TRAIN: an epoch in a worker thread, then the UPDATE and its audit line."""
    round_number = message.round
    if "iterations" in message.body:
        raise wire.BadMessage("this client trains whole local epochs per round, not iterations")
    epochs = int(message.body.get("epochs", 1))
    log.info("round %s: training %d local epoch(s)", round_number, epochs)
    result = await asyncio.to_thread(_local_epochs, session.trainer, _to_torch(dict(message.tensors)), epochs)
    update = update_message(session.kit.name, round_number, result)
    sent = await _send(ws, update)
    if session.audit_log is not None:
        _append_audit(session.audit_log, audit_record(update, sent, server))
    log.info("round %s: sent %d bytes (val Dice %.4f)", round_number, sent, result.val_dice)


async def _check_settings(ws: ClientConnection, session: _Session, theirs: Any) -> None:
    """Refuse to train with settings other than the server's: the update would be rejected or, worse, blend in."""
    if session.settings is None or not isinstance(theirs, dict):
        return
    differences = settings_differences(session.settings, theirs)
    if differences:
        shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        reason = f"this site's study settings differ from the server's: {shown}"
        error = Message(MessageType.ERROR, body={"code": int(ErrorCode.SETTINGS_MISMATCH), "reason": reason[: wire.MAX_TEXT]})
        await _send(ws, error)
        raise FedsegError(f"{reason}. Use the study's study.toml and --fold")


async def _keep_model(session: _Session, message: Message) -> None:
    name = message.body["model"]
    weights = {key: np.array(array) for key, array in message.tensors.items()}
    session.models[name] = weights
    log.info("received the %s model (round %s, aggregated val Dice %s)", name, message.round, message.body.get("val_dice"))
    if session.on_model is not None:
        await asyncio.to_thread(session.on_model, name, message.round, weights, message.body.get("val_dice"))


async def _evaluate(ws: ClientConnection, session: _Session, message: Message, server: str) -> None:
    """Answer an EVALUATE: per-case Dice of the model on the held-out test cases, nothing else."""
    name = message.body["model"]
    weights = {k: np.array(v) for k, v in message.tensors.items()} if message.tensors else session.models.get(name)
    if weights is None:
        raise wire.BadMessage(f"EVALUATE names the {name} model, which the server never sent")
    if session.evaluate is None:
        log.warning("no test evaluation configured; answering with no cases")
        case_dice: dict[str, float] = {}
    else:
        log.info("evaluating the %s model on the held-out test cases", name)
        case_dice = await asyncio.to_thread(session.evaluate, weights)
    shared = case_dice if session.share_case_names else pseudonymise(case_dice)
    result = Message(MessageType.RESULT, round=message.round, site=session.kit.name, body={"model": name, "case_dice": shared})
    sent = await _send(ws, result)
    if session.audit_log is not None:
        _append_audit(session.audit_log, audit_record(result, sent, server))
    log.info("sent per-case Dice of %d test case(s) (%d bytes)", len(shared), sent)


async def _session(url: str, context: ssl.SSLContext, session: _Session) -> Weights:
    """One connection: HELLO, then TRAIN/UPDATE until DONE (returned) or an error (raised)."""
    async with connect(
        url,
        ssl=context,
        max_size=wire.DEFAULT_MAX_FRAME,
        compression=None,  # weights barely compress; deflate would only cost CPU
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        open_timeout=OPEN_TIMEOUT_S,
    ) as ws:
        hello = Message(MessageType.HELLO, site=session.kit.name, body={"versions": [wire.PROTOCOL_VERSION]})
        await _send(ws, hello)
        reassembler = wire.Reassembler()
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    raise wire.BadMessage("the server sent a text frame")
                message = reassembler.feed(frame)
                if message is None:
                    continue
                if message.type is MessageType.DONE:
                    log.info("study done after %s rounds", message.body.get("rounds"))
                    return session.models.get("final", {})
                await _on_message(ws, session, message, url)
        except wire.ProtocolError as exc:
            await _send(ws, wire.error_message(exc))
            raise FedsegError(f"the server broke the protocol: {exc}") from exc
        raise _closed(ws.close_code, ws.close_reason)


async def _on_message(ws: ClientConnection, session: _Session, message: Message, server: str) -> None:
    if message.type is MessageType.ERROR and message.body["code"] == ErrorCode.REJECTED_UPDATE:
        # not fatal: the round goes on without this site, and the next TRAIN asks it again
        log.warning("round %s: the server rejected this site's update and left the site out of the round: %s",
                    message.round, message.body["reason"] or "no reason given")
        return
    if message.type in (MessageType.REFUSE, MessageType.ERROR):
        raise _server_error(message)
    if message.type is MessageType.WELCOME:
        await _check_settings(ws, session, message.body.get("config"))
        session.joined += 1
        log.info("joined the study (protocol %s, %s rounds)", message.body["version"], message.body.get("rounds"))
    elif message.type is MessageType.TRAIN:
        await _train_round(ws, session, message, server)
    elif message.type is MessageType.MODEL:
        await _keep_model(session, message)
    elif message.type is MessageType.EVALUATE:
        await _evaluate(ws, session, message, server)
    elif message.type is not MessageType.HEARTBEAT:
        log.warning("ignoring an unexpected %s from the server", message.type.name)


def _closed(code: int | None, reason: str | None) -> FedsegError:
    """Why the server closed without DONE: fatal for fedseg's own codes, else worth a retry."""
    if code is not None and code in {int(c) for c in ErrorCode}:
        return FedsegError(f"server closed the connection: {reason or ErrorCode(code).name} ({int(code)})")
    return ConnectionLost(f"connection closed before the study ended (code {code}, {reason or 'no reason'})")


# --------------------------------------------------------------------------- entry point


async def run_client(
    kit: Kit,
    trainer: LocalTrainer,
    *,
    server_url: str | None = None,
    audit_log: Path | None = None,
    on_model: ModelHook | None = None,
    evaluate: TestEvaluator | None = None,
    share_case_names: bool = False,
    settings: dict[str, Any] | None = None,
    retries: int = 10,
    retry_delay_s: float = 2.0,
) -> dict[str, np.ndarray]:
    """Take part in the study until the server says DONE; returns the final global weights.

    Args:
        kit: this site's kit (its certificate, key and the study CA).
        trainer: the site's local trainer; it keeps its optimiser and schedule across rounds.
        server_url: ``wss://HOST:PORT``; defaults to the kit's.
        audit_log: JSON-lines file that receives one record per UPDATE or RESULT sent.
        on_model: receives the final and the best models at the end of the study.
        evaluate: per-case test Dice of a model, for the server's final evaluation.
        share_case_names: send case names with the Dice instead of ``case-001``….
        settings: this site's study settings; the client refuses to take part
            if the server's (WELCOME) differ.
        retries: failed (re)connection attempts allowed in a row; the count
            restarts whenever the server welcomes the site again.
        retry_delay_s: pause before the first reconnection; doubled after each
            further failure, up to MAX_RETRY_DELAY_S (a server restart takes a while).

    Raises:
        FedsegError: TLS failure, refusal or error from the server, or the
            connection could not be (re)established within ``retries``.
    """
    url = server_url or kit.server_url
    if not url.startswith("wss://"):
        raise FedsegError(f"server URL {url!r} must start with wss:// (the study requires mutual TLS)")
    context = client_context(kit)
    session = _Session(kit, trainer, audit_log, on_model, evaluate, share_case_names, settings)
    failures, joined = 0, 0
    while True:
        check_kit_dates(kit)  # a study can outlive a certificate; say so rather than fail the handshake
        try:
            return await _session(url, context, session)
        except FedsegError as exc:
            if not isinstance(exc, ConnectionLost):
                raise
            problem: BaseException = exc
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
            tls = _tls_failure(exc)
            if tls is not None:
                raise FedsegError(f"TLS handshake with {url} failed: {tls}") from exc
            if isinstance(exc, InvalidMessage):
                exc = ConnectionLost(f"{exc}: {_CLOSED_AFTER_HANDSHAKE}")
            if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                error = _closed(exc.rcvd.code, exc.rcvd.reason)
                if not isinstance(error, ConnectionLost):
                    raise error from exc
            problem = exc
        failures = 1 if session.joined > joined else failures + 1
        joined = session.joined
        if failures > retries:
            raise FedsegError(f"cannot reach the server at {url} after {retries} retries: {problem}") from problem
        delay = min(retry_delay_s * 2 ** (failures - 1), MAX_RETRY_DELAY_S)
        log.warning("connection to %s failed (%s); retry %d/%d in %.1f s", url, problem, failures, retries, delay)
        await asyncio.sleep(delay)
