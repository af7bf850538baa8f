"""Tenant-defined recurring sends: a cron expression in a time zone and the event to emit.

Every occurrence is emitted through intake with the idempotency key ``recurring:<id>:<instant>``,
so two beats, a retried task or a restart can never emit one occurrence twice; missed
occurrences (beat was down) are emitted on the next run, up to ``max_catch_up`` of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from herald.intake import IntakePolicy, NewEvent, accept_events
from herald.scheduler.times import next_fire
from herald.store.models import Recurring, Tenant

logger = logging.getLogger(__name__)


def fire_due(
    *,
    session: Session,
    now: datetime,
    policy: IntakePolicy,
    to_event: Callable[[dict[str, Any]], NewEvent],
    limit: int = 100,
    max_catch_up: int = 100,
) -> int:
    """Emit every due occurrence of up to ``limit`` recurring sends; returns how many events."""
    due = session.scalars(
        select(Recurring)
        .where(Recurring.enabled.is_(True), Recurring.next_fire_at <= now)
        .order_by(Recurring.next_fire_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    emitted = 0
    for recurring in due:
        tenant = session.get(Tenant, recurring.tenant_id)
        if tenant is None or recurring.next_fire_at is None:
            continue
        zone = ZoneInfo(recurring.timezone)
        fire_at = recurring.next_fire_at
        for _ in range(max_catch_up):
            if fire_at > now:
                break
            keyed = replace(
                to_event(recurring.event), idempotency_key=f"recurring:{recurring.id}:{fire_at.isoformat()}"
            )
            accept_events(session=session, tenant=tenant, events=[keyed], now=now, policy=policy)
            recurring.last_fired_at = fire_at
            emitted += 1
            fire_at = next_fire(recurring.cron, zone, fire_at)
        while fire_at <= now:  # more missed than we catch up: skip ahead, and say so
            logger.warning("recurring %s: skipped a missed occurrence at %s", recurring.id, fire_at.isoformat())
            fire_at = next_fire(recurring.cron, zone, fire_at)
        recurring.next_fire_at = fire_at
    return emitted
