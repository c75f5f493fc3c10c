"""The server's round logic as an I/O-free state machine.

Events in (a site connected, an update arrived, a site failed, the round's
deadline passed), actions out (send TRAIN to these sites, a round completed,
the study is done, the study failed). No sockets, no clock, no torch: the
transport layer feeds events, carries out the actions and arms the round
timer when :attr:`ServerRounds.round_open` says a round is running — the
websockets model of a protocol core.

Rules (the [federation] issue, item 6):

* the first round starts when every site of the study is connected, or —
  once ``min_sites`` are — when the I/O layer's grace timer expires
  (:attr:`ServerRounds.quorum_reached` tells it to arm one); later rounds
  start right after the previous one with every connected site;
* a site that fails, disconnects or misses the deadline is left out of that
  round with its reason; a site that joins mid-round waits for the next one;
* a round completes when every asked site has answered or been left out; it
  aggregates if at least ``min_sites`` updates were accepted, otherwise the
  study fails with a message naming every missing site and why;
* an update the aggregator rejects (wrong tensors, NaN, Dice outside [0, 1]…),
  or that the round's screening refuses when the round closes (too large next
  to the others' changes), is told to its site and never reaches the global
  model; the site stays in the study and is asked again next round;
* an update that names another round than the open one (stale, replayed),
  a second update of the round, or one from a site that was not asked or was
  already left out is refused and counted, never aggregated;
* a site whose own training failed (NaN loss…) reports it; it is left out of
  that round only;
* after the last round comes the final step (item 8), started by the same
  rule as a round: every connected site receives the final and the best
  models (:class:`SendFinal`) and, when ``evaluate`` is on, tests the final
  model on its held-out cases and answers with per-case Dice. A site that
  joins during this step is served too; one that fails or times out is
  reported, but the study — already trained — does not fail for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from fedseg.errors import FedsegError
from fedseg.federation.protocol.schemas import Message
from fedseg.federation.protocol.secagg import SecureRound, SecureSettings
from fedseg.federation.protocol.secagg.keys import CertificateCheck
from fedseg.federation.protocol.secagg.server import Broadcast, SecureAction, SecureFailed, SecureOutcome, SecureRefusal
from fedseg.federation.strategies import Aggregator, RoundResult, Update, UpdateRejected, secure_mean_of


class Phase(IntEnum):
    WAITING = 0  # fewer than min_sites connected
    TRAINING = 1  # a round is open
    FINISHING = 2  # final step: models out, per-case test Dice in
    DONE = 3
    FAILED = 4


@dataclass(frozen=True)
class RoundsConfig:
    """Who takes part and how many must answer."""

    sites: tuple[str, ...]
    rounds: int
    min_sites: int
    evaluate: bool = True  # final step: ask each site for per-case Dice of the final model
    # training cases the coordinator declared per site (fedseg provision --cases): a site claiming more is refused
    declared_samples: Mapping[str, int] = field(default_factory=dict)
    # secure aggregation (None: off) and the check of the site certificates its round keys come with
    secure: SecureSettings | None = None
    certificates: CertificateCheck | None = None

    def __post_init__(self) -> None:
        if self.secure is not None and (self.certificates is None or len(self.sites) < 2):
            raise FedsegError("secure aggregation needs at least 2 sites and a check of their certificates (the study CA)")
        if not 1 <= self.min_sites <= len(self.sites):
            raise FedsegError(f"min_sites must be between 1 and {len(self.sites)} (the number of sites), got {self.min_sites}")
        if self.rounds < 1:
            raise FedsegError(f"rounds must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class SendTrain:
    """Ask ``site`` to train round ``round`` from the current global weights."""

    site: str
    round: int


@dataclass(frozen=True)
class SendSecure:
    """Send a secure-aggregation ``message`` (ROSTER, DEALT, UNMASK) to each of ``sites``."""

    sites: tuple[str, ...]
    message: Message


@dataclass(frozen=True)
class UpdateRefused:
    """Tell ``site`` its update for ``round`` failed validation; it stays in the study, out of this round."""

    site: str
    round: int
    reason: str


@dataclass(frozen=True)
class RoundCompleted:
    """Round ``round`` aggregated; ``left_out`` maps sites to the reason they are not in it.

    ``updates`` hold each site's scalars (samples, Dice, metrics) without weights: those live
    only in the aggregated ``result``.
    """

    round: int
    result: RoundResult
    updates: dict[str, Update]
    left_out: dict[str, str]
    refused: dict[str, str] = field(default_factory=dict)  # site -> why its update was not aggregated
    late: list[str] = field(default_factory=list)  # "site: reason" for each stale/duplicate/unasked update refused


@dataclass(frozen=True)
class SendFinal:
    """Send ``site`` the final and the best models, and ask it to evaluate the final one if ``evaluate``."""

    site: str
    evaluate: bool


@dataclass(frozen=True)
class EvaluationCompleted:
    """Per-case test Dice of the final model, by site; ``left_out`` maps sites to why they have none."""

    case_dice: dict[str, dict[str, float]]
    left_out: dict[str, str]


@dataclass(frozen=True)
class StudyDone:
    rounds: int


@dataclass(frozen=True)
class StudyFailed:
    """``reason`` names the sites and is for the server's log; ``public_reason`` (counts only) goes to the sites."""

    reason: str
    public_reason: str


