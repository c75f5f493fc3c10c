"""A site's federated client: connect, train each round it is asked to, send the update.

The client connects to the study server over mutual TLS
(:func:`fedseg.federation.tls.client_context`), says HELLO with its site name
and protocol version, and then answers every TRAIN with one local epoch of
the [train] engine and an UPDATE (weights, number of training samples,
validation Dice, declared scalar metrics). The epoch runs in a worker thread
(:func:`asyncio.to_thread`), so the event loop keeps answering websockets'
pings however long it lasts.

What leaves the site is written to an audit log, one JSON line per round:
bytes sent, tensor names and the scalar keys and values — nothing else is
sent besides the HELLO (site name and protocol version).

Failures: a TLS failure (unknown CA, wrong host name, expired certificate), a
REFUSE or an ERROR from the server raise :class:`FedsegError` with the reason
at once; a lost connection is retried up to ``retries`` times (the server
leaves the site out of the open round and asks it again in the next one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from fedseg.errors import FedsegError
from fedseg.federation import wire
from fedseg.federation.provision import Kit
from fedseg.federation.server import PING_INTERVAL_S, PING_TIMEOUT_S  # one keepalive setting for both ends
from fedseg.federation.strategies import Weights
from fedseg.federation.tls import client_context
from fedseg.federation.wire import ErrorCode, Message, MessageType
from fedseg.training.engine import EpochResult, LocalTrainer

__all__ = ["PING_INTERVAL_S", "PING_TIMEOUT_S", "ConnectionLost", "run_client"]

log = logging.getLogger("fedseg.client")

OPEN_TIMEOUT_S = 30.0


class ConnectionLost(FedsegError):
    """The connection dropped before DONE; worth reconnecting."""


@dataclass(frozen=True)
class _Session:
    """What one connection needs besides the socket."""

    kit: Kit
    trainer: LocalTrainer
    audit_log: Path | None


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


def audit_record(message: Message, bytes_sent: int, server: str) -> dict[str, Any]:
    """One audit line: everything an UPDATE carried off the site, except the tensor values."""
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


# --------------------------------------------------------------------------- one session


async def _send(ws: ClientConnection, message: Message) -> int:
    """Send ``message`` (chunked when needed); returns the bytes sent."""
    frames = wire.to_frames(message)
    for frame in frames:
        await ws.send(frame)
    return sum(len(frame) for frame in frames)


async def _train_round(ws: ClientConnection, session: _Session, message: Message, server: str) -> None:
    """Answer one TRAIN: an epoch in a worker thread, then the UPDATE and its audit line."""
    round_number = message.round
    log.info("round %s: training one epoch", round_number)
    result = await asyncio.to_thread(session.trainer.run_epoch, _to_torch(dict(message.tensors)))
    update = update_message(session.kit.name, round_number, result)
    sent = await _send(ws, update)
    if session.audit_log is not None:
        _append_audit(session.audit_log, audit_record(update, sent, server))
    log.info("round %s: sent %d bytes (val Dice %.4f)", round_number, sent, result.val_dice)


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
                    return {name: np.array(array) for name, array in message.tensors.items()}
                await _on_message(ws, session, message, url)
        except wire.ProtocolError as exc:
            await _send(ws, wire.error_message(exc))
            raise FedsegError(f"the server broke the protocol: {exc}") from exc
        raise _closed(ws.close_code, ws.close_reason)


async def _on_message(ws: ClientConnection, session: _Session, message: Message, server: str) -> None:
    if message.type in (MessageType.REFUSE, MessageType.ERROR):
        raise _server_error(message)
    if message.type is MessageType.WELCOME:
        log.info("joined the study (protocol %s, %s rounds)", message.body["version"], message.body.get("rounds"))
    elif message.type is MessageType.TRAIN:
        await _train_round(ws, session, message, server)
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
    retries: int = 5,
    retry_delay_s: float = 2.0,
) -> dict[str, np.ndarray]:
    """Take part in the study until the server says DONE; returns the final global weights.

    Args:
        kit: this site's kit (its certificate, key and the study CA).
        trainer: the site's local trainer; it keeps its optimiser and schedule across rounds.
        server_url: ``wss://HOST:PORT``; defaults to the kit's.
        audit_log: JSON-lines file that receives one record per UPDATE sent.
        retries: reconnections allowed after a lost connection, over the whole study.
        retry_delay_s: pause before each reconnection.

    Raises:
        FedsegError: TLS failure, refusal or error from the server, or the
            connection could not be (re)established within ``retries``.
    """
    url = server_url or kit.server_url
    if not url.startswith("wss://"):
        raise FedsegError(f"server URL {url!r} must start with wss:// (the study requires mutual TLS)")
    context = client_context(kit)
    session = _Session(kit, trainer, audit_log)
    failures = 0
    while True:
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
            if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                error = _closed(exc.rcvd.code, exc.rcvd.reason)
                if not isinstance(error, ConnectionLost):
                    raise error from exc
            problem = exc
        failures += 1
        if failures > retries:
            raise FedsegError(f"cannot reach the server at {url} after {retries} retries: {problem}") from problem
        log.warning("connection to %s failed (%s); retry %d/%d in %.1f s",
                    url, problem, failures, retries, retry_delay_s)
        await asyncio.sleep(retry_delay_s)
