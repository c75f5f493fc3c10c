"""Aggregation strategies: hand-computed rounds, update checks and hypothesis properties."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedseg.errors import FedsegError
from fedseg.federation.strategies import (
    MemoryStore,
    AGGREGATORS,
    NO_SCREENING,
    AdamOptions,
    Aggregator,
    CoordinateMedian,
    FedAdam,
    RoundResult,
    Screening,
    TrimmedMean,
    Update,
    UpdateRejected,
    WeightedMean,
    Weighting,
    make_aggregator,
    validate_update,
)

# the plain means of the paper and FedAvg: the round's screening (norm bound, share cap) is tested below
dice_weighted = partial(WeightedMean, "dice-weighted", NO_SCREENING)
sample_weighted = partial(WeightedMean, "sample-weighted", NO_SCREENING)
uniform = partial(WeightedMean, "uniform", NO_SCREENING)
MEANS: list[Callable[[], Aggregator]] = [dice_weighted, sample_weighted, uniform]
ALL_AGGREGATORS: list[Callable[[], Aggregator]] = [*MEANS, lambda: FedAdam(dice_weighted())]
SCREENED: list[Callable[[], Aggregator]] = [partial(WeightedMean, "dice-weighted"), CoordinateMedian, TrimmedMean]


def model(w: list[float], b: float = 0.0, steps: int = 0) -> dict[str, np.ndarray]:
    """A tiny state dict: a float32 vector, a float32 scalar, an int64 BatchNorm counter."""
    return {
        "conv.weight": np.array(w, dtype=np.float32),
        "conv.bias": np.array(b, dtype=np.float32),
        "bn.num_batches_tracked": np.array(steps, dtype=np.int64),
    }


def update(site: str, weights: dict[str, np.ndarray], dice: float = 0.5, n: int = 10) -> Update:
    return Update(site=site, weights=weights, num_samples=n, val_dice=dice)


def run_round(aggregator: Aggregator, global_weights: dict[str, np.ndarray], updates: list[Update]) -> RoundResult:
    aggregator.start_round(global_weights)
    for u in updates:
        aggregator.add(u)
    return aggregator.finish()


GLOBAL = model([0.0, 0.0])
THREE_SITES = [
    update("nci", model([1.0, 2.0], b=1.0, steps=5), dice=0.8, n=30),
    update("suny", model([3.0, 0.0], b=2.0, steps=7), dice=0.6, n=10),
    update("ucla", model([0.0, 4.0], b=4.0, steps=9), dice=0.6, n=60),
]


# --- hand-computed rounds -------------------------------------------------------------------------


def test_dice_weighted_by_hand() -> None:
    # weights 0.8, 0.6, 0.6 -> 0.4, 0.3, 0.3
    # conv.weight: 0.4*[1,2] + 0.3*[3,0] + 0.3*[0,4] = [1.3, 2.0]; bias: 0.4 + 0.6 + 1.2 = 2.2
    result = run_round(dice_weighted(), GLOBAL, THREE_SITES)
    assert result.site_weights == pytest.approx({"nci": 0.4, "suny": 0.3, "ucla": 0.3})
    assert result.raw_weights == {"nci": 0.8, "suny": 0.6, "ucla": 0.6}
    assert result.sites == ["nci", "suny", "ucla"]
    np.testing.assert_allclose(result.weights["conv.weight"], [1.3, 2.0], rtol=1e-6)
    np.testing.assert_allclose(result.weights["conv.bias"], 2.2, rtol=1e-6)
    assert result.weights["conv.weight"].dtype == np.float32
    assert all(isinstance(a, np.ndarray) for a in result.weights.values())  # 0-d tensors too
    assert result.weights["bn.num_batches_tracked"] == 7  # the lower median of 5, 7, 9: no site's count taken whole
    assert result.notes == []


def test_sample_weighted_by_hand() -> None:
    # 30, 10, 60 samples -> 0.3, 0.1, 0.6
    # conv.weight: 0.3*[1,2] + 0.1*[3,0] + 0.6*[0,4] = [0.6, 3.0]; bias: 0.3 + 0.2 + 2.4 = 2.9
    result = run_round(sample_weighted(), GLOBAL, THREE_SITES)
    assert result.site_weights == pytest.approx({"nci": 0.3, "suny": 0.1, "ucla": 0.6})
    np.testing.assert_allclose(result.weights["conv.weight"], [0.6, 3.0], rtol=1e-6)
    np.testing.assert_allclose(result.weights["conv.bias"], 2.9, rtol=1e-6)
    assert result.weights["bn.num_batches_tracked"] == 7


def test_uniform_by_hand() -> None:
    # conv.weight: ([1,2] + [3,0] + [0,4]) / 3 = [4/3, 2]; bias: 7/3
    result = run_round(uniform(), GLOBAL, THREE_SITES)
    assert result.site_weights == pytest.approx({"nci": 1 / 3, "suny": 1 / 3, "ucla": 1 / 3})
    np.testing.assert_allclose(result.weights["conv.weight"], [4 / 3, 2.0], rtol=1e-6)
    np.testing.assert_allclose(result.weights["conv.bias"], 7 / 3, rtol=1e-6)
    assert result.weights["bn.num_batches_tracked"] == 7


@pytest.mark.parametrize("factory", ALL_AGGREGATORS)
def test_site_weights_sum_to_one(factory: Callable[[], Aggregator]) -> None:
    result = run_round(factory(), GLOBAL, THREE_SITES)
    assert math.fsum(result.site_weights.values()) == pytest.approx(1.0)


def test_add_returns_raw_weight() -> None:
    for aggregator, expected in [(dice_weighted(), 0.8), (sample_weighted(), 30.0), (uniform(), 1.0)]:
        aggregator.start_round(GLOBAL)
        assert aggregator.add(THREE_SITES[0]) == expected


def test_all_zero_dice_falls_back_to_uniform_with_note() -> None:
    updates = [update(u.site, u.weights, dice=0.0) for u in THREE_SITES]
    result = run_round(dice_weighted(), GLOBAL, updates)
    assert result.site_weights == pytest.approx({"nci": 1 / 3, "suny": 1 / 3, "ucla": 1 / 3})
    assert result.raw_weights == {"nci": 0.0, "suny": 0.0, "ucla": 0.0}
    np.testing.assert_allclose(result.weights["conv.weight"], [4 / 3, 2.0], rtol=1e-6)
    assert len(result.notes) == 1 and "uniformly" in result.notes[0]


def test_zero_dice_sites_drop_out_once_a_positive_dice_arrives() -> None:
    # Zero-Dice sites first (summed uniformly for a possible fallback), then one real weight.
    updates = [update("a", model([8.0, 8.0]), dice=0.0), update("b", model([2.0, 4.0]), dice=0.5)]
    updates.append(update("c", model([9.0, 9.0]), dice=0.0))
    result = run_round(dice_weighted(), GLOBAL, updates)
    np.testing.assert_allclose(result.weights["conv.weight"], [2.0, 4.0])
    assert result.site_weights == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert result.notes == []


def test_integer_buffers_are_not_averaged() -> None:
    g = model([0.0, 0.0]) | {"mask": np.array([True, False])}
    a = update("a", model([1.0, 1.0], steps=10) | {"mask": np.array([True, True])}, dice=0.9)
    b = update("b", model([1.0, 1.0], steps=21) | {"mask": np.array([False, False])}, dice=0.1)
    for order in ([a, b], [b, a]):
        result = run_round(dice_weighted(), g, order)
        # element-wise lower median (of two: the smaller), whatever the weights: not 11 (the weighted mean)
        assert result.weights["bn.num_batches_tracked"] == 10
        assert result.weights["bn.num_batches_tracked"].dtype == np.int64
        np.testing.assert_array_equal(result.weights["mask"], [False, False])
        assert result.weights["mask"].dtype == np.bool_


def test_result_does_not_alias_the_updates() -> None:
    u = update("a", model([1.0, 2.0], steps=3))
    result = run_round(uniform(), GLOBAL, [u])
    u.weights["bn.num_batches_tracked"][...] = 99
    u.weights["conv.weight"][...] = 99
    assert result.weights["bn.num_batches_tracked"] == 3
    np.testing.assert_array_equal(result.weights["conv.weight"], [1.0, 2.0])


# --- rejected updates -----------------------------------------------------------------------------


def _with(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    weights = model([1.0, 2.0], b=1.0, steps=3)
    for name, value in changes.items():
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    return weights


BAD_UPDATES = {
    "nan": (update("bad", _with(**{"conv.weight": np.array([np.nan, 1.0], np.float32)})), "non-finite"),
    "inf": (update("bad", _with(**{"conv.bias": np.array(np.inf, np.float32)})), "non-finite"),
    "shape": (update("bad", _with(**{"conv.weight": np.zeros(3, np.float32)})), "shape (3,)"),
    "float dtype": (update("bad", _with(**{"conv.weight": np.zeros(2, np.float64)})), "dtype float64"),
    "int dtype": (update("bad", _with(**{"bn.num_batches_tracked": np.array(3, np.int32)})), "dtype int32"),
    "not an array": (update("bad", _with(**{"conv.weight": [1.0, 2.0]})), "not a numpy"),  # type: ignore[dict-item]
    "none": (update("bad", _with(**{"conv.bias": None}) | {"conv.bias": None}), "NoneType"),  # type: ignore[dict-item]
    "missing": (update("bad", _with(**{"conv.bias": None})), "missing tensors: conv.bias"),
    "extra": (update("bad", _with(**{"head.weight": np.zeros(1, np.float32)})), "unexpected tensors: head.weight"),
    "dice < 0": (update("bad", _with(), dice=-0.1), "val_dice"),
    "dice > 1": (update("bad", _with(), dice=1.5), "val_dice"),
    "dice nan": (update("bad", _with(), dice=float("nan")), "val_dice"),
    "dice bool": (update("bad", _with(), dice=True), "val_dice"),  # type: ignore[arg-type]
    "samples 0": (update("bad", _with(), n=0), "num_samples"),
    "samples < 0": (update("bad", _with(), n=-4), "num_samples"),
    "samples float": (update("bad", _with(), n=3.0), "num_samples"),  # type: ignore[arg-type]
    "metrics": (Update("bad", _with(), 10, 0.5, metrics={"loss": "low"}), "metrics"),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("factory", ALL_AGGREGATORS)
@pytest.mark.parametrize("case", BAD_UPDATES, ids=str)
def test_bad_update_is_rejected_and_leaves_the_sum_untouched(factory: Callable[[], Aggregator], case: str) -> None:
    bad, reason = BAD_UPDATES[case]
    good = update("good", model([5.0, 6.0], b=2.0, steps=4), dice=0.7)
    aggregator = factory()
    aggregator.start_round(GLOBAL)
    aggregator.add(good)
    with pytest.raises(UpdateRejected, match=r"site 'bad'") as error:
        aggregator.add(bad)
    assert error.value.site == "bad"
    assert reason in error.value.reason
    result = aggregator.finish()
    expected = run_round(factory(), GLOBAL, [good])
    assert result.sites == ["good"]
    for name, array in expected.weights.items():
        np.testing.assert_array_equal(result.weights[name], array)


def test_validate_update_modifies_nothing() -> None:
    weights = _with(**{"conv.weight": np.array([np.nan, 1.0], np.float32)})
    before = {n: a.copy() for n, a in weights.items()}
    bad = update("bad", weights)
    with pytest.raises(UpdateRejected):
        validate_update(GLOBAL, bad)
    assert bad.weights is weights and list(weights) == list(before)
    for name, array in before.items():
        np.testing.assert_array_equal(weights[name], array)
        assert weights[name].dtype == array.dtype
    validate_update(GLOBAL, update("ok", model([1.0, 2.0])))  # a good one passes


def test_rejection_lists_all_missing_and_extra_names() -> None:
    weights = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    with pytest.raises(UpdateRejected) as error:
        validate_update(GLOBAL, update("x", weights, dice=2.0))
    message = str(error.value)
    for text in ("'x'", "conv.weight", "conv.bias", "bn.num_batches_tracked", "a, b", "val_dice"):
        assert text in message


def test_a_site_cannot_contribute_twice() -> None:
    aggregator = uniform()
    aggregator.start_round(GLOBAL)
    aggregator.add(THREE_SITES[0])
    with pytest.raises(UpdateRejected, match="already contributed"):
        aggregator.add(THREE_SITES[0])
    assert aggregator.finish().sites == ["nci"]


@pytest.mark.parametrize("factory", ALL_AGGREGATORS)
def test_finish_without_updates_raises(factory: Callable[[], Aggregator]) -> None:
    aggregator = factory()
    aggregator.start_round(GLOBAL)
    with pytest.raises(FedsegError, match="no update"):
        aggregator.finish()


@pytest.mark.parametrize("factory", ALL_AGGREGATORS)
def test_add_or_finish_without_a_round_raises(factory: Callable[[], Aggregator]) -> None:
    aggregator = factory()
    with pytest.raises(FedsegError, match="start_round"):
        aggregator.add(THREE_SITES[0])
    with pytest.raises(FedsegError, match="start_round"):
        aggregator.finish()
    run_round(aggregator, GLOBAL, THREE_SITES)
    with pytest.raises(FedsegError, match="start_round"):  # finish() closes the round
        aggregator.add(THREE_SITES[0])


def test_all_zero_weights_raise_without_fallback() -> None:
    zero = WeightedMean(Weighting("zero", lambda update: 0.0))
    with pytest.raises(FedsegError, match="zero: every site's weight is 0"):
        run_round(zero, GLOBAL, THREE_SITES)


def test_a_weighting_is_a_parameter() -> None:
    # weight by a reported metric: 1 / loss -> 1, 0.5, 0.25 -> 4/7, 2/7, 1/7
    by_loss = WeightedMean(Weighting("inverse-loss", lambda update: 1.0 / update.metrics["loss"]), NO_SCREENING)
    updates = [Update(u.site, u.weights, u.num_samples, u.val_dice, {"loss": loss}) for u, loss in zip(THREE_SITES, [1.0, 2.0, 4.0], strict=True)]
    result = run_round(by_loss, GLOBAL, updates)
    assert result.site_weights == pytest.approx({"nci": 4 / 7, "suny": 2 / 7, "ucla": 1 / 7})
    np.testing.assert_allclose(result.weights["conv.bias"], (4 * 1.0 + 2 * 2.0 + 1 * 4.0) / 7, rtol=1e-6)


def test_negative_weight_is_rejected() -> None:
    aggregator = WeightedMean(Weighting("signed", lambda update: -1.0))
    aggregator.start_round(GLOBAL)
    with pytest.raises(UpdateRejected, match="signed weight -1.0 is not a finite number >= 0"):
        aggregator.add(THREE_SITES[0])


def test_unknown_weighting_name_lists_the_known_ones() -> None:
    with pytest.raises(FedsegError, match="unknown weighting 'krum'; choose one of: dice-weighted, sample-weighted, uniform"):
        WeightedMean("krum")


# --- memory: the round's updates live in the store only ----------------------------------------


class CountingStore(MemoryStore):
    """A memory store that counts what the aggregator reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def get(self, site: str, name: str) -> np.ndarray:
        self.reads.append((site, name))
        return super().get(site, name)


