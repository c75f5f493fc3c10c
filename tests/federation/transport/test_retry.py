"""fedseg.federation.transport.retry: the reconnection policy, as numbers (no clock)."""

from __future__ import annotations

from fedseg.federation.transport.retry import Backoff


def test_delays_double_up_to_the_cap_then_give_up() -> None:
    backoff = Backoff(retries=6)
    assert [backoff.failed() for _ in range(7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, None]
    assert backoff.failures == 7


def test_a_success_starts_the_count_again() -> None:
    backoff = Backoff(retries=2, first_delay_s=0.5, max_delay_s=10.0)
    assert [backoff.failed(), backoff.failed()] == [0.5, 1.0]
    backoff.succeeded()
    assert [backoff.failed(), backoff.failed(), backoff.failed()] == [0.5, 1.0, None]


def test_no_retries_gives_up_at_once() -> None:
    assert Backoff(retries=0).failed() is None
