"""Mutual TLS as objects: build ``ssl.SSLContext`` from a kit, read a peer's site.

Transports take a configured :class:`ssl.SSLContext` (as httpx does) rather
than file paths, so every TLS decision lives here::

    server_context(kit)   -> server side: requires a client certificate from the study CA
    client_context(kit)   -> client side: verifies the server's certificate and host name
    Revocations(kit)      -> the server kit's revocation list, re-read when the file changes
    peer_site(ssl_object, allowed, revocations) -> the verified, unrevoked site name, or FedsegError

Both contexts trust the study CA only (never the system store: a public CA
must not be able to impersonate a participant) and speak TLS 1.3 only (all
its cipher suites are AEAD and forward-secret). The handshake itself refuses an
unknown CA, an expired certificate, a missing client certificate and a wrong
host name; :func:`peer_site` then refuses a valid certificate whose identity
is not a site of this study, or whose serial the study CA revoked (checked
after the handshake, against a CRL whose signature is verified with the CA:
a revocation takes effect for the next connection, without a restart).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedseg.errors import FedsegError
from fedseg.federation.transport.kit import Kit, load_certificate, site_identity

__all__ = ["MINIMUM_VERSION", "HandshakeHook", "Revocations", "client_context", "peer_site", "server_context"]

log = logging.getLogger("fedseg.server")

HandshakeHook = Callable[[ssl.SSLError], None]
"""Told why a TLS handshake failed (server side)."""

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_3
"""The only TLS version either side speaks (1.3: AEAD, forward secrecy, the certificate encrypted)."""


def _base_context(protocol: int, kit: Kit) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME; usually the default already
    # RFC 5280 strictness (as create_default_context does from Python 3.13);
    # certificates written by provision comply.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        # cafile only, no load_default_certs(): the study CA is the sole trust anchor.
        context.load_verify_locations(cafile=str(kit.ca))
        context.load_cert_chain(certfile=str(kit.cert), keyfile=str(kit.key))
    except (ssl.SSLError, OSError) as exc:
        raise FedsegError(f"cannot load the TLS files of kit {kit.directory}: {exc}") from exc
    return context


def _require_role(kit: Kit, role: str) -> None:
    if kit.role != role:
        raise FedsegError(f"{kit.directory} is a {kit.role} kit; a {role} kit is needed here")


def _reporting(on_failure: HandshakeHook) -> type[ssl.SSLObject]:
    """An SSLObject class that reports handshake failures before raising them.

    asyncio closes a connection whose handshake failed without a word (it logs
    only in debug mode, and under TLS 1.3 the client never sees the alert), so
    this is where a refused certificate can be named in the server's log.
    """

    class ReportingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake needs more bytes
            except ssl.SSLError as exc:
                on_failure(exc)
                raise

    return ReportingSSLObject


def server_context(kit: Kit, on_handshake_failure: HandshakeHook | None = None) -> ssl.SSLContext:
    """TLS context for the federated server: mutual TLS, study CA only.

    ``verify_mode`` is CERT_REQUIRED, so a client without a certificate, or with
    one not issued by the study CA or outside its validity, fails the
    handshake. Whether the verified identity is a site of *this* study is
    checked afterwards with :func:`peer_site`. ``on_handshake_failure`` is
    told why each failed handshake failed (for the server's log).

    Raises:
        FedsegError: ``kit`` is not a server kit, or its files cannot be loaded.
    """
    _require_role(kit, "server")
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, kit)
    context.verify_mode = ssl.CERT_REQUIRED
    if on_handshake_failure is not None:
        context.sslobject_class = _reporting(on_handshake_failure)
    return context


def client_context(kit: Kit) -> ssl.SSLContext:
    """TLS context for a site client: verify the server, present the site's certificate.

    ``check_hostname`` is on, so the connection must name the server with
    ``server_hostname=kit.server_name`` (websockets does this from the
    ``wss://`` URL) and the server certificate must match it.

    Raises:
        FedsegError: ``kit`` is not a site kit, or its files cannot be loaded.
    """
    _require_role(kit, "site")
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, kit)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


class Revocations:
    """The serials the study CA revoked, from the server kit's ``crl.pem``; re-read whenever the file changes.

    A CRL that is unreadable or not signed by the study CA stops the check with
    an error (a forged list must not unrevoke anyone; a broken one must not be
    ignored silently).
    """

    def __init__(self, crl: Path | None, ca: Path) -> None:
        self.path = crl
        self.ca = ca
        self._seen: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    @classmethod
    def of(cls, kit: Kit) -> Revocations:
        return cls(kit.crl, kit.ca)

    def serials(self) -> frozenset[int]:
        """The revoked serial numbers now (the file is re-read when its size or mtime changed)."""
        if self.path is None or not self.path.exists():
            return self._serials
        stat = self.path.stat()
        if self._seen != (stat.st_mtime_ns, stat.st_size):
            self._serials = self._load()
            self._seen = (stat.st_mtime_ns, stat.st_size)
            log.info("revocation list %s: %d certificate(s) revoked", self.path, len(self._serials))
        return self._serials

    def _load(self) -> frozenset[int]:
        assert self.path is not None
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise FedsegError(f"cannot read the revocation list {self.path}: {exc}") from exc
        ca = load_certificate(self.ca)
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise FedsegError(f"{self.path} is not signed by the study CA {self.ca}; refusing to use it")
        return frozenset(revoked.serial_number for revoked in crl)


def peer_site(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, allowed: set[str] | frozenset[str], revocations: Revocations | None = None
) -> str:
    """The site name of the TLS peer, if it is one of ``allowed`` and its certificate is not revoked.

    Only meaningful on a connection made with :func:`server_context`: the
    certificate returned by ``getpeercert`` has then been verified against the
    study CA during the handshake.

    Raises:
        FedsegError: the peer presented no certificate, or its identity is not
            in ``allowed`` ("certificate identity 'x' is not a site of this study").
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise FedsegError("the peer presented no client certificate; only the study's sites may connect")
    cert = x509.load_der_x509_certificate(der)
    name = site_identity(cert)
    if name not in allowed:
        raise FedsegError(f"certificate identity {name!r} is not a site of this study")
    if revocations is not None and cert.serial_number in revocations.serials():
        raise FedsegError(f"the certificate of site {name!r} (serial {cert.serial_number:x}) has been revoked")
    return name

