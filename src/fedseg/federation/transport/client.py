"""A site's client shell: pumps frames between a connection, the :class:`SiteSession` and a :class:`Participant`, and reconnects.

Every decision about messages is the sans-I/O
:class:`~fedseg.federation.protocol.session.SiteSession`'s: the HELLO, the
settings check on WELCOME, which events a frame means, the UPDATE and RESULT
it builds (per-case Dice only, under pseudonyms unless ``share_case_names``).
This module carries the events out with the site's
:class:`~fedseg.federation.protocol.participant.Participant` — each call in a
worker thread (:func:`asyncio.to_thread`), so the event loop keeps answering
keepalive pings however long an epoch lasts — and writes the audit log: one
JSON line per message sent (HELLO, UPDATE, RESULT, ERROR: bytes sent, SHA-256
of the frames, tensor names and the scalar keys and values), written and
fsynced *before* the frames go out.

A round whose local training diverged (NaN loss, non-finite weights) is
reported to the server as TRAINING_FAILED: the site stays in the study and
is asked again next round.

It needs no torch: :class:`fedseg.site.TorchParticipant` is where torch comes in.

Failures: a TLS failure (unknown CA, wrong host name, expired certificate), a
REFUSE or an ERROR from the server raise :class:`FedsegError` with the reason
at once; a lost connection is retried as :class:`~fedseg.federation.transport.retry.Backoff`
says (the server leaves the site out of the open round and asks it again in the next one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError
from fedseg.federation.protocol.constants import DEFAULT_MAX_MESSAGE, PING_INTERVAL_S, PING_TIMEOUT_S, message_limit
from fedseg.federation.protocol.participant import Participant, Weights
from fedseg.federation.protocol.session import (
    ConnectionDropped,
    Done,
    EvaluateRequested,
    Ignored,
    EvaluationRepeated,
    ModelReceived,
    SecureRoundAbandoned,
    SecureStep,
    ServerError,
    SiteEvent,
    SiteLimits,
    SiteSession,
    TrainRequested,
    UpdateRefused,
    Welcomed,
    local_problem,
)
from fedseg.federation.transport.connection import (
    ClientTransport,
    Connection,
    ConnectionClosed,
    ConnectionLost,
)
from fedseg.federation.protocol.secagg import Credentials, SecureSettings
from fedseg.federation.transport.kit import Kit, check_kit_dates, kit_credentials
from fedseg.federation.transport.retry import (
    FIRST_RETRY_DELAY_S,
    MAX_RETRY_DELAY_S,
    Backoff,
)
from fedseg.federation.transport.tls import client_context
from fedseg.federation.transport.websocket import WebSocketClient
from fedseg.io import append_jsonl

__all__ = ["MAX_RETRY_DELAY_S", "PING_INTERVAL_S", "PING_TIMEOUT_S", "ConnectionLost", "join_study", "run_client"]

log = logging.getLogger("fedseg.client")


class _Pump:
    """One site's study over one transport: the session, the participant and the audit log."""

    def __init__(self, session: SiteSession, participant: Participant, audit_log: Path | None) -> None:
        self.session = session
        self.participant = participant
        self.audit_log = audit_log

    async def connection(self, connection: Connection) -> Weights:
        """HELLO, then events until DONE (returns the final weights) or an error (raised)."""
        self.session.connect()
        await self._flush(connection)
        while True:
            try:
                frame = await connection.recv()
            except ConnectionClosed as exc:
                raise _failure(self.session.closed(exc.code, exc.reason)) from exc
            for event in self.session.receive(frame):
                done = await self._on_event(connection, event)
                if done is not None:
                    return done
            await self._flush(connection)

    async def _on_event(self, connection: Connection, event: SiteEvent) -> Weights | None:
        if isinstance(event, Welcomed):
            log.info("joined the study (protocol %s, %s rounds)", event.version, event.rounds)
        elif isinstance(event, TrainRequested):
            await self._train(connection, event)
        elif isinstance(event, ModelReceived):
            log.info("received the %s model (round %s, val Dice %s)", event.name, event.round, event.val_dice)
            await asyncio.to_thread(self.participant.keep_model, event.name, event.round, event.weights, event.val_dice)
        elif isinstance(event, EvaluateRequested):
            await self._evaluate(connection, event)
        elif isinstance(event, EvaluationRepeated):
            log.info("the server asked again for the %s model's evaluation; sent the same result again", event.model)
        elif isinstance(event, SecureStep):
            log.info("round %s: secure aggregation: %s", event.round, event.what)
        elif isinstance(event, SecureRoundAbandoned):
            log.error("round %s: this site left the round's secure aggregation: %s (the server leaves it out of the round)",
                      event.round, event.reason)
        elif isinstance(event, UpdateRefused):
            log.warning("round %s: the server rejected this site's update and left the site out of the round: %s",
                        event.round, event.reason)
        elif isinstance(event, Done):
            log.info("study done after %s rounds", event.rounds)
            return event.weights
        elif isinstance(event, ServerError):
            await self._flush(connection)  # e.g. the ERROR saying why this site stops
            raise FedsegError(event.reason)
        elif isinstance(event, Ignored):
            log.warning("ignoring an unexpected %s from the server", event.type.name)
        return None

    async def _train(self, connection: Connection, event: TrainRequested) -> None:
        """Answer one TRAIN: local epochs in a worker thread, then the UPDATE and its audit line."""
        log.info("round %s: training %d local epoch(s)", event.round, event.epochs)
        if self.session.secure is not None and not await self._deal_shares(connection, event.round):
            return  # this site left the round's secure aggregation (the server was told)
        update = await asyncio.to_thread(self.participant.train, event.weights, event.round, event.epochs)
        problem = local_problem(update)
        if problem is not None:
            log.error("round %s: this site's training failed (%s); the server leaves it out of this round", event.round, problem)
            self.session.send_training_failed(event.round, problem)
            await self._flush(connection)
            return
        record = self.session.send_update(event.round, update)
        await self._flush(connection)
        if record is not None:
            log.info("round %s: sent %d bytes (val Dice %.4f)", event.round, record["bytes_sent"], update.val_dice)
        elif self.session.secure is not None:
            log.info("round %s: trained (val Dice %.4f); masking once the shares are dealt", event.round, update.val_dice)

    async def _deal_shares(self, connection: Connection, round_: int) -> bool:
        """Secure aggregation: send the round keys, wait for the ROSTER and deal the shares, all before the epoch.

        The other sites send their keys as soon as TRAIN arrives, so the ROSTER follows within a
        round trip; the shares dealt to this site (DEALT) then arrive during the epoch, and the
        update is masked the moment it is trained. False: the round was abandoned.
        """
        await self._flush(connection)
        while self.session.secure_round_waiting_roster(round_):
            try:
                frame = await connection.recv()
            except ConnectionClosed as exc:
                raise _failure(self.session.closed(exc.code, exc.reason)) from exc
            for event in self.session.receive(frame):
                await self._on_event(connection, event)
            await self._flush(connection)
        return self.session.secure_round_open(round_)

    async def _evaluate(self, connection: Connection, event: EvaluateRequested) -> None:
        """Answer an EVALUATE: per-case Dice of the model on the held-out test cases, nothing else."""
        log.info("evaluating the %s model on the held-out test cases", event.model)
        case_dice = await asyncio.to_thread(self.participant.evaluate, event.weights)
        if case_dice is None:
            log.warning("no test evaluation configured; answering with no cases")
        record = self.session.send_result(event.round, event.model, case_dice)
        await self._flush(connection)
        log.info("sent per-case Dice of %d test case(s) (%d bytes)", len(case_dice or {}), record["bytes_sent"])

    async def _flush(self, connection: Connection) -> None:
        """Write the audit records of what is queued, then send it."""
        for record in self.session.audit_to_write():
            self._audit(record)
        try:
            for frame in self.session.data_to_send():
                await connection.send(frame)
        except ConnectionClosed as exc:
            raise _failure(self.session.closed(exc.code, exc.reason)) from exc

    def _audit(self, record: dict[str, Any]) -> None:
        if self.audit_log is not None:
            append_jsonl(self.audit_log, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})


