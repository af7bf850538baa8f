"""Events: accept one or a batch (202 after commit), read one back."""

from __future__ import annotations

from datetime import time
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import IntegrityError

from herald.api.deps import IdPath, SessionDep, TenantDep
from herald.api.schemas import BatchAccepted, BatchIn, DeliveryBrief, EventAccepted, EventIn, EventOut, RelativeIn
from herald.intake import IntakePolicy, NewEvent, accept_events
from herald.scheduler.times import Relative
from herald.store import queries
from herald.store.models import Tenant, utcnow

router = APIRouter(prefix="/v1/events", tags=["events"])


def _relative(value: RelativeIn | None) -> Relative | None:
    if value is None:
        return None
    at = time.fromisoformat(value.at) if value.at else None
    return Relative(field=value.field, offset_s=value.offset_s, days=value.days, at=at)


def new_event(event: EventIn) -> NewEvent:
    """The intake form of an API event (also used for stored recurring events)."""
    return NewEvent(
        type=event.type,
        subject=event.subject,
        data=event.data,
        lane=event.lane,
        endpoint_ids=event.endpoint_ids,
        idempotency_key=event.idempotency_key,
        recipients=event.recipients,
        channels=list(event.channels) if event.channels else None,
        category=event.category,
        send_at=event.send_at,
        send_relative=_relative(event.send_relative),
        deliver_by=event.deliver_by,
        deliver_by_relative=_relative(event.deliver_by_relative),
        schedule_key=event.schedule_key,
    )


def _accepted(request: Request, answer: dict[str, Any]) -> EventAccepted:
    return EventAccepted(**answer, status_url=_status_base(request) + answer["id"])


def _status_base(request: Request) -> str:
    """The status URL of an event, less its id (built once per request: url_for is not cheap)."""
    return str(request.url_for("read_event", event_id="_")).removesuffix("_")


def _accept(request: Request, session: SessionDep, tenant: Tenant, events: list[EventIn], prefix: str) -> list[Any]:
    new = [new_event(e) for e in events]
    policy: IntakePolicy = request.app.state.intake_policy
    try:
        answers = accept_events(
            session=session, tenant=tenant, events=new, now=utcnow(), field_prefix=prefix, policy=policy
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first: answer as it did.
        session.rollback()
        answers = accept_events(
            session=session, tenant=tenant, events=new, now=utcnow(), field_prefix=prefix, policy=policy
        )
        session.commit()
    request.app.state.wake()
    request.app.state.announce(tenant.id, answers)
    return answers


@router.post("", status_code=202, response_model=EventAccepted)
def create_event(body: EventIn, request: Request, session: SessionDep, tenant: TenantDep) -> EventAccepted:
    """Accept an event: its deliveries are committed before this answers, then sent by workers."""
    [answer] = _accept(request, session, tenant, [body], "")
    return _accepted(request, answer)


@router.post("/batch", status_code=202, response_model=BatchAccepted)
def create_events(body: BatchIn, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    """Accept up to 1,000 events in one transaction: all or none."""
    answers = _accept(request, session, tenant, body.events, "events.")
    base = _status_base(request)
    # Validated and serialised in one call rather than one model per event, then sent as is
    # (FastAPI would validate a returned model a second time).
    accepted = BatchAccepted.model_validate({"events": [{**a, "status_url": base + a["id"]} for a in answers]})
    return Response(accepted.model_dump_json(), status_code=202, media_type="application/json")


@router.get("/{event_id}", response_model=EventOut)
def read_event(event_id: IdPath, session: SessionDep, tenant: TenantDep) -> EventOut:
    event = queries.get_event(session=session, tenant_id=tenant.id, event_id=event_id)
    deliveries = queries.deliveries_of_event(session=session, event_id=event.id)
    return EventOut(
        id=event.id,
        type=event.type,
        subject=event.subject,
        lane=event.lane,
        data=event.data,
        created_at=event.created_at,
        deliveries=[
            DeliveryBrief(id=d.id, endpoint_id=d.endpoint_id, channel=d.channel, state=d.state) for d in deliveries
        ],
    )
