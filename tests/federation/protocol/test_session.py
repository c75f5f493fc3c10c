"""fedseg.federation.protocol.session: literal frames in, events and frames out — no socket, no clock."""

from __future__ import annotations

import hashlib

from typing import Any

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.protocol.chunks import split
from fedseg.federation.protocol.constants import PROTOCOL_VERSION
from fedseg.federation.protocol.errors import ErrorCode, UnknownSite, VersionMismatch
from fedseg.federation.protocol.frames import decode, encode
from fedseg.federation.protocol.participant import LocalUpdate
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.session import (
    ConnectionDropped,
    Done,
    EvaluateRequested,
    Ignored,
    Joined,
    ModelReceived,
    Refused,
    ResultReceived,
    ServerError,
    ServerSession,
    ServerState,
    SiteLeft,
    SiteSession,
    SiteState,
    TrainRequested,
    UpdateReceived,
    UpdateRefused,
    Welcomed,
    done_frames,
    error_frames,
    EvaluationRepeated,
    SiteLimits,
    TrainingFailed,
    evaluate_frames,
    local_problem,
    model_frames,
    negotiate,
    pseudonymise,
    train_frames,
)

MAX = 1 << 30
WEIGHTS = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bn.num_batches_tracked": np.array(3, np.int64)}
FINAL = {k: np.asarray(v + 1) for k, v in WEIGHTS.items()}
SETTINGS = {"fold": 0, "train": {"network": "unet-small", "patch_size": [16, 16, 8]}}


def frame(type_: MessageType, round_: int | None = None, site: str | None = None, body: dict[str, Any] | None = None,
          tensors: dict[str, np.ndarray] | None = None) -> bytes:
    return encode(Message(type_, round_, site, body or {}, tensors or {}))


def sent(session: ServerSession | SiteSession) -> list[Message]:
    """The messages a session queued (each fits one frame here)."""
    return [decode(data, max_size=MAX) for data in session.data_to_send()]


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


HELLO = frame(MessageType.HELLO, site="nci", body={"versions": [1]})
UPDATE = frame(MessageType.UPDATE, 2, "nci", {"num_samples": 7, "val_dice": 0.8, "metrics": {"train_loss": 0.3}}, WEIGHTS)


def test_negotiate() -> None:
    assert negotiate([3, 2, PROTOCOL_VERSION]) == PROTOCOL_VERSION
    with pytest.raises(VersionMismatch, match="peer speaks protocol 2, 3, this fedseg speaks 1"):
        negotiate([2, 3])


# =========================================================================== ServerSession


def server_session(identity: str | None = "nci", settings: dict[str, Any] | None = SETTINGS) -> ServerSession:
    session = ServerSession(rounds=5, settings=settings)
    if identity is not None:
        session.peer_identified(identity)
    return session


def joined_server() -> ServerSession:
    session = server_session()
    session.receive(HELLO)
    session.data_to_send()
    return session


