"""A whole securely aggregated round between numpy sites, with no sessions and no network (test helper)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedseg.federation.deploy.certificates import issue_site_certificate, new_certificate_authority
from fedseg.federation.transport.kit import StudyCA
from fedseg.federation.protocol.schemas import Message
from fedseg.federation.protocol.secagg import Credentials, SecureRound, SecureSettings, SiteSecureRound
from fedseg.federation.protocol.secagg.server import Broadcast, SecureAction


def credentials_for(sites: list[str]) -> tuple[object, dict[str, Credentials]]:
    ca_key, ca = new_certificate_authority("secagg-test")
    out = {}
    for site in sites:
        key, cert = issue_site_certificate(ca_key, ca, site)
        out[site] = Credentials(key, cert.public_bytes(serialization.Encoding.PEM).decode(), StudyCA(ca))
    return StudyCA(ca), out


@dataclass
class Harness:
    """Runs SecureRound against SiteSecureRounds; ``tamper`` may rewrite any site's message before the server sees it."""

    global_weights: dict[str, np.ndarray]
    sites: list[str]
    settings: SecureSettings = field(default_factory=SecureSettings)
    round: int = 0
    min_sites: int = 1
    tamper: Callable[[str, Message], Message | None] | None = None
    seen_by_server: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca, self.credentials = credentials_for(self.sites)
        self.server = SecureRound(self.round, set(self.sites), self.settings, self.global_weights, self.ca, self.min_sites)
        self.site_rounds = {
            site: SiteSecureRound(site, self.round, self.settings, self.credentials[site], self.global_weights) for site in self.sites
        }
        self.outcomes: list[SecureAction] = []
        self.inbox: dict[str, list[Message]] = {site: [] for site in self.sites}

    def send(self, site: str, message: Message) -> None:
        if self.tamper is not None:
            message = self.tamper(site, message)
            if message is None:
                return
        self.seen_by_server.append(message)
        self._collect(self.server.received(site, message))

    def deal(self) -> None:
        """KEYS, ROSTER, SHARES and DEALT for every site: each holds its shares, ready to mask."""
        for site in self.sites:
            self.send(site, self.site_rounds[site].keys_message())
        for site in self.sites:
            for message in self.inbox.pop(site, []):
                self.send(site, self.site_rounds[site].on_roster(message))
        for site in self.sites:
            for message in self.inbox.pop(site, []):
                self.site_rounds[site].on_dealt(message)

    def drop(self, site: str) -> None:
        self._collect(self.server.left(site, "disconnected"))

    def _collect(self, actions: list[SecureAction]) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                for site in action.sites:
                    self.inbox.setdefault(site, []).append(action.message)
            else:
                self.outcomes.append(action)