def test_the_updates_wait_in_the_store_and_are_read_once_per_tensor() -> None:
    g = {"a": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float16)}
    store = CountingStore()
    aggregator = WeightedMean("dice-weighted", store=store)
    aggregator.start_round(g)
    rng = np.random.default_rng(0)
    for i in range(50):
        weights = {n: rng.normal(size=a.shape).astype(a.dtype) for n, a in g.items()}
        aggregator.add(update(f"site{i:02d}", weights, dice=float(rng.uniform(0.1, 1))))
    # besides the store, the aggregator holds the round's global model and scalars per site, no update
    held = [v for v in vars(aggregator).values() if isinstance(v, np.ndarray)]
    assert held == [] and all(len(vars(kept)) == 2 for kept in aggregator._kept.values())
    result = aggregator.finish()
    assert sorted(store.reads) == sorted((f"site{i:02d}", n) for i in range(50) for n in g)
    assert result.weights["b"].dtype == np.float16
    assert store._updates == {}  # the round closed: the store is empty


# --- FedAdam --------------------------------------------------------------------------------------


def test_fedadam_one_round_by_hand() -> None:
    g = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array(1, np.int64)}
    site = update("a", {"w": np.array([2.0, 1.0], np.float32), "steps": np.array(6, np.int64)})
    aggregator = FedAdam()  # eta 1e-2, beta1 0.9, beta2 0.99, tau 1e-3, inner dice-weighted
    result = run_round(aggregator, g, [site])
    # delta = [1, -1]; m = 0.1*delta = [0.1, -0.1]; v = 0.01*delta^2 = [0.01, 0.01]
    # step = 0.01 * 0.1 / (sqrt(0.01) + 0.001) = 0.001 / 0.101 = 0.00990099...
    np.testing.assert_allclose(result.weights["w"], [1.0099009901, 1.9900990099], rtol=1e-7)
    assert result.weights["w"].dtype == np.float32
    assert result.weights["steps"] == 6  # integer buffers skip the Adam step
    state = aggregator.state_dict()
    np.testing.assert_allclose(state["m/w"], [0.1, -0.1])
    np.testing.assert_allclose(state["v/w"], [0.01, 0.01])
    assert set(state) == {"m/w", "v/w"}