class TestServerHandshake:
    def test_hello_is_welcomed_with_the_settings(self) -> None:
        session = server_session()
        assert session.receive(HELLO) == [Joined("nci", 1)]
        assert session.state is ServerState.OPEN and session.close_code is None
        [welcome] = sent(session)
        assert welcome == Message(MessageType.WELCOME, site="nci", body={"version": 1, "rounds": 5, "config": SETTINGS})

    def test_no_settings_no_config(self) -> None:
        session = server_session(settings=None)
        session.receive(HELLO)
        assert sent(session)[0].body == {"version": 1, "rounds": 5}

    def test_unsupported_version_is_refused_with_its_code(self) -> None:
        session = server_session()
        events = session.receive(frame(MessageType.HELLO, site="nci", body={"versions": [2]}))
        reason = "peer speaks protocol 2, this fedseg speaks 1"
        assert events == [Refused(ErrorCode.VERSION_MISMATCH, reason)]
        assert sent(session) == [Message(MessageType.REFUSE, body={"code": 4505, "reason": reason})]
        assert session.state is ServerState.CLOSED and (session.close_code, session.close_reason) == (4505, reason)

    def test_hello_naming_another_site_is_refused(self) -> None:
        events = (session := server_session()).receive(frame(MessageType.HELLO, site="ucla", body={"versions": [1]}))
        assert events == [Refused(ErrorCode.UNKNOWN_SITE, "HELLO names site 'ucla' but the certificate is 'nci'")]
        assert session.close_code == 4403

    @pytest.mark.parametrize(
        "first",
        [UPDATE, split(Message(MessageType.HELLO, site="nci", body={"versions": [1]}), 40)[0], "HELLO"],
        ids=["update-first", "chunked-hello", "text-frame"],
    )
    def test_the_first_message_must_be_a_whole_binary_hello(self, first: bytes | str) -> None:
        [event] = (session := server_session()).receive(first)
        assert isinstance(event, Refused) and event.code is ErrorCode.BAD_MESSAGE
        assert "HELLO" in event.reason or "text frames" in event.reason
        assert sent(session)[0].type is MessageType.REFUSE and session.close_code == 4400

    def test_refusal_before_hello_and_nothing_after(self) -> None:
        session = server_session(identity=None)
        events = session.refuse(UnknownSite("certificate identity 'x' is not a site of this study"))
        assert events == [Refused(ErrorCode.UNKNOWN_SITE, "certificate identity 'x' is not a site of this study")]
        assert sent(session)[0].body["code"] == 4403
        assert session.receive(HELLO) == [] and session.data_to_send() == []

    def test_garbage_during_handshake_is_refused(self) -> None:
        [event] = (session := server_session()).receive(b"FSG1garbage")
        assert isinstance(event, Refused) and session.state is ServerState.CLOSED


class TestServerMessages:
    def test_update_becomes_an_update_event(self) -> None:
        [event] = joined_server().receive(UPDATE)
        assert isinstance(event, UpdateReceived)
        update = event.update
        assert (update.site, update.num_samples, update.val_dice, update.metrics) == ("nci", 7, 0.8, {"train_loss": 0.3})
        assert_same_weights(update.weights, WEIGHTS)

    def test_chunked_update_arrives_with_its_last_chunk(self) -> None:
        session = joined_server()
        frames = split(decode(UPDATE, max_size=MAX), 50)
        assert len(frames) > 2
        events = [session.receive(f) for f in frames]
        assert events[:-1] == [[]] * (len(frames) - 1) and isinstance(events[-1][0], UpdateReceived)

    def test_update_signed_by_another_site_ends_the_session(self) -> None:
        session = joined_server()
        other = frame(MessageType.UPDATE, 2, "ucla", {"num_samples": 7, "val_dice": 0.8, "metrics": {}}, WEIGHTS)
        assert session.receive(other) == [SiteLeft("UPDATE signed as 'ucla'")]
        assert session.state is ServerState.CLOSED and session.close_code == 1000

    def test_result_error_heartbeat_and_unexpected(self) -> None:
        session = joined_server()
        result = frame(MessageType.RESULT, 4, "nci", {"model": "final", "case_dice": {"case-001": 0.5, "case-002": 1}})
        assert session.receive(result) == [ResultReceived({"case-001": 0.5, "case-002": 1.0})]
        assert session.receive(frame(MessageType.HEARTBEAT, body={"seq": 1})) == []
        assert session.receive(frame(MessageType.DONE, body={"rounds": 3})) == [Ignored(MessageType.DONE)]
        error = frame(MessageType.ERROR, body={"code": int(ErrorCode.SETTINGS_MISMATCH), "reason": "fold: 1 here vs 0"})
        assert session.receive(error) == [SiteLeft("site reported an error: fold: 1 here vs 0")]
        assert session.receive(UPDATE) == []  # closed: nothing more is read

    def test_internal_error_from_the_site_is_named_by_its_code(self) -> None:
        error = frame(MessageType.ERROR, body={"code": int(ErrorCode.INTERNAL), "reason": ""})
        assert joined_server().receive(error) == [SiteLeft("site reported an error: INTERNAL")]

    def test_protocol_error_sends_error_and_closes_with_its_code(self) -> None:
        session = joined_server()
        [event] = session.receive(b"FSG1\x00\x00\x00\x02{}")
        assert isinstance(event, SiteLeft) and event.reason.startswith("protocol error: header 'v' must be")
        [error] = sent(session)
        assert error.type is MessageType.ERROR and error.body["code"] == 4400
        assert session.close_code == 4400 and session.close_reason.startswith("header 'v' must be")


