"""Writing start-up kits: the CA folder, the server's kit and one kit per site, each with its README.

Secrets: every private key is created with mode 0600 by ``os.open`` (never
chmod-ed afterwards, so there is no window in which it is readable by others),
inside 0700 folders, and each key exists in exactly one folder. Nothing is
ever overwritten. No key material is printed or logged.

The READMEs are package data (``templates/{ca,server,site}.txt``) filled with
:class:`string.Template`; the layout a running participant reads back is
:mod:`fedseg.federation.transport.kit`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import (
    CA_MARGIN_DAYS,
    ip_address,
    issue_server_certificate,
    issue_site_certificate,
    new_certificate_authority,
    revocation_list,
)
from fedseg.federation.transport.kit import CRL_FILE, KIT_FILES, KIT_FORMAT, KeyT, Role
from fedseg.io import dumps_json, write_json

__all__ = [
    "ISSUED_FILE", "issued_entry", "prepare_out", "readme", "server_url", "study_json", "write_kits", "write_participant",
    "write_site_kit",
]

ISSUED_FILE = "issued.json"  # in the CA folder: every certificate the CA signed

logger = logging.getLogger(__name__)

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700


def readme(template: str, **fields: object) -> str:
    """``templates/<template>.txt`` with its ``${field}`` placeholders filled (every one must be given)."""
    text = resources.files(__package__).joinpath("templates", f"{template}.txt").read_text(encoding="utf-8")
    return Template(text).substitute({name: str(value) for name, value in fields.items()})


def server_url(host: str, port: int) -> str:
    """``wss://HOST:PORT``, with an IPv6 literal in brackets."""
    shown = f"[{host}]" if isinstance(ip_address(host), ipaddress.IPv6Address) else host
    return f"wss://{shown}:{port}"


def prepare_out(out: Path) -> None:
    """Make ``out`` (0700) or accept it empty.

    Raises:
        FedsegError: ``out`` is a file or a folder that holds anything.
    """
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FedsegError(f"{out} exists and is not a folder; choose a new output folder")
        if any(out.iterdir()):
            raise FedsegError(f"{out} is not empty; refusing to overwrite kits or keys, choose a new output folder")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(mode=_DIR_MODE)


def write_kits(
    out: Path, host: str, sites: list[str], *, days: int, study: str, port: int, ca_passphrase: bytes | None = None,
    cases: dict[str, int] | None = None, secure_aggregation: bool = False,
) -> dict[str, Path]:
    """Create the CA and every certificate, and write the kits into the prepared, empty ``out``.

    The CA is valid :data:`CA_MARGIN_DAYS` longer than the certificates, its key
    encrypted with ``ca_passphrase`` when one is given; ``ca/issued.json`` lists
    every certificate issued and the server kit holds an empty revocation list
    (``crl.pem``) signed by the CA.

    Returns:
        ``{"ca": out/ca, "server": out/server, "<site>": out/<site>, ...}``.

    Raises:
        OSError: a file cannot be written (FileExistsError: something appeared meanwhile).
    """
    ca_key, ca_cert = new_certificate_authority(study, days=days + CA_MARGIN_DAYS)
    ca_pem = _pem_cert(ca_cert)
    kits = {"ca": _write_ca_kit(out / "ca", ca_key, ca_pem, study, sites, ca_passphrase)}
    url = server_url(host, port)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, host, days=days)
    server_doc = {
        "format": KIT_FORMAT, "role": "server", "study": study,
        "server_name": host, "port": port, "server_url": url, "sites": sites,
        **({"cases": dict(sorted(cases.items()))} if cases else {}),
        **({"secure_aggregation": True} if secure_aggregation else {}),
    }
    kits["server"] = write_participant(out / "server", "server", ca_pem, server_key, server_cert, server_doc)
    _write_public(out / "server" / CRL_FILE, revocation_list(ca_key, ca_cert, []).public_bytes(serialization.Encoding.PEM))
    issued = [issued_entry("server", server_cert)]
    for site in sites:
        key, cert = issue_site_certificate(ca_key, ca_cert, site, days=days)
        kits[site] = write_site_kit(out / site, site, ca_pem, key, cert, server_doc)
        issued.append(issued_entry(site, cert))
    write_json(out / "ca" / ISSUED_FILE, issued)
    logger.info("provisioned study %r: server %s, %d site(s), kits in %s", study, host, len(sites), out)
    return kits


def _pem_key(key: KeyT, passphrase: bytes | None = None) -> bytes:
    # Participants' keys are unencrypted PKCS#8: the server and clients start
    # unattended; protection is the 0600 file mode and the 0700 folder (as for
    # ssh host keys). The CA key, used by a person, may carry a passphrase.
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def issued_entry(name: str, cert: x509.Certificate) -> dict[str, Any]:
    """One line of ``ca/issued.json``: who, serial, SHA-256 fingerprint, validity."""
    return {
        "name": name, "serial": str(cert.serial_number), "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
    }


def write_site_kit(
    folder: Path, site: str, ca_pem: bytes, key: KeyT, cert: x509.Certificate, server_doc: dict[str, Any]
) -> Path:
    """A site's kit in the new folder ``folder``, pointing at the server ``server_doc`` describes."""
    doc = {
        "format": KIT_FORMAT, "role": "site", "study": server_doc["study"], "site": site,
        "server_name": server_doc["server_name"], "port": server_doc["port"], "server_url": server_doc["server_url"],
        **({"secure_aggregation": True} if server_doc.get("secure_aggregation") else {}),
    }
    return write_participant(folder, "site", ca_pem, key, cert, doc)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create PATH with MODE and write DATA; fail if anything exists there.

    The mode is given to ``open`` itself, so a key is never readable by others,
    not even for an instant; O_EXCL refuses existing files and planted symlinks.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_secret(path: Path, key: KeyT, passphrase: bytes | None = None) -> None:
    _write_new(path, _pem_key(key, passphrase), _PRIVATE_MODE)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, _PUBLIC_MODE)


def _make_dir(path: Path) -> Path:
    path.mkdir(mode=_DIR_MODE)  # exist_ok=False: never reuse a folder
    return path


def study_json(doc: dict[str, Any]) -> bytes:
    # sorted keys, two-space indent: the same bytes kits have always had
    return (dumps_json(dict(sorted(doc.items())), indent=2) + "\n").encode()


def _write_ca_kit(
    folder: Path, ca_key: KeyT, ca_pem: bytes, study: str, sites: list[str], passphrase: bytes | None
) -> Path:
    _make_dir(folder)
    _write_secret(folder / "ca.key", ca_key, passphrase)
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "README.txt", readme("ca", study=study, sites=", ".join(sites)).encode())
    return folder


def write_participant(
    folder: Path, role: Role, ca_pem: bytes, key: KeyT, cert: x509.Certificate, doc: dict[str, Any]
) -> Path:
    cert_name, key_name = KIT_FILES[role]
    _make_dir(folder)
    _write_secret(folder / key_name, key)
    _write_public(folder / cert_name, _pem_cert(cert))
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "study.json", study_json(doc))
    _write_public(folder / "README.txt", _participant_readme(folder, doc).encode())
    logger.info("wrote %s kit %s", role, folder)
    return folder


def _participant_readme(folder: Path, doc: dict[str, Any]) -> str:
    common = {"study": doc["study"], "kit": shlex.quote(str(folder))}
    if doc["role"] == "server":
        return readme("server", **common, server_name=doc["server_name"], port=doc["port"], sites=", ".join(doc["sites"]))
    return readme("site", **common, site=doc["site"], server_url=doc["server_url"])
