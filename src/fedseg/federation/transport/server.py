"""The federated server's shell: pumps frames between connections, sessions and :class:`ServerRounds`, and keeps the timers.

Every decision is taken by the sans-I/O cores: the handshake and a site's
messages by :class:`~fedseg.federation.protocol.session.ServerSession`, who
trains which round and when the study goes on by
:class:`~fedseg.federation.protocol.rounds.ServerRounds`. This module only

* runs a :class:`ServerSession` on each connection a transport accepts
  (:func:`run_server`: websockets over mutual TLS; :func:`serve_study`: any
  transport, e.g. :class:`~fedseg.federation.transport.memory.MemoryServer`),
  with the peer identity the transport vouches for, and closes refused or
  failed connections with the code the session says;
* turns session events into round events (UPDATE → ``update_received``, a
  lost connection → ``site_failed``) and timers into events (round deadline,
  grace period, HELLO deadline);
* carries out the round machine's actions: sends TRAIN, persists completed
  rounds in a :class:`RoundStore` (the run directory); at the end sends every
  site the final and best models (MODEL) and an EVALUATE, keeps the per-case
  Dice they return (RESULT) in ``evaluation.json``, then sends DONE — or
  ERROR with STUDY_FAILED and a reason that names no other site.

Robustness (the [trust] issue): every joined connection has one send queue
(:class:`_Outbox`), so two multi-frame messages never interleave and go out
in the order the round machine decided; TRAIN and the final models are
queued, not awaited, so the round deadline is armed when they are dispatched
and one slow reader delays no one else; round
commits run in a worker thread, off the event loop; and any failure while
the round machine or its actions run (a full disk, a bug) stops the study
with that error — the sites get STUDY_FAILED, :func:`serve_study` raises —
instead of leaving it waiting forever.

Logs go to the ``fedseg.server`` logger and name sites, rounds and reasons —
never tensors or key material.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.protocol.constants import (
    HELLO_TIMEOUT_S,
    MAX_CONNECTIONS_PER_SITE,
    SPARE_CONNECTIONS,
    message_limit,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
)
from fedseg.federation.protocol.chunks import to_frames
from fedseg.federation.protocol.errors import BadMessage, ErrorCode, UnknownSite
from fedseg.federation.protocol.rounds import (
    Action,
    EvaluationCompleted,
    Phase,
    RoundCompleted,
    RoundsConfig,
    SendFinal,
    SendSecure,
    SendTrain,
    ServerRounds,
    StudyDone,
    StudyFailed,
    UpdateRefused,
)
from fedseg.federation.protocol.session import (
    Ignored,
    Joined,
    Refused,
    ResultReceived,
    SecureReceived,
    ServerEvent,
    ServerSession,
    SiteLeft,
    TrainingFailed,
    UpdateReceived,
    done_frames,
    error_frames,
    evaluate_frames,
    model_frames,
    train_frames,
)
from fedseg.federation.strategies import Aggregator, Weights
from fedseg.federation.transport.connection import (
    Connection,
    ConnectionClosed,
    ServerTransport,
)
from fedseg.federation.transport.kit import Kit
from fedseg.federation.transport.tls import Revocations, server_context
from fedseg.federation.transport.websocket import WebSocketServer

__all__ = ["HELLO_TIMEOUT_S", "PING_INTERVAL_S", "PING_TIMEOUT_S", "RoundStore", "run_server", "serve_study"]

log = logging.getLogger("fedseg.server")

EventHook = Callable[[Action], None]


class RoundStore(Protocol):
    """Where the server keeps the study (:class:`fedseg.federation.deploy.rundir.RunDir` is one)."""

    @property
    def finished(self) -> bool:
        """The final step already took place."""
        ...

    def round_dice(self, number: int) -> float:
        """The aggregated validation Dice of committed round ``number``."""
        ...

    def best_score(self) -> tuple[int, float] | None:
        """(round, score) of the best committed round (its median site validation Dice), or None before any."""
        ...

    def best(self) -> tuple[int, float, dict[str, np.ndarray]] | None:
        """(round, score, weights) of the best committed round, or None."""
        ...

    def save_round(self, completed: RoundCompleted, server_optimizer: dict[str, np.ndarray] | None = None) -> Path:
        """Persist a completed round, then commit it."""
        ...

    def save_evaluation(self, completed: EvaluationCompleted) -> Path:
        """Keep the final step's per-case Dice; returns the file written."""
        ...

    def finish(self, final_weights: dict[str, np.ndarray]) -> None:
        """Keep the final and best models and mark the study finished."""
        ...


