"""Making certificates: the study CA, the server's certificate for its host name, one client certificate per site.

Trust model: the study CA is the only trust anchor on both sides. The server
certificate names HOST (DNS and, for an IP literal, IP SAN) and carries
ExtendedKeyUsage serverAuth; each site certificate carries its site name as
CN and as SAN URI ``fedseg://site/<name>`` with clientAuth. A site's identity
is therefore a fact signed by the study CA, read back by
:func:`~fedseg.federation.transport.kit.site_identity`.

Keys are EC P-256 (ECDSA-SHA256): supported by every TLS 1.2/1.3 stack,
unlike Ed25519 certificates in some older OpenSSL/browser builds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.errors import FedsegError
from fedseg.federation.transport.kit import (
    SITE_URI_PREFIX,
    KeyT,
    load_certificate,
    load_private_key,
    same_key,
    validate_site_names,
)

__all__ = [
    "ip_address",
    "issue_server_certificate",
    "issue_site_certificate",
    "load_ca",
    "new_certificate_authority",
    "validate_host",
]

_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Certificates start slightly in the past so that a site whose clock lags the
# provisioning machine by a few minutes does not see them as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)


def validate_host(host: str) -> str:
    """Check HOST, the server's DNS name or IP address, and return it.

    Accepts a DNS name (letters, digits, '-' in dot-separated labels) or an IPv4
    or IPv6 literal, without scheme, port, path, brackets or spaces.

    Raises:
        FedsegError: anything else, with what was wrong.
    """
    if not isinstance(host, str) or not host:
        raise FedsegError("server name is empty: give the DNS name or IP address the sites will connect to")
    if "://" in host or "/" in host or any(c.isspace() for c in host):
        raise FedsegError(f"server name {host!r} must be a bare host name or IP address (no scheme, path or spaces)")
    if ip_address(host) is not None:
        return host
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise FedsegError(
            f"server name {host!r} is not a valid DNS name or IP address (no port: use --port for that)"
        )
    return host


def ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """HOST as an IP address, or None when it is a DNS name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _new_key() -> KeyT:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, study: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if study is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, study))
    return x509.Name(attributes)


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    return start, start + dt.timedelta(days=days)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs only; a TLS end entity (ECDHE-ECDSA)
    # needs digitalSignature only.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


CA_MARGIN_DAYS = 365
"""The CA is valid this much longer than the certificates issued with it, so they can be renewed before it ends."""
CRL_DAYS = 3650
"""How long a revocation list is taken as current; fedseg checks its signature, not its freshness."""


def new_certificate_authority(
    study: str, *, days: int = 825, not_before: dt.datetime | None = None
) -> tuple[KeyT, x509.Certificate]:
    """Create the study CA: a fresh P-256 key and a self-signed CA certificate.

    The CA may sign end-entity certificates only (``path_length=0``), so a
    stolen site key can never be used to mint further certificates.

    Args:
        study: study name, written into the CA's subject.
        days: validity in days from ``not_before``.
        not_before: start of validity (UTC); default now minus 5 minutes of clock skew.

    Returns:
        ``(private_key, certificate)``.
    """
    key = _new_key()
    start, end = _validity(days, not_before)
    subject = _name(f"{study} CA", study)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: KeyT,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    *,
    days: int,
    not_before: dt.datetime | None,
) -> tuple[KeyT, x509.Certificate]:
    """Sign a new end-entity certificate (fresh key) for one TLS purpose."""
    key = _new_key()
    start, end = _validity(days, not_before)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_san(host: str) -> list[x509.GeneralName]:
    ip = ip_address(host)
    names: list[x509.GeneralName] = []
    # An IPv6 literal is not a syntactically valid dNSName; everything else keeps a
    # DNS entry so that clients matching the host text also accept it.
    if not isinstance(ip, ipaddress.IPv6Address):
        names.append(x509.DNSName(host))
    if ip is not None:
        names.append(x509.IPAddress(ip))
    return names


def issue_server_certificate(
    ca_key: KeyT, ca_cert: x509.Certificate, host: str, *, days: int = 825, not_before: dt.datetime | None = None
) -> tuple[KeyT, x509.Certificate]:
    """Issue the server's certificate for HOST (serverAuth), signed by the study CA.

    SAN holds ``DNSName(host)`` (except for IPv6 literals) and, when HOST is an
    IP literal, ``IPAddress(host)``: clients check the host name against these.

    Raises:
        FedsegError: HOST is invalid (see :func:`validate_host`).
    """
    host = validate_host(host)
    return _issue(
        ca_key, ca_cert, _name(host), _server_san(host), ExtendedKeyUsageOID.SERVER_AUTH,
        days=days, not_before=not_before,
    )


def issue_site_certificate(
    ca_key: KeyT, ca_cert: x509.Certificate, site: str, *, days: int = 825, not_before: dt.datetime | None = None
) -> tuple[KeyT, x509.Certificate]:
    """Issue a site's client certificate (clientAuth) whose identity is SITE.

    The identity is written twice, as CN and as SAN URI ``fedseg://site/<site>``;
    :func:`~fedseg.federation.transport.kit.site_identity` reads the URI first.

    Raises:
        FedsegError: SITE is not a valid site name.
    """
    (site,) = validate_site_names([site])
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)]
    return _issue(
        ca_key, ca_cert, _name(site), san, ExtendedKeyUsageOID.CLIENT_AUTH, days=days, not_before=not_before
    )


def load_ca(folder: Path, passphrase: bytes | None = None) -> tuple[KeyT, x509.Certificate]:
    """Read the offline CA folder (``out/ca``) to issue more certificates (``passphrase``: an encrypted ca.key).

    Raises:
        FedsegError: a file is missing, corrupt, the key is readable by others, or
            encrypted and the passphrase is missing or wrong.
    """
    folder = Path(folder)
    key = load_private_key(folder / "ca.key", passphrase)
    cert = load_certificate(folder / "ca.pem")
    if not same_key(key, cert):
        raise FedsegError(f"{folder / 'ca.key'} does not belong to {folder / 'ca.pem'}")
    return key, cert


def revocation_list(
    ca_key: KeyT, ca_cert: x509.Certificate, serials: list[int], *, days: int = CRL_DAYS
) -> x509.CertificateRevocationList:
    """A CRL signed by the study CA that revokes ``serials`` (valid ``days``: re-signed by every revoke)."""
    now = dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256())
