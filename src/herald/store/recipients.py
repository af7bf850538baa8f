"""Recipients: people with addresses, locale, time zone, preferences and quiet hours."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from herald.errors import NotFoundError
from herald.store.ids import new_id
from herald.store.models import TERMINAL_STATES, Delivery, DeliveryState, Recipient


def upsert_recipient(
    *, session: Session, tenant_id: str, external_id: str, fields: dict[str, Any], now: datetime
) -> tuple[Recipient, bool]:
    """Create or replace the recipient ``external_id``; returns it and whether it was created."""
    recipient = find_recipient(session=session, tenant_id=tenant_id, external_id=external_id)
    created = recipient is None
    if recipient is None:
        recipient = Recipient(id=new_id("rcp"), tenant_id=tenant_id, external_id=external_id, created_at=now)
        session.add(recipient)
    for name, value in fields.items():
        setattr(recipient, name, value)
    recipient.updated_at = now
    session.flush()
    return recipient, created


def find_recipient(*, session: Session, tenant_id: str, external_id: str) -> Recipient | None:
    return session.scalar(
        select(Recipient).where(Recipient.tenant_id == tenant_id, Recipient.external_id == external_id)
    )


def get_recipient(*, session: Session, tenant_id: str, external_id: str) -> Recipient:
    recipient = find_recipient(session=session, tenant_id=tenant_id, external_id=external_id)
    if recipient is None:
        raise NotFoundError(f"external_id: no such recipient, got {external_id!r}", field="external_id")
    return recipient


def recipients_by_external_id(*, session: Session, tenant_id: str, external_ids: Sequence[str]) -> dict[str, Recipient]:
    rows = session.scalars(
        select(Recipient).where(Recipient.tenant_id == tenant_id, Recipient.external_id.in_(list(external_ids)))
    ).all()
    return {r.external_id: r for r in rows}


def delete_recipient(*, session: Session, tenant_id: str, external_id: str, now: datetime) -> None:
    """Forget a person: pending deliveries to them are canceled and every stored address erased."""
    recipient = get_recipient(session=session, tenant_id=tenant_id, external_id=external_id)
    session.execute(
        update(Delivery)
        .where(Delivery.recipient_id == recipient.id, Delivery.state.not_in(list(TERMINAL_STATES)))
        .values(state=DeliveryState.canceled, due_at=None, lease_until=None, finished_at=now, updated_at=now,
                last_error="recipient deleted")
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    session.execute(
        update(Delivery)
        .where(Delivery.recipient_id == recipient.id)
        .values(address=None, content=None, recipient_id=None)
        .execution_options(synchronize_session=False)
    )
    session.delete(recipient)
