"""One frame as bytes: the prefix, the strict JSON header and the safetensors payload, encoded and decoded.

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

No socket, no event loop, no clock, no torch, no pickle: tensors are numpy
arrays, serialised with safetensors. :func:`decode` checks, in order: size,
prefix, header length, header JSON, version, type, header and body schema
(:mod:`~fedseg.federation.protocol.schemas`), payload. Messages larger than a
frame travel as CHUNK frames (:mod:`~fedseg.federation.protocol.chunks`);
:func:`decode_frame` hands those back as :class:`Chunk`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from fedseg.federation.protocol.constants import (
    MAGIC,
    MAX_HEADER,
    MAX_TENSOR_HEADER,
    MAX_TENSORS,
    PROTOCOL_VERSION,
)
from fedseg.federation.protocol.errors import BadMessage, MessageTooBig, VersionMismatch
from fedseg.federation.protocol.schemas import (
    SCHEMAS,
    Message,
    MessageType,
    Need,
    check_fields,
    check_message,
    show,
)

__all__ = ["PREFIX", "Chunk", "decode", "decode_frame", "encode", "frame_bytes", "frame_header"]

PREFIX = struct.Struct(">4sI")  # magic, header length

_HEADER_KEYS = frozenset({"v", "type", "round", "site", "body"})
# safetensors dtype codes accepted on the wire: plain ints and IEEE floats.
_TENSOR_DTYPES = frozenset({"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


# --------------------------------------------------------------------------- encoding


def frame_bytes(header: Mapping[str, Any], payload: bytes) -> bytes:
    """Prefix, compact UTF-8 JSON ``header`` and ``payload`` as one frame.

    Raises:
        BadMessage: the header is larger than MAX_HEADER.
    """
    raw = json.dumps(header, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER:
        raise BadMessage(f"header of {len(raw)} bytes exceeds the limit of {MAX_HEADER}")
    return b"".join((PREFIX.pack(MAGIC, len(raw)), raw, payload))


def frame_header(type_: MessageType, round_: int | None, site: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """The header object of a frame (key order is part of the byte-level format)."""
    return {"v": PROTOCOL_VERSION, "type": type_.value, "round": round_, "site": site, "body": body}


def encode(message: Message) -> bytes:
    """The frame for ``message``: prefix, JSON header, safetensors payload.

    The payload is empty when the message has no tensors. Arrays are written
    C-contiguous and little-endian whatever their memory layout.

    Raises:
        BadMessage: the message was mutated into something invalid.
    """
    check_message(message)
    payload = b""
    if message.tensors:
        payload = safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in message.tensors.items()})
    return frame_bytes(frame_header(message.type, message.round, message.site, message.body), payload)


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
        raise BadMessage(f"{what} is not valid UTF-8 JSON: {show(str(exc))}") from exc


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
        raise BadMessage(f"header keys must be {sorted(_HEADER_KEYS)}, got {show(sorted(header))}")
    return header, bytes(data[PREFIX.size + length :])


def _check_version(header: Mapping[str, Any]) -> None:
    version = header.get("v")
    if type(version) is not int:
        raise BadMessage(f"header 'v' must be an integer protocol version, got {show(version)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)


def _message_type(header: Mapping[str, Any]) -> MessageType:
    try:
        return MessageType(header["type"])
    except (ValueError, TypeError) as exc:
        raise BadMessage(f"unknown message type {show(header['type'])}") from exc


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
            raise BadMessage(f"tensor {show(name)} has dtype {show(dtype)}; allowed: {sorted(_TENSOR_DTYPES)}")


def _load_tensors(type_: MessageType, payload: bytes) -> dict[str, np.ndarray]:
    """The tensors in ``payload``; an empty payload means none.

    Raises:
        BadMessage: a payload on a type without tensors, or one that is not
            valid safetensors of numeric dtypes.
    """
    if not payload:
        return {}
    if SCHEMAS[type_].tensors is Need.FORBIDDEN:
        raise BadMessage(f"{type_.name} must have an empty payload, got {len(payload)} bytes")
    _check_tensor_header(payload)
    try:
        return safetensors.numpy.load(payload)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        raise BadMessage(f"payload is not valid safetensors: {show(str(exc))}") from exc


@dataclass(frozen=True)
class Chunk:
    """A decoded CHUNK frame: slice ``index`` of ``count`` of the encoding of message ``message_id``."""

    message_id: str
    index: int
    count: int
    total_bytes: int
    data: bytes


def decode_frame(data: bytes, max_size: int) -> Message | Chunk:
    """Decode any frame: a CHUNK becomes a :class:`Chunk`, the rest a Message."""
    header, payload = _parse_frame(data, max_size)
    type_ = _message_type(header)
    check_fields(type_, header["round"], header["site"], header["body"])
    if type_ is MessageType.CHUNK:
        body = header["body"]
        if not 0 < len(payload) <= body["total_bytes"]:
            raise BadMessage(f"CHUNK payload of {len(payload)} bytes is empty or above total_bytes")
        return Chunk(body["id"], body["index"], body["count"], body["total_bytes"], payload)
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
            to :meth:`~fedseg.federation.protocol.chunks.Reassembler.feed`).
    """
    result = decode_frame(data, max_size)
    if isinstance(result, Chunk):
        raise BadMessage("a CHUNK frame cannot be decoded alone; feed it to a Reassembler")
    return result
