"""What each periodic job does when beat's message for its tick arrives at a worker."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.intake import IntakePolicy, NewEvent
from herald.scheduler.periodic import Job, claim_tick, clean_up
from herald.scheduler.recurring import fire_due
from herald.store.db import transaction
from herald.store.models import utcnow

logger = logging.getLogger(__name__)


def jobs(settings: Settings) -> dict[str, Job]:
    return {
        "recurring": Job("recurring", settings.scheduler.recurring_every_s),
        "cleanup": Job("cleanup", settings.scheduler.cleanup_every_s),
    }


def _to_event(stored: dict[str, Any]) -> NewEvent:
    from herald.api.routes.events import new_event
    from herald.api.schemas import EventIn

    return new_event(EventIn.model_validate(stored))


def run(settings: Settings, sessions: sessionmaker[Session], name: str) -> bool:
    """Run job ``name`` for the current tick unless another beat's message already did."""
    job = jobs(settings).get(name)
    if job is None:
        logger.error("unknown periodic job %r", name)
        return False
    now = utcnow()
    if not claim_tick(sessions=sessions, job=job, now=now):
        logger.info("periodic %s: tick already run", name)
        return False
    with transaction(sessions) as session:
        if name == "recurring":
            policy = IntakePolicy(frozenset(settings.critical_categories), settings.smtp.unsubscribe_url)
            emitted = fire_due(session=session, now=now, policy=policy, to_event=_to_event)
            if emitted:
                logger.info("recurring: %d occurrences emitted", emitted)
        else:
            clean_up(
                session=session,
                now=now,
                idempotency_ttl_s=settings.scheduler.idempotency_ttl_s,
                runs_ttl_s=max(7 * 86400.0, settings.scheduler.cleanup_every_s * 2),
            )
    return True
