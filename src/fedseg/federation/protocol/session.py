"""Both ends of one connection as sans-I/O state machines: :class:`ServerSession` and :class:`SiteSession`.

As in websockets' ``Protocol``: frames in (``receive(frame)``), events out,
frames to send out (``data_to_send()``), a small explicit state; no socket, no
clock, no torch, no asyncio. The transport shells
(:mod:`fedseg.federation.transport.server`, :mod:`fedseg.federation.transport.client`)
pump frames, arm the timers and act on the events.

Server side, per connection::

    AWAITING_HELLO --HELLO ok--> OPEN --ERROR / protocol error--> CLOSED
          \\--bad identity, bad HELLO, other version, no HELLO in time: REFUSE--> CLOSED

Site side, one session for the whole study (it outlives reconnections)::

    IDLE --connect()--> HELLO_SENT --WELCOME--> JOINED --DONE--> DONE
                             any state: REFUSE / ERROR / protocol error / other settings --> FAILED

Messages sent to every site alike (TRAIN, MODEL, EVALUATE, DONE, ERROR) are
built once by the ``*_frames`` functions and handed to every connection.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.protocol.chunks import Reassembler, to_frames
from fedseg.federation.protocol.constants import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
)
from fedseg.federation.protocol.errors import (
    CODE_VALUES,
    BadMessage,
    ErrorCode,
    ProtocolError,
    UnknownSite,
    VersionMismatch,
    error_body,
    error_code,
)
from fedseg.federation.protocol.participant import LocalUpdate, Weights
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.secagg import Credentials, SecAggError, SecureSettings, SiteSecureRound
from fedseg.federation.protocol.settings import settings_differences
from fedseg.federation.strategies import Update

__all__ = [
    "ConnectionDropped", "Done", "EvaluateRequested", "Ignored", "Joined", "ModelReceived", "Refused",
    "ResultReceived", "SecureReceived", "SecureRoundAbandoned", "SecureStep", "ServerError", "ServerSession",
    "ServerState", "SiteLeft", "SiteLimits", "SiteSession",
    "SiteState", "TrainRequested", "TrainingFailed", "UpdateReceived", "UpdateRefused", "Welcomed", "audit_record",
    "done_frames", "error_frames", "evaluate_frames", "local_problem", "model_frames", "negotiate", "pseudonymise",
    "train_frames",
]

NORMAL_CLOSURE = 1000  # WebSocket's "normal closure": the session ended without a protocol error
Frame = bytes | str  # a text frame is refused, but a transport may hand one in


def negotiate(offered: Sequence[int]) -> int:
    """The version to speak with a peer that offered ``offered`` (from HELLO).

    Raises:
        VersionMismatch: PROTOCOL_VERSION is not among ``offered``.
    """
    if PROTOCOL_VERSION not in offered:
        raise VersionMismatch(offered)
    return PROTOCOL_VERSION


def _binary(frame: Frame) -> bytes:
    if isinstance(frame, str):
        raise BadMessage("text frames are not part of the protocol; send binary frames")
    return frame


def _dice(value: float) -> float:
    """A Dice clamped into the wire's [0, 1] (an aggregate may stray by rounding)."""
    return min(max(float(value), 0.0), 1.0)


@dataclass(frozen=True)
class Ignored:
    """A message this end does not expect at this point; it was dropped (worth a log line)."""

    type: MessageType


# =========================================================================== server side


class ServerState(IntEnum):
    AWAITING_HELLO = 0
    OPEN = 1
    CLOSED = 2


@dataclass(frozen=True)
class Joined:
    """The site's HELLO was accepted; a WELCOME is queued."""

    site: str
    version: int


@dataclass(frozen=True)
class Refused:
    """The handshake failed; a REFUSE is queued and the connection is to be closed with ``code``."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True)
class UpdateReceived:
    """The site's UPDATE for ``round``, not yet validated against the global model (the aggregator does that)."""

    update: Update
    round: int


@dataclass(frozen=True)
class SecureReceived:
    """The site's KEYS, SHARES, MASKED or REVEAL message (secure aggregation), for the round machine."""

    message: Message


SECURE_FROM_SITES = frozenset({MessageType.KEYS, MessageType.SHARES, MessageType.MASKED, MessageType.REVEAL})
SECURE_FROM_SERVER = frozenset({MessageType.ROSTER, MessageType.DEALT, MessageType.UNMASK})


