"""What each message may carry: the message types, their schemas, and :class:`Message`, checked when built.

Each :class:`MessageType` has a schema (:data:`SCHEMAS`): whether "round",
"site" and tensors are required, optional or forbidden, and the required and
optional body keys with their JSON types. Unknown keys are refused, floats
must be finite, strings and collections are bounded (the bounds are in
:mod:`~fedseg.federation.protocol.constants`). Tensor *values* (NaN, shapes
against the global model) are checked by the layer that knows the model, not
here. How a message becomes bytes is :mod:`~fedseg.federation.protocol.frames`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from fedseg.federation.protocol.constants import (
    MAX_DEPTH,
    MAX_INT,
    MAX_ITEMS,
    MAX_NAME,
    MAX_SITES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    MAX_TENSORS,
    MAX_TEXT,
)
from fedseg.federation.protocol.errors import CODE_VALUES, BadMessage, ErrorCode
from fedseg.federation.protocol.names import SITE_NAME_HELP, is_site_name

__all__ = ["SCHEMAS", "Message", "MessageType", "Need", "check_fields", "check_message", "show"]

# --------------------------------------------------------------------------- field checks

Check = Callable[[str, Any], None]


def show(value: Any) -> str:
    """A short repr of peer-supplied data for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)  # bool is not a number here


def _int(lo: int = 0) -> Check:
    def check(path: str, value: Any) -> None:
        if type(value) is not int or not lo <= value <= MAX_INT:
            raise BadMessage(f"{path} must be an integer >= {lo}, got {show(value)}")

    return check


