"""Every Redis key Herald uses (besides Celery's own), built from one prefix."""

from __future__ import annotations


def wake(prefix: str) -> str:
    """A list the API pushes to after commit; the dispatcher blocks on it."""
    return f"{prefix}:dispatch:wake"


def latency(prefix: str, lane: str, channel: str) -> str:
    """A hash of attempt-latency histogram buckets, written by workers, read by /metrics."""
    return f"{prefix}:metrics:latency:{lane}:{channel}"


def latency_pattern(prefix: str) -> str:
    return f"{prefix}:metrics:latency:*"


def rate(prefix: str, endpoint_id: str, second: int) -> str:
    """A per-endpoint counter for one wall-clock second (endpoint max rate)."""
    return f"{prefix}:rate:{endpoint_id}:{second}"


def slots(prefix: str, endpoint_id: str) -> str:
    """A sorted set of an endpoint's concurrency slots in use, scored by when each expires."""
    return f"{prefix}:slots:{endpoint_id}"


def otp_code(prefix: str, delivery_id: str) -> str:
    """The plaintext of a one-time passcode, kept only until it expires, read once by the worker."""
    return f"{prefix}:otp:{delivery_id}"


def timeline(prefix: str, tenant_id: str) -> str:
    """Pub/sub channel of a tenant's new events and delivery state changes (for SSE streams)."""
    return f"{prefix}:timeline:{tenant_id}"


def pause(prefix: str, endpoint_id: str) -> str:
    """Until when (epoch seconds) deliveries to an endpoint wait after a 429/503; expires by itself."""
    return f"{prefix}:pause:{endpoint_id}"


def urgent(prefix: str) -> str:
    """Set for a few seconds whenever the dispatcher hands out urgent-lane work (bulk work yields)."""
    return f"{prefix}:urgent"


def taken(prefix: str, first_id: str, lease: str) -> str:
    """Set by the worker that took a claimed batch (its first delivery id and the claim's lease),
    for as long as the lease lasts: a copy of the same message finds it and sends nothing."""
    return f"{prefix}:taken:{first_id}:{lease}"
