"""fedseg's wire format: bytes in, validated messages out, and back.

This module owns no socket, no event loop and no clock (like websockets'
protocol core): the transport hands it the bytes of one WebSocket binary
message and gets a :class:`Message` back, or a :class:`ProtocolError` that
:func:`error_code` turns into the code to send. It imports neither torch nor
pickle: tensors are numpy arrays, serialised with safetensors.

Frame (one WebSocket binary message)::

    offset 0        4              8                 8+H                    end
           +--------+--------------+-----------------+----------------------+
           | "FSG1" | H (uint32 BE)| header: H bytes |       payload        |
           +--------+--------------+-----------------+----------------------+
             magic   header length   UTF-8 JSON       safetensors bytes, or
                                     object           empty; for CHUNK a
                                                      slice of another frame

Header (keys exactly these; "round" and "site" may be null)::

    {"v": 1, "type": "UPDATE", "round": 3, "site": "nci",
     "body": {"num_samples": 40, "val_dice": 0.87, "metrics": {"loss": 0.21}}}

Each :class:`MessageType` has a schema (:data:`_SCHEMAS`): whether "round",
"site" and tensors are required, optional or forbidden, and the required and
optional body keys with their JSON types. Unknown keys are refused, floats
must be finite, strings and collections are bounded.

Exceptions, each mapped to one :class:`ErrorCode` by :func:`error_code`::

    FedsegError
    └── ProtocolError          the peer broke the protocol
        ├── BadMessage         malformed frame, header, body or payload  -> BAD_MESSAGE
        ├── MessageTooBig      frame or message over its size limit      -> TOO_BIG
        ├── VersionMismatch    header "v" is not PROTOCOL_VERSION        -> VERSION_MISMATCH
        └── UnknownSite        peer identity is not a site of the study  -> UNKNOWN_SITE
    strategies.UpdateRejected  an UPDATE failed validate_update          -> REJECTED_UPDATE
    anything else              a bug or local failure                    -> INTERNAL (no detail)

Sizes: a frame received is at most ``max_frame`` bytes (:data:`DEFAULT_MAX_FRAME`);
a frame sent at most :data:`DEFAULT_SEND_FRAME`; a larger message is cut by
:func:`split` into CHUNK frames carrying slices of
its encoding, and :class:`Reassembler` joins them up to ``max_total`` bytes
(:data:`DEFAULT_MAX_MESSAGE`). Tensor *values* (NaN, shapes against the
global model) are checked by the layer that knows the model, not here.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

import numpy as np
import safetensors.numpy

from fedseg.errors import FedsegError
from fedseg.federation.protocol.names import SITE_NAME_HELP, SITE_PATTERN, is_site_name
from fedseg.federation.strategies import UpdateRejected

PROTOCOL_VERSION = 1
MAGIC = b"FSG1"
PREFIX = struct.Struct(">4sI")  # magic, header length

MiB = 1 << 20
# One frame: small and mid-sized models travel whole; the per-frame memory a
# peer can force on us stays bounded (received frames; see DEFAULT_SEND_FRAME for sent ones).
DEFAULT_MAX_FRAME = 64 * MiB
# What we send is cut smaller than what we accept: a frame being sent is held
# (framed, then encrypted) in the connection's buffers until the peer reads it,
# and the server sends the global model to every site at once -- with 64 MiB
# frames that was ~2 x 64 MiB per connection (~130 MB more per site at 32
# sites). 1 MiB keeps it to a few MiB per site (benchmarks/aggregation_memory.py:
# server peak at 32 sites 1.14 x that at 3, vs 1.25 x with 4 MiB and 2.65 x with
# 64 MiB); CHUNK costs 512 B per MiB (0.05 %).
DEFAULT_SEND_FRAME = 1 * MiB
# One (reassembled) message: the 38 M-parameter AH-Net in fp32 is
# 38e6 x 4 B ~ 152 MB (145 MiB) plus a small header; 1 GiB leaves room for
# fp64 weights or a network several times larger.
DEFAULT_MAX_MESSAGE = 1024 * MiB

MAX_HEADER = 1 * MiB  # JSON header of one frame
MAX_TENSOR_HEADER = 16 * MiB  # safetensors' own JSON header
MAX_TENSORS = 16_384
MAX_NAME = 256  # site names, tensor names, dict keys
MAX_TEXT = 4096  # free text such as "reason"
MAX_ITEMS = 100_000  # entries of one JSON list or object
MAX_DEPTH = 8  # nesting of free-form "config" objects
MAX_INT = 2**63 - 1
CHUNK_OVERHEAD = 512  # bytes a CHUNK frame adds around its slice (~170 used)

_HEADER_KEYS = frozenset({"v", "type", "round", "site", "body"})
# safetensors dtype codes accepted on the wire: plain ints and IEEE floats.
_TENSOR_DTYPES = frozenset({"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


# --------------------------------------------------------------------------- errors


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
    INTERNAL = 4500  # carries no detail: details may be sensitive
    VERSION_MISMATCH = 4505


_CODE_VALUES = frozenset(int(code) for code in ErrorCode)

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


def negotiate(offered: Sequence[int]) -> int:
    """The version to speak with a peer that offered ``offered`` (from HELLO).

    Raises:
        VersionMismatch: PROTOCOL_VERSION is not among ``offered``.
    """
    if PROTOCOL_VERSION not in offered:
        raise VersionMismatch(offered)
    return PROTOCOL_VERSION


# --------------------------------------------------------------------------- field checks

Check = Callable[[str, Any], None]


def _show(value: Any) -> str:
    """A short repr of peer-supplied data for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)  # bool is not a number here


