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

from herald.errors import HeraldError
from herald.intake import IntakePolicy, NewEvent, accept_events
from herald.logs import redact
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
        try:
            # One recurring send that intake refuses (its endpoint was disabled, its recipient
            # deleted since) must not hold back every other one: its work is undone on its own.
            with session.begin_nested():
                emitted += _emit_due(
                    session, recurring, tenant, zone, recurring.next_fire_at, now, policy, to_event, max_catch_up
                )
        except HeraldError as exc:
            logger.warning(
                "recurring %s: occurrence refused (%s: %s); skipped, the next one is tried on time",
                recurring.id, exc.code, redact(exc.message),
            )  # fmt: skip
            recurring.next_fire_at = _after(recurring.cron, zone, recurring.next_fire_at, now)
    return emitted


def _emit_due(
    session: Session,
    recurring: Recurring,
    tenant: Tenant,
    zone: ZoneInfo,
    fire_at: datetime,
    now: datetime,
    policy: IntakePolicy,
    to_event: Callable[[dict[str, Any]], NewEvent],
    max_catch_up: int,
) -> int:
    """Emit the due occurrences of one recurring send from ``fire_at`` (up to ``max_catch_up``); how many."""
    emitted = 0
    for _ in range(max_catch_up):
        if fire_at > now:
            break
        keyed = replace(to_event(recurring.event), idempotency_key=f"recurring:{recurring.id}:{fire_at.isoformat()}")
        accept_events(session=session, tenant=tenant, events=[keyed], now=now, policy=policy)
        recurring.last_fired_at = fire_at
        emitted += 1
        fire_at = next_fire(recurring.cron, zone, fire_at)
    if fire_at <= now:  # more missed than we catch up: skip ahead, and say so
        logger.warning("recurring %s: skipped missed occurrences from %s", recurring.id, fire_at.isoformat())
    recurring.next_fire_at = _after(recurring.cron, zone, fire_at, now)
    return emitted


def _after(cron: str, zone: ZoneInfo, fire_at: datetime, now: datetime) -> datetime:
    """The first occurrence at ``fire_at`` or later that is still ahead of ``now``."""
    while fire_at <= now:
        fire_at = next_fire(cron, zone, fire_at)
    return fire_at
