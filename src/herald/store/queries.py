"""Store operations. Keyword-only, session first; callers own the transaction."""

from __future__ import annotations

import hashlib
import hmac
import secrets as pysecrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from herald.errors import AuthError, ConflictError, NotFoundError
from herald.store.ids import new_id
from herald.store.models import (
    ApiKey,
    Attempt,
    Delivery,
    DeliveryState,
    Endpoint,
    EndpointSecret,
    Event,
    IdempotencyRecord,
    Tenant,
    utcnow,
)

OTP_CATEGORY = "otp"

# ---------------------------------------------------------------- tenants and keys

KEY_PREFIX = "hk"


def _hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_tenant(*, session: Session, name: str) -> Tenant:
    if session.scalar(select(Tenant.id).where(Tenant.name == name)):
        raise ConflictError(f"name: a tenant with this name exists, got {name!r}", field="name")
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(*, session: Session, ref: str) -> Tenant:
    """A tenant by id or by name."""
    tenant = session.scalar(select(Tenant).where(or_(Tenant.id == ref, Tenant.name == ref)))
    if tenant is None:
        raise NotFoundError(f"tenant: no such tenant, got {ref!r}", field="tenant")
    return tenant


def set_tenant_retry(*, session: Session, ref: str, max_attempts: int | None, retry_window_s: int | None) -> Tenant:
    """Override the tenant's retry attempts and/or window (None leaves that one as it is)."""
    tenant = get_tenant(session=session, ref=ref)
    if max_attempts is not None:
        tenant.retry_max_attempts = max_attempts
    if retry_window_s is not None:
        tenant.retry_window_s = retry_window_s
    session.flush()
    return tenant


def list_tenants(*, session: Session) -> Sequence[Tenant]:
    return session.scalars(select(Tenant).order_by(Tenant.created_at)).all()


def create_api_key(*, session: Session, tenant_id: str) -> tuple[ApiKey, str]:
    """A new key for the tenant; the plaintext is returned once and only its hash is stored."""
    prefix = pysecrets.token_hex(6)
    raw = f"{KEY_PREFIX}_{prefix}_{pysecrets.token_urlsafe(32)}"
    key = ApiKey(id=new_id("key"), tenant_id=tenant_id, prefix=prefix, key_hash=_hash_key(raw))
    session.add(key)
    session.flush()
    return key, raw


def list_api_keys(*, session: Session, tenant_id: str) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)).all()