class TestServerBroadcasts:
    def test_train(self) -> None:
        [train] = [decode(f, max_size=MAX) for f in train_frames(3, WEIGHTS, 2)]
        assert (train.type, train.round, train.body) == (MessageType.TRAIN, 3, {"epochs": 2})
        assert_same_weights(dict(train.tensors), WEIGHTS)

    def test_model_clamps_dice_and_evaluate_names_it(self) -> None:
        [model] = [decode(f, max_size=MAX) for f in model_frames("best", 1, WEIGHTS, 1.0000001)]
        assert model.body == {"model": "best", "val_dice": 1.0} and model.round == 1
        assert [decode(f, max_size=MAX) for f in evaluate_frames(4)] == [
            Message(MessageType.EVALUATE, round=4, body={"model": "final"})
        ]

    def test_done_names_the_best_round_when_there_is_one(self) -> None:
        assert decode(done_frames(5, 3, 0.7)[0], max_size=MAX).body == {"rounds": 5, "best_round": 3, "best_dice": 0.7}
        assert decode(done_frames(5, -1, None)[0], max_size=MAX).body == {"rounds": 5}

    def test_error(self) -> None:
        error = decode(error_frames(ErrorCode.REJECTED_UPDATE, "val_dice is NaN", 2)[0], max_size=MAX)
        assert (error.type, error.round, error.body) == (MessageType.ERROR, 2, {"code": 4422, "reason": "val_dice is NaN"})


# =========================================================================== SiteSession


def site_session(**options: Any) -> SiteSession:
    session = SiteSession("nci", server="wss://server:8443", **options)
    session.connect()
    return session


def joined_site(**options: Any) -> SiteSession:
    session = site_session(**options)
    session.data_to_send()
    assert session.receive(frame(MessageType.WELCOME, site="nci", body={"version": 1, "rounds": 5})) == [Welcomed(1, 5)]
    return session


class TestSiteHandshake:
    def test_connect_queues_hello(self) -> None:
        session = site_session()
        assert sent(session) == [Message(MessageType.HELLO, site="nci", body={"versions": [PROTOCOL_VERSION]})]
        assert session.state is SiteState.HELLO_SENT

    def test_welcome_with_the_same_settings(self) -> None:
        session = site_session(settings=SETTINGS)
        welcome = frame(MessageType.WELCOME, site="nci", body={"version": 1, "rounds": 5, "config": SETTINGS})
        assert session.receive(welcome) == [Welcomed(1, 5)]
        assert session.state is SiteState.JOINED and session.joined == 1

    def test_welcome_with_other_settings_names_the_keys_and_tells_the_server(self) -> None:
        mine = {"fold": 1, "train": {"network": "unet", "patch_size": [16, 16, 8]}}
        session = site_session(settings=mine)
        session.data_to_send()
        [event] = session.receive(frame(MessageType.WELCOME, body={"version": 1, "config": SETTINGS}))
        assert isinstance(event, ServerError)
        assert "differ from the server's: fold: 1 here vs 0 on the server; train.network: 'unet' here vs 'unet-small'" in event.reason
        assert event.reason.endswith("Use the study's study.toml and --fold")
        [error] = sent(session)
        assert error.body["code"] == ErrorCode.SETTINGS_MISMATCH and "train.network" in error.body["reason"]
        assert session.state is SiteState.FAILED and session.joined == 0

    def test_refusal(self) -> None:
        refuse = frame(MessageType.REFUSE, body={"code": 4403, "reason": "certificate identity 'nci' is not a site of this study"})
        assert site_session().receive(refuse) == [
            ServerError("server refused the connection: certificate identity 'nci' is not a site of this study (UNKNOWN_SITE 4403)")
        ]

    def test_train_before_welcome_breaks_the_protocol(self) -> None:
        session = site_session()
        session.data_to_send()
        [event] = session.receive(frame(MessageType.TRAIN, 0, body={"epochs": 1}, tensors=WEIGHTS))
        assert event == ServerError("the server broke the protocol: the server sent TRAIN before WELCOME")
        assert sent(session)[0].body["code"] == 4400


