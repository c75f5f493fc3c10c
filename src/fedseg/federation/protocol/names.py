"""The one site-name rule: what provisioning accepts, a certificate carries and a HELLO may say.

A site name is a site's certificate identity, its kit folder name and the
``site`` of every message it sends, so one rule serves all three: 1–64
characters from ``a-z``, ``0-9``, ``_`` and ``-``, starting with a letter or a
digit (a name such as ``_nci`` or ``-x`` is refused when the kits are made,
rather than failing at the site's first HELLO).
"""

from __future__ import annotations

import re

__all__ = ["SITE_NAME_HELP", "SITE_PATTERN", "is_site_name"]

SITE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SITE_NAME_HELP = "1-64 characters from a-z, 0-9, '_' and '-', starting with a letter or a digit"


def is_site_name(value: object) -> bool:
    """Whether ``value`` is a valid site name (a ``str`` matching :data:`SITE_PATTERN`)."""
    return isinstance(value, str) and SITE_PATTERN.fullmatch(value) is not None
