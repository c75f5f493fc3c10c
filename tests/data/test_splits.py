"""Splits: 80/20 and 5 folds as in the paper, deterministic, no test case in any fold, never rewritten."""

from __future__ import annotations

import json

import pytest

from fedseg.data.splits import ensure_splits, load_splits, make_splits
from fedseg.errors import DataError

CASES = [f"case{i:03d}" for i in range(100)]


def test_paper_split_sizes():
    splits = make_splits(CASES, seed=0)
    assert len(splits.train) == 80 and len(splits.test) == 20
    assert len(splits.folds) == 5
    assert all(len(f.val) == 16 and len(f.train) == 64 for f in splits.folds)


@pytest.mark.parametrize("n_cases", [3, 5, 7, 23, 100, 101])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_test_case_ever_in_a_fold(n_cases, seed):
    splits = make_splits(CASES[:n_cases], seed=seed)
    test = set(splits.test)
    assert test and not test & set(splits.train)
    assert set(splits.train) | test == set(CASES[:n_cases])
    vals = []
    for fold in splits.folds:
        assert not test & (set(fold.train) | set(fold.val))
        assert not set(fold.train) & set(fold.val)
        assert set(fold.train) | set(fold.val) == set(splits.train)
        vals.extend(fold.val)
    assert sorted(vals) == sorted(splits.train)  # each training case validates exactly once


def test_deterministic_and_order_independent():
    a = make_splits(CASES, seed=3)
    b = make_splits(list(reversed(CASES)), seed=3)
    assert a == b
    assert make_splits(CASES, seed=4).test != a.test


def test_small_site_gets_fewer_folds_and_says_so():
    splits = make_splits(CASES[:5], seed=0)
    assert len(splits.test) == 1 and len(splits.train) == 4
    assert len(splits.folds) == 4 and "4 used" in splits.note
    with pytest.raises(DataError, match="at least 3 cases"):
        make_splits(CASES[:2])


def test_existing_file_is_reused_not_rewritten(tmp_path):
    path = tmp_path / "splits.json"
    first, created = ensure_splits(path, CASES, seed=0)
    assert created
    content = path.read_bytes()
    again, created = ensure_splits(path, CASES, seed=99)  # another seed does not rewrite it
    assert not created and again == first
    assert path.read_bytes() == content
    assert load_splits(path) == first


def test_changed_case_list_is_an_error_not_a_rewrite(tmp_path):
    path = tmp_path / "splits.json"
    ensure_splits(path, CASES[:50])
    content = path.read_bytes()
    with pytest.raises(DataError, match=r"new: \['case050'\]"):
        ensure_splits(path, CASES[:51])
    assert path.read_bytes() == content


def test_tampered_file_with_leak_is_rejected(tmp_path):
    path = tmp_path / "splits.json"
    splits, _ = ensure_splits(path, CASES)
    data = json.loads(path.read_text())
    data["folds"][2]["val"].append(splits.test[0])
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="fold 2 uses test cases"):
        load_splits(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read splits"):
        load_splits(path)


def test_split_command(make_site, run_cli):
    site = make_site(n_cases=6)
    code, out, _ = run_cli("data", "split", site, "--seed", "1")
    assert code == 0 and "wrote" in out
    code, out, _ = run_cli("data", "split", site)
    assert code == 0 and "reusing existing" in out
    assert load_splits(site / "splits.json").seed == 1
