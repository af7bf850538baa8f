"""The dispatcher and the Celery set-up on real services: claims on PostgreSQL skip each other's
rows, batches adapt to the backlog, and the messages in the Redis broker are what workers get.

The Celery Redis transport keeps a queue as a Redis list named after it (``LPUSH`` to publish,
``BRPOP`` to consume); each item is kombu's JSON envelope with the task's ``[args, kwargs, embed]``
base64-encoded in ``body``. These tests read that list instead of running a worker.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import Settings
from herald.dispatch.dispatcher import Dispatcher
from herald.errors import NotFoundError
from herald.intake import NewEvent, accept_events
from herald.store import queries
from herald.store.db import make_engine, make_sessionmaker, transaction
from herald.store.ids import new_id
from herald.store.models import Delivery, DeliveryState, Endpoint, utcnow
from herald.worker.celery_app import DELIVER_BATCH, make_celery
from tests.support import free_port, queued_batches, queued_messages

LANE = "transactional"


# ------------------------------------------------------------------ helpers


def add_deliveries(sessions: sessionmaker[Session], count: int, lane: str = LANE) -> list[str]:
    """``count`` due webhook deliveries on ``lane``, through intake as the API makes them."""
    with transaction(sessions) as session:
        try:
            tenant = queries.get_tenant(session=session, ref="acme")
        except NotFoundError:
            tenant = queries.create_tenant(session=session, name="acme")
            session.add(Endpoint(id=new_id("ep"), tenant_id=tenant.id, url="http://127.0.0.1:9/hook", enabled=True))
            session.flush()
        events = [NewEvent(type="ticket.updated", subject=f"ticket:{n}", data={}, lane=lane) for n in range(count)]
        answers = accept_events(session=session, tenant=tenant, events=events, now=utcnow())
    ids = [d["id"] for answer in answers for d in answer["deliveries"]]
    assert len(ids) == count
    return ids


def leased(sessions: sessionmaker[Session]) -> dict[str, int]:
    """How many deliveries are in each state, counting only those claimed (queued with a lease)."""
    with sessions() as session:
        rows = session.execute(
            select(Delivery.state, func.count())
            .where(Delivery.lease_until.is_not(None), Delivery.due_at.is_(None))
            .group_by(Delivery.state)
        ).all()
    return {str(state): int(n) for state, n in rows}


@dataclass
class Part:
    """One dispatcher with its own engine, Celery app and Redis client, as a separate process has."""

    dispatcher: Dispatcher
    engine: Engine
    celery: Celery
    client: redis.Redis


MakeDispatcher = Callable[..., Dispatcher]


@pytest.fixture
def make_dispatcher(settings: Settings) -> Iterator[MakeDispatcher]:
    """``make(settings=…, queue_prefix=…)``: a new Dispatcher; a prefix gives its messages lists of their own."""
    made: list[Part] = []

    def make(settings_: Settings = settings, queue_prefix: str = "") -> Dispatcher:
        engine = make_engine(settings_.database_url)
        celery = make_celery(settings_)
        if queue_prefix:  # kombu's Redis transport puts the prefix before every key it uses
            options = dict(celery.conf.broker_transport_options)
            celery.conf.broker_transport_options = options | {"global_keyprefix": queue_prefix}
        client = redis.Redis.from_url(settings_.redis_url)
        dispatcher = Dispatcher(settings=settings_, sessions=make_sessionmaker(engine), celery=celery, client=client)
        made.append(Part(dispatcher, engine, celery, client))
        return dispatcher

    yield make
    for part in made:
        part.celery.close()
        part.client.close()
        part.engine.dispose()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


# ------------------------------------------------------------------ the in-flight count


def test_the_in_flight_count_reads_only_rows_a_lease_is_out_on(sessions: sessionmaker[Session]) -> None:
    """The dispatcher's cap counts deliveries in flight; finished ones (the lane's whole history,
    millions in production) must not be walked for it, and on SQLite the plan says so."""
    add_deliveries(sessions, 30)
    with transaction(sessions) as session:
        claimed = queries.claim_due(session=session, lane=LANE, limit=12, lease_s=60, now=utcnow())
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(claimed[:5]))
            .values(state=DeliveryState.delivered, lease_until=None, finished_at=utcnow())
        )
    engine = sessions.kw["bind"]
    statements: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, parameters: object, *_: object) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with sessions() as session:
            assert queries.in_flight(session=session, lane=LANE) == 7
            assert queries.in_flight(session=session, lane="bulk") == 0
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    if engine.dialect.name == "sqlite":
        [(statement, parameters), *_] = [(s, p) for s, p in statements if "count(" in s.lower()]
        with engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()  # type: ignore[arg-type]
        assert any("ix_deliveries_in_flight" in row[-1] for row in plan), plan


PARTIAL = {  # index -> the column its rows must set
    "ix_deliveries_due": "due_at",
    "ix_deliveries_lease": "lease_until",
    "ix_deliveries_in_flight": "lease_until",
    "ix_deliveries_schedule_key": "schedule_key",
    "ix_deliveries_recipient_id": "recipient_id",
    "ix_deliveries_drop_id": "drop_id",
}


def test_the_dispatchers_indexes_hold_only_rows_in_hand_and_its_queries_use_them(
    sessions: sessionmaker[Session],
) -> None:
    """Claimed and finished rows leave the due index, finished rows the lease indexes, and rows
    without a schedule key, recipient or drop are in none of theirs: each insert and state change
    writes fewer index entries. The queries still find them (on SQLite the plans say so)."""
    engine = sessions.kw["bind"]
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            found = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('deliveries', 'events')"
        else:
            found = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('deliveries', 'events')"
        definitions = dict(conn.exec_driver_sql(found).all())
    for name, column in PARTIAL.items():
        assert definitions[name].replace("(", "").replace(")", "").endswith(f"WHERE {column} IS NOT NULL"), name
    assert "ix_events_tenant_id" not in definitions  # ix_events_tenant_subject leads with tenant_id

    ids = add_deliveries(sessions, 20)
    statements: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, parameters: object, *_: object) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with transaction(sessions) as session:
            assert queries.any_due(session=session, lane=LANE, now=utcnow())
            claimed = queries.claim_due(session=session, lane=LANE, limit=50, lease_s=60, now=utcnow())
            assert sorted(claimed) == sorted(ids)
            assert not queries.any_due(session=session, lane=LANE, now=utcnow())
            later = utcnow() + timedelta(seconds=61)
            assert queries.any_lease_expired(session=session, now=later)
            assert queries.reconcile(session=session, now=later) == len(ids)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    if engine.dialect.name != "sqlite":
        return
    expected = {"lease_until <": "ix_deliveries_lease", "due_at <=": "ix_deliveries_due"}
    checked = 0
    with engine.connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
                continue
            wanted = next((index for marker, index in expected.items() if marker in statement), None)
            if wanted is None:
                continue
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()  # type: ignore[arg-type]
            assert any(wanted in row[-1] for row in plan), (statement, plan)
            checked += 1
    assert checked >= 5  # any_due twice, any_lease_expired, and the claim and reconcile updates


# ------------------------------------------------------------------ claims on PostgreSQL


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_two_dispatchers_claiming_at_once_never_claim_the_same_delivery(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, broker: redis.Redis
) -> None:
    small = settings.model_copy(
        update={"dispatch": settings.dispatch.model_copy(update={"max_claim": 40, "max_batch": 40})}
    )
    ids = add_deliveries(sessions, 1200)
    parts = [make_dispatcher(small, queue_prefix=f"d{n}:") for n in range(2)]
    start = threading.Barrier(len(parts))
    errors: list[BaseException] = []

    def drain(dispatcher: Dispatcher) -> None:
        try:
            start.wait(10)
            while dispatcher.dispatch_lane(LANE):  # True while a claim came back full
                pass
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(dispatcher,)) for dispatcher in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors

    claimed = [[i for batch in queued_batches(broker, f"d{n}:{LANE}") for i in batch] for n in range(len(parts))]
    assert all(claimed), f"both dispatchers should have claimed some: {[len(c) for c in claimed]}"
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)), "a delivery was claimed twice"
    assert sorted(everything) == sorted(ids)
    assert leased(sessions) == {DeliveryState.sending: len(ids)}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_a_dispatcher_skips_rows_another_claim_holds_instead_of_waiting(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, broker: redis.Redis
) -> None:
    """While one dispatcher's claim is uncommitted, a second takes the other due rows at once."""
    ids = add_deliveries(sessions, 30)
    other = make_dispatcher()
    with sessions() as holder, holder.begin():
        held = queries.claim_due(session=holder, lane=LANE, limit=10, lease_s=60, now=utcnow())
        assert len(held) == 10
        done = threading.Event()
        thread = threading.Thread(target=lambda: (other.dispatch_lane(LANE), done.set()))
        thread.start()
        # With FOR UPDATE but no SKIP LOCKED the second claim would wait for this transaction.
        assert done.wait(20), "the second dispatcher waited for locked rows instead of skipping them"
        thread.join(10)
    published = [i for batch in queued_batches(broker, LANE) for i in batch]
    assert sorted(published) == sorted(set(ids) - set(held))
    assert leased(sessions) == {DeliveryState.sending: len(ids)}


