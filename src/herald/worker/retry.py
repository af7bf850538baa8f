"""The retry policy: exponential back-off with jitter, bounded by attempts, a time window and
the delivery's deadline. The decision is a value, stored on the attempt, so the dashboard and
the API can say why a delivery is dead."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from herald.config import RetrySettings
from herald.errors import ChannelError, PermanentChannelError


class Action(StrEnum):
    delivered = "delivered"
    retry = "retry"
    dead = "dead"
    expired = "expired"


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    reason: str
    due_at: datetime | None = None


# Immutable, so every successful attempt shares this one (a bulk batch is hundreds of them).
DELIVERED = RetryDecision(Action.delivered, "delivered")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float
    factor: float
    max_delay_s: float
    window_s: float
    jitter: float

    @classmethod
    def from_settings(
        cls, settings: RetrySettings, *, max_attempts: int | None = None, window_s: float | None = None
    ) -> RetryPolicy:
        """The default policy, with a tenant's overrides of attempts and window applied."""
        return cls(
            max_attempts=max_attempts or settings.max_attempts,
            base_delay_s=settings.base_delay_s,
            factor=settings.factor,
            max_delay_s=settings.max_delay_s,
            window_s=window_s or settings.window_s,
            jitter=settings.jitter,
        )

    def delay_s(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Back-off after failed attempt number ``attempt`` (1-based), jittered by ±``jitter``."""
        raw = min(self.max_delay_s, self.base_delay_s * self.factor ** (attempt - 1))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, raw * (1 + spread))

    def decide(
        self,
        *,
        attempt: int,
        error: ChannelError | None,
        now: datetime,
        first_attempt_at: datetime,
        deliver_by: datetime | None,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """What happens after attempt number ``attempt`` ended with ``error`` (None = success)."""
        if error is None:
            return DELIVERED
        if isinstance(error, PermanentChannelError):
            return RetryDecision(Action.dead, f"not retryable: {error.message}")
        if attempt >= self.max_attempts:
            return RetryDecision(Action.dead, f"gave up after {attempt} attempts: {error.message}")
        delay = self.delay_s(attempt, rng=rng)
        if error.retry_after_s is not None:
            # Retry-After is a floor: never earlier than the receiver asked.
            delay = max(delay, error.retry_after_s)
        due_at = now + timedelta(seconds=delay)
        if due_at > first_attempt_at + timedelta(seconds=self.window_s):
            return RetryDecision(Action.dead, f"retry window of {self.window_s:g}s exhausted: {error.message}")
        if deliver_by is not None and due_at > deliver_by:
            return RetryDecision(Action.expired, f"next attempt would pass deliver_by: {error.message}")
        return RetryDecision(Action.retry, f"retry in {delay:.1f}s: {error.message}", due_at)