class TestSiteRounds:
    def test_train_requested(self) -> None:
        [event] = joined_site().receive(frame(MessageType.TRAIN, 3, body={"epochs": 2}, tensors=WEIGHTS))
        assert isinstance(event, TrainRequested) and (event.round, event.epochs) == (3, 2)
        assert_same_weights(event.weights, WEIGHTS)

    def test_iterations_are_not_supported(self) -> None:
        session = joined_site()
        [event] = session.receive(frame(MessageType.TRAIN, 3, body={"iterations": 50}, tensors=WEIGHTS))
        assert event == ServerError("the server broke the protocol: this client trains whole local epochs per round, not iterations")
        assert sent(session)[0].type is MessageType.ERROR and session.state is SiteState.FAILED

    def test_update_message_and_audit_record(self) -> None:
        session = joined_site()
        record = session.send_update(3, LocalUpdate(WEIGHTS, 12, 0.75, {"train_loss": 0.25}))
        frames = session.data_to_send()
        [update] = [decode(f, max_size=MAX) for f in frames]
        assert (update.type, update.round, update.site) == (MessageType.UPDATE, 3, "nci")
        assert update.body == {"num_samples": 12, "val_dice": 0.75, "metrics": {"train_loss": 0.25}}
        assert record == {
            "server": "wss://server:8443", "round": 3, "site": "nci", "message": "UPDATE",
            "bytes_sent": sum(map(len, frames)), "sha256": hashlib.sha256(b"".join(frames)).hexdigest(),
            "tensors": sorted(WEIGHTS),
            "scalars": {"num_samples": 12, "val_dice": 0.75, "train_loss": 0.25},
        }

    def test_an_update_without_validation_dice_is_not_sent(self) -> None:
        session = joined_site()
        with pytest.raises(FedsegError, match=r"round 3: this site's update cannot be sent: body.val_dice"):
            session.send_update(3, LocalUpdate(WEIGHTS, 12, float("nan")))
        assert session.data_to_send() == []

    def test_rejected_update_is_not_fatal(self) -> None:
        session = joined_site()
        rejected = frame(MessageType.ERROR, 2, body={"code": 4422, "reason": "tensor 'w' is not finite"})
        assert session.receive(rejected) == [UpdateRefused(2, "tensor 'w' is not finite")]
        assert session.state is SiteState.JOINED

    def test_error_ends_the_session(self) -> None:
        failed = frame(MessageType.ERROR, body={"code": 4409, "reason": "round 0: 2 update(s) accepted, min_sites is 3"})
        assert joined_site().receive(failed) == [
            ServerError("server ended the session: round 0: 2 update(s) accepted, min_sites is 3 (STUDY_FAILED 4409)")
        ]

    def test_heartbeat_and_unexpected(self) -> None:
        session = joined_site()
        assert session.receive(frame(MessageType.HEARTBEAT, body={"seq": 3})) == []
        assert session.receive(UPDATE) == [Ignored(MessageType.UPDATE)]


