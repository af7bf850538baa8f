"""Delivering a batch: take the rows, send concurrently, record every outcome in one write.

One ``Runtime`` per worker process holds the database engine, the Redis client, one asyncio
loop and one instance of each channel (one aiohttp session), all reused across tasks.

A batch goes through three steps:

1. **take** (a read): the rows the dispatcher's claim left ``sending`` under the lease named in
   the task message, with their events. A claim is the one write before the outcome; its lease
   is its token, so a message for rows that were since finished, reconciled or claimed again
   finds nothing, and a Redis marker per claimed batch keeps a duplicate message from sending it
   twice meanwhile. Rows past their ``deliver_by`` expire, rows that cannot be sent (endpoint
   disabled, address erased, passcode gone) die, and rows an endpoint cannot take now (paused
   after a 429/503, over its rate or concurrency) are held: due again a little later, their
   attempt count unchanged.
2. **send**, concurrently; the lease is renewed while a long batch is still sending (at once if
   the message waited in the broker long enough to use up a third of it). A send whose
   ``deliver_by`` passed meanwhile (waiting for its endpoint's concurrency gate, say) is not
   started: it expires like one found late at take, without an attempt.
3. **record** (one transaction): an attempt row per send and each delivery's new state, written
   only where this worker still holds the lease, so a worker that lost its lease never
   overwrites what the worker that took over decided.

The hot path uses SQLAlchemy Core on the tables (no ORM objects): a bulk batch is hundreds of
rows, and ORM loading cost more than the sending.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from json.encoder import encode_basestring as _quote
from typing import Any, Protocol

import redis
from sqlalchemy import JSON, Connection, Table, Text, bindparam, cast, select, update

from herald import heap, keys, live
from herald.channels.base import EmailMessage, Sent, SmsMessage, WebhookMessage
from herald.channels.email import EmailChannel
from herald.channels.sms import SmsChannel
from herald.channels.webhook import WebhookChannel
from herald.config import Settings
from herald.errors import ChannelError, PermanentChannelError, TransientChannelError
from herald.logs import redact
from herald.metrics import queue_latencies
from herald.store import queries
from herald.store.bulk import prepare_insert, prepare_update, run_writes
from herald.store.db import make_engine, make_sessionmaker, reader
from herald.store.models import (
    Attempt,
    Channel,
    Delivery,
    DeliveryState,
    Endpoint,
    Event,
    Tenant,
    UTCDateTime,
    sqlite_text,
    utcnow,
)
from herald.worker.pacing import Pacing, Slots
from herald.worker.retry import DELIVERED, Action, RetryDecision, RetryPolicy

logger = logging.getLogger(__name__)

Message = WebhookMessage | EmailMessage | SmsMessage

# Where a one-time passcode stands in rendered content: the code itself is never written to the
# database; it waits in Redis (see herald.otp) and is put in place just before sending.
OTP_MARKER = "__HERALD_OTP_CODE__"

# A held delivery (paused endpoint, over its rate or concurrency) is due again after this.
HOLD_S = 1.0
# Why a delivery ended without an attempt: its deadline came first (at take or at send).
_LATE = "deliver_by passed before sending"

_DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
_EVENTS: Table = Event.__table__  # type: ignore[assignment]
_ENDPOINTS: Table = Endpoint.__table__  # type: ignore[assignment]
_TENANTS: Table = Tenant.__table__  # type: ignore[assignment]

_STATES = {
    Action.delivered: DeliveryState.delivered,
    Action.retry: DeliveryState.retrying,
    Action.dead: DeliveryState.dead,
    Action.expired: DeliveryState.expired,
}
# A delivery that ends (or retries) leaves its lease. Only a retry sets ``due_at``: a claim
# already cleared it, and naming a column in an UPDATE makes SQLite rewrite the indexes on it.
_RECORD_COLUMNS = (
    "state", "attempts", "first_attempt_at", "lease_until", "last_status_code", "last_error", "updated_at",
    "finished_at",
)  # fmt: skip
_RETRY_COLUMNS = (*_RECORD_COLUMNS, "due_at")
_STATE_COLUMNS = ("state", "due_at", "lease_until", "last_error", "finished_at", "updated_at")
_ATTEMPT_COLUMNS = (
    "delivery_id", "number", "started_at", "latency_ms", "status_code", "outcome", "error", "decision", "provider",
)  # fmt: skip


@dataclass(slots=True)
class Taken:
    """What sending and recording need of a delivery this worker took (one ``RETURNING`` row)."""

    id: str
    tenant_id: str
    event_id: str
    endpoint_id: str | None
    channel: str
    lane: str
    subject: str | None
    attempts: int
    first_attempt_at: datetime | None
    deliver_by: datetime | None
    address: str | None
    content: dict[str, Any] | None
    category: str | None


_TAKEN_COLUMNS = [_DELIVERIES.c[name] for name in Taken.__slots__]


@dataclass(slots=True)
class Source:
    """The event a taken delivery is for, read with it: its data as the stored JSON text, which
    webhook payloads splice in rather than decode (a bulk batch is hundreds of them)."""

    id: str
    type: str
    subject: str | None
    created_at: datetime
    data_json: str

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)


_SOURCE_COLUMNS = [
    _EVENTS.c.id, _EVENTS.c.type, _EVENTS.c.subject, _EVENTS.c.created_at, cast(_EVENTS.c.data, Text),
]  # fmt: skip


# Built once: a batch runs each of these, and building the statement (and its cache key) cost
# more than running it on the small ones.
_TAKE = (
    select(*_TAKEN_COLUMNS, *_SOURCE_COLUMNS, _DELIVERIES.c.lease_until)
    .join_from(_DELIVERIES, _EVENTS, _EVENTS.c.id == _DELIVERIES.c.event_id)
    .where(_DELIVERIES.c.id.in_(bindparam("ids", expanding=True)), _DELIVERIES.c.state == DeliveryState.sending)
)
_TAKEN_WIDTH = len(_TAKEN_COLUMNS)
_SOURCE_END = _TAKEN_WIDTH + len(_SOURCE_COLUMNS)


def _taken(conn: Connection, ids: list[str], lease_until: datetime) -> list[tuple[Taken, Source]]:
    """The rows ``ids`` still sending under the lease ``lease_until``, with their events."""
    return [
        (Taken(*row[:_TAKEN_WIDTH]), Source(*row[_TAKEN_WIDTH:_SOURCE_END]))
        for row in conn.execute(_TAKE, {"ids": ids})
        if row[-1] == lease_until
    ]


# ``_TAKE`` for SQLite's own driver, with the ids bound one by one. Through SQLAlchemy's rows
# (row objects, two result processors per timestamp) this read cost 10.0 us a row against 6.4 us
# here; a bulk batch is hundreds of rows, so its values are converted here instead, as the
# column types would: timestamps are SQLite's UTC text (``sqlite_text``), JSON is text.
_SQLITE_TAKE = (
    f"SELECT {', '.join(f'deliveries.{c.name}' for c in _TAKEN_COLUMNS)}, events.id, events.type, events.subject, "
    "events.created_at, events.data, deliveries.lease_until FROM deliveries JOIN events ON events.id = "
    f"deliveries.event_id WHERE deliveries.state = '{DeliveryState.sending}' AND deliveries.id IN "
)
_TAKEN_TIMES = tuple(i for i, c in enumerate(_TAKEN_COLUMNS) if isinstance(c.type, UTCDateTime))
_TAKEN_JSON = tuple(i for i, c in enumerate(_TAKEN_COLUMNS) if isinstance(c.type, JSON))


def _taken_sqlite(conn: Connection, ids: list[str], lease_until: datetime) -> list[tuple[Taken, Source]]:
    """``_taken`` on SQLite. A lease is compared as the text it is stored as: every writer stores
    a timestamp through ``sqlite_text``, so equal instants are equal texts."""
    lease = sqlite_text(lease_until)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        rows = cursor.execute(f"{_SQLITE_TAKE}({', '.join('?' * len(ids))})", ids).fetchall()
    finally:
        cursor.close()
    parse, loads = datetime.fromisoformat, json.loads
    taken: list[tuple[Taken, Source]] = []
    for row in rows:
        if row[-1] != lease:
            continue
        values = list(row[:_TAKEN_WIDTH])
        for i in _TAKEN_TIMES:
            if values[i] is not None:
                values[i] = parse(values[i]).replace(tzinfo=UTC)
        for i in _TAKEN_JSON:
            if values[i] is not None:
                values[i] = loads(values[i])
        event_id, event_type, subject, created_at, data_json = row[_TAKEN_WIDTH:_SOURCE_END]
        source = Source(event_id, event_type, subject, parse(created_at).replace(tzinfo=UTC), data_json)
        taken.append((Taken(*values), source))
    return taken


# What building the messages and pacing need of the batch's endpoints, in one query.
_ENDPOINT_ROWS = select(
    _ENDPOINTS.c.id, _ENDPOINTS.c.url, _ENDPOINTS.c.enabled, _ENDPOINTS.c.max_rate_per_s, _ENDPOINTS.c.max_concurrency
).where(_ENDPOINTS.c.id.in_(bindparam("ids", expanding=True)))
_TENANT_RETRIES = select(_TENANTS.c.id, _TENANTS.c.retry_max_attempts, _TENANTS.c.retry_window_s).where(
    _TENANTS.c.id.in_(bindparam("ids", expanding=True))
)


@dataclass(slots=True)
class Job:
    delivery: Taken
    policy: RetryPolicy
    message: Message


@dataclass(slots=True)
class Result:
    job: Job
    started_at: datetime
    latency_ms: int
    sent: Sent | None
    error: ChannelError | None
    expired: bool = False  # deliver_by passed before the send could start: no attempt was made


class EventLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def data(self) -> Any: ...


def webhook_body(event: EventLike, content: dict[str, Any] | None = None) -> bytes:
    """The payload of every webhook for ``event``: the same bytes on every attempt.

    A tenant's webhook template, rendered when the event was accepted, replaces ``data``.
    """
    payload = {
        "id": event.id,
        "type": event.type,
        "subject": event.subject,
        "timestamp": event.created_at.isoformat(),
        "data": content["body"] if content and "body" in content else event.data,
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def raw_webhook_body(*, event_id: str, type: str, subject: str | None, created_at: datetime, data_json: str) -> bytes:
    """``webhook_body`` for an event without a template, from the stored JSON text of its data.

    The same JSON value as ``webhook_body`` gives (the stored text is spliced in, not decoded and
    encoded again: a bulk batch is hundreds of payloads), and the same bytes on every attempt.
    The head's strings are quoted by the json module's own C quoting, the one ``json.dumps(…,
    ensure_ascii=False)`` applies: a ``json.dumps`` call per payload spent more on setting up its
    encoder than on encoding four short fields.
    """
    quoted_subject = "null" if subject is None else _quote(subject)
    return (
        f'{{"id":{_quote(event_id)},"type":{_quote(type)},"subject":{quoted_subject},'
        f'"timestamp":"{created_at.isoformat()}","data":{data_json}}}'
    ).encode()


def otp_key(prefix: str, delivery_id: str) -> str:
    return keys.otp_code(prefix, delivery_id)


@dataclass(slots=True)
class Batch:
    """The jobs of one task and the lease this worker holds on them."""

    jobs: list[Job]
    lease_until: datetime
    slots: Slots | None = None
    gates: dict[str, asyncio.Semaphore] | None = None
    listening: set[str] = field(default_factory=set)  # tenants whose live timeline a stream follows


class Runtime:
    """Per-process delivery machinery."""

    def __init__(self, settings: Settings, *, background: bool = False) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url, pool_size=2, background=background)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.redis: redis.Redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        self.prefix = settings.redis.key_prefix
        # For periodic jobs, which use the ORM; what they change is published to live timelines.
        self.reads = reader(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        live.install(self.sessions, self.redis, self.prefix)
        self.pacing = Pacing(self.redis, prefix=self.prefix)
        self.loop = asyncio.new_event_loop()
        self.webhook = WebhookChannel(settings.webhook)
        self.email = EmailChannel(settings.smtp, outbox_dir=settings.outbox_dir / "email")
        self.sms = SmsChannel(settings.sms, outbox_dir=settings.outbox_dir / "sms")
        for channel in (self.webhook, self.email, self.sms):
            self.loop.run_until_complete(channel.start())
        self.rng = random.Random()

    def wake(self) -> None:
        """Tell the dispatcher new work is due (periodic jobs that created deliveries)."""
        try:
            self.redis.rpush(keys.wake(self.prefix), 1)
        except redis.RedisError:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")

    def deliver(self, ids: list[str], lease_until: datetime) -> None:
        """Send the deliveries ``ids`` of the claim whose lease runs until ``lease_until``, those
        still ours to send; record what happened."""
        batch = self._take(ids, lease_until)
        if batch is None:
            return
        try:
            results = self.loop.run_until_complete(self._send_all(batch))
            self._record(results, batch.lease_until, batch.listening)
        finally:
            if batch.slots is not None:
                batch.slots.release()

    # ------------------------------------------------------------------ take

    def _take(self, ids: list[str], lease_until: datetime) -> Batch | None:
        now = utcnow()
        if lease_until <= now:  # the message waited out its lease: the reconciler hands the rows out again
            return None
        with self.reads.connect() as conn:
            # The lease is compared here, not in SQL: a claim's rows (up to max_claim) share one
            # lease, and SQLite's planner would walk them all through ix_deliveries_lease rather
            # than look up this batch's ids by primary key.
            taken = _taken_sqlite(conn, ids, lease_until) if self.sqlite else _taken(conn, ids, lease_until)
            if not taken:
                return None
            first, paused, listening = self._ask(ids[0], lease_until, now, [t for t, _ in taken])
            if not first:
                logger.warning("a batch was delivered twice by the broker; the second copy is not sent")
                return None
            endpoint_ids = list({t.endpoint_id for t, _ in taken if t.endpoint_id})
            endpoints = {}
            if endpoint_ids:
                endpoints = {row.id: row for row in conn.execute(_ENDPOINT_ROWS, {"ids": endpoint_ids})}
            jobs, finished = self._jobs(conn, taken, endpoints, now)
            batch = Batch(jobs, lease_until, listening=listening)
            held = self._pace(batch, endpoints, now, paused)
        # Only rows still under this claim's lease (and still sending) end or wait here.
        changed = [(*row, lease_until) for row in finished + held]
        write = prepare_update(
            self.engine.dialect, Delivery, _STATE_COLUMNS, changed, where=("id", "lease_until"),
            where_sql=f"state = '{DeliveryState.sending}'",
        )  # fmt: skip
        if write is not None:
            try:
                with self.engine.begin() as conn:
                    write.run(conn)
            except BaseException:
                if batch.slots is not None:
                    batch.slots.release()
                raise
        return batch

    def _ask(
        self, first_id: str, lease_until: datetime, now: datetime, taken: list[Taken]
    ) -> tuple[bool, dict[str, float], set[str]]:
        """What a batch needs of Redis before it is sent, in one round trip: mark the claimed batch
        starting with ``first_id`` taken for as long as its lease lasts (False if a worker already
        took it: the broker delivered its message twice), the endpoints paused after a 429/503,
        and the tenants whose live timeline a stream listens to (``live.subscribed``)."""
        ttl_ms = max(1, int((lease_until - now).total_seconds() * 1000))
        endpoint_ids = sorted({t.endpoint_id for t in taken if t.endpoint_id})
        tenants = {t.tenant_id for t in taken if t.subject}  # a bulk batch is one tenant's
        channels = {keys.timeline(self.prefix, tenant_id): tenant_id for tenant_id in tenants}
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.taken(self.prefix, first_id, lease_until.isoformat()), 1, nx=True, px=ttl_ms)
        if endpoint_ids:
            pipe.mget(self.pacing.pause_keys(endpoint_ids))
        if channels:
            pipe.pubsub_numsub(*channels)
        try:
            first, *answers = pipe.execute()
        except redis.RedisError:
            # Sending beats stalling (as for pacing): without Redis the batch goes out unmarked,
            # unpaced and unpublished; only a copy of its message could then send it twice.
            logger.warning("Redis unreachable at take: sending without the taken marker, pauses or live timelines")
            return True, {}, set()
        paused = self.pacing.pauses(endpoint_ids, answers.pop(0)) if endpoint_ids else {}
        listening = {channels[c] for c in live.subscribed(answers.pop(0))} if channels else set()
        return bool(first), paused, listening

    def _jobs(
        self, conn: Connection, taken: list[tuple[Taken, Source]], endpoints: dict[str, Any], now: datetime
    ) -> tuple[list[Job], list[tuple[Any, ...]]]:
        """The job of each taken delivery, and the rows that end here (expired, unsendable).
        ``endpoints``: the ``_ENDPOINT_ROWS`` of the batch's endpoints, by id."""
        endpoint_ids = list(endpoints)
        secrets = queries.active_secrets(session=conn, endpoint_ids=endpoint_ids, now=now) if endpoint_ids else {}
        policies = {
            row.id: RetryPolicy.from_settings(
                self.settings.retry, max_attempts=row.retry_max_attempts, window_s=row.retry_window_s
            )
            for row in conn.execute(_TENANT_RETRIES, {"ids": list({t.tenant_id for t, _ in taken})})
        }
        jobs: list[Job] = []
        finished: list[tuple[Any, ...]] = []
        for delivery, event in taken:
            if delivery.deliver_by is not None and delivery.deliver_by <= now:
                finished.append(_finish(delivery, DeliveryState.expired, _LATE, now))
                continue
            endpoint = endpoints.get(delivery.endpoint_id or "")
            message, problem = self._message(delivery, event, endpoint, secrets)
            if message is None:
                finished.append(_finish(delivery, DeliveryState.dead, problem, now))
                continue
            jobs.append(Job(delivery, policies[delivery.tenant_id], message))
        return jobs, finished

    def _message(
        self, delivery: Taken, event: Source, endpoint: Any, secrets: dict[str, list[str]]
    ) -> tuple[Message | None, str]:
        """The message to send for ``delivery``, or None and why it cannot be sent."""
        content = delivery.content or {}
        if delivery.channel == Channel.webhook:
            if endpoint is None or not endpoint.enabled:
                return None, "endpoint disabled or deleted"
            if content and "body" in content:  # a tenant's webhook template, rendered at intake
                body = webhook_body(event, content)
            else:
                body = raw_webhook_body(
                    event_id=event.id, type=event.type, subject=event.subject, created_at=event.created_at,
                    data_json=event.data_json,
                )  # fmt: skip
            return WebhookMessage(
                delivery_id=delivery.id, url=endpoint.url, secrets=secrets.get(endpoint.id, []), body=body
            ), ""
        if not delivery.address:
            return None, "no address (recipient deleted?)"
        text = str(content.get("text", ""))
        if OTP_MARKER in text or OTP_MARKER in str(content.get("html", "")):
            code = self._otp_code(delivery.id)
            if code is None:
                return None, "one-time passcode no longer available"
            text = text.replace(OTP_MARKER, code)
            content = {**content, "text": text, "html": str(content.get("html") or "").replace(OTP_MARKER, code)}
        if delivery.channel == Channel.email:
            return EmailMessage(
                delivery_id=delivery.id,
                to=delivery.address,
                subject=str(content.get("subject", "")),
                text=text,
                html=content.get("html") or None,
                headers=dict(content.get("headers") or {}),
            ), ""
        if delivery.channel == Channel.sms:
            return SmsMessage(delivery_id=delivery.id, to=delivery.address, text=text), ""
        return None, f"unknown channel {delivery.channel!r}"

    def _otp_code(self, delivery_id: str) -> str | None:
        # A Redis error fails the task: the lease runs out and the reconciler tries again.
        raw = self.redis.get(otp_key(self.prefix, delivery_id))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def _pace(
        self, batch: Batch, endpoints: dict[str, Any], now: datetime, paused: dict[str, float]
    ) -> list[tuple[Any, ...]]:
        """Hold back what endpoints cannot take now; returns the held rows' new state.

        Held deliveries go back to due ``HOLD_S`` later (or when a pause ends) and keep their
        attempt count: being paced is not a failed attempt.
        """
        endpoint_ids = {j.delivery.endpoint_id for j in batch.jobs if j.delivery.endpoint_id}
        if not endpoint_ids:
            return []
        limits = [
            row for row in map(endpoints.get, endpoint_ids) if row and (row.max_rate_per_s or row.max_concurrency)
        ]
        if not limits and not paused:
            return []
        rates = {row.id: row.max_rate_per_s for row in limits if row.max_rate_per_s}
        concurrency = {row.id: row.max_concurrency for row in limits if row.max_concurrency}
        held: list[tuple[Any, ...]] = []
        kept = []
        for job in batch.jobs:
            resume = paused.get(job.delivery.endpoint_id or "")
            if resume is None:
                kept.append(job)
            else:
                held.append(_hold(job.delivery, datetime.fromtimestamp(resume, UTC)))
        wanted = Counter(j.delivery.endpoint_id for j in kept if j.delivery.endpoint_id)
        admitted = self.pacing.admit_rate(Counter({e: n for e, n in wanted.items() if e in rates}), rates)
        later: Counter[str] = Counter()
        second = now.replace(microsecond=0)
        jobs: list[Job] = []
        for job in kept:
            endpoint_id = job.delivery.endpoint_id or ""
            if endpoint_id in admitted:
                if admitted[endpoint_id] > 0:
                    admitted[endpoint_id] -= 1
                else:
                    # Spread what waits over the next seconds at the endpoint's rate.
                    wait_s = 1 + later[endpoint_id] // rates[endpoint_id]
                    later[endpoint_id] += 1
                    held.append(_hold(job.delivery, second + timedelta(seconds=wait_s)))
                    continue
            jobs.append(job)
        if concurrency:
            wanted = Counter(e for j in jobs if (e := j.delivery.endpoint_id or "") in concurrency)
            slots = self.pacing.take_slots(wanted, concurrency, hold_s=self.settings.dispatch.lease_s)
            batch.slots = slots
            batch.gates = {e: asyncio.Semaphore(n) for e, n in slots.taken.items() if n > 0}
            full = {e for e, n in slots.taken.items() if n == 0}
            held += [_hold(j.delivery, now + timedelta(seconds=HOLD_S)) for j in jobs if j.delivery.endpoint_id in full]
            jobs = [j for j in jobs if j.delivery.endpoint_id not in full]
        batch.jobs = jobs
        return held

    # ------------------------------------------------------------------ send

    async def _send_all(self, batch: Batch) -> list[Result]:
        """Send every job concurrently; renew the lease (and slots) while a long batch runs."""
        gates = batch.gates or {}
        sends = asyncio.gather(*(self._send(job, gates.get(job.delivery.endpoint_id or "")) for job in batch.jobs))
        lease_s = self.settings.dispatch.lease_s
        # Renewed whenever less than two thirds of a lease is left: the claim's lease started
        # when the dispatcher published, and the message may have waited in the broker.
        wait_s = max(0.0, (batch.lease_until - utcnow()).total_seconds() - lease_s * 2 / 3)
        while True:
            done, _ = await asyncio.wait({sends}, timeout=wait_s)
            if done:
                return list(sends.result())
            batch.lease_until = self._renew(batch)
            wait_s = lease_s / 3

    def _renew(self, batch: Batch) -> datetime:
        """Extend the lease on the batch's rows that are still ours; returns the new lease."""
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.dispatch.lease_s)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(_DELIVERIES)
                    .where(
                        _DELIVERIES.c.id.in_([j.delivery.id for j in batch.jobs]),
                        _DELIVERIES.c.state == DeliveryState.sending,
                        _DELIVERIES.c.lease_until == batch.lease_until,
                    )
                    .values(lease_until=lease_until, updated_at=now)
                )
        except Exception:
            # Without a renewed lease the reconciler may hand the rows to another worker: a
            # duplicate send, never a lost one. Recording still checks the lease we hold.
            logger.exception("could not renew the lease of a batch still sending")
            return batch.lease_until
        if batch.slots is not None:
            batch.slots.renew(self.settings.dispatch.lease_s)
        return lease_until

    async def _send(self, job: Job, gate: asyncio.Semaphore | None = None) -> Result:
        if gate is not None:
            async with gate:
                return await self._send(job)
        started_at = utcnow()
        deliver_by = job.delivery.deliver_by
        if deliver_by is not None and deliver_by <= started_at:
            # Checked at take too; a send may then have waited for its endpoint's concurrency
            # gate, and no attempt may start once the deadline has passed.
            return Result(job, started_at, 0, None, None, expired=True)
        start = time.perf_counter()
        sent: Sent | None = None
        error: ChannelError | None = None
        try:
            message = job.message
            if isinstance(message, WebhookMessage):
                sent = await self.webhook.send(message)
            elif isinstance(message, EmailMessage):
                sent = await self.email.send(message)
            else:
                sent = await self.sms.send(message)
        except ChannelError as exc:
            error = exc
        except Exception as exc:  # a bug must not lose the delivery: retry it
            logger.exception("unexpected error sending delivery %s", job.delivery.id)
            error = TransientChannelError(f"internal error: {type(exc).__name__}")
        latency_ms = int((time.perf_counter() - start) * 1000)
        return Result(job, started_at, latency_ms, sent, error)

    # ------------------------------------------------------------------ record

    def _record(self, results: list[Result], lease_until: datetime, listening: set[str]) -> None:
        now = utcnow()
        attempts: list[tuple[Any, ...]] = []
        ended: list[tuple[Any, ...]] = []
        retried: list[tuple[Any, ...]] = []
        disable: set[str] = set()
        pauses: dict[str, float] = {}
        changes: list[tuple[Taken, str]] = []
        expired: list[tuple[Any, ...]] = []
        for result in results:
            delivery = result.job.delivery
            if result.expired:
                expired.append((*_finish(delivery, DeliveryState.expired, _LATE, now), lease_until))
                changes.append((delivery, DeliveryState.expired))
                continue
            error = result.error
            number = delivery.attempts + 1
            first = delivery.first_attempt_at or result.started_at
            decision = result.job.policy.decide(
                attempt=number, error=error, now=now, first_attempt_at=first, deliver_by=delivery.deliver_by,
                rng=self.rng,
            )  # fmt: skip
            status_code = result.sent.status_code if result.sent else error.status_code if error else None
            error_text = redact(error.message, limit=300) if error else None
            provider = result.sent.provider if result.sent else error.provider if error else None
            # Enum members hash and give their value in Python: the usual outcome skips both.
            outcome, state, reason = _DELIVERED if decision is DELIVERED else _outcome(decision)
            attempts.append(
                (delivery.id, number, result.started_at, result.latency_ms, status_code, outcome, error_text, reason,
                 provider)
            )  # fmt: skip
            values = (state, number, first, None, status_code, error_text, now)
            if decision.action is Action.retry:
                retried.append((*values, None, decision.due_at, delivery.id, lease_until))
            else:
                ended.append((*values, now, delivery.id, lease_until))
            changes.append((delivery, state))
            if isinstance(error, PermanentChannelError) and error.disable_endpoint and delivery.endpoint_id:
                disable.add(delivery.endpoint_id)
            if delivery.endpoint_id and isinstance(error, TransientChannelError) and error.status_code in (429, 503):
                wait_s = error.retry_after_s if error.retry_after_s is not None else 1.0
                pauses[delivery.endpoint_id] = max(pauses.get(delivery.endpoint_id, 0.0), wait_s)
        dialect = self.engine.dialect
        writes = [
            prepare_insert(dialect, Attempt, _ATTEMPT_COLUMNS, attempts),
            # Only where this worker still holds the lease: if the reconciler gave the row to
            # another worker meanwhile, that worker's outcome is the one that counts.
            *(
                prepare_update(
                    dialect,
                    Delivery,
                    columns,
                    rows,
                    where=("id", "lease_until"),
                    where_sql=f"state = '{DeliveryState.sending}'",
                )
                for columns, rows in ((_RECORD_COLUMNS, ended), (_RETRY_COLUMNS, retried), (_STATE_COLUMNS, expired))
            ),
        ]
        with self.engine.begin() as conn:
            run_writes(conn, writes)
            if disable:
                _disable_endpoints(conn, sorted(disable), now)
        self.pacing.pause(pauses)
        try:  # one round trip: the latency histogram and the live timelines' messages
            pipe = self.redis.pipeline(transaction=False)
            queue_latencies(
                pipe,
                prefix=self.prefix,
                observations=[
                    (r.job.delivery.lane, r.job.delivery.channel, r.latency_ms / 1000) for r in results if not r.expired
                ],
            )
            publish_states(pipe, prefix=self.prefix, changes=changes, listening=listening)
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not record attempt latencies nor publish state changes to live timelines")


