"""A site's side of one securely aggregated round, sans I/O: KEYS out, ROSTER in → SHARES out, DEALT in,
the masked update out, UNMASK in → REVEAL out.

The site refuses (:class:`SecAggError` or :class:`BadMessage`) whatever would
let the server learn more than the sum: a roster whose keys are not signed by
certificates of the study CA, a threshold other than the one both sides
computed, fewer roster sites than the threshold, an UNMASK that names a site
both as survivor and as dropped or asks a second time — revealing a site's
seed share and its key share at once would unmask that site alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseg.federation.protocol.errors import BadMessage
from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.secagg import shamir
from fedseg.federation.protocol.secagg.keys import (
    AdvertisedKeys,
    Credentials,
    RoundKeys,
    SecAggError,
    decrypt_share,
    encrypt_share,
    pair_seed,
    share_digest,
    share_key,
)
from fedseg.federation.protocol.secagg.masking import RING64, SCALARS, MaskStream, Payload, masked_change
from fedseg.federation.protocol.secagg.rules import SecureSettings, update_change

__all__ = ["ClipReport", "SiteSecureRound", "mask_sign"]

CLIP_TOLERANCE = 1e-6  # the server's clip bound may differ from this site's by float rounding only


def mask_sign(site: str, peer: str) -> int:
    """The sign of the pairwise mask ``site`` adds for ``peer``: + towards later names, - towards earlier ones."""
    return 1 if site < peer else -1


@dataclass(frozen=True)
class ClipReport:
    """What the audit log records of the clipping before masking (norms of the change from the global model)."""

    bound: float
    norm: float
    sent_norm: float

    @property
    def clipped(self) -> bool:
        return self.norm > self.bound

    def record(self) -> dict[str, Any]:
        return {"clip_bound": self.bound, "change_norm": self.norm, "sent_change_norm": self.sent_norm, "clipped": self.clipped}


class SiteSecureRound:
    """One round's secure aggregation at ``site`` (see the module docstring)."""

    def __init__(
        self, site: str, round_: int, settings: SecureSettings, credentials: Credentials, global_weights: Mapping[str, np.ndarray]
    ) -> None:
        self.site = site
        self.round = round_
        self.settings = settings
        self.credentials = credentials
        self.global_weights = global_weights
        self.keys: RoundKeys | None = RoundKeys.generate()
        self.advertised = self.keys.advertise(round_, site, credentials)
        self.roster: dict[str, AdvertisedKeys] = {}
        self.threshold = 0
        self.clip_norm = math.inf
        self.fraction_bits = 0
        self.ring = RING64
        self.dealers: list[str] = []  # who dealt this site shares (DEALT): the sites masks are agreed with
        self._held: dict[str, tuple[bytes, bytes]] = {}  # dealer -> (seed share, key share) this site holds
        self.revealed = False

    # ----------------------------------------------------------------- messages out

    def keys_message(self) -> Message:
        return Message(MessageType.KEYS, round=self.round, site=self.site, body=self.advertised.body())

    def on_roster(self, message: Message) -> Message:
        """Check the roster and deal this round's secrets to every site on it (the SHARES message)."""
        body = message.body
        roster = {site: AdvertisedKeys.from_body(site, entry) for site, entry in sorted(body["sites"].items())}
        if self.roster:
            raise BadMessage(f"a second ROSTER for round {self.round}")
        if roster.get(self.site) != self.advertised:
            raise SecAggError(f"the ROSTER of round {self.round} does not carry this site's own keys as it sent them")
        threshold = self.settings.threshold_for(len(roster))
        if body["threshold"] != threshold or len(roster) < threshold:
            raise SecAggError(
                f"the ROSTER of round {self.round} asks for threshold {body['threshold']} with {len(roster)} site(s); "
                f"this site requires {threshold} and at least that many sites"
            )
        own_clip = self.settings.clip_norm(self.global_weights)
        if not math.isclose(body["clip_norm"], own_clip, rel_tol=CLIP_TOLERANCE):
            raise SecAggError(f"the ROSTER's clip bound {body['clip_norm']:g} is not {self.settings.clip_ratio:g} x the global model's norm ({own_clip:g})")
        try:
            ring, bits = self.settings.scale(body["clip_norm"], len(roster))
        except ValueError as exc:
            raise SecAggError(str(exc)) from exc
        if (body["ring_bits"], body["fraction_bits"]) != (ring.bits, bits):
            raise SecAggError(
                f"the ROSTER's fixed point ({body['ring_bits']}-bit ring, {body['fraction_bits']} fraction bits) is not "
                f"what its clip bound and roster give ({ring.bits}-bit, {bits})"
            )
        for site, keys in roster.items():
            if site != self.site:
                keys.verify(self.round, self.credentials.check)
        self.roster, self.threshold = roster, threshold
        self.clip_norm, self.ring, self.fraction_bits = float(body["clip_norm"]), ring, bits
        return Message(MessageType.SHARES, round=self.round, site=self.site, body={"shares": self._deal()})

    def _deal(self) -> dict[str, dict[str, str]]:
        assert self.keys is not None
        places = {site: place for place, site in enumerate(self.roster, start=1)}
        seeds = shamir.split(self.keys.seed, places.values(), self.threshold)
        masks = shamir.split(self.keys.mask_secret(), places.values(), self.threshold)
        dealt = {}
        for holder, place in places.items():
            seed_share, key_share = shamir.encode_share(seeds[place]), shamir.encode_share(masks[place])
            key = share_key(self.keys.cipher, self.roster[holder].cipher_pk, self.round, self.site, holder)
            dealt[holder] = {
                "ciphertext": encrypt_share(key, seed_share + key_share, self.round, self.site, holder).hex(),
                "seed_digest": share_digest("seed", self.round, self.site, holder, seed_share),
                "key_digest": share_digest("key", self.round, self.site, holder, key_share),
            }
        return dealt

    def on_dealt(self, message: Message) -> None:
        """Keep the shares the other sites dealt this site (each must decrypt: else the dealer is named)."""
        assert self.keys is not None
        dealers = list(message.body["sites"])
        if not self.roster or self.dealers:
            raise BadMessage(f"an unexpected DEALT for round {self.round}")
        if self.site not in dealers or not set(dealers) <= set(self.roster) or len(dealers) < self.threshold:
            raise SecAggError(f"the DEALT of round {self.round} names {len(dealers)} dealer(s) outside this round's roster or below its threshold")
        if set(message.body["shares"]) != set(dealers):
            raise SecAggError(f"the DEALT of round {self.round} does not carry one share from each dealer it names")
        for dealer in sorted(dealers):
            key = share_key(self.keys.cipher, self.roster[dealer].cipher_pk, self.round, dealer, self.site)
            plain = decrypt_share(key, bytes.fromhex(message.body["shares"][dealer]), self.round, dealer, self.site)
            self._held[dealer] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        self.dealers = sorted(dealers)

    @property
    def ready(self) -> bool:
        """The shares are dealt: a trained update can be masked."""
        return bool(self.dealers) and self.keys is not None

    def masked_message(self, weights: Mapping[str, np.ndarray], num_samples: int, val_dice: float) -> tuple[Message, ClipReport]:
        """The MASKED message of this site's update, and what clipping did to it."""
        assert self.keys is not None and self.ready
        change = update_change(weights, self.global_weights)
        factor = 1.0 if change <= self.clip_norm or change == 0 else self.clip_norm / change
        weight = self.settings.weight(num_samples, val_dice)
        ring = self.ring
        streams = [(MaskStream(self.keys.seed, ring), 1)] + [
            (MaskStream(pair_seed(self.keys.mask, self.roster[peer].mask_pk, self.round, self.site, peer), ring), mask_sign(self.site, peer))
            for peer in self.dealers
            if peer != self.site
        ]
        scale = factor * weight * float(2**self.fraction_bits)
        tensors: dict[str, np.ndarray] = {}
        for name, shape in Payload.of(self.global_weights).tensors():
            if name == SCALARS:
                scalars = np.array([weight, weight * float(val_dice), float(val_dice), 1.0])
                masked = masked_change(scalars, np.zeros(len(scalars)), float(2**self.fraction_bits), ring, streams)
            else:
                masked = masked_change(weights[name], self.global_weights[name], scale, ring, streams)
            tensors[name] = masked.reshape(shape)
        message = Message(MessageType.MASKED, round=self.round, site=self.site, body={"fraction_bits": self.fraction_bits}, tensors=tensors)
        return message, ClipReport(self.clip_norm, change, change * factor)

    def on_unmask(self, message: Message) -> Message:
        """Reveal seed shares of the survivors and key shares of the dropped, never both for one site; then forget."""
        survivors, dropped = set(message.body["survivors"]), set(message.body["dropped"])
        if self.revealed:
            raise SecAggError(f"a second UNMASK for round {self.round}: this site answers once per round")
        if not self.dealers:
            raise BadMessage(f"an UNMASK for round {self.round} before its shares were dealt")
        if survivors & dropped or survivors | dropped != set(self.dealers) or self.site not in survivors:
            raise SecAggError(f"the UNMASK of round {self.round} does not split this round's sites into survivors and dropped")
        if len(survivors) < self.threshold:
            raise SecAggError(f"the UNMASK of round {self.round} names {len(survivors)} survivor(s), below the threshold {self.threshold}")
        body = {
            "seeds": {site: self._held[site][0].hex() for site in sorted(survivors)},
            "keys": {site: self._held[site][1].hex() for site in sorted(dropped)},
        }
        self.revealed, self.keys, self._held = True, None, {}
        return Message(MessageType.REVEAL, round=self.round, site=self.site, body=body)