def _float(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> Check:
    def check(path: str, value: Any) -> None:
        ok = _is_number(value) and math.isfinite(value) and lo <= value <= hi
        if not ok or (open_lo and value == lo):
            raise BadMessage(
                f"{path} must be a finite number in {'(' if open_lo else '['}{lo}, {hi}], got {show(value)}"
            )

    return check


def _text(max_len: int = MAX_TEXT) -> Check:
    def check(path: str, value: Any) -> None:
        if not isinstance(value, str) or len(value) > max_len:
            raise BadMessage(f"{path} must be a string of at most {max_len} characters, got {show(value)}")

    return check


def _name(path: str, value: Any) -> None:
    """Keys and tensor names: non-empty, printable, bounded."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise BadMessage(f"{path} must be a printable name of 1..{MAX_NAME} characters, got {show(value)}")


def _site(path: str, value: Any) -> None:
    if not is_site_name(value):
        raise BadMessage(f"{path} must be a site name ({SITE_NAME_HELP}), got {show(value)}")


def _mapping(key_check: Check, value_check: Check, limit: int, entries: str) -> Check:
    """A JSON object of at most ``limit`` ``entries``, every key and value checked."""

    def check(path: str, value: Any) -> None:
        if not isinstance(value, dict) or len(value) > limit:
            raise BadMessage(f"{path} must be an object of at most {limit} {entries}, got {show(value)}")
        for key, item in value.items():
            key_check(f"{path} key", key)
            value_check(f"{path}.{key}", item)

    return check


def _scores(value_check: Check) -> Check:
    """A JSON object {name: number}, e.g. metrics or per-case Dice."""
    return _mapping(_name, value_check, MAX_ITEMS, "entries")


def _versions(path: str, value: Any) -> None:
    if not isinstance(value, list) or not 0 < len(value) <= 16:
        raise BadMessage(f"{path} must be a list of 1..16 versions, got {show(value)}")
    for i, item in enumerate(value):
        _int(1)(f"{path}[{i}]", item)


def _code(path: str, value: Any) -> None:
    if type(value) is not int or value not in CODE_VALUES:
        raise BadMessage(f"{path} must be one of {sorted(CODE_VALUES)}, got {show(value)}")


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
        raise BadMessage(f"{path} is not bounded JSON: {show(value)}")


def _one_of(*choices: str) -> Check:
    def check(path: str, value: Any) -> None:
        if value not in choices:
            raise BadMessage(f"{path} must be one of {list(choices)}, got {show(value)}")

    return check


def _hex(n_bytes: int | None = None, max_bytes: int = 1024) -> Check:
    """Lowercase hex of exactly ``n_bytes`` bytes (or 1..``max_bytes``)."""

    def check(path: str, value: Any) -> None:
        size = len(value) // 2 if isinstance(value, str) else -1
        ok = isinstance(value, str) and len(value) % 2 == 0 and re.fullmatch(r"[0-9a-f]*", value) is not None
        ok = ok and (size == n_bytes if n_bytes is not None else 0 < size <= max_bytes)
        if not ok:
            want = f"{n_bytes} bytes" if n_bytes is not None else f"1..{max_bytes} bytes"
            raise BadMessage(f"{path} must be lowercase hex of {want}, got {show(value)}")

    return check


def _object(required: Mapping[str, Check]) -> Check:
    """A JSON object with exactly these keys."""

    def check(path: str, value: Any) -> None:
        if not isinstance(value, dict) or value.keys() != required.keys():
            raise BadMessage(f"{path} must be an object with the keys {sorted(required)}, got {show(value)}")
        for key, item_check in required.items():
            item_check(f"{path}.{key}", value[key])

    return check


def _by_site(value_check: Check) -> Check:
    """A JSON object {site name: value}."""
    return _mapping(_site, value_check, MAX_SITES, "sites")


def _sites(path: str, value: Any) -> None:
    """A list of distinct site names."""
    if not isinstance(value, list) or len(value) > MAX_SITES or len(set(map(str, value))) != len(value):
        raise BadMessage(f"{path} must be a list of at most {MAX_SITES} distinct site names, got {show(value)}")
    for i, item in enumerate(value):
        _site(f"{path}[{i}]", item)


def _ring_bits(path: str, value: Any) -> None:
    if type(value) is not int or value not in (32, 64):
        raise BadMessage(f"{path} must be 32 or 64, got {show(value)}")


def _uuid_hex(path: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise BadMessage(f"{path} must be 32 lowercase hex digits, got {show(value)}")


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
    # secure aggregation (protocol/secagg), one round: KEYS -> ROSTER -> SHARES -> DEALT -> MASKED -> UNMASK -> REVEAL
    KEYS = "KEYS"  # site -> server: this round's public keys, signed with the site's certificate key
    ROSTER = "ROSTER"  # server -> sites: every keyed site's signed keys, the threshold, the clip bound
    SHARES = "SHARES"  # site -> server: its secrets' shares, encrypted to each roster site
    DEALT = "DEALT"  # server -> site: the shares dealt to it, and who dealt
    MASKED = "MASKED"  # site -> server: the masked, weighted, clipped update (ring elements)
    UNMASK = "UNMASK"  # server -> sites: who sent a masked update and who dropped out
    REVEAL = "REVEAL"  # site -> server: the shares that unmask the sum (seeds of survivors, keys of dropouts)


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
_KEYS_BODY = {
    "cipher_pk": _hex(32), "mask_pk": _hex(32), "commitment": _hex(32), "signature": _hex(max_bytes=160),
    "certificate": _text(),
}
_SHARE = _hex(SHARE_CIPHERTEXT_BYTES)
_SECRET_SHARE = _hex(SHARE_BYTES)
_ERROR_BODY = {"code": _code, "reason": _text()}
_METRICS = _scores(_float())
_MODEL_NAME = _one_of("final", "best")
SCHEMAS: dict[MessageType, _Schema] = {
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
    MessageType.KEYS: _Schema(R, R, F, _KEYS_BODY),
    MessageType.ROSTER: _Schema(
        R, O, F,
        {"threshold": _int(2), "clip_norm": _float(0.0, open_lo=True), "ring_bits": _ring_bits, "fraction_bits": _int(1),
         "sites": _by_site(_object(_KEYS_BODY))},
    ),
    MessageType.SHARES: _Schema(
        R, R, F, {"shares": _by_site(_object({"ciphertext": _SHARE, "seed_digest": _hex(32), "key_digest": _hex(32)}))}
    ),
    MessageType.DEALT: _Schema(R, O, F, {"sites": _sites, "shares": _by_site(_SHARE)}),
    MessageType.MASKED: _Schema(R, R, R, {"fraction_bits": _int(1)}),
    MessageType.UNMASK: _Schema(R, O, F, {"survivors": _sites, "dropped": _sites}),
    MessageType.REVEAL: _Schema(R, R, F, {"seeds": _by_site(_SECRET_SHARE), "keys": _by_site(_SECRET_SHARE)}),
    MessageType.CHUNK: _Schema(
        F, F, F, {"id": _uuid_hex, "index": _int(), "count": _int(1), "total_bytes": _int(1)}, rule=_chunk_rule
    ),
}


def _check_need(what: str, present: bool, need: Need, type_: MessageType) -> None:
    if need is Need.REQUIRED and not present:
        raise BadMessage(f"{type_.name} needs {what}")
    if need is Need.FORBIDDEN and present:
        raise BadMessage(f"{type_.name} must not carry {what}")


def check_fields(type_: MessageType, round_: Any, site: Any, body: Any) -> None:
    """Validate everything but the tensors against ``type_``'s schema.

    Raises:
        BadMessage: a field is missing, unknown, mistyped or out of range.
    """
    schema = SCHEMAS[type_]
    _check_need("a round", round_ is not None, schema.round, type_)
    if round_ is not None:
        _int()("round", round_)
    _check_need("a site", site is not None, schema.site, type_)
    if site is not None:
        _site("site", site)
    if not isinstance(body, dict):
        raise BadMessage(f"body must be a JSON object, got {show(body)}")
    missing = sorted(schema.required.keys() - body.keys())
    if missing:
        raise BadMessage(f"{type_.name} body lacks required key(s) {missing}")
    for key, value in body.items():
        check = schema.required.get(key) or schema.optional.get(key)
        if check is None:
            raise BadMessage(f"{type_.name} body has unknown key {show(key)}")
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
    _check_need("tensors", bool(tensors), SCHEMAS[type_].tensors, type_)
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
    arrays (safetensors on the wire). Treat both as read-only;
    :func:`~fedseg.federation.protocol.frames.encode` re-checks them anyway. Equality compares tensors by name, dtype, shape and
    values.

    Raises:
        BadMessage: the fields break the schema of ``type``, or ``type`` is
            CHUNK (chunks are made by :func:`~fedseg.federation.protocol.chunks.split`,
            not by hand).
    """

    type: MessageType
    round: int | None = None
    site: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_message(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        same_fields = (self.type, self.round, self.site, self.body) == (other.type, other.round, other.site, other.body)
        return same_fields and _same_tensors(self.tensors, other.tensors)

    __hash__ = None  # type: ignore[assignment]  # holds dicts and arrays

    def __repr__(self) -> str:
        size = sum(a.nbytes for a in self.tensors.values())
        return (
            f"Message({self.type.name}, round={self.round}, site={self.site!r}, body={show(self.body)}, "
            f"tensors={len(self.tensors)} ({size} bytes))"
        )


def check_message(message: Message) -> None:
    """Validate every field and the tensors of ``message`` against its type's schema.

    Raises:
        BadMessage: as :class:`Message`.
    """
    if not isinstance(message.type, MessageType):
        raise BadMessage(f"type must be a MessageType, got {show(message.type)}")
    if message.type is MessageType.CHUNK:
        raise BadMessage("CHUNK frames are made by split() and read by Reassembler, not built as messages")
    check_fields(message.type, message.round, message.site, message.body)
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
