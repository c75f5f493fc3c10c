"""Provisioning kits: files, permissions, certificate chains, refusals, and the one site-name rule."""

from __future__ import annotations

import ipaddress
import json
import os
import string
from importlib import resources
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseg.errors import FedsegError
from fedseg.federation.deploy.kits import readme
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.protocol.constants import DEFAULT_MAX_MESSAGE
from fedseg.federation.protocol.frames import decode, encode
from fedseg.federation.protocol.names import SITE_PATTERN, is_site_name
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.transport.kit import load_kit, site_identity, validate_site_names

SITES = ["nci", "suny", "ucla"]
KEY_FILES = {"ca": "ca.key", "server": "server.key", **{s: "client.key" for s in SITES}}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One provisioned study (server 'localhost', three sites), shared read-only."""
    return provision_study("localhost", SITES, tmp_path_factory.mktemp("study") / "kits", study="test-study")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- kit layout


def test_kits_hold_the_expected_files(study: dict[str, Path]) -> None:
    assert set(study) == {"ca", "server", *SITES}
    assert sorted(p.name for p in study["ca"].iterdir()) == ["README.txt", "ca.key", "ca.pem", "issued.json"]
    assert sorted(p.name for p in study["server"].iterdir()) == [
        "README.txt", "ca.pem", "crl.pem", "server.key", "server.pem", "study.json"
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


# --------------------------------------------------------------------------- the one site-name rule


def test_a_name_the_wire_would_refuse_is_refused_when_provisioning(tmp_path: Path) -> None:
    """Before, a site provisioned as '_nci' got a kit but could never send its own HELLO."""
    with pytest.raises(FedsegError, match=r"invalid site name\(s\) \['_nci'\]: use 1-64 characters .* starting with a letter or a digit"):
        provision_study("localhost", ["_nci"], tmp_path / "kits")
    assert not (tmp_path / "kits").exists()


def _hello(site: str) -> Message:
    return Message(MessageType.HELLO, site=site, body={"versions": [1], "software": "fedseg test"})


_names = st.one_of(
    st.from_regex(SITE_PATTERN, fullmatch=True),
    st.text(alphabet="abcz09_-.A/ é", min_size=0, max_size=70),
)


@settings(max_examples=300, deadline=None)
@given(name=_names)
def test_every_name_provisioning_accepts_can_say_hello(name: str) -> None:
    try:
        (accepted,) = validate_site_names([name])
    except FedsegError:
        assert not is_site_name(name) or name in {"ca", "server"}
        return
    assert is_site_name(accepted)
    hello = _hello(accepted)
    assert decode(encode(hello), max_size=DEFAULT_MAX_MESSAGE) == hello


def test_readme_templates_are_package_data_and_fully_filled(study: dict[str, Path]) -> None:
    for folder in study.values():
        text = (folder / "README.txt").read_text()
        assert "${" not in text and "$" not in text
    assert "Sites provisioned: nci, suny, ucla" in (study["ca"] / "README.txt").read_text()
    assert "              nci, suny, ucla\n" in (study["server"] / "README.txt").read_text()
    with pytest.raises(KeyError):
        readme("site", study="s", kit="k", site="a")  # server_url missing: never a half-filled README
    ca_template = resources.files("fedseg.federation.deploy").joinpath("templates", "ca.txt").read_text()
    assert {m.group("braced") for m in string.Template.pattern.finditer(ca_template)} == {"study", "sites"}


def test_provision_command_writes_kits_and_names_the_offline_ca(tmp_path, run_cli):
    out = tmp_path / "kits"
    code, stdout, err = run_cli("provision", "--server-name", "localhost", "--sites", "nci,suny", "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"ca", "server", "nci", "suny"}
    assert "OFFLINE" in stdout
    assert (out / "nci" / "client.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run_cli("provision", "--server-name", "localhost", "--sites", "nci", "--out", out)
    assert code == 1 and str(out) in err


def test_lifecycle_commands(tmp_path, run_cli):
    out = tmp_path / "kits"
    secret = tmp_path / "passphrase"
    secret.write_text("a long enough passphrase\n")
    secret.chmod(0o600)
    code, _, err = run_cli("provision", "--server-name", "localhost", "--sites", "nci", "--out", out,
                           "--ca-passphrase-file", secret)
    assert code == 0, err
    common = ["--ca", out / "ca", "--server-kit", out / "server", "--ca-passphrase-file", secret]
    code, stdout, err = run_cli("provision", "add-site", "suny", *common, "--out", tmp_path / "suny")
    assert code == 0 and "--resume" in stdout, err
    code, stdout, err = run_cli("provision", "revoke", "nci", *common)
    assert code == 0 and "revoked" in stdout, err
    code, stdout, err = run_cli("provision", "renew", "nci", *common, "--out", tmp_path / "nci2")
    assert code == 0 and (tmp_path / "nci2" / "client.pem").is_file(), err
    code, _, err = run_cli("provision", "revoke", "nci", "--ca", out / "ca", "--server-kit", out / "server")
    assert code == 1 and "encrypted: give its passphrase" in err
    secret.chmod(0o644)
    code, _, err = run_cli("provision", "revoke", "nci", *common)
    assert code == 1 and "chmod 600" in err
    code, _, err = run_cli("provision")
    assert code == 1 and "--server-name" in err


def test_kits_provisioned_for_secure_aggregation_refuse_a_study_without_it(tmp_path):
    from fedseg.errors import FedsegError
    from fedseg.federation.deploy.lifecycle import add_site
    from fedseg.federation.deploy.provision import provision_study
    from fedseg.federation.transport.kit import load_kit

    kits = provision_study("fl.example.org", ["nci", "suny"], tmp_path / "kits", secure_aggregation=True)
    added = add_site(kits["ca"], kits["server"], "ucla", tmp_path / "ucla")
    for folder in (kits["server"], kits["nci"], added):
        kit = load_kit(folder)
        assert kit.secure_aggregation
        kit.require_secure_aggregation(True, "study.toml")
        with pytest.raises(FedsegError, match="provisioned for secure aggregation, but study.toml does not set"):
            kit.require_secure_aggregation(False, "study.toml")
    plain = provision_study("fl.example.org", ["nci", "suny"], tmp_path / "plain")
    assert not load_kit(plain["nci"]).secure_aggregation
    load_kit(plain["nci"]).require_secure_aggregation(False, None)