# ------------------------------------------------------------------ adaptive batches


def test_an_idle_claim_publishes_one_delivery_and_a_backlog_full_batches(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, broker: redis.Redis
) -> None:
    cfg = settings.dispatch.model_copy(update={"max_batch": 150, "max_claim": 2000, "target_tasks": 8})
    dispatcher = make_dispatcher(settings.model_copy(update={"dispatch": cfg}))

    [alone] = add_deliveries(sessions, 1)
    assert dispatcher.dispatch_lane(LANE) is False  # nothing more was due
    [(batch, lease)] = queued_messages(broker, LANE)
    assert batch == [alone]
    with sessions() as session:  # the message names the claim's lease: the worker's token
        assert session.get(Delivery, alone).lease_until == lease  # type: ignore[union-attr]
    envelope = json.loads(broker.lindex(LANE, 0))
    assert envelope["properties"]["delivery_info"]["routing_key"] == LANE
    broker.delete(LANE)

    backlog = add_deliveries(sessions, 3000)
    assert dispatcher.dispatch_lane(LANE) is True  # a full claim: more is due
    first = queued_batches(broker, LANE)
    assert sum(map(len, first)) == cfg.max_claim
    assert all(1 <= len(b) <= cfg.max_batch for b in first)
    assert len(first) == math.ceil(cfg.max_claim / cfg.max_batch), [len(b) for b in first]  # full messages
    broker.delete(LANE)

    assert dispatcher.dispatch_lane(LANE) is False
    rest = queued_batches(broker, LANE)
    assert sum(map(len, rest)) == len(backlog) - cfg.max_claim
    assert all(1 <= len(b) <= cfg.max_batch for b in rest)
    sent = [i for b in first + rest for i in b]
    assert len(sent) == len(set(sent)) and set(sent) == set(backlog)
    assert leased(sessions) == {DeliveryState.sending: len(backlog) + 1}
    broker.delete(LANE)
    assert dispatcher.dispatch_lane(LANE) is False and broker.llen(LANE) == 0  # nothing is claimed twice


