"""Start-up kits as a running server or site reads them: the layout, :func:`load_kit` and its checks, site identities.

A kit is the folder ``fedseg provision`` hands each participant::

    server/   ca.pem, server.pem, server.key, study.json, README.txt
    <site>/   ca.pem, client.pem, client.key, study.json, README.txt

:func:`load_kit` refuses, before any connection, a kit that could not work or
would be unsafe: a missing or corrupt file, a key readable by others, a key
that is not the certificate's, a certificate not signed by the kit's CA or
outside its validity, a site certificate for another site. A site's identity
is the name its certificate carries (:func:`site_identity`), signed by the
study CA. Writing kits is :mod:`fedseg.federation.deploy.kits`.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedseg.errors import FedsegError
from fedseg.federation.protocol.secagg import Credentials, SecAggError
from fedseg.federation.protocol.names import SITE_NAME_HELP, is_site_name
from fedseg.io import loads_json

__all__ = [
    "KIT_FILES",
    "KIT_FORMAT",
    "RESERVED_NAMES",
    "SITE_URI_PREFIX",
    "KeyT",
    "Kit",
    "Role",
    "check_kit_dates",
    "kit_credentials",
    "StudyCA",
    "load_certificate",
    "load_kit",
    "load_private_key",
    "same_key",
    "site_identity",
    "validate_site_names",
]

KIT_FORMAT = 1
CRL_FILE = "crl.pem"  # in the server kit: the study CA's revocation list (``fedseg provision revoke``)
"""Version of the kit layout and ``study.json`` schema."""

"""SAN URI prefix carrying a site's identity in its client certificate."""

RESERVED_NAMES = frozenset({"ca", "server"})
"""Folder names of the kit layout itself; a site with such a name would collide."""

KeyT = ec.EllipticCurvePrivateKey
Role = Literal["server", "site"]

