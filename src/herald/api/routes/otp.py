"""One-time passcodes: request one (sent on the ``otp`` lane), verify it once."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StringConstraints

from herald.api.deps import SessionDep, TenantDep
from herald.errors import OtpError
from herald.otp import request_otp, verify_otp
from herald.store.models import utcnow

router = APIRouter(prefix="/v1/otp", tags=["otp"])

RecipientRef = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Purpose = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,40}$")]


class OtpIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipient: RecipientRef
    channel: Literal["sms", "email"]
    purpose: Purpose = "login"


class OtpOut(BaseModel):
    """``subject`` is the passcode's timeline (``otp:<recipient's Herald id>``), never an address."""

    id: str
    delivery_id: str
    subject: str
    channel: str
    expires_at: datetime


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipient: RecipientRef
    purpose: Purpose = "login"
    code: Annotated[str, StringConstraints(pattern=r"^[0-9]{4,10}$")]


class VerifyOut(BaseModel):
    id: str
    valid: bool


@router.post("", status_code=202, response_model=OtpOut)
def create_otp(body: OtpIn, request: Request, session: SessionDep, tenant: TenantDep) -> OtpOut:
    """Send a new passcode; answers once its delivery is committed (the code is never returned).

    429 when the recipient had too many passcodes in the throttling window (``Retry-After``).
    """
    settings = request.app.state.settings
    sent = request_otp(
        session=session,
        client=request.app.state.redis,
        prefix=settings.redis.key_prefix,
        settings=settings.otp,
        tenant=tenant,
        recipient_ref=body.recipient,
        channel=body.channel,
        purpose=body.purpose,
        now=utcnow(),
    )
    session.commit()
    request.app.state.wake()
    return OtpOut(
        id=sent.id, delivery_id=sent.delivery_id, subject=sent.subject, channel=sent.channel, expires_at=sent.expires_at
    )


@router.post("/verify", response_model=VerifyOut)
def check_otp(body: VerifyIn, request: Request, session: SessionDep, tenant: TenantDep) -> VerifyOut:
    """Accept the code once; wrong codes count against the passcode's attempts. Every failure is
    the same 422 ``otp_invalid`` answer, so it tells a guesser nothing."""
    try:
        otp_id = verify_otp(
            session=session,
            settings=request.app.state.settings.otp,
            tenant=tenant,
            recipient_ref=body.recipient,
            purpose=body.purpose,
            code=body.code,
            now=utcnow(),
        )
    except OtpError:
        session.commit()  # the counted attempt must stick even though the answer is an error
        raise
    session.commit()
    return VerifyOut(id=otp_id, valid=True)