def test_fedadam_state_round_trip_gives_the_same_next_step() -> None:
    first = FedAdam(sample_weighted(), AdamOptions(eta=0.1))
    g1 = run_round(first, GLOBAL, THREE_SITES).weights
    restarted = FedAdam(sample_weighted(), AdamOptions(eta=0.1))
    restarted.load_state_dict(first.state_dict())
    doubled = [{n: np.asarray(a * 2, a.dtype) for n, a in u.weights.items()} for u in THREE_SITES]
    second_round = [update(u.site, w, u.val_dice, u.num_samples) for u, w in zip(THREE_SITES, doubled, strict=True)]
    a = run_round(first, g1, second_round)
    b = run_round(restarted, g1, second_round)
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    fresh = run_round(FedAdam(sample_weighted(), AdamOptions(eta=0.1)), g1, second_round)
    assert not np.allclose(fresh.weights["conv.weight"], a.weights["conv.weight"])  # the moments matter


def test_fedadam_state_is_a_copy() -> None:
    aggregator = FedAdam()
    run_round(aggregator, GLOBAL, THREE_SITES)
    state = aggregator.state_dict()
    state["m/conv.weight"][...] = 1e9
    assert aggregator.state_dict()["m/conv.weight"].max() < 1e9


@pytest.mark.parametrize(
    "state",
    [
        {"x/conv.weight": np.zeros(2)},
        {"m/conv.weight": np.zeros(2)},
        {"m/conv.weight": np.zeros(2), "v/conv.weight": np.zeros(3)},
        {"m/conv.weight": np.zeros(2), "v/conv.weight": -np.ones(2)},
        {"m/conv.weight": np.full(2, np.nan), "v/conv.weight": np.zeros(2)},
    ],
)
def test_fedadam_rejects_bad_state(state: dict[str, np.ndarray]) -> None:
    with pytest.raises(FedsegError, match="fedadam state"):
        FedAdam().load_state_dict(state)


