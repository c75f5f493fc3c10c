"""Provisioning: a study certificate authority and one start-up kit per participant.

``provision_study("fl.example.org", ["nci", "suny"], Path("kits"))`` writes::

    kits/ca/        ca.pem, ca.key, README.txt   -- keep OFFLINE; only to add sites later
    kits/server/    ca.pem, server.pem, server.key, study.json, README.txt
    kits/nci/       ca.pem, client.pem, client.key, study.json, README.txt
    kits/suny/      ...

Trust model: the study CA is the only trust anchor on both sides. The server
certificate names HOST (DNS and, for an IP literal, IP SAN) and carries
ExtendedKeyUsage serverAuth; each site certificate carries its site name as
CN and as SAN URI ``fedseg://site/<name>`` with clientAuth. A site's identity
is therefore a fact signed by the study CA, read back by :func:`site_identity`.

Secrets: every private key is created with mode 0600 by ``os.open`` (never
chmod-ed afterwards, so there is no window in which it is readable by others),
inside 0700 folders, and each key exists in exactly one folder. Nothing is
ever overwritten. No key material is printed or logged.

Keys are EC P-256 (ECDSA-SHA256): supported by every TLS 1.2/1.3 stack,
unlike Ed25519 certificates in some older OpenSSL/browser builds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.errors import FedsegError
from fedseg.federation.protocol.names import SITE_NAME_HELP, is_site_name

__all__ = [
    "KIT_FORMAT",
    "SITE_URI_PREFIX",
    "Kit",
    "issue_server_certificate",
    "issue_site_certificate",
    "load_ca",
    "load_kit",
    "new_certificate_authority",
    "provision_study",
    "site_identity",
    "validate_host",
    "validate_site_names",
]

logger = logging.getLogger(__name__)

KIT_FORMAT = 1
"""Version of the kit layout and ``study.json`` schema written here."""

SITE_URI_PREFIX = "fedseg://site/"
"""SAN URI prefix carrying a site's identity in its client certificate."""

_STUDY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Folder names used by the kit layout itself; a site with such a name would collide.
_RESERVED_NAMES = frozenset({"ca", "server"})
# Certificates start slightly in the past so that a site whose clock lags the
# provisioning machine by a few minutes does not see them as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700

KeyT = ec.EllipticCurvePrivateKey
Role = Literal["server", "site"]

# File names inside a kit, by role: (certificate, private key).
_KIT_FILES: dict[str, tuple[str, str]] = {
    "server": ("server.pem", "server.key"),
    "site": ("client.pem", "client.key"),
}


# --------------------------------------------------------------------------- validation


