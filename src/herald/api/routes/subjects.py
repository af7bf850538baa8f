"""Subject timelines: a subject's events and their deliveries, as a list or a live SSE stream,
for tenants (API key) and for consumers (a signed link scoped to one subject)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from herald import keys
from herald.api.deps import SessionDep, TenantDep, get_tenant
from herald.links import LinkClaims, sign_link, verify_link
from herald.store.models import Delivery, Event, Recipient, utcnow

router = APIRouter(tags=["timelines"])

SubjectPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\s\x00-\x1f]+$")]
Token = Annotated[str, Query(min_length=10, max_length=1000)]
HEARTBEAT_S = 15.0


class TimelineDelivery(BaseModel):
    id: str
    channel: str
    state: str
    recipient: str | None
    updated_at: datetime


class TimelineEvent(BaseModel):
    id: str
    type: str
    created_at: datetime
    deliveries: list[TimelineDelivery]


class Timeline(BaseModel):
    subject: str
    events: list[TimelineEvent]


class LinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: int = Field(default=7 * 24 * 3600, ge=60, le=90 * 24 * 3600, strict=True)


class LinkOut(BaseModel):
    token: str
    expires_at: datetime
    timeline_url: str
    stream_url: str


def timeline(
    session: Session, tenant_id: str, subject: str, *, limit: int = 500, with_recipients: bool = True
) -> Timeline:
    """The subject's latest ``limit`` events, oldest first, each with its deliveries' states.

    Without ``with_recipients`` (a consumer's view) no delivery names its recipient: the tenant's
    ids for people may be addresses, and a subject's events may go to several people.
    """
    events = session.scalars(
        select(Event)
        .where(Event.tenant_id == tenant_id, Event.subject == subject)
        .order_by(Event.created_at.desc(), Event.id.desc())
        .limit(limit)
    ).all()[::-1]
    rows = session.execute(
        select(Delivery, Recipient.external_id)
        .outerjoin(Recipient, Recipient.id == Delivery.recipient_id)
        .where(Delivery.event_id.in_([e.id for e in events]))
        .order_by(Delivery.id)
    ).all()
    by_event: dict[str, list[TimelineDelivery]] = {}
    for delivery, external_id in rows:
        by_event.setdefault(delivery.event_id, []).append(
            TimelineDelivery(
                id=delivery.id,
                channel=delivery.channel,
                state=delivery.state,
                recipient=external_id if with_recipients else None,
                updated_at=delivery.updated_at,
            )
        )
    return Timeline(
        subject=subject,
        events=[
            TimelineEvent(id=e.id, type=e.type, created_at=e.created_at, deliveries=by_event.get(e.id, []))
            for e in events
        ],
    )


def stream(request: Request, tenant_id: str, subject: str) -> StreamingResponse:
    """Server-Sent Events: each new event and delivery state change of ``subject``, pushed within
    a second from whichever process caused it (Redis pub/sub), with heartbeats."""
    settings = request.app.state.settings
    channel = keys.timeline(settings.redis.key_prefix, tenant_id)

    async def events() -> AsyncIterator[str]:
        client = aioredis.Redis.from_url(settings.redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    if _heartbeat_due(request):
                        yield ": heartbeat\n\n"
                    continue
                # One change, or a list of them (a worker publishes a batch's changes at once).
                payload: dict[str, Any] | list[dict[str, Any]] = json.loads(message["data"])
                for change in payload if isinstance(payload, list) else [payload]:
                    if change.get("subject") == subject:
                        kind = change.pop("kind", "delivery")
                        yield f"event: {kind}\ndata: {json.dumps(change)}\n\n"
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


def _heartbeat_due(request: Request) -> bool:
    now = asyncio.get_running_loop().time()
    last = getattr(request.state, "last_heartbeat", 0.0)
    if now - last >= HEARTBEAT_S:
        request.state.last_heartbeat = now
        return True
    return False


@router.get("/v1/subjects/{subject}/timeline", response_model=Timeline)
def read_timeline(subject: SubjectPath, session: SessionDep, tenant: TenantDep) -> Timeline:
    return timeline(session, tenant.id, subject)


@router.get("/v1/subjects/{subject}/stream")
def stream_timeline(
    subject: SubjectPath, request: Request, authorization: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    # Authenticate in a session of its own: a stream lasts long, and must hold no database
    # transaction (on SQLite that would block every writer) while it does.
    with request.app.state.read_sessions() as session:
        tenant = get_tenant(session, authorization)
    return stream(request, tenant.id, subject)


@router.post("/v1/subjects/{subject}/links", status_code=201, response_model=LinkOut)
def create_link(subject: SubjectPath, request: Request, tenant: TenantDep, body: LinkIn | None = None) -> LinkOut:
    """A read-only link for a consumer to follow this subject without a tenant key."""
    expires_at = utcnow() + timedelta(seconds=(body or LinkIn()).ttl_s)
    token = sign_link(LinkClaims(tenant.id, subject, expires_at), key=request.app.state.link_key)
    return LinkOut(
        token=token,
        expires_at=expires_at,
        timeline_url=str(request.url_for("read_public_timeline").include_query_params(token=token)),
        stream_url=str(request.url_for("stream_public_timeline").include_query_params(token=token)),
    )


def _claims(request: Request, token: str) -> LinkClaims:
    return verify_link(token, key=request.app.state.link_key, now=utcnow())


@router.get("/v1/public/timeline", response_model=Timeline)
def read_public_timeline(token: Token, request: Request, session: SessionDep) -> Timeline:
    claims = _claims(request, token)
    return timeline(session, claims.tenant_id, claims.subject, with_recipients=False)


@router.get("/v1/public/stream")
def stream_public_timeline(token: Token, request: Request) -> StreamingResponse:
    claims = _claims(request, token)
    return stream(request, claims.tenant_id, claims.subject)