KIT_FILES: dict[str, tuple[str, str]] = {
    "server": ("server.pem", "server.key"),
    "site": ("client.pem", "client.key"),
}
"""File names inside a kit, by role: (certificate, private key)."""

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def validate_site_names(sites: Sequence[str]) -> list[str]:
    """Check site names and return them as a list, in the given order.

    A site name is the site's certificate identity and its kit folder name, so
    it must follow :data:`~fedseg.federation.protocol.names.SITE_PATTERN` (the
    rule a HELLO is checked against too), not be ``ca`` or ``server`` (the kit
    layout's own folders), and be unique.

    Raises:
        FedsegError: no sites, or a name is invalid or repeated (all named).
    """
    names = list(sites)
    if not names:
        raise FedsegError("no sites given: a study needs at least one site")
    bad = [n for n in names if not is_site_name(n)]
    if bad:
        raise FedsegError(f"invalid site name(s) {bad!r}: use {SITE_NAME_HELP}")
    reserved = sorted(set(names) & RESERVED_NAMES)
    if reserved:
        raise FedsegError(f"site name(s) {reserved!r} are reserved for the kit layout; choose another name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FedsegError(f"site name(s) {repeated!r} given more than once")
    return names


SITE_URI_PREFIX = "fedseg://site/"


def site_identity(cert: x509.Certificate) -> str:
    """The site name a certificate stands for.

    Read from the SAN URI ``fedseg://site/<name>``, falling back to the subject
    CN for certificates without one. The caller must have verified the
    certificate's chain first: the name is only as trustworthy as its issuer.

    Raises:
        FedsegError: the certificate carries neither.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(SITE_URI_PREFIX):
                return uri[len(SITE_URI_PREFIX):]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        value = common_names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    raise FedsegError(f"certificate {cert.subject.rfc4514_string()!r} carries no site identity")


@dataclass(frozen=True)
class Kit:
    """A participant's start-up kit, as read (and checked) by :func:`load_kit`.

    Attributes:
        role: ``"server"`` or ``"site"``.
        name: the server's host name, or the site's name.
        study: the parsed ``study.json``.
        directory: the kit folder.
        ca: path of the study CA certificate (the only trust anchor).
        cert: path of this participant's certificate.
        key: path of this participant's private key (0600).
    """

    role: Role
    name: str
    study: dict[str, Any]
    directory: Path
    ca: Path
    cert: Path
    key: Path

    @property
    def allowed_sites(self) -> frozenset[str]:
        """Site names allowed to connect (server kits; empty for a site kit)."""
        return frozenset(self.study.get("sites", ()))

    @property
    def declared_cases(self) -> dict[str, int]:
        """Training cases per site declared at provisioning (server kits; empty when none were)."""
        return {str(site): int(n) for site, n in self.study.get("cases", {}).items()}

    @property
    def secure_aggregation(self) -> bool:
        """The kit was provisioned for secure aggregation: its study must not run without it."""
        return bool(self.study.get("secure_aggregation", False))

    def require_secure_aggregation(self, enabled: bool, config: Path | str | None) -> None:
        """Refuse a study configuration that turns off the secure aggregation this kit was provisioned for.

        Raises:
            FedsegError: naming the kit and the configuration file.
        """
        if self.secure_aggregation and not enabled:
            raise FedsegError(
                f"{self.directory / 'study.json'}: this kit was provisioned for secure aggregation, but "
                f"{config or 'the default configuration'} does not set [federation] secure_aggregation = true"
            )

    @property
    def crl(self) -> Path | None:
        """The revocation list of a server kit, or None (kits of older fedseg have none)."""
        path = self.directory / CRL_FILE
        return path if self.role == "server" and path.is_file() else None

    @property
    def server_url(self) -> str:
        """``wss://HOST:PORT`` of the study server."""
        return str(self.study["server_url"])

    @property
    def server_name(self) -> str:
        """The host name the server certificate is checked against."""
        return str(self.study["server_name"])


def load_kit(path: Path) -> Kit:
    """Read a server or site kit and check it is usable before any connection.

    Checks: ``study.json`` parses and names a role; the CA, certificate and key
    files exist and parse; the key is not readable by group or others; the key
    matches the certificate; the certificate is signed by the kit's CA; the CA
    and the certificate are valid now; a site certificate's identity equals
    the kit's site name.

    Raises:
        FedsegError: naming the file and what is wrong (and ``chmod 600 FILE``
            for a key with wider permissions).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FedsegError(f"kit folder {folder} does not exist")
    study = _read_study(folder / "study.json")
    role: Role = study["role"]
    cert_name, key_name = KIT_FILES[role]
    kit = Kit(
        role=role,
        name=study["site"] if role == "site" else study["server_name"],
        study=study,
        directory=folder,
        ca=folder / "ca.pem",
        cert=folder / cert_name,
        key=folder / key_name,
    )
    _check_kit(kit)
    return kit


def _read_study(path: Path) -> dict[str, Any]:
    try:
        doc = loads_json(_read(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("role") not in KIT_FILES:
        raise FedsegError(f"{path} is not a fedseg kit description (no role 'server' or 'site')")
    required = {"study", "server_name", "port", "server_url"} | ({"sites"} if doc["role"] == "server" else {"site"})
    missing = sorted(required - doc.keys())
    if missing:
        raise FedsegError(f"{path} lacks field(s) {missing}")
    validate_site_names(doc["sites"] if doc["role"] == "server" else [doc["site"]])
    return doc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise FedsegError(f"kit file {path} is missing") from exc
    except OSError as exc:
        raise FedsegError(f"cannot read kit file {path}: {exc.strerror or exc}") from exc


class StudyCA:
    """Checks a site certificate relayed by the server (secure aggregation's round keys): issued by the study
    CA, valid now, for the site it is said to be; returns its public key."""

    def __init__(self, ca: x509.Certificate) -> None:
        self.ca = ca

    def __call__(self, certificate_pem: str, site: str) -> ec.EllipticCurvePublicKey:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise SecAggError(f"the round keys of {site} come with a certificate not issued by the study CA", site) from exc
        if not cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= cert.not_valid_after_utc:
            raise SecAggError(f"the certificate relayed for {site} is not valid now", site)
        try:
            named: str | None = site_identity(cert)
        except FedsegError:
            named = None
        if named != site:
            raise SecAggError(f"the round keys of {site} come with the certificate of {named!r}", site)
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SecAggError(f"the certificate relayed for {site} holds no EC key", site)
        return public


def kit_credentials(kit: Kit) -> Credentials:
    """What secure aggregation signs this kit's round keys with, and checks the other sites' against."""
    cert_pem = _read(kit.cert).decode()
    return Credentials(load_private_key(kit.key), cert_pem, StudyCA(load_certificate(kit.ca)))


def check_kit_dates(kit: Kit) -> None:
    """Refuse a kit whose certificate or CA is not valid now (a long study can outlive them).

    Raises:
        FedsegError: names the certificate and the date it expired or becomes valid.
    """
    now = dt.datetime.now(dt.UTC)
    _check_valid_at(load_certificate(kit.ca), kit.ca, now)
    _check_valid_at(load_certificate(kit.cert), kit.cert, now)


def _check_kit(kit: Kit) -> None:
    ca = load_certificate(kit.ca)
    cert = load_certificate(kit.cert)
    key = load_private_key(kit.key)
    if not same_key(key, cert):
        raise FedsegError(f"{kit.key} does not belong to the certificate {kit.cert}")
    _check_signed_by(cert, kit.cert, ca, kit.ca)
    check_kit_dates(kit)
    if kit.role == "site" and site_identity(cert) != kit.name:
        raise FedsegError(f"{kit.cert} is for site {site_identity(cert)!r}, but the kit is for site {kit.name!r}")


def same_key(key: KeyT, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    return key.public_key().public_bytes(*_SPKI) == cert.public_key().public_bytes(*_SPKI)


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate at ``path``.

    Raises:
        FedsegError: missing, unreadable or not a PEM certificate (named).
    """
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise FedsegError(f"{path} is not a PEM certificate (corrupt or wrong file)") from exc


def load_private_key(path: Path, passphrase: bytes | None = None) -> KeyT:
    """The EC private key at ``path`` (encrypted with ``passphrase``, or not), refused if group or others may read it.

    Raises:
        FedsegError: missing, too widely readable (with the ``chmod 600`` to run),
            encrypted without the right passphrase, corrupt or not an EC key; the
            message never holds key material.
    """
    _check_key_mode(path)
    data = _read(path)
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and passphrase is None:
        raise FedsegError(f"{path} is encrypted: give its passphrase (--ca-passphrase-file)")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        # The exception text never contains key material, but keep the message generic anyway.
        if encrypted:
            raise FedsegError(f"{path}: wrong passphrase, or a corrupt key") from exc
        raise FedsegError(f"{path} is not an unencrypted PEM private key (corrupt or wrong file)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedsegError(f"{path} is not an EC private key as written by fedseg provision")
    return key


def _check_key_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError as exc:
        raise FedsegError(f"kit file {path} is missing") from exc
    if mode & 0o077:
        raise FedsegError(
            f"private key {path} is readable by others (mode {mode:04o}); "
            f"restrict it with: chmod 600 {shlex.quote(str(path))}"
        )


def _check_signed_by(cert: x509.Certificate, cert_path: Path, ca: x509.Certificate, ca_path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise FedsegError(f"{cert_path} is not signed by the kit's study CA {ca_path}") from exc


def _check_valid_at(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise FedsegError(
            f"certificate {path} is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC); "
            "check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise FedsegError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new certificate from the study CA"
        )
