"""Finding the template for a message: locale tags, their fallback chain, and the store lookup.

Locales are BCP 47 tags (``pt-BR``, ``zh-Hant-TW``); lookup follows RFC 4647 "Lookup": drop
subtags from the end until a template matches, then the tenant's default (``''``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from herald.store.models import Event, Recipient, Template

DEFAULT_LOCALE = ""
DEFAULT_TEMPLATE = "default"  # how a drop's target names the tenant's default-locale template
MAX_LOCALE_CHARS = 35  # the width of ``templates.locale``

_LANGUAGE = re.compile(r"[a-z]{2,3}")
_SCRIPT = re.compile(r"[a-z]{4}")
_REGION = re.compile(r"[a-z]{2}|[0-9]{3}")
_VARIANT = re.compile(r"[a-z0-9]{5,8}|[0-9][a-z0-9]{3}")


def _subtags(locale: str | None) -> list[str]:
    """The canonical subtags of ``locale`` (language, script, region, variants), or [] if it is not one."""
    if not locale or len(locale) > 100:
        return []
    # POSIX spellings (pt_BR.UTF-8, de_DE@euro) come from some producers' systems.
    raw = re.split(r"[.@]", locale.strip(), maxsplit=1)[0]
    parts = re.split(r"[-_]", raw.lower())
    if not parts or not _LANGUAGE.fullmatch(parts[0]):
        return []
    out = [parts[0]]
    rest = parts[1:]
    if rest and _SCRIPT.fullmatch(rest[0]):
        out.append(rest.pop(0).title())
    if rest and _REGION.fullmatch(rest[0]):
        out.append(rest.pop(0).upper())
    while rest and _VARIANT.fullmatch(rest[0]):
        out.append(rest.pop(0))
    if rest and len(rest[0]) != 1:  # a singleton starts extensions or private use, which lookup ignores
        return []
    while len("-".join(out)) > MAX_LOCALE_CHARS:
        out.pop()
    return out


def normalize_locale(locale: str | None) -> str | None:
    """``locale`` in canonical case (``pt-br`` -> ``pt-BR``), or None if it is empty or not a locale."""
    subtags = _subtags(locale)
    return "-".join(subtags) if subtags else None


def named_locale(value: str) -> str:
    """The stored locale of a template a drop's target names (``campaign.json``'s ``template``,
    ``HERALD_INGEST__TEMPLATE``): ``''`` for ``default``, else the canonical tag (``pt-br`` ->
    ``pt-BR``). Raises ``ValueError`` for anything that is not exactly a locale."""
    if value.lower() == DEFAULT_TEMPLATE:
        return DEFAULT_LOCALE
    normal = normalize_locale(value)
    if normal is None or normal.lower() != value.lower().replace("_", "-"):
        raise ValueError(f"must be a locale such as 'pt-BR' or 'default', got {value!r}")
    return normal


def locale_chain(locale: str | None) -> list[str]:
    """Locales to try, most specific first, ending with the default: ``pt-BR`` -> ``["pt-BR", "pt", ""]``.

    An empty or invalid locale gives ``[""]``.
    """
    subtags = _subtags(locale)
    return ["-".join(subtags[:n]) for n in range(len(subtags), 0, -1)] + [DEFAULT_LOCALE]


def resolve_template(
    *, session: Session, tenant_id: str, event_type: str, channel: str, locale: str | None
) -> Template | None:
    """The tenant's template for this event type and channel in the most specific locale of the chain."""
    chain = locale_chain(locale)
    rows = session.scalars(
        select(Template).where(
            Template.tenant_id == tenant_id,
            Template.event_type == event_type,
            Template.channel == channel,
            Template.locale.in_(chain),
        )
    ).all()
    by_locale = {row.locale: row for row in rows}
    return next((by_locale[name] for name in chain if name in by_locale), None)


def get_template(*, session: Session, tenant_id: str, event_type: str, channel: str, locale: str) -> Template | None:
    """The template stored for exactly this key (no fallback)."""
    return session.scalar(
        select(Template).where(
            Template.tenant_id == tenant_id,
            Template.event_type == event_type,
            Template.channel == channel,
            Template.locale == locale,
        )
    )


def list_templates(
    *,
    session: Session,
    tenant_id: str,
    event_type: str | None = None,
    channel: str | None = None,
    locale: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> Sequence[Template]:
    """The tenant's templates in id order, after ``cursor``, optionally filtered."""
    query = select(Template).where(Template.tenant_id == tenant_id)
    if event_type is not None:
        query = query.where(Template.event_type == event_type)
    if channel is not None:
        query = query.where(Template.channel == channel)
    if locale is not None:
        query = query.where(Template.locale == locale)
    if cursor is not None:
        query = query.where(Template.id > cursor)
    return session.scalars(query.order_by(Template.id).limit(limit)).all()


def template_parts(template: Template) -> dict[str, str | None]:
    """A stored template as the mapping ``render_message`` takes."""
    return {
        "channel": template.channel,
        "subject": template.subject,
        "text": template.text,
        "html": template.html,
        "body": template.body,
    }


def event_variables(event: Event) -> dict[str, Any]:
    """``event`` as templates see it (``render.template_context(event=...)``)."""
    return {"id": event.id, "type": event.type, "subject": event.subject, "created_at": event.created_at.isoformat()}


def recipient_variables(recipient: Recipient) -> dict[str, Any]:
    """``recipient`` as templates see it: ``id`` is the tenant's own id for the person (its external id)."""
    return {"id": recipient.external_id, "locale": recipient.locale, "timezone": recipient.timezone}
