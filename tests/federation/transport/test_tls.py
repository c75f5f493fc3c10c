"""Mutual TLS with real loopback handshakes: what each side refuses, and who the peer is."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import issue_site_certificate, load_ca
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.transport.kit import load_kit
from fedseg.federation.deploy.lifecycle import revoke
from fedseg.federation.transport.tls import Revocations, client_context, peer_site, server_context

pytestmark = pytest.mark.slow  # every handshake opens a socket on 127.0.0.1

from conftest import write_key_pair

SITES = ["nci", "suny", "ucla"]


# --------------------------------------------------------------------------- real mutual-TLS handshakes


@dataclass
class Handshake:
    """What each side of one loopback connection saw."""

    server_error: BaseException | None = None
    client_error: BaseException | None = None
    server_version: str | None = None
    client_version: str | None = None
    site: str | None = None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1, ephemeral port."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(10)
    yield sock
    sock.close()


def _serve_one(
    sock: socket.socket, context: ssl.SSLContext, allowed: set[str], result: Handshake, revocations: Revocations | None
) -> None:
    try:
        conn, _ = sock.accept()
        conn.settimeout(10)
        with context.wrap_socket(conn, server_side=True) as tls:
            result.server_version = tls.version()
            result.site = peer_site(tls, allowed, revocations)
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError, FedsegError) as exc:
        result.server_error = exc


def _connect(sock: socket.socket, context: ssl.SSLContext, hostname: str, result: Handshake) -> None:
    try:
        with (
            socket.create_connection(sock.getsockname()[:2], timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            result.client_version = tls.version()
            # In TLS 1.3 the client finishes its handshake before the server
            # has checked the client certificate: a refusal arrives as an alert here.
            if tls.recv(2) != b"ok":
                raise ConnectionError("server closed the connection")
    except (ssl.SSLError, OSError) as exc:
        result.client_error = exc


def handshake(
    sock: socket.socket, server: ssl.SSLContext, client: ssl.SSLContext, *,
    hostname: str = "localhost", allowed: set[str] | frozenset[str] = frozenset(SITES),
    revocations: Revocations | None = None,
) -> Handshake:
    result = Handshake()
    thread = threading.Thread(target=_serve_one, args=(sock, server, set(allowed), result, revocations), daemon=True)
    thread.start()
    _connect(sock, client, hostname, result)
    thread.join(15)
    assert not thread.is_alive()
    return result


def test_provisioned_site_connects_and_is_identified(kits: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(listener, server_context(load_kit(kits["server"])), client_context(load_kit(kits["ucla"])))
    assert result.ok, result
    assert result.site == "ucla"
    assert result.server_version == "TLSv1.3"
    assert result.client_version == result.server_version


def test_tls12_only_client_is_refused(kits: dict[str, Path], listener: socket.socket) -> None:
    client = client_context(load_kit(kits["nci"]))
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(listener, server_context(load_kit(kits["server"])), client)
    assert isinstance(result.client_error, ssl.SSLError) and result.site is None, result


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_client_is_refused(kits: dict[str, Path], listener: socket.socket) -> None:
    client = client_context(load_kit(kits["nci"]))
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    result = handshake(listener, server_context(load_kit(kits["server"])), client)
    assert isinstance(result.client_error, ssl.SSLError) and result.site is None, result


def test_server_certificate_cannot_act_as_a_site(kits: dict[str, Path], listener: socket.socket) -> None:
    """A certificate without clientAuth (here the server's own) is refused at the handshake."""
    kit = replace(load_kit(kits["nci"]), cert=kits["server"] / "server.pem", key=kits["server"] / "server.key")
    server = server_context(load_kit(kits["server"]))
    result = handshake(listener, server, client_context(kit), allowed={"localhost"})
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "purpose" in str(result.server_error)
    assert result.site is None


def test_client_certificate_of_another_ca_is_refused(
    kits: dict[str, Path], other_kits: dict[str, Path], listener: socket.socket
) -> None:
    # Trusts the right server, but presents a certificate from another study's CA
    # for a site name that IS in this study: the signature is what is refused.
    foreign = replace(
        load_kit(kits["nci"]), cert=other_kits["nci"] / "client.pem", key=other_kits["nci"] / "client.key"
    )
    result = handshake(listener, server_context(load_kit(kits["server"])), client_context(foreign))
    assert isinstance(result.server_error, ssl.SSLError), result
    assert result.client_error is not None and result.site is None


def test_site_of_another_study_is_refused_on_both_sides(
    kits: dict[str, Path], other_kits: dict[str, Path], listener: socket.socket
) -> None:
    server, client = server_context(load_kit(kits["server"])), client_context(load_kit(other_kits["nci"]))
    result = handshake(listener, server, client)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result
    assert isinstance(result.server_error, ssl.SSLError)


def test_client_without_certificate_is_refused(kits: dict[str, Path], listener: socket.socket) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(kits["server"] / "ca.pem"))
    result = handshake(listener, server_context(load_kit(kits["server"])), client)
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "certificate" in str(result.server_error)
    assert result.client_error is not None and result.site is None


