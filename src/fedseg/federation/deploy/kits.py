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
from cryptography.hazmat.primitives import serialization

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import (
    ip_address,
    issue_server_certificate,
    issue_site_certificate,
    new_certificate_authority,
)
from fedseg.federation.transport.kit import KIT_FILES, KIT_FORMAT, KeyT, Role
from fedseg.io import dumps_json

__all__ = ["prepare_out", "readme", "server_url", "write_kits"]

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


def write_kits(out: Path, host: str, sites: list[str], *, days: int, study: str, port: int) -> dict[str, Path]:
    """Create the CA and every certificate, and write the kits into the prepared, empty ``out``.

    Returns:
        ``{"ca": out/ca, "server": out/server, "<site>": out/<site>, ...}``.

    Raises:
        OSError: a file cannot be written (FileExistsError: something appeared meanwhile).
    """
    ca_key, ca_cert = new_certificate_authority(study, days=days)
    ca_pem = _pem_cert(ca_cert)
    kits = {"ca": _write_ca_kit(out / "ca", ca_key, ca_pem, study, sites)}
    url = server_url(host, port)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, host, days=days)
    server_doc = {
        "format": KIT_FORMAT, "role": "server", "study": study,
        "server_name": host, "port": port, "server_url": url, "sites": sites,
    }
    kits["server"] = _write_participant(out / "server", "server", ca_pem, server_key, server_cert, server_doc)
    for site in sites:
        key, cert = issue_site_certificate(ca_key, ca_cert, site, days=days)
        doc = {
            "format": KIT_FORMAT, "role": "site", "study": study, "site": site,
            "server_name": host, "port": port, "server_url": url,
        }
        kits[site] = _write_participant(out / site, "site", ca_pem, key, cert, doc)
    logger.info("provisioned study %r: server %s, %d site(s), kits in %s", study, host, len(sites), out)
    return kits


def _pem_key(key: KeyT) -> bytes:
    # Unencrypted PKCS#8: the server and clients start unattended; protection is
    # the 0600 file mode and the 0700 folder (as for ssh host keys).
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


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


def _write_secret(path: Path, key: KeyT) -> None:
    _write_new(path, _pem_key(key), _PRIVATE_MODE)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, _PUBLIC_MODE)


def _make_dir(path: Path) -> Path:
    path.mkdir(mode=_DIR_MODE)  # exist_ok=False: never reuse a folder
    return path


def _study_json(doc: dict[str, Any]) -> bytes:
    # sorted keys, two-space indent: the same bytes kits have always had
    return (dumps_json(dict(sorted(doc.items())), indent=2) + "\n").encode()


def _write_ca_kit(folder: Path, ca_key: KeyT, ca_pem: bytes, study: str, sites: list[str]) -> Path:
    _make_dir(folder)
    _write_secret(folder / "ca.key", ca_key)
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "README.txt", readme("ca", study=study, sites=", ".join(sites)).encode())
    return folder


def _write_participant(
    folder: Path, role: Role, ca_pem: bytes, key: KeyT, cert: x509.Certificate, doc: dict[str, Any]
) -> Path:
    cert_name, key_name = KIT_FILES[role]
    _make_dir(folder)
    _write_secret(folder / key_name, key)
    _write_public(folder / cert_name, _pem_cert(cert))
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "study.json", _study_json(doc))
    _write_public(folder / "README.txt", _participant_readme(folder, doc).encode())
    logger.info("wrote %s kit %s", role, folder)
    return folder


def _participant_readme(folder: Path, doc: dict[str, Any]) -> str:
    common = {"study": doc["study"], "kit": shlex.quote(str(folder))}
    if doc["role"] == "server":
        return readme("server", **common, server_name=doc["server_name"], port=doc["port"], sites=", ".join(doc["sites"]))
    return readme("site", **common, site=doc["site"], server_url=doc["server_url"])
