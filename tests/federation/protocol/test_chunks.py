"""fedseg.federation.protocol.chunks: messages cut into CHUNK frames and reassembled, in any order, within limits."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from fedseg.federation.protocol.chunks import Reassembler, split, to_frames
from fedseg.federation.protocol.constants import CHUNK_OVERHEAD
from fedseg.federation.protocol.errors import BadMessage, MessageTooBig
from fedseg.federation.protocol.frames import encode
from fedseg.federation.protocol.schemas import Message, MessageType

MiB = 1 << 20
HEARTBEAT = Message(MessageType.HEARTBEAT, body={"seq": 12})
UPDATE = Message(
    MessageType.UPDATE, 3, "suny", {"num_samples": 40, "val_dice": 0.87, "metrics": {"loss": 0.21}},
    {"w": np.arange(6, dtype=np.float32)},
)


def raw_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A frame built by hand, bypassing encode()'s checks."""
    raw = json.dumps(header).encode()
    return b"FSG1" + struct.pack(">I", len(raw)) + raw + payload


def header(type_: str, body: Any) -> dict[str, Any]:
    return {"v": 1, "type": type_, "round": None, "site": None, "body": body}


def big_message() -> Message:
    tensors = {"w": np.arange(5 * MiB // 4, dtype=np.float32)}  # 5 MiB of weights
    return Message(MessageType.TRAIN, 5, body={}, tensors=tensors)


def chunk_frame(message_id: str, index: int, count: int, total: int, data: bytes) -> bytes:
    body = {"id": message_id, "index": index, "count": count, "total_bytes": total}
    return raw_frame(header("CHUNK", body), data)


class TestChunking:
    def test_shuffled_chunks_reassemble(self) -> None:
        message = big_message()
        frames = split(message, 1 * MiB)
        assert len(frames) == 6 and all(len(f) <= MiB + CHUNK_OVERHEAD for f in frames)
        random.Random(1).shuffle(frames)
        reassembler = Reassembler(16 * MiB, max_frame=2 * MiB)
        results = [reassembler.feed(f) for f in frames]
        assert results[:-1] == [None] * 5
        assert results[-1] == message
        assert reassembler.pending_bytes == 0

    def test_whole_frames_pass_through_between_chunks(self) -> None:
        frames = split(big_message(), MiB)
        reassembler = Reassembler(16 * MiB, max_frame=2 * MiB)
        assert reassembler.feed(frames[0]) is None
        assert reassembler.feed(encode(HEARTBEAT)) == HEARTBEAT
        assert reassembler.pending_bytes == MiB

    def test_to_frames(self) -> None:
        small = UPDATE
        assert to_frames(small) == [encode(small)]
        frames = to_frames(big_message(), max_frame=MiB)
        assert len(frames) == 6 and max(map(len, frames)) <= MiB

    def test_duplicate_chunk(self) -> None:
        frames = split(big_message(), MiB)
        reassembler = Reassembler(16 * MiB, max_frame=2 * MiB)
        reassembler.feed(frames[0])
        with pytest.raises(BadMessage, match="duplicate chunk 0"):
            reassembler.feed(frames[0])
        assert reassembler.pending_bytes == 0  # the broken message is dropped

    def test_inconsistent_count(self) -> None:
        reassembler = Reassembler(1024)
        assert reassembler.feed(chunk_frame("a" * 32, 0, 3, 9, b"abc")) is None
        with pytest.raises(BadMessage, match="count 2"):
            reassembler.feed(chunk_frame("a" * 32, 1, 2, 9, b"def"))

    @pytest.mark.parametrize(
        ("index", "count", "total", "data"),
        [(2, 2, 9, b"abc"), (0, 10, 9, b"a"), (0, 1, 2, b"abc"), (0, 1, 3, b"")],
        ids=["index-not-below-count", "count-above-total", "payload-above-total", "empty-payload"],
    )
    def test_malformed_chunk(self, index: int, count: int, total: int, data: bytes) -> None:
        with pytest.raises(BadMessage):
            Reassembler(1024).feed(chunk_frame("a" * 32, index, count, total, data))

    def test_bytes_disagree_with_total(self) -> None:
        reassembler = Reassembler(1024)
        reassembler.feed(chunk_frame("b" * 32, 0, 2, 9, b"abc"))
        with pytest.raises(BadMessage, match="6 of 9 bytes"):
            reassembler.feed(chunk_frame("b" * 32, 1, 2, 9, b"def"))

    def test_total_above_max_total(self) -> None:
        frames = split(big_message(), MiB)
        with pytest.raises(MessageTooBig, match="exceeds the limit of 4194304"):
            Reassembler(4 * MiB, max_frame=2 * MiB).feed(frames[0])

    def test_frame_above_max_frame(self) -> None:
        with pytest.raises(MessageTooBig):
            Reassembler(16 * MiB, max_frame=MiB).feed(split(big_message(), 2 * MiB)[0])

    def test_one_message_in_flight(self) -> None:
        reassembler = Reassembler(1024)
        reassembler.feed(chunk_frame("a" * 32, 0, 2, 6, b"abc"))
        with pytest.raises(BadMessage, match="incomplete"):
            reassembler.feed(chunk_frame("c" * 32, 0, 2, 6, b"abc"))

    def test_reassembled_garbage_is_bad(self) -> None:
        with pytest.raises(BadMessage, match="magic"):
            Reassembler(1024).feed(chunk_frame("a" * 32, 0, 1, 12, b"not a frame!"))

    def test_split_needs_positive_chunk_size(self) -> None:
        with pytest.raises(ValueError):
            split(HEARTBEAT, 0)
