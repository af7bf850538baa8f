"""One-click unsubscribe (RFC 8058) from the ``List-Unsubscribe`` link of non-critical mail.

``POST /v1/public/unsubscribe?token=…`` (a mail client sends ``List-Unsubscribe=One-Click``)
turns the recipient's preference for the token's category and channel off and cancels what is
still waiting to be sent to them in it. ``GET`` changes nothing (mail scanners follow links): it
shows a page whose button posts. The token, signed by ``herald.links``, is the only credential;
a bad, tampered or expired one is a 401 problem and changes nothing.
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import select

from herald.api.deps import SessionDep
from herald.errors import NotFoundError
from herald.intake import cancel
from herald.links import UnsubscribeClaims, verify_unsubscribe
from herald.store.models import Delivery, DeliveryState, Recipient, utcnow

router = APIRouter(prefix="/v1/public/unsubscribe", tags=["unsubscribe"])

Token = Annotated[str, Query(min_length=10, max_length=1000)]
PENDING = (DeliveryState.scheduled, DeliveryState.queued)


class UnsubscribeOut(BaseModel):
    category: str
    channel: str
    subscribed: bool
    canceled: int


def _claims(request: Request, token: str) -> UnsubscribeClaims:
    return verify_unsubscribe(token, key=request.app.state.link_key, now=utcnow())


@router.post("", response_model=UnsubscribeOut)
def unsubscribe(token: Token, request: Request, session: SessionDep) -> UnsubscribeOut:
    """Opt the token's recipient out of its category by its channel; repeating it is harmless."""
    claims = _claims(request, token)
    recipient = session.scalar(
        select(Recipient)
        .where(Recipient.tenant_id == claims.tenant_id, Recipient.id == claims.recipient_id)
        .with_for_update()
    )
    if recipient is None:
        raise NotFoundError("token: the recipient no longer exists", field="token")
    now = utcnow()
    preferences = dict(recipient.preferences or {})
    preferences[claims.category] = {**preferences.get(claims.category, {}), claims.channel: False}
    recipient.preferences = preferences  # a new dict: the JSON column sees the change
    recipient.updated_at = now
    canceled: list[str] = []
    if claims.category not in request.app.state.intake_policy.critical_categories:
        canceled = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.recipient_id == recipient.id,
                    Delivery.category == claims.category,
                    Delivery.channel == claims.channel,
                    Delivery.state.in_(PENDING),
                    Delivery.lease_until.is_(None),
                )
                .with_for_update()
            )
        )
        cancel(session, canceled, now, reason=f"recipient unsubscribed from {claims.category} by {claims.channel}")
    session.commit()
    return UnsubscribeOut(category=claims.category, channel=claims.channel, subscribed=False, canceled=len(canceled))


@router.get("", response_class=HTMLResponse)
def confirm_unsubscribe(token: Token, request: Request) -> HTMLResponse:
    """A page with one button that posts the one-click request; following the link changes nothing."""
    claims = _claims(request, token)
    what = html.escape(f"{claims.category} messages by {claims.channel}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>Unsubscribe</title></head>
<body><form method="post" action="?token={html.escape(token)}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<p>Stop receiving {what}?</p><button type="submit">Unsubscribe</button>
</form></body></html>
"""
    return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
