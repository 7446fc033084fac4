"""``SessionBackoff``: how long ``run_reconnecting`` waits before the next session, with no broker and a fake clock."""

from __future__ import annotations

from tenacity import RetryCallState, Retrying

from broker.pika_transport import RECONNECT_MIN_WAIT_SECONDS, SessionBackoff

MAX_WAIT = 30.0
HEALTHY_AFTER = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def next_wait(backoff: SessionBackoff, clock: FakeClock, *, session_seconds: float) -> float:
    """One session that started now, ran ``session_seconds`` and failed: the wait before the next one."""
    backoff.session_started()
    clock.now += session_seconds
    retry_state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    retry_state.attempt_number = 99  # tenacity's own count; the backoff counts failures in a row itself
    return backoff(retry_state)


def test_sessions_that_fail_at_once_wait_ever_longer_up_to_the_cap() -> None:
    # Prepare: a site whose queue was deleted: every session fails within milliseconds
    clock = FakeClock()
    backoff = SessionBackoff(max_wait_seconds=MAX_WAIT, healthy_after_seconds=HEALTHY_AFTER, clock=clock)

    # Execute
    waits = [next_wait(backoff, clock, session_seconds=0.001) for _ in range(12)]

    # Assert: never zero, the ceiling doubles (jitter below it), and the cap holds
    assert all(RECONNECT_MIN_WAIT_SECONDS <= wait <= MAX_WAIT for wait in waits)
    for failures, wait in enumerate(waits, start=1):
        assert wait <= min(MAX_WAIT, 0.5 * 2 ** (failures - 1))
    assert backoff.failures_in_a_row == 12


def test_a_session_that_ran_for_a_while_starts_the_backoff_afresh() -> None:
    # Prepare: several sessions failed at once, so the next wait is long
    clock = FakeClock()
    backoff = SessionBackoff(max_wait_seconds=MAX_WAIT, healthy_after_seconds=HEALTHY_AFTER, clock=clock)
    for _ in range(6):
        next_wait(backoff, clock, session_seconds=0.001)

    # Execute: then a session works for a minute before its connection drops
    wait = next_wait(backoff, clock, session_seconds=60.0)

    # Assert: reconnect soon, as after the first failure
    assert backoff.failures_in_a_row == 1
    assert RECONNECT_MIN_WAIT_SECONDS <= wait <= 0.5
