"""Templates per event type x channel x locale: upload (validated first), read, list, delete, preview.

The locale in a path is a BCP 47 tag (stored in canonical case: ``pt-br`` is ``pt-BR``) or
``default``. A preview renders exactly as a send would (strict variables, the same budgets),
resolving ``pt-BR`` -> ``pt`` -> ``default`` against the stored templates, and sends nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field, StringConstraints, field_validator
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from herald.api.deps import IdQuery, SessionDep, TenantDep
from herald.api.schemas import EventType, In, Page
from herald.content import lookup
from herald.content.render import (
    DEFAULT_LIMITS,
    PART_NAMES,
    check_parts,
    render_message,
    template_context,
    validate_template,
)
from herald.content.sms import sms_info
from herald.errors import NotFoundError, ValidationError
from herald.logs import redact
from herald.store.ids import new_id
from herald.store.models import Channel, Recipient, Template, utcnow

router = APIRouter(prefix="/v1/templates", tags=["templates"])

DEFAULT = "default"
EVENT_TYPE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$"  # as ``schemas.EventType``
EventTypePath = Annotated[str, Path(max_length=200, pattern=EVENT_TYPE_PATTERN)]
LocalePath = Annotated[str, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]
# PostgreSQL refuses NUL in text; the size matches what the renderer accepts.
Source = Annotated[str, StringConstraints(max_length=DEFAULT_LIMITS.source_chars, pattern=r"^[^\x00]*$")]
SubjectSource = Annotated[str, StringConstraints(max_length=4000, pattern=r"^[^\x00]*$")]
LocaleText = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ShortText = Annotated[str, StringConstraints(max_length=320, pattern=r"^[^\x00]*$")]


class TemplateIn(In):
    """The parts a channel uses: email ``subject`` + ``text`` (+ ``html``), sms ``text``, webhook ``body``.

    ``sample_data`` is rendered as ``data`` to check the template before it is stored; it is not kept.
    """

    subject: SubjectSource | None = None
    text: Source | None = None
    html: Source | None = None
    body: Source | None = None
    sample_data: dict[str, Any] | None = None


class TemplateOut(BaseModel):
    id: str
    event_type: str
    channel: str
    locale: str
    subject: str | None
    text: str | None
    html: str | None
    body: str | None
    created_at: datetime
    updated_at: datetime


class TemplateUploadOut(TemplateOut):
    """The stored template; for SMS also how its sample render travels (``length``, ``encoding``,
    ``segments``, as ``POST /v1/templates/preview`` reports them), absent for other channels."""

    length: int | None = None
    encoding: str | None = None
    segments: int | None = None


class PreviewRecipient(In):
    """``ref``: a stored recipient (its external id or Herald id); or a recipient described inline
    by the variables templates see (``id`` being the tenant's own id for the person)."""

    ref: ShortText | None = None
    id: ShortText | None = None
    locale: LocaleText | None = None
    timezone: ShortText | None = None


class PreviewIn(In):
    """Either a stored template (``event_type``, ``locale`` optional) or inline parts, never both.

    ``recipient`` is a stored recipient (``"user-42"``, short for ``{"ref": "user-42"}``) or an
    inline ``{id, locale, timezone}``; its locale is used when ``locale`` is not given.
    """

    channel: Channel
    event_type: EventType | None = None
    locale: LocaleText | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    recipient: PreviewRecipient | None = None
    subject: SubjectSource | None = None
    text: Source | None = None
    html: Source | None = None
    body: Source | None = None

    @field_validator("recipient", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        return {"ref": value} if isinstance(value, str) else value


class PreviewOut(BaseModel):
    """The rendered message; ``length``, ``encoding`` and ``segments`` for SMS only."""

    channel: str
    locale: str | None = None
    template_id: str | None = None
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    body: dict[str, Any] | None = None
    length: int | None = None
    encoding: str | None = None
    segments: int | None = None


def _out(template: Template) -> TemplateOut:
    return TemplateOut(
        id=template.id,
        event_type=template.event_type,
        channel=template.channel,
        locale=template.locale or DEFAULT,
        subject=template.subject,
        text=template.text,
        html=template.html,
        body=template.body,
        created_at=template.created_at,
        updated_at=template.updated_at,
    )


def _locale(value: str, *, field: str = "locale") -> str:
    """A locale from the request in stored form: ``''`` for ``default``, else the canonical tag."""
    if value.lower() == DEFAULT:
        return lookup.DEFAULT_LOCALE
    normal = lookup.normalize_locale(value)
    if normal is None:
        raise ValidationError(f"{field}: must be a locale such as 'pt-BR' or 'default', got {value!r}", field=field)
    return normal


def _get(session: Session, tenant_id: str, event_type: str, channel: Channel, locale: str) -> Template:
    template = lookup.get_template(
        session=session, tenant_id=tenant_id, event_type=event_type, channel=channel.value, locale=locale
    )
    if template is None:
        raise NotFoundError(
            f"template: no {channel.value} template for {event_type!r} in locale {locale or DEFAULT!r}",
            field="template",
        )
    return template


def _write(session: Session, key: dict[str, str], parts: dict[str, str | None]) -> tuple[Template, bool]:
    """Insert or replace the template at ``key`` and commit; True when it was created."""
    template = lookup.get_template(session=session, **key)
    created = template is None
    now = utcnow()
    if template is None:
        template = Template(id=new_id("tpl"), created_at=now, **key)
        session.add(template)
    for name, source in parts.items():
        setattr(template, name, source)
    template.updated_at = now
    session.commit()
    return template, created


@router.put("/{event_type}/{channel}/{locale}", response_model=TemplateUploadOut, response_model_exclude_unset=True)
def upsert_template(
    event_type: EventTypePath,
    channel: Channel,
    locale: LocalePath,
    body: TemplateIn,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
) -> TemplateUploadOut:
    """Create (201) or replace (200) a template once it compiles and survives a sample render.

    For SMS the answer has the sample render's ``length``, ``encoding`` and ``segments`` (with
    ``sample_data`` as ``data``; variables it lacks render as ``0``, so give realistic data).
    """
    stored_locale = _locale(locale)
    parts = body.model_dump(include=set(PART_NAMES))
    samples = validate_template(channel=channel.value, sample_data=body.sample_data, **parts)
    key = {"tenant_id": tenant.id, "event_type": event_type, "channel": channel.value, "locale": stored_locale}
    try:
        template, created = _write(session, key, parts)
    except IntegrityError:
        # Another request created the same key between our read and our insert: replace theirs.
        session.rollback()
        template, created = _write(session, key, parts)
    response.status_code = 201 if created else 200
    out = TemplateUploadOut(**_out(template).model_dump())
    if channel == Channel.sms:
        info = sms_info(samples["text"].strip())  # trimmed, as a send is (render_message)
        out.length, out.encoding, out.segments = info.length, info.encoding, info.segments
    return out


@router.get("/{event_type}/{channel}/{locale}", response_model=TemplateOut)
def read_template(
    event_type: EventTypePath, channel: Channel, locale: LocalePath, session: SessionDep, tenant: TenantDep
) -> TemplateOut:
    """The template stored for exactly this locale (no fallback; see the preview for that)."""
    return _out(_get(session, tenant.id, event_type, channel, _locale(locale)))


@router.delete("/{event_type}/{channel}/{locale}", status_code=204)
def delete_template(
    event_type: EventTypePath, channel: Channel, locale: LocalePath, session: SessionDep, tenant: TenantDep
) -> Response:
    session.delete(_get(session, tenant.id, event_type, channel, _locale(locale)))
    session.commit()
    return Response(status_code=204)


@router.get("", response_model=Page[TemplateOut])
def list_templates(
    session: SessionDep,
    tenant: TenantDep,
    event_type: Annotated[str | None, Query(max_length=200, pattern=EVENT_TYPE_PATTERN)] = None,
    channel: Channel | None = None,
    locale: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    cursor: IdQuery = None,
    limit: Limit = 100,
) -> Page[TemplateOut]:
    rows = lookup.list_templates(
        session=session,
        tenant_id=tenant.id,
        event_type=event_type,
        channel=channel.value if channel else None,
        locale=_locale(locale) if locale is not None else None,
        cursor=cursor,
        limit=limit + 1,
    )
    return Page[TemplateOut](
        data=[_out(t) for t in rows[:limit]], next_cursor=rows[limit - 1].id if len(rows) > limit else None
    )


def _preview_recipient(
    session: Session, tenant_id: str, given: PreviewRecipient | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The ``recipient`` variables and locale for a preview."""
    if given is None:
        return None, None
    ref = given.ref
    if ref is None:
        return given.model_dump(exclude={"ref"}), given.locale
    if given.model_fields_set - {"ref"}:
        raise ValidationError(
            "recipient: give a stored recipient's ref or describe one inline, not both", field="recipient"
        )
    recipient = session.scalar(
        select(Recipient).where(
            Recipient.tenant_id == tenant_id, or_(Recipient.id == ref, Recipient.external_id == ref)
        )
    )
    if recipient is None:
        raise NotFoundError(f"recipient: no such recipient, got {redact(repr(ref))}", field="recipient")
    return lookup.recipient_variables(recipient), recipient.locale


@router.post("/preview", response_model=PreviewOut, response_model_exclude_none=True)
def preview_template(body: PreviewIn, session: SessionDep, tenant: TenantDep) -> PreviewOut:
    """Render a stored template (with locale fallback) or inline parts with ``data``; nothing is sent."""
    channel = body.channel.value
    inline = {name: source for name, source in body.model_dump(include=set(PART_NAMES)).items() if source is not None}
    recipient, recipient_locale = _preview_recipient(session, tenant.id, body.recipient)
    out = PreviewOut(channel=channel)
    if body.event_type is not None:
        if inline:
            name = next(iter(inline))
            raise ValidationError(
                f"{name}: preview either a stored template (event_type) or inline parts, not both", field=name
            )
        locale = _locale(body.locale) if body.locale is not None else recipient_locale
        template = lookup.resolve_template(
            session=session, tenant_id=tenant.id, event_type=body.event_type, channel=channel, locale=locale
        )
        if template is None:
            tried = ", ".join(name or DEFAULT for name in lookup.locale_chain(locale))
            raise NotFoundError(
                f"template: no {channel} template for {body.event_type!r} in locales {tried}", field="template"
            )
        parts = lookup.template_parts(template)
        out.locale, out.template_id = template.locale or DEFAULT, template.id
    else:
        if body.locale is not None:
            raise ValidationError("locale: only used with event_type (a stored template)", field="locale")
        if not inline:
            raise ValidationError("event_type: give event_type (a stored template) or inline parts", field="event_type")
        check_parts(channel=channel, parts=inline)
        parts = {"channel": channel, **inline}
    event = {"id": None, "type": body.event_type, "subject": None, "created_at": utcnow().isoformat()}
    rendered = render_message(parts, template_context(data=body.data, event=event, recipient=recipient))
    for name, value in rendered.items():
        setattr(out, name, value)
    if channel == Channel.sms:
        info = sms_info(rendered["text"])
        out.length, out.encoding, out.segments = info.length, info.encoding, info.segments
    return out