def test_fedadam_state_for_another_model_is_refused_at_start_round() -> None:
    aggregator = FedAdam()
    aggregator.load_state_dict({"m/other": np.zeros(2), "v/other": np.zeros(2)})
    with pytest.raises(FedsegError, match="moments do not match"):
        aggregator.start_round(GLOBAL)


class Median(Aggregator):
    """A strategy written against the public interface only: the per-element median of the float tensors."""

    name = "median"

    def start_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        super().start_round(global_weights)
        self.updates: list[Update] = []

    def add(self, update: Update) -> float:
        validate_update(self.updates[0].weights if self.updates else GLOBAL, update)
        self.updates.append(update)
        return 1.0

    def aggregate(self) -> RoundResult:
        first = self.updates[0].weights
        weights = {n: np.median([u.weights[n] for u in self.updates], axis=0) if a.dtype.kind == "f" else a for n, a in first.items()}
        share = 1.0 / len(self.updates)
        return RoundResult(weights, {u.site: share for u in self.updates}, {u.site: 1.0 for u in self.updates}, [u.site for u in self.updates])


def test_fedadam_composes_over_any_aggregator() -> None:
    # median of conv.bias over the three sites = 2; delta = 2; m = 0.2; v = 0.04;
    # step = 0.1 * 0.2 / (0.2 + 1e-3) = 0.0995024876
    adam = FedAdam(Median(), AdamOptions(eta=0.1))
    result = run_round(adam, GLOBAL, THREE_SITES)
    np.testing.assert_allclose(result.weights["conv.bias"], 0.1 * 0.2 / 0.201, rtol=1e-6)
    assert result.weights["conv.bias"].dtype == np.float32
    np.testing.assert_allclose(adam.state_dict()["m/conv.bias"], 0.2)
    assert result.site_weights == pytest.approx({"nci": 1 / 3, "suny": 1 / 3, "ucla": 1 / 3})