def test_each_claim_counts_what_other_claimers_have_in_flight(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, broker: redis.Redis
) -> None:
    """The drop ingester (and, on PostgreSQL, other dispatchers) claim too: the cap holds for the
    lane, whoever claimed, because the count is read afresh before each claim."""
    cfg = settings.dispatch.model_copy(update={"max_in_flight": 40, "max_claim": 10})
    dispatcher = make_dispatcher(settings.model_copy(update={"dispatch": cfg}))
    add_deliveries(sessions, 10)
    assert dispatcher.dispatch_lane(LANE) is True  # a full claim of 10
    add_deliveries(sessions, 40)
    with transaction(sessions) as session:  # someone else claims 20 of them
        other = queries.claim_due(session=session, lane=LANE, limit=20, lease_s=60, now=utcnow())
    while dispatcher.dispatch_lane(LANE):
        pass
    published = [i for batch in queued_batches(broker, LANE) for i in batch]
    assert len(published) == 20 and not set(published) & set(other)  # 10 + 20 + 10 = the cap of 40
    assert leased(sessions) == {DeliveryState.sending: 40}
    with sessions() as session:
        assert queries.in_flight(session=session, lane=LANE) == 40
        assert queries.any_due(session=session, lane=LANE, now=utcnow())  # 10 wait for room


@pytest.mark.parametrize("lane", ["bulk", LANE])
def test_a_full_bulk_lane_is_counted_again_only_after_a_tick_and_urgent_lanes_every_time(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, lane: str
) -> None:
    """A large drop wakes the dispatcher after every chunk it queues; counting the bulk lane's
    leased rows for each wake-up was waste while it is full. Urgent lanes claim freed room at once."""
    cfg = settings.dispatch.model_copy(update={"max_in_flight": 10, "max_claim": 10, "tick_s": 1.0})
    dispatcher = make_dispatcher(settings.model_copy(update={"dispatch": cfg}))
    engine = dispatcher.sessions.kw["bind"]
    counts: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "count(*)" in statement and "lease_until IS NOT NULL" in statement:
            counts.append(statement)

    first = add_deliveries(sessions, 15, lane=lane)
    assert dispatcher.dispatch_lane(lane) is True  # a full claim of 10
    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert dispatcher.dispatch_lane(lane) is False  # full
        with transaction(sessions) as session:  # the workers finish what was claimed
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(first), Delivery.lease_until.is_not(None))
                .values(state=DeliveryState.delivered, lease_until=None)
            )
        dispatcher.dispatch_lane(lane)
        at_once = (len(counts), leased(sessions).get(DeliveryState.sending, 0))
        time.sleep(1.1)
        dispatcher.dispatch_lane(lane)
        after_a_tick = (len(counts), leased(sessions).get(DeliveryState.sending, 0))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    if lane == "bulk":
        assert (at_once, after_a_tick) == ((1, 0), (2, 5))
    else:
        assert (at_once, after_a_tick) == ((2, 5), (2, 5))  # nothing left due: no count


