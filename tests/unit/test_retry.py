"""The retry policy: back-off shape, bounds, Retry-After and deadlines."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from herald.config import RetrySettings
from herald.errors import PermanentChannelError, TransientChannelError
from herald.worker.retry import Action, RetryPolicy

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DEFAULT = RetryPolicy.from_settings(RetrySettings())


def decide(policy: RetryPolicy, attempt: int, error: Exception | None, **kw: object) -> object:
    return policy.decide(
        attempt=attempt,
        error=error,  # type: ignore[arg-type]
        now=kw.get("now", NOW),  # type: ignore[arg-type]
        first_attempt_at=kw.get("first", NOW),  # type: ignore[arg-type]
        deliver_by=kw.get("deliver_by"),  # type: ignore[arg-type]
        rng=random.Random(1),
    )


def test_defaults_are_eight_attempts_over_about_a_day() -> None:
    assert DEFAULT.max_attempts == 8
    nominal = sum(min(DEFAULT.max_delay_s, DEFAULT.base_delay_s * DEFAULT.factor**i) for i in range(7))
    assert 8 * 3600 < nominal < DEFAULT.window_s


def test_success_is_delivered() -> None:
    assert decide(DEFAULT, 1, None).action is Action.delivered  # type: ignore[attr-defined]


def test_permanent_errors_are_dead_at_once() -> None:
    decision = decide(DEFAULT, 1, PermanentChannelError("HTTP 400", status_code=400))
    assert decision.action is Action.dead  # type: ignore[attr-defined]
    assert "not retryable" in decision.reason  # type: ignore[attr-defined]


@given(attempt=st.integers(1, 7))
def test_transient_errors_retry_later_with_bounded_jitter(attempt: int) -> None:
    decision = decide(DEFAULT, attempt, TransientChannelError("HTTP 500", status_code=500))
    assert decision.action is Action.retry  # type: ignore[attr-defined]
    nominal = min(DEFAULT.max_delay_s, DEFAULT.base_delay_s * DEFAULT.factor ** (attempt - 1))
    delay = (decision.due_at - NOW).total_seconds()  # type: ignore[attr-defined]
    assert nominal * (1 - DEFAULT.jitter) - 1e-6 <= delay <= nominal * (1 + DEFAULT.jitter) + 1e-6


def test_the_last_attempt_is_dead() -> None:
    decision = decide(DEFAULT, 8, TransientChannelError("HTTP 500"))
    assert decision.action is Action.dead  # type: ignore[attr-defined]
    assert "gave up after 8 attempts" in decision.reason  # type: ignore[attr-defined]


@given(retry_after=st.floats(0, 3600), attempt=st.integers(1, 3))
def test_retry_after_is_a_floor(retry_after: float, attempt: int) -> None:
    decision = decide(DEFAULT, attempt, TransientChannelError("HTTP 429", status_code=429, retry_after_s=retry_after))
    assert decision.due_at >= NOW + timedelta(seconds=retry_after)  # type: ignore[attr-defined]


def test_window_bounds_retries() -> None:
    decision = decide(
        DEFAULT, 2, TransientChannelError("HTTP 503"), first=NOW - timedelta(hours=23, minutes=59, seconds=50)
    )
    assert decision.action is Action.dead  # type: ignore[attr-defined]
    assert "window" in decision.reason  # type: ignore[attr-defined]


def test_retry_past_deadline_expires() -> None:
    decision = decide(DEFAULT, 1, TransientChannelError("timeout"), deliver_by=NOW + timedelta(seconds=1))
    assert decision.action is Action.expired  # type: ignore[attr-defined]


def test_tenant_overrides() -> None:
    policy = RetryPolicy.from_settings(RetrySettings(), max_attempts=2, window_s=60)
    assert policy.max_attempts == 2 and policy.window_s == 60
    assert decide(policy, 2, TransientChannelError("x")).action is Action.dead  # type: ignore[attr-defined]