def validate_site_names(sites: Sequence[str]) -> list[str]:
    """Check site names and return them as a list, in the given order.

    A site name is the site's certificate identity and its kit folder name, so
    it must be a safe path component (:data:`~fedseg.federation.protocol.names.SITE_PATTERN`), not
    ``ca`` or ``server`` (the kit layout's own folders), and unique.

    Raises:
        FedsegError: no sites, or a name is invalid or repeated (all named).
    """
    names = list(sites)
    if not names:
        raise FedsegError("no sites given: a study needs at least one site")
    bad = [n for n in names if not is_site_name(n)]
    if bad:
        raise FedsegError(f"invalid site name(s) {bad!r}: use {SITE_NAME_HELP}")
    reserved = sorted(set(names) & _RESERVED_NAMES)
    if reserved:
        raise FedsegError(f"site name(s) {reserved!r} are reserved for the kit layout; choose another name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FedsegError(f"site name(s) {repeated!r} given more than once")
    return names


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
    if _ip(host) is not None:
        return host
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise FedsegError(
            f"server name {host!r} is not a valid DNS name or IP address (no port: use --port for that)"
        )
    return host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _validate_options(study: str, port: int, days: int) -> None:
    if not isinstance(study, str) or not _STUDY_RE.fullmatch(study):
        raise FedsegError(f"invalid study name {study!r}: 1-64 letters, digits, spaces, '.', '_' or '-'")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise FedsegError(f"invalid port {port!r}: must be 1-65535")
    if not isinstance(days, int) or days < 1:
        raise FedsegError(f"invalid validity {days!r} days: must be at least 1")


# --------------------------------------------------------------------------- certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> KeyT:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, study: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if study is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, study))
    return x509.Name(attributes)


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    return start, start + dt.timedelta(days=days)


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
    ip = _ip(host)
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
    :func:`site_identity` reads the URI first.

    Raises:
        FedsegError: SITE is not a valid site name.
    """
    (site,) = validate_site_names([site])
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)]
    return _issue(
        ca_key, ca_cert, _name(site), san, ExtendedKeyUsageOID.CLIENT_AUTH, days=days, not_before=not_before
    )


def site_identity(cert: x509.Certificate) -> str:
    """The site name a certificate stands for.

    Read from the SAN URI ``fedseg://site/<name>``, falling back to the subject
    CN for certificates without one. The caller must have verified the
    certificate's chain first: the name is only as trustworthy as its issuer.

    Raises:
        FedsegError: the certificate carries neither.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(SITE_URI_PREFIX):
                return uri[len(SITE_URI_PREFIX):]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        value = common_names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    raise FedsegError(f"certificate {cert.subject.rfc4514_string()!r} carries no site identity")


# --------------------------------------------------------------------------- writing kits


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


def _prepare_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FedsegError(f"{out} exists and is not a folder; choose a new output folder")
        if any(out.iterdir()):
            raise FedsegError(f"{out} is not empty; refusing to overwrite kits or keys, choose a new output folder")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(mode=_DIR_MODE)


def _server_url(host: str, port: int) -> str:
    shown = f"[{host}]" if isinstance(_ip(host), ipaddress.IPv6Address) else host
    return f"wss://{shown}:{port}"


def _study_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def provision_study(
    server_name: str,
    sites: list[str],
    out: Path,
    *,
    days: int = 825,
    study: str = "fedseg-study",
    port: int = 8443,
) -> dict[str, Path]:
    """Create a study CA, the server's and every site's certificate, and their kits.

    Writes ``out/ca`` (CA key; keep offline), ``out/server`` and ``out/<site>``
    (see the module docstring). Folders are 0700, private keys 0600 from
    creation, and each key exists in exactly one folder. All inputs are
    validated before anything is written.

    Args:
        server_name: DNS name or IP address the sites will connect to.
        sites: site names (1-64 of ``[a-z0-9_-]``, unique, not ``ca``/``server``).
        out: output folder; must not exist or be empty.
        days: validity of every certificate, in days (825 = the CA/B limit).
        study: study name (CA subject, ``study.json``).
        port: TCP port the server listens on.

    Returns:
        ``{"ca": out/ca, "server": out/server, "<site>": out/<site>, ...}``.

    Raises:
        FedsegError: invalid input, ``out`` exists and is not an empty folder,
            or a file cannot be written.
    """
    out = Path(out)
    host = validate_host(server_name)
    names = validate_site_names(sites)
    _validate_options(study, port, days)
    _prepare_out(out)
    try:
        return _write_kits(out, host, names, days=days, study=study, port=port)
    except FileExistsError as exc:
        raise FedsegError(f"{exc.filename} appeared while writing kits; refusing to overwrite it") from exc
    except OSError as exc:
        raise FedsegError(f"cannot write kits in {out}: {exc.strerror or exc}") from exc


def _write_kits(out: Path, host: str, sites: list[str], *, days: int, study: str, port: int) -> dict[str, Path]:
    ca_key, ca_cert = new_certificate_authority(study, days=days)
    ca_pem = _pem_cert(ca_cert)
    kits = {"ca": _write_ca_kit(out / "ca", ca_key, ca_pem, study, sites)}
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, host, days=days)
    server_doc = {
        "format": KIT_FORMAT, "role": "server", "study": study,
        "server_name": host, "port": port, "server_url": _server_url(host, port), "sites": sites,
    }
    kits["server"] = _write_participant(out / "server", "server", ca_pem, server_key, server_cert, server_doc)
    for site in sites:
        key, cert = issue_site_certificate(ca_key, ca_cert, site, days=days)
        doc = {
            "format": KIT_FORMAT, "role": "site", "study": study, "site": site,
            "server_name": host, "port": port, "server_url": _server_url(host, port),
        }
        kits[site] = _write_participant(out / site, "site", ca_pem, key, cert, doc)
    logger.info("provisioned study %r: server %s, %d site(s), kits in %s", study, host, len(sites), out)
    return kits


def _write_ca_kit(folder: Path, ca_key: KeyT, ca_pem: bytes, study: str, sites: list[str]) -> Path:
    _make_dir(folder)
    _write_secret(folder / "ca.key", ca_key)
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "README.txt", _ca_readme(study, sites).encode())
    return folder


