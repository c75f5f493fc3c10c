"""fedseg.federation.protocol.frames (and schemas): frames are fed as bytes, no sockets involved."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedseg.federation.protocol import constants
from fedseg.federation.protocol.chunks import Reassembler
from fedseg.federation.protocol.errors import (
    BadMessage,
    ErrorCode,
    MessageTooBig,
    ProtocolError,
    VersionMismatch,
)
from fedseg.federation.protocol.frames import decode, encode
from fedseg.federation.protocol.schemas import Message, MessageType

MAX = 1 << 30


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


EXAMPLES: dict[MessageType, Message] = {
    MessageType.HELLO: Message(MessageType.HELLO, site="nci", body={"versions": [1], "software": "fedseg 0.1.0"}),
    MessageType.WELCOME: Message(
        MessageType.WELCOME, 2, "nci", {"version": 1, "rounds": 10, "heartbeat_s": 15.0, "config": {"mu": 0.01}}
    ),
    MessageType.REFUSE: Message(MessageType.REFUSE, body={"code": 4403, "reason": "site 'x' is not in this study"}),
    MessageType.TRAIN: Message(
        MessageType.TRAIN, 3, body={"epochs": 1, "config": {"lr": [1e-3, None]}}, tensors=weights()
    ),
    MessageType.UPDATE: Message(
        MessageType.UPDATE,
        3,
        "suny",
        {"num_samples": 40, "val_dice": 0.87, "metrics": {"loss": 0.21, "dice": 0.87}},
        weights(),
    ),
    MessageType.MODEL: Message(MessageType.MODEL, 7, body={"model": "best", "val_dice": 0.91}, tensors=weights()),
    MessageType.EVALUATE: Message(MessageType.EVALUATE, 9, body={"model": "final"}, tensors=weights()),
    MessageType.RESULT: Message(
        MessageType.RESULT, 9, "ucla", {"model": "final", "case_dice": {"case01": 0.9, "case02": 1}}
    ),
    MessageType.HEARTBEAT: Message(MessageType.HEARTBEAT, body={"seq": 12}),
    MessageType.ERROR: Message(MessageType.ERROR, 4, "nci", {"code": int(ErrorCode.INTERNAL), "reason": ""}),
    MessageType.DONE: Message(MessageType.DONE, 9, body={"rounds": 10, "best_round": 7, "best_dice": 0.9}),
}


def _secure_examples() -> dict[MessageType, Message]:
    """One real message of each secure-aggregation type, from a round between three numpy sites."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from secagg_helpers import Harness

    g = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    h = Harness(g, ["nci", "suny", "ucla"])
    sent: dict[MessageType, Message] = {}
    for site in h.sites:
        h.send(site, h.site_rounds[site].keys_message())
    for site in h.sites:
        sent[MessageType.ROSTER] = roster = h.inbox.pop(site)[0]
        h.send(site, h.site_rounds[site].on_roster(roster))
    for site in h.sites:
        sent[MessageType.DEALT] = dealt = h.inbox.pop(site)[0]
        h.site_rounds[site].on_dealt(dealt)
        h.send(site, h.site_rounds[site].masked_message(g, 5, 0.5)[0])
    for site in h.sites:
        sent[MessageType.UNMASK] = unmask = h.inbox.pop(site)[0]
        h.send(site, h.site_rounds[site].on_unmask(unmask))
    return sent | {m.type: m for m in h.seen_by_server}


EXAMPLES.update(_secure_examples())