def _failure(event: ServerError | ConnectionDropped) -> FedsegError:
    return FedsegError(event.reason) if isinstance(event, ServerError) else ConnectionLost(event.reason)


async def join_study(
    transport: ClientTransport,
    participant: Participant,
    site: str,
    *,
    audit_log: Path | None = None,
    share_case_names: bool = False,
    settings: dict[str, Any] | None = None,
    backoff: Backoff | None = None,
    before_connecting: Callable[[], None] | None = None,
    limits: SiteLimits | None = None,
    model_bytes: int | None = None,
    secure: SecureSettings | None = None,
    credentials: Credentials | None = None,
) -> Weights:
    """Take part in the study over ``transport`` as ``site`` until the server says DONE; returns the final weights.

    A lost connection (or an OSError anywhere, the participant's included: a
    network file system failing, for one) is retried as ``backoff`` says
    (default: 10 retries in a row); every other error ends the study for this site.

    Args:
        before_connecting: called before every attempt (e.g. to check the certificate dates).
        model_bytes: this site's model size: no message from the server may be larger than it plus
            16 MiB (None: the flat default limit).
        secure: secure aggregation's settings (this site's study.toml), None when off.
        credentials: what the site signs its round keys with and checks the others' against (with ``secure``).
        Others: as :func:`run_client`.
    """
    backoff = backoff or Backoff(10)
    session = SiteSession(
        site, settings=settings, share_case_names=share_case_names, server=transport.server, limits=limits,
        secure=secure, credentials=credentials, max_message=message_limit(model_bytes) if model_bytes is not None else DEFAULT_MAX_MESSAGE,
    )
    pump = _Pump(session, participant, audit_log)
    while True:
        if before_connecting is not None:
            before_connecting()
        joined = session.joined
        try:
            async with transport.connect() as connection:
                return await pump.connection(connection)
        except (ConnectionLost, OSError) as exc:
            problem: BaseException = exc
        if session.joined > joined:
            backoff.succeeded()  # this connection was welcomed: only its loss counts
        delay = backoff.failed()
        if delay is None:
            raise FedsegError(f"cannot reach the server at {transport.server} after {backoff.retries} retries: {problem}") from problem
        log.warning("connection to %s failed (%s); retry %d/%d in %.1f s", transport.server, problem, backoff.failures, backoff.retries, delay)
        await asyncio.sleep(delay)


