"""Provisioning kits and mutual TLS: files, permissions, chains, and real loopback handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.errors import FedsegError
from fedseg.federation.deploy.provision import (
    Kit,
    issue_server_certificate,
    issue_site_certificate,
    load_ca,
    load_kit,
    provision_study,
    site_identity,
)
from fedseg.federation.transport.tls import client_context, peer_site, server_context

SITES = ["nci", "suny", "ucla"]
KEY_FILES = {"ca": "ca.key", "server": "server.key", **{s: "client.key" for s in SITES}}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One provisioned study (server 'localhost', three sites), shared read-only."""
    return provision_study("localhost", SITES, tmp_path_factory.mktemp("study") / "kits", study="test-study")


@pytest.fixture(scope="module")
def other_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated study with its own CA and a site of the same name."""
    return provision_study("localhost", ["nci"], tmp_path_factory.mktemp("other") / "kits", study="other-study")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _write_pair(folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, stem: str) -> tuple[Path, Path]:
    """Write a test key (0600 at creation) and certificate; returns (cert, key) paths."""
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# --------------------------------------------------------------------------- kit layout


def test_kits_hold_the_expected_files(study: dict[str, Path]) -> None:
    assert set(study) == {"ca", "server", *SITES}
    assert sorted(p.name for p in study["ca"].iterdir()) == ["README.txt", "ca.key", "ca.pem"]
    assert sorted(p.name for p in study["server"].iterdir()) == [
        "README.txt", "ca.pem", "server.key", "server.pem", "study.json"
    ]
    for site in SITES:
        assert sorted(p.name for p in study[site].iterdir()) == [
            "README.txt", "ca.pem", "client.key", "client.pem", "study.json"
        ]


def test_study_json_and_readme_contents(study: dict[str, Path]) -> None:
    server = json.loads((study["server"] / "study.json").read_text())
    assert server["role"] == "server" and server["study"] == "test-study"
    assert server["sites"] == SITES and server["server_name"] == "localhost" and server["port"] == 8443
    assert f"fedseg server --kit {study['server']}" in (study["server"] / "README.txt").read_text()
    for site in SITES:
        doc = json.loads((study[site] / "study.json").read_text())
        assert doc["site"] == site and doc["server_url"] == "wss://localhost:8443" and doc["role"] == "site"
        assert f"fedseg client --kit {study[site]} --data SITE_DIR" in (study[site] / "README.txt").read_text()
    assert "OFFLINE" in (study["ca"] / "README.txt").read_text()


def test_keys_are_0600_and_folders_0700(study: dict[str, Path]) -> None:
    for name, folder in study.items():
        assert folder.stat().st_mode & 0o777 == 0o700, folder
        assert (folder / KEY_FILES[name]).stat().st_mode & 0o777 == 0o600
    assert study["server"].parent.stat().st_mode & 0o777 == 0o700


def test_keys_are_created_0600_not_chmodded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With umask 0 a file opened with the default 0666 would be world-readable; chmod is forbidden."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("provisioning must not chmod after writing")

    monkeypatch.setattr(os, "chmod", forbidden)
    monkeypatch.setattr(os, "fchmod", forbidden)
    monkeypatch.setattr(Path, "chmod", forbidden)
    old = os.umask(0)
    try:
        kits = provision_study("localhost", ["a"], tmp_path / "kits")
    finally:
        os.umask(old)
    for name, key in (("ca", "ca.key"), ("server", "server.key"), ("a", "client.key")):
        assert (kits[name] / key).stat().st_mode & 0o777 == 0o600
        assert kits[name].stat().st_mode & 0o777 == 0o700


def test_each_key_lives_in_exactly_one_kit(study: dict[str, Path]) -> None:
    keys = {name: (study[name] / KEY_FILES[name]).read_bytes() for name in study}
    assert len(set(keys.values())) == len(keys)  # all distinct
    for folder_name, folder in study.items():
        for file in folder.iterdir():
            data = file.read_bytes()
            for owner, key in keys.items():
                if owner != folder_name:
                    assert key not in data, f"{owner}'s key found in {file}"
                    # also the raw key body, in case of re-encoding/whitespace changes
                    assert b"".join(key.splitlines()[1:-1]) not in b"".join(data.splitlines())
    for folder_name, folder in study.items():
        assert [p.name for p in folder.glob("*.key")] == [KEY_FILES[folder_name]]


def test_certificates_chain_to_the_ca(study: dict[str, Path]) -> None:
    ca = _cert(study["ca"] / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for folder in study.values():
        if folder.name != "ca":
            assert (folder / "ca.pem").read_bytes() == (study["ca"] / "ca.pem").read_bytes()
    server = _cert(study["server"] / "server.pem")
    server.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    for site in SITES:
        cert = _cert(study[site] / "client.pem")
        cert.verify_directly_issued_by(ca)
        assert site_identity(cert) == site
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"fedseg://site/{site}"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    leaves = [study["server"] / "server.pem", *(study[s] / "client.pem" for s in SITES)]
    serials = {_cert(path).serial_number for path in leaves}
    assert len(serials) == 1 + len(SITES)


def test_ip_server_name_gets_an_ip_san(tmp_path: Path) -> None:
    kits = provision_study("127.0.0.1", ["a"], tmp_path / "kits", port=9000)
    san = _cert(kits["server"] / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["127.0.0.1"]
    assert json.loads((kits["a"] / "study.json").read_text())["server_url"] == "wss://127.0.0.1:9000"


def test_ipv6_server_name(tmp_path: Path) -> None:
    kits = provision_study("::1", ["a"], tmp_path / "kits")
    san = _cert(kits["server"] / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == []  # "::1" is not a valid dNSName
    assert load_kit(kits["a"]).server_url == "wss://[::1]:8443"


def test_site_identity_falls_back_to_cn(study: dict[str, Path]) -> None:
    ca_key, ca_cert = load_ca(study["ca"])
    _, server = issue_server_certificate(ca_key, ca_cert, "nci-host", days=1)  # no site URI: CN is used
    assert site_identity(server) == "nci-host"


# --------------------------------------------------------------------------- refusals while provisioning


def test_refuses_a_non_empty_out(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FedsegError, match="kits"):
        provision_study("localhost", ["a"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_to_provision_twice(tmp_path: Path) -> None:
    provision_study("localhost", ["a"], tmp_path / "kits")
    before = (tmp_path / "kits" / "ca" / "ca.key").read_bytes()
    with pytest.raises(FedsegError, match="not empty"):
        provision_study("localhost", ["a"], tmp_path / "kits")
    assert (tmp_path / "kits" / "ca" / "ca.key").read_bytes() == before


def test_empty_out_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "kits").mkdir()
    assert provision_study("localhost", ["a"], tmp_path / "kits")["a"] == tmp_path / "kits" / "a"


@pytest.mark.parametrize(
    "sites",
    [[], [""], ["NCI"], ["a b"], ["../x"], ["a/b"], ["x" * 65], ["a", "a"], ["ca"], ["server"], ["é"]],
)
def test_bad_site_names_are_refused(tmp_path: Path, sites: list[str]) -> None:
    with pytest.raises(FedsegError):
        provision_study("localhost", sites, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()  # validated before anything is written


@pytest.mark.parametrize("host", ["", "wss://h", "h h", "h/x", "host:8443", "-bad", "a..b"])
def test_bad_host_names_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(FedsegError):
        provision_study(host, ["a"], tmp_path / "kits")


@pytest.mark.parametrize("options", [{"port": 0}, {"port": 70000}, {"days": 0}, {"study": ""}])
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(FedsegError):
        provision_study("localhost", ["a"], tmp_path / "kits", **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load_kit


@pytest.fixture
def fresh(tmp_path: Path) -> dict[str, Path]:
    """A study this test may damage."""
    return provision_study("localhost", ["a", "b"], tmp_path / "kits")


def test_load_kit_reads_server_and_site(study: dict[str, Path]) -> None:
    server = load_kit(study["server"])
    assert (server.role, server.name, server.allowed_sites) == ("server", "localhost", frozenset(SITES))
    assert server.cert == study["server"] / "server.pem" and server.key == study["server"] / "server.key"
    site = load_kit(study["suny"])
    assert (site.role, site.name, site.server_url, site.server_name) == (
        "site", "suny", "wss://localhost:8443", "localhost"
    )
    assert site.ca == study["suny"] / "ca.pem"


def test_load_kit_refuses_a_0644_key(fresh: dict[str, Path]) -> None:
    key = fresh["a"] / "client.key"
    key.chmod(0o644)
    with pytest.raises(FedsegError, match=r"chmod 600") as info:
        load_kit(fresh["a"])
    assert str(key) in str(info.value)
    assert "PRIVATE" not in str(info.value)


@pytest.mark.parametrize("name", ["ca.pem", "client.pem", "client.key", "study.json"])
def test_load_kit_names_a_missing_file(fresh: dict[str, Path], name: str) -> None:
    (fresh["a"] / name).unlink()
    with pytest.raises(FedsegError, match=name):
        load_kit(fresh["a"])


@pytest.mark.parametrize("name", ["ca.pem", "server.pem", "server.key", "study.json"])
def test_load_kit_names_a_corrupt_file(fresh: dict[str, Path], name: str) -> None:
    path = fresh["server"] / name
    data = path.read_bytes()
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(FedsegError, match=name):
        load_kit(fresh["server"])


def test_load_kit_refuses_a_certificate_of_another_ca(fresh: dict[str, Path], other_study: dict[str, Path]) -> None:
    (fresh["a"] / "ca.pem").unlink()
    (fresh["a"] / "ca.pem").write_bytes((other_study["ca"] / "ca.pem").read_bytes())
    with pytest.raises(FedsegError, match="not signed by the kit's study CA"):
        load_kit(fresh["a"])


def test_load_kit_refuses_a_key_of_another_participant(fresh: dict[str, Path]) -> None:
    (fresh["a"] / "client.pem").unlink()
    (fresh["a"] / "client.pem").write_bytes((fresh["b"] / "client.pem").read_bytes())
    with pytest.raises(FedsegError, match="does not belong"):
        load_kit(fresh["a"])


@pytest.mark.parametrize(
    ("start", "message"),
    [(dt.timedelta(days=-10), "expired"), (dt.timedelta(days=2), "not valid yet")],
)
def test_load_kit_refuses_a_certificate_outside_its_validity(
    fresh: dict[str, Path], start: dt.timedelta, message: str
) -> None:
    ca_key, ca_cert = load_ca(fresh["ca"])
    key, cert = issue_site_certificate(
        ca_key, ca_cert, "a", days=1, not_before=dt.datetime.now(dt.UTC) + start
    )
    for name in ("client.pem", "client.key"):
        (fresh["a"] / name).unlink()
    _write_pair(fresh["a"], key, cert, "client")
    with pytest.raises(FedsegError, match=message):
        load_kit(fresh["a"])


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


def _serve_one(sock: socket.socket, context: ssl.SSLContext, allowed: set[str], result: Handshake) -> None:
    try:
        conn, _ = sock.accept()
        conn.settimeout(10)
        with context.wrap_socket(conn, server_side=True) as tls:
            result.server_version = tls.version()
            result.site = peer_site(tls, allowed)
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
) -> Handshake:
    result = Handshake()
    thread = threading.Thread(target=_serve_one, args=(sock, server, set(allowed), result), daemon=True)
    thread.start()
    _connect(sock, client, hostname, result)
    thread.join(15)
    assert not thread.is_alive()
    return result


def test_provisioned_site_connects_and_is_identified(study: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(listener, server_context(load_kit(study["server"])), client_context(load_kit(study["ucla"])))
    assert result.ok, result
    assert result.site == "ucla"
    assert result.server_version in {"TLSv1.2", "TLSv1.3"}
    assert result.client_version == result.server_version


def test_tls12_only_client_still_connects(study: dict[str, Path], listener: socket.socket) -> None:
    client = client_context(load_kit(study["nci"]))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(listener, server_context(load_kit(study["server"])), client)
    assert result.ok, result
    assert (result.server_version, result.site) == ("TLSv1.2", "nci")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_client_is_refused(study: dict[str, Path], listener: socket.socket) -> None:
    client = client_context(load_kit(study["nci"]))
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    result = handshake(listener, server_context(load_kit(study["server"])), client)
    assert isinstance(result.client_error, ssl.SSLError) and result.site is None, result


def test_server_certificate_cannot_act_as_a_site(study: dict[str, Path], listener: socket.socket) -> None:
    """A certificate without clientAuth (here the server's own) is refused at the handshake."""
    kit = replace(load_kit(study["nci"]), cert=study["server"] / "server.pem", key=study["server"] / "server.key")
    server = server_context(load_kit(study["server"]))
    result = handshake(listener, server, client_context(kit), allowed={"localhost"})
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "purpose" in str(result.server_error)
    assert result.site is None


def test_client_certificate_of_another_ca_is_refused(
    study: dict[str, Path], other_study: dict[str, Path], listener: socket.socket
) -> None:
    # Trusts the right server, but presents a certificate from another study's CA
    # for a site name that IS in this study: the signature is what is refused.
    foreign = replace(
        load_kit(study["nci"]), cert=other_study["nci"] / "client.pem", key=other_study["nci"] / "client.key"
    )
    result = handshake(listener, server_context(load_kit(study["server"])), client_context(foreign))
    assert isinstance(result.server_error, ssl.SSLError), result
    assert result.client_error is not None and result.site is None


def test_site_of_another_study_is_refused_on_both_sides(
    study: dict[str, Path], other_study: dict[str, Path], listener: socket.socket
) -> None:
    server, client = server_context(load_kit(study["server"])), client_context(load_kit(other_study["nci"]))
    result = handshake(listener, server, client)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result
    assert isinstance(result.server_error, ssl.SSLError)


def test_client_without_certificate_is_refused(study: dict[str, Path], listener: socket.socket) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(study["server"] / "ca.pem"))
    result = handshake(listener, server_context(load_kit(study["server"])), client)
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "certificate" in str(result.server_error)
    assert result.client_error is not None and result.site is None


