"""Herald's periodic jobs, driven by Celery beat and guarded so each tick runs once.

Beat publishes ``herald.periodic(name)`` stamped with the instant it sent it (see
``herald.scheduler.beat``); the task claims that instant's tick (rounded down to the job's
interval) by inserting a ``periodic_runs`` row whose primary key is (name, tick), in the same
transaction as the job's work. A second beat's message for the same tick, or a redelivered one
after the run committed, finds the row and does nothing; a run that crashed before committing
left no row, so the redelivered message runs the tick again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from herald.store.models import IdempotencyRecord, PeriodicRun


@dataclass(frozen=True)
class Job:
    name: str
    every_s: float


def tick_of(job: Job, at: datetime) -> datetime:
    """The start of ``job``'s interval that ``at`` falls in (intervals are aligned to the epoch)."""
    seconds = int(at.timestamp() // job.every_s * job.every_s)
    return datetime.fromtimestamp(seconds, UTC)


def claim_tick(*, session: Session, job: Job, tick: datetime, now: datetime) -> bool:
    """True if ``session``'s transaction now owns ``job``'s ``tick``, False if another run has it.

    The claim commits or rolls back with the caller's transaction, so it must hold the job's
    work too. On PostgreSQL a concurrent claim of the same tick waits for the first to commit
    (then fails) or roll back (then succeeds); on SQLite, writers are serialised by BEGIN IMMEDIATE.
    """
    if session.get(PeriodicRun, (job.name, tick)) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(PeriodicRun(name=job.name, fire_at=tick, started_at=now))
    except IntegrityError:
        return False
    return True


def finish_tick(*, session: Session, job: Job, tick: datetime, now: datetime) -> None:
    run = session.get(PeriodicRun, (job.name, tick))
    if run is not None:
        run.finished_at = now


def clean_up(*, session: Session, now: datetime, idempotency_ttl_s: float, runs_ttl_s: float) -> None:
    """Retention: forget idempotency answers older than ``idempotency_ttl_s`` and periodic-run
    records whose tick is older than ``runs_ttl_s``; everything younger is kept."""
    session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < now - timedelta(seconds=idempotency_ttl_s))
    )
    session.execute(delete(PeriodicRun).where(PeriodicRun.fire_at < now - timedelta(seconds=runs_ttl_s)))