def _write_participant(
    folder: Path, role: Role, ca_pem: bytes, key: KeyT, cert: x509.Certificate, doc: dict[str, Any]
) -> Path:
    cert_name, key_name = _KIT_FILES[role]
    _make_dir(folder)
    _write_secret(folder / key_name, key)
    _write_public(folder / cert_name, _pem_cert(cert))
    _write_public(folder / "ca.pem", ca_pem)
    _write_public(folder / "study.json", _study_json(doc))
    readme = _server_readme(folder, doc) if role == "server" else _site_readme(folder, doc)
    _write_public(folder / "README.txt", readme.encode())
    logger.info("wrote %s kit %s", role, folder)
    return folder


def _ca_readme(study: str, sites: list[str]) -> str:
    return f"""\
fedseg study certificate authority -- study '{study}'

KEEP THIS FOLDER OFFLINE (e.g. an encrypted USB stick in a safe).
It is not part of any start-up kit and must never be sent to a site or the server.

  ca.key   the CA's private key (mode 0600). Whoever holds it can create
           certificates every participant trusts. fedseg provision does not
           reuse it yet: adding a site or renewing certificates means
           provisioning a new study CA and handing out new kits.
  ca.pem   the CA's certificate (public; also in every kit).

Sites provisioned: {", ".join(sites)}
"""


def _server_readme(folder: Path, doc: dict[str, Any]) -> str:
    return f"""\
fedseg start-up kit -- SERVER of study '{doc["study"]}'

Run on the host '{doc["server_name"]}'; inbound TCP port {doc["port"]} must be open to the sites:

    fedseg server --kit {shlex.quote(str(folder))} --config study.toml --out RUN_DIR

(adjust the kit path if you moved this folder). study.toml holds the study's
settings (rounds, aggregator, quorum, training); RUN_DIR must be a new folder.
Every completed round is kept there; after a crash or reboot continue with:

    fedseg server --kit {shlex.quote(str(folder))} --resume RUN_DIR

Files
  server.key  this server's private key (mode 0600). Never copy it anywhere else.
  server.pem  this server's certificate for '{doc["server_name"]}', signed by the study CA.
  ca.pem      the study CA certificate: the only issuer whose site certificates are accepted.
  study.json  study name, server name, port and the sites allowed to connect:
              {", ".join(doc["sites"])}
"""


def _site_readme(folder: Path, doc: dict[str, Any]) -> str:
    return f"""\
fedseg start-up kit -- SITE '{doc["site"]}' of study '{doc["study"]}'

Run on this site's training machine (outbound connection to {doc["server_url"]} only;
no inbound port is needed):

    fedseg client --kit {shlex.quote(str(folder))} --data SITE_DIR --config study.toml

where SITE_DIR is this site's data folder (images/ and labels/) and study.toml
is the study's settings file from the coordinator (the same as the server's).
Only model weights and declared scalar metrics leave the site, and at the end
the per-case Dice of the final model on this site's test cases (under
pseudonyms); audit.jsonl in this folder lists everything that was sent. The
final and best models arrive in models/ here, ready for 'fedseg predict'.

Files
  client.key  this site's private key (mode 0600). Never copy it anywhere else.
  client.pem  this site's certificate; its identity is the site name '{doc["site"]}'.
  ca.pem      the study CA certificate: the only issuer whose server certificate is accepted.
  study.json  study name, this site's name and the server URL.
"""


# --------------------------------------------------------------------------- loading kits


@dataclass(frozen=True)
class Kit:
    """A participant's start-up kit, as read (and checked) by :func:`load_kit`.

    Attributes:
        role: ``"server"`` or ``"site"``.
        name: the server's host name, or the site's name.
        study: the parsed ``study.json``.
        directory: the kit folder.
        ca: path of the study CA certificate (the only trust anchor).
        cert: path of this participant's certificate.
        key: path of this participant's private key (0600).
    """

    role: Role
    name: str
    study: dict[str, Any]
    directory: Path
    ca: Path
    cert: Path
    key: Path

    @property
    def allowed_sites(self) -> frozenset[str]:
        """Site names allowed to connect (server kits; empty for a site kit)."""
        return frozenset(self.study.get("sites", ()))

    @property
    def server_url(self) -> str:
        """``wss://HOST:PORT`` of the study server."""
        return str(self.study["server_url"])

    @property
    def server_name(self) -> str:
        """The host name the server certificate is checked against."""
        return str(self.study["server_name"])


