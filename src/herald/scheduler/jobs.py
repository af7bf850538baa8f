"""What each periodic job does when beat's message for its tick arrives at a worker."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.intake import IntakePolicy, NewEvent
from herald.logs import number
from herald.scheduler.beat import sent_at as stamped_sent_at
from herald.scheduler.periodic import Job, claim_tick, clean_up, finish_tick, tick_of
from herald.scheduler.recurring import fire_due
from herald.store import queries
from herald.store.db import transaction
from herald.store.models import utcnow

logger = logging.getLogger(__name__)


def jobs(settings: Settings) -> dict[str, Job]:
    return {
        "recurring": Job("recurring", settings.scheduler.recurring_every_s),
        "cleanup": Job("cleanup", settings.scheduler.cleanup_every_s),
        "reconcile": Job("reconcile", settings.scheduler.reconcile_every_s),
    }


def _to_event(stored: dict[str, Any]) -> NewEvent:
    from herald.api.routes.events import new_event
    from herald.api.schemas import EventIn

    return new_event(EventIn.model_validate(stored))


def run(settings: Settings, sessions: sessionmaker[Session], name: str, *, sent_at: datetime | None = None) -> bool:
    """Run job ``name`` for the tick its message was sent for, unless that tick already ran.

    ``sent_at`` defaults to the stamp beat put on the message being run (``herald.scheduler.beat``),
    and only without one (a message from an older beat) to this worker's clock. The claim and the
    work commit together: a run that dies part-way leaves the tick to the redelivered message.
    """
    job = jobs(settings).get(name)
    if job is None:
        logger.error("unknown periodic job %r", name)
        return False
    now = utcnow()
    tick = tick_of(job, sent_at or stamped_sent_at() or now)
    with transaction(sessions) as session:
        if not claim_tick(session=session, job=job, tick=tick, now=now):
            logger.info("periodic %s: tick %s already run", name, tick.isoformat())
            return False
        if name == "recurring":
            policy = IntakePolicy.from_settings(settings)
            emitted = fire_due(session=session, now=now, policy=policy, to_event=_to_event)
            if emitted:
                logger.info("recurring: %s occurrences emitted", number(emitted))
        elif name == "reconcile":
            returned = queries.reconcile(session=session, now=now)
            if returned:
                logger.warning("reconcile: returned %s deliveries whose lease ran out to due", number(returned))
        else:
            clean_up(
                session=session,
                now=now,
                idempotency_ttl_s=settings.scheduler.idempotency_ttl_s,
                runs_ttl_s=max(7 * 86400.0, settings.scheduler.cleanup_every_s * 2),
            )
        finish_tick(session=session, job=job, tick=tick, now=utcnow())
    return True
