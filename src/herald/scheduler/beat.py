"""Celery beat wiring: each periodic message carries the instant beat sent it.

A worker that took the tick from its own clock when the message arrived would misplace a late
or redelivered message: two of one beat's messages could land in one interval (the second run
dropped) and a run that crashed and came back after the visibility timeout would claim a later
tick. Beat's stamp makes the tick the one the message was sent for, whenever it runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import current_task
from celery.beat import PersistentScheduler, ScheduleEntry

TICK_HEADER = "herald_sent_at"


class TickScheduler(PersistentScheduler):  # type: ignore[misc]  # celery has no type hints
    """Beat's persistent scheduler, stamping every message with ``TICK_HEADER`` (ISO 8601, UTC)."""

    def apply_async(self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        entry = self.reserve(entry) if advance else entry
        stamped = type(entry)(**dict(entry))
        headers = {**(entry.options.get("headers") or {}), TICK_HEADER: self.app.now().isoformat()}
        stamped.options = {**entry.options, "headers": headers}
        return super().apply_async(stamped, producer=producer, advance=False, **kwargs)


def sent_at() -> datetime | None:
    """The instant beat stamped on the message the current task runs, if it is such a message."""
    request = getattr(current_task, "request", None)
    raw = getattr(request, TICK_HEADER, None)
    if not isinstance(raw, str):
        return None
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None
