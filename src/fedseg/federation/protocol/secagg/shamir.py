"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree ``threshold - 1``;
share ``x`` is the polynomial at ``x`` (x = 1, 2, ... : a site's 1-based place
in the round's roster). Any ``threshold`` shares give the secret back by
Lagrange interpolation at 0; fewer reveal nothing about it. The Mersenne prime
2^521 - 1 holds any 256-bit secret (an X25519 private key, a mask seed), so no
secret is reduced. Coefficients come from :func:`secrets.randbelow`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from fedseg.federation.protocol.constants import SHARE_BYTES  # ceil(521 / 8): one field element, big-endian
from fedseg.federation.protocol.errors import BadMessage

__all__ = ["PRIME", "SHARE_BYTES", "combine", "decode_share", "encode_share", "split"]

PRIME = (1 << 521) - 1
SECRET_BYTES = 32


def split(secret: bytes, xs: Iterable[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` (32 bytes) at each point of ``xs``; any ``threshold`` of them recover it."""
    points = sorted(set(xs))
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points) or any(x < 1 or x >= PRIME for x in points):
        raise ValueError(f"threshold {threshold} needs at least that many distinct points x >= 1, got {points}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in points}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % PRIME
    return value


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from ``threshold`` of ``shares`` (x -> y); the lowest x are used.

    Raises:
        ValueError: fewer than ``threshold`` shares, or the interpolated value is
            not a 32-byte secret (shares from different secrets, or a forged one).
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s), {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """A share's field element; refuses anything that is not 66 bytes below the prime."""
    if len(data) != SHARE_BYTES:
        raise BadMessage(f"a secret share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise BadMessage("a secret share is not an element of the field")
    return y
