"""The federated server: a thin asyncio/websockets shell around :class:`ServerRounds`.

Every decision (who trains which round, when a round completes, whether the
study goes on) is taken by the I/O-free :class:`~fedseg.federation.protocol.rounds.ServerRounds`;
this module only

* accepts mutual-TLS WebSocket connections and checks the peer's site
  identity (:func:`fedseg.federation.transport.tls.peer_site`) and protocol version
  (HELLO, :func:`fedseg.federation.protocol.wire.negotiate`), refusing with a REFUSE
  message and a close code from :class:`~fedseg.federation.protocol.wire.ErrorCode`;
* turns frames into events (UPDATE → ``update_received``, a lost connection
  → ``site_failed``) and timers into events (round deadline, grace period);
* carries out the actions: sends TRAIN, persists completed rounds in the
  :class:`~fedseg.federation.deploy.rundir.RunDir`; at the end sends every site the
  final and best models (MODEL) and an EVALUATE, keeps the per-case Dice
  they return (RESULT) in ``evaluation.json``, then sends DONE — or ERROR
  with STUDY_FAILED and a reason that names no other site.

Keepalive is websockets' own ping/pong, independent of training. Logs go to
the ``fedseg.server`` logger and name sites, rounds and reasons — never
tensors or key material.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fedseg.errors import FedsegError
from fedseg.federation.protocol import wire
from fedseg.federation.deploy.provision import Kit
from fedseg.federation.protocol.rounds import (
    Action,
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
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.strategies import Aggregator, Update, Weights
from fedseg.federation.transport.tls import peer_site, server_context
from fedseg.federation.protocol.wire import ErrorCode, Message, MessageType
from fedseg.io import read_json

__all__ = ["HELLO_TIMEOUT_S", "PING_INTERVAL_S", "PING_TIMEOUT_S", "run_server"]

log = logging.getLogger("fedseg.server")

PING_INTERVAL_S = 20.0
"""websockets keepalive: a ping every 20 s, answered by the peer's event loop even mid-epoch."""
PING_TIMEOUT_S = 60.0
"""A peer that does not answer a ping within 60 s is considered gone."""
HELLO_TIMEOUT_S = 30.0
"""How long a new connection may take to send its HELLO."""

EventHook = Callable[[Action], None]


class _Refused(Exception):
    """Internal: the handshake failed; ``message`` is the REFUSE to send."""

    def __init__(self, message: Message) -> None:
        super().__init__(message.body["reason"])
        self.message = message


def _refusal(exc: BaseException) -> _Refused:
    return _Refused(wire.error_message(exc, type=MessageType.REFUSE))


async def _send(ws: ServerConnection, frames: Iterable[bytes]) -> bool:
    """Send ``frames``; False if the connection is already gone (its reader reports it)."""
    try:
        for frame in frames:
            await ws.send(frame)
    except ConnectionClosed:
        return False
    return True


def _close_reason(text: str) -> str:
    """A WebSocket close reason must fit in 123 bytes of UTF-8."""
    return text.encode("utf-8")[:120].decode("utf-8", "ignore")


def _update_from(site: str, message: Message) -> Update:
    """The :class:`Update` an UPDATE message carries (validated later by the aggregator)."""
    body = message.body
    return Update(
        site=site,
        weights={name: np.asarray(array) for name, array in message.tensors.items()},
        num_samples=int(body["num_samples"]),
        val_dice=float(body["val_dice"]),
        metrics={key: float(value) for key, value in body["metrics"].items()},
    )


