"""Secure aggregation without a network: Shamir sharing, the fixed-point bound, masking, dropouts, refusals.

The harness (secagg_helpers.Harness) runs the server's SecureRound against each
site's SiteSecureRound and records every message the server is handed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedseg.federation.protocol.errors import BadMessage
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.secagg import SecAggError, SecureSettings, shamir
from fedseg.federation.protocol.secagg.masking import RING32, RING64, SCALARS, quantize, sum_error_bound
from fedseg.federation.protocol.secagg.server import SecureFailed, SecureOutcome, SecureRefusal, Stage

sys.path.insert(0, str(Path(__file__).parent))
from secagg_helpers import Harness, credentials_for  # noqa: E402

SITES = ["nci", "suny", "ucla"]


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def trained(global_weights: dict[str, np.ndarray], seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {
        name: (array + rng.normal(scale=scale, size=array.shape).astype(np.float32)) if array.dtype.kind == "f" else np.asarray(array + 3)
        for name, array in global_weights.items()
    }


DICE = {"nci": 0.81, "suny": 0.62, "ucla": 0.74, "s4": 0.55, "s5": 0.9}


def run_round(h: Harness, updates: dict[str, dict[str, np.ndarray]], *, drop_before_masking=(), drop_before_reveal=(),
              tamper_reveal=None) -> None:
    """Every stage in order; sites in ``drop_*`` leave at that point (their connection is gone)."""
    h.deal()
    for site in h.sites:
        if site in drop_before_masking:
            h.drop(site)
        elif h.site_rounds[site].ready:
            h.send(site, h.site_rounds[site].masked_message(updates[site], 10, DICE[site])[0])
    for site in h.sites:
        if site in drop_before_reveal:
            h.drop(site)
            continue
        for message in h.inbox.pop(site, []):
            reveal = h.site_rounds[site].on_unmask(message)
            h.send(site, tamper_reveal(site, reveal) if tamper_reveal else reveal)


def plain_mean(global_weights, updates, sites):
    total = sum(max(DICE[s], 1e-3) for s in sites)
    return {
        name: sum(DICE[s] / total * updates[s][name].astype(np.float64) for s in sites)
        for name, array in global_weights.items() if array.dtype.kind == "f"
    }


def assert_mean(result: SecureOutcome, global_weights, updates, sites) -> None:
    """The unmasked mean is the plain Dice-weighted mean of ``sites``, within the fixed point's stated bound."""
    bound = sum_error_bound(len(result.sites), result.fraction_bits) / sum(DICE[s] for s in sites)
    for name, mean in plain_mean(global_weights, updates, sites).items():
        np.testing.assert_allclose(result.mean[name], mean, rtol=0, atol=bound + 1e-12)


def outcome(h: Harness) -> SecureOutcome:
    results = [o for o in h.outcomes if isinstance(o, SecureOutcome | SecureFailed)]
    assert len(results) == 1, h.outcomes
    assert isinstance(results[0], SecureOutcome), results[0]
    return results[0]


# ----------------------------------------------------------------------------- Shamir


def test_any_threshold_shares_recover_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, range(1, 6), 3)
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="2 share"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    forged = {1: shares[1], 2: shares[2], 3: (shares[3] + 2**400) % shamir.PRIME}
    with pytest.raises(ValueError):  # the changed share moves the secret out of the 32-byte range
        shamir.combine(forged, 3)
    with pytest.raises(BadMessage):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(("n_sites", "ring_bits"), [(3, 64), (5, 64), (3, 32), (5, 32)])
def test_unmasked_sum_is_the_plain_weighted_mean_within_the_quantisation_bound(n_sites: int, ring_bits: int) -> None:
    sites = (SITES + ["s4", "s5"])[:n_sites]
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(sites)}
    h = Harness(g, sites, settings=SecureSettings(ring_bits=ring_bits))
    run_round(h, updates)
    result = outcome(h)
    expected = plain_mean(g, updates, sites)
    weight_sum = sum(DICE[s] for s in sites)
    bound = sum_error_bound(n_sites, result.fraction_bits) / weight_sum
    for name, mean in expected.items():
        error = np.abs(result.mean[name] - mean).max()
        assert error <= bound + 1e-12, (name, error, bound)
    if ring_bits == 32:  # the coarser ring's error is visible, and within its bound
        assert result.fraction_bits < 30 and max(np.abs(result.mean[n] - m).max() for n, m in expected.items()) > 1e-12
    assert result.sums["count"] == pytest.approx(n_sites)
    assert result.sums["weight"] == pytest.approx(weight_sum)
    assert result.sums["dice"] == pytest.approx(weight_sum)
    assert result.sites == sorted(sites)