def test_identity_not_in_the_study_is_refused_by_peer_site(kits: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(kits["server"])), client_context(load_kit(kits["ucla"])),
        allowed={"nci", "suny"},
    )
    assert isinstance(result.server_error, FedsegError)
    assert str(result.server_error) == "certificate identity 'ucla' is not a site of this study"
    assert result.client_error is not None  # closed without the "ok"


def test_expired_client_certificate_is_refused_at_handshake(
    kits: dict[str, Path], tmp_path: Path, listener: socket.socket
) -> None:
    ca_key, ca_cert = load_ca(kits["ca"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    key, cert = issue_site_certificate(ca_key, ca_cert, "nci", days=1, not_before=past)
    cert_path, key_path = write_key_pair(tmp_path, key, cert, "expired")
    expired = replace(load_kit(kits["nci"]), cert=cert_path, key=key_path)  # bypasses load_kit's own check
    result = handshake(listener, server_context(load_kit(kits["server"])), client_context(expired))
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "expired" in str(result.server_error)
    assert result.site is None


def test_client_refuses_a_server_certificate_for_another_host(kits: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(kits["server"])), client_context(load_kit(kits["nci"])),
        hostname="fl.example.org",
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result
    assert "fl.example.org" in str(result.client_error)
    assert result.server_error is not None and result.site is None


def test_ip_server_name_handshake(tmp_path: Path, listener: socket.socket) -> None:
    kits = provision_study("127.0.0.1", ["a"], tmp_path / "kits")
    server, client = server_context(load_kit(kits["server"])), client_context(load_kit(kits["a"]))
    result = handshake(listener, server, client, hostname="127.0.0.1", allowed={"a"})
    assert result.ok, result
    assert result.site == "a" and result.client_version in {"TLSv1.2", "TLSv1.3"}


def test_localhost_certificate_does_not_cover_the_ip(kits: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(kits["server"])), client_context(load_kit(kits["nci"])),
        hostname="127.0.0.1",
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result


def test_contexts_are_strict(kits: dict[str, Path]) -> None:
    server = server_context(load_kit(kits["server"]))
    client = client_context(load_kit(kits["nci"]))
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert len(context.get_ca_certs()) == 1  # the study CA only, no system store
    assert client.check_hostname
    with pytest.raises(FedsegError, match="server kit"):
        server_context(load_kit(kits["nci"]))
    with pytest.raises(FedsegError, match="site kit"):
        client_context(load_kit(kits["server"]))


def test_a_revoked_certificate_is_refused_without_a_restart(tmp_path: Path, listener: socket.socket) -> None:
    kits = provision_study("localhost", list(SITES), tmp_path / "kits", study="revocation")
    server_kit = load_kit(kits["server"])
    revocations = Revocations.of(server_kit)
    assert revocations.serials() == frozenset()  # the empty list provisioning wrote, signed by the CA
    server = server_context(server_kit)
    assert handshake(listener, server, client_context(load_kit(kits["nci"])), revocations=revocations).site == "nci"
    revoke(kits["ca"], kits["server"], "nci")
    refused = handshake(listener, server, client_context(load_kit(kits["nci"])), revocations=revocations)
    assert isinstance(refused.server_error, FedsegError) and "site 'nci'" in str(refused.server_error)
    assert "revoked" in str(refused.server_error)
    assert handshake(listener, server, client_context(load_kit(kits["suny"])), revocations=revocations).site == "suny"


def test_a_revocation_list_not_signed_by_the_study_ca_is_refused(kits, other_kits, tmp_path: Path) -> None:
    forged = tmp_path / "crl.pem"
    forged.write_bytes((Path(other_kits["server"]) / "crl.pem").read_bytes())
    with pytest.raises(FedsegError, match="not signed by the study CA"):
        Revocations(forged, load_kit(kits["server"]).ca).serials()


def test_peer_site_without_certificate() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(FedsegError, match="no client certificate"):
        peer_site(NoCert(), {"a"})  # type: ignore[arg-type]
