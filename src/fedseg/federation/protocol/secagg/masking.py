"""Fixed-point quantisation into the ring Z/2^64 (or Z/2^32) and pseudo-random masks expanded from 32-byte seeds.

A site's weighted change ``w * (x - global)`` is scaled by ``2^fraction_bits``,
rounded and taken modulo 2^64 (numpy's ``uint64`` wraps); masks are added in
the same ring, so they cancel exactly when the server adds every site's
payload. ``fraction_bits`` is chosen so that the sum of every site's values,
each within ``±bound``, stays below 2^62 (a 32-bit ring: 2^30) in magnitude:
the signed sum is then read back without overflow, and the quantisation error of the unmasked sum
is at most ``n_sites / 2^(fraction_bits + 1)`` per value (:func:`sum_error_bound`).

Masks are AES-256-CTR keystreams (``cryptography``; AES-NI where the CPU has
it): one stream per seed, read in the payload's order — the model's float
tensors sorted by name, then the scalar vector :data:`SCALARS` — in chunks,
so no mask of the whole model is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "CHUNK", "RING32", "RING64", "SCALARS", "SCALAR_FIELDS", "MaskStream", "Payload", "Ring", "dequantize", "fraction_bits",
    "masked_change", "quantize", "sum_error_bound",
]

MIN_FRACTION_BITS = 16
MAX_FRACTION_BITS = 52  # float64's mantissa: more bits would only add rounding noise
CHUNK = 1 << 17  # ring elements per keystream and quantisation chunk (cache-sized temporaries, no page faults)
SCALARS = "#secagg.scalars"  # the masked scalar vector travels as one more tensor (no model tensor has '#')
SCALAR_FIELDS = ("weight", "weighted_dice", "dice", "count")  # what the server learns, summed over the sites


@dataclass(frozen=True)
class Ring:
    """Z / 2^bits as numpy unsigned integers (they wrap), read back through the signed view."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError(f"the ring is 32 or 64 bits wide, not {self.bits}")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint64 if self.bits == 64 else np.uint32

    @property
    def signed(self) -> type[np.signedinteger]:
        return np.int64 if self.bits == 64 else np.int32

    @property
    def headroom_bits(self) -> int:
        """|sum of every site's values| < 2^headroom: far from the wrap of the signed view."""
        return self.bits - 2

    def fraction_bits(self, bound: float, n_sites: int) -> int:
        """Fixed-point fraction bits for ``n_sites`` values each within ``±bound``, summed without overflow.

        Raises:
            ValueError: the bound is so large that fewer than 16 fraction bits would be left.
        """
        if not (math.isfinite(bound) and bound > 0 and n_sites >= 1):
            raise ValueError(f"a finite bound > 0 and at least one site are needed, got {bound!r}, {n_sites}")
        bits = math.floor(self.headroom_bits - math.log2(n_sites * max(bound, 1.0)))
        if bits < MIN_FRACTION_BITS:
            raise ValueError(
                f"values up to ±{bound:g} from {n_sites} sites leave {bits} fraction bits in a {self.bits}-bit ring "
                f"(< {MIN_FRACTION_BITS}): lower clip_ratio, or use secure_ring_bits = 64"
            )
        return min(bits, MAX_FRACTION_BITS)

    def quantize(self, values: np.ndarray, bits: int) -> np.ndarray:
        """``round(values * 2^bits)`` in the ring (values must be within the bound ``bits`` was chosen for)."""
        scaled = np.rint(np.asarray(values, dtype=np.float64).ravel() * float(2**bits))
        return scaled.astype(self.signed).view(self.dtype)

    def dequantize(self, values: np.ndarray, bits: int) -> np.ndarray:
        """The signed float64 value of ring elements (a sum of quantised values, masks removed)."""
        return np.asarray(values, dtype=self.dtype).view(self.signed).astype(np.float64) / float(2**bits)


RING64 = Ring(64)
RING32 = Ring(32)


def fraction_bits(bound: float, n_sites: int, ring: Ring = RING64) -> int:
    """:meth:`Ring.fraction_bits` of ``ring`` (default: 64 bits)."""
    return ring.fraction_bits(bound, n_sites)


def sum_error_bound(n_sites: int, bits: int) -> float:
    """The largest quantisation error of one value of the unmasked sum: half a step per site."""
    return n_sites * 0.5 / float(2**bits)


def quantize(values: np.ndarray, bits: int, ring: Ring = RING64) -> np.ndarray:
    return ring.quantize(values, bits)


def dequantize(values: np.ndarray, bits: int, ring: Ring = RING64) -> np.ndarray:
    return ring.dequantize(values, bits)


class MaskStream:
    """The keystream of one 32-byte seed, read as ring elements in order."""

    def __init__(self, seed: bytes, ring: Ring = RING64) -> None:
        if len(seed) != 32:
            raise ValueError("a mask seed is 32 bytes")
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        self._itemsize = np.dtype(ring.dtype).itemsize
        self._buffer = np.zeros(CHUNK, dtype=ring.dtype)
        self._view = memoryview(self._buffer).cast("B")
        self._zeros = bytes(self._itemsize * CHUNK)

    def chunk(self, n: int) -> np.ndarray:
        """The next ``n`` (<= CHUNK) elements; the array is reused by the next call."""
        nbytes = self._itemsize * n
        self._encryptor.update_into(self._zeros[:nbytes], self._view[:nbytes])
        return self._buffer[:n]

    def add_to(self, target: np.ndarray, sign: int = 1) -> None:
        """``target += sign * mask`` in the ring, for the next ``target.size`` elements (``target`` flat)."""
        for start in range(0, target.size, CHUNK):
            part = target[start : start + CHUNK]
            if sign > 0:
                part += self.chunk(part.size)
            else:
                part -= self.chunk(part.size)


def masked_change(
    weights: np.ndarray, reference: np.ndarray, scale: float, ring: Ring, streams: list[tuple[MaskStream, int]]
) -> np.ndarray:
    """``rint((weights - reference) * scale)`` in the ring plus every stream (with its sign), chunk by chunk.

    The difference is taken in float64 (exact for float32 weights), and every
    temporary is one chunk: no model-sized float64 copy is made.
    """
    x, g = np.asarray(weights).ravel(), np.asarray(reference).ravel()
    out = np.empty(x.size, dtype=ring.dtype)
    for start in range(0, x.size, CHUNK):
        stop = min(start + CHUNK, x.size)
        values = np.subtract(x[start:stop], g[start:stop], dtype=np.float64)
        values *= scale
        np.rint(values, out=values)
        part = out[start:stop]
        part[...] = values.astype(ring.signed).view(ring.dtype)
        for stream, sign in streams:
            if sign > 0:
                part += stream.chunk(part.size)
            else:
                part -= stream.chunk(part.size)
    return out


@dataclass(frozen=True)
class Payload:
    """The order and shapes of a masked payload: the float tensors of the global model by name, then the scalars."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, global_weights: Mapping[str, np.ndarray]) -> Payload:
        floats = [(name, tuple(array.shape)) for name, array in sorted(global_weights.items()) if array.dtype.kind == "f"]
        return cls((*floats, (SCALARS, (len(SCALAR_FIELDS),))))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.shapes]

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        return iter(self.shapes)

    def zeros(self, ring: Ring = RING64) -> dict[str, np.ndarray]:
        """A flat ring array per tensor (the server's running sum)."""
        return {name: np.zeros(math.prod(shape), dtype=ring.dtype) for name, shape in self.shapes}
