"""The protocol's exceptions, the one table that turns them into :class:`ErrorCode`, and the one ERROR/REFUSE body builder.

Exceptions, each mapped to one :class:`ErrorCode` by :func:`error_code`::

    FedsegError
    └── ProtocolError          the peer broke the protocol
        ├── BadMessage         malformed frame, header, body or payload  -> BAD_MESSAGE
        ├── MessageTooBig      frame or message over its size limit      -> TOO_BIG
        ├── VersionMismatch    header "v" is not PROTOCOL_VERSION        -> VERSION_MISMATCH
        └── UnknownSite        peer identity is not a site of the study  -> UNKNOWN_SITE
    strategies.UpdateRejected  an UPDATE failed validate_update          -> REJECTED_UPDATE
    anything else              a bug or local failure                    -> INTERNAL (no detail)

Three codes have no exception: SETTINGS_MISMATCH (a site refuses the server's
study settings), STUDY_FAILED (the server lost its quorum) and TRAINING_FAILED
(a site could not train one round, e.g. a NaN loss: it stays in the study);
their bodies come from :func:`error_body` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from fedseg.errors import FedsegError
from fedseg.federation.protocol.constants import MAX_TEXT, PROTOCOL_VERSION
from fedseg.federation.strategies import UpdateRejected

__all__ = [
    "BadMessage",
    "ErrorCode",
    "MessageTooBig",
    "ProtocolError",
    "UnknownSite",
    "VersionMismatch",
    "error_body",
    "error_code",
]


class ProtocolError(FedsegError):
    """The peer broke fedseg's protocol; the connection should be closed."""


class BadMessage(ProtocolError):
    """A frame, header, body or payload is malformed or breaks its schema."""


class MessageTooBig(ProtocolError):
    """A frame or a reassembled message exceeds its configured size limit."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version; the message names both."""

    def __init__(self, peer: int | Sequence[int]) -> None:
        self.peer = peer
        spoken = peer if isinstance(peer, int) else ", ".join(map(str, peer)) or "no version"
        super().__init__(f"peer speaks protocol {spoken}, this fedseg speaks {PROTOCOL_VERSION}")


class UnknownSite(ProtocolError):
    """The peer's identity is not a site of this study."""


class ErrorCode(IntEnum):
    """Why a peer is refused or a session ends; sent in REFUSE and ERROR bodies.

    Values are 4000 + an HTTP-like status, inside WebSocket's private close
    code range (4000-4999), so a transport may also use them as close codes.
    """

    BAD_MESSAGE = 4400
    UNKNOWN_SITE = 4403
    SETTINGS_MISMATCH = 4412  # a site's study settings differ from the server's
    TOO_BIG = 4413
    STUDY_FAILED = 4409  # quorum lost; the reason gives counts, never other sites' names
    REJECTED_UPDATE = 4422
    TRAINING_FAILED = 4424  # a site's round failed locally (NaN...); not fatal, it stays in the study
    INTERNAL = 4500  # carries no detail: details may be sensitive
    VERSION_MISMATCH = 4505


CODE_VALUES = frozenset(int(code) for code in ErrorCode)

# The one place where exceptions become codes; the first match wins.
_ERROR_CODES: tuple[tuple[type[BaseException], ErrorCode], ...] = (
    (VersionMismatch, ErrorCode.VERSION_MISMATCH),
    (MessageTooBig, ErrorCode.TOO_BIG),
    (UnknownSite, ErrorCode.UNKNOWN_SITE),
    (UpdateRejected, ErrorCode.REJECTED_UPDATE),
    (BadMessage, ErrorCode.BAD_MESSAGE),
    (ProtocolError, ErrorCode.BAD_MESSAGE),
)


def error_code(exc: BaseException) -> ErrorCode:
    """The code to send for ``exc``; anything outside the table is INTERNAL."""
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def error_body(error: BaseException | ErrorCode, reason: str = "") -> dict[str, Any]:
    """The body of an ERROR or REFUSE message.

    ``error`` is an exception (its code from :func:`error_code`, its text the
    reason) or a code with ``reason``. An INTERNAL error carries no reason:
    details may be sensitive. Reasons are cut to MAX_TEXT characters.
    """
    if isinstance(error, BaseException):
        code, reason = error_code(error), str(error)
    else:
        code = ErrorCode(error)
    return {"code": int(code), "reason": "" if code is ErrorCode.INTERNAL else reason[:MAX_TEXT]}
