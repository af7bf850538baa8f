"""One-time passcodes: generate, send on the ``otp`` lane, verify once.

The database keeps only a salted, peppered HMAC of each code. The plaintext waits in Redis
for the code's lifetime, where the worker puts it into the message just before sending; a
delivery whose code is gone (expired, or Redis lost) is never sent, and OTP deliveries are never
replayed from the dead letters. Neither the code nor the address is ever logged.

Sends to one recipient are throttled per window, counted under a lock on the recipient's row so
that concurrent requests (in any API process) cannot both pass the last free place. A passcode's
event has the subject ``otp:<recipient's Herald id>``, never the tenant's id for the person
(which may be an address). Verification answers every failure alike.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from herald import keys, live
from herald.config import OtpSettings
from herald.content.lookup import locale_chain
from herald.content.render import RenderError, render_message
from herald.errors import NotFoundError, OtpError, RateLimitedError, ValidationError
from herald.logs import redact
from herald.store.ids import new_id
from herald.store.models import (
    Channel,
    Delivery,
    DeliveryState,
    Event,
    Lane,
    OtpCode,
    Recipient,
    Template,
    Tenant,
)
from herald.store.queries import OTP_CATEGORY
from herald.store.recipients import find_recipient
from herald.worker.delivery import OTP_MARKER

DEFAULT_TEXT = "Your {purpose} code is {code}. It expires in {minutes} minutes. Never share it."
# Every failed verification says this, whatever the reason: no hint for someone guessing.
NOT_ACCEPTED = "code: not accepted (wrong, expired, already used or too many attempts); request a new passcode"


@dataclass(frozen=True)
class OtpSent:
    id: str
    delivery_id: str
    event_id: str
    subject: str
    channel: str
    expires_at: datetime


def code_hash(*, pepper: str, otp_id: str, code: str) -> str:
    return hmac.new(f"{pepper}:{otp_id}".encode(), code.encode(), hashlib.sha256).hexdigest()


def request_otp(
    *,
    session: Session,
    client: redis.Redis,
    prefix: str,
    settings: OtpSettings,
    tenant: Tenant,
    recipient_ref: str,
    channel: str,
    purpose: str,
    now: datetime,
) -> OtpSent:
    """Create a passcode for a recipient and its delivery on the ``otp`` lane (not committed).

    Holds a lock on the recipient's row until the caller's transaction ends (the throttle).
    """
    recipient = find_recipient(session=session, tenant_id=tenant.id, external_id=recipient_ref)
    if recipient is None:
        raise NotFoundError(f"recipient: no such recipient, got {redact(repr(recipient_ref))}", field="recipient")
    address = recipient.email if channel == Channel.email else recipient.phone
    if not address:
        kind = "email address" if channel == Channel.email else "phone number"
        raise ValidationError(f"channel: recipient has no {kind} for {channel}", field="channel")
    content = _content(session, tenant.id, channel, recipient.locale, purpose, settings)
    _throttle(session, tenant.id, recipient.id, settings, now)
    code = f"{secrets.randbelow(10**settings.length):0{settings.length}d}"
    otp_id = new_id("otp")
    event_id = new_id("evt")
    delivery_id = new_id("dlv")
    subject = f"otp:{recipient.id}"
    expires_at = now + timedelta(seconds=settings.ttl_s)
    # The code goes to Redis before the rows are committed: if the commit fails the key just expires.
    client.set(keys.otp_code(prefix, delivery_id), code, ex=settings.ttl_s)
    session.execute(
        insert(Event),
        [{"id": event_id, "tenant_id": tenant.id, "type": f"otp.{purpose}", "subject": subject,
          "data": {"purpose": purpose, "channel": channel}, "lane": Lane.otp, "created_at": now}],
    )  # fmt: skip
    session.execute(
        insert(Delivery),
        [
            {
                "id": delivery_id,
                "tenant_id": tenant.id,
                "event_id": event_id,
                "channel": channel,
                "lane": Lane.otp,
                "state": DeliveryState.queued,
                "event_type": f"otp.{purpose}",
                "subject": subject,
                "attempts": 0,
                "due_at": now,
                "deliver_by": expires_at,
                "replays": 0,
                "recipient_id": recipient.id,
                "address": address,
                "content": content,
                "category": OTP_CATEGORY,
                "created_at": now,
                "updated_at": now,
            }
        ],
    )
    session.add(
        OtpCode(
            id=otp_id,
            tenant_id=tenant.id,
            recipient_id=recipient.id,
            channel=channel,
            purpose=purpose,
            code_hash=code_hash(pepper=settings.pepper.get_secret_value(), otp_id=otp_id, code=code),
            expires_at=expires_at,
            attempts=0,
            max_attempts=settings.max_attempts,
            delivery_id=delivery_id,
            created_at=now,
        )
    )
    live.note_event(session, tenant_id=tenant.id, subject=subject, event_id=event_id, type=f"otp.{purpose}")
    return OtpSent(
        id=otp_id, delivery_id=delivery_id, event_id=event_id, subject=subject, channel=channel, expires_at=expires_at
    )


def _throttle(session: Session, tenant_id: str, recipient_id: str, settings: OtpSettings, now: datetime) -> None:
    """RateLimitedError if the recipient had ``sends_per_window`` passcodes in the last window.

    The count happens under a lock on the recipient's row (``FOR UPDATE`` on PostgreSQL; SQLite
    transactions are serialised by ``BEGIN IMMEDIATE``), held until commit, so two concurrent
    requests cannot both see the last free place.
    """
    session.execute(select(Recipient.id).where(Recipient.id == recipient_id).with_for_update()).one()
    since = now - timedelta(seconds=settings.window_s)
    recent = session.scalars(
        select(OtpCode.created_at)
        .where(OtpCode.tenant_id == tenant_id, OtpCode.recipient_id == recipient_id, OtpCode.created_at > since)
        .order_by(OtpCode.created_at)
    ).all()
    if len(recent) >= settings.sends_per_window:
        wait_s = int((recent[0] + timedelta(seconds=settings.window_s) - now).total_seconds()) + 1
        raise RateLimitedError(
            f"recipient: at most {settings.sends_per_window} passcodes per {settings.window_s}s",
            field="recipient",
            retry_after_s=wait_s,
        )


def _content(
    session: Session, tenant_id: str, channel: str, locale: str | None, purpose: str, settings: OtpSettings
) -> dict[str, Any]:
    """The message with ``OTP_MARKER`` where the code goes: a tenant's ``otp.<purpose>`` or ``otp``
    template in the recipient's locale chain, else a plain default."""
    rows = session.scalars(
        select(Template).where(
            Template.tenant_id == tenant_id,
            Template.channel == channel,
            Template.event_type.in_([f"otp.{purpose}", "otp"]),
        )
    ).all()
    by_key = {(t.event_type, t.locale): t for t in rows}
    context = {"code": OTP_MARKER, "purpose": purpose, "minutes": settings.ttl_s // 60}
    for event_type in (f"otp.{purpose}", "otp"):
        for name in locale_chain(locale):
            template = by_key.get((event_type, name))
            if template is not None:
                parts = {"channel": channel, "subject": template.subject, "text": template.text,
                         "html": template.html, "body": None}  # fmt: skip
                try:
                    return dict(render_message(parts, context))
                except RenderError as exc:
                    raise ValidationError(f"purpose: otp template failed: {exc.message}", field="purpose") from None
    text = DEFAULT_TEXT.format(purpose=purpose, code=OTP_MARKER, minutes=settings.ttl_s // 60)
    if channel == Channel.email:
        return {"subject": f"Your {purpose} code", "text": text, "html": None}
    return {"text": text}


def verify_otp(
    *,
    session: Session,
    settings: OtpSettings,
    tenant: Tenant,
    recipient_ref: str,
    purpose: str,
    code: str,
    now: datetime,
) -> str:
    """Check ``code`` against the recipient's newest passcode for ``purpose``; single use.

    Returns the passcode id. Wrong codes count against the passcode's attempts. Every failure
    (unknown recipient, no passcode, used, expired, locked after too many attempts, wrong code)
    raises the same ``OtpError(NOT_ACCEPTED)``, and the code is always compared in constant time.
    """
    recipient = find_recipient(session=session, tenant_id=tenant.id, external_id=recipient_ref)
    otp = None
    if recipient is not None:
        otp = session.scalar(
            select(OtpCode)
            .where(OtpCode.tenant_id == tenant.id, OtpCode.recipient_id == recipient.id, OtpCode.purpose == purpose)
            .order_by(OtpCode.created_at.desc(), OtpCode.id.desc())
            .limit(1)
            .with_for_update()
        )
    pepper = settings.pepper.get_secret_value()
    candidate = code_hash(pepper=pepper, otp_id=otp.id if otp else "none", code=code)
    matches = hmac.compare_digest(candidate, otp.code_hash if otp else "0" * 64)
    if otp is None or otp.consumed_at is not None or otp.expires_at <= now:
        raise OtpError(NOT_ACCEPTED, field="code")
    if otp.attempts >= otp.max_attempts:
        raise OtpError(NOT_ACCEPTED, field="code")
    if not matches:
        otp.attempts += 1
        raise OtpError(NOT_ACCEPTED, field="code")
    otp.consumed_at = now
    return otp.id