async def _send(connection: Connection, frames: Iterable[bytes]) -> bool:
    """Send ``frames``; False if the connection is already gone (its reader reports it)."""
    try:
        for frame in frames:
            await connection.send(frame)
    except ConnectionClosed:
        return False
    return True


class _Outbox:
    """One connection's send queue: messages go out whole and in order, by one writer task."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._queue: asyncio.Queue[tuple[list[bytes], asyncio.Future[bool]]] = asyncio.Queue()
        self._writer = asyncio.ensure_future(self._write())

    def put(self, frames: Iterable[bytes]) -> asyncio.Future[bool]:
        """Queue one message's frames; the future says whether they were sent (False: the connection is gone)."""
        sent: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._writer.done():
            sent.set_result(False)
        else:
            self._queue.put_nowait((list(frames), sent))
        return sent

    async def _write(self) -> None:
        try:
            while True:
                frames, sent = await self._queue.get()
                ok = await _send(self.connection, frames)
                if not sent.done():
                    sent.set_result(ok)
                if not ok:
                    return
        finally:
            self._drop_pending()

    def _drop_pending(self) -> None:
        while not self._queue.empty():
            _, sent = self._queue.get_nowait()
            if not sent.done():
                sent.set_result(False)

    def close(self) -> None:
        """Stop the writer; queued messages are dropped (their futures say False)."""
        self._writer.cancel()
        self._drop_pending()


