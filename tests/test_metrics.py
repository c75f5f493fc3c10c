"""Dice (paper Eq. 1) edge cases and score summaries, checked against hand arithmetic."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fedseg.evaluation import Summary, dice_coefficient, format_mean_sd, summarize


def test_both_empty_is_one() -> None:
    empty = np.zeros((4, 4, 2), dtype=np.uint8)
    assert dice_coefficient(empty, empty) == 1.0


def test_exactly_one_empty_is_zero() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    assert dice_coefficient(empty, full) == 0.0
    assert dice_coefficient(full, empty) == 0.0


def test_identical_is_one() -> None:
    mask = np.zeros((5, 6, 3), dtype=np.int16)
    mask[1:4, 2:5, 1] = 1
    assert dice_coefficient(mask, mask.copy()) == 1.0


def test_half_overlap_by_hand() -> None:
    # A = 4 voxels, B = 4 voxels, overlap 2 -> 2*2 / (4+4) = 0.5
    a = np.zeros((1, 8), dtype=bool)
    b = np.zeros((1, 8), dtype=bool)
    a[0, 0:4] = True
    b[0, 2:6] = True
    assert dice_coefficient(a, b) == pytest.approx(0.5)
    # |A|=4, |B|=2, overlap 2 -> 4/6
    c = np.zeros((1, 8), dtype=bool)
    c[0, 2:4] = True
    assert dice_coefficient(a, c) == pytest.approx(4 / 6)


def test_nonzero_labels_are_foreground() -> None:
    a = np.array([0, 2, 2, 0])
    b = np.array([0.0, 0.7, 0.0, 0.0])
    assert dice_coefficient(a, b) == pytest.approx(2 * 1 / (2 + 1))


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice_coefficient(np.zeros((2, 3)), np.zeros((3, 2)))


def test_fast_on_full_size_volume() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((512, 512, 60)) > 0.5
    b = rng.random((512, 512, 60)) > 0.5
    start = time.perf_counter()
    value = dice_coefficient(a, b)
    assert time.perf_counter() - start < 1.0
    assert 0.45 < value < 0.55


def test_summarize_by_hand() -> None:
    s = summarize([0.9, 0.8, 1.0, 0.7])
    assert s.n == 4
    assert s.mean == pytest.approx(0.85)
    # squared deviations 0.0025+0.0025+0.0225+0.0225 = 0.05, / (n-1)=3 -> sqrt(1/60)
    assert s.sd == pytest.approx(math.sqrt(0.05 / 3))
    assert s.median == pytest.approx(0.85)
    assert (s.min, s.max) == (0.7, 1.0)


def test_summarize_single_value_has_zero_sd() -> None:
    assert summarize([0.5]) == Summary(n=1, mean=0.5, sd=0.0, median=0.5, min=0.5, max=0.5)


@pytest.mark.parametrize("bad", [[], [0.5, float("nan")], [float("inf")]])
def test_summarize_rejects_empty_and_non_finite(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_format_mean_sd() -> None:
    s = Summary(n=20, mean=0.92512, sd=0.01551, median=0.9, min=0.8, max=1.0)
    assert format_mean_sd(s) == "0.925 ± 0.016"
    assert format_mean_sd(s, digits=2) == "0.93 ± 0.02"
