"""Periodic jobs on real SQLite and PostgreSQL: each tick runs once, crashes leave it free, clean-up
keeps what is young, and beat's stamp (not the worker's clock) decides the tick."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.intake import IntakePolicy
from herald.scheduler import jobs
from herald.scheduler.beat import TICK_HEADER, TickScheduler
from herald.scheduler.periodic import Job, claim_tick, clean_up, tick_of
from herald.scheduler.recurring import fire_due
from herald.store.db import transaction
from herald.store.models import (
    Delivery,
    DeliveryState,
    Event,
    IdempotencyRecord,
    PeriodicRun,
    Recurring,
    Tenant,
    utcnow,
)
from herald.worker.celery_app import PERIODIC, make_celery
from tests.support import Processes, row_counts, wait_until

EVERY_S = 60.0
# Each make_celery() registers its tasks as Celery "shared" tasks, so a second app in one process
# draws a duplicate-name warning (see test_dispatch.py); this module only publishes with its app.
pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    every = {"recurring_every_s": EVERY_S, "cleanup_every_s": EVERY_S, "reconcile_every_s": EVERY_S}
    scheduler = settings.scheduler.model_copy(update=every)
    return settings.model_copy(update={"scheduler": scheduler})


def runs(sessions: sessionmaker[Session], name: str | None = None) -> list[tuple[str, datetime, bool]]:
    with sessions() as session:
        query = select(PeriodicRun).order_by(PeriodicRun.fire_at)
        if name:
            query = query.where(PeriodicRun.name == name)
        return [(r.name, r.fire_at, r.finished_at is not None) for r in session.scalars(query)]


def boundary() -> datetime:
    """The start of the current minute-long tick (ticks are aligned to the epoch)."""
    return tick_of(Job("x", EVERY_S), utcnow())


def test_two_beats_sending_the_same_tick_run_it_once(settings: Settings, sessions: sessionmaker[Session]) -> None:
    tick = boundary()
    # Beat A's message and beat B's (started at another moment) are sent within the same tick.
    assert jobs.run(settings, sessions, "cleanup", sent_at=tick + timedelta(seconds=1)) is True
    assert jobs.run(settings, sessions, "cleanup", sent_at=tick + timedelta(seconds=59)) is False
    assert runs(sessions) == [("cleanup", tick, True)]
    # The next tick is a new run; another job's same tick is its own.
    assert jobs.run(settings, sessions, "cleanup", sent_at=tick + timedelta(seconds=60)) is True
    assert jobs.run(settings, sessions, "recurring", sent_at=tick + timedelta(seconds=1)) is True
    assert runs(sessions, "cleanup") == [("cleanup", tick, True), ("cleanup", tick + timedelta(seconds=60), True)]


def test_a_claim_racing_an_uncommitted_one_waits_and_loses(
    settings: Settings, sessions: sessionmaker[Session], database_url: str
) -> None:
    job, tick, now = Job("cleanup", EVERY_S), boundary(), utcnow()
    claimed, b_started, results = threading.Event(), threading.Event(), {}

    def beat_a() -> None:
        with transaction(sessions) as session:
            results["a"] = claim_tick(session=session, job=job, tick=tick, now=now)
            claimed.set()
            b_started.wait(10)
            if database_url.startswith("postgresql"):  # B's insert is queued behind A's row lock
                wait_until(lambda: _lock_waiters(sessions) >= 1, timeout_s=10, what="beat B to wait on the lock")

    a = threading.Thread(target=beat_a)
    a.start()
    assert claimed.wait(10)
    b_started.set()
    with transaction(sessions) as session:  # SQLite: BEGIN IMMEDIATE waits for A's commit
        results["b"] = claim_tick(session=session, job=job, tick=tick, now=now)
    a.join(10)
    assert results == {"a": True, "b": False}
    assert [(name, at) for name, at, _ in runs(sessions)] == [("cleanup", tick)]


def _lock_waiters(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return int(session.scalar(text(query)) or 0)


def test_a_claim_that_dies_before_commit_leaves_the_tick_free(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job, tick = Job("cleanup", EVERY_S), boundary()
    # The process dies mid-run: its connection goes, and with it the uncommitted claim.
    session = sessions()
    session.begin()
    assert claim_tick(session=session, job=job, tick=tick, now=utcnow()) is True
    session.close()
    assert runs(sessions) == []
    # The redelivered message runs the tick; a further duplicate finds it done.
    assert jobs.run(settings, sessions, "cleanup", sent_at=tick) is True
    assert jobs.run(settings, sessions, "cleanup", sent_at=tick) is False
    assert runs(sessions) == [("cleanup", tick, True)]


def _recurring(client: TestClient, auth: dict[str, str], cron: str, timezone: str) -> str:
    endpoint = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).json()
    created = client.post(
        "/v1/recurring",
        json={"name": "r", "cron": cron, "timezone": timezone,
              "event": {"type": "report.daily", "endpoint_ids": [endpoint["id"]]}},
        headers=auth,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _occurrences(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        keys = session.scalars(select(Event.idempotency_key).where(Event.type == "report.daily")).all()
    return sorted(str(k).split(":", 2)[2] for k in keys)  # recurring:<id>:<instant>


def test_a_recurring_run_that_fails_part_way_emits_nothing_and_leaves_the_tick_to_the_retry(
    settings: Settings, sessions: sessionmaker[Session], client: TestClient, auth: dict[str, str]
) -> None:
    recurring_id = _recurring(client, auth, "* * * * *", "UTC")
    due = utcnow() - timedelta(minutes=2)
    with transaction(sessions) as session:  # two occurrences due, the stored event now unreadable
        session.execute(
            update(Recurring).where(Recurring.id == recurring_id).values(next_fire_at=due, event={"type": ""})
        )
    tick = boundary()
    before = row_counts(sessions)
    with pytest.raises(pydantic.ValidationError):
        jobs.run(settings, sessions, "recurring", sent_at=tick)
    assert row_counts(sessions) == before  # no claim, no event, next_fire_at unchanged
    with transaction(sessions) as session:
        session.execute(update(Recurring).where(Recurring.id == recurring_id).values(event={"type": "report.daily"}))
        session.execute(update(Recurring).where(Recurring.id == recurring_id).values(next_fire_at=due))
    assert jobs.run(settings, sessions, "recurring", sent_at=tick) is True
    assert len(_occurrences(sessions)) >= 2
    assert runs(sessions) == [("recurring", tick, True)]


def test_a_recurring_send_that_intake_refuses_does_not_hold_back_the_others(
    settings: Settings, sessions: sessionmaker[Session], client: TestClient, auth: dict[str, str]
) -> None:
    broken = _recurring(client, auth, "* * * * *", "UTC")
    healthy = _recurring(client, auth, "* * * * *", "UTC")
    with sessions() as session:
        recurring = session.get(Recurring, broken)
        assert recurring is not None
        endpoint_id = recurring.event["endpoint_ids"][0]
    assert client.post(f"/v1/endpoints/{endpoint_id}/disable", headers=auth).status_code == 200
    due = utcnow() - timedelta(seconds=30)
    with transaction(sessions) as session:
        session.execute(update(Recurring).where(Recurring.id.in_([broken, healthy])).values(next_fire_at=due))
    now = utcnow()
    with transaction(sessions) as session:
        emitted = fire_due(session=session, now=now, policy=IntakePolicy(), to_event=jobs._to_event)
    with sessions() as session:
        keys = session.scalars(select(Event.idempotency_key).where(Event.type == "report.daily")).all()
    # The healthy send's due occurrences (one or two, as the minute falls) and none of the broken one's.
    assert emitted == len(keys) >= 1
    assert {str(k).split(":")[1] for k in keys} == {healthy}
    with sessions() as session:
        later = {r.id: r.next_fire_at for r in session.scalars(select(Recurring))}
    assert all(at is not None and at > now for at in later.values())  # both wait for their next minute


def test_a_daily_recurring_send_is_not_doubled_by_the_autumn_fold(
    sessions: sessionmaker[Session], client: TestClient, auth: dict[str, str]
) -> None:
    """The audit's case, end to end through the store: 02:30 daily in Berlin over 2026-10-25."""
    recurring_id = _recurring(client, auth, "30 2 * * *", "Europe/Berlin")
    with transaction(sessions) as session:
        session.execute(
            update(Recurring)
            .where(Recurring.id == recurring_id)
            .values(next_fire_at=datetime(2026, 10, 24, 0, 30, tzinfo=UTC))
        )
    policy = IntakePolicy(frozenset(), None)
    for now in (datetime(2026, 10, 25, 3, 0, tzinfo=UTC), datetime(2026, 10, 26, 3, 0, tzinfo=UTC)):
        with transaction(sessions) as session:
            fire_due(session=session, now=now, policy=policy, to_event=jobs._to_event)
    assert _occurrences(sessions) == [
        "2026-10-24T00:30:00+00:00",  # 02:30 CEST
        "2026-10-25T00:30:00+00:00",  # 02:30 CEST, the first pass of the fold only
        "2026-10-26T01:30:00+00:00",  # 02:30 CET
    ]
    with sessions() as session:
        recurring = session.get(Recurring, recurring_id)
        assert recurring is not None and recurring.next_fire_at == datetime(2026, 10, 27, 1, 30, tzinfo=UTC)


