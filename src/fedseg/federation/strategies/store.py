"""Where one round's accepted updates wait until the round closes: the :class:`UpdateStore` interface and its in-memory kind.

Robust aggregation decides only at the end of a round (an update is too big
*relative to the others*; a coordinate-wise median needs every site), so the
updates must be kept until then. The aggregators read them back one tensor
at a time, so a store that keeps them on disk
(:class:`fedseg.federation.deploy.spool.DiskStore`) holds the server's memory
to about one model plus one tensor per site, whatever the number of sites.
:class:`MemoryStore` (tests, in-memory studies) keeps them in RAM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

__all__ = ["MemoryStore", "UpdateStore"]


class UpdateStore(Protocol):
    """One round's updates, by site; written once per site, read one tensor at a time."""

    def put(self, site: str, weights: Mapping[str, np.ndarray]) -> None:
        """Keep ``site``'s tensors (already validated) until :meth:`clear`."""
        ...

    def get(self, site: str, name: str) -> np.ndarray:
        """Tensor ``name`` of ``site``'s update."""
        ...

    def clear(self) -> None:
        """Forget every update (a new round starts)."""
        ...


class MemoryStore:
    """An :class:`UpdateStore` in RAM: memory grows with the number of sites (fine for tests and small models)."""

    def __init__(self) -> None:
        self._updates: dict[str, dict[str, np.ndarray]] = {}

    def put(self, site: str, weights: Mapping[str, np.ndarray]) -> None:
        self._updates[site] = dict(weights)

    def get(self, site: str, name: str) -> np.ndarray:
        return self._updates[site][name]

    def clear(self) -> None:
        self._updates.clear()
