"""Schedule keys: list what is pending under a key prefix, cancel by key."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from sqlalchemy import select

from herald.api.deps import SessionDep, TenantDep
from herald.errors import ConflictError, NotFoundError
from herald.intake import cancel
from herald.store.models import Delivery, DeliveryState, Recipient, utcnow

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

KeyPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
PENDING = (DeliveryState.scheduled, DeliveryState.queued)


class ScheduledOut(BaseModel):
    schedule_key: str
    delivery_id: str
    event_id: str
    channel: str
    state: str
    due_at: datetime | None
    deliver_by: datetime | None
    recipient: str | None
    endpoint_id: str | None


class SchedulePage(BaseModel):
    data: list[ScheduledOut]
    next_cursor: str | None


class CanceledOut(BaseModel):
    schedule_key: str
    canceled: list[str]


@router.get("", response_model=SchedulePage)
def list_schedules(
    session: SessionDep,
    tenant: TenantDep,
    prefix: Annotated[str, Query(max_length=200, pattern=r"^[\x21-\x7e]*$")] = "",
    cursor: Annotated[str | None, Query(max_length=40, pattern=r"^[A-Za-z0-9_]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> SchedulePage:
    """Deliveries waiting under schedule keys that start with ``prefix``, by delivery id."""
    query = (
        select(Delivery, Recipient.external_id)
        .outerjoin(Recipient, Recipient.id == Delivery.recipient_id)
        .where(Delivery.tenant_id == tenant.id, Delivery.schedule_key.is_not(None))
        .where(Delivery.state.in_(PENDING), Delivery.lease_until.is_(None))
    )
    if prefix:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Delivery.schedule_key.like(f"{escaped}%", escape="\\"))
    if cursor:
        query = query.where(Delivery.id > cursor)
    rows = session.execute(query.order_by(Delivery.id).limit(limit + 1)).all()
    data = [
        ScheduledOut(
            schedule_key=d.schedule_key or "", delivery_id=d.id, event_id=d.event_id, channel=d.channel,
            state=d.state, due_at=d.due_at, deliver_by=d.deliver_by, recipient=ref, endpoint_id=d.endpoint_id,
        )
        for d, ref in rows[:limit]
    ]  # fmt: skip
    return SchedulePage(data=data, next_cursor=data[-1].delivery_id if len(rows) > limit else None)


@router.delete("/{key}", response_model=CanceledOut)
def cancel_schedule(key: KeyPath, session: SessionDep, tenant: TenantDep) -> CanceledOut:
    """Cancel what waits under ``key``. A key whose sends already went out answers 409 and
    changes nothing; an unknown key answers 404."""
    rows = session.execute(
        select(Delivery.id, Delivery.state, Delivery.lease_until)
        .where(Delivery.tenant_id == tenant.id, Delivery.schedule_key == key)
        .with_for_update()
    ).all()
    if not rows:
        raise NotFoundError(f"key: no such schedule key, got {key!r}", field="key")
    pending = [r.id for r in rows if r.state in PENDING and r.lease_until is None]
    if not pending:
        states = sorted({str(r.state) for r in rows})
        raise ConflictError(f"key: nothing pending to cancel (deliveries are {', '.join(states)})", field="key")
    cancel(session, pending, utcnow(), reason="canceled by schedule key")
    session.commit()
    return CanceledOut(schedule_key=key, canceled=sorted(pending))