def test_clean_up_forgets_what_is_old_and_keeps_what_is_young(sessions: sessionmaker[Session], api_key: str) -> None:
    now = utcnow()
    ttl = timedelta(hours=24)
    with transaction(sessions) as session:
        tenant = session.scalars(select(Tenant)).one()
        for key, age in (("old", ttl + timedelta(seconds=1)), ("edge", ttl), ("young", ttl / 2)):
            session.add(
                IdempotencyRecord(tenant_id=tenant.id, key=key, request_hash="h", response={}, created_at=now - age)
            )
        for name, age in (("old", timedelta(days=8)), ("edge", timedelta(days=7)), ("young", timedelta(days=1))):
            session.add(PeriodicRun(name=name, fire_at=now - age, started_at=now - age))
    before = row_counts(sessions)
    with transaction(sessions) as session:
        clean_up(session=session, now=now, idempotency_ttl_s=ttl.total_seconds(), runs_ttl_s=7 * 86400.0)
    with sessions() as session:
        assert sorted(session.scalars(select(IdempotencyRecord.key))) == ["edge", "young"]
        assert sorted(session.scalars(select(PeriodicRun.name))) == ["edge", "young"]
    after = row_counts(sessions)
    assert after == {**before, "idempotency_records": 2, "periodic_runs": 2}  # nothing else touched