def test_fedadam_steps_from_the_exact_float64_mean() -> None:
    # the inner mean 1/3 is not a float32: FedAdam must not see it rounded
    g = {"w": np.zeros(1, np.float32)}
    sites = [update(name, {"w": np.array([v], np.float32)}) for name, v in (("a", 1.0), ("b", 0.0), ("c", 0.0))]
    inner = uniform()
    inner.start_round(g)
    for site in sites:
        inner.add(site)
    exact = inner.aggregate().weights["w"]
    assert exact.dtype == np.float64 and exact[0] == pytest.approx(1 / 3, abs=1e-15)
    adam = FedAdam(uniform())
    run_round(adam, g, sites)
    m = adam.state_dict()["m/w"]
    np.testing.assert_allclose(m, 0.1 * exact, rtol=1e-12)
    assert abs(m[0] - 0.1 * float(np.float32(1 / 3))) > 1e-10  # not the float32-rounded mean


def test_a_weighted_mean_keeps_no_state() -> None:
    aggregator = dice_weighted()
    run_round(aggregator, GLOBAL, THREE_SITES)
    assert aggregator.state_dict() is None
    aggregator.load_state_dict({})  # nothing to restore: fine
    with pytest.raises(FedsegError, match="dice-weighted keeps nothing between rounds"):
        aggregator.load_state_dict({"m/conv.weight": np.zeros(2), "v/conv.weight": np.zeros(2)})


# --- registry -------------------------------------------------------------------------------------


