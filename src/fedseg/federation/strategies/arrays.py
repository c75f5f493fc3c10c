"""Plain numpy helpers of aggregation: dtype tests and casts (no model, no site)."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import numpy as np

__all__ = ["c_contiguous", "Weights", "cast_like", "float_names", "is_float", "is_real"]

Weights = dict[str, np.ndarray]
"""A model state dict as numpy arrays (float tensors, plus integer/bool buffers)."""


def c_contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` in C order with its shape kept (``np.ascontiguousarray`` turns a 0-d array into shape (1,))."""
    return np.require(array, requirements="C")


def is_float(array: np.ndarray) -> bool:
    """Whether ``array`` holds floating-point values (averaged; other dtypes are taken whole)."""
    return bool(np.issubdtype(array.dtype, np.floating))


def is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, not a Dice)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def float_names(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the float tensors of ``weights``."""
    return {name: array.shape for name, array in weights.items() if is_float(array)}


def cast_like(weights: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> Weights:
    """Every tensor as an ndarray of its dtype in ``dtypes`` (asarray: 0-d arithmetic yields numpy scalars)."""
    return {name: np.asarray(array, dtype=dtypes[name]) for name, array in weights.items()}
