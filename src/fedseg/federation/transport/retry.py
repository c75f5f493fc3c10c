"""When a site reconnects: a pure backoff policy (no clock, no sleep; the client pump waits the delay it says).

Today's numbers: the first retry after ``first_delay_s`` (2 s), doubling after
each further failure up to ``max_delay_s`` (30 s, a server restart takes a
while); give up after ``retries`` failures in a row. A success (the server
welcomed the site) starts the count again.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FIRST_RETRY_DELAY_S", "MAX_RETRY_DELAY_S", "Backoff"]

FIRST_RETRY_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 30.0


@dataclass
class Backoff:
    """Failures in a row and the delay before the next attempt.

    Args:
        retries: failed attempts allowed in a row (0: give up at the first).
        first_delay_s: pause before the first retry.
        max_delay_s: the longest pause.
    """

    retries: int
    first_delay_s: float = FIRST_RETRY_DELAY_S
    max_delay_s: float = MAX_RETRY_DELAY_S
    failures: int = 0

    def succeeded(self) -> None:
        """The attempt worked (the server welcomed the site): the next failure is the first again."""
        self.failures = 0

    def failed(self) -> float | None:
        """Count a failure; the seconds to wait before retrying, or None when it is time to give up."""
        self.failures += 1
        if self.failures > self.retries:
            return None
        return min(self.first_delay_s * 2 ** (self.failures - 1), self.max_delay_s)
