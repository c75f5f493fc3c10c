"""The settings every site must share with the server (sent in WELCOME), compared key by key — pure dicts, no I/O."""

from __future__ import annotations

from typing import Any

__all__ = ["settings_differences"]


def settings_differences(
    mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "", *, common_only: bool = False
) -> list[str]:
    """``key: mine vs theirs`` for every (dotted) key whose values differ.

    ``common_only`` ignores keys only one side has (e.g. an option added by a
    newer fedseg, compared with a record written by an older one).
    """
    differences = []
    keys = mine.keys() & theirs.keys() if common_only else mine.keys() | theirs.keys()
    for key in sorted(keys):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += settings_differences(a, b, f"{prefix}{key}.", common_only=common_only)
        elif a != b:
            differences.append(f"{prefix}{key}: {a!r} here vs {b!r} on the server")
    return differences
