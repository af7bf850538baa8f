"""Herald's periodic jobs, driven by Celery beat and guarded so each tick runs once.

Beat publishes ``herald.periodic(name)``; the task claims the tick (its time rounded down to the
job's interval) by inserting a ``periodic_runs`` row whose primary key is (name, tick). A second
beat's message for the same tick, or a redelivered one, finds the row and does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from herald.store.models import IdempotencyRecord, PeriodicRun


@dataclass(frozen=True)
class Job:
    name: str
    every_s: float


def tick_of(job: Job, now: datetime) -> datetime:
    seconds = int(now.timestamp() // job.every_s * job.every_s)
    return datetime.fromtimestamp(seconds, UTC)


def claim_tick(*, sessions: sessionmaker[Session], job: Job, now: datetime) -> bool:
    """True if this call owns ``job``'s current tick (and records it), False if another did."""
    try:
        with sessions() as session, session.begin():
            session.add(PeriodicRun(name=job.name, fire_at=tick_of(job, now), started_at=now))
        return True
    except IntegrityError:
        return False


def clean_up(*, session: Session, now: datetime, idempotency_ttl_s: float, runs_ttl_s: float) -> None:
    """Retention: forget old idempotency answers and old periodic-run records."""
    session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < now - timedelta(seconds=idempotency_ttl_s))
    )
    session.execute(delete(PeriodicRun).where(PeriodicRun.fire_at < now - timedelta(seconds=runs_ttl_s)))
