"""A worker's lease on the batch it sends: renewed while a long batch runs, and respected when
recording, so a worker that lost its lease never overwrites what happened after.

The worker's delivery logic runs in this process (``Runtime``, as a Celery pool process runs it)
against real SQLite/PostgreSQL, Redis and an HTTP receiver; the dispatcher's claim and reconciler
are the store's real functions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store import queries
from herald.store.db import transaction
from herald.store.models import Attempt, Delivery, utcnow
from herald.worker.delivery import Runtime
from tests.support import Receiver, wait_until


@contextmanager
def running(settings: Settings) -> Iterator[Runtime]:
    """A worker process's delivery runtime, closed afterwards."""
    worker = Runtime(settings)
    try:
        yield worker
    finally:
        for channel in (worker.webhook, worker.email, worker.sms):
            worker.loop.run_until_complete(channel.close())
        worker.loop.close()
        worker.engine.dispose()


def send_events(client: TestClient, auth: dict[str, str], receiver: Receiver, count: int, **endpoint: object) -> None:
    answer = client.post("/v1/endpoints", json={"url": receiver.url, **endpoint}, headers=auth)
    assert answer.status_code == 201, answer.text
    receiver.secrets.append(answer.json()["secret"])
    events = [{"type": "visit.booked", "subject": f"visit:{i}"} for i in range(count)]
    assert client.post("/v1/events/batch", json={"events": events}, headers=auth).status_code == 202


def claim(sessions: sessionmaker[Session], lease_s: float, now: datetime | None = None) -> list[str]:
    with transaction(sessions) as session:
        return queries.claim_due(session=session, lane="transactional", limit=100, lease_s=lease_s, now=now or utcnow())


def rows(sessions: sessionmaker[Session]) -> list[Delivery]:
    with sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def test_a_batch_sending_longer_than_its_lease_keeps_it_and_is_recorded_once(
    settings: Settings, client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session]
) -> None:
    settings.dispatch.lease_s = 2.5
    settings.webhook.total_timeout_s = 2.0
    receiver.delay_s = 0.8
    # One request at a time: six take about 5 s, twice the lease.
    send_events(client, auth, receiver, 6, max_concurrency=1)
    ids = claim(sessions, settings.dispatch.lease_s)
    assert len(ids) == 6
    done = threading.Event()
    returned: list[int] = []

    def reconcile_meanwhile() -> None:
        while not done.is_set():  # the dispatcher's reconciler, more often than it ever runs
            with transaction(sessions) as session:
                returned.append(queries.reconcile(session=session, now=utcnow()))
            done.wait(0.2)

    reconciler = threading.Thread(target=reconcile_meanwhile)
    reconciler.start()
    try:
        with running(settings) as runtime:
            runtime.deliver(ids)
    finally:
        done.set()
        reconciler.join()
    assert len(returned) > 10 and sum(returned) == 0, "the reconciler took back rows of a batch still sending"
    assert [(d.state, d.attempts, d.lease_until) for d in rows(sessions)] == [("delivered", 1, None)] * 6
    assert sorted(receiver.calls.values()) == [1] * 6
    assert receiver.max_in_flight == 1


def test_a_worker_that_lost_its_lease_records_its_attempt_but_not_the_state(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    receiver.delay_s = 2.0
    send_events(client, auth, receiver, 1)
    [delivery_id] = claim(sessions, settings.dispatch.lease_s)
    with running(settings) as runtime:
        worker = threading.Thread(target=runtime.deliver, args=([delivery_id],))
        worker.start()
        try:
            wait_until(lambda: receiver.in_flight == 1, what="the worker's request")
            # Meanwhile the lease runs out (as if the worker had stalled), the reconciler returns
            # the delivery to due and the dispatcher hands it out again under a new lease.
            later = utcnow() + timedelta(seconds=settings.dispatch.lease_s + 1)
            with transaction(sessions) as session:
                assert queries.reconcile(session=session, now=later) == 1
            assert claim(sessions, settings.dispatch.lease_s, now=later) == [delivery_id]
            [claimed_again] = rows(sessions)
        finally:
            worker.join(30)
    assert receiver.calls[delivery_id] == 1
    [after] = rows(sessions)
    # The first worker's outcome did not overwrite the second claim's row...
    assert (after.state, after.attempts, after.lease_until) == ("queued", 0, claimed_again.lease_until)
    # ...but its attempt is history all the same.
    with sessions() as session:
        attempts = session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id)).all()
    assert [(a.number, a.status_code, a.outcome) for a in attempts] == [(1, 200, "delivered")]