class TestSiteEnd:
    def finished_site(self, **options: Any) -> SiteSession:
        session = joined_site(**options)
        [event] = session.receive(frame(MessageType.MODEL, 4, body={"model": "final", "val_dice": 0.8}, tensors=FINAL))
        assert isinstance(event, ModelReceived) and (event.name, event.round, event.val_dice) == ("final", 4, 0.8)
        [best] = session.receive(frame(MessageType.MODEL, 2, body={"model": "best", "val_dice": 0.9}, tensors=WEIGHTS))
        assert isinstance(best, ModelReceived) and best.name == "best"
        return session

    def test_evaluate_by_name_uses_the_model_received(self) -> None:
        session = self.finished_site()
        [event] = session.receive(frame(MessageType.EVALUATE, 4, body={"model": "final"}))
        assert isinstance(event, EvaluateRequested) and (event.round, event.model) == (4, "final")
        assert_same_weights(event.weights, FINAL)

    def test_evaluate_with_its_own_tensors(self) -> None:
        [event] = joined_site().receive(frame(MessageType.EVALUATE, 4, body={"model": "best"}, tensors=WEIGHTS))
        assert isinstance(event, EvaluateRequested)
        assert_same_weights(event.weights, WEIGHTS)

    def test_evaluate_of_a_model_never_sent(self) -> None:
        [event] = joined_site().receive(frame(MessageType.EVALUATE, 4, body={"model": "best"}))
        assert event == ServerError("the server broke the protocol: EVALUATE names the best model, which the server never sent")

    def test_result_is_pseudonymised_unless_names_are_shared(self) -> None:
        scores = {"patient-17": 0.5, "patient-03": 0.75}
        session = joined_site()
        record = session.send_result(4, "final", scores)
        [result] = sent(session)
        assert result.body == {"model": "final", "case_dice": {"case-001": 0.5, "case-002": 0.75}}
        assert record["message"] == "RESULT" and record["tensors"] == [] and record["scalars"]["case_dice"] == result.body["case_dice"]
        shared = joined_site(share_case_names=True)
        shared.send_result(4, "final", scores)
        assert sent(shared)[0].body["case_dice"] == scores
        none = joined_site()
        none.send_result(4, "final", None)
        assert sent(none)[0].body["case_dice"] == {}
        assert pseudonymise({"a": 1.0}) == {"case-001": 1.0}

    def test_done_returns_the_final_model(self) -> None:
        session = self.finished_site()
        [event] = session.receive(frame(MessageType.DONE, body={"rounds": 5, "best_round": 2, "best_dice": 0.9}))
        assert isinstance(event, Done) and event.rounds == 5
        assert_same_weights(event.weights, FINAL)
        assert session.state is SiteState.DONE and session.receive(UPDATE) == []