@dataclass(frozen=True)
class TrainingFailed:
    """The site could not train ``round`` (e.g. a NaN loss); it stays connected and in the study."""

    round: int
    reason: str


@dataclass(frozen=True)
class ResultReceived:
    """The site's per-case test Dice of the final model."""

    case_dice: dict[str, float]


@dataclass(frozen=True)
class SiteLeft:
    """The session is over (the site reported an error or broke the protocol); close the connection."""

    reason: str


ServerEvent = Joined | Refused | UpdateReceived | SecureReceived | TrainingFailed | ResultReceived | SiteLeft | Ignored


class ServerSession:
    """The server's end of one site's connection: the handshake, then the site's messages as events.

    Call :meth:`peer_identified` with the identity the transport vouches for
    (the TLS certificate's site), or :meth:`refuse` when there is none; then
    feed every frame to :meth:`receive` and send :meth:`data_to_send`. Once
    CLOSED, close the connection with :attr:`close_code` and :attr:`close_reason`.

    Args:
        rounds: the study's number of rounds (told in WELCOME).
        settings: study settings every site must share (WELCOME's "config"), or None.
    """

    def __init__(
        self,
        *,
        rounds: int,
        settings: dict[str, Any] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.rounds = rounds
        self.settings = settings
        self.state = ServerState.AWAITING_HELLO
        self.site: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._reassembler = Reassembler(max_message, max_frame=max_frame)
        self._outgoing: list[bytes] = []

    def peer_identified(self, site: str) -> None:
        """The transport verified that the peer is ``site``; its HELLO must say the same."""
        self.site = site

    def refuse(self, error: ProtocolError) -> list[ServerEvent]:
        """Refuse the peer (no certificate, not a site of the study, no HELLO in time...): REFUSE, then close."""
        body = error_body(error)
        self._outgoing += to_frames(Message(MessageType.REFUSE, body=body))
        self._close(body["code"], body["reason"])
        return [Refused(ErrorCode(body["code"]), body["reason"])]

    def receive(self, frame: Frame) -> list[ServerEvent]:
        """The events one received frame causes (none while a chunked message is incomplete)."""
        if self.state is ServerState.CLOSED:
            return []
        try:
            message = self._reassembler.feed(_binary(frame))
        except ProtocolError as exc:
            return self.refuse(exc) if self.state is ServerState.AWAITING_HELLO else self._broken(exc)
        if self.state is ServerState.AWAITING_HELLO:
            return self._hello(message)
        return [] if message is None else self._message(message)

    def data_to_send(self) -> list[bytes]:
        """The frames queued since the last call, in order."""
        frames, self._outgoing = self._outgoing, []
        return frames

    def _hello(self, hello: Message | None) -> list[ServerEvent]:
        if hello is None or hello.type is not MessageType.HELLO:
            return self.refuse(BadMessage("the first message must be a whole HELLO"))
        if self.site is None or hello.site != self.site:
            return self.refuse(UnknownSite(f"HELLO names site {hello.site!r} but the certificate is {self.site!r}"))
        try:
            version = negotiate(hello.body["versions"])
        except VersionMismatch as exc:
            return self.refuse(exc)
        self.state = ServerState.OPEN
        body: dict[str, Any] = {"version": version, "rounds": self.rounds}
        if self.settings is not None:
            body["config"] = self.settings
        self._outgoing += to_frames(Message(MessageType.WELCOME, site=self.site, body=body))
        return [Joined(self.site, version)]

    def _message(self, message: Message) -> list[ServerEvent]:
        if message.type is MessageType.UPDATE:
            if message.site != self.site:
                return self._leave(f"UPDATE signed as {message.site!r}")
            return [UpdateReceived(_update_from(self.site, message), int(message.round))]
        if message.type in SECURE_FROM_SITES:
            if message.site != self.site:
                return self._leave(f"{message.type.name} signed as {message.site!r}")
            return [SecureReceived(message)]
        if message.type is MessageType.RESULT:
            return [ResultReceived({case: float(dice) for case, dice in message.body["case_dice"].items()})]
        if message.type is MessageType.ERROR and message.body["code"] == ErrorCode.TRAINING_FAILED:
            if message.round is None:
                return self._broken(BadMessage("a TRAINING_FAILED error must name its round"))
            return [TrainingFailed(int(message.round), message.body["reason"] or "no reason given")]
        if message.type is MessageType.ERROR:
            reason = message.body["reason"] or ErrorCode(message.body["code"]).name
            return self._leave(f"site reported an error: {reason}")
        if message.type is MessageType.HEARTBEAT:
            return []
        return [Ignored(message.type)]

    def _broken(self, error: ProtocolError) -> list[ServerEvent]:
        self._outgoing += to_frames(Message(MessageType.ERROR, body=error_body(error)))
        self._close(int(error_code(error)), str(error))
        return [SiteLeft(f"protocol error: {error}")]

    def _leave(self, reason: str) -> list[ServerEvent]:
        self._close(NORMAL_CLOSURE, "")
        return [SiteLeft(reason)]

    def _close(self, code: int, reason: str) -> None:
        self.state = ServerState.CLOSED
        self.close_code, self.close_reason = code, reason


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


# ----------------------------------------------------------------- messages to every site


def train_frames(round_: int, weights: Weights, epochs: int) -> list[bytes]:
    """TRAIN round ``round_`` from the global ``weights`` for ``epochs`` local epochs."""
    return to_frames(Message(MessageType.TRAIN, round=round_, body={"epochs": epochs}, tensors=weights))


def model_frames(name: str, round_: int, weights: Weights, val_dice: float) -> list[bytes]:
    """MODEL ``"final"`` or ``"best"``: the global model of ``round_`` and its validation Dice (final: aggregated; best: the median site Dice that chose it)."""
    body = {"model": name, "val_dice": _dice(val_dice)}
    return to_frames(Message(MessageType.MODEL, round=round_, body=body, tensors=weights))


def evaluate_frames(round_: int, model: str = "final") -> list[bytes]:
    """EVALUATE naming a model the site received in a MODEL message."""
    return to_frames(Message(MessageType.EVALUATE, round=round_, body={"model": model}))


def done_frames(rounds: int, best_round: int | None = None, best_dice: float | None = None) -> list[bytes]:
    """DONE after ``rounds`` rounds, naming the best round when there is one."""
    body: dict[str, Any] = {"rounds": rounds}
    if best_round is not None and best_round >= 0 and best_dice is not None:
        body.update(best_round=int(best_round), best_dice=_dice(best_dice))
    return to_frames(Message(MessageType.DONE, body=body))


def error_frames(code: ErrorCode, reason: str, round_: int | None = None) -> list[bytes]:
    """ERROR with ``code`` and ``reason`` (e.g. REJECTED_UPDATE for one round, STUDY_FAILED for all)."""
    return to_frames(Message(MessageType.ERROR, round=round_, body=error_body(code, reason)))


# =========================================================================== site side


class SiteState(IntEnum):
    IDLE = 0  # not connected
    HELLO_SENT = 1
    JOINED = 2
    DONE = 3
    FAILED = 4


@dataclass(frozen=True)
class Welcomed:
    """The server accepted this site (and its settings match the server's)."""

    version: int
    rounds: int | None


@dataclass(frozen=True)
class TrainRequested:
    """Train round ``round`` from the global ``weights``; answer with :meth:`SiteSession.send_update`."""

    round: int
    weights: Weights
    epochs: int


@dataclass(frozen=True)
class ModelReceived:
    """The ``"final"`` or ``"best"`` global model, at the end of the study."""

    name: str
    round: int | None
    weights: Weights
    val_dice: float | None


@dataclass(frozen=True)
class EvaluateRequested:
    """Test ``weights`` (the ``model`` named) on the held-out cases; answer with :meth:`SiteSession.send_result`."""

    round: int | None
    model: str
    weights: Weights


@dataclass(frozen=True)
class UpdateRefused:
    """The server rejected this site's update of ``round``; the site stays in the study."""

    round: int | None
    reason: str


@dataclass(frozen=True)
class Done:
    """The study is over; ``weights`` is the final global model (empty if none was sent)."""

    rounds: int | None
    weights: Weights


@dataclass(frozen=True)
class ServerError:
    """The session cannot go on: the server refused or ended it, broke the protocol, or its settings differ."""

    reason: str


@dataclass(frozen=True)
class EvaluationRepeated:
    """The server asked again to evaluate the same model with the same weights: the first RESULT was sent again."""

    model: str


@dataclass(frozen=True)
class SecureStep:
    """A secure-aggregation step of ``round`` took place at this site (for the log): ``what`` it was."""

    round: int
    what: str


@dataclass(frozen=True)
class SecureRoundAbandoned:
    """This site left round ``round``'s secure aggregation (``reason``) and told the server; it stays in the study."""

    round: int
    reason: str


@dataclass(frozen=True)
class ConnectionDropped:
    """The connection closed before DONE for a reason worth reconnecting over."""

    reason: str


SiteEvent = (
    Welcomed | TrainRequested | ModelReceived | EvaluateRequested | EvaluationRepeated | UpdateRefused | Done
    | ServerError | SecureStep | SecureRoundAbandoned | Ignored
)


@dataclass(frozen=True)
class SiteLimits:
    """What this site agrees to do, from its own study.toml: a server asking for more is refused.

    Attributes:
        epochs_per_round: most local epochs one TRAIN may ask for.
        rounds: the study's number of rounds; a TRAIN for round >= this is refused.
    """

    epochs_per_round: int | None = None
    rounds: int | None = None


def local_problem(update: LocalUpdate) -> str | None:
    """Why this site's own update must not leave (its training diverged...), or None when it may."""
    dice = update.val_dice
    if not (isinstance(dice, int | float) and math.isfinite(dice) and 0.0 <= dice <= 1.0):
        return f"validation Dice is {dice!r}, not a number in [0, 1] (no validation case, or training diverged)"
    if update.num_samples < 1:
        return f"num_samples is {update.num_samples}"
    bad = [
        name
        for name, array in update.weights.items()
        if np.issubdtype(np.asarray(array).dtype, np.floating) and not np.isfinite(array).all()
    ]
    if bad:
        return f"non-finite weights (NaN or inf) in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: training diverged"
    return None


def weights_digest(weights: Weights) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.require(weights[name], requirements="C")
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def pseudonymise(case_dice: dict[str, float]) -> dict[str, float]:
    """``case-001``, ``case-002``… in the evaluator's order: case names may identify patients."""
    return {f"case-{i:03d}": dice for i, dice in enumerate(case_dice.values(), start=1)}


def audit_record(message: Message, frames: Sequence[bytes], server: str) -> dict[str, Any]:
    """One audit line (the shell adds the time): everything a message carries off the site but tensor values.

    ``sha256`` is over the exact bytes sent (every frame, in order), so a copy
    captured in transit can be matched to this line.
    """
    scalars = {key: value for key, value in message.body.items() if key != "metrics"}
    scalars.update(message.body.get("metrics", {}))
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(frame)
    return {
        "server": server,
        "round": message.round,
        "site": message.site,
        "message": message.type.value,
        "bytes_sent": sum(len(frame) for frame in frames),
        "sha256": digest.hexdigest(),
        "tensors": sorted(message.tensors),
        "scalars": scalars,
    }


def _server_error(message: Message) -> str:
    code = ErrorCode(message.body["code"])
    verb = "refused the connection" if message.type is MessageType.REFUSE else "ended the session"
    reason = message.body["reason"] or "no detail given; see the server log"
    return f"server {verb}: {reason} ({code.name} {int(code)})"


def _copy(tensors: Any) -> Weights:
    return {name: np.array(array) for name, array in tensors.items()}


class SiteSession:
    """A site's end of the study, across reconnections: HELLO, then the server's messages as events.

    Call :meth:`connect` on every new connection, feed each frame to
    :meth:`receive`, answer :class:`TrainRequested` with :meth:`send_update` and
    :class:`EvaluateRequested` with :meth:`send_result`, and send
    :meth:`data_to_send` after each call. The models received at the end are
    kept here (:attr:`models`), so an EVALUATE may name one after a reconnection.

    Every message queued is also audited: :meth:`audit_to_write` returns one
    record per message (with the SHA-256 of its frames), to be written before
    the frames are sent.

    The site defends itself against its server: a TRAIN asking for more local
    epochs or a later round than ``limits`` allow ends the session; each model
    is evaluated once per study — asked again with the same weights (a
    reconnection during the final step) the first RESULT is sent again, asked
    with other weights (an oracle on this site's test labels) the session ends.

    Args:
        site: this site's name (its certificate identity).
        settings: this site's study settings; a WELCOME with others ends the session.
        share_case_names: send case names with the test Dice instead of ``case-001``….
        server: how the audit log names the server (its URL).
        limits: what this site agrees to train (from its own study.toml).
        secure: secure aggregation's settings (from its own study.toml), or None when off.
        credentials: this site's certificate key and certificate and the study CA (needed with ``secure``).
    """

    def __init__(
        self,
        site: str,
        *,
        settings: dict[str, Any] | None = None,
        share_case_names: bool = False,
        server: str = "",
        limits: SiteLimits | None = None,
        secure: SecureSettings | None = None,
        credentials: Credentials | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if secure is not None and credentials is None:
            raise FedsegError("secure aggregation needs this site's credentials (its certificate key and the study CA)")
        self.site = site
        self.secure = secure
        self.credentials = credentials
        self._secure_round: SiteSecureRound | None = None
        self._waiting_update: LocalUpdate | None = None  # trained before the shares were dealt
        self.settings = settings
        self.share_case_names = share_case_names
        self.server = server
        self.limits = limits or SiteLimits()
        self.state = SiteState.IDLE
        self.models: dict[str, Weights] = {}
        self.joined = 0  # WELCOMEs received: a connection that got one was not a failed attempt
        self._limits = (max_message, max_frame)
        self._reassembler = Reassembler(max_message, max_frame=max_frame)
        self._outgoing: list[bytes] = []
        self._audit: list[dict[str, Any]] = []
        self._evaluated: dict[str, tuple[str, Message | None]] = {}  # model -> (weights digest, the RESULT sent)

    # ---------------------------------------------------------------- connection

    def connect(self) -> None:
        """A new connection is open: forget any half-received message and queue the HELLO."""
        self._reassembler = Reassembler(self._limits[0], max_frame=self._limits[1])
        self._outgoing = []
        self._queue(Message(MessageType.HELLO, site=self.site, body={"versions": [PROTOCOL_VERSION]}))
        self.state = SiteState.HELLO_SENT

    def closed(self, code: int | None, reason: str | None) -> ServerError | ConnectionDropped:
        """The connection closed before DONE: fatal under one of fedseg's own codes, else worth a retry."""
        if self.state not in (SiteState.DONE, SiteState.FAILED):
            self.state = SiteState.IDLE
        if code is not None and code in CODE_VALUES:
            return ServerError(f"server closed the connection: {reason or ErrorCode(code).name} ({int(code)})")
        return ConnectionDropped(f"connection closed before the study ended (code {code}, {reason or 'no reason'})")

    def data_to_send(self) -> list[bytes]:
        """The frames queued since the last call, in order."""
        frames, self._outgoing = self._outgoing, []
        return frames

    def audit_to_write(self) -> list[dict[str, Any]]:
        """One audit record per message queued since the last call (write them before sending the frames)."""
        records, self._audit = self._audit, []
        return records

    # ---------------------------------------------------------------- incoming

    def receive(self, frame: Frame) -> list[SiteEvent]:
        """The events one received frame causes (none while a chunked message is incomplete)."""
        if self.state in (SiteState.IDLE, SiteState.DONE, SiteState.FAILED):
            return []
        try:
            message = self._reassembler.feed(_binary(frame))
            return [] if message is None else self._message(message)
        except ProtocolError as exc:
            self._queue(Message(MessageType.ERROR, body=error_body(exc)))
            return self._fail(f"the server broke the protocol: {exc}")

    def _message(self, message: Message) -> list[SiteEvent]:
        kind = message.type
        if kind is MessageType.ERROR and message.body["code"] == ErrorCode.REJECTED_UPDATE:
            # not fatal: the round goes on without this site, and the next TRAIN asks it again
            return [UpdateRefused(message.round, message.body["reason"] or "no reason given")]
        if kind in (MessageType.REFUSE, MessageType.ERROR):
            return self._fail(_server_error(message))
        if kind is MessageType.WELCOME:
            return self._welcome(message)
        if kind is MessageType.HEARTBEAT:
            return []
        if self.state is not SiteState.JOINED:
            raise BadMessage(f"the server sent {kind.name} before WELCOME")
        if kind is MessageType.TRAIN:
            return [self._train(message)]
        if kind is MessageType.MODEL:
            return [self._model(message)]
        if kind is MessageType.EVALUATE:
            return [self._evaluate(message)]
        if kind in SECURE_FROM_SERVER:
            return self._secure_step(message)
        if kind is MessageType.DONE:
            self.state = SiteState.DONE
            return [Done(message.body.get("rounds"), self.models.get("final", {}))]
        return [Ignored(kind)]

    def _welcome(self, message: Message) -> list[SiteEvent]:
        """Refuse to train with settings other than the server's: the update would be rejected or, worse, blend in."""
        theirs = message.body.get("config")
        differences = settings_differences(self.settings, theirs) if self.settings is not None and isinstance(theirs, dict) else []
        if differences:
            shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
            reason = f"this site's study settings differ from the server's: {shown}"
            self._queue(Message(MessageType.ERROR, body=error_body(ErrorCode.SETTINGS_MISMATCH, reason)))
            return self._fail(f"{reason}. Use the study's study.toml and --fold")
        self.state = SiteState.JOINED
        self.joined += 1
        return [Welcomed(message.body["version"], message.body.get("rounds"))]

    def _model(self, message: Message) -> ModelReceived:
        name = message.body["model"]
        self.models[name] = weights = _copy(message.tensors)
        return ModelReceived(name, message.round, weights, message.body.get("val_dice"))

    def _train(self, message: Message) -> TrainRequested:
        if "iterations" in message.body:
            raise BadMessage("this client trains whole local epochs per round, not iterations")
        epochs, limits = int(message.body.get("epochs", 1)), self.limits
        if limits.epochs_per_round is not None and epochs > limits.epochs_per_round:
            raise BadMessage(f"TRAIN asks for {epochs} local epochs; this site's study.toml allows {limits.epochs_per_round}")
        if limits.rounds is not None and message.round >= limits.rounds:
            raise BadMessage(f"TRAIN for round {message.round}; this site's study.toml has {limits.rounds} rounds")
        if self.secure is not None:
            assert self.credentials is not None
            # the round keys go out before the epoch starts: the key exchange overlaps the training
            self._secure_round = SiteSecureRound(self.site, message.round, self.secure, self.credentials, dict(message.tensors))
            self._waiting_update = None
            self._queue(self._secure_round.keys_message())
        return TrainRequested(message.round, dict(message.tensors), epochs)

    def _secure_step(self, message: Message) -> list[SiteEvent]:
        """ROSTER, DEALT or UNMASK of the round this site is training; a secure-aggregation refusal drops the round only."""
        current = self._secure_round
        if current is None or message.round != current.round:
            raise BadMessage(f"{message.type.name} for round {message.round}, which this site is not aggregating")
        try:
            if message.type is MessageType.ROSTER:
                self._queue(current.on_roster(message))
                return [SecureStep(current.round, f"checked the keys of {len(current.roster)} site(s); dealt its shares")]
            if message.type is MessageType.DEALT:
                current.on_dealt(message)
                events: list[SiteEvent] = [SecureStep(current.round, f"holds the shares of {len(current.dealers)} site(s)")]
                if self._waiting_update is not None:
                    events += self._send_masked(current, self._waiting_update)
                return events
            self._queue(current.on_unmask(message))
            self._secure_round = None  # its secrets are gone
            survivors = len(message.body["survivors"])
            return [SecureStep(current.round, f"revealed the shares that unmask the sum of {survivors} site(s)")]
        except SecAggError as exc:
            return self._abandon(current.round, exc.reason)

    def secure_round_open(self, round_: int) -> bool:
        """This site is securely aggregating ``round_`` (it has not abandoned it)."""
        return self._secure_round is not None and self._secure_round.round == round_ and self.state is SiteState.JOINED

    def secure_round_waiting_roster(self, round_: int) -> bool:
        """``round_``'s round keys are out and its ROSTER has not come yet."""
        return self.secure_round_open(round_) and not self._secure_round.roster  # type: ignore[union-attr]

    def _abandon(self, round_: int, reason: str) -> list[SiteEvent]:
        self._secure_round, self._waiting_update = None, None
        self.send_training_failed(round_, f"secure aggregation: {reason}")
        return [SecureRoundAbandoned(round_, reason)]

    def _send_masked(self, current: SiteSecureRound, update: LocalUpdate) -> list[SiteEvent]:
        self._waiting_update = None
        message, clip = current.masked_message(update.weights, update.num_samples, update.val_dice)
        record = self._queue(message)
        record["secure_aggregation"] = clip.record()
        what = f"sent its masked update ({record['bytes_sent']} bytes{'; its change was clipped' if clip.clipped else ''})"
        return [SecureStep(current.round, what)]

    def _evaluate(self, message: Message) -> EvaluateRequested | EvaluationRepeated:
        name = message.body["model"]
        weights = _copy(message.tensors) if message.tensors else self.models.get(name)
        if weights is None:
            raise BadMessage(f"EVALUATE names the {name} model, which the server never sent")
        digest = weights_digest(weights)
        if name in self._evaluated:
            first_digest, result = self._evaluated[name]
            if digest != first_digest:
                raise BadMessage(
                    f"EVALUATE of the {name} model again, with other weights: each model is evaluated once per "
                    "study (repeated evaluations would reveal this site's test labels)"
                )
            if result is not None:
                self._queue(result)
                return EvaluationRepeated(name)
        self._evaluated[name] = (digest, None)  # the RESULT comes with send_result
        return EvaluateRequested(message.round, name, weights)

    def _fail(self, reason: str) -> list[SiteEvent]:
        self.state = SiteState.FAILED
        return [ServerError(reason)]

    # ---------------------------------------------------------------- outgoing

    def send_update(self, round_: int, update: LocalUpdate) -> dict[str, Any] | None:
        """Queue the UPDATE for ``round_``; returns its audit record.

        Under secure aggregation the update is masked once the shares are dealt
        (now, or when DEALT arrives: then None is returned and the MASKED message's
        record comes with that step); a round this site abandoned sends nothing.

        Raises:
            FedsegError: the update cannot be sent as it is (e.g. its validation Dice is NaN: no validation cases).
        """
        if self.secure is not None:
            return self._send_secure_update(round_, update)
        body = {
            "num_samples": int(update.num_samples),
            "val_dice": float(update.val_dice),
            "metrics": {key: float(value) for key, value in update.metrics.items()},
        }
        try:
            message = Message(MessageType.UPDATE, round=round_, site=self.site, body=body, tensors=update.weights)
        except BadMessage as exc:
            raise FedsegError(f"round {round_}: this site's update cannot be sent: {exc}") from exc
        return self._queue(message)

    def _send_secure_update(self, round_: int, update: LocalUpdate) -> dict[str, Any] | None:
        current = self._secure_round
        if current is None or current.round != round_:
            return None  # this site left the round's secure aggregation (the server was told)
        if not current.ready:
            self._waiting_update = update
            return None
        self._send_masked(current, update)
        return self._audit[-1]

    def send_training_failed(self, round_: int, reason: str) -> dict[str, Any]:
        """Tell the server this site could not train ``round_`` (it stays in the study); returns the audit record."""
        if self._secure_round is not None and self._secure_round.round == round_:
            self._secure_round, self._waiting_update = None, None
        return self._queue(Message(MessageType.ERROR, round=round_, body=error_body(ErrorCode.TRAINING_FAILED, reason)))

    def send_result(self, round_: int | None, model: str, case_dice: dict[str, float] | None) -> dict[str, Any]:
        """Queue the RESULT (per-case Dice only, pseudonymised unless ``share_case_names``); returns its audit record."""
        scores = dict(case_dice or {})
        shared = scores if self.share_case_names else pseudonymise(scores)
        message = Message(MessageType.RESULT, round=round_, site=self.site, body={"model": model, "case_dice": shared})
        if model in self._evaluated:
            self._evaluated[model] = (self._evaluated[model][0], message)
        return self._queue(message)

    def _queue(self, message: Message) -> dict[str, Any]:
        """Queue ``message``'s frames and its audit record; returns the record."""
        frames = to_frames(message)
        self._outgoing += frames
        record = audit_record(message, frames, self.server)
        self._audit.append(record)
        return record
