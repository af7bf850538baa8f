"""A worker's lease on the batch it sends: renewed while a long batch runs, and respected when
recording, so a worker that lost its lease never overwrites what happened after.

The worker's delivery logic runs in this process (``Runtime``, as a Celery pool process runs it)
against real SQLite/PostgreSQL, Redis and an HTTP receiver; the dispatcher's claim and reconciler
are the store's real functions.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store import queries
from herald.store.db import transaction
from herald.store.models import Attempt, Delivery, Endpoint, Event, Tenant, utcnow
from herald.worker.celery_app import DELIVER_BATCH, make_celery
from herald.worker.delivery import Runtime, _taken, _taken_sqlite
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


def send_events(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    count: int,
    *,
    fields: dict[str, object] | None = None,
    **endpoint: object,
) -> None:
    """A new endpoint (``endpoint`` settings) and ``count`` events for it (``fields`` added to each)."""
    answer = client.post("/v1/endpoints", json={"url": receiver.url, **endpoint}, headers=auth)
    assert answer.status_code == 201, answer.text
    receiver.secrets.append(answer.json()["secret"])
    events = [{"type": "visit.booked", "subject": f"visit:{i}", **(fields or {})} for i in range(count)]
    assert client.post("/v1/events/batch", json={"events": events}, headers=auth).status_code == 202


def claim(sessions: sessionmaker[Session], lease_s: float, now: datetime | None = None) -> tuple[list[str], datetime]:
    """The dispatcher's claim: the ids and the lease its message carries."""
    now = now or utcnow()
    with transaction(sessions) as session:
        ids = queries.claim_due(session=session, lane="transactional", limit=100, lease_s=lease_s, now=now)
    return ids, queries.lease_expiry(now, lease_s)


def deliver_while_reconciling(
    settings: Settings, sessions: sessionmaker[Session], ids: list[str], lease_until: datetime, *, every_s: float
) -> list[int]:
    """Deliver the batch while the dispatcher's reconciler runs every ``every_s`` (more often than
    it ever does); returns how many rows each of its passes took back."""
    done = threading.Event()
    returned: list[int] = []

    def reconcile_meanwhile() -> None:
        while not done.is_set():
            with transaction(sessions) as session:
                returned.append(queries.reconcile(session=session, now=utcnow()))
            done.wait(every_s)

    reconciler = threading.Thread(target=reconcile_meanwhile)
    reconciler.start()
    try:
        with running(settings) as runtime:
            runtime.deliver(ids, lease_until)
    finally:
        done.set()
        reconciler.join()
    return returned


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
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    assert len(ids) == 6
    returned = deliver_while_reconciling(settings, sessions, ids, lease_until, every_s=0.2)
    assert len(returned) > 10 and sum(returned) == 0, "the reconciler took back rows of a batch still sending"
    assert [(d.state, d.attempts, d.lease_until) for d in rows(sessions)] == [("delivered", 1, None)] * 6
    assert sorted(receiver.calls.values()) == [1] * 6
    assert receiver.max_in_flight == 1


def test_a_send_whose_deadline_passes_while_it_waits_for_its_endpoint_is_not_started(
    settings: Settings, client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session]
) -> None:
    receiver.delay_s = 1.0
    with running(settings) as runtime:  # up before the deadline starts to run
        # One request at a time, 1 s each: the first two start before the deadline (at about 0
        # and 1 s), the third would start at about 2 s, past it. All three are taken at once.
        deadline = (utcnow() + timedelta(seconds=1.5)).isoformat()
        send_events(client, auth, receiver, 3, fields={"deliver_by": deadline}, max_concurrency=1)
        ids, lease_until = claim(sessions, settings.dispatch.lease_s)
        runtime.deliver(ids, lease_until)
    done = rows(sessions)
    assert sorted((d.state, d.attempts) for d in done) == [("delivered", 1), ("delivered", 1), ("expired", 0)]
    [late] = [d for d in done if d.state == "expired"]
    assert (late.last_error, late.lease_until, late.due_at) == ("deliver_by passed before sending", None, None)
    assert late.finished_at is not None
    with sessions() as session:
        attempts = session.scalars(select(Attempt)).all()
    assert sorted(a.delivery_id for a in attempts) == sorted(d.id for d in done if d.state == "delivered")
    assert late.id not in receiver.calls and len(receiver.calls) == 2