def test_the_quantisation_bound_is_tight_enough_to_matter() -> None:
    """With few fraction bits the error is visible but stays inside the stated bound."""
    values = [np.random.default_rng(i).normal(size=1000) for i in range(3)]
    bits = 10
    total = sum(quantize(v, bits) for v in values)
    error = np.abs(total.view(np.int64) / 2.0**bits - sum(values)).max()
    assert 0 < error <= sum_error_bound(3, bits)


def test_clipping_bounds_the_change_before_masking() -> None:
    g = model()
    h = Harness(g, SITES, settings=SecureSettings(clip_ratio=0.01))
    big = {site: trained(g, i, scale=1.0) for i, site in enumerate(SITES)}
    h.deal()
    report = h.site_rounds["nci"].masked_message(big["nci"], 10, DICE["nci"])[1]
    assert report.clipped and report.sent_norm == pytest.approx(report.bound) and report.norm > 10 * report.bound


# ----------------------------------------------------------------------------- what the server sees


def test_a_masked_payload_is_uniform_whatever_the_update() -> None:
    """The masked payload of a zero update and of a real one are both indistinguishable from uniform ring elements."""
    g = model()
    sends = {}
    for label, update in (("zero", dict(g)), ("real", trained(g, 0, scale=0.5))):
        h = Harness(g, SITES)
        updates = {site: update for site in SITES}
        run_round(h, updates)
        sends[label] = [m for m in h.seen_by_server if m.type is MessageType.MASKED and m.site == "nci"][0]
    for label, message in sends.items():
        values = np.concatenate([a.ravel() for a in message.tensors.values()])
        top_bytes = (values >> values.dtype.type(8 * values.dtype.itemsize - 8)).astype(np.int64)  # each element's top byte
        counts = np.bincount(top_bytes, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4, label
    # the same test does see the update when it is sent unmasked
    plain = quantize(trained(g, 0, scale=0.5)["conv.weight"] - g["conv.weight"], 40)
    assert stats.chisquare(np.bincount((plain >> np.uint64(56)).astype(np.int64), minlength=256)).pvalue < 1e-6
    # and the two masked payloads are unrelated: their difference is not the difference of the updates
    a, b = (np.concatenate([x.ravel() for x in sends[k].tensors.values()]) for k in ("zero", "real"))
    assert stats.pearsonr(a.astype(np.float64), b.astype(np.float64)).pvalue > 1e-4


def test_the_server_is_handed_masked_ring_elements_only() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    h = Harness(g, SITES)
    run_round(h, updates)
    outcome(h)
    kinds = {m.type for m in h.seen_by_server}
    assert kinds == {MessageType.KEYS, MessageType.SHARES, MessageType.MASKED, MessageType.REVEAL}
    ring = h.server.ring
    for message in h.seen_by_server:
        for name, array in message.tensors.items():
            assert array.dtype == ring.dtype  # unsigned ring elements, never a float tensor
            if name != SCALARS:  # no tensor equals the site's quantised weighted change
                site = message.site
                change = (updates[site][name].astype(np.float64) - g[name]) * DICE[site]
                assert not np.array_equal(array.ravel(), quantize(change, message.body["fraction_bits"], ring))
    # the server's object keeps sums, not sites' tensors: nothing of a site's size is left once unmasked
    assert h.server._sum == {} and h.server._reveals.keys() == set(SITES)


# ----------------------------------------------------------------------------- dropouts and the threshold


def test_one_of_three_dropping_after_dealing_is_recovered() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    h = Harness(g, SITES)
    run_round(h, updates, drop_before_masking=("suny",))
    result = outcome(h)
    assert result.sites == ["nci", "ucla"] and any("suny dropped out" in note for note in result.notes)
    assert_mean(result, g, updates, ["nci", "ucla"])


def test_a_survivor_leaving_before_it_reveals_is_recovered_too() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    h = Harness(g, SITES)
    run_round(h, updates, drop_before_reveal=("ucla",))
    result = outcome(h)
    assert result.sites == SITES  # its update is in the sum; the other two's shares unmask its seed
    assert any("ucla left before revealing its shares" in note for note in result.notes)
    assert_mean(result, g, updates, SITES)


def test_dropouts_beyond_the_threshold_fail_the_round_with_the_reason() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    h = Harness(g, SITES)
    run_round(h, updates, drop_before_masking=("suny", "ucla"))
    (failed,) = [o for o in h.outcomes if isinstance(o, SecureFailed)]
    assert "1 site(s) sent a masked update, 2 are needed to unmask (the threshold)" in failed.reason
    assert "suny: disconnected" in failed.reason and h.server._sum == {}


def test_reveals_below_the_threshold_fail_the_round() -> None:
    g = model()
    h = Harness(g, SITES, settings=SecureSettings(threshold=3))
    run_round(h, {site: trained(g, i) for i, site in enumerate(SITES)}, drop_before_reveal=("nci",))
    (failed,) = [o for o in h.outcomes if isinstance(o, SecureFailed)]
    assert "2 site(s) revealed valid shares, 3 are needed" in failed.reason


# ----------------------------------------------------------------------------- malformed and forged messages


def test_a_site_dealing_malformed_shares_is_named_and_left_out() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}

    def tamper(site: str, message: Message) -> Message:
        if site == "suny" and message.type is MessageType.SHARES:
            shares = dict(message.body["shares"])
            shares.pop("nci")  # no share for one roster site
            return Message(MessageType.SHARES, round=message.round, site=site, body={"shares": shares})
        return message

    h = Harness(g, SITES, tamper=tamper)
    run_round(h, updates)
    refusals = [o for o in h.outcomes if isinstance(o, SecureRefusal)]
    assert [r.site for r in refusals] == ["suny"] and "not for the round's roster" in refusals[0].reason
    result = outcome(h)
    assert result.sites == ["nci", "ucla"]
    assert_mean(result, g, updates, ["nci", "ucla"])