def _int(lo: int = 0) -> Check:
    def check(path: str, value: Any) -> None:
        if type(value) is not int or not lo <= value <= MAX_INT:
            raise BadMessage(f"{path} must be an integer >= {lo}, got {_show(value)}")

    return check


def _float(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> Check:
    def check(path: str, value: Any) -> None:
        ok = _is_number(value) and math.isfinite(value) and lo <= value <= hi
        if not ok or (open_lo and value == lo):
            raise BadMessage(
                f"{path} must be a finite number in {'(' if open_lo else '['}{lo}, {hi}], got {_show(value)}"
            )

    return check


def _text(max_len: int = MAX_TEXT) -> Check:
    def check(path: str, value: Any) -> None:
        if not isinstance(value, str) or len(value) > max_len:
            raise BadMessage(f"{path} must be a string of at most {max_len} characters, got {_show(value)}")

    return check


def _name(path: str, value: Any) -> None:
    """Keys and tensor names: non-empty, printable, bounded."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise BadMessage(f"{path} must be a printable name of 1..{MAX_NAME} characters, got {_show(value)}")


def _site(path: str, value: Any) -> None:
    if not is_site_name(value):
        raise BadMessage(f"{path} must be a site name ({SITE_NAME_HELP}), got {_show(value)}")


def _scores(value_check: Check) -> Check:
    """A JSON object {name: number}, e.g. metrics or per-case Dice."""

    def check(path: str, value: Any) -> None:
        if not isinstance(value, dict) or len(value) > MAX_ITEMS:
            raise BadMessage(f"{path} must be an object of at most {MAX_ITEMS} entries, got {_show(value)}")
        for key, item in value.items():
            _name(f"{path} key", key)
            value_check(f"{path}.{key}", item)

    return check


def _versions(path: str, value: Any) -> None:
    if not isinstance(value, list) or not 0 < len(value) <= 16:
        raise BadMessage(f"{path} must be a list of 1..16 versions, got {_show(value)}")
    for i, item in enumerate(value):
        _int(1)(f"{path}[{i}]", item)


def _code(path: str, value: Any) -> None:
    if type(value) is not int or value not in _CODE_VALUES:
        raise BadMessage(f"{path} must be one of {sorted(_CODE_VALUES)}, got {_show(value)}")


def _json(path: str, value: Any, depth: int = 0) -> None:
    """Free-form JSON (e.g. "config"): bounded, finite, string keys only."""
    if depth > MAX_DEPTH:
        raise BadMessage(f"{path} nests deeper than {MAX_DEPTH} levels")
    if value is None or type(value) is bool:
        return
    if type(value) is int:
        if abs(value) > MAX_INT:
            raise BadMessage(f"{path} is out of the 64-bit range")
    elif type(value) is float:
        _float()(path, value)
    elif isinstance(value, str):
        _text()(path, value)
    elif isinstance(value, list) and len(value) <= MAX_ITEMS:
        for i, item in enumerate(value):
            _json(f"{path}[{i}]", item, depth + 1)
    elif isinstance(value, dict) and len(value) <= MAX_ITEMS:
        for key, item in value.items():
            _name(f"{path} key", key)
            _json(f"{path}.{key}", item, depth + 1)
    else:
        raise BadMessage(f"{path} is not bounded JSON: {_show(value)}")


def _one_of(*choices: str) -> Check:
    def check(path: str, value: Any) -> None:
        if value not in choices:
            raise BadMessage(f"{path} must be one of {list(choices)}, got {_show(value)}")

    return check


def _uuid_hex(path: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise BadMessage(f"{path} must be 32 lowercase hex digits, got {_show(value)}")


# --------------------------------------------------------------------------- schemas


class MessageType(Enum):
    """What a frame means; the header's "type" is the member's name."""

    HELLO = "HELLO"  # site -> server: who I am, which versions I speak
    WELCOME = "WELCOME"  # server -> site: accepted, agreed version, study settings
    REFUSE = "REFUSE"  # server -> site during the handshake: code + reason
    TRAIN = "TRAIN"  # server -> site: global weights, train one round
    UPDATE = "UPDATE"  # site -> server: local weights + num_samples + val_dice
    MODEL = "MODEL"  # server -> site at the end: the final or the best global model
    EVALUATE = "EVALUATE"  # server -> site: test a model (sent, or named) on the held-out set
    RESULT = "RESULT"  # site -> server: per-case Dice of an EVALUATE
    HEARTBEAT = "HEARTBEAT"  # either way, independent of training
    ERROR = "ERROR"  # either way: the session ends, code + reason
    DONE = "DONE"  # server -> site: the study is over
    CHUNK = "CHUNK"  # a slice of a message too big for one frame


class Need(Enum):
    """Whether a header field or the tensors must, may or must not be present."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class _Schema:
    round: Need
    site: Need
    tensors: Need
    required: Mapping[str, Check] = field(default_factory=dict)
    optional: Mapping[str, Check] = field(default_factory=dict)
    rule: Callable[[Mapping[str, Any]], None] | None = None  # cross-key check


def _no_internal_detail(body: Mapping[str, Any]) -> None:
    if body["code"] == ErrorCode.INTERNAL and body["reason"]:
        raise BadMessage("an INTERNAL error carries no reason: details may be sensitive")


def _epochs_or_iterations(body: Mapping[str, Any]) -> None:
    if "epochs" in body and "iterations" in body:
        raise BadMessage("TRAIN gives epochs or iterations per round, not both")


def _chunk_rule(body: Mapping[str, Any]) -> None:
    if not body["index"] < body["count"] <= body["total_bytes"]:
        raise BadMessage(
            f"CHUNK needs index < count <= total_bytes, got index {body['index']}, "
            f"count {body['count']}, total_bytes {body['total_bytes']}"
        )


R, O, F = Need.REQUIRED, Need.OPTIONAL, Need.FORBIDDEN
_ERROR_BODY = {"code": _code, "reason": _text()}
_METRICS = _scores(_float())
_MODEL_NAME = _one_of("final", "best")
_SCHEMAS: dict[MessageType, _Schema] = {
    MessageType.HELLO: _Schema(F, R, F, {"versions": _versions}, {"software": _text(MAX_NAME)}),
    MessageType.WELCOME: _Schema(
        O, O, F, {"version": _int(1)}, {"rounds": _int(), "heartbeat_s": _float(0, open_lo=True), "config": _json}
    ),
    MessageType.REFUSE: _Schema(F, O, F, _ERROR_BODY, rule=_no_internal_detail),
    MessageType.TRAIN: _Schema(
        R, O, R, {}, {"epochs": _int(1), "iterations": _int(1), "config": _json}, rule=_epochs_or_iterations
    ),
    MessageType.UPDATE: _Schema(R, R, R, {"num_samples": _int(1), "val_dice": _float(0.0, 1.0), "metrics": _METRICS}),
    MessageType.MODEL: _Schema(O, O, R, {"model": _MODEL_NAME}, {"val_dice": _float(0.0, 1.0)}),
    # without tensors, EVALUATE names a model the site received in a MODEL message
    MessageType.EVALUATE: _Schema(O, O, O, {"model": _MODEL_NAME}),
    MessageType.RESULT: _Schema(
        O, R, F, {"case_dice": _scores(_float(0.0, 1.0))}, {"model": _MODEL_NAME, "metrics": _METRICS}
    ),
    MessageType.HEARTBEAT: _Schema(O, O, F, {}, {"seq": _int()}),
    MessageType.ERROR: _Schema(O, O, F, _ERROR_BODY, rule=_no_internal_detail),
    MessageType.DONE: _Schema(O, O, F, {}, {"rounds": _int(), "best_round": _int(), "best_dice": _float(0.0, 1.0)}),
    MessageType.CHUNK: _Schema(
        F, F, F, {"id": _uuid_hex, "index": _int(), "count": _int(1), "total_bytes": _int(1)}, rule=_chunk_rule
    ),
}


def _check_need(what: str, present: bool, need: Need, type_: MessageType) -> None:
    if need is Need.REQUIRED and not present:
        raise BadMessage(f"{type_.name} needs {what}")
    if need is Need.FORBIDDEN and present:
        raise BadMessage(f"{type_.name} must not carry {what}")


def _check_fields(type_: MessageType, round_: Any, site: Any, body: Any) -> None:
    """Validate everything but the tensors against ``type_``'s schema.

    Raises:
        BadMessage: a field is missing, unknown, mistyped or out of range.
    """
    schema = _SCHEMAS[type_]
    _check_need("a round", round_ is not None, schema.round, type_)
    if round_ is not None:
        _int()("round", round_)
    _check_need("a site", site is not None, schema.site, type_)
    if site is not None:
        _site("site", site)
    if not isinstance(body, dict):
        raise BadMessage(f"body must be a JSON object, got {_show(body)}")
    missing = sorted(schema.required.keys() - body.keys())
    if missing:
        raise BadMessage(f"{type_.name} body lacks required key(s) {missing}")
    for key, value in body.items():
        check = schema.required.get(key) or schema.optional.get(key)
        if check is None:
            raise BadMessage(f"{type_.name} body has unknown key {_show(key)}")
        check(f"body.{key}", value)
    if schema.rule is not None:
        schema.rule(body)


def _check_tensors(type_: MessageType, tensors: Any) -> None:
    """Validate tensor presence, count, names and dtypes (not values).

    Raises:
        BadMessage: tensors are missing, forbidden, too many, badly named or
            not plain integer/float numpy arrays.
    """
    if not isinstance(tensors, Mapping):
        raise BadMessage(f"tensors must be a mapping of name to array, got {type(tensors).__name__}")
    _check_need("tensors", bool(tensors), _SCHEMAS[type_].tensors, type_)
    if len(tensors) > MAX_TENSORS:
        raise BadMessage(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    for name, array in tensors.items():
        _name("tensor name", name)
        if name == "__metadata__":
            raise BadMessage("'__metadata__' is reserved by safetensors")
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf" or array.dtype.itemsize > 8:
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise BadMessage(f"tensor {name!r} must be an integer or float numpy array, got {kind}")


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False, repr=False)
class Message:
    """One validated protocol message; construction checks it against its schema.

    ``body`` holds JSON values only; ``tensors`` maps names to numeric numpy
    arrays (safetensors on the wire). Treat both as read-only; :func:`encode`
    re-checks them anyway. Equality compares tensors by name, dtype, shape and
    values.

    Raises:
        BadMessage: the fields break the schema of ``type``, or ``type`` is
            CHUNK (chunks are made by :func:`split`, not by hand).
    """

    type: MessageType
    round: int | None = None
    site: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_message(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        same_fields = (self.type, self.round, self.site, self.body) == (other.type, other.round, other.site, other.body)
        return same_fields and _same_tensors(self.tensors, other.tensors)

    __hash__ = None  # type: ignore[assignment]  # holds dicts and arrays

    def __repr__(self) -> str:
        size = sum(a.nbytes for a in self.tensors.values())
        return (
            f"Message({self.type.name}, round={self.round}, site={self.site!r}, body={_show(self.body)}, "
            f"tensors={len(self.tensors)} ({size} bytes))"
        )


def _check_message(message: Message) -> None:
    if not isinstance(message.type, MessageType):
        raise BadMessage(f"type must be a MessageType, got {_show(message.type)}")
    if message.type is MessageType.CHUNK:
        raise BadMessage("CHUNK frames are made by split() and read by Reassembler, not built as messages")
    _check_fields(message.type, message.round, message.site, message.body)
    _check_tensors(message.type, message.tensors)


def _same_tensors(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
        for k in a
    )


def error_message(
    exc: BaseException,
    *,
    type: MessageType = MessageType.ERROR,
    round: int | None = None,
    site: str | None = None,
) -> Message:
    """An ERROR (or REFUSE) message for ``exc``: its code, and its text unless INTERNAL."""
    code = error_code(exc)
    reason = "" if code is ErrorCode.INTERNAL else str(exc)[:MAX_TEXT]
    if type is MessageType.REFUSE:
        round = None
    return Message(type, round, site, {"code": int(code), "reason": reason})


# --------------------------------------------------------------------------- encoding


def _frame(header: Mapping[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER:
        raise BadMessage(f"header of {len(raw)} bytes exceeds the limit of {MAX_HEADER}")
    return b"".join((PREFIX.pack(MAGIC, len(raw)), raw, payload))


def _header(type_: MessageType, round_: int | None, site: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": type_.value, "round": round_, "site": site, "body": body}


def encode(message: Message) -> bytes:
    """The frame for ``message``: prefix, JSON header, safetensors payload.

    The payload is empty when the message has no tensors. Arrays are written
    C-contiguous and little-endian whatever their memory layout.

    Raises:
        BadMessage: the message was mutated into something invalid.
    """
    _check_message(message)
    payload = b""
    if message.tensors:
        payload = safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in message.tensors.items()})
    return _frame(_header(message.type, message.round, message.site, message.body), payload)


def split(message: Message, chunk_size: int) -> list[bytes]:
    """Encode ``message`` and cut it into CHUNK frames of ``chunk_size`` payload bytes.

    Each frame is at most ``chunk_size + CHUNK_OVERHEAD`` bytes; all share one
    random message id. Feed them, in any order, to a :class:`Reassembler`.

    Raises:
        ValueError: ``chunk_size`` < 1.
        BadMessage: as :func:`encode`.
    """
    return _chunk_frames(encode(message), chunk_size)


def to_frames(message: Message, *, max_frame: int = DEFAULT_SEND_FRAME) -> list[bytes]:
    """The frames to send for ``message``: one if it fits ``max_frame``, else CHUNKs.

    Raises:
        ValueError: ``max_frame`` leaves no room beside CHUNK_OVERHEAD.
        BadMessage: as :func:`encode`.
    """
    if max_frame <= CHUNK_OVERHEAD:
        raise ValueError(f"max_frame must exceed CHUNK_OVERHEAD ({CHUNK_OVERHEAD}), got {max_frame}")
    data = encode(message)
    return [data] if len(data) <= max_frame else _chunk_frames(data, max_frame - CHUNK_OVERHEAD)


def _chunk_frames(data: bytes, chunk_size: int) -> list[bytes]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    count = -(-len(data) // chunk_size)
    message_id = uuid.uuid4().hex
    frames = []
    for index in range(count):
        body = {"id": message_id, "index": index, "count": count, "total_bytes": len(data)}
        piece = data[index * chunk_size : (index + 1) * chunk_size]
        frames.append(_frame(_header(MessageType.CHUNK, None, None, body), piece))
    return frames


# --------------------------------------------------------------------------- decoding


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise BadMessage("JSON object has duplicate keys")
    return obj


def _reject_constant(name: str) -> None:
    raise BadMessage(f"JSON contains {name}, which is not a finite number")


def _parse_json(raw: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys.

    Raises:
        BadMessage: ``raw`` is not such JSON.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadMessage(f"{what} is not valid UTF-8 JSON: {_show(str(exc))}") from exc


def _parse_frame(data: bytes, max_size: int) -> tuple[dict[str, Any], bytes]:
    """Split a frame into its checked header object and its raw payload.

    Raises:
        MessageTooBig: ``len(data) > max_size``.
        BadMessage: truncated, wrong magic, bad header length or header JSON.
        VersionMismatch: header "v" is an integer other than PROTOCOL_VERSION.
    """
    if len(data) > max_size:
        raise MessageTooBig(f"frame of {len(data)} bytes exceeds the limit of {max_size} bytes")
    if len(data) < PREFIX.size:
        raise BadMessage(f"truncated frame: {len(data)} bytes, the prefix alone is {PREFIX.size}")
    magic, length = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadMessage(f"not a fedseg frame: magic {magic!r}, expected {MAGIC!r}")
    if length > min(MAX_HEADER, len(data) - PREFIX.size):
        raise BadMessage(f"header length {length} runs past the {len(data)}-byte frame or the {MAX_HEADER}-byte limit")
    header = _parse_json(bytes(data[PREFIX.size : PREFIX.size + length]), "header")
    if not isinstance(header, dict):
        raise BadMessage(f"header must be a JSON object, got {type(header).__name__}")
    _check_version(header)
    if header.keys() != _HEADER_KEYS:
        raise BadMessage(f"header keys must be {sorted(_HEADER_KEYS)}, got {_show(sorted(header))}")
    return header, bytes(data[PREFIX.size + length :])


def _check_version(header: Mapping[str, Any]) -> None:
    version = header.get("v")
    if type(version) is not int:
        raise BadMessage(f"header 'v' must be an integer protocol version, got {_show(version)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)


def _message_type(header: Mapping[str, Any]) -> MessageType:
    try:
        return MessageType(header["type"])
    except (ValueError, TypeError) as exc:
        raise BadMessage(f"unknown message type {_show(header['type'])}") from exc


def _check_tensor_header(payload: bytes) -> None:
    """Pre-check safetensors' own header before the library allocates anything.

    Raises:
        BadMessage: truncated, not a JSON object, too many tensors or a dtype
            outside plain ints and floats (e.g. BOOL, BF16, F8).
    """
    if len(payload) < 8:
        raise BadMessage(f"payload of {len(payload)} bytes is too short for safetensors")
    (length,) = struct.unpack_from("<Q", payload)
    if length > min(MAX_TENSOR_HEADER, len(payload) - 8):
        raise BadMessage(f"safetensors header length {length} runs past the payload or the limit")
    header = _parse_json(payload[8 : 8 + length], "safetensors header")
    if not isinstance(header, dict) or len(header) > MAX_TENSORS + 1:
        raise BadMessage("safetensors header must be a JSON object of at most MAX_TENSORS entries")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in _TENSOR_DTYPES:
            raise BadMessage(f"tensor {_show(name)} has dtype {_show(dtype)}; allowed: {sorted(_TENSOR_DTYPES)}")


def _load_tensors(type_: MessageType, payload: bytes) -> dict[str, np.ndarray]:
    """The tensors in ``payload``; an empty payload means none.

    Raises:
        BadMessage: a payload on a type without tensors, or one that is not
            valid safetensors of numeric dtypes.
    """
    if not payload:
        return {}
    if _SCHEMAS[type_].tensors is Need.FORBIDDEN:
        raise BadMessage(f"{type_.name} must have an empty payload, got {len(payload)} bytes")
    _check_tensor_header(payload)
    try:
        return safetensors.numpy.load(payload)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        raise BadMessage(f"payload is not valid safetensors: {_show(str(exc))}") from exc


@dataclass(frozen=True)
class _Chunk:
    message_id: str
    index: int
    count: int
    total_bytes: int
    data: bytes


def _decode_frame(data: bytes, max_size: int) -> Message | _Chunk:
    """Decode any frame: a CHUNK becomes a :class:`_Chunk`, the rest a Message."""
    header, payload = _parse_frame(data, max_size)
    type_ = _message_type(header)
    _check_fields(type_, header["round"], header["site"], header["body"])
    if type_ is MessageType.CHUNK:
        body = header["body"]
        if not 0 < len(payload) <= body["total_bytes"]:
            raise BadMessage(f"CHUNK payload of {len(payload)} bytes is empty or above total_bytes")
        return _Chunk(body["id"], body["index"], body["count"], body["total_bytes"], payload)
    tensors = _load_tensors(type_, payload)
    return Message(type_, header["round"], header["site"], header["body"], tensors)


def decode(data: bytes, *, max_size: int) -> Message:
    """The validated message in one frame.

    Checks, in order: size, prefix, header length, header JSON, version,
    type, header and body schema, payload (empty where tensors are forbidden,
    else safetensors of int/float dtypes).

    Raises:
        MessageTooBig: ``len(data) > max_size``.
        VersionMismatch: the peer speaks another protocol version.
        BadMessage: anything else is wrong, including a CHUNK frame (those go
            to :meth:`Reassembler.feed`).
    """
    result = _decode_frame(data, max_size)
    if isinstance(result, _Chunk):
        raise BadMessage("a CHUNK frame cannot be decoded alone; feed it to a Reassembler")
    return result


@dataclass
class _Partial:
    """The chunks of one message received so far."""

    count: int
    total_bytes: int
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0

    def add(self, chunk: _Chunk) -> None:
        if (chunk.count, chunk.total_bytes) != (self.count, self.total_bytes):
            raise BadMessage(
                f"chunk {chunk.index} of message {chunk.message_id} says count {chunk.count}, total "
                f"{chunk.total_bytes}; earlier chunks said {self.count}, {self.total_bytes}"
            )
        if chunk.index in self.parts:
            raise BadMessage(f"duplicate chunk {chunk.index} of message {chunk.message_id}")
        if self.received + len(chunk.data) > self.total_bytes:
            raise BadMessage(f"chunks of message {chunk.message_id} exceed its total of {self.total_bytes} bytes")
        self.parts[chunk.index] = chunk.data
        self.received += len(chunk.data)

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    def join(self) -> bytes:
        if self.received != self.total_bytes:
            raise BadMessage(f"all {self.count} chunks arrived with {self.received} of {self.total_bytes} bytes")
        return b"".join(self.parts[i] for i in range(self.count))


class Reassembler:
    """Turns one connection's frames back into messages.

    Feed every received frame to :meth:`feed`: a whole message is returned at
    once; CHUNK frames are collected per message id (any order) and the
    message is returned when its last chunk arrives. Memory is bounded by
    ``max_pending * max_total``. After a ProtocolError the offending message
    is dropped; the connection should be closed anyway.

    Args:
        max_total: the largest reassembled message, in bytes.
        max_frame: the largest single frame, in bytes.
        max_pending: how many chunked messages may be in flight at once.
    """

    def __init__(
        self, max_total: int = DEFAULT_MAX_MESSAGE, *, max_frame: int = DEFAULT_MAX_FRAME, max_pending: int = 1
    ) -> None:
        if min(max_total, max_frame, max_pending) < 1:
            raise ValueError("max_total, max_frame and max_pending must be >= 1")
        self.max_total = max_total
        self.max_frame = max_frame
        self.max_pending = max_pending
        self._pending: dict[str, _Partial] = {}

    @property
    def pending_bytes(self) -> int:
        """Bytes held for messages whose chunks have not all arrived."""
        return sum(p.received for p in self._pending.values())

    def reset(self) -> None:
        """Forget every incomplete message."""
        self._pending.clear()

    def feed(self, frame: bytes) -> Message | None:
        """The message ``frame`` completes, or None while chunks are missing.

        Raises:
            MessageTooBig: the frame exceeds ``max_frame`` or a chunked
                message announces more than ``max_total`` bytes.
            VersionMismatch: as :func:`decode`.
            BadMessage: as :func:`decode`; or a duplicate chunk, a chunk whose
                count/total disagree with its siblings, more than
                ``max_pending`` messages in flight, or a reassembled CHUNK.
        """
        item = _decode_frame(frame, self.max_frame)
        if isinstance(item, Message):
            return item
        partial = self._pending.get(item.message_id) or self._start(item)
        try:
            partial.add(item)
            if not partial.complete:
                return None
            data = partial.join()
        except ProtocolError:
            del self._pending[item.message_id]
            raise
        del self._pending[item.message_id]
        return decode(data, max_size=self.max_total)

    def _start(self, chunk: _Chunk) -> _Partial:
        if chunk.total_bytes > self.max_total:
            raise MessageTooBig(
                f"chunked message of {chunk.total_bytes} bytes exceeds the limit of {self.max_total} bytes"
            )
        if len(self._pending) >= self.max_pending:
            raise BadMessage(
                f"a chunk of a new message arrived while {len(self._pending)} are incomplete (limit {self.max_pending})"
            )
        partial = self._pending[chunk.message_id] = _Partial(chunk.count, chunk.total_bytes)
        return partial


__all__ = [
    "CHUNK_OVERHEAD",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_MESSAGE",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SITE_PATTERN",
    "BadMessage",
    "ErrorCode",
    "Message",
    "MessageTooBig",
    "MessageType",
    "Need",
    "ProtocolError",
    "Reassembler",
    "UnknownSite",
    "VersionMismatch",
    "decode",
    "encode",
    "error_code",
    "error_message",
    "negotiate",
    "split",
    "to_frames",
]
