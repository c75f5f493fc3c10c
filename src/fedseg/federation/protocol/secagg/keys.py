"""Secure aggregation's key material: per-round X25519 keys, their signatures, share encryption, pairwise seeds.

Each site makes two X25519 key pairs per round — one to encrypt the secret
shares it deals to the others, one to agree a pairwise mask seed with each of
them — and a 32-byte self-mask seed. It signs both public keys and a
commitment to its seed with its certificate's key (ECDSA P-256, the key its
TLS certificate holds), so the server that relays them cannot substitute its
own keys: every site checks every relayed certificate against the study CA
and every signature against that certificate. All primitives are
``cryptography``'s: X25519, HKDF-SHA256, AES-256-GCM, ECDSA.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg.errors import FedsegError

__all__ = [
    "AdvertisedKeys", "CertificateCheck", "Credentials", "RoundKeys", "SecAggError", "decrypt_share", "encrypt_share", "pair_seed",
    "seed_commitment", "share_digest", "share_key",
]

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
NONCE_BYTES = 12


class SecAggError(FedsegError):
    """A secure-aggregation step cannot go on; ``site`` names who is at fault when it is known."""

    def __init__(self, reason: str, site: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.site = site


CertificateCheck = Callable[[str, str], ec.EllipticCurvePublicKey]
"""(certificate PEM, site) -> the certificate's public key, when the study CA issued it to that site and it is
valid now; else :class:`SecAggError`. The transport layer's ``StudyCA`` is one (x509 parsing stays out of
the protocol layer: ``cryptography.x509`` imports the standard library's socket module)."""


@dataclass(frozen=True)
class Credentials:
    """What a site signs with and checks the others against: its certificate's key, that certificate, the study CA."""

    private_key: ec.EllipticCurvePrivateKey
    certificate_pem: str
    check: CertificateCheck


def _context(*parts: object) -> bytes:
    return b"fedseg-secagg-v1|" + "|".join(str(part) for part in parts).encode()


def seed_commitment(round_: int, site: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (checked when the server reconstructs it)."""
    return hashlib.sha256(_context("seed", round_, site) + seed).digest()


def share_digest(kind: str, round_: int, dealer: str, holder: str, share: bytes) -> str:
    """Hex SHA-256 of one share as dealt: the server checks a revealed share against it (shares are uniformly random)."""
    return hashlib.sha256(_context("share", kind, round_, dealer, holder) + share).hexdigest()


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pair_seed(mask_key: X25519PrivateKey, peer_mask_public: bytes, round_: int, a: str, b: str) -> bytes:
    """The mask seed two sites agree on (the same from either end: the names are ordered)."""
    low, high = sorted((a, b))
    shared = mask_key.exchange(X25519PublicKey.from_public_bytes(peer_mask_public))
    return _hkdf(shared, _context("mask", round_, low, high))


def share_key(cipher_key: X25519PrivateKey, peer_cipher_public: bytes, round_: int, dealer: str, holder: str) -> bytes:
    """The AES-256-GCM key for the shares ``dealer`` deals ``holder`` in ``round_`` (one direction)."""
    shared = cipher_key.exchange(X25519PublicKey.from_public_bytes(peer_cipher_public))
    return _hkdf(shared, _context("share-key", round_, dealer, holder))


def encrypt_share(key: bytes, plaintext: bytes, round_: int, dealer: str, holder: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _context("share", round_, dealer, holder))


def decrypt_share(key: bytes, data: bytes, round_: int, dealer: str, holder: str) -> bytes:
    """The plaintext of a dealt share; :class:`SecAggError` naming the dealer when it does not authenticate."""
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _context("share", round_, dealer, holder))
    except (InvalidTag, ValueError) as exc:
        raise SecAggError(f"the secret share dealt by {dealer} does not decrypt (tampered, or not for this site)", dealer) from exc


@dataclass
class RoundKeys:
    """One site's secrets for one round (never sent; dropped once the round is unmasked)."""

    cipher: X25519PrivateKey
    mask: X25519PrivateKey
    seed: bytes

    @classmethod
    def generate(cls) -> RoundKeys:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32))

    def mask_secret(self) -> bytes:
        return self.mask.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def advertise(self, round_: int, site: str, credentials: Credentials) -> AdvertisedKeys:
        cipher_pk = self.cipher.public_key().public_bytes(*_RAW)
        mask_pk = self.mask.public_key().public_bytes(*_RAW)
        commitment = seed_commitment(round_, site, self.seed)
        payload = AdvertisedKeys.signed_bytes(round_, site, cipher_pk, mask_pk, commitment)
        signature = credentials.private_key.sign(payload, ec.ECDSA(hashes.SHA256()))
        return AdvertisedKeys(site, cipher_pk, mask_pk, commitment, signature, credentials.certificate_pem)


@dataclass(frozen=True)
class AdvertisedKeys:
    """A site's public round keys as relayed by the server (the KEYS message, one ROSTER entry)."""

    site: str
    cipher_pk: bytes
    mask_pk: bytes
    commitment: bytes
    signature: bytes
    certificate: str

    @staticmethod
    def signed_bytes(round_: int, site: str, cipher_pk: bytes, mask_pk: bytes, commitment: bytes) -> bytes:
        return _context("keys", round_, site) + cipher_pk + mask_pk + commitment

    def body(self) -> dict[str, Any]:
        return {
            "cipher_pk": self.cipher_pk.hex(), "mask_pk": self.mask_pk.hex(), "commitment": self.commitment.hex(),
            "signature": self.signature.hex(), "certificate": self.certificate,
        }

    @classmethod
    def from_body(cls, site: str, body: dict[str, Any]) -> AdvertisedKeys:
        """From a KEYS body or ROSTER entry whose hex fields the schema checked already."""
        return cls(
            site, bytes.fromhex(body["cipher_pk"]), bytes.fromhex(body["mask_pk"]), bytes.fromhex(body["commitment"]),
            bytes.fromhex(body["signature"]), body["certificate"],
        )

    def verify(self, round_: int, check: CertificateCheck) -> None:
        """Check the certificate (``check``: issued by the study CA, valid now, for this site) and the signature.

        Raises:
            SecAggError: naming the site, when any check fails.
        """
        public = check(self.certificate, self.site)
        payload = self.signed_bytes(round_, self.site, self.cipher_pk, self.mask_pk, self.commitment)
        try:
            public.verify(self.signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise SecAggError(f"the round keys of {self.site} are not signed by its certificate's key", self.site) from exc