class _Study:
    """One running study: the round machine, the open connections and the timers."""

    def __init__(
        self,
        run_dir: RoundStore,
        rounds: ServerRounds,
        *,
        allowed: frozenset[str],
        round_timeout_s: float,
        grace_s: float,
        on_event: EventHook | None,
        settings: dict[str, Any] | None = None,
        local_epochs: int = 1,
    ) -> None:
        self.run_dir = run_dir
        self.settings = settings
        self.local_epochs = local_epochs
        self.rounds = rounds
        self.allowed = allowed
        self.round_timeout_s = round_timeout_s
        self.grace_s = grace_s
        self.on_event = on_event
        self.connections: dict[str, Connection] = {}
        # a peer's message may hold one model (plus headers) in the reassembler, not a flat 1 GiB
        self.max_message = message_limit(_largest_upload(rounds))
        self.max_connections = MAX_CONNECTIONS_PER_SITE * len(rounds.config.sites) + SPARE_CONNECTIONS
        self._open = 0
        self.finished: asyncio.Future[Weights] = asyncio.get_running_loop().create_future()
        self._round_timer: tuple[int, asyncio.TimerHandle] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._train_frames: tuple[int, list[bytes]] | None = None
        self._final_frames: list[bytes] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._outboxes: dict[int, _Outbox] = {}  # id(connection) -> its send queue
        self._farewells: list[asyncio.Future[bool]] = []  # STUDY_FAILED messages after a crash

    def _queue(self, connection: Connection, frames: Iterable[bytes]) -> asyncio.Future[bool]:
        """Queue ``frames`` on a joined site's connection (never interleaved with another message to it)."""
        outbox = self._outboxes.get(id(connection))
        if outbox is None:
            outbox = self._outboxes[id(connection)] = _Outbox(connection)
        return outbox.put(frames)

    def _close_outbox(self, connection: Connection) -> None:
        outbox = self._outboxes.pop(id(connection), None)
        if outbox is not None:
            outbox.close()

    async def say_farewells(self, timeout_s: float = 5.0) -> None:
        """Give the STUDY_FAILED messages of a crash a moment to leave before the connections close."""
        if self._farewells:
            await asyncio.wait(self._farewells, timeout=timeout_s)

    def close_outboxes(self) -> None:
        for outbox in self._outboxes.values():
            outbox.close()
        self._outboxes.clear()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        """Run ``coroutine`` in the background; if it fails, the study stops with its error."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crash(task.exception())

    def _crash(self, error: BaseException | None) -> None:
        """A failure inside the server's own loop: stop the study with it (never hang)."""
        if self.finished.done() or error is None:
            return
        log.error("the server stopped: %s", error, exc_info=error)
        self.rounds.phase = Phase.FAILED
        frames = error_frames(ErrorCode.STUDY_FAILED, "the server stopped on an internal error; see its log")
        self._farewells = [self._queue(connection, frames) for connection in list(self.connections.values())]
        detail = f"{type(error).__name__}: {error}" if not isinstance(error, FedsegError) else str(error)
        self.finished.set_exception(FedsegError(f"the server stopped: {detail}"))

    async def _step(self, event: Callable[..., list[Action]], *args: Any) -> None:
        """Feed one event to the round machine and carry out its actions; a failure stops the study."""
        if self.finished.done():
            return
        try:
            await self._carry_out(event(*args))
        except Exception as exc:  # noqa: BLE001 - anything here would otherwise leave the study hanging
            self._crash(exc)

    # ---------------------------------------------------------------- connections

    async def handle(self, connection: Connection) -> None:
        """One site's connection, from handshake to disconnect (refused at once above the connection cap)."""
        if self._open >= self.max_connections:
            log.warning("refused %s: %d connections open already", connection.remote_address, self._open)
            await connection.close(1013, "too many connections; try again later")
            return
        self._open += 1
        try:
            await self._handle(connection)
        finally:
            self._open -= 1

    async def _handle(self, connection: Connection) -> None:
        session = ServerSession(rounds=self.rounds.config.rounds, settings=self.settings, max_message=self.max_message)
        try:
            joined = await self._handshake(connection, session)
        except ConnectionClosed as exc:
            log.debug("%s left during the handshake: %s", connection.remote_address, exc)
            return
        if joined is None:
            return
        site = joined.site
        await self._join(site, connection, session)
        reason = "disconnected"
        try:
            reason = await self._serve_site(site, connection, session)
        except ConnectionClosed as exc:
            reason = "disconnected" if exc.clean else f"connection lost ({exc})"
        finally:
            await self._leave(site, connection, reason)

    async def _handshake(self, connection: Connection, session: ServerSession) -> Joined | None:
        """The peer's certificate identity and its HELLO, checked by the session; None if it was refused."""
        try:
            session.peer_identified(connection.peer_site(self.allowed))
        except UnknownSite as exc:
            events: list[ServerEvent] = session.refuse(exc)
        else:
            try:
                events = session.receive(await connection.recv(timeout=HELLO_TIMEOUT_S))
            except TimeoutError:
                events = session.refuse(BadMessage(f"no HELLO within {HELLO_TIMEOUT_S:.0f} s"))
        for event in events:
            if isinstance(event, Joined):
                return event
            if isinstance(event, Refused):
                log.warning("refused %s: %s (%s)", connection.remote_address, event.reason, event.code.name)
        await _send(connection, session.data_to_send())
        await connection.close(session.close_code or 1000, session.close_reason)
        return None

    async def _join(self, site: str, connection: Connection, session: ServerSession) -> None:
        previous = self.connections.get(site)
        if previous is not None:
            log.warning("site %s reconnected; dropping its previous connection", site)
            self.connections.pop(site)
            self._close_outbox(previous)
            await self._step(self.rounds.site_failed, site, "reconnected")
            await previous.close(1000, "replaced by a new connection")
        self.connections[site] = connection
        log.info("site %s joined from %s", site, connection.remote_address)
        await self._queue(connection, session.data_to_send())  # the WELCOME
        await self._step(self.rounds.site_connected, site)

    async def _leave(self, site: str, connection: Connection, reason: str) -> None:
        if self.connections.get(site) is not connection:
            return  # replaced by a newer connection, already reported
        del self.connections[site]
        self._close_outbox(connection)
        if not self.finished.done():
            log.warning("site %s left: %s", site, reason)
        await self._step(self.rounds.site_failed, site, reason)

    async def _serve_site(self, site: str, connection: Connection, session: ServerSession) -> str:
        """Read the site's messages until the session ends; returns why it stopped."""
        while True:
            # the frame (up to 64 MiB) and the decoded update live only inside _on_frame: neither is kept
            # alive while waiting for the next frame
            stop = await self._on_frame(site, session, await connection.recv())
            if stop is not None:
                await self._queue(connection, session.data_to_send())
                await connection.close(session.close_code or 1000, session.close_reason)
                return stop

    async def _on_frame(self, site: str, session: ServerSession, frame: bytes | str) -> str | None:
        for event in session.receive(frame):
            stop = await self._on_event(site, event)
            if stop is not None:
                return stop
        return None

    async def _on_event(self, site: str, event: ServerEvent) -> str | None:
        if isinstance(event, UpdateReceived):
            await self._step(self.rounds.update_received, site, event.update, event.round)
        elif isinstance(event, SecureReceived):
            await self._step(self.rounds.secure_received, site, event.message)
        elif isinstance(event, TrainingFailed):
            log.warning("site %s: its training of round %d failed: %s", site, event.round, event.reason)
            await self._step(self.rounds.round_failed, site, event.round, event.reason)
        elif isinstance(event, ResultReceived):
            log.info("site %s: final model evaluated on %d test case(s)", site, len(event.case_dice))
            await self._step(self.rounds.result_received, site, event.case_dice)
        elif isinstance(event, SiteLeft):
            return event.reason
        elif isinstance(event, Ignored):
            log.warning("site %s sent an unexpected %s; ignored", site, event.type.name)
        return None

    # ---------------------------------------------------------------- actions

    async def _carry_out(self, actions: list[Action]) -> None:
        """Execute the round machine's actions in order, then re-arm the timers.

        Messages to sites (TRAIN, the final models, refusals) are queued on each
        connection's outbox, not awaited: every site starts downloading at
        once, and the round deadline does not wait for the slowest reader.
        Commits are awaited (in a worker thread) before anything after them
        is queued.
        """
        for action in actions:
            if self.on_event is not None:
                self.on_event(action)
            if isinstance(action, SendTrain):
                self._send_train(action)
            elif isinstance(action, SendSecure):
                self._send_secure(action)
            elif isinstance(action, SendFinal):
                self._send_final(action)
            else:
                await self._act(action)
        self._arm_timers()

    async def _act(self, action: Action) -> None:
        if isinstance(action, UpdateRefused):
            self._tell_refused(action)
        elif isinstance(action, RoundCompleted):
            await self._commit(action)
        elif isinstance(action, EvaluationCompleted):
            await asyncio.to_thread(self._record_evaluation, action)
        elif isinstance(action, StudyDone):
            await self._finish_done(action)
        elif isinstance(action, StudyFailed):
            await self._finish_failed(action)

    def _send_train(self, action: SendTrain) -> None:
        connection = self.connections.get(action.site)
        if connection is None:
            return
        if self._train_frames is None or self._train_frames[0] != action.round:  # built once per round
            self._train_frames = (action.round, train_frames(action.round, self.rounds.global_weights, self.local_epochs))
        self._queue(connection, self._train_frames[1])

    def _send_secure(self, action: SendSecure) -> None:
        """A secure-aggregation message (ROSTER, DEALT, UNMASK): small, built once for all its sites."""
        frames = to_frames(action.message)
        for site in action.sites:
            connection = self.connections.get(site)
            if connection is not None:
                self._queue(connection, frames)

    def _tell_refused(self, refused: UpdateRefused) -> None:
        """The site learns why its update was left out (the round's log line says it for the server)."""
        log.warning("round %s: refused the update of %s: %s", refused.round, refused.site, refused.reason)
        connection = self.connections.get(refused.site)
        if connection is not None:
            self._queue(connection, error_frames(ErrorCode.REJECTED_UPDATE, refused.reason, refused.round))

    def _final_messages(self, evaluate: bool) -> list[bytes]:
        """MODEL final, MODEL best, then EVALUATE naming the final model (built once, sent to each site)."""
        if self._final_frames is None:
            last = self.rounds.config.rounds - 1
            final_dice = self.run_dir.round_dice(last)
            frames = model_frames("final", last, self.rounds.global_weights, final_dice)
            best = self.run_dir.best()
            if best is not None:
                best_round, best_dice, best_weights = best
                frames += model_frames("best", best_round, best_weights, best_dice)
            if evaluate:
                frames += evaluate_frames(last, "final")
            self._final_frames = frames
        return self._final_frames

    def _send_final(self, action: SendFinal) -> None:
        connection = self.connections.get(action.site)
        if connection is not None:
            log.info("sending the final and best models to %s%s", action.site, " for evaluation" if action.evaluate else "")
            self._queue(connection, self._final_messages(action.evaluate))

    def _record_evaluation(self, completed: EvaluationCompleted) -> None:
        path = self.run_dir.save_evaluation(completed)
        for site, why in sorted(completed.left_out.items()):
            log.warning("final evaluation: site %s has no result: %s", site, why)
        log.info("final evaluation: %d site(s) answered; per-case Dice in %s", len(completed.case_dice), path)

    async def _commit(self, completed: RoundCompleted) -> None:
        """Persist the round in a worker thread (a model of 150 MB takes a while to write and fsync)."""
        optimizer_state = self.rounds.aggregator.state_dict() or None
        try:
            await asyncio.to_thread(self.run_dir.save_round, completed, optimizer_state)
        except OSError as exc:
            raise FedsegError(f"could not save round {completed.round}: {exc}") from exc
        for site, why in sorted(completed.left_out.items()):
            log.warning("round %d: site %s left out: %s", completed.round, site, why)
        weights = (
            "secret (secure aggregation: only their sum was unmasked)" if completed.result.secure_sums is not None
            else {site: round(w, 4) for site, w in completed.result.site_weights.items()}
        )
        log.info("round %d completed: sites %s, aggregation weights %s", completed.round, ", ".join(completed.result.sites), weights)

    async def _finish_done(self, done: StudyDone) -> None:
        await asyncio.to_thread(self.run_dir.finish, self.rounds.global_weights)
        best_round, best_dice = self.run_dir.best_score() or (-1, None)
        frames = done_frames(done.rounds, best_round, best_dice)
        await asyncio.gather(*(self._queue(connection, frames) for connection in list(self.connections.values())))
        log.info("study done after %d rounds", done.rounds)
        if not self.finished.done():
            self.finished.set_result(self.rounds.global_weights)

    async def _finish_failed(self, failed: StudyFailed) -> None:
        log.error("study failed: %s", failed.reason)
        # the sites get counts only: the full reason names other sites, which a site need not learn
        frames = error_frames(ErrorCode.STUDY_FAILED, failed.public_reason)
        await asyncio.gather(*(self._queue(connection, frames) for connection in list(self.connections.values())))
        if not self.finished.done():
            self.finished.set_exception(FedsegError(failed.reason))

    # ---------------------------------------------------------------- timers

    def _arm_timers(self) -> None:
        """Arm/cancel the round deadline and the quorum grace timer to match the round machine."""
        open_round = self.rounds.round_open
        if self._round_timer is not None and self._round_timer[0] != open_round:
            self._round_timer[1].cancel()
            self._round_timer = None
        if open_round is not None and self._round_timer is None:
            loop = asyncio.get_running_loop()
            handle = loop.call_later(self.round_timeout_s, self._fire, self._round_timeout, open_round)
            self._round_timer = (open_round, handle)
        if not self.rounds.quorum_reached and self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.rounds.quorum_reached and self._grace_timer is None:
            self._grace_timer = asyncio.get_running_loop().call_later(self.grace_s, self._fire, self._grace_over)

    def _fire(self, handler: Callable[..., list[Action]], *args: Any) -> None:
        """Timer callback: run the round machine's event and carry out its actions in a task."""
        self._spawn(self._step(handler, *args))

    def _round_timeout(self, number: int) -> list[Action]:
        self._round_timer = None
        log.warning("round %d timed out after %.0f s", number, self.round_timeout_s)
        return self.rounds.round_timed_out(number)

    def _grace_over(self) -> list[Action]:
        self._grace_timer = None
        log.info("grace period over: starting with %s", ", ".join(sorted(self.rounds.connected)))
        return self.rounds.quorum_wait_expired()

    def cancel_timers(self) -> None:
        for handle in (self._round_timer[1] if self._round_timer else None, self._grace_timer):
            if handle is not None:
                handle.cancel()


