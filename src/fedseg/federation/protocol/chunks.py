"""Messages too big for one frame: cut into CHUNK frames, and joined again by a :class:`Reassembler`.

A frame received is at most ``max_frame`` bytes (DEFAULT_MAX_FRAME); a frame
sent at most DEFAULT_SEND_FRAME. A larger message is cut by :func:`to_frames`
(or :func:`split`) into CHUNK frames carrying slices of its encoding, which
share one random message id; :class:`Reassembler` joins them, in any order, up
to ``max_total`` bytes (DEFAULT_MAX_MESSAGE).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from fedseg.federation.protocol.constants import (
    CHUNK_OVERHEAD,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_SEND_FRAME,
)
from fedseg.federation.protocol.errors import BadMessage, MessageTooBig, ProtocolError
from fedseg.federation.protocol.frames import (
    Chunk,
    decode,
    decode_frame,
    encode,
    frame_bytes,
    frame_header,
)
from fedseg.federation.protocol.schemas import Message, MessageType

__all__ = ["Reassembler", "split", "to_frames"]


def split(message: Message, chunk_size: int) -> list[bytes]:
    """Encode ``message`` and cut it into CHUNK frames of ``chunk_size`` payload bytes.

    Each frame is at most ``chunk_size + CHUNK_OVERHEAD`` bytes; all share one
    random message id. Feed them, in any order, to a :class:`Reassembler`.

    Raises:
        ValueError: ``chunk_size`` < 1.
        BadMessage: as :func:`~fedseg.federation.protocol.frames.encode`.
    """
    return _chunk_frames(encode(message), chunk_size)


def to_frames(message: Message, *, max_frame: int = DEFAULT_SEND_FRAME) -> list[bytes]:
    """The frames to send for ``message``: one if it fits ``max_frame``, else CHUNKs.

    Raises:
        ValueError: ``max_frame`` leaves no room beside CHUNK_OVERHEAD.
        BadMessage: as :func:`~fedseg.federation.protocol.frames.encode`.
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
        frames.append(frame_bytes(frame_header(MessageType.CHUNK, None, None, body), piece))
    return frames



@dataclass
class _Partial:
    """The chunks of one message received so far."""

    count: int
    total_bytes: int
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0

    def add(self, chunk: Chunk) -> None:
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
            VersionMismatch: as :func:`~fedseg.federation.protocol.frames.decode`.
            BadMessage: as :func:`~fedseg.federation.protocol.frames.decode`; or a duplicate chunk, a chunk whose
                count/total disagree with its siblings, more than
                ``max_pending`` messages in flight, or a reassembled CHUNK.
        """
        item = decode_frame(frame, self.max_frame)
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

    def _start(self, chunk: Chunk) -> _Partial:
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
