"""Recurring sends: a cron expression in a time zone and the event to emit at each occurrence."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from sqlalchemy import select

from herald.api.deps import SessionDep, TenantDep
from herald.api.schemas import EventIn, TimeZone
from herald.errors import NotFoundError, ValidationError
from herald.scheduler.times import next_fire, validate_cron
from herald.store.ids import new_id
from herald.store.models import Recurring, utcnow

router = APIRouter(prefix="/v1/recurring", tags=["recurring"])

RecurringId = Annotated[str, Path(max_length=40, pattern=r"^[A-Za-z0-9_]+$")]


class RecurringEvent(EventIn):
    """The event emitted at each occurrence; its idempotency key is set by Herald."""

    @field_validator("idempotency_key", "send_at", "deliver_by", "schedule_key")
    @classmethod
    def _not_for_recurring(cls, value: object) -> object:
        if value is not None:
            raise ValueError("not allowed on a recurring event")
        return value


class RecurringIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    cron: Annotated[str, StringConstraints(min_length=1, max_length=120)]
    timezone: TimeZone = "UTC"
    event: RecurringEvent


class RecurringOut(BaseModel):
    id: str
    name: str
    cron: str
    timezone: str
    event: dict[str, object]
    enabled: bool
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    created_at: datetime


def _out(row: Recurring) -> RecurringOut:
    return RecurringOut(
        id=row.id, name=row.name, cron=row.cron, timezone=row.timezone, event=row.event, enabled=row.enabled,
        next_fire_at=row.next_fire_at, last_fired_at=row.last_fired_at, created_at=row.created_at,
    )  # fmt: skip


def _get(session: SessionDep, tenant_id: str, recurring_id: str) -> Recurring:
    row = session.get(Recurring, recurring_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFoundError(f"recurring_id: no such recurring send, got {recurring_id!r}", field="recurring_id")
    return row


@router.post("", status_code=201, response_model=RecurringOut)
def create_recurring(body: RecurringIn, session: SessionDep, tenant: TenantDep) -> RecurringOut:
    cron = validate_cron(body.cron)
    now = utcnow()
    if body.event.endpoint_ids is None and not body.event.recipients:
        raise ValidationError("event: name endpoint_ids or recipients for a recurring send", field="event")
    row = Recurring(
        id=new_id("rec"),
        tenant_id=tenant.id,
        name=body.name,
        cron=cron,
        timezone=body.timezone,
        event=body.event.model_dump(mode="json", exclude_none=True),
        enabled=True,
        next_fire_at=next_fire(cron, ZoneInfo(body.timezone), now),
        created_at=now,
    )
    session.add(row)
    session.commit()
    return _out(row)


@router.get("", response_model=list[RecurringOut])
def list_recurring(session: SessionDep, tenant: TenantDep) -> list[RecurringOut]:
    rows = session.scalars(select(Recurring).where(Recurring.tenant_id == tenant.id).order_by(Recurring.id)).all()
    return [_out(r) for r in rows]


@router.get("/{recurring_id}", response_model=RecurringOut)
def read_recurring(recurring_id: RecurringId, session: SessionDep, tenant: TenantDep) -> RecurringOut:
    return _out(_get(session, tenant.id, recurring_id))


@router.delete("/{recurring_id}", status_code=204)
def delete_recurring(recurring_id: RecurringId, session: SessionDep, tenant: TenantDep) -> Response:
    session.delete(_get(session, tenant.id, recurring_id))
    session.commit()
    return Response(status_code=204)