def test_make_aggregator() -> None:
    assert set(AGGREGATORS) == {"dice-weighted", "sample-weighted", "uniform", "median", "trimmed-mean"}
    for name in ("dice-weighted", "sample-weighted", "uniform"):
        aggregator = make_aggregator(name)
        assert type(aggregator) is WeightedMean and aggregator.weighting.name == name and aggregator.name == name
        assert aggregator.screening == Screening()  # the norm bound and share cap are on by default
    assert type(make_aggregator("median")) is CoordinateMedian
    trimmed = make_aggregator("trimmed-mean", trim_fraction=0.25, screening=NO_SCREENING)
    assert type(trimmed) is TrimmedMean and trimmed.trim_fraction == 0.25 and trimmed.screening == NO_SCREENING
    adam = make_aggregator("uniform", "fedadam", eta=0.5, tau=1e-6)
    assert isinstance(adam, FedAdam) and isinstance(adam.inner, WeightedMean) and adam.inner.name == "uniform"
    assert adam.options == AdamOptions(eta=0.5, tau=1e-6)


# --- screening: the norm bound and the share cap ----------------------------------------------------


HONEST = [update(site, model([1.0 + i, 2.0 - i], b=0.5), dice=0.8) for i, site in enumerate(("nci", "suny", "ucla"))]