def raw_frame(header: Any, payload: bytes = b"", *, magic: bytes = b"FSG1") -> bytes:
    """A frame built by hand, bypassing encode()'s checks."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return magic + struct.pack(">I", len(raw)) + raw + payload


def header(type_: str = "HEARTBEAT", body: Any = None, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": type_, "round": None, "site": None, "body": {} if body is None else body} | fields


UPDATE_BODY = {"num_samples": 4, "val_dice": 0.5, "metrics": {}}
TENSOR_PAYLOAD = safetensors.numpy.save({"w": np.ones(3, np.float32)})


class TestRoundTrip:
    @pytest.mark.parametrize("type_", [t for t in MessageType if t is not MessageType.CHUNK])
    def test_every_type(self, type_: MessageType) -> None:
        message = EXAMPLES[type_]
        back = decode(encode(message), max_size=MAX)
        assert back == message
        assert back.body == message.body
        for name, array in message.tensors.items():
            assert back.tensors[name].dtype == array.dtype
            np.testing.assert_array_equal(back.tensors[name], array)

    def test_layout_and_byte_order_do_not_matter(self) -> None:
        grid = np.arange(12, dtype=">f4").reshape(3, 4)
        message = Message(MessageType.UPDATE, 0, "nci", UPDATE_BODY, {"t": grid.T, "s": grid[:, ::2]})
        back = decode(encode(message), max_size=MAX)
        np.testing.assert_array_equal(back.tensors["t"], grid.T)
        np.testing.assert_array_equal(back.tensors["s"], grid[:, ::2])

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.dictionaries(
            st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=20).filter(
                lambda s: s != "__metadata__"
            ),
            hnp.arrays(
                st.sampled_from([np.float16, np.float32, np.float64]),
                hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
            ),
            min_size=1,
            max_size=6,
        )
    )
    def test_random_float_arrays(self, tensors: dict[str, np.ndarray]) -> None:
        message = Message(MessageType.UPDATE, 1, "site-1", UPDATE_BODY, tensors)
        assert decode(encode(message), max_size=MAX) == message

    def test_frame_layout(self) -> None:
        data = encode(EXAMPLES[MessageType.HEARTBEAT])
        length = struct.unpack(">I", data[4:8])[0]
        assert data[:4] == b"FSG1" and len(data) == 8 + length
        assert json.loads(data[8:]) == header(body={"seq": 12})


class TestGarbage:
    """Whatever arrives, the parser raises a ProtocolError and nothing else; a frame it accepts is a valid message."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=256))
    def test_random_bytes(self, data: bytes) -> None:
        self.assert_refused(data)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=256))
    def test_random_bytes_after_magic(self, data: bytes) -> None:
        self.assert_refused(b"FSG1" + data)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutated_valid_frames(self, data: st.DataObject) -> None:
        frame = bytearray(encode(data.draw(st.sampled_from(list(EXAMPLES.values())))))
        for _ in range(data.draw(st.integers(1, 4))):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        # a mutation may leave a valid frame (a changed digit of a float): then it must decode to a valid message
        for parse in (lambda b: decode(b, max_size=MAX), lambda b: Reassembler(1 << 20).feed(b)):
            try:
                message = parse(bytes(frame))
            except ProtocolError:
                continue
            assert isinstance(message, Message)
            assert decode(encode(message), max_size=MAX) == message

    @pytest.mark.parametrize("type_", [t for t in MessageType if t is not MessageType.CHUNK])
    def test_every_truncation_is_refused(self, type_: MessageType) -> None:
        frame = encode(EXAMPLES[type_])
        header_end = 8 + struct.unpack(">I", frame[4:8])[0]
        for cut in range(len(frame)):
            if cut == header_end and type_ is MessageType.EVALUATE:
                continue  # the whole payload cut off: an EVALUATE naming a model, which is valid
            self.assert_refused(frame[:cut])

    @staticmethod
    def assert_refused(data: bytes) -> None:
        with pytest.raises(ProtocolError):
            decode(data, max_size=MAX)
        with pytest.raises(ProtocolError):
            Reassembler(1 << 20).feed(data)