def load_kit(path: Path) -> Kit:
    """Read a server or site kit and check it is usable before any connection.

    Checks: ``study.json`` parses and names a role; the CA, certificate and key
    files exist and parse; the key is not readable by group or others; the key
    matches the certificate; the certificate is signed by the kit's CA; the CA
    and the certificate are valid now; a site certificate's identity equals
    the kit's site name.

    Raises:
        FedsegError: naming the file and what is wrong (and ``chmod 600 FILE``
            for a key with wider permissions).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FedsegError(f"kit folder {folder} does not exist")
    study = _read_study(folder / "study.json")
    role: Role = study["role"]
    cert_name, key_name = _KIT_FILES[role]
    kit = Kit(
        role=role,
        name=study["site"] if role == "site" else study["server_name"],
        study=study,
        directory=folder,
        ca=folder / "ca.pem",
        cert=folder / cert_name,
        key=folder / key_name,
    )
    _check_kit(kit)
    return kit


def _read_study(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_read(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("role") not in _KIT_FILES:
        raise FedsegError(f"{path} is not a fedseg kit description (no role 'server' or 'site')")
    required = {"study", "server_name", "port", "server_url"} | ({"sites"} if doc["role"] == "server" else {"site"})
    missing = sorted(required - doc.keys())
    if missing:
        raise FedsegError(f"{path} lacks field(s) {missing}")
    if doc["role"] == "server":
        validate_site_names(doc["sites"])
    else:
        validate_site_names([doc["site"]])
    return doc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise FedsegError(f"kit file {path} is missing") from exc
    except OSError as exc:
        raise FedsegError(f"cannot read kit file {path}: {exc.strerror or exc}") from exc


def check_kit_dates(kit: Kit) -> None:
    """Refuse a kit whose certificate or CA is not valid now (a long study can outlive them).

    Raises:
        FedsegError: names the certificate and the date it expired or becomes valid.
    """
    now = _now()
    _check_valid_at(_load_cert(kit.ca), kit.ca, now)
    _check_valid_at(_load_cert(kit.cert), kit.cert, now)


def _check_kit(kit: Kit) -> None:
    ca = _load_cert(kit.ca)
    cert = _load_cert(kit.cert)
    key = _load_key(kit.key)
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise FedsegError(f"{kit.key} does not belong to the certificate {kit.cert}")
    _check_signed_by(cert, kit.cert, ca, kit.ca)
    check_kit_dates(kit)
    if kit.role == "site" and site_identity(cert) != kit.name:
        raise FedsegError(f"{kit.cert} is for site {site_identity(cert)!r}, but the kit is for site {kit.name!r}")


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise FedsegError(f"{path} is not a PEM certificate (corrupt or wrong file)") from exc


def _load_key(path: Path) -> KeyT:
    _check_key_mode(path)
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        # The exception text never contains key material, but keep the message generic anyway.
        raise FedsegError(f"{path} is not an unencrypted PEM private key (corrupt or wrong file)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedsegError(f"{path} is not an EC private key as written by fedseg provision")
    return key


def _check_key_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError as exc:
        raise FedsegError(f"kit file {path} is missing") from exc
    if mode & 0o077:
        raise FedsegError(
            f"private key {path} is readable by others (mode {mode:04o}); "
            f"restrict it with: chmod 600 {shlex.quote(str(path))}"
        )


def _check_signed_by(cert: x509.Certificate, cert_path: Path, ca: x509.Certificate, ca_path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise FedsegError(f"{cert_path} is not signed by the kit's study CA {ca_path}") from exc


def _check_valid_at(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise FedsegError(
            f"certificate {path} is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC); "
            "check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise FedsegError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new certificate from the study CA"
        )


def load_ca(folder: Path) -> tuple[KeyT, x509.Certificate]:
    """Read the offline CA folder (``out/ca``) to issue more certificates.

    Raises:
        FedsegError: a file is missing, corrupt, or the key is readable by others.
    """
    folder = Path(folder)
    key = _load_key(folder / "ca.key")
    cert = _load_cert(folder / "ca.pem")
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise FedsegError(f"{folder / 'ca.key'} does not belong to {folder / 'ca.pem'}")
    return key, cert
