"""Delivering a batch: take the rows, send concurrently, record every outcome in one write.

One ``Runtime`` per worker process holds the database engine, the Redis client, one asyncio
loop and one webhook channel (one aiohttp session), all reused across tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from herald import keys
from herald.channels.base import EmailMessage, Sent, SmsMessage, WebhookMessage
from herald.channels.email import EmailChannel
from herald.channels.sms import SmsChannel
from herald.channels.webhook import WebhookChannel
from herald.config import Settings
from herald.errors import ChannelError, PermanentChannelError, TransientChannelError
from herald.logs import redact
from herald.metrics import record_latencies
from herald.store import queries
from herald.store.db import make_engine, make_sessionmaker
from herald.store.models import Attempt, Channel, Delivery, DeliveryState, Endpoint, Event, Tenant, utcnow
from herald.worker.retry import Action, RetryPolicy

logger = logging.getLogger(__name__)


Message = WebhookMessage | EmailMessage | SmsMessage

# The longest an endpoint is paused for one 429/503 answer, whatever its Retry-After says.
MAX_PAUSE_S = 300.0

# Where a one-time passcode stands in rendered content: the code itself is never written to the
# database; it waits in Redis (see herald.otp) and is put in place just before sending.
OTP_MARKER = "__HERALD_OTP_CODE__"


@dataclass
class Job:
    delivery: Delivery
    policy: RetryPolicy
    message: Message
    max_concurrency: int | None = None


@dataclass
class Result:
    job: Job
    started_at: datetime
    latency_ms: int
    sent: Sent | None
    error: ChannelError | None


def webhook_body(event: Event, content: dict[str, Any] | None = None) -> bytes:
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


def otp_key(prefix: str, delivery_id: str) -> str:
    return keys.otp_code(prefix, delivery_id)


class Runtime:
    """Per-process delivery machinery."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url, pool_size=2)
        self.sessions = make_sessionmaker(self.engine)
        self.redis: redis.Redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
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
            self.redis.rpush(keys.wake(self.settings.redis.key_prefix), 1)
        except redis.RedisError:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")

    def deliver(self, ids: list[str]) -> None:
        """Send the deliveries ``ids`` that are still ours to send; record what happened."""
        jobs = self._take(ids)
        if not jobs:
            return
        results = self.loop.run_until_complete(self._send_all(jobs))
        self._record(results)

    async def _send_all(self, jobs: list[Job]) -> list[Result]:
        limits = {j.delivery.endpoint_id: j.max_concurrency for j in jobs if j.max_concurrency}
        gates = {endpoint_id: asyncio.Semaphore(n) for endpoint_id, n in limits.items() if endpoint_id}
        return list(await asyncio.gather(*(self._send(job, gates.get(job.delivery.endpoint_id or "")) for job in jobs)))

    def _take(self, ids: list[str]) -> list[Job]:
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.dispatch.lease_s)
        with self.sessions() as session, session.begin():
            # Only rows the dispatcher handed out (queued, no due_at) are taken: a duplicate
            # message for rows that are already sending, finished or due again finds nothing.
            taken = list(
                session.scalars(
                    update(Delivery)
                    .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.queued, Delivery.due_at.is_(None))
                    .values(state=DeliveryState.sending, lease_until=lease_until, updated_at=now)
                    .returning(Delivery.id)
                    .execution_options(synchronize_session=False)
                )
            )
            if not taken:
                return []
            rows = session.execute(
                select(Delivery, Event, Endpoint, Tenant)
                .join(Event, Event.id == Delivery.event_id)
                .join(Tenant, Tenant.id == Delivery.tenant_id)
                .outerjoin(Endpoint, Endpoint.id == Delivery.endpoint_id)
                .where(Delivery.id.in_(taken))
            ).all()
            secrets = queries.active_secrets(
                session=session, endpoint_ids=list({e.id for _, _, e, _ in rows if e is not None}), now=now
            )
            jobs: list[Job] = []
            finished: list[dict[str, Any]] = []
            for delivery, event, endpoint, tenant in rows:
                if delivery.deliver_by is not None and delivery.deliver_by <= now:
                    finished.append(_finish(delivery, DeliveryState.expired, "deliver_by passed before sending", now))
                    continue
                message, problem = self._message(delivery, event, endpoint, secrets)
                if message is None:
                    finished.append(_finish(delivery, DeliveryState.dead, problem, now))
                    continue
                policy = RetryPolicy.from_settings(
                    self.settings.retry, max_attempts=tenant.retry_max_attempts, window_s=tenant.retry_window_s
                )
                jobs.append(Job(delivery, policy, message, endpoint.max_concurrency if endpoint else None))
            jobs = self._rate_limit(session, self._respect_pauses(session, jobs, now), rows, now)
            if finished:
                session.execute(update(Delivery), finished)
        return jobs

    def _publish(self, changes: list[tuple[Delivery, str]]) -> None:
        try:
            publish_states(self.redis, prefix=self.settings.redis.key_prefix, changes=changes)
        except redis.RedisError:
            logger.warning("could not publish state changes to live timelines")

    def _message(
        self, delivery: Delivery, event: Event, endpoint: Endpoint | None, secrets: dict[str, list[str]]
    ) -> tuple[Message | None, str]:
        """The message to send for ``delivery``, or None and why it cannot be sent."""
        content = delivery.content or {}
        if delivery.channel == Channel.webhook:
            if endpoint is None or not endpoint.enabled:
                return None, "endpoint disabled or deleted"
            return WebhookMessage(
                delivery_id=delivery.id,
                url=endpoint.url,
                secrets=secrets.get(endpoint.id, []),
                body=webhook_body(event, delivery.content),
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
        raw = self.redis.get(otp_key(self.settings.redis.key_prefix, delivery_id))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def _respect_pauses(self, session: Session, jobs: list[Job], now: datetime) -> list[Job]:
        """Hold back deliveries to endpoints that recently answered 429/503 until the pause ends.

        The pause lives in Redis, so every worker slows down for a struggling receiver, not only
        the one that got the answer; held deliveries keep their attempt count.
        """
        endpoint_ids = sorted({j.delivery.endpoint_id for j in jobs if j.delivery.endpoint_id})
        if not endpoint_ids:
            return jobs
        prefix = self.settings.redis.key_prefix
        try:
            raw = self.redis.mget([keys.pause(prefix, e) for e in endpoint_ids])
        except redis.RedisError:
            return jobs
        until = {e: float(v) for e, v in zip(endpoint_ids, raw, strict=True) if v is not None}
        paused = {e: t for e, t in until.items() if t > now.timestamp()}
        if not paused:
            return jobs
        kept: list[Job] = []
        held: list[dict[str, Any]] = []
        for job in jobs:
            resume = paused.get(job.delivery.endpoint_id or "")
            if resume is None:
                kept.append(job)
            else:
                due = datetime.fromtimestamp(resume, now.tzinfo)
                held.append({"id": job.delivery.id, "state": DeliveryState.queued, "due_at": due, "lease_until": None})
        session.execute(update(Delivery), held)
        return kept

    def _pause(self, results: list[Result]) -> None:
        """Start (or extend) an endpoint's pause after it answered 429 or 503."""
        pauses: dict[str, float] = {}
        for result in results:
            error = result.error
            endpoint_id = result.job.delivery.endpoint_id
            if endpoint_id and isinstance(error, TransientChannelError) and error.status_code in (429, 503):
                wait_s = min(max(error.retry_after_s or 1.0, 0.1), MAX_PAUSE_S)
                pauses[endpoint_id] = max(pauses.get(endpoint_id, 0.0), wait_s)
        if not pauses:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for endpoint_id, wait_s in pauses.items():
                pipe.set(keys.pause(self.settings.redis.key_prefix, endpoint_id), time.time() + wait_s,
                         px=int(wait_s * 1000))  # fmt: skip
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not record an endpoint pause")

    def _rate_limit(self, session: Session, jobs: list[Job], rows: Any, now: datetime) -> list[Job]:
        """Hold back what would exceed an endpoint's ``max_rate_per_s`` this second."""
        limits = {e.id: e.max_rate_per_s for _, _, e, _ in rows if e is not None and e.max_rate_per_s}
        if not limits:
            return jobs
        wanted: Counter[str] = Counter(
            e for e in (j.delivery.endpoint_id for j in jobs) if e is not None and e in limits
        )
        second = int(time.time())
        allowed: dict[str, int] = {}
        try:
            pipe = self.redis.pipeline(transaction=False)
            for endpoint_id, count in wanted.items():
                key = keys.rate(self.settings.redis.key_prefix, endpoint_id, second)
                pipe.incrby(key, count)
                pipe.expire(key, 5)
            totals = pipe.execute()[0::2]
            for (endpoint_id, count), total in zip(wanted.items(), totals, strict=True):
                allowed[endpoint_id] = max(0, limits[endpoint_id] - (int(total) - count))
        except redis.RedisError:
            return jobs  # Without Redis we cannot count; sending beats stalling.
        kept: list[Job] = []
        deferred: list[dict[str, Any]] = []
        held: Counter[str] = Counter()
        for job in jobs:
            endpoint_id = job.delivery.endpoint_id or ""
            if endpoint_id in allowed:
                if allowed[endpoint_id] > 0:
                    allowed[endpoint_id] -= 1
                else:
                    wait_s = 1 + held[endpoint_id] // limits[endpoint_id]
                    held[endpoint_id] += 1
                    deferred.append(
                        {
                            "id": job.delivery.id,
                            "state": DeliveryState.queued,
                            "due_at": now.replace(microsecond=0) + timedelta(seconds=wait_s),
                            "lease_until": None,
                        }
                    )
                    continue
            kept.append(job)
        if deferred:
            session.execute(update(Delivery), deferred)
        return kept

    async def _send(self, job: Job, gate: asyncio.Semaphore | None = None) -> Result:
        if gate is not None:
            async with gate:
                return await self._send(job)
        started_at = utcnow()
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

    def _record(self, results: list[Result]) -> None:
        now = utcnow()
        attempts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        disable: list[str] = []
        for result in results:
            delivery = result.job.delivery
            number = delivery.attempts + 1
            first = delivery.first_attempt_at or result.started_at
            decision = result.job.policy.decide(
                attempt=number,
                error=result.error,
                now=now,
                first_attempt_at=first,
                deliver_by=delivery.deliver_by,
                rng=self.rng,
            )
            status_code = result.sent.status_code if result.sent else result.error.status_code if result.error else None
            error_text = redact(result.error.message, limit=300) if result.error else None
            attempts.append(
                {
                    "delivery_id": delivery.id,
                    "number": number,
                    "started_at": result.started_at,
                    "latency_ms": result.latency_ms,
                    "status_code": status_code,
                    "outcome": decision.action.value,
                    "error": error_text,
                    "decision": redact(decision.reason, limit=300),
                    "provider": (
                        result.sent.provider if result.sent else result.error.provider if result.error else None
                    ),
                }
            )
            state = {
                Action.delivered: DeliveryState.delivered,
                Action.retry: DeliveryState.retrying,
                Action.dead: DeliveryState.dead,
                Action.expired: DeliveryState.expired,
            }[decision.action]
            updates.append(
                {
                    "id": delivery.id,
                    "state": state,
                    "attempts": number,
                    "first_attempt_at": first,
                    "due_at": decision.due_at,
                    "lease_until": None,
                    "last_status_code": status_code,
                    "last_error": error_text,
                    "updated_at": now,
                    "finished_at": None if decision.action is Action.retry else now,
                }
            )
            if isinstance(result.error, PermanentChannelError) and result.error.disable_endpoint:
                disable.append(delivery.endpoint_id or "")
        with self.sessions() as session, session.begin():
            session.execute(insert(Attempt), attempts)
            session.execute(update(Delivery), updates)
            queries.disable_endpoints(
                session=session, ids=[i for i in disable if i], reason="receiver answered 410 Gone"
            )
        self._pause(results)
        self._publish([(r.job.delivery, u["state"]) for r, u in zip(results, updates, strict=True)])
        try:
            record_latencies(
                self.redis,
                prefix=self.settings.redis.key_prefix,
                observations=[(r.job.delivery.lane, r.job.delivery.channel, r.latency_ms / 1000) for r in results],
            )
        except redis.RedisError:
            logger.warning("could not record attempt latencies")


def publish_states(client: redis.Redis, *, prefix: str, changes: list[tuple[Delivery, str]]) -> None:
    """Tell live timelines (SSE streams in any API process) that deliveries changed state."""
    pipe = client.pipeline(transaction=False)
    for delivery, state in changes:
        if delivery.subject:
            payload = {"kind": "delivery", "subject": delivery.subject, "delivery_id": delivery.id,
                       "event_id": delivery.event_id, "channel": delivery.channel, "state": str(state)}  # fmt: skip
            pipe.publish(keys.timeline(prefix, delivery.tenant_id), json.dumps(payload))
    pipe.execute()


def _finish(delivery: Delivery, state: DeliveryState, reason: str, now: datetime) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "state": state,
        "lease_until": None,
        "due_at": None,
        "last_error": reason,
        "updated_at": now,
        "finished_at": now,
    }


_runtime: tuple[int, Runtime] | None = None


def runtime_for(settings: Settings) -> Runtime:
    """This process's runtime, created on first use (after Celery forks its pool processes)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        _runtime = (os.getpid(), Runtime(settings))
    return _runtime[1]