def revoke_api_key(*, session: Session, prefix: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFoundError(f"key: no key with this prefix, got {prefix!r}", field="key")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def authenticate(*, session: Session, raw: str) -> Tenant:
    """The tenant of an API key: looked up by prefix, compared in constant time."""
    parts = raw.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise AuthError("authorization: malformed API key", field="authorization")
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    expected = key.key_hash if key is not None else "0" * 64
    if not hmac.compare_digest(expected, _hash_key(raw)) or key is None:
        raise AuthError("authorization: unknown API key", field="authorization")
    if key.revoked_at is not None:
        raise AuthError("authorization: API key revoked", field="authorization")
    tenant = session.get(Tenant, key.tenant_id)
    if tenant is None:
        raise AuthError("authorization: unknown API key", field="authorization")
    return tenant


# ---------------------------------------------------------------- endpoints


def get_endpoint(*, session: Session, tenant_id: str, endpoint_id: str) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFoundError(f"endpoint_id: no such endpoint, got {endpoint_id!r}", field="endpoint_id")
    return endpoint


def list_endpoints(*, session: Session, tenant_id: str, cursor: str | None, limit: int) -> Sequence[Endpoint]:
    query = select(Endpoint).where(Endpoint.tenant_id == tenant_id)
    return session.scalars(_page(query, Endpoint.id, cursor, limit)).all()


# Built once: every batch a worker takes reads its endpoints' secrets.
_ACTIVE_SECRETS = (
    select(EndpointSecret.endpoint_id, EndpointSecret.secret)
    .where(EndpointSecret.endpoint_id.in_(bindparam("endpoint_ids", expanding=True)))
    .where(or_(EndpointSecret.expires_at.is_(None), EndpointSecret.expires_at > bindparam("now")))
    .order_by(EndpointSecret.created_at.desc(), EndpointSecret.id.desc())
)


def active_secrets(
    *, session: Session | Connection, endpoint_ids: Sequence[str], now: datetime
) -> dict[str, list[str]]:
    """The signing secrets of each endpoint, newest first (rotated ones until their grace ends)."""
    rows = session.execute(_ACTIVE_SECRETS, {"endpoint_ids": list(endpoint_ids), "now": now}).all()
    out: dict[str, list[str]] = {}
    for endpoint_id, secret in rows:
        out.setdefault(endpoint_id, []).append(secret)
    return out


def add_secret(*, session: Session, endpoint_id: str, secret: str, grace_s: float) -> None:
    """Make ``secret`` current; the previous current secret keeps signing for ``grace_s``."""
    now = utcnow()
    session.execute(
        update(EndpointSecret)
        .where(EndpointSecret.endpoint_id == endpoint_id)
        .where(or_(EndpointSecret.expires_at.is_(None), EndpointSecret.expires_at > now + timedelta(seconds=grace_s)))
        .values(expires_at=now + timedelta(seconds=grace_s))
    )
    session.add(EndpointSecret(id=new_id("sec"), endpoint_id=endpoint_id, secret=secret, created_at=now))
    session.flush()


def matching_endpoints(*, session: Session, tenant_id: str, event_type: str) -> list[Endpoint]:
    endpoints = session.scalars(
        select(Endpoint).where(Endpoint.tenant_id == tenant_id, Endpoint.enabled.is_(True)).order_by(Endpoint.id)
    ).all()
    return [e for e in endpoints if type_matches(e.event_types, event_type)]


def type_matches(filters: Sequence[str] | None, event_type: str) -> bool:
    """``None`` matches everything; ``ticket.*`` matches ``ticket.escalated``."""
    if not filters:
        return True
    for pattern in filters:
        if pattern == event_type or (pattern.endswith(".*") and event_type.startswith(pattern[:-1])) or pattern == "*":
            return True
    return False


# ---------------------------------------------------------------- idempotency


def find_idempotent(*, session: Session, tenant_id: str, key: str, request_hash: str) -> dict[str, Any] | None:
    """The stored answer for ``key``, or None; a different body under the same key is a conflict."""
    record = session.get(IdempotencyRecord, (tenant_id, key))
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise ConflictError(
            f"idempotency_key: already used with a different request, got {key!r}", field="idempotency_key"
        )
    return record.response


def save_idempotent(*, session: Session, tenant_id: str, key: str, request_hash: str, response: dict[str, Any]) -> None:
    session.add(IdempotencyRecord(tenant_id=tenant_id, key=key, request_hash=request_hash, response=response))


# ---------------------------------------------------------------- reading deliveries


def get_event(*, session: Session, tenant_id: str, event_id: str) -> Event:
    event = session.get(Event, event_id)
    if event is None or event.tenant_id != tenant_id:
        raise NotFoundError(f"event_id: no such event, got {event_id!r}", field="event_id")
    return event


def deliveries_of_event(*, session: Session, event_id: str) -> Sequence[Delivery]:
    return session.scalars(select(Delivery).where(Delivery.event_id == event_id).order_by(Delivery.id)).all()


def get_delivery(*, session: Session, tenant_id: str, delivery_id: str) -> Delivery:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise NotFoundError(f"delivery_id: no such delivery, got {delivery_id!r}", field="delivery_id")
    return delivery


def attempts_of(*, session: Session, delivery_id: str) -> Sequence[Attempt]:
    return session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id).order_by(Attempt.number)).all()


@dataclass(frozen=True)
class DeliveryFilter:
    state: str | None = None
    subject: str | None = None
    endpoint_id: str | None = None
    event_type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    drop_id: str | None = None

    def apply(self, query: Any) -> Any:
        if self.state:
            query = query.where(Delivery.state == self.state)
        if self.subject:
            query = query.where(Delivery.subject == self.subject)
        if self.endpoint_id:
            query = query.where(Delivery.endpoint_id == self.endpoint_id)
        if self.event_type:
            query = query.where(Delivery.event_type == self.event_type)
        if self.created_after:
            query = query.where(Delivery.created_at >= self.created_after)
        if self.created_before:
            query = query.where(Delivery.created_at < self.created_before)
        if self.drop_id:
            query = query.where(Delivery.drop_id == self.drop_id)
        return query


