"""A study's certificates after provisioning: add a site, renew a certificate, revoke one — from the CA folder.

::

    add_site(ca, server_kit, "ucla", out)     new site kit in ``out``; the server kit's study.json lists ucla
    renew(ca, "nci", out, server_kit)         a new key and certificate for nci (or "server") in a new kit
    revoke(ca, server_kit, "nci")             every certificate issued to nci so far goes on the CRL;
                                              remove=True also takes nci off the study's sites

Every step is recorded in the CA's ``issued.json`` and the server kit's
``changes.jsonl``; a server started with ``--resume`` accepts a changed site
list only when these records explain it. A running server re-reads
``crl.pem`` for every new connection: a revocation needs no restart (a new
site does, at ``--resume``). A stolen site key: ``revoke``, then ``renew`` and
hand the site its new kit.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import (
    issue_server_certificate,
    issue_site_certificate,
    load_ca,
    revocation_list,
)
from fedseg.federation.deploy.kits import (
    ISSUED_FILE,
    issued_entry,
    prepare_out,
    study_json,
    write_participant,
    write_site_kit,
)
from fedseg.federation.transport.kit import CRL_FILE, Kit, load_kit, validate_site_names
from fedseg.federation.transport.tls import Revocations
from fedseg.io import append_jsonl, read_json, read_jsonl, write_json, write_text

__all__ = ["CHANGES_FILE", "add_site", "explained_site_change", "renew", "revoke"]

CHANGES_FILE = "changes.jsonl"  # in the server kit: what add-site / revoke / renew changed, in order


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _issued(ca: Path) -> list[dict[str, Any]]:
    path = Path(ca) / ISSUED_FILE
    return list(read_json(path)) if path.is_file() else []


def _record_issued(ca: Path, name: str, cert: Any) -> None:
    write_json(Path(ca) / ISSUED_FILE, [*_issued(ca), issued_entry(name, cert)])


def _new_kit_folder(out: Path) -> Path:
    """``out`` checked as a new kit's place (absent or empty; never overwritten) and left absent for the kit writer."""
    out = Path(out)
    prepare_out(out)  # refuses a file or a non-empty folder
    out.rmdir()  # the kit writer makes it itself, 0700, and refuses an existing one
    return out


def _server_kit(path: Path) -> Kit:
    kit = load_kit(path)
    if kit.role != "server":
        raise FedsegError(f"{path}: a {kit.role} kit; give the server's kit (--server-kit)")
    return kit


def _set_sites(kit: Kit, sites: list[str]) -> None:
    write_text(kit.directory / "study.json", study_json({**kit.study, "sites": sorted(sites)}).decode())


def add_site(ca: Path, server_kit: Path, site: str, out: Path, *, days: int = 825, passphrase: bytes | None = None) -> Path:
    """Issue a certificate for a new ``site``, write its kit in ``out`` and add it to the server kit's sites.

    Raises:
        FedsegError: an invalid or existing site name, ``out`` not empty, a CA or kit problem.
    """
    kit = _server_kit(server_kit)
    (name,) = validate_site_names([site])
    if name in kit.allowed_sites:
        raise FedsegError(f"site {name!r} is already in the study ({kit.directory / 'study.json'})")
    ca_key, ca_cert = load_ca(ca, passphrase)
    out = _new_kit_folder(out)
    key, cert = issue_site_certificate(ca_key, ca_cert, name, days=days)
    folder = write_site_kit(out, name, ca_cert.public_bytes(serialization.Encoding.PEM), key, cert, kit.study)
    _record_issued(ca, name, cert)
    _set_sites(kit, [*kit.allowed_sites, name])
    append_jsonl(kit.directory / CHANGES_FILE, {"time": _now(), "action": "add-site", "site": name})
    return folder


def renew(
    ca: Path, name: str, out: Path, server_kit: Path, *, days: int = 825, passphrase: bytes | None = None
) -> Path:
    """A new key and certificate for site ``name`` (or ``"server"``), as a new kit in ``out``.

    The old certificate stays valid until it expires or is revoked.

    Raises:
        FedsegError: ``name`` is not in the study, ``out`` not empty, a CA or kit problem.
    """
    kit = _server_kit(server_kit)
    if name != "server" and name not in kit.allowed_sites:
        raise FedsegError(f"site {name!r} is not in the study; known: {', '.join(sorted(kit.allowed_sites))}")
    ca_key, ca_cert = load_ca(ca, passphrase)
    out = _new_kit_folder(out)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if name == "server":
        key, cert = issue_server_certificate(ca_key, ca_cert, kit.server_name, days=days)
        folder = write_participant(out, "server", ca_pem, key, cert, kit.study)
        crl = kit.directory / CRL_FILE
        if crl.is_file():
            write_text(folder / CRL_FILE, crl.read_text(encoding="utf-8"))
    else:
        key, cert = issue_site_certificate(ca_key, ca_cert, name, days=days)
        folder = write_site_kit(out, name, ca_pem, key, cert, kit.study)
    _record_issued(ca, name, cert)
    append_jsonl(kit.directory / CHANGES_FILE, {"time": _now(), "action": "renew", "site": name})
    return folder


def revoke(ca: Path, server_kit: Path, name: str, *, remove: bool = False, passphrase: bytes | None = None) -> list[str]:
    """Put every certificate issued to ``name`` so far on the server kit's CRL; ``remove``: also leave the study.

    Returns:
        The serials revoked now (hex).

    Raises:
        FedsegError: no certificate of ``name`` in the CA's ``issued.json``, a CA or kit problem.
    """
    kit = _server_kit(server_kit)
    ca_key, ca_cert = load_ca(ca, passphrase)
    serials = [int(entry["serial"]) for entry in _issued(ca) if entry["name"] == name]
    if not serials:
        raise FedsegError(f"{Path(ca) / ISSUED_FILE} lists no certificate issued to {name!r}")
    crl_path = kit.directory / CRL_FILE
    earlier = Revocations(crl_path, kit.ca).serials()  # the list so far, its signature checked as the server does
    crl = revocation_list(ca_key, ca_cert, [*earlier, *serials])
    write_text(crl_path, crl.public_bytes(serialization.Encoding.PEM).decode())
    if remove and name in kit.allowed_sites:
        _set_sites(kit, [site for site in kit.allowed_sites if site != name])
    append_jsonl(kit.directory / CHANGES_FILE, {
        "time": _now(), "action": "revoke", "site": name, "serials": [f"{s:x}" for s in serials], "removed": remove,
    })
    return [f"{s:x}" for s in serials]


def explained_site_change(kit: Kit, recorded: list[str]) -> str | None:
    """Why the kit's sites may differ from a run's ``recorded`` ones (None: they may not).

    A site added by :func:`add_site` may appear, one removed by :func:`revoke`
    with ``remove`` may disappear; anything else (a hand-edited kit, another
    study's kit) may not.
    """
    changes = read_jsonl(kit.directory / CHANGES_FILE)
    added = {c["site"] for c in changes if c.get("action") == "add-site"}
    removed = {c["site"] for c in changes if c.get("action") == "revoke" and c.get("removed")}
    now, before = set(kit.allowed_sites), set(recorded)
    if not (now - before) <= added or not (before - now) <= removed:
        return None
    parts = [f"added {', '.join(sorted(now - before))}" if now - before else "", f"removed {', '.join(sorted(before - now))}" if before - now else ""]
    return "; ".join(p for p in parts if p)
