"""Recipients: ``PUT`` creates or replaces a person, ``GET`` reads, ``DELETE`` forgets."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from herald import live
from herald.api.deps import SessionDep, TenantDep
from herald.api.schemas import TimeZone
from herald.errors import NotFoundError
from herald.logs import redact
from herald.store import recipients as store
from herald.store.models import TERMINAL_STATES, Channel, Delivery, DeliveryState, Recipient, utcnow

router = APIRouter(prefix="/v1/recipients", tags=["recipients"])

ExternalId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Category = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,60}$")]
_TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class QuietHours(BaseModel):
    """Local times ``HH:MM``; a window may cross midnight (``22:00`` to ``07:00``)."""

    model_config = ConfigDict(extra="forbid")
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _TIME.match(value):
            raise ValueError(f"expected HH:MM, got {value!r}")
        return value


class RecipientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: Annotated[str, StringConstraints(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None
    phone: Annotated[str, StringConstraints(pattern=r"^\+[1-9]\d{6,14}$")] | None = Field(
        default=None, description="E.164, e.g. +4915123456789"
    )
    locale: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")] | None = None
    timezone: TimeZone | None = None
    preferences: dict[Category, dict[Channel, StrictBool]] = Field(default_factory=dict, max_length=100)
    quiet_hours: QuietHours | None = None


class RecipientOut(BaseModel):
    external_id: str
    email: str | None
    phone: str | None
    locale: str | None
    timezone: str | None
    preferences: dict[str, dict[str, bool]]
    quiet_hours: QuietHours | None
    created_at: datetime
    updated_at: datetime


def _out(recipient: Recipient) -> RecipientOut:
    return RecipientOut(
        external_id=recipient.external_id,
        email=recipient.email,
        phone=recipient.phone,
        locale=recipient.locale,
        timezone=recipient.timezone,
        preferences=recipient.preferences or {},
        quiet_hours=QuietHours(**recipient.quiet_hours) if recipient.quiet_hours else None,
        created_at=recipient.created_at,
        updated_at=recipient.updated_at,
    )


def _find(session: Session, tenant_id: str, external_id: str) -> Recipient:
    """The recipient, or 404 with the id masked (a tenant's id for a person may be an address)."""
    recipient = store.find_recipient(session=session, tenant_id=tenant_id, external_id=external_id)
    if recipient is None:
        raise NotFoundError(f"external_id: no such recipient, got {redact(repr(external_id))}", field="external_id")
    return recipient


@router.put("/{external_id}", response_model=RecipientOut)
def put_recipient(
    external_id: ExternalId, body: RecipientIn, response: Response, session: SessionDep, tenant: TenantDep
) -> RecipientOut:
    """Create or replace a recipient (201 when created, 200 when replaced)."""
    fields = body.model_dump(mode="json")
    recipient, created = store.upsert_recipient(
        session=session, tenant_id=tenant.id, external_id=external_id, fields=fields, now=utcnow()
    )
    session.commit()
    response.status_code = 201 if created else 200
    return _out(recipient)


@router.get("/{external_id}", response_model=RecipientOut)
def read_recipient(external_id: ExternalId, session: SessionDep, tenant: TenantDep) -> RecipientOut:
    return _out(_find(session, tenant.id, external_id))


@router.delete("/{external_id}", status_code=204)
def delete_recipient(external_id: ExternalId, session: SessionDep, tenant: TenantDep) -> Response:
    """Forget the recipient: pending deliveries are canceled and stored addresses erased."""
    recipient = _find(session, tenant.id, external_id)
    # Locked, so the set canceled below is exactly the set live timelines are told about.
    pending = session.execute(
        select(Delivery.id, Delivery.tenant_id, Delivery.subject, Delivery.event_id, Delivery.channel)
        .where(Delivery.recipient_id == recipient.id, Delivery.state.not_in(list(TERMINAL_STATES)))
        .with_for_update()
    ).all()
    store.delete_recipient(session=session, tenant_id=tenant.id, external_id=external_id, now=utcnow())
    live.note_deliveries(session, pending, DeliveryState.canceled)
    session.commit()
    return Response(status_code=204)