def _page(query: Select[Any], id_column: Any, cursor: str | None, limit: int) -> Select[Any]:
    if cursor:
        query = query.where(id_column > cursor)
    return query.order_by(id_column).limit(limit)


def list_deliveries(
    *, session: Session, tenant_id: str, where: DeliveryFilter, cursor: str | None, limit: int
) -> Sequence[Delivery]:
    query = where.apply(select(Delivery).where(Delivery.tenant_id == tenant_id))
    return session.scalars(_page(query, Delivery.id, cursor, limit)).all()


# ---------------------------------------------------------------- dispatching


def lease_expiry(now: datetime, lease_s: float) -> datetime:
    """When a lease taken at ``now`` runs out; the value of ``lease_until`` a claim writes."""
    return now + timedelta(seconds=lease_s)


def claim_due(*, session: Session, lane: str, limit: int, lease_s: float, now: datetime) -> list[str]:
    """Take up to ``limit`` due deliveries of ``lane`` for sending: clear ``due_at``, state
    ``sending`` under a lease until ``lease_expiry(now, lease_s)``.

    The lease is the claim's token: the dispatcher puts it in the task message, and the worker
    sends only rows that still hold it (``sending`` and ``lease_until`` equal to it), so the claim
    is the one write before the outcome. On PostgreSQL concurrent dispatchers skip each other's
    locked rows.

    One statement, ``UPDATE … WHERE id IN (the due rows) RETURNING id``: a claim of thousands
    binds no ids. The ids come back in no particular order.
    """
    due = (
        select(Delivery.id)
        .where(Delivery.lane == lane, Delivery.due_at <= now)
        .order_by(Delivery.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(due.scalar_subquery()))
        .values(due_at=None, lease_until=lease_expiry(now, lease_s), state=DeliveryState.sending, updated_at=now)
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return list(claimed.scalars())


def release(*, session: Session, ids: Sequence[str], now: datetime) -> None:
    """Put claimed deliveries back to due (their Celery message could not be published)."""
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.sending)
        .values(due_at=now, lease_until=None, state=DeliveryState.queued)
        .execution_options(synchronize_session=False)
    )


def any_due(*, session: Session, lane: str, now: datetime) -> bool:
    """Whether ``lane`` has a delivery due now (one probe of the due index)."""
    due = select(Delivery.id).where(Delivery.lane == lane, Delivery.due_at <= now).limit(1)
    return session.scalar(due) is not None


def in_flight(*, session: Session, lane: str) -> int:
    """Deliveries of ``lane`` handed to the broker and not finished."""
    return (
        session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.lane == lane, Delivery.lease_until.is_not(None))
        )
        or 0
    )


def any_lease_expired(*, session: Session, now: datetime) -> bool:
    """Whether some dispatched delivery's lease has run out (one probe of the lease index)."""
    return session.scalar(select(Delivery.id).where(Delivery.lease_until < now).limit(1)) is not None


def reconcile(*, session: Session, now: datetime) -> int:
    """Return deliveries whose lease passed (message lost, worker killed) to due. Returns how many."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.lease_until < now)
        .where(Delivery.state.in_([DeliveryState.queued, DeliveryState.sending]))
        .values(due_at=now, lease_until=None, state=DeliveryState.queued, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def backlog(*, session: Session, now: datetime) -> dict[str, tuple[int, datetime | None]]:
    """Per lane: how many deliveries are due now, and when the oldest became due."""
    rows = session.execute(
        select(Delivery.lane, func.count(), func.min(Delivery.due_at))
        .where(Delivery.due_at <= now)
        .group_by(Delivery.lane)
    ).all()
    return {lane: (count, oldest) for lane, count, oldest in rows}


def state_counts(*, session: Session) -> list[tuple[str, str, str, int]]:
    """(state, lane, channel, count) over every delivery."""
    rows = session.execute(
        select(Delivery.state, Delivery.lane, Delivery.channel, func.count()).group_by(
            Delivery.state, Delivery.lane, Delivery.channel
        )
    ).all()
    return [(s, lane, c, n) for s, lane, c, n in rows]


# ---------------------------------------------------------------- dead letters


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: the ids re-sent, and for every id not re-sent, why."""

    replayed: list[str]
    skipped: dict[str, str]