def test_a_worker_that_lost_its_lease_records_its_attempt_but_not_the_state(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    receiver.delay_s = 2.0
    send_events(client, auth, receiver, 1)
    [delivery_id], lease_until = claim(sessions, settings.dispatch.lease_s)
    with running(settings) as runtime:
        worker = threading.Thread(target=runtime.deliver, args=([delivery_id], lease_until))
        worker.start()
        try:
            wait_until(lambda: receiver.in_flight == 1, what="the worker's request")
            # Meanwhile the lease runs out (as if the worker had stalled), the reconciler returns
            # the delivery to due and the dispatcher hands it out again under a new lease.
            later = utcnow() + timedelta(seconds=settings.dispatch.lease_s + 1)
            with transaction(sessions) as session:
                assert queries.reconcile(session=session, now=later) == 1
            assert claim(sessions, settings.dispatch.lease_s, now=later)[0] == [delivery_id]
            [claimed_again] = rows(sessions)
        finally:
            worker.join(30)
    assert receiver.calls[delivery_id] == 1
    [after] = rows(sessions)
    # The first worker's outcome did not overwrite the second claim's row...
    assert (after.state, after.attempts, after.lease_until) == ("sending", 0, claimed_again.lease_until)
    # ...but its attempt is history all the same.
    with sessions() as session:
        attempts = session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id)).all()
    assert [(a.number, a.status_code, a.outcome) for a in attempts] == [(1, 200, "delivered")]