def publish_states(
    pipe: redis.client.Pipeline, *, prefix: str, changes: Sequence[tuple[Taken, str]], listening: Collection[str]
) -> None:
    """Queue on ``pipe`` the news for live timelines (SSE streams in any API process) that
    deliveries changed state: one message per tenant holding the list of its changes, whatever
    the batch size, for the tenants in ``listening`` only (the take asked Redis which tenants a
    stream follows, ``live.subscribed``): nobody watching is the usual case, and hundreds of
    changes a batch would cost JSON and a large PUBLISH for no reader."""
    by_tenant: dict[str, list[tuple[Taken, str]]] = {}
    for delivery, state in changes:
        if delivery.subject and delivery.tenant_id in listening:
            by_tenant.setdefault(delivery.tenant_id, []).append((delivery, state))
    for tenant_id, items in by_tenant.items():
        messages = [live.delivery_message(d, state) for d, state in items]
        pipe.publish(keys.timeline(prefix, tenant_id), json.dumps(messages))


def _outcome(decision: RetryDecision) -> tuple[str, DeliveryState, str]:
    """What an attempt stores of ``decision`` (its action, reason) and the delivery's new state."""
    return decision.action.value, _STATES[decision.action], _reason_text(decision.reason)


@lru_cache(maxsize=1024)
def _reason_text(reason: str) -> str:
    """A decision's reason as stored on its attempt: redacted, cut to 300 characters. Most are
    the same few strings ("delivered"), and redacting is regular expressions on every one."""
    return redact(reason, limit=300)


