"""Provisioning a study: ``provision_study`` checks every input, then writes the CA folder and one kit per participant.

``provision_study("fl.example.org", ["nci", "suny"], Path("kits"))`` writes::

    kits/ca/        ca.pem, ca.key, README.txt   -- keep OFFLINE; only to add sites later
    kits/server/    ca.pem, server.pem, server.key, study.json, README.txt
    kits/nci/       ca.pem, client.pem, client.key, study.json, README.txt
    kits/suny/      ...

The parts: certificates are made in :mod:`~fedseg.federation.deploy.certificates`,
kits written in :mod:`~fedseg.federation.deploy.kits` and read back (by a
running server or site) in :mod:`fedseg.federation.transport.kit`.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedseg.errors import FedsegError
from fedseg.federation.deploy.certificates import validate_host
from fedseg.federation.deploy.kits import prepare_out, write_kits
from fedseg.federation.transport.kit import validate_site_names

__all__ = ["provision_study"]

_STUDY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


def _validate_options(study: str, port: int, days: int) -> None:
    if not isinstance(study, str) or not _STUDY_RE.fullmatch(study):
        raise FedsegError(f"invalid study name {study!r}: 1-64 letters, digits, spaces, '.', '_' or '-'")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise FedsegError(f"invalid port {port!r}: must be 1-65535")
    if not isinstance(days, int) or days < 1:
        raise FedsegError(f"invalid validity {days!r} days: must be at least 1")


def provision_study(
    server_name: str,
    sites: list[str],
    out: Path,
    *,
    days: int = 825,
    study: str = "fedseg-study",
    port: int = 8443,
    ca_passphrase: bytes | None = None,
    cases: dict[str, int] | None = None,
    secure_aggregation: bool = False,
) -> dict[str, Path]:
    """Create a study CA, the server's and every site's certificate, and their kits.

    Writes ``out/ca`` (CA key; keep offline), ``out/server`` and ``out/<site>``
    (see the module docstring). Folders are 0700, private keys 0600 from
    creation, and each key exists in exactly one folder. All inputs are
    validated before anything is written.

    Args:
        server_name: DNS name or IP address the sites will connect to.
        sites: site names (see :func:`~fedseg.federation.transport.kit.validate_site_names`:
            1-64 of ``[a-z0-9_-]`` starting with a letter or digit, unique, not ``ca``/``server``).
        out: output folder; must not exist or be empty.
        days: validity of every certificate, in days (825 = the CA/B limit); the CA's is one year longer.
        study: study name (CA subject, ``study.json``).
        port: TCP port the server listens on.
        ca_passphrase: encrypt the CA key with it (needed again by add-site, renew, revoke).
        cases: training cases per site, from the data agreement: the server refuses an update
            claiming more (sample-weighted aggregation weighs by them).
        secure_aggregation: every kit requires ``[federation] secure_aggregation = true``: the server
            and the sites refuse to run the study with a study.toml that turns it off.

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
    for site, n in (cases or {}).items():
        if site not in names or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise FedsegError(f"--cases: {site}={n!r} must name a site of the study and a count >= 1")
    prepare_out(out)
    try:
        return write_kits(out, host, names, days=days, study=study, port=port, ca_passphrase=ca_passphrase, cases=cases,
                          secure_aggregation=secure_aggregation)
    except FileExistsError as exc:
        raise FedsegError(f"{exc.filename} appeared while writing kits; refusing to overwrite it") from exc
    except OSError as exc:
        raise FedsegError(f"cannot write kits in {out}: {exc.strerror or exc}") from exc