def test_a_message_sends_only_rows_still_under_its_claims_lease(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """The claim's lease is the message's token: a message naming another lease, or one whose
    lease ran out while it waited in the broker, sends nothing and leaves the rows to the
    reconciler; the right one sends each row once, and a late copy of it finds them finished."""
    send_events(client, auth, receiver, 3)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    with running(settings) as runtime:
        runtime.deliver(ids, lease_until - timedelta(microseconds=1))  # an earlier claim's message
        assert receiver.calls == {}
        assert {(d.state, d.lease_until) for d in rows(sessions)} == {("sending", lease_until)}
        runtime.deliver(ids, lease_until)
        runtime.deliver(ids, lease_until)  # the broker's late copy
        # A claim whose lease ran out before any worker picked its message up.
        one = {"events": [{"type": "visit.booked", "subject": "visit:late"}]}
        assert client.post("/v1/events/batch", json=one, headers=auth).status_code == 202
        [late], expired = claim(sessions, 0.001)
        # Its message is taken once the lease has run out (within a millisecond it would not have).
        wait_until(lambda: utcnow() > expired, timeout_s=5, what="the 1 ms lease to run out")
        runtime.deliver([late], expired)
    assert sorted(receiver.calls) == sorted(ids) and set(receiver.calls.values()) == {1}
    states = {d.id: (d.state, d.attempts) for d in rows(sessions)}
    assert [states[i] for i in ids] == [("delivered", 1)] * 3
    assert states[late] == ("sending", 0)  # untouched: the reconciler hands it out again


def test_a_copy_of_a_message_being_sent_sends_nothing(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """The broker may deliver one message twice; the copy finds the batch marked taken in Redis."""
    receiver.delay_s = 1.0
    send_events(client, auth, receiver, 2)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    with running(settings) as first, running(settings) as second:
        worker = threading.Thread(target=first.deliver, args=(ids, lease_until))
        worker.start()
        try:
            wait_until(lambda: receiver.in_flight == 2, what="the first worker's requests")
            second.deliver(ids, lease_until)
        finally:
            worker.join(30)
    assert dict(receiver.calls) == dict.fromkeys(ids, 1)
    assert [(d.state, d.attempts) for d in rows(sessions)] == [("delivered", 1)] * 2


def test_a_message_that_waited_through_most_of_its_lease_renews_it_before_sending(
    settings: Settings, client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session]
) -> None:
    """A claim's lease starts when the dispatcher publishes: a worker that gets the message late
    renews at once rather than a third of a lease into sending, or the reconciler would hand the
    rows out again while they are being sent."""
    settings.dispatch.lease_s = 3.0
    # The send outlasts the 0.4 s left of the lease by far, with room for a loaded machine before
    # the timeout (1.5 s against 2.0 s once timed out here under a parallel test run).
    settings.webhook.total_timeout_s = 2.5
    receiver.delay_s = 1.0
    send_events(client, auth, receiver, 2)
    ids, lease_until = claim(sessions, 0.4)  # as if the message had waited 2.6 s of a 3 s lease
    returned = deliver_while_reconciling(settings, sessions, ids, lease_until, every_s=0.1)
    assert len(returned) > 5 and sum(returned) == 0, "the reconciler took back rows being sent"
    assert [(d.state, d.attempts) for d in rows(sessions)] == [("delivered", 1)] * 2
    assert dict(receiver.calls) == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("lease", [None, "tomorrow", "2026-11-29T10:00:00"])
def test_a_task_message_without_a_usable_lease_is_left_to_the_reconciler(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    sessions: sessionmaker[Session],
    settings: Settings,
    lease: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message from an older dispatcher (ids only) or a damaged one is not sent: its rows wait
    for their lease to run out and are handed out again."""
    send_events(client, auth, receiver, 2)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    app = make_celery(settings)
    try:
        app.tasks[DELIVER_BATCH].run(ids, lease)
    finally:
        app.close()
    assert "without a usable lease" in caplog.text
    assert receiver.calls == {}
    assert {(d.state, d.lease_until) for d in rows(sessions)} == {("sending", lease_until)}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_reads_its_batch_by_primary_key_not_through_the_claims_lease(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A claim's rows (up to ``max_claim``) share one lease; a batch is a slice of them. Read
    through ``ix_deliveries_lease`` the take would walk the whole claim for each batch.

    The take runs on SQLite's own driver, so its statements are seen by the driver's trace
    callback (bound values written in) rather than by SQLAlchemy's events."""
    send_events(client, auth, receiver, 6)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    statements: list[str] = []

    def trace(dbapi_connection: sqlite3.Connection, *_: object) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    with running(settings) as runtime:
        event.listen(runtime.engine, "checkout", trace)
        try:
            runtime.deliver(ids[:3], lease_until)  # the first batch of the claim
        finally:
            event.remove(runtime.engine, "checkout", trace)
        [statement] = [s for s in statements if "JOIN events" in s]
        with runtime.engine.connect() as conn:
            conn.connection.driver_connection.set_trace_callback(None)  # type: ignore[union-attr]
            plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}"))
    assert "sqlite_autoindex_deliveries_1 (id=?)" in plan and "ix_deliveries_lease" not in plan, plan
    assert sorted(receiver.calls) == sorted(ids[:3])


def test_a_worker_still_sends_its_batch_while_redis_is_unreachable(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    sessions: sessionmaker[Session],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sending beats stalling: the taken marker, pauses and live timelines are skipped, and every
    row is sent and recorded once."""
    send_events(client, auth, receiver, 3)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    settings.redis.url = "redis://127.0.0.1:1/0"  # nothing listens there
    with running(settings) as runtime:
        runtime.deliver(ids, lease_until)
    assert "Redis unreachable at take" in caplog.text
    assert dict(receiver.calls) == dict.fromkeys(ids, 1)
    assert [(d.state, d.attempts) for d in rows(sessions)] == [("delivered", 1)] * 3


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_rows_a_take_ends_are_not_written_once_another_claim_holds_them(
    client: TestClient, auth: dict[str, str], receiver: Receiver, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A take reads first and writes the rows it ends (here: endpoint disabled, so dead) after.
    If the rows were handed out again in between, that write keys on the lease it read and
    changes nothing. (PostgreSQL: on SQLite no other writer could act between the two.)"""
    send_events(client, auth, receiver, 2)
    ids, lease_until = claim(sessions, settings.dispatch.lease_s)
    with transaction(sessions) as session:
        session.execute(update(Endpoint).values(enabled=False))
    later = utcnow() + timedelta(seconds=settings.dispatch.lease_s + 1)
    reclaimed: list[datetime] = []

    def hand_out_again(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("UPDATE deliveries SET state") and not reclaimed:
            with transaction(sessions) as session:  # the lease ran out; the reconciler and a claim act
                assert queries.reconcile(session=session, now=later) == len(ids)
            reclaimed.append(claim(sessions, settings.dispatch.lease_s, now=later)[1])

    with running(settings) as runtime:
        event.listen(runtime.engine, "before_cursor_execute", hand_out_again)
        try:
            runtime.deliver(ids, lease_until)
        finally:
            event.remove(runtime.engine, "before_cursor_execute", hand_out_again)
    assert reclaimed and receiver.calls == {}
    assert {(d.state, d.lease_until) for d in rows(sessions)} == {("sending", reclaimed[0])}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_sqlite_take_reads_rows_as_sqlalchemy_would(sessions: sessionmaker[Session], settings: Settings) -> None:
    """The take reads SQLite through its own driver; each value must come out as the column
    types give it (aware timestamps, decoded JSON), and only rows sending under the lease."""
    now = utcnow()
    lease_until = now + timedelta(seconds=60)
    with transaction(sessions) as session:
        session.add(Tenant(id="ten_take", name="take"))
        session.flush()
        for i in range(24):
            session.add(
                Event(id=f"evt_{i:02d}", tenant_id="ten_take", type="visit.booked", subject=f"s{i}" if i % 3 else None,
                      data={"n": i, "text": "é\n\"q\""}, lane="bulk", created_at=now - timedelta(microseconds=i))
            )  # fmt: skip
        session.flush()
        for i in range(24):
            session.add(
                Delivery(
                    id=f"dlv_{i:02d}", tenant_id="ten_take", event_id=f"evt_{i:02d}", channel="webhook", lane="bulk",
                    state="sending" if i != 5 else "delivered", event_type="visit.booked",
                    subject=f"s{i}" if i % 3 else None, attempts=i % 4,
                    first_attempt_at=now - timedelta(seconds=i) if i % 2 else None,
                    deliver_by=now + timedelta(hours=i) if i % 5 else None,
                    content={"body": {"n": i}} if i % 7 == 0 else None, address="a@b.c" if i % 11 == 0 else None,
                    category="visits" if i % 13 == 0 else None,
                    lease_until=lease_until if i != 9 else lease_until + timedelta(microseconds=1),
                )
            )  # fmt: skip
    ids = [f"dlv_{i:02d}" for i in range(24)]
    with running(settings) as runtime, runtime.reads.connect() as conn:
        assert runtime.sqlite
        fast, general = _taken_sqlite(conn, ids, lease_until), _taken(conn, ids, lease_until)
    assert fast == general
    assert sorted(taken.id for taken, _ in fast) == [i for i in ids if i not in ("dlv_05", "dlv_09")]
    by_id = {taken.id: (taken, source) for taken, source in fast}
    taken, source = by_id["dlv_07"]
    assert taken.first_attempt_at == now - timedelta(seconds=7) and taken.first_attempt_at.tzinfo is UTC
    assert taken.deliver_by == now + timedelta(hours=7) and source.created_at == now - timedelta(microseconds=7)
    assert by_id["dlv_00"][0].content == {"body": {"n": 0}} and by_id["dlv_00"][1].data == {"n": 0, "text": 'é\n"q"'}