_DELIVERED = _outcome(DELIVERED)


def _hold(delivery: Taken, due_at: datetime) -> tuple[Any, ...]:
    """A delivery back to due at ``due_at``, attempts untouched (values of ``_STATE_COLUMNS`` + id)."""
    return (DeliveryState.queued, due_at, None, None, None, utcnow(), delivery.id)


def _finish(delivery: Taken, state: DeliveryState, reason: str, now: datetime) -> tuple[Any, ...]:
    """A delivery ended before any attempt (values of ``_STATE_COLUMNS`` + id)."""
    return (state, None, None, reason, now, now, delivery.id)


def _disable_endpoints(conn: Connection, ids: list[str], now: datetime) -> None:
    conn.execute(
        update(_ENDPOINTS)
        .where(_ENDPOINTS.c.id.in_(ids))
        .values(enabled=False, disabled_reason="receiver answered 410 Gone", updated_at=now)
    )


_runtime: tuple[int, Runtime] | None = None


def runtime_for(settings: Settings, *, background: bool = False) -> Runtime:
    """This process's runtime, created on first use (after Celery forks its pool processes),
    when everything the process loaded is frozen out of the garbage collector's rounds: each
    webhook sent allocates a few dozen short-lived objects (see ``herald.heap``).

    ``background``: the worker serves only the bulk lane (see ``store.db.make_engine``)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        _runtime = (os.getpid(), Runtime(settings, background=background))
        heap.freeze_loaded()
    return _runtime[1]
