"""The server's side of one securely aggregated round, sans I/O: it relays keys and shares, adds masked
payloads, and unmasks only their sum.

Stages (each closes when every site still in it has answered or left)::

    KEYS    signed round keys in             -> ROSTER to every keyed site
    SHARES  encrypted shares in              -> DEALT to every dealer (its own shares)
    MASKED  masked payloads in, summed mod 2^64 as they arrive -> UNMASK to the survivors
    REVEAL  seed shares of survivors, key shares of the dropped -> the unmasked sum

The server holds one running sum per tensor, never a site's unmasked update:
it can remove the masks only of the sum (the survivors' self-mask seeds and
the dropped sites' pairwise masks). A site is left out — and named — when
its keys are not signed by a certificate of the study CA, its shares do not
cover the roster, or its payload does not fit the model; a revealed share
that does not match the digest its dealer published is identified and not
used. With fewer than ``threshold`` sites left at any stage, the round fails
with the reason.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization

from fedseg.federation.protocol.schemas import Message, MessageType
from fedseg.federation.protocol.secagg import shamir
from fedseg.federation.protocol.secagg.keys import (
    AdvertisedKeys,
    CertificateCheck,
    SecAggError,
    pair_seed,
    seed_commitment,
    share_digest,
)
from fedseg.federation.protocol.secagg.masking import RING64, SCALAR_FIELDS, SCALARS, MaskStream, Payload
from fedseg.federation.protocol.secagg.rules import SecureSettings
from fedseg.federation.protocol.secagg.site import mask_sign

__all__ = ["Broadcast", "SecureFailed", "SecureOutcome", "SecureRefusal", "SecureRound", "Stage"]


class Stage(IntEnum):
    KEYS = 0
    SHARES = 1
    MASKED = 2
    REVEAL = 3
    DONE = 4


_EXPECTED = {Stage.KEYS: MessageType.KEYS, Stage.SHARES: MessageType.SHARES, Stage.MASKED: MessageType.MASKED, Stage.REVEAL: MessageType.REVEAL}


@dataclass(frozen=True)
class Broadcast:
    """Send ``message`` to each of ``sites``."""

    sites: tuple[str, ...]
    message: Message


@dataclass(frozen=True)
class SecureRefusal:
    """What ``site`` sent is refused (``reason`` names what was wrong).

    ``in_sum``: its masked update is in the sum already (a bad REVEAL: only its shares
    are not used); otherwise the site is left out of the round.
    """

    site: str
    reason: str
    in_sum: bool = False


@dataclass(frozen=True)
class SecureFailed:
    """The round cannot be unmasked."""

    reason: str


@dataclass(frozen=True)
class SecureOutcome:
    """The unmasked round: the weighted mean of the float tensors and the sums of the scalars."""

    mean: dict[str, np.ndarray]
    sites: list[str]
    sums: dict[str, float]
    fraction_bits: int
    notes: list[str] = field(default_factory=list)


SecureAction = Broadcast | SecureRefusal | SecureFailed | SecureOutcome


class SecureRound:
    """One round's secure aggregation on the server (see the module docstring)."""

    def __init__(
        self,
        number: int,
        asked: set[str],
        settings: SecureSettings,
        global_weights: Mapping[str, np.ndarray],
        certificates: CertificateCheck,
        min_sites: int = 1,
    ) -> None:
        self.number = number
        self.settings = settings
        self.global_weights = global_weights
        self.certificates = certificates
        self.min_sites = min_sites
        self.stage = Stage.KEYS
        self.members: set[str] = set(asked)  # who is still in the current stage
        self.answered: set[str] = set()
        self.gone: dict[str, str] = {}
        self.roster: dict[str, AdvertisedKeys] = {}
        self.threshold = 0
        self.clip_norm = math.nan
        self.fraction_bits = 0
        self.dealers: list[str] = []
        self._digests: dict[tuple[str, str], tuple[str, str]] = {}  # (dealer, holder) -> (seed digest, key digest)
        self._shares: dict[str, dict[str, dict[str, str]]] = {}
        self._payload = Payload.of(global_weights)
        self.ring = RING64  # the round's, set with the ROSTER
        self._sum: dict[str, np.ndarray] = {}
        self.survivors: list[str] = []
        self._reveals: dict[str, Message] = {}
        self.notes: list[str] = []

    @property
    def pending(self) -> set[str]:
        """Sites the current stage still waits for."""
        return set() if self.stage is Stage.DONE else self.members - self.answered - set(self.gone)

    # ----------------------------------------------------------------- events

    def received(self, site: str, message: Message) -> list[SecureAction]:
        """A site's KEYS, SHARES, MASKED or REVEAL; one that is not the current stage's is refused."""
        expected = _EXPECTED.get(self.stage)
        if message.type is not expected or site not in self.pending:
            return [SecureRefusal(site, f"{message.type.name} is not expected from this site now (round {self.number}, stage {self.stage.name})")]
        handler = {Stage.KEYS: self._keys, Stage.SHARES: self._shares_in, Stage.MASKED: self._masked, Stage.REVEAL: self._reveal}[self.stage]
        problem = handler(site, message)
        self.answered.add(site)
        if problem is None:
            return self._advance()
        self.gone[site] = problem
        in_sum = self.stage is Stage.REVEAL
        if in_sum:
            self.notes.append(f"secure aggregation: {site}'s REVEAL was not used: {problem}")
        return [SecureRefusal(site, problem, in_sum), *self._advance()]

    def in_sum(self, site: str) -> bool:
        """``site``'s masked update is in the running sum (it survives to the unmasking whatever happens next)."""
        return site in self.survivors

    def left(self, site: str, reason: str) -> list[SecureAction]:
        """A site disconnected, timed out or could not train: it drops out of the round (or, having sent its
        masked update, only out of the reveal: the others' shares unmask its seed)."""
        if site not in self.pending:
            return []
        self.gone[site] = reason
        if self.in_sum(site):
            self.notes.append(f"secure aggregation: {site} left before revealing its shares ({reason}); its update is in the sum")
        return self._advance()

    # ----------------------------------------------------------------- stage handlers (None: accepted)

    def _keys(self, site: str, message: Message) -> str | None:
        keys = AdvertisedKeys.from_body(site, message.body)
        try:
            keys.verify(self.number, self.certificates)
        except SecAggError as exc:
            return exc.reason
        self.roster[site] = keys
        return None

    def _shares_in(self, site: str, message: Message) -> str | None:
        shares = message.body["shares"]
        if set(shares) != set(self.roster):
            return f"its secret shares are for {sorted(shares)}, not for the round's roster {sorted(self.roster)}"
        self._shares[site] = shares
        return None

    def _masked(self, site: str, message: Message) -> str | None:
        if message.body["fraction_bits"] != self.fraction_bits:
            return f"masked with {message.body['fraction_bits']} fraction bits, the round uses {self.fraction_bits}"
        tensors = message.tensors
        if list(sorted(tensors)) != sorted(self._payload.names):
            return "its masked payload does not hold the model's float tensors and the scalars"
        for name, shape in self._payload.tensors():
            array = tensors[name]
            if array.dtype != self.ring.dtype or array.size != math.prod(shape):
                want = np.dtype(self.ring.dtype).name
                return f"masked tensor {name} is {array.dtype} of {array.size} values, expected {want} of {math.prod(shape)}"
        if not self._sum:
            self._sum = self._payload.zeros(self.ring)
        for name, total in self._sum.items():
            total += tensors[name].ravel()  # wraps modulo 2^bits, as the masks need
        return None

    def _reveal(self, site: str, message: Message) -> str | None:
        seeds, keys = message.body["seeds"], message.body["keys"]
        dropped = set(self.dealers) - set(self.survivors)
        if set(seeds) != set(self.survivors) or set(keys) != dropped:
            return "its REVEAL does not hold a seed share per survivor and a key share per dropped site"
        for kind, shares in (("seed", seeds), ("key", keys)):
            for dealer, share in shares.items():
                expected = self._digests[(dealer, site)][0 if kind == "seed" else 1]
                if not hmac.compare_digest(share_digest(kind, self.number, dealer, site, bytes.fromhex(share)), expected):
                    return f"it revealed a {kind} share of {dealer} other than the one {dealer} dealt it: its shares are not used"
        self._reveals[site] = message
        return None

    # ----------------------------------------------------------------- stage transitions

    def _advance(self) -> list[SecureAction]:
        if self.stage is Stage.DONE or self.pending:
            return []
        if self.stage is Stage.KEYS:
            return self._send_roster()
        if self.stage is Stage.SHARES:
            return self._deal()
        if self.stage is Stage.MASKED:
            return self._ask_unmask()
        return self._unmask()

    def _next(self, stage: Stage, members: list[str]) -> None:
        self.stage, self.members, self.answered = stage, set(members), set()

    def _fail(self, reason: str) -> list[SecureAction]:
        self.stage = Stage.DONE
        self._sum = {}
        gone = "; ".join(f"{site}: {why}" for site, why in sorted(self.gone.items()))
        return [SecureFailed(f"secure aggregation of round {self.number}: {reason}" + (f" ({gone})" if gone else ""))]

    def _enough(self, sites: list[str], what: str) -> str | None:
        if len(sites) < self.threshold:
            return f"{len(sites)} site(s) {what}, {self.threshold} are needed to unmask (the threshold)"
        if len(sites) < self.min_sites:
            return f"{len(sites)} site(s) {what}, min_sites is {self.min_sites}"
        return None

    def _send_roster(self) -> list[SecureAction]:
        keyed = sorted(self.roster)
        self.threshold = self.settings.threshold_for(len(keyed))
        problem = self._enough(keyed, "sent valid round keys")
        if problem is not None:
            return self._fail(problem)
        self.clip_norm = self.settings.clip_norm(self.global_weights)
        try:
            self.ring, self.fraction_bits = self.settings.scale(self.clip_norm, len(keyed))
        except ValueError as exc:  # the model's norm grew beyond what the configured ring holds
            return self._fail(str(exc))
        body = {
            "threshold": self.threshold, "clip_norm": self.clip_norm, "ring_bits": self.ring.bits,
            "fraction_bits": self.fraction_bits,
            "sites": {site: self.roster[site].body() for site in keyed},
        }
        self._next(Stage.SHARES, keyed)
        return [Broadcast(tuple(keyed), Message(MessageType.ROSTER, round=self.number, body=body))]

    def _deal(self) -> list[SecureAction]:
        dealers = sorted(self._shares)
        problem = self._enough(dealers, "dealt their secret shares")
        if problem is not None:
            return self._fail(problem)
        self.dealers = dealers
        actions: list[SecureAction] = []
        for holder in dealers:
            body = {"sites": dealers, "shares": {dealer: self._shares[dealer][holder]["ciphertext"] for dealer in dealers}}
            actions.append(Broadcast((holder,), Message(MessageType.DEALT, round=self.number, body=body)))
        for dealer in dealers:
            for holder in dealers:
                entry = self._shares[dealer][holder]
                self._digests[(dealer, holder)] = (entry["seed_digest"], entry["key_digest"])
        self._shares = {}
        self._next(Stage.MASKED, dealers)
        return actions

    def _ask_unmask(self) -> list[SecureAction]:
        survivors = sorted(self.answered - set(self.gone))
        problem = self._enough(survivors, "sent a masked update")
        if problem is not None:
            return self._fail(problem)
        self.survivors = survivors
        dropped = sorted(set(self.dealers) - set(survivors))
        self._next(Stage.REVEAL, survivors)
        message = Message(MessageType.UNMASK, round=self.number, body={"survivors": survivors, "dropped": dropped})
        return [Broadcast(tuple(survivors), message)]

    def _unmask(self) -> list[SecureAction]:
        holders = sorted(self._reveals)
        if len(holders) < self.threshold:
            return self._fail(f"{len(holders)} site(s) revealed valid shares, {self.threshold} are needed")
        places = {site: place for place, site in enumerate(sorted(self.roster), start=1)}
        dropped = sorted(set(self.dealers) - set(self.survivors))
        try:
            seeds = {u: self._secret(u, "seeds", places, holders) for u in self.survivors}
            masks = {u: self._secret(u, "keys", places, holders) for u in dropped}
            for u, seed in seeds.items():
                if not hmac.compare_digest(seed_commitment(self.number, u, seed), self.roster[u].commitment):
                    raise SecAggError(f"the shares {u} dealt do not give back the seed it committed to", u)
            mask_keys = {u: self._mask_key(u, secret) for u, secret in masks.items()}
        except SecAggError as exc:
            return self._fail(exc.reason)
        streams = [(MaskStream(seeds[u], self.ring), -1) for u in self.survivors]
        streams += [
            (MaskStream(pair_seed(mask_keys[u], self.roster[v].mask_pk, self.number, u, v), self.ring), -mask_sign(v, u))
            for u in dropped
            for v in self.survivors
        ]
        return self._finish(streams, dropped)

    def _secret(self, dealer: str, kind: str, places: dict[str, int], holders: list[str]) -> bytes:
        shares = {places[holder]: shamir.decode_share(bytes.fromhex(self._reveals[holder].body[kind][dealer])) for holder in holders}
        try:
            return shamir.combine(shares, self.threshold)
        except ValueError as exc:
            raise SecAggError(f"the shares {dealer} dealt do not give back its secret ({exc})", dealer) from exc

    def _mask_key(self, dealer: str, secret: bytes) -> X25519PrivateKey:
        key = X25519PrivateKey.from_private_bytes(secret)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if not hmac.compare_digest(public, self.roster[dealer].mask_pk):
            raise SecAggError(f"the shares {dealer} dealt do not give back the mask key it advertised", dealer)
        return key

    def _finish(self, streams: list[tuple[MaskStream, int]], dropped: list[str]) -> list[SecureAction]:
        values: dict[str, np.ndarray] = {}
        for name, shape in self._payload.tensors():
            total = self._sum.pop(name)
            for stream, sign in streams:
                stream.add_to(total, sign)
            values[name] = self.ring.dequantize(total, self.fraction_bits).reshape(shape)
            del total
        sums = dict(zip(SCALAR_FIELDS, (float(v) for v in values.pop(SCALARS)), strict=True))
        self.stage = Stage.DONE
        if abs(sums["count"] - len(self.survivors)) > 0.5 or not sums["weight"] > 0:
            return self._fail(f"the unmasked sum is inconsistent (count {sums['count']:.3f} for {len(self.survivors)} sites, weight {sums['weight']:.3g})")
        mean = {name: np.asarray(self.global_weights[name], dtype=np.float64) + change / sums["weight"] for name, change in values.items()}
        notes = [f"secure aggregation: the server unmasked only the sum of {len(self.survivors)} site(s)' weighted updates"]
        if dropped:
            notes.append(f"secure aggregation: {', '.join(dropped)} dropped out after dealing shares; their masks were removed with the others' shares")
        return [SecureOutcome(mean, list(self.survivors), sums, self.fraction_bits, notes + self.notes)]
