"""A round's updates on disk while the round is open: the server's :class:`~fedseg.federation.strategies.UpdateStore`.

Each accepted update is written to ``SPOOL/<site>.bin`` as it arrives — its
tensors' raw bytes one after another; where each one starts, its dtype and
shape stay in memory — and read back one tensor at a time with ``pread``
when the round closes. No memory map: pages of a mapped file count in the
server's resident memory, and with 32 sites that alone was 32 models' worth
(benchmarks/aggregation_memory.py, docs/benchmarks.md). So the server holds
about one model plus one tensor per site in memory whatever the number of
sites. The files are scratch, written by the server itself from validated
updates: not fsynced, removed when the round closes or the server restarts
(a round is only ever resumed from its committed global model).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.protocol.names import is_site_name
from fedseg.federation.strategies.arrays import c_contiguous

__all__ = ["SPOOL", "DiskStore"]

SPOOL = "incoming"  # RUN_DIR/incoming/<site>.bin while a round is open


@dataclass(frozen=True)
class _Slot:
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


class DiskStore:
    """An :class:`~fedseg.federation.strategies.UpdateStore` in ``folder``: made at the first update, removed by :meth:`clear`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._files: dict[str, int] = {}  # site -> open descriptor, for reading back

    def _path(self, site: str) -> Path:
        if not is_site_name(site):  # never a path outside the folder, whatever the name
            raise FedsegError(f"site name {site!r} cannot name a spool file")
        return self.folder / f"{site}.bin"

    def put(self, site: str, weights: Mapping[str, np.ndarray]) -> None:
        path = self._path(site)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        slots, offset = {}, 0
        with path.open("wb") as handle:
            for name, array in weights.items():
                data = c_contiguous(array)
                handle.write(data.reshape(-1).view(np.uint8))
                slots[name] = _Slot(offset, data.nbytes, data.dtype, data.shape)
                offset += data.nbytes
        self._slots[site] = slots

    def get(self, site: str, name: str) -> np.ndarray:
        slot = self._slots[site][name]
        fd = self._files.get(site)
        if fd is None:
            fd = self._files[site] = os.open(self._path(site), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        data = os.pread(fd, slot.nbytes, slot.offset)
        if len(data) != slot.nbytes:
            raise FedsegError(f"{self._path(site)}: the spooled update of {site} is truncated (disk full?)")
        return np.frombuffer(data, dtype=slot.dtype).reshape(slot.shape)

    def clear(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._slots.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
