"""Certificates after provisioning: add a site, renew, revoke; the CA outlives its leaves and may be encrypted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import CA_MARGIN_DAYS, load_ca
from fedseg.federation.deploy.lifecycle import add_site, explained_site_change, renew, revoke
from fedseg.federation.deploy.provision import provision_study
from fedseg.federation.deploy.rundir import RunDir
from fedseg.federation.deploy.serverrun import ServerRun
from fedseg.federation.transport.kit import load_kit
from fedseg.federation.transport.tls import Revocations


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    return provision_study("localhost", ["nci", "suny"], tmp_path / "kits", study="lifecycle", days=30)


def test_the_ca_outlives_the_certificates_it_issued(study: dict[str, Path]) -> None:
    ca, site = cert(study["ca"] / "ca.pem"), cert(study["nci"] / "client.pem")
    margin = ca.not_valid_after_utc - site.not_valid_after_utc
    assert abs(margin.days - CA_MARGIN_DAYS) <= 1
    issued = json.loads((study["ca"] / "issued.json").read_text())
    assert [e["name"] for e in issued] == ["server", "nci", "suny"]
    assert issued[1]["serial"] == str(site.serial_number)


def test_add_site_writes_its_kit_and_lists_it_in_the_server_kit(study: dict[str, Path], tmp_path: Path) -> None:
    folder = add_site(study["ca"], study["server"], "ucla", tmp_path / "ucla")
    kit = load_kit(folder)
    assert kit.role == "site" and kit.name == "ucla" and kit.server_url == load_kit(study["server"]).server_url
    assert load_kit(study["server"]).allowed_sites == {"nci", "suny", "ucla"}
    assert explained_site_change(load_kit(study["server"]), ["nci", "suny"]) == "added ucla"
    assert explained_site_change(load_kit(study["server"]), ["nci"]) is None  # suny was never added this way
    with pytest.raises(FedsegError, match="already in the study"):
        add_site(study["ca"], study["server"], "ucla", tmp_path / "again")
    with pytest.raises(FedsegError, match="invalid site name"):
        add_site(study["ca"], study["server"], "../x", tmp_path / "bad")


def test_revoke_then_renew_a_stolen_site_key(study: dict[str, Path], tmp_path: Path) -> None:
    old = cert(study["nci"] / "client.pem")
    serials = revoke(study["ca"], study["server"], "nci")
    assert serials == [f"{old.serial_number:x}"]
    revocations = Revocations.of(load_kit(study["server"]))
    assert old.serial_number in revocations.serials()
    renewed = load_kit(renew(study["ca"], "nci", tmp_path / "nci-new", study["server"]))
    assert cert(renewed.cert).serial_number not in revocations.serials()
    assert load_kit(study["server"]).allowed_sites == {"nci", "suny"}  # revoked, not removed
    changes = [json.loads(line)["action"] for line in (study["server"] / "changes.jsonl").read_text().splitlines()]
    assert changes == ["revoke", "renew"]


def test_revoke_with_remove_takes_the_site_off_the_study(study: dict[str, Path]) -> None:
    revoke(study["ca"], study["server"], "suny", remove=True)
    kit = load_kit(study["server"])
    assert kit.allowed_sites == {"nci"}
    assert explained_site_change(kit, ["nci", "suny"]) == "removed suny"
    with pytest.raises(FedsegError, match="lists no certificate issued to 'nobody'"):
        revoke(study["ca"], study["server"], "nobody")


def test_an_encrypted_ca_key_needs_its_passphrase(tmp_path: Path) -> None:
    kits = provision_study("localhost", ["nci"], tmp_path / "kits", ca_passphrase=b"correct horse battery")
    assert b"ENCRYPTED" in (kits["ca"] / "ca.key").read_bytes()
    with pytest.raises(FedsegError, match="is encrypted: give its passphrase"):
        load_ca(kits["ca"])
    with pytest.raises(FedsegError, match="wrong passphrase"):
        load_ca(kits["ca"], b"wrong passphrase")
    load_ca(kits["ca"], b"correct horse battery")
    add_site(kits["ca"], kits["server"], "suny", tmp_path / "suny", passphrase=b"correct horse battery")
    assert oct((kits["ca"] / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_resume_accepts_a_site_list_changed_by_these_commands_only(study: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    RunDir.create(run, {"sites": ["nci", "suny"], "rounds": 3, "federation": {"rounds": 3}, "train": {}, "prepare": {}})
    add_site(study["ca"], study["server"], "ucla", tmp_path / "ucla")
    said: list[str] = []
    resumed = ServerRun.resume(study["server"], run, cache=tmp_path / "cache", say=said.append)
    assert resumed.sites == ["nci", "suny", "ucla"] and "added ucla" in said[0]
    edited = json.loads((study["server"] / "study.json").read_text())
    edited["sites"].append("intruder")
    (study["server"] / "study.json").write_text(json.dumps(edited))
    with pytest.raises(FedsegError, match="only 'fedseg provision add-site'"):
        ServerRun.resume(study["server"], run, cache=tmp_path / "cache")