class _Study:
    """One running study: the round machine, the open connections and the timers."""

    def __init__(
        self,
        kit: Kit,
        run_dir: RunDir,
        rounds: ServerRounds,
        *,
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
        self.allowed = frozenset(rounds.config.sites) & kit.allowed_sites
        self.round_timeout_s = round_timeout_s
        self.grace_s = grace_s
        self.on_event = on_event
        self.connections: dict[str, ServerConnection] = {}
        self.finished: asyncio.Future[Weights] = asyncio.get_running_loop().create_future()
        self._round_timer: tuple[int, asyncio.TimerHandle] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._train_frames: tuple[int, list[bytes]] | None = None
        self._final_frames: list[bytes] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- connections

    async def handle(self, ws: ServerConnection) -> None:
        """One site's connection, from handshake to disconnect."""
        try:
            site = await self._handshake(ws)
        except _Refused as refused:
            await self._refuse(ws, refused.message)
            return
        await self._join(site, ws)
        reason = "disconnected"
        try:
            reason = await self._serve_site(site, ws)
        except ConnectionClosed as exc:
            reason = f"connection lost ({exc})"
        finally:
            await self._leave(site, ws, reason)

    async def _handshake(self, ws: ServerConnection) -> str:
        """The peer's site, after checking its certificate identity and its HELLO."""
        ssl_object = ws.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            plain = "plain connections are refused; connect with wss:// and a site certificate"
            raise _refusal(wire.UnknownSite(plain))
        try:
            site = peer_site(ssl_object, self.allowed)
        except FedsegError as exc:
            raise _refusal(wire.UnknownSite(str(exc))) from exc
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                hello = wire.Reassembler().feed(_as_bytes(await ws.recv()))
        except TimeoutError as exc:
            raise _refusal(wire.BadMessage(f"no HELLO within {HELLO_TIMEOUT_S:.0f} s")) from exc
        except wire.ProtocolError as exc:
            raise _refusal(exc) from exc
        return self._check_hello(site, hello)

    @staticmethod
    def _check_hello(site: str, hello: Message | None) -> str:
        if hello is None or hello.type is not MessageType.HELLO:
            raise _refusal(wire.BadMessage("the first message must be a whole HELLO"))
        if hello.site != site:
            raise _refusal(wire.UnknownSite(f"HELLO names site {hello.site!r} but the certificate is {site!r}"))
        try:
            wire.negotiate(hello.body["versions"])
        except wire.VersionMismatch as exc:
            raise _refusal(exc) from exc
        return site

    async def _refuse(self, ws: ServerConnection, refusal: Message) -> None:
        code, reason = refusal.body["code"], refusal.body["reason"]
        log.warning("refused %s: %s (%s)", ws.remote_address, reason, ErrorCode(code).name)
        await _send(ws, [wire.encode(refusal)])
        await ws.close(code, _close_reason(reason))

    async def _join(self, site: str, ws: ServerConnection) -> None:
        previous = self.connections.get(site)
        if previous is not None:
            log.warning("site %s reconnected; dropping its previous connection", site)
            self.connections.pop(site)
            await self._carry_out(self.rounds.site_failed(site, "reconnected"))
            await previous.close(1000, "replaced by a new connection")
        self.connections[site] = ws
        log.info("site %s joined from %s", site, ws.remote_address)
        body: dict[str, Any] = {"version": wire.PROTOCOL_VERSION, "rounds": self.rounds.config.rounds}
        if self.settings is not None:
            body["config"] = self.settings
        welcome = Message(MessageType.WELCOME, site=site, body=body)
        await _send(ws, [wire.encode(welcome)])
        await self._carry_out(self.rounds.site_connected(site))

    async def _leave(self, site: str, ws: ServerConnection, reason: str) -> None:
        if self.connections.get(site) is not ws:
            return  # replaced by a newer connection, already reported
        del self.connections[site]
        if not self.finished.done():
            log.warning("site %s left: %s", site, reason)
        await self._carry_out(self.rounds.site_failed(site, reason))

    async def _serve_site(self, site: str, ws: ServerConnection) -> str:
        """Read the site's messages until it disconnects; returns why it stopped."""
        reassembler = wire.Reassembler()
        async for frame in ws:
            try:
                message = reassembler.feed(_as_bytes(frame))
            except wire.ProtocolError as exc:
                log.warning("site %s broke the protocol: %s", site, exc)
                await _send(ws, [wire.encode(wire.error_message(exc))])
                await ws.close(int(wire.error_code(exc)), _close_reason(str(exc)))
                return f"protocol error: {exc}"
            del frame  # up to a frame of bytes: not kept alive while waiting for the next one
            if message is not None:
                stop = await self._on_message(site, message)
                if stop is not None:
                    return stop
            message = None  # nor the decoded update, once it has been folded in
        return "disconnected"

    async def _on_message(self, site: str, message: Message) -> str | None:
        if message.type is MessageType.UPDATE:
            if message.site != site:
                return f"UPDATE signed as {message.site!r}"
            await self._carry_out(self.rounds.update_received(site, _update_from(site, message)))
        elif message.type is MessageType.RESULT:
            case_dice = {case: float(dice) for case, dice in message.body["case_dice"].items()}
            log.info("site %s: final model evaluated on %d test case(s)", site, len(case_dice))
            await self._carry_out(self.rounds.result_received(site, case_dice))
        elif message.type is MessageType.ERROR:
            return f"site reported an error: {message.body['reason'] or ErrorCode(message.body['code']).name}"
        elif message.type is not MessageType.HEARTBEAT:
            log.warning("site %s sent an unexpected %s; ignored", site, message.type.name)
        return None

    # ---------------------------------------------------------------- actions

    async def _carry_out(self, actions: list[Action]) -> None:
        """Execute the round machine's actions in order, then re-arm the timers.

        Consecutive sends (TRAIN or the final models, one site each) go out
        concurrently: every site starts downloading at once, not in turn.
        """
        sends: list[Awaitable[None]] = []
        for action in actions:
            if self.on_event is not None:
                self.on_event(action)
            if isinstance(action, SendTrain):
                sends.append(self._send_train(action))
                continue
            if isinstance(action, SendFinal):
                sends.append(self._send_final(action))
                continue
            if sends:
                await asyncio.gather(*sends)
                sends = []
            if isinstance(action, UpdateRefused):
                await self._tell_refused(action)
            elif isinstance(action, RoundCompleted):
                self._commit(action)
            elif isinstance(action, EvaluationCompleted):
                self._record_evaluation(action)
            elif isinstance(action, StudyDone):
                await self._finish_done(action)
            elif isinstance(action, StudyFailed):
                await self._finish_failed(action)
        if sends:
            await asyncio.gather(*sends)
        self._arm_timers()

    async def _send_train(self, action: SendTrain) -> None:
        ws = self.connections.get(action.site)
        if ws is None:
            return
        if self._train_frames is None or self._train_frames[0] != action.round:
            body = {"epochs": self.local_epochs}
            train = Message(MessageType.TRAIN, round=action.round, body=body, tensors=self.rounds.global_weights)
            self._train_frames = (action.round, wire.to_frames(train))
        await _send(ws, self._train_frames[1])

    async def _tell_refused(self, refused: UpdateRefused) -> None:
        """The site learns why its update was left out (the round's log line says it for the server)."""
        ws = self.connections.get(refused.site)
        if ws is not None:
            body = {"code": int(ErrorCode.REJECTED_UPDATE), "reason": refused.reason[: wire.MAX_TEXT]}
            await _send(ws, [wire.encode(Message(MessageType.ERROR, round=refused.round, body=body))])

    def _final_messages(self, evaluate: bool) -> list[bytes]:
        """MODEL final, MODEL best, then EVALUATE naming the final model (built once, sent to each site)."""
        if self._final_frames is None:
            last = self.rounds.config.rounds - 1
            final_dice = float(read_json(self.run_dir.round_folder(last) / "round.json")["aggregated_val_dice"])
            body = {"model": "final", "val_dice": min(max(final_dice, 0.0), 1.0)}
            frames = wire.to_frames(Message(MessageType.MODEL, round=last, body=body, tensors=self.rounds.global_weights))
            best = self.run_dir.best()
            if best is not None:
                best_round, best_dice, best_weights = best
                best_body = {"model": "best", "val_dice": min(max(best_dice, 0.0), 1.0)}
                frames += wire.to_frames(Message(MessageType.MODEL, round=best_round, body=best_body, tensors=best_weights))
            if evaluate:
                frames.append(wire.encode(Message(MessageType.EVALUATE, round=last, body={"model": "final"})))
            self._final_frames = frames
        return self._final_frames

    async def _send_final(self, action: SendFinal) -> None:
        ws = self.connections.get(action.site)
        if ws is not None:
            log.info("sending the final and best models to %s%s", action.site, " for evaluation" if action.evaluate else "")
            await _send(ws, self._final_messages(action.evaluate))

    def _record_evaluation(self, completed: EvaluationCompleted) -> None:
        path = self.run_dir.save_evaluation(completed)
        for site, why in sorted(completed.left_out.items()):
            log.warning("final evaluation: site %s has no result: %s", site, why)
        log.info("final evaluation: %d site(s) answered; per-case Dice in %s", len(completed.case_dice), path)

    def _commit(self, completed: RoundCompleted) -> None:
        state_dict = getattr(self.rounds.aggregator, "state_dict", None)
        self.run_dir.save_round(completed, state_dict() if callable(state_dict) else None)
        for site, why in sorted(completed.left_out.items()):
            log.warning("round %d: site %s left out: %s", completed.round, site, why)
        log.info(
            "round %d completed: sites %s, aggregation weights %s",
            completed.round,
            ", ".join(completed.result.sites),
            {site: round(w, 4) for site, w in completed.result.site_weights.items()},
        )

    async def _finish_done(self, done: StudyDone) -> None:
        self.run_dir.finish(self.rounds.global_weights)
        state = self.run_dir.state()
        body: dict[str, Any] = {"rounds": done.rounds}
        if state.get("best_round", -1) >= 0:
            body.update(best_round=int(state["best_round"]), best_dice=min(max(float(state["best_dice"]), 0.0), 1.0))
        frames = wire.to_frames(Message(MessageType.DONE, body=body))
        await asyncio.gather(*(_send(ws, frames) for ws in list(self.connections.values())))
        log.info("study done after %d rounds", done.rounds)
        if not self.finished.done():
            self.finished.set_result(self.rounds.global_weights)

    async def _finish_failed(self, failed: StudyFailed) -> None:
        log.error("study failed: %s", failed.reason)
        # the sites get counts only: the full reason names other sites, which a site need not learn
        body = {"code": int(ErrorCode.STUDY_FAILED), "reason": failed.public_reason}
        frame = wire.encode(Message(MessageType.ERROR, body=body))
        await asyncio.gather(*(_send(ws, [frame]) for ws in list(self.connections.values())))
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
        task = asyncio.get_running_loop().create_task(self._carry_out(handler(*args)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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


def _log_tls_refusal(error: ssl.SSLError) -> None:
    reason = getattr(error, "verify_message", None) or error.reason or str(error)
    # a peer closing mid-handshake (port probes, health checks) is not a refusal worth a warning
    level = logging.DEBUG if isinstance(error, ssl.SSLEOFError) else logging.WARNING
    log.log(level, "refused a TLS connection: %s (%s)", reason, error.__class__.__name__)


def _as_bytes(frame: str | bytes) -> bytes:
    if isinstance(frame, str):
        raise wire.BadMessage("text frames are not part of the protocol; send binary frames")
    return frame


async def run_server(
    kit: Kit,
    run_dir: RunDir,
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
    """Serve one federated study until its last round; returns the final global weights.

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
    study = _Study(
        kit,
        run_dir,
        ServerRounds(config, aggregator, dict(initial_weights), first_round, finished=run_dir.finished),
        round_timeout_s=round_timeout_s,
        grace_s=grace_s,
        on_event=on_event,
        settings=settings,
        local_epochs=local_epochs,
    )
    if study.rounds.phase is Phase.DONE:
        return dict(initial_weights)
    try:
        async with serve(
            study.handle,
            host,
            port,
            ssl=server_context(kit, _log_tls_refusal),
            max_size=wire.DEFAULT_MAX_FRAME,
            compression=None,  # weights barely compress; deflate would only cost CPU
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
        ):
            log.info("listening on %s:%d for sites %s", host, port, ", ".join(sorted(study.allowed)))
            return await study.finished
    finally:
        study.cancel_timers()