def test_a_claim_the_broker_refuses_goes_back_to_due(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher
) -> None:
    down = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"})}
    )
    ids = add_deliveries(sessions, 5, lane="bulk")
    assert make_dispatcher(down).dispatch_lane("bulk") is False
    with sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids))).all()
        assert {(d.state, d.lease_until) for d in rows} == {(DeliveryState.queued, None)}
        assert all(d.due_at is not None for d in rows)
        assert queries.any_due(session=session, lane="bulk", now=utcnow())


def test_after_a_refused_claim_the_dispatcher_pauses_before_claiming_again_unless_it_is_stopping(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher
) -> None:
    """A broker that is down must not make the dispatcher claim and release the same rows in a
    tight loop: it waits a second (interrupted by ``stop()``, so shutting down stays prompt)."""
    down = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"})}
    )
    add_deliveries(sessions, 5, lane="bulk")
    stopping = make_dispatcher(down)
    stopping.stop()
    started = time.monotonic()
    assert stopping.dispatch_lane("bulk") is False  # the refusal alone: kombu's publish retries
    refused_s = time.monotonic() - started
    started = time.monotonic()
    assert make_dispatcher(down).dispatch_lane("bulk") is False
    assert time.monotonic() - started >= refused_s + 0.5  # and then the pause (1 s; margin for a busy machine)
    with sessions() as session:
        assert queries.any_due(session=session, lane="bulk", now=utcnow())  # both claims went back to due


def test_urgent_claims_flag_bulk_work_to_yield_for_a_while_and_bulk_claims_do_not(
    settings: Settings, sessions: sessionmaker[Session], make_dispatcher: MakeDispatcher, broker: redis.Redis
) -> None:
    dispatcher = make_dispatcher()
    flag = keys.urgent(settings.redis.key_prefix)
    add_deliveries(sessions, 3, lane="bulk")
    assert dispatcher.dispatch_lane("bulk") is False
    assert broker.llen("bulk") >= 1 and not broker.exists(flag)  # bulk work alone: nobody to yield to

    add_deliveries(sessions, 1)
    dispatcher.dispatch_lane(LANE)
    assert broker.llen(LANE) == 1
    assert 0 < broker.pttl(flag) <= settings.ingest.yield_for_s * 1000  # expires by itself

    off = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"yield_for_s": 0.0})})
    broker.delete(flag)
    add_deliveries(sessions, 1)
    make_dispatcher(off).dispatch_lane(LANE)
    assert broker.llen(LANE) == 2 and not broker.exists(flag)


# ------------------------------------------------------------------ the Celery app


@pytest.mark.parametrize(
    ("dispatch", "visibility_timeout"),
    [
        ({"lease_s": 120.0}, 300),
        ({"lease_s": 20.0, "reconcile_every_s": 1.0}, 100),
        ({"visibility_timeout_s": 500}, 500),
    ],
)
def test_make_celery_is_at_least_once_json_only_with_a_visibility_timeout_above_the_lease(
    tmp_path: Path, redis_url: str, dispatch: dict[str, float], visibility_timeout: int
) -> None:
    settings = Settings(data_dir=tmp_path, redis={"url": redis_url}, dispatch=dispatch)
    app = make_celery(settings)
    try:
        conf = app.conf
        assert (conf.task_acks_late, conf.task_reject_on_worker_lost) == (True, True)
        assert conf.worker_send_task_events is False  # HERALD_WORKER__TASK_EVENTS turns them on
        assert (conf.task_serializer, conf.result_serializer, list(conf.accept_content)) == ("json", "json", ["json"])
        assert conf.worker_prefetch_multiplier == 1
        task = app.tasks[DELIVER_BATCH]
        assert (task.acks_late, task.reject_on_worker_lost, task.serializer) == (True, True, "json")
        assert conf.broker_transport_options["visibility_timeout"] == visibility_timeout
        assert visibility_timeout > settings.dispatch.lease_s + settings.dispatch.reconcile_every_s
        # Beat's ticks outlive a few minutes of transactional backlog before they expire.
        expiries = {name: entry["options"]["expires"] for name, entry in conf.beat_schedule.items()}
        assert expiries == {"recurring": 300.0, "cleanup": settings.scheduler.cleanup_every_s, "reconcile": 300.0}
        # The value the Redis transport really uses, read from a live connection to the broker.
        with app.connection_for_write() as connection:
            assert connection.default_channel.visibility_timeout == visibility_timeout
    finally:
        app.close()


def test_celery_task_events_are_sent_only_when_asked_for(tmp_path: Path, redis_url: str) -> None:
    for wanted in (False, True):
        app = make_celery(Settings(data_dir=tmp_path, redis={"url": redis_url}, worker={"task_events": wanted}))
        try:
            assert app.conf.worker_send_task_events is wanted
        finally:
            app.close()
