"""fedseg.federation.protocol.errors: one table from exceptions to codes, one builder of ERROR/REFUSE bodies."""

from __future__ import annotations

import pytest

from fedseg.errors import FedsegError
from fedseg.federation.protocol.constants import MAX_TEXT
from fedseg.federation.protocol.errors import (
    BadMessage,
    ErrorCode,
    MessageTooBig,
    ProtocolError,
    UnknownSite,
    VersionMismatch,
    error_body,
    error_code,
)
from fedseg.federation.protocol.frames import decode, encode
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.strategies import UpdateRejected

MAX = 1 << 30


class TestErrorCodes:
    @pytest.mark.parametrize(
        ("exc", "code"),
        [
            (BadMessage("x"), ErrorCode.BAD_MESSAGE),
            (MessageTooBig("x"), ErrorCode.TOO_BIG),
            (VersionMismatch(2), ErrorCode.VERSION_MISMATCH),
            (UnknownSite("x"), ErrorCode.UNKNOWN_SITE),
            (UpdateRejected("nci", "val_dice is NaN"), ErrorCode.REJECTED_UPDATE),
            (ProtocolError("x"), ErrorCode.BAD_MESSAGE),
            (FedsegError("x"), ErrorCode.INTERNAL),
            (KeyError("secret path"), ErrorCode.INTERNAL),
        ],
    )
    def test_mapping(self, exc: BaseException, code: ErrorCode) -> None:
        assert error_code(exc) is code

    def test_hierarchy(self) -> None:
        for cls in (BadMessage, MessageTooBig, VersionMismatch, UnknownSite):
            assert issubclass(cls, ProtocolError)
        assert issubclass(ProtocolError, FedsegError)

    def test_internal_errors_carry_no_detail(self) -> None:
        message = Message(MessageType.ERROR, 3, "nci", error_body(RuntimeError("/home/site/secret.nii.gz")))
        assert message.body == {"code": ErrorCode.INTERNAL, "reason": ""}
        assert error_body(ErrorCode.INTERNAL, "a path") == {"code": 4500, "reason": ""}
        refusal = Message(MessageType.REFUSE, body=error_body(VersionMismatch(2)))
        assert decode(encode(refusal), max_size=MAX).body["reason"] == "peer speaks protocol 2, this fedseg speaks 1"

    def test_body_from_a_code_and_a_reason(self) -> None:
        assert error_body(ErrorCode.STUDY_FAILED, "round 0: 1 update(s)") == {"code": 4409, "reason": "round 0: 1 update(s)"}
        long = error_body(ErrorCode.REJECTED_UPDATE, "x" * (MAX_TEXT + 10))
        assert long["code"] == 4422 and len(long["reason"]) == MAX_TEXT
        Message(MessageType.ERROR, body=long)  # still a valid body
        assert error_body(BadMessage("bad header")) == {"code": 4400, "reason": "bad header"}