def test_a_site_revealing_a_forged_share_is_identified_and_its_shares_not_used() -> None:
    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}

    def forge(site: str, reveal: Message) -> Message:
        if site != "ucla":
            return reveal
        seeds = dict(reveal.body["seeds"])
        seeds["nci"] = (shamir.encode_share((shamir.decode_share(bytes.fromhex(seeds["nci"])) + 1) % shamir.PRIME)).hex()
        return Message(MessageType.REVEAL, round=reveal.round, site=site, body={**reveal.body, "seeds": seeds})

    h = Harness(g, SITES)
    run_round(h, updates, tamper_reveal=forge)
    (refusal,) = [o for o in h.outcomes if isinstance(o, SecureRefusal)]
    assert refusal.site == "ucla" and refusal.in_sum and "seed share of nci" in refusal.reason
    result = outcome(h)  # two honest reveals reach the threshold
    assert result.sites == SITES and any("ucla's REVEAL was not used" in note for note in result.notes)
    assert_mean(result, g, updates, SITES)


def test_round_keys_not_signed_by_the_sites_certificate_are_refused() -> None:
    g = model()
    _, strangers = credentials_for(SITES)  # the same names, certificates of another CA

    def swap_certificate(site: str, message: Message) -> Message:
        if site == "nci" and message.type is MessageType.KEYS:
            body = {**message.body, "certificate": strangers["nci"].certificate_pem}
            return Message(MessageType.KEYS, round=message.round, site=site, body=body)
        return message

    h = Harness(g, SITES, tamper=swap_certificate)
    for site in SITES:
        h.send(site, h.site_rounds[site].keys_message())
    (refusal,) = [o for o in h.outcomes if isinstance(o, SecureRefusal)]
    assert refusal.site == "nci" and "not issued by the study CA" in refusal.reason
    assert h.server.stage is Stage.SHARES and sorted(h.server.roster) == ["suny", "ucla"]


def test_a_site_refuses_a_roster_with_a_substituted_key() -> None:
    g = model()
    h = Harness(g, SITES)
    for site in SITES:
        h.send(site, h.site_rounds[site].keys_message())
    roster = h.inbox["nci"][0]
    entry = dict(roster.body["sites"]["suny"])
    entry["mask_pk"] = "00" * 32  # the server's own key in place of suny's
    forged = Message(MessageType.ROSTER, round=0, body={**roster.body, "sites": {**roster.body["sites"], "suny": entry}})
    with pytest.raises(SecAggError, match="suny are not signed"):
        h.site_rounds["nci"].on_roster(forged)
    lowered = Message(MessageType.ROSTER, round=0, body={**roster.body, "threshold": 3})
    with pytest.raises(SecAggError, match="threshold 3"):
        h.site_rounds["nci"].on_roster(lowered)


def test_a_site_never_reveals_both_secrets_of_one_site() -> None:
    g = model()
    h = Harness(g, SITES)
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    h.deal()
    h.site_rounds["nci"].masked_message(updates["nci"], 10, 0.8)
    both = Message(MessageType.UNMASK, round=0, body={"survivors": ["nci", "suny", "ucla"], "dropped": ["suny"]})
    with pytest.raises(SecAggError, match="survivors and dropped"):
        h.site_rounds["nci"].on_unmask(both)
    fair = Message(MessageType.UNMASK, round=0, body={"survivors": ["nci", "ucla"], "dropped": ["suny"]})
    reveal = h.site_rounds["nci"].on_unmask(fair)
    assert set(reveal.body["seeds"]) == {"nci", "ucla"} and set(reveal.body["keys"]) == {"suny"}
    again = Message(MessageType.UNMASK, round=0, body={"survivors": ["nci", "suny", "ucla"], "dropped": []})
    with pytest.raises(SecAggError, match="second UNMASK"):  # asked again with suny as a survivor: refused
        h.site_rounds["nci"].on_unmask(again)