Action = SendTrain | SendSecure | UpdateRefused | RoundCompleted | SendFinal | EvaluationCompleted | StudyDone | StudyFailed


@dataclass
class _OpenRound:
    """A training round, or (``final``) the final step numbered ``config.rounds``."""

    number: int
    asked: set[str]
    final: bool = False
    updates: dict[str, Update] = field(default_factory=dict)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    late: list[str] = field(default_factory=list)

    @property
    def pending(self) -> set[str]:
        return self.asked - set(self.updates) - set(self.results) - set(self.left_out)


class ServerRounds:
    """Round state of one federated study (see the module docstring for the rules).

    Args:
        config: sites, number of rounds, quorum.
        aggregator: folds updates into the new global model.
        global_weights: the model at the start of ``first_round``.
        first_round: 0 for a new study; the number of completed rounds when resuming.
        finished: the final step already took place (resuming a finished run).
    """

    def __init__(
        self,
        config: RoundsConfig,
        aggregator: Aggregator,
        global_weights: dict[str, np.ndarray],
        first_round: int = 0,
        finished: bool = False,
    ) -> None:
        self.config = config
        self.aggregator = aggregator
        self.global_weights = global_weights
        self.next_round = first_round
        self.connected: set[str] = set()
        self._samples: dict[str, int] = {}  # each site's num_samples, pinned at its first accepted update
        self.phase = Phase.DONE if finished and first_round >= config.rounds else Phase.WAITING
        self._round: _OpenRound | None = None
        self._secure: SecureRound | None = None  # the open round's secure aggregation, when on

    @property
    def quorum_reached(self) -> bool:
        """Waiting, with at least ``min_sites`` connected: arm the grace timer for stragglers."""
        return self.phase == Phase.WAITING and len(self.connected) >= self.config.min_sites

    @property
    def round_open(self) -> int | None:
        """Number of the running round or final step (the I/O layer arms its timer), or None."""
        return self._round.number if self._round is not None else None

    # ---------------------------------------------------------------- events

    def site_connected(self, site: str) -> list[Action]:
        """A site completed the handshake (identity already checked by TLS)."""
        if site not in self.config.sites:
            raise FedsegError(f"site {site!r} is not part of this study")
        self.connected.add(site)
        if self.phase == Phase.WAITING and self.connected == set(self.config.sites):
            return self._start_round()
        current = self._round
        if current is not None and current.final and site not in current.results:
            current.left_out.pop(site, None)  # rejoined: serve it after all
            current.asked.add(site)
            return [SendFinal(site, self.config.evaluate)]
        return []

    def quorum_wait_expired(self) -> list[Action]:
        """The grace period for stragglers is over: start with whoever is connected, if enough."""
        return self._start_round() if self.quorum_reached else []

    def site_failed(self, site: str, reason: str) -> list[Action]:
        """A site disconnected or reported an error; it leaves the open round."""
        self.connected.discard(site)
        return self._leave_out(site, reason)

    def update_received(self, site: str, update: Update, round_number: int) -> list[Action]:
        """``site``'s update for round ``round_number`` (what its UPDATE says); rejected updates leave the site out.

        An update for any other round than the open one, a second one, or one the
        site was not asked for is refused (the site is told) and never aggregated.
        """
        current = self._round
        unexpected = self._unexpected(site, round_number)
        if unexpected is not None:
            if current is not None and not current.final:
                current.late.append(f"{site}: {unexpected}")
            return [UpdateRefused(site, round_number, unexpected)]
        assert current is not None
        if self._secure is not None:
            reason = "this study aggregates securely: send a masked update, not plain weights"
            return [UpdateRefused(site, current.number, reason), *self._refuse(site, reason)]
        claim = self._false_claim(site, update)
        if claim is not None:
            return [UpdateRefused(site, current.number, claim), *self._refuse(site, claim)]
        try:
            self.aggregator.add(update)
        except UpdateRejected as exc:
            # the site is told (else it would only learn from the server's log) and asked again next round
            return [UpdateRefused(site, current.number, exc.reason), *self._refuse(site, exc.reason)]
        # the weights are folded into the aggregator's running sum: keep only the scalars, so the
        # server's memory does not grow with the number of sites
        current.updates[site] = dataclasses.replace(update, weights={})
        self._samples.setdefault(site, update.num_samples)
        return self._maybe_complete()

    def secure_received(self, site: str, message: Message) -> list[Action]:
        """A site's KEYS, SHARES, MASKED or REVEAL message for the open round (secure aggregation)."""
        current, secure = self._round, self._secure
        number = int(message.round) if message.round is not None else -1
        unexpected = self._unexpected(site, number, secure=True)
        if unexpected is None and secure is None:
            unexpected = "this study does not aggregate securely"
        if unexpected is not None:
            if current is not None and not current.final:
                current.late.append(f"{site}: {message.type.name}: {unexpected}")
            return [UpdateRefused(site, number, unexpected)]
        assert secure is not None
        return self._secure_actions(secure.received(site, message))

    def round_failed(self, site: str, round_number: int, reason: str) -> list[Action]:
        """``site`` could not train round ``round_number`` (e.g. a NaN loss); it stays in the study."""
        current = self._round
        if current is None or current.final or current.number != round_number:
            return []
        return self._leave_out(site, f"training failed at the site: {reason}")

    def result_received(self, site: str, case_dice: dict[str, float]) -> list[Action]:
        """Per-case test Dice of the final model from ``site``."""
        current = self._round
        if current is None or not current.final or site not in current.pending:
            return []  # unsolicited: ignored
        current.results[site] = dict(case_dice)
        return self._maybe_complete()

    def round_timed_out(self, round_number: int) -> list[Action]:
        """The deadline of ``round_number`` passed: every site still pending is left out."""
        current = self._round
        if current is None or current.number != round_number:
            return []
        if self._secure is not None:
            stage = self._secure.stage.name
            actions: list[Action] = []
            for site in sorted(self._secure.pending):
                actions += self._leave_out(site, f"timed out (secure aggregation, stage {stage})")
            return actions
        for site in sorted(current.pending):
            current.left_out[site] = "timed out"
        return self._maybe_complete()

    # ---------------------------------------------------------------- internals

    def _unexpected(self, site: str, round_number: int, *, secure: bool = False) -> str | None:
        """Why an update for ``round_number`` from ``site`` is not one the open round waits for, or None.

        ``secure``: a secure-aggregation message, of which a site sends several per round (its stage is
        checked by :class:`SecureRound`).
        """
        current = self._round
        if current is None or current.final:
            return f"update for round {round_number} while no training round is open"
        if round_number != current.number:
            return f"update for round {round_number}, but the open round is {current.number}"
        if not secure and (site in current.updates or site in current.refused):
            return f"a second update for round {round_number}"
        if site not in current.asked:
            return f"this site was not asked to train round {round_number} (it joined after the round started)"
        if site in current.left_out:
            return f"it arrived after the site was left out of round {round_number} ({current.left_out[site]})"
        return None

    def _false_claim(self, site: str, update: Update) -> str | None:
        """Why ``update``'s sample count cannot be true: above what was declared, or not what the site said before."""
        n = update.num_samples
        declared = self.config.declared_samples.get(site)
        if isinstance(n, int) and declared is not None and n > declared:
            return f"num_samples {n} exceeds the {declared} training cases declared for this site"
        pinned = self._samples.get(site)
        if pinned is not None and n != pinned:
            return f"num_samples changed from {pinned} to {n} during the study"
        return None

    def _refuse(self, site: str, reason: str) -> list[Action]:
        current = self._round
        assert current is not None
        current.refused[site] = reason
        return self._leave_out(site, f"update refused: {reason}")

    def _leave_out(self, site: str, reason: str) -> list[Action]:
        current = self._round
        if current is not None and self._secure is not None:
            if site not in self._secure.pending:
                return []  # it revealed its shares already, or it was left out before
            if not self._secure.in_sum(site):  # a survivor leaving before it reveals stays in the round
                current.left_out[site] = reason
            return self._secure_actions(self._secure.left(site, reason))
        if current is None or site not in current.pending:
            return []
        current.left_out[site] = reason
        return self._maybe_complete()

    def _secure_actions(self, outputs: list[SecureAction]) -> list[Action]:
        """The round machine's actions for what the open round's secure aggregation did."""
        current = self._round
        assert current is not None
        actions: list[Action] = []
        for output in outputs:
            if isinstance(output, Broadcast):
                actions.append(SendSecure(output.sites, output.message))
            elif isinstance(output, SecureRefusal):
                actions.append(UpdateRefused(output.site, current.number, output.reason))
                if not output.in_sum:
                    current.refused[output.site] = output.reason
                    current.left_out[output.site] = f"update refused: {output.reason}"
            elif isinstance(output, SecureFailed):
                self._secure = None
                return [*actions, *self._fail_round(current, output.reason)]
            elif isinstance(output, SecureOutcome):
                self._secure = None
                secure_mean_of(self.aggregator).set_mean(output.mean, output.sites, output.sums, output.notes)
                return [*actions, *self._complete(current, self.aggregator.finish(), {})]
        return actions

    def _start_round(self) -> list[Action]:
        if self.next_round >= self.config.rounds:
            return self._start_final()
        self.phase = Phase.TRAINING
        self._round = _OpenRound(self.next_round, set(self.connected))
        self.aggregator.start_round(self.global_weights)
        if self.config.secure is not None:
            self._secure = SecureRound(
                self.next_round, set(self.connected), self.config.secure, self.global_weights, self.config.certificates,
                self.config.min_sites,
            )
        return [SendTrain(site, self.next_round) for site in sorted(self.connected)]

    def _start_final(self) -> list[Action]:
        sends: list[Action] = [SendFinal(site, self.config.evaluate) for site in sorted(self.connected)]
        if not self.config.evaluate:
            self.phase = Phase.DONE
            return [*sends, StudyDone(self.config.rounds)]
        self.phase = Phase.FINISHING
        self._round = _OpenRound(self.config.rounds, set(self.connected), final=True)
        return sends

    def _maybe_complete(self) -> list[Action]:
        current = self._round
        if current is None or current.pending:
            return []
        self._round = None
        if current.final:
            self.phase = Phase.DONE
            return [EvaluationCompleted(dict(current.results), dict(current.left_out)), StudyDone(self.config.rounds)]
        if len(current.updates) < self.config.min_sites:
            return self._fail_round(current)
        result = self.aggregator.finish()
        refusals: list[Action] = []
        for site, reason in result.refused.items():  # refused by the round's screening
            refusals.append(UpdateRefused(site, current.number, reason))
            current.updates.pop(site, None)
            current.refused[site] = reason
            current.left_out[site] = f"update refused: {reason}"
        if len(current.updates) < self.config.min_sites:
            return [*refusals, *self._fail_round(current)]
        return [*refusals, *self._complete(current, result, dict(current.updates))]

    def _complete(self, current: _OpenRound, result: RoundResult, updates: dict[str, Update]) -> list[Action]:
        """Round ``current`` aggregated into ``result``: commit it, then open the next round (or the final step)."""
        self._round = None
        self.global_weights = result.weights
        completed = RoundCompleted(
            current.number, result, updates, dict(current.left_out), dict(current.refused), list(current.late)
        )
        actions: list[Action] = [completed]
        self.next_round = current.number + 1
        self.phase = Phase.WAITING
        if len(self.connected) >= self.config.min_sites:
            actions.extend(self._start_round())
        return actions

    def _fail_round(self, current: _OpenRound, secure_reason: str | None = None) -> list[Action]:
        self.phase = Phase.FAILED
        self._round = None
        if secure_reason is not None:
            return [StudyFailed(secure_reason, f"round {current.number}: secure aggregation could not unmask the sum; the study stopped")]
        missing = "; ".join(f"{site}: {why}" for site, why in sorted(current.left_out.items()))
        counts = f"round {current.number}: {len(current.updates)} update(s) accepted, min_sites is {self.config.min_sites}"
        return [StudyFailed(f"{counts} ({missing or 'no site answered'})", f"{counts}; the study stopped")]