def _largest_upload(rounds: ServerRounds) -> int:
    """The bytes of the largest message a site should send: its UPDATE, or under secure aggregation its MASKED
    update (every float value as a 64-bit ring element)."""
    weights = rounds.global_weights.values()
    if rounds.config.secure is None:
        return sum(array.nbytes for array in weights)
    return sum(8 * array.size for array in weights if array.dtype.kind == "f") + 64


async def serve_study(
    transport: ServerTransport,
    run_dir: RoundStore,
    config: RoundsConfig,
    aggregator: Aggregator,
    initial_weights: dict[str, np.ndarray],
    *,
    round_timeout_s: float,
    grace_s: float,
    allowed_sites: Iterable[str] | None = None,
    first_round: int = 0,
    on_event: EventHook | None = None,
    settings: dict[str, Any] | None = None,
    local_epochs: int = 1,
) -> dict[str, np.ndarray]:
    """Serve one federated study over ``transport`` until its last round; returns the final global weights.

    Args:
        transport: accepts the sites' connections and vouches for their identities.
        allowed_sites: identities allowed besides being sites of ``config`` (e.g. the server kit's); None: all.
        Others: as :func:`run_server`.

    Raises:
        FedsegError: the study failed (quorum lost); the reason names the missing sites.
    """
    allowed = frozenset(config.sites) & (frozenset(allowed_sites) if allowed_sites is not None else frozenset(config.sites))
    study = _Study(
        run_dir,
        ServerRounds(config, aggregator, dict(initial_weights), first_round, finished=run_dir.finished),
        allowed=allowed,
        round_timeout_s=round_timeout_s,
        grace_s=grace_s,
        on_event=on_event,
        settings=settings,
        local_epochs=local_epochs,
    )
    if study.rounds.phase is Phase.DONE:
        return dict(initial_weights)
    try:
        async with transport.serve(study.handle):
            log.info("waiting for sites %s", ", ".join(sorted(allowed)))
            try:
                return await study.finished
            except FedsegError:
                await study.say_farewells()
                raise
    finally:
        study.cancel_timers()
        study.close_outboxes()


