"""Per-site train/test split and cross-validation folds, stored as ``splits.json``.

As in the paper: 80 % of a site's cases train, 20 % are held out for testing,
and the training part is divided into 5 folds; fold k validates on its own
cases and trains on the other four. Test cases never enter any fold.

A split is a pure function of the sorted case names and a seed, so anyone can
reproduce it; once written, the file is reused and never silently rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.io import write_json
from fedseg.errors import DataError

SPLITS_FILE = "splits.json"
SPLITS_FORMAT = 1
MIN_CASES_TO_SPLIT = 3  # one test case and two training cases (two folds)
SMALL_SITE_CASES = 5  # below this a site's own model and test set say little (see small_site_warning)


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: cases to train on and to validate on."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """A site's held-out test set and the folds over its training set."""

    seed: int
    test_fraction: float
    train: tuple[str, ...]
    test: tuple[str, ...]
    folds: tuple[Fold, ...]
    note: str = ""

    @property
    def cases(self) -> frozenset[str]:
        return frozenset(self.train) | frozenset(self.test)

    def fold(self, index: int) -> Fold:
        if not 0 <= index < len(self.folds):
            raise DataError(f"fold {index} does not exist: this split has folds 0..{len(self.folds) - 1}")
        return self.folds[index]

    def to_json(self) -> dict:
        return {
            "format": SPLITS_FORMAT,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "n_folds": len(self.folds),
            "note": self.note,
            "train": list(self.train),
            "test": list(self.test),
            "folds": [{"fold": f.index, "train": list(f.train), "val": list(f.val)} for f in self.folds],
        }


def make_splits(case_ids: list[str] | tuple[str, ...], seed: int = 0, test_fraction: float = 0.2, n_folds: int = 5) -> Splits:
    """Deterministic split of a site's cases.

    The test set holds ``round(test_fraction * n)`` cases (at least one). The
    number of folds is reduced to the number of training cases when a site
    is too small for ``n_folds`` (e.g. 5 cases: 1 test, 4 folds of 1), and
    the reduction is recorded in ``note``.

    Raises:
        DataError: duplicate case names, fewer than 3 cases, a fraction
            outside (0, 1) or fewer than 2 folds requested.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise DataError("case names must be unique to split a site")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    if n_folds < 2:
        raise DataError(f"at least 2 folds are needed, got {n_folds}")
    if len(ids) < MIN_CASES_TO_SPLIT:
        raise DataError(f"a site needs at least {MIN_CASES_TO_SPLIT} cases to split (1 test, 2 training), it has {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_test = min(max(1, int(round(test_fraction * len(ids)))), len(ids) - 2)
    test, train = sorted(shuffled[:n_test]), shuffled[n_test:]
    folds_used = min(n_folds, len(train))
    note = "" if folds_used == n_folds else f"{n_folds} folds requested, {folds_used} used: only {len(train)} training cases"
    chunks = np.array_split(np.array(train, dtype=object), folds_used)
    folds = tuple(
        Fold(k, tuple(sorted(c for j, chunk in enumerate(chunks) if j != k for c in chunk)), tuple(sorted(chunks[k])))
        for k in range(folds_used)
    )
    return Splits(seed, test_fraction, tuple(sorted(train)), tuple(test), folds, note)


def small_site_warning(site: str, n_cases: int) -> str | None:
    """What a user should expect from a site of fewer than SMALL_SITE_CASES cases, or None.

    Measured on the shared PROMISE12 sites (5 cases each, docs/results.md):
    private folds ended with validation Dice between 0.03 and 0.46.
    """
    if n_cases >= SMALL_SITE_CASES or n_cases < MIN_CASES_TO_SPLIT:
        return None
    splits = make_splits([f"case{i}" for i in range(n_cases)])
    per_fold = len(splits.folds[0].train)
    return (
        f"{site} has only {n_cases} cases (fewer than {SMALL_SITE_CASES}): {len(splits.test)} held out for testing, "
        f"{len(splits.folds)} folds training on {per_fold} case(s) each. Expect its private model to be poor and "
        "to vary from fold to fold (on 5-case PROMISE12 sites, private folds reached validation Dice 0.03-0.46), "
        f"and its test set ({len(splits.test)} case(s)) to give the paired t-tests no power; its cases still "
        "help the federated and pooled models. `fedseg study --profile small-sites` starts every model from "
        "weights fedseg trains on its own phantom (on those PROMISE12 sites: FL Dice 0.41 -> 0.68-0.78)."
    )


def _field(data: dict, key: str, path: Path) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: field {key!r} must be a list of case names")
    return value


def splits_from_json(data: dict, path: Path) -> Splits:
    """Parse and validate the content of a ``splits.json``.

    Raises:
        DataError: missing fields, or a test case inside a fold, or folds
            that do not partition the training set.
    """
    if not isinstance(data, dict) or data.get("format") != SPLITS_FORMAT:
        raise DataError(f"{path}: not a fedseg splits file (format {SPLITS_FORMAT} expected)")
    train, test = _field(data, "train", path), _field(data, "test", path)
    raw_folds = data.get("folds")
    if not isinstance(raw_folds, list) or not raw_folds:
        raise DataError(f"{path}: field 'folds' must be a non-empty list")
    folds = tuple(
        Fold(k, tuple(_field(f, "train", path)), tuple(_field(f, "val", path)))
        for k, f in enumerate(raw_folds)
    )
    splits = Splits(int(data.get("seed", 0)), float(data.get("test_fraction", 0.2)), tuple(train), tuple(test), folds, str(data.get("note", "")))
    _validate(splits, path)
    return splits


def _validate(splits: Splits, path: Path) -> None:
    train, test = set(splits.train), set(splits.test)
    if overlap := train & test:
        raise DataError(f"{path}: cases both in train and test: {sorted(overlap)}")
    seen_val: set[str] = set()
    for fold in splits.folds:
        members = set(fold.train) | set(fold.val)
        if leaked := members & test:
            raise DataError(f"{path}: fold {fold.index} uses test cases {sorted(leaked)}")
        if members != train or set(fold.train) & set(fold.val):
            raise DataError(f"{path}: fold {fold.index} does not split the training cases into train and val")
        seen_val |= set(fold.val)
    if seen_val != train:
        raise DataError(f"{path}: validation folds do not cover the training cases")


def load_splits(path: Path) -> Splits:
    """Read and validate a ``splits.json``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read splits ({exc})") from exc
    return splits_from_json(data, Path(path))


def ensure_splits(
    path: Path, case_ids: list[str], seed: int = 0, test_fraction: float = 0.2, n_folds: int = 5
) -> tuple[Splits, bool]:
    """Reuse ``path`` if it exists, else create it; returns (splits, created).

    An existing file must cover exactly the site's current cases; if cases
    were added or removed the file is not rewritten: the error says which.
    """
    path = Path(path)
    if path.exists():
        splits = load_splits(path)
        current = set(case_ids)
        if splits.cases != current:
            added, removed = sorted(current - splits.cases), sorted(splits.cases - current)
            raise DataError(
                f"{path}: the site's cases changed since the split was made "
                f"(new: {added or 'none'}; gone: {removed or 'none'}); "
                "move the old splits.json away to make a new split"
            )
        return splits, False
    splits = make_splits(case_ids, seed, test_fraction, n_folds)
    write_json(path, splits.to_json())
    return splits, True
