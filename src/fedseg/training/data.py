"""A site's prepared cases, held in memory for training and validation.

Training never reads or resamples a NIfTI file twice: :func:`resolve_site`
prepares the site once into a cache folder (see :mod:`fedseg.data.preprocess`),
and :class:`SiteData` loads each prepared case into memory the first time it
is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.data.layout import discover_site
from fedseg.data.preprocess import PrepareConfig, prepare_site, read_case_meta, read_manifest
from fedseg.data.splits import SPLITS_FILE, Splits, load_splits
from fedseg.data.volume import load_volume
from fedseg.errors import DataError


@dataclass(frozen=True)
class PreparedSite:
    """A prepared folder with its split and the site it came from."""

    name: str
    source: Path
    prepared: Path
    splits: Splits | None

    def require_splits(self) -> Splits:
        if self.splits is None:
            raise DataError(f"{self.source}: too few cases to split; it can only serve as an external test set")
        return self.splits


@dataclass(frozen=True)
class CaseArrays:
    """One prepared case as channel-first arrays (1, X, Y, Z)."""

    case_id: str
    image: np.ndarray  # float32, z-scored
    label: np.ndarray  # float32 0/1 (MONAI crops expect a float label)
    affine: np.ndarray


def cache_folder(cache_root: Path, site_dir: Path, config: PrepareConfig) -> Path:
    """Where a site prepared with ``config`` is cached: one folder per (site path, config)."""
    key = json.dumps({"site": str(Path(site_dir).resolve()), "config": config.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(cache_root) / f"{Path(site_dir).resolve().name}-{config.spacing_mm:g}mm-{digest}"


def resolve_site(
    site_dir: Path,
    config: PrepareConfig,
    cache_root: Path,
    on_case: Callable[[str, bool], None] | None = None,
) -> PreparedSite:
    """Prepare (or reuse) a site for training/evaluation.

    ``site_dir`` may be a raw site folder (prepared into ``cache_root``, cached
    per case) or a folder already prepared with the same configuration.
    """
    site_dir = Path(site_dir)
    manifest = read_manifest(site_dir)
    if manifest is not None and manifest.config == config.to_dict():  # a folder already prepared this way
        prepared, source = site_dir, Path(manifest.source)
    else:
        prepared, source = cache_folder(cache_root, site_dir, config), site_dir
        prepare_site(site_dir, prepared, config, on_case=on_case)
    splits_path = prepared / SPLITS_FILE
    splits = load_splits(splits_path) if splits_path.is_file() else None
    return PreparedSite(source.resolve().name, source, prepared, splits)


def pad_to(array: np.ndarray, size: tuple[int, int, int], value: float) -> np.ndarray:
    """Pad (symmetrically) each spatial axis up to ``size``; crops need a volume at least a patch big."""
    missing = [max(target - n, 0) for n, target in zip(array.shape[1:], size, strict=True)]
    if not any(missing):
        return array
    pads = [(0, 0)] + [(m // 2, m - m // 2) for m in missing]
    return np.pad(array, pads, mode="constant", constant_values=value)


class SiteData:
    """Lazily loaded, memoised prepared cases of one site."""

    def __init__(self, site: PreparedSite, min_size: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.site = site
        self.min_size = min_size
        self._cases: dict[str, CaseArrays] = {}
        self._available = {c.case_id for c in discover_site(site.prepared).cases}

    def case(self, case_id: str) -> CaseArrays:
        if case_id not in self._cases:
            if case_id not in self._available:
                raise DataError(f"{self.site.prepared}: no prepared case {case_id!r}")
            image = load_volume(self.site.prepared / "images" / f"{case_id}.nii.gz")
            label = load_volume(self.site.prepared / "labels" / f"{case_id}.nii.gz")
            image_array = image.array.astype(np.float32)[None]
            self._cases[case_id] = CaseArrays(
                case_id,
                pad_to(image_array, self.min_size, float(image_array.min())),
                pad_to(label.array.astype(np.float32)[None], self.min_size, 0.0),
                image.affine,
            )
        return self._cases[case_id]

    def cases(self, case_ids: tuple[str, ...] | list[str]) -> list[CaseArrays]:
        return [self.case(c) for c in case_ids]

    def fingerprint(self, case_ids: tuple[str, ...] | list[str]) -> str:
        """SHA-256 over case names, source-file hashes and preprocessing config: what data a model saw.

        Independent of where the files live, so moving a site keeps it.
        """
        record = []
        for case_id in sorted(case_ids):
            meta = read_case_meta(self.site.prepared / "meta" / f"{case_id}.json")
            hashes = {role: entry.sha256 for role, entry in meta.sources.items()}
            record.append([case_id, hashes, meta.config])
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
