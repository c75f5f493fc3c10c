"""A round's updates on disk while the round is open: the server's :class:`~fedseg.federation.strategies.UpdateStore`.

Each accepted update is written to ``SPOOL/<site>.safetensors`` as it arrives
and read back one tensor at a time when the round closes, so the server holds
about one model plus one tensor per site in memory whatever the number of
sites. The files are scratch: written without fsync, removed when the round
closes or the server restarts (a round is only ever resumed from its
committed global model).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedseg.errors import FedsegError
from fedseg.federation.strategies.arrays import c_contiguous
from fedseg.federation.protocol.names import is_site_name

__all__ = ["SPOOL", "DiskStore"]

SPOOL = "incoming"  # RUN_DIR/incoming/<site>.safetensors while a round is open

class DiskStore:
    """An :class:`~fedseg.federation.strategies.UpdateStore` in ``folder``: made at the first update, removed by :meth:`clear`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)


    def _path(self, site: str) -> Path:
        if not is_site_name(site):  # never a path outside the folder, whatever the name
            raise FedsegError(f"site name {site!r} cannot name a spool file")
        return self.folder / f"{site}.safetensors"

    def put(self, site: str, weights: Mapping[str, np.ndarray]) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_file({name: c_contiguous(array) for name, array in weights.items()}, str(self._path(site)))


    def get(self, site: str, name: str) -> np.ndarray:
        with safe_open(str(self._path(site)), framework="np") as handle:
            return handle.get_tensor(name)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