class TestBadMessage:
    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"FSG1\x00\x00", id="truncated-prefix"),
            pytest.param(raw_frame(header())[:-3], id="truncated-header"),
            pytest.param(raw_frame(header(), magic=b"FSG2"), id="wrong-magic"),
            pytest.param(b"FSG1" + struct.pack(">I", 500) + b"{}", id="header-length-beyond-data"),
            pytest.param(raw_frame(b"\xff\xfe{}"), id="not-utf8"),
            pytest.param(raw_frame(b"[1, 2]"), id="non-object-json"),
            pytest.param(raw_frame(b'"v"'), id="string-json"),
            pytest.param(raw_frame(b"[" * 100_000), id="deep-json"),
            pytest.param(raw_frame(b'{"v": 1, "v": 1}'), id="duplicate-keys"),
            pytest.param(raw_frame(header(type_="GOSSIP")), id="unknown-type"),
            pytest.param(raw_frame(header(type_=["HELLO"])), id="type-not-string"),
            pytest.param(raw_frame({k: v for k, v in header().items() if k != "site"}), id="missing-header-key"),
            pytest.param(raw_frame(header() | {"extra": 1}), id="extra-header-key"),
            pytest.param(raw_frame(header(v="1")), id="version-not-int"),
            pytest.param(raw_frame(header(body=[])), id="body-not-object"),
            pytest.param(
                raw_frame(header("UPDATE", {"num_samples": 4, "val_dice": 0.5}, round=1, site="a"), TENSOR_PAYLOAD),
                id="missing-required-key",
            ),
            pytest.param(
                raw_frame(header("UPDATE", UPDATE_BODY | {"val_dice": True}, round=1, site="a"), TENSOR_PAYLOAD),
                id="bool-as-float",
            ),
            pytest.param(
                raw_frame(header("UPDATE", UPDATE_BODY | {"num_samples": 0}, round=1, site="a"), TENSOR_PAYLOAD),
                id="zero-samples",
            ),
            pytest.param(
                raw_frame(header("UPDATE", UPDATE_BODY | {"val_dice": 1.5}, round=1, site="a"), TENSOR_PAYLOAD),
                id="dice-above-one",
            ),
            pytest.param(
                raw_frame(
                    json.dumps(header("UPDATE", UPDATE_BODY | {"val_dice": float("nan")}, round=1, site="a")).encode(),
                    TENSOR_PAYLOAD,
                ),
                id="nan-float",
            ),
            pytest.param(
                raw_frame(
                    json.dumps(header("UPDATE", UPDATE_BODY, round=1, site="a")).replace("{}", '{"l": 1e999}').encode(),
                    TENSOR_PAYLOAD,
                ),
                id="overflowing-float",
            ),
            pytest.param(raw_frame(header(body={"seq": 1, "note": "hi"})), id="extra-body-key"),
            pytest.param(raw_frame(header(round=-1)), id="negative-round"),
            pytest.param(raw_frame(header("HELLO", {"versions": [1]})), id="hello-without-site"),
            pytest.param(raw_frame(header("HELLO", {"versions": [1]}, site="../etc")), id="bad-site-name"),
            pytest.param(raw_frame(header("ERROR", {"code": 4400, "reason": "x" * 5000})), id="long-string"),
            pytest.param(raw_frame(header("ERROR", {"code": 17, "reason": ""})), id="unknown-error-code"),
            pytest.param(raw_frame(header("ERROR", {"code": 4500, "reason": "stack trace"})), id="internal-detail"),
            pytest.param(raw_frame(header(), TENSOR_PAYLOAD), id="payload-on-heartbeat"),
            pytest.param(raw_frame(header("TRAIN", round=1)), id="train-without-tensors"),
            pytest.param(raw_frame(header("MODEL", {"model": "final"})), id="model-without-tensors"),
            pytest.param(raw_frame(header("MODEL", {"model": "last"}), TENSOR_PAYLOAD), id="unknown-model-name"),
            pytest.param(raw_frame(header("DONE", {"rounds": 3}), TENSOR_PAYLOAD), id="tensors-on-done"),
            pytest.param(
                raw_frame(header("RESULT", {"case_dice": {"c1": 1.2}}, site="a")), id="case-dice-above-one"
            ),
            pytest.param(raw_frame(header("TRAIN", round=1), b"not safetensors at all"), id="non-safetensors"),
            pytest.param(raw_frame(header("TRAIN", round=1), TENSOR_PAYLOAD[:-2]), id="truncated-safetensors"),
            pytest.param(
                raw_frame(header("TRAIN", round=1), safetensors.numpy.save({"m": np.ones(2, bool)})), id="bool-dtype"
            ),
            pytest.param(
                raw_frame(header("CHUNK", {"id": "0" * 32, "index": 0, "count": 1, "total_bytes": 4}), b"abcd"),
                id="chunk-outside-reassembler",
            ),
        ],
    )
    def test_rejected(self, data: bytes) -> None:
        with pytest.raises(BadMessage):
            decode(data, max_size=MAX)

    def test_invalid_message_cannot_be_built(self) -> None:
        with pytest.raises(BadMessage, match="val_dice"):
            Message(MessageType.UPDATE, 1, "nci", UPDATE_BODY | {"val_dice": -0.1}, weights())
        with pytest.raises(BadMessage, match="must not carry tensors"):
            Message(MessageType.HEARTBEAT, tensors=weights())
        with pytest.raises(BadMessage, match="integer or float"):
            Message(MessageType.TRAIN, 1, tensors={"m": np.ones(2, bool)})
        with pytest.raises(BadMessage, match="CHUNK"):
            Message(MessageType.CHUNK)

    def test_encode_rechecks_a_mutated_body(self) -> None:
        message = Message(MessageType.HEARTBEAT, body={"seq": 1})
        message.body["seq"] = float("inf")
        with pytest.raises(BadMessage):
            encode(message)


class TestVersionAndSize:
    def test_version_2_names_both_versions(self) -> None:
        with pytest.raises(VersionMismatch, match=r"peer speaks protocol 2, this fedseg speaks 1") as info:
            decode(raw_frame(header(v=2, type_="FUTURE", novel=True)), max_size=MAX)
        assert info.value.peer == 2

    def test_oversize(self) -> None:
        data = encode(EXAMPLES[MessageType.UPDATE])
        assert decode(data, max_size=len(data)) == EXAMPLES[MessageType.UPDATE]
        with pytest.raises(MessageTooBig, match=f"{len(data)} bytes exceeds the limit of {len(data) - 1}"):
            decode(data, max_size=len(data) - 1)

    def test_defaults_carry_ahnet(self) -> None:
        ahnet_fp32 = 38_000_000 * 4
        assert constants.DEFAULT_MAX_FRAME < ahnet_fp32 < constants.DEFAULT_MAX_MESSAGE / 4