def _log_tls_refusal(error: ssl.SSLError) -> None:
    reason = getattr(error, "verify_message", None) or error.reason or str(error)
    # a peer closing mid-handshake (port probes, health checks) is not a refusal worth a warning
    level = logging.DEBUG if isinstance(error, ssl.SSLEOFError) else logging.WARNING
    log.log(level, "refused a TLS connection: %s (%s)", reason, error.__class__.__name__)


async def run_server(
    kit: Kit,
    run_dir: RoundStore,
    config: RoundsConfig,
    aggregator: Aggregator,
    initial_weights: dict[str, np.ndarray],
    *,
    host: str,
    port: int,
    round_timeout_s: float,
    grace_s: float,
    first_round: int = 0,
    on_event: EventHook | None = None,
    settings: dict[str, Any] | None = None,
    local_epochs: int = 1,
) -> dict[str, np.ndarray]:
    """Serve one federated study over mutual-TLS websockets until its last round; returns the final global weights.

    Args:
        kit: the server's kit (its certificate and the study CA).
        run_dir: where every completed round is persisted.
        config: sites, number of rounds, quorum.
        aggregator: folds the sites' updates (its ``state_dict`` is saved when it has one).
        initial_weights: the global model at the start of ``first_round``.
        host, port: where to listen.
        round_timeout_s: a site that has not answered a round by then is left out of it.
        grace_s: once ``min_sites`` are connected, how long to wait for the others
            before starting a round.
        first_round: 0 for a new study; the number of completed rounds when resuming.
        on_event: called with every action of the round machine (tests, progress display).
        settings: study settings every site must share (sent in WELCOME; a site
            whose own differ refuses to take part, saying which).
        local_epochs: local epochs each site trains per round (sent in TRAIN).

    Raises:
        FedsegError: the study failed (quorum lost); the reason names the missing sites.
    """
    transport = WebSocketServer(host, port, server_context(kit, _log_tls_refusal), Revocations.of(kit))
    return await serve_study(
        transport, run_dir, config, aggregator, initial_weights,
        round_timeout_s=round_timeout_s, grace_s=grace_s, allowed_sites=kit.allowed_sites, first_round=first_round,
        on_event=on_event, settings=settings, local_epochs=local_epochs,
    )
