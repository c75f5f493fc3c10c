"""Reading a kit back: load_kit's checks, each refusal naming the file; a certificate's site identity."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import (
    issue_server_certificate,
    issue_site_certificate,
    load_ca,
)
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.transport.kit import Kit, load_kit, site_identity

from conftest import write_key_pair

SITES = ["nci", "suny", "ucla"]


def test_site_identity_falls_back_to_cn(kits: dict[str, Path]) -> None:
    ca_key, ca_cert = load_ca(kits["ca"])
    _, server = issue_server_certificate(ca_key, ca_cert, "nci-host", days=1)  # no site URI: CN is used
    assert site_identity(server) == "nci-host"


# --------------------------------------------------------------------------- load_kit


@pytest.fixture
def fresh(tmp_path: Path) -> dict[str, Path]:
    """A study this test may damage."""
    return provision_study("localhost", ["a", "b"], tmp_path / "kits")


def test_load_kit_reads_server_and_site(kits: dict[str, Path]) -> None:
    server = load_kit(kits["server"])
    assert (server.role, server.name, server.allowed_sites) == ("server", "localhost", frozenset(SITES))
    assert server.cert == kits["server"] / "server.pem" and server.key == kits["server"] / "server.key"
    site = load_kit(kits["suny"])
    assert (site.role, site.name, site.server_url, site.server_name) == (
        "site", "suny", "wss://localhost:8443", "localhost"
    )
    assert site.ca == kits["suny"] / "ca.pem"


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


def test_load_kit_refuses_a_certificate_of_another_ca(fresh: dict[str, Path], other_kits: dict[str, Path]) -> None:
    (fresh["a"] / "ca.pem").unlink()
    (fresh["a"] / "ca.pem").write_bytes((other_kits["ca"] / "ca.pem").read_bytes())
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
    write_key_pair(fresh["a"], key, cert, "client")
    with pytest.raises(FedsegError, match=message):
        load_kit(fresh["a"])


def test_kit_is_a_plain_dataclass(kits: dict[str, Path]) -> None:
    kit = load_kit(kits["nci"])
    assert isinstance(kit, Kit) and kit.directory == kits["nci"]