def test_beat_reconciles_leases_that_ran_out_even_without_a_dispatcher(
    settings: Settings, sessions: sessionmaker[Session], client: TestClient, auth: dict[str, str]
) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).json()
    ids = []
    for n in range(2):
        answer = client.post("/v1/events", json={"type": "t.x", "subject": f"s:{n}", "data": {},
                                                 "endpoint_ids": [endpoint["id"]]}, headers=auth)  # fmt: skip
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["deliveries"][0]["id"])
    lost, alive = ids
    now = utcnow()
    # As a worker killed mid-send leaves them: taken (sending, no due time), one lease run out.
    with transaction(sessions) as session:
        for delivery_id, lease_until in ((lost, now - timedelta(seconds=5)), (alive, now + timedelta(minutes=5))):
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(state=DeliveryState.sending, due_at=None, lease_until=lease_until)
            )
    tick = boundary()
    assert jobs.run(settings, sessions, "reconcile", sent_at=tick) is True
    with sessions() as session:
        rows = {d.id: (d.state, d.due_at is not None, d.lease_until) for d in session.scalars(select(Delivery))}
    assert rows[lost] == (DeliveryState.queued, True, None)  # due again: the dispatcher sends it when back
    assert rows[alive][:2] == (DeliveryState.sending, False)  # its worker still holds it
    # Another beat's message for the same tick does nothing.
    assert jobs.run(settings, sessions, "reconcile", sent_at=tick) is False
    assert runs(sessions) == [("reconcile", tick, True)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # Celery's path; the store's is above
def test_beat_stamps_each_message_and_the_worker_claims_the_stamped_tick(
    settings: Settings, sessions: sessionmaker[Session], redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    app = make_celery(settings)
    scheduler = TickScheduler(app=app, schedule_filename=str(tmp_path / "beat-schedule"), lazy=True)
    client = redis.Redis.from_url(redis_url)
    try:
        scheduler.setup_schedule()
        sent_from = utcnow()
        scheduler.apply_async(scheduler.schedule["cleanup"])
        messages = [json.loads(m) for m in client.lrange("transactional", 0, -1)]
        assert [m["headers"]["task"] for m in messages] == [PERIODIC]
        stamp = datetime.fromisoformat(messages[0]["headers"][TICK_HEADER])
        assert sent_from <= stamp <= utcnow()
    finally:
        scheduler.close()
        client.delete("transactional")
        client.close()
    # A message beat sent for a tick an hour ago (late, or redelivered) runs that tick in a real
    # worker, not the one the worker's clock is in.
    late = utcnow() - timedelta(hours=1)
    app.send_task(PERIODIC, args=["cleanup"], queue="transactional", headers={TICK_HEADER: late.isoformat()})
    processes.worker(lanes="transactional", concurrency=1)
    wait_until(lambda: runs(sessions), timeout_s=60, what="the periodic task to run")
    assert runs(sessions) == [("cleanup", tick_of(Job("cleanup", EVERY_S), late), True)]