def test_identity_not_in_the_study_is_refused_by_peer_site(study: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(study["server"])), client_context(load_kit(study["ucla"])),
        allowed={"nci", "suny"},
    )
    assert isinstance(result.server_error, FedsegError)
    assert str(result.server_error) == "certificate identity 'ucla' is not a site of this study"
    assert result.client_error is not None  # closed without the "ok"


def test_expired_client_certificate_is_refused_at_handshake(
    study: dict[str, Path], tmp_path: Path, listener: socket.socket
) -> None:
    ca_key, ca_cert = load_ca(study["ca"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    key, cert = issue_site_certificate(ca_key, ca_cert, "nci", days=1, not_before=past)
    cert_path, key_path = _write_pair(tmp_path, key, cert, "expired")
    expired = replace(load_kit(study["nci"]), cert=cert_path, key=key_path)  # bypasses load_kit's own check
    result = handshake(listener, server_context(load_kit(study["server"])), client_context(expired))
    assert isinstance(result.server_error, ssl.SSLError), result
    assert "expired" in str(result.server_error)
    assert result.site is None


def test_client_refuses_a_server_certificate_for_another_host(study: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(study["server"])), client_context(load_kit(study["nci"])),
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


def test_localhost_certificate_does_not_cover_the_ip(study: dict[str, Path], listener: socket.socket) -> None:
    result = handshake(
        listener, server_context(load_kit(study["server"])), client_context(load_kit(study["nci"])),
        hostname="127.0.0.1",
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result


def test_contexts_are_strict(study: dict[str, Path]) -> None:
    server = server_context(load_kit(study["server"]))
    client = client_context(load_kit(study["nci"]))
    for context in (server, client):
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert len(context.get_ca_certs()) == 1  # the study CA only, no system store
    assert client.check_hostname
    with pytest.raises(FedsegError, match="server kit"):
        server_context(load_kit(study["nci"]))
    with pytest.raises(FedsegError, match="site kit"):
        client_context(load_kit(study["server"]))


def test_peer_site_without_certificate() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(FedsegError, match="no client certificate"):
        peer_site(NoCert(), {"a"})  # type: ignore[arg-type]


def test_kit_is_a_plain_dataclass(study: dict[str, Path]) -> None:
    kit = load_kit(study["nci"])
    assert isinstance(kit, Kit) and kit.directory == study["nci"]


def test_provision_command_writes_kits_and_names_the_offline_ca(tmp_path, run_cli):
    out = tmp_path / "kits"
    code, stdout, err = run_cli("provision", "--server-name", "localhost", "--sites", "nci,suny", "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"ca", "server", "nci", "suny"}
    assert "OFFLINE" in stdout
    assert (out / "nci" / "client.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run_cli("provision", "--server-name", "localhost", "--sites", "nci", "--out", out)
    assert code == 1 and str(out) in err