class TestSiteDefences:
    """A malicious or broken server cannot make a site train without bound or act as a Dice oracle."""

    def test_more_epochs_or_rounds_than_the_site_agreed_end_the_session(self) -> None:
        session = joined_site(limits=SiteLimits(epochs_per_round=2, rounds=5))
        [event] = session.receive(frame(MessageType.TRAIN, 0, body={"epochs": 2}, tensors=WEIGHTS))
        assert isinstance(event, TrainRequested) and event.epochs == 2
        [event] = session.receive(frame(MessageType.TRAIN, 1, body={"epochs": 2**62}, tensors=WEIGHTS))
        assert isinstance(event, ServerError) and "allows 2" in event.reason and session.state is SiteState.FAILED
        late = joined_site(limits=SiteLimits(epochs_per_round=1, rounds=5))
        [event] = late.receive(frame(MessageType.TRAIN, 5, body={"epochs": 1}, tensors=WEIGHTS))
        assert isinstance(event, ServerError) and "has 5 rounds" in event.reason

    def test_each_model_is_evaluated_once_and_the_same_result_sent_again(self) -> None:
        session = TestSiteEnd().finished_site()
        [event] = session.receive(frame(MessageType.EVALUATE, 4, body={"model": "final"}))
        assert isinstance(event, EvaluateRequested)
        session.send_result(4, "final", {"p1": 0.7})
        [first] = sent(session)
        # a reconnection during the final step: the same model again, the same answer, no new evaluation
        [again] = session.receive(frame(MessageType.EVALUATE, 4, body={"model": "final"}))
        assert again == EvaluationRepeated("final")
        [repeated] = sent(session)
        assert repeated.body == first.body
        # other weights under the same name: an oracle on the site's test labels, refused
        other = {k: np.asarray(v + 7) for k, v in WEIGHTS.items()}
        [event] = session.receive(frame(MessageType.EVALUATE, 4, body={"model": "final"}, tensors=other))
        assert isinstance(event, ServerError) and "evaluated once per study" in event.reason

    def test_a_diverged_round_is_reported_not_sent(self) -> None:
        assert local_problem(LocalUpdate(WEIGHTS, 3, 0.5)) is None
        assert "Dice" in local_problem(LocalUpdate(WEIGHTS, 3, float("nan")))
        nan = {**WEIGHTS, "conv.weight": np.full((2, 3), np.nan, np.float32)}
        assert "non-finite" in local_problem(LocalUpdate(nan, 3, 0.5))
        session = joined_site()
        record = session.send_training_failed(3, "non-finite weights")
        [error] = sent(session)
        assert (error.type, error.round, error.body["code"]) == (MessageType.ERROR, 3, ErrorCode.TRAINING_FAILED)
        assert record["message"] == "ERROR" and len(record["sha256"]) == 64
        assert session.state is SiteState.JOINED  # not fatal: the next TRAIN is answered

    def test_every_message_is_audited_before_it_is_sent(self) -> None:
        session = site_session()
        [hello] = session.audit_to_write()
        assert hello["message"] == "HELLO" and hello["sha256"] == hashlib.sha256(b"".join(session.data_to_send())).hexdigest()


class TestServerSideTrainingFailed:
    def test_training_failed_is_an_event_not_a_departure(self) -> None:
        session = joined_server()
        failed = frame(MessageType.ERROR, 3, body={"code": int(ErrorCode.TRAINING_FAILED), "reason": "NaN loss"})
        assert session.receive(failed) == [TrainingFailed(3, "NaN loss")]
        assert session.state is ServerState.OPEN
        [event] = session.receive(frame(MessageType.ERROR, body={"code": int(ErrorCode.TRAINING_FAILED), "reason": "x"}))
        assert isinstance(event, SiteLeft) and "name its round" in event.reason


class TestSiteConnections:
    def test_close_codes(self) -> None:
        session = joined_site()
        assert session.closed(4409, "quorum lost") == ServerError("server closed the connection: quorum lost (4409)")
        assert session.closed(4505, "") == ServerError("server closed the connection: VERSION_MISMATCH (4505)")
        assert session.closed(1006, None) == ConnectionDropped("connection closed before the study ended (code 1006, no reason)")
        assert session.state is SiteState.IDLE and session.receive(UPDATE) == []

    def test_models_outlive_a_reconnection(self) -> None:
        session = TestSiteEnd().finished_site()
        session.closed(None, "")
        session.connect()
        assert sent(session)[0].type is MessageType.HELLO
        session.receive(frame(MessageType.WELCOME, body={"version": 1}))
        [event] = session.receive(frame(MessageType.EVALUATE, 4, body={"model": "best"}))
        assert isinstance(event, EvaluateRequested) and session.joined == 2
        assert_same_weights(event.weights, WEIGHTS)

    def test_reconnecting_drops_a_half_received_message(self) -> None:
        session = joined_site()
        chunks = split(Message(MessageType.TRAIN, 1, body={"epochs": 1}, tensors=WEIGHTS), 60)
        assert session.receive(chunks[0]) == []
        session.closed(None, "")
        session.connect()
        session.receive(frame(MessageType.WELCOME, body={"version": 1}))
        assert [session.receive(c) for c in chunks[1:]][-1] == []  # the first chunk was forgotten