# Replayable only with ``force``: the delivery is not dead, so re-sending it is a deliberate repeat.
_FORCE_STATES = frozenset({DeliveryState.delivered, DeliveryState.expired, DeliveryState.retrying})


def _skip_reason(state: str, category: str | None, deliver_by: datetime | None, *, force: bool, now: datetime) -> str:
    """Why a delivery is not replayed, or "" if it is."""
    if category == OTP_CATEGORY:
        # A one-time passcode is never sent again: its code is single-use and its deadline has passed.
        return "one-time passcodes are never replayed"
    if state in (DeliveryState.scheduled, DeliveryState.queued, DeliveryState.sending):
        return f"state {state}: still pending or in flight"
    if state != DeliveryState.dead and state not in _FORCE_STATES:
        return f"state {state}: never replayed"
    if state != DeliveryState.dead and not force:
        return f"state {state}: not dead; force re-sends it"
    if deliver_by is not None and deliver_by <= now and not force:
        return f"deliver_by {deliver_by.isoformat()} has passed; force sends it late"
    return ""


def replay_report(
    *,
    session: Session,
    tenant_id: str,
    ids: Sequence[str] | None,
    where: DeliveryFilter | None,
    force: bool,
    now: datetime,
) -> ReplayResult:
    """Re-send deliveries with their ids unchanged; ``skipped`` says why each other one was not.

    Without ``force`` only deliveries that are dead now and whose ``deliver_by`` (if any) is still
    ahead are replayed, keeping that deadline: a replayed reminder is never sent late, and replaying
    the same ids twice sends nothing the second time. ``force`` is the operator's explicit "send it
    again anyway": it also re-sends delivered, expired and retrying deliveries, and a deadline that
    has already passed is lifted (a deadline still ahead is kept). Deliveries that are scheduled or
    in flight, canceled or suppressed, and one-time passcodes are never replayed.
    """
    query = select(Delivery.id, Delivery.state, Delivery.category, Delivery.deliver_by).where(
        Delivery.tenant_id == tenant_id
    )
    if ids is not None:
        query = query.where(Delivery.id.in_(ids))
    else:
        # By filter, only what could be replayed is looked at: `skipped` stays about the request.
        allowed = {DeliveryState.dead, *(_FORCE_STATES if force else ())}
        query = query.where(Delivery.state.in_(list(allowed)))
    if where is not None:
        query = where.apply(query)
    found = {row.id: row for row in session.execute(query.with_for_update())}
    if ids is not None:
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError(f"ids: no such delivery, got {missing[0]!r}", field="ids")
    skipped: dict[str, str] = {}
    chosen: list[str] = []
    late: list[str] = []
    for delivery_id, row in sorted(found.items()):
        reason = _skip_reason(row.state, row.category, row.deliver_by, force=force, now=now)
        if reason:
            skipped[delivery_id] = reason
            continue
        chosen.append(delivery_id)
        if row.deliver_by is not None and row.deliver_by <= now:
            late.append(delivery_id)
    if chosen:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(chosen))
            .values(
                state=DeliveryState.queued,
                due_at=now,
                lease_until=None,
                attempts=0,
                first_attempt_at=None,
                finished_at=None,
                replays=Delivery.replays + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    if late:  # forced past its deadline: the operator chose a late send over none
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(late))
            .values(deliver_by=None)
            .execution_options(synchronize_session=False)
        )
    return ReplayResult(chosen, skipped)


def replay(
    *,
    session: Session,
    tenant_id: str,
    ids: Sequence[str] | None,
    where: DeliveryFilter | None,
    force: bool,
    now: datetime,
) -> tuple[list[str], list[str]]:
    """``replay_report`` as (replayed, skipped) ids, for callers that need no reasons."""
    result = replay_report(session=session, tenant_id=tenant_id, ids=ids, where=where, force=force, now=now)
    return result.replayed, sorted(result.skipped)


def disable_endpoints(*, session: Session, ids: Sequence[str], reason: str) -> None:
    if ids:
        session.execute(
            update(Endpoint)
            .where(Endpoint.id.in_(ids))
            .values(enabled=False, disabled_reason=reason, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