async def run_client(
    kit: Kit,
    participant: Participant,
    *,
    server_url: str | None = None,
    audit_log: Path | None = None,
    share_case_names: bool = False,
    settings: dict[str, Any] | None = None,
    retries: int = 10,
    retry_delay_s: float = FIRST_RETRY_DELAY_S,
    limits: SiteLimits | None = None,
    model_bytes: int | None = None,
    secure: SecureSettings | None = None,
) -> Weights:
    """Take part in the study over mutual-TLS websockets until the server says DONE; returns the final global weights.

    Args:
        kit: this site's kit (its certificate, key and the study CA).
        participant: trains each round, keeps the final and best models, evaluates the final one
            (:class:`fedseg.site.TorchParticipant`).
        server_url: ``wss://HOST:PORT``; defaults to the kit's.
        audit_log: JSON-lines file that receives one record per UPDATE or RESULT sent.
        share_case_names: send case names with the test Dice instead of ``case-001``….
        settings: this site's study settings; the client refuses to take part
            if the server's (WELCOME) differ.
        retries: failed (re)connection attempts allowed in a row; the count
            restarts whenever the server welcomes the site again.
        retry_delay_s: pause before the first reconnection; doubled after each
            further failure, up to MAX_RETRY_DELAY_S (a server restart takes a while).
        limits: the most this site agrees to train (local epochs per TRAIN, rounds).
        model_bytes: this site's model size, which bounds every message from the server.
        secure: secure aggregation's settings (from this site's study.toml), None when off; the round
            keys are signed with the kit's key and the others' checked against the kit's CA.

    Raises:
        FedsegError: TLS failure, refusal or error from the server, or the
            connection could not be (re)established within ``retries``.
    """
    transport = WebSocketClient(server_url or kit.server_url, client_context(kit))
    return await join_study(
        transport, participant, kit.name, audit_log=audit_log, share_case_names=share_case_names, settings=settings,
        backoff=Backoff(retries, retry_delay_s, MAX_RETRY_DELAY_S), limits=limits, model_bytes=model_bytes,
        secure=secure, credentials=kit_credentials(kit) if secure is not None else None,
        # a study can outlive a certificate; say so rather than fail the handshake
        before_connecting=lambda: check_kit_dates(kit),
    )