def test_settings_refuse_what_cannot_be_secure() -> None:
    with pytest.raises(ValueError, match="threshold must be >= 2"):
        SecureSettings(threshold=1)
    with pytest.raises(ValueError, match="clip_ratio"):
        SecureSettings(clip_ratio=math.inf)
    with pytest.raises(ValueError, match="32 or 64"):
        SecureSettings(ring_bits=16)
    with pytest.raises(ValueError, match="secure_ring_bits = 64"):  # sample counts up to 2^20 do not fit 32 bits
        SecureSettings("sample-weighted", ring_bits=32).scale(10.0, 3)
    assert SecureSettings().scale(29.5, 3) == (RING64, 52) and SecureSettings(ring_bits=32).scale(29.5, 3) == (RING32, 23)
    assert SecureSettings("sample-weighted").scale(29.5, 3) == (RING64, 35)
    assert SecureSettings().threshold_for(3) == 2 and SecureSettings().threshold_for(2) == 2
    assert SecureSettings().threshold_for(10) == 6
    assert dataclasses.replace(SecureSettings(), weighting="uniform").weight(10, 0.0) == 1.0


# ----------------------------------------------------------------------------- the site session


def test_a_site_session_leaves_only_the_round_when_its_roster_is_forged() -> None:
    """A ROSTER that fails the site's checks: TRAINING_FAILED for that round, the site stays joined; nothing is masked."""
    from fedseg.federation.protocol.chunks import to_frames
    from fedseg.federation.protocol.frames import decode
    from fedseg.federation.protocol.participant import LocalUpdate
    from fedseg.federation.protocol.session import SecureRoundAbandoned, SiteSession, SiteState, train_frames

    g = model()
    h = Harness(g, SITES)
    session = SiteSession("nci", secure=SecureSettings(), credentials=h.credentials["nci"])
    session.connect()
    session.receive(to_frames(Message(MessageType.WELCOME, site="nci", body={"version": 1, "rounds": 3}))[0])
    session.data_to_send()
    events = [e for f in train_frames(0, g, 1) for e in session.receive(f)]
    (keys,) = [decode(f, max_size=1 << 30) for f in session.data_to_send()]
    assert keys.type is MessageType.KEYS and events[-1].round == 0  # the keys leave before the epoch
    assert session.secure_round_waiting_roster(0)
    h.send("nci", keys)
    for site in ("suny", "ucla"):
        h.send(site, h.site_rounds[site].keys_message())
    roster = h.inbox["nci"][0]
    forged = Message(MessageType.ROSTER, round=0, body={**roster.body, "clip_norm": roster.body["clip_norm"] * 10})
    events = [e for f in to_frames(forged) for e in session.receive(f)]
    assert isinstance(events[0], SecureRoundAbandoned) and "clip bound" in events[0].reason
    (error,) = [decode(f, max_size=1 << 30) for f in session.data_to_send()]
    assert error.type is MessageType.ERROR and error.round == 0 and error.body["code"] == 4424
    assert session.state is SiteState.JOINED and not session.secure_round_open(0)
    assert session.send_update(0, LocalUpdate(trained(g, 0), 10, 0.8)) is None and session.data_to_send() == []


def test_fedadam_steps_from_the_unmasked_mean_as_from_the_plain_one() -> None:
    from fedseg.federation.strategies import FedAdam, Update, WeightedMean, make_aggregator, secure_mean_of
    from fedseg.federation.strategies.screening import NO_SCREENING

    g = model()
    updates = {site: trained(g, i) for i, site in enumerate(SITES)}
    plain = FedAdam(WeightedMean("dice-weighted", NO_SCREENING))
    plain.start_round(g)
    for site in SITES:
        plain.add(Update(site, updates[site], 10, DICE[site]))
    expected = plain.finish()
    secure = make_aggregator("dice-weighted", "fedadam", secure=True)
    secure.start_round(g)
    mean = plain_mean(g, updates, SITES)
    secure_mean_of(secure).set_mean(mean, SITES, {"weight": 1.0, "weighted_dice": 0.7, "dice": 1.0, "count": 3.0}, [])
    result = secure.finish()
    for name, array in g.items():
        if array.dtype.kind == "f":
            np.testing.assert_allclose(result.weights[name], expected.weights[name], rtol=1e-6)
        else:  # integer buffers are not aggregated under secure aggregation: the global model keeps its own
            assert np.array_equal(result.weights[name], array)
    with pytest.raises(Exception, match="aggregates securely"):
        secure.add(Update("nci", updates["nci"], 10, 0.8))