def scaled(weights: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {n: np.asarray(a * factor, a.dtype) if a.dtype.kind == "f" else a.copy() for n, a in weights.items()}


ATTACKS = {
    "x1000": lambda w: scaled(w, 1000.0),
    "x1e6": lambda w: scaled(w, 1e6),
    "float32 max": lambda w: {n: np.full_like(a, np.finfo(np.float32).max) if a.dtype.kind == "f" else a for n, a in w.items()},
}


@pytest.mark.parametrize("factory", SCREENED)
@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_an_oversized_update_is_refused_when_the_round_closes(factory: Callable[[], Aggregator], attack: Callable) -> None:
    liar = update("liar", attack(HONEST[0].weights), dice=1.0, n=2**63 - 1)
    result = run_round(factory(), GLOBAL, [*HONEST, liar])
    assert result.sites == ["nci", "suny", "ucla"] and set(result.refused) == {"liar"}
    assert "exceeds 5 x the round's reference change" in result.refused["liar"]
    clean = run_round(factory(), GLOBAL, HONEST)
    for name, array in clean.weights.items():
        np.testing.assert_array_equal(result.weights[name], array)
    assert result.update_norms["liar"] > 5 * sorted(result.update_norms.values())[1]


def test_the_bound_is_relative_to_the_median_so_honest_spread_passes() -> None:
    # one site moved ~4x further than the others (more cases): within 5 x the median change; 6x is not
    spread = [*HONEST[:2], update("ucla", scaled(HONEST[1].weights, 4.0), dice=0.8)]
    assert run_round(WeightedMean("uniform"), GLOBAL, spread).refused == {}
    spread = [*HONEST[:2], update("ucla", scaled(HONEST[1].weights, 6.0), dice=0.8)]
    assert set(run_round(WeightedMean("uniform"), GLOBAL, spread).refused) == {"ucla"}


def test_a_sign_flipped_update_is_kept_out_of_the_median_by_the_others() -> None:
    flipped = update("liar", scaled(HONEST[0].weights, -1.0), dice=1.0)
    result = run_round(CoordinateMedian(), GLOBAL, [*HONEST, flipped])
    lo = np.minimum.reduce([u.weights["conv.weight"] for u in HONEST])
    hi = np.maximum.reduce([u.weights["conv.weight"] for u in HONEST])
    assert np.all(result.weights["conv.weight"] >= lo) and np.all(result.weights["conv.weight"] <= hi)


def test_with_two_updates_the_previous_rounds_median_bounds_the_round() -> None:
    aggregator = WeightedMean("uniform")
    first = run_round(aggregator, GLOBAL, HONEST)
    assert first.notes == []
    two = [HONEST[0], update("liar", scaled(HONEST[1].weights, 1000.0))]
    result = run_round(aggregator, GLOBAL, two)
    assert set(result.refused) == {"liar"} and "previous round" in result.notes[0]
    fresh = run_round(WeightedMean("uniform"), GLOBAL, two)  # no history: said, not hidden
    assert fresh.refused == {} and "no norm bound this round" in fresh.notes[0]


def test_no_site_takes_more_than_half_of_the_weight() -> None:
    # sample-weighted: 30, 10, 60 samples -> 0.3, 0.1, 0.6; capped: 0.5 and the excess 0.1 to the others 3:1
    result = run_round(WeightedMean("sample-weighted"), GLOBAL, THREE_SITES)
    assert result.site_weights == pytest.approx({"nci": 0.375, "suny": 0.125, "ucla": 0.5})
    assert "capped" in result.notes[0] and "ucla" in result.notes[0]
    liar = [*HONEST, update("liar", HONEST[0].weights, n=2**63 - 1)]
    shares = run_round(WeightedMean("sample-weighted"), GLOBAL, liar).site_weights
    assert shares["liar"] == pytest.approx(0.5) and math.fsum(shares.values()) == pytest.approx(1.0)


def test_the_cap_leaves_zero_weights_at_zero() -> None:
    updates = [update("a", model([8.0, 8.0]), dice=0.0), update("b", model([2.0, 4.0]), dice=0.5)]
    updates.append(update("c", model([9.0, 9.0]), dice=0.0))
    result = run_round(WeightedMean("dice-weighted"), GLOBAL, updates)
    assert result.site_weights == {"a": 0.0, "b": 1.0, "c": 0.0}


@given(st.lists(st.floats(0.0, 1e6), min_size=3, max_size=12), st.floats(0.05, 1.0))
def test_capped_shares_sum_to_one_and_respect_the_cap(raw: list[float], cap: float) -> None:
    total = math.fsum(raw)
    if total == 0:
        return
    shares = {f"s{i}": w / total for i, w in enumerate(raw)}
    capped, _ = Screening(None, cap).capped(shares)
    positive = [w for w in shares.values() if w > 0]
    assert math.fsum(capped.values()) == pytest.approx(1.0)
    assert max(capped.values()) <= max(cap, 1 / len(positive)) + 1e-9
    assert all(capped[site] == 0 for site, w in shares.items() if w == 0)


def test_median_and_trimmed_mean_by_hand() -> None:
    five = [update(f"s{i}", model([v, -v], b=v)) for i, v in enumerate([1.0, 2.0, 3.0, 10.0, -20.0])]
    median = run_round(CoordinateMedian(NO_SCREENING), GLOBAL, five)
    np.testing.assert_allclose(median.weights["conv.weight"], [2.0, -2.0])
    trimmed = run_round(TrimmedMean(0.2, NO_SCREENING), GLOBAL, five)  # drops one at each end: mean of 1, 2, 3
    np.testing.assert_allclose(trimmed.weights["conv.bias"], 2.0)
    assert TrimmedMean(0.0).trimmed(3) == 1 and TrimmedMean(0.4).trimmed(10) == 4 and TrimmedMean(0.1).trimmed(2) == 0
    assert median.site_weights == pytest.approx({u.site: 0.2 for u in five})


def test_screening_settings_are_checked() -> None:
    with pytest.raises(FedsegError, match="max_norm_ratio must be a number >= 1"):
        Screening(0.5)
    with pytest.raises(FedsegError, match="max_site_share must be in"):
        Screening(5.0, 0.0)
    assert Screening(math.inf).max_norm_ratio is None
    with pytest.raises(FedsegError, match="trim_fraction"):
        TrimmedMean(0.5)


@pytest.mark.parametrize(
    ("args", "options", "match"),
    [
        (("fedavg",), {}, "choose one of: dice-weighted, sample-weighted, uniform"),
        (("uniform", "fedyogi"), {}, "choose one of: fedadam"),
        (("uniform",), {"eta": 0.1}, "takes no options"),
        (("uniform", "fedadam"), {"lr": 0.1}, "unknown option"),
        (("uniform", "fedadam"), {"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        (("uniform", "fedadam"), {"eta": 0.0}, "eta must be a number > 0"),
    ],
)
def test_make_aggregator_errors(args: tuple[str, ...], options: dict[str, float], match: str) -> None:
    with pytest.raises(FedsegError, match=match):
        make_aggregator(*args, **options)


@pytest.mark.slow
def test_strategies_import_no_torch() -> None:
    """Importing the package in a fresh interpreter loads neither torch nor any network module."""
    probe = "import sys, fedseg.federation.strategies; print(sorted({'torch', 'websockets', 'ssl', 'asyncio'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


# --- properties -----------------------------------------------------------------------------------

_floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
_shapes = {"w": (3,), "b": (2, 2), "scale": ()}


@st.composite
def site_updates(draw: st.DrawFn, min_sites: int = 1, max_sites: int = 5) -> list[Update]:
    count = draw(st.integers(min_sites, max_sites))
    updates = []
    for i in range(count):
        weights = {n: draw(hnp.arrays(np.float32, shape, elements=_floats)) for n, shape in _shapes.items()}
        weights["steps"] = np.array(draw(st.integers(0, 10**6)), dtype=np.int64)
        dice = draw(st.floats(0.0, 1.0))
        updates.append(Update(f"site{i}", weights, draw(st.integers(1, 10**4)), dice))
    return updates


def _global_like(u: Update) -> dict[str, np.ndarray]:
    return {n: np.zeros_like(a) for n, a in u.weights.items()}


@pytest.mark.parametrize("factory", MEANS)
@settings(max_examples=40, deadline=None)
@given(
    template=site_updates(max_sites=1),
    copies=st.integers(1, 6),
    dices=st.lists(st.floats(0, 1), min_size=6, max_size=6),
)
def test_identical_updates_give_the_same_model(
    factory: Callable[[], Aggregator], template: list[Update], copies: int, dices: list[float]
) -> None:
    weights = template[0].weights
    updates = [Update(f"s{i}", weights, 1 + i, dices[i]) for i in range(copies)]
    result = run_round(factory(), _global_like(template[0]), updates)
    for name, array in weights.items():
        assert result.weights[name].dtype == array.dtype
        np.testing.assert_allclose(result.weights[name], array, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(updates=site_updates(max_sites=4))
def test_fedadam_with_identical_updates_equal_to_the_global_stays_put(updates: list[Update]) -> None:
    # FedAdam moves the model by its pseudo-gradient: sites returning the global model leave it unchanged.
    g = updates[0].weights
    same = [Update(u.site, g, u.num_samples, u.val_dice) for u in updates]
    result = run_round(FedAdam(), g, same)
    for name, array in g.items():
        assert result.weights[name].dtype == array.dtype
        np.testing.assert_array_equal(result.weights[name], array)


@pytest.mark.parametrize("factory", [*ALL_AGGREGATORS, *SCREENED])
@settings(max_examples=25, deadline=None)
@given(updates=site_updates(min_sites=2, max_sites=4), data=st.data())
def test_order_of_arrival_does_not_matter(
    factory: Callable[[], Aggregator], updates: list[Update], data: st.DataObject
) -> None:
    g = _global_like(updates[0])
    reference = run_round(factory(), g, updates)
    order = data.draw(st.permutations(updates))
    shuffled = run_round(factory(), g, order)
    assert shuffled.refused.keys() == reference.refused.keys()
    assert shuffled.sites == [u.site for u in order if u.site not in shuffled.refused]
    assert shuffled.site_weights == pytest.approx(reference.site_weights)
    for name, array in reference.weights.items():
        np.testing.assert_allclose(shuffled.weights[name], array, rtol=1e-5, atol=1e-3)
        assert shuffled.weights[name].dtype == array.dtype
    np.testing.assert_array_equal(shuffled.weights["steps"], reference.weights["steps"])


@pytest.mark.parametrize("factory", ALL_AGGREGATORS)
@settings(max_examples=40, deadline=None)
@given(updates=site_updates())
def test_normalised_weights_sum_to_one_and_follow_the_raw_weights(
    factory: Callable[[], Aggregator], updates: list[Update]
) -> None:
    result = run_round(factory(), _global_like(updates[0]), updates)
    assert math.fsum(result.site_weights.values()) == pytest.approx(1.0)
    assert all(w >= 0 for w in result.site_weights.values())
    total = math.fsum(result.raw_weights.values())
    if total > 0:
        for site, raw in result.raw_weights.items():
            assert result.site_weights[site] == pytest.approx(raw / total)
    else:  # all-zero Dice: uniform fallback
        assert all(w == pytest.approx(1 / len(updates)) for w in result.site_weights.values())


def test_late_in_a_heterogeneous_study_the_far_honest_sites_are_not_refused() -> None:
    # what benchmarks/robustness.py met in round 9: two sites near the global model, two far from it
    near = {"suny": 0.09, "mallory": 0.09}
    far = {"nci": 3.09, "ucla": 2.91}
    g = {"w": np.zeros(1, np.float32)}
    updates = [update(site, {"w": np.array([norm], np.float32)}) for site, norm in {**near, **far}.items()]
    assert run_round(WeightedMean("uniform"), g, updates).refused == {}


def test_the_bound_never_falls_below_half_the_models_norm() -> None:
    # tests/study's first round: two sites barely moved the model, one took a full Adam step (0.33 x its norm)
    g = {"w": np.full(100, 1.0, np.float32)}  # norm 10
    still = [update(site, {"w": np.full(100, 1.0 + 1e-4, np.float32)}) for site in ("nci", "suny")]
    stepped = update("ucla", {"w": np.full(100, 1.33, np.float32)})  # change 3.3
    assert run_round(WeightedMean("uniform"), g, [*still, stepped]).refused == {}
    flipped = update("ucla", {"w": np.full(100, -10.0, np.float32)})  # change 110 > 5 x 0.5 x 10
    result = run_round(WeightedMean("uniform"), g, [*still, flipped])
    assert set(result.refused) == {"ucla"} and "floor" in result.notes[0]
