"""Accepting events: validate targets, fan out to endpoints and to people, schedule, and honour
idempotency and schedule keys.

Everything here runs inside the API's one transaction; nothing is sent from here. All checks
happen before the first row is written, so a refused request leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from herald import live
from herald.config import Settings
from herald.content.lookup import locale_chain
from herald.content.render import RenderError, render_message
from herald.errors import ConflictError, NotFoundError, ValidationError
from herald.links import UnsubscribeLinks
from herald.logs import redact
from herald.scheduler.times import QuietHours, Relative, after_quiet_hours, resolve_relative
from herald.store import queries
from herald.store.bulk import prepare_insert, run_writes
from herald.store.ids import IdSource
from herald.store.models import (
    TERMINAL_STATES,
    Channel,
    Delivery,
    DeliveryState,
    Endpoint,
    Event,
    Recipient,
    Template,
    Tenant,
)
from herald.store.recipients import recipients_by_external_id

PERSON_CHANNELS = (Channel.email, Channel.sms)

EVENT_COLUMNS = ("id", "tenant_id", "type", "subject", "data", "lane", "idempotency_key", "created_at")
DELIVERY_COLUMNS = (
    "id", "tenant_id", "event_id", "endpoint_id", "channel", "lane", "state", "event_type", "subject", "attempts",
    "due_at", "deliver_by", "replays", "recipient_id", "address", "content", "category", "schedule_key",
    "last_error", "finished_at", "created_at", "updated_at",
)  # fmt: skip


@dataclass(frozen=True)
class IntakePolicy:
    """Tenant-independent rules of intake, from settings.

    ``unsubscribe`` builds the signed ``List-Unsubscribe`` headers of non-critical mail; without
    it (tests of other rules) mail carries none.
    """

    critical_categories: frozenset[str] = frozenset({"otp", "security"})
    unsubscribe: UnsubscribeLinks | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, link_key: bytes | None = None) -> IntakePolicy:
        return cls(
            critical_categories=frozenset(settings.critical_categories),
            unsubscribe=UnsubscribeLinks.from_settings(settings, key=link_key),
        )


@dataclass(frozen=True)
class NewEvent:
    type: str
    subject: str | None
    data: dict[str, Any]
    lane: str
    endpoint_ids: list[str] | None = None
    idempotency_key: str | None = None
    recipients: list[str] | None = None
    channels: list[str] | None = None
    category: str | None = None
    send_at: datetime | None = None
    send_relative: Relative | None = None
    deliver_by: datetime | None = None
    deliver_by_relative: Relative | None = None
    schedule_key: str | None = None
    extra_context: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k not in ("idempotency_key", "extra_context")}
        encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(encoded.encode()).hexdigest()

    @property
    def resolved_category(self) -> str:
        return self.category or self.type.split(".", 1)[0]


@dataclass
class _Plan:
    """What one event will write, worked out before anything is written."""

    event: NewEvent
    where: str
    targets: list[Endpoint]
    people: list[Recipient]
    templates: dict[tuple[str, str], Template]
    channels: list[str]


def accept_events(
    *,
    session: Session,
    tenant: Tenant,
    events: Sequence[NewEvent],
    now: datetime,
    field_prefix: str = "",
    policy: IntakePolicy | None = None,
) -> list[dict[str, Any]]:
    """Write each event and its deliveries; return one answer per event (a stored one for a
    repeated idempotency key). Raises before writing anything if any event is invalid."""
    policy = policy or IntakePolicy()
    answers: list[dict[str, Any] | None] = []
    plans: list[_Plan | None] = []
    endpoints_by_id: dict[str, Endpoint] = {}
    per_type: dict[str, tuple[list[Endpoint], dict[tuple[str, str], Template]]] = {}
    seen_keys: dict[str, str] = {}
    for index, event in enumerate(events):
        where = f"{field_prefix}{index}." if field_prefix else ""
        if event.idempotency_key is not None:
            fingerprint = event.fingerprint()
            if seen_keys.setdefault(event.idempotency_key, fingerprint) != fingerprint:
                raise ValidationError(
                    f"{where}idempotency_key: repeated in this batch with a different body, "
                    f"got {event.idempotency_key!r}",
                    field=f"{where}idempotency_key",
                )
            try:
                stored = queries.find_idempotent(
                    session=session, tenant_id=tenant.id, key=event.idempotency_key, request_hash=fingerprint
                )
            except ConflictError as exc:
                if not where:
                    raise
                raise ConflictError(f"{where}{exc.message}", field=f"{where}idempotency_key") from None
            if stored is not None:
                answers.append(stored)
                plans.append(None)
                continue
        answers.append(None)
        plans.append(_plan(session, tenant, event, where, endpoints_by_id, per_type))

    event_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    ids = IdSource()
    written: dict[str, dict[str, Any]] = {}
    for index, plan in enumerate(plans):
        if plan is None:
            continue
        event = plan.event
        if event.idempotency_key is not None and event.idempotency_key in written:
            answers[index] = written[event.idempotency_key]
            continue
        event_id = ids.take("evt")
        event_rows.append(
            {
                "id": event_id,
                "tenant_id": tenant.id,
                "type": event.type,
                "subject": event.subject,
                "data": event.data,
                "lane": event.lane,
                "idempotency_key": event.idempotency_key,
                "created_at": now,
            }
        )
        rows = _deliveries(plan, tenant, event_id, now, policy, ids)
        if event.schedule_key is not None:
            _replace_scheduled(session, tenant.id, event.schedule_key, now, where=plan.where)
        delivery_rows += rows
        answer = {
            "id": event_id,
            "type": event.type,
            "subject": event.subject,
            "lane": event.lane,
            "created_at": now.isoformat(),
            "deliveries": [
                {
                    "id": r["id"],
                    "endpoint_id": r["endpoint_id"],
                    "channel": str(r["channel"]),
                    "state": str(r["state"]),
                    "recipient": r.pop("_recipient", None),
                    "due_at": r["due_at"].isoformat() if r["due_at"] else None,
                }
                for r in rows
            ],
        }
        answers[index] = answer
        if event.idempotency_key is not None:
            written[event.idempotency_key] = answer
            queries.save_idempotent(
                session=session,
                tenant_id=tenant.id,
                key=event.idempotency_key,
                request_hash=event.fingerprint(),
                response=answer,
            )
    # Ready tuples through one executemany (COPY on PostgreSQL): a batch is thousands of rows,
    # and the ORM's bulk insert spent more time building parameters than the database storing them.
    dialect = session.get_bind().dialect
    writes = [
        prepare_insert(dialect, Event, EVENT_COLUMNS, [tuple(r[c] for c in EVENT_COLUMNS) for r in event_rows]),
        prepare_insert(
            dialect, Delivery, DELIVERY_COLUMNS, [tuple(r[c] for c in DELIVERY_COLUMNS) for r in delivery_rows]
        ),
    ]
    run_writes(session.connection(), writes)
    return [a for a in answers if a is not None]


def _plan(
    session: Session,
    tenant: Tenant,
    event: NewEvent,
    where: str,
    endpoints_by_id: dict[str, Endpoint],
    per_type: dict[str, tuple[list[Endpoint], dict[tuple[str, str], Template]]],
) -> _Plan:
    for position, endpoint_id in enumerate(event.endpoint_ids or []):
        if endpoint_id not in endpoints_by_id:
            try:
                endpoints_by_id[endpoint_id] = queries.get_endpoint(
                    session=session, tenant_id=tenant.id, endpoint_id=endpoint_id
                )
            except NotFoundError:
                raise ValidationError(
                    f"{where}endpoint_ids.{position}: no such endpoint, got {endpoint_id!r}",
                    field=f"{where}endpoint_ids.{position}",
                ) from None
        if not endpoints_by_id[endpoint_id].enabled:
            # Accepted, it could only be dead-lettered at once; the producer should hear it now.
            raise ValidationError(
                f"{where}endpoint_ids.{position}: endpoint disabled, got {endpoint_id!r}",
                field=f"{where}endpoint_ids.{position}",
            )
    if event.type not in per_type:  # one look-up per event type, not per event, in a batch
        rows = session.scalars(
            select(Template).where(Template.tenant_id == tenant.id, Template.event_type == event.type)
        ).all()
        per_type[event.type] = (
            queries.matching_endpoints(session=session, tenant_id=tenant.id, event_type=event.type),
            {(t.channel, t.locale): t for t in rows},
        )
    matching, templates = per_type[event.type]
    if event.endpoint_ids is not None:
        targets = [endpoints_by_id[i] for i in dict.fromkeys(event.endpoint_ids)]
    elif event.recipients:
        targets = []  # an event for people goes to them, and to endpoints only when named
    else:
        targets = matching

    people: list[Recipient] = []
    channels: list[str] = []
    if event.recipients:
        found = recipients_by_external_id(session=session, tenant_id=tenant.id, external_ids=event.recipients)
        for position, external_id in enumerate(event.recipients):
            if external_id not in found:
                raise ValidationError(
                    f"{where}recipients.{position}: no such recipient, got {redact(repr(external_id))}",
                    field=f"{where}recipients.{position}",
                )
        people = [found[e] for e in dict.fromkeys(event.recipients)]
    if people:
        available = [c for c in PERSON_CHANNELS if any(ch == c for ch, _ in templates)]
        wanted = event.channels or available
        for position, channel in enumerate(wanted):
            if channel not in available:
                raise ValidationError(
                    f"{where}channels.{position}: no {channel} template for {event.type!r}",
                    field=f"{where}channels.{position}",
                )
        if not wanted:
            raise ValidationError(
                f"{where}recipients: no email or sms template for event type {event.type!r}",
                field=f"{where}recipients",
            )
        channels = list(wanted)
    if event.send_at is not None and event.deliver_by is not None and event.send_at >= event.deliver_by:
        raise ValidationError(f"{where}send_at: must be before deliver_by", field=f"{where}send_at")
    return _Plan(event, where, targets, people, templates, channels)


def _pick(templates: dict[tuple[str, str], Template], channel: str, locale: str | None) -> Template | None:
    for name in locale_chain(locale):
        if (channel, name) in templates:
            return templates[(channel, name)]
    return None


def _times(plan: _Plan, zone: ZoneInfo, now: datetime) -> tuple[datetime, datetime | None]:
    event = plan.event
    send_at = event.send_at
    if event.send_relative is not None:
        send_at = resolve_relative(event.send_relative, event.data, zone, field=f"{plan.where}send_relative")
    deliver_by = event.deliver_by
    if event.deliver_by_relative is not None:
        deliver_by = resolve_relative(
            event.deliver_by_relative, event.data, zone, field=f"{plan.where}deliver_by_relative"
        )
    due = max(now, send_at) if send_at is not None else now
    if deliver_by is not None and due >= deliver_by:
        raise ValidationError(
            f"{plan.where}deliver_by: the send would be due at or after its deadline ({deliver_by.isoformat()})",
            field=f"{plan.where}deliver_by",
        )
    return due, deliver_by


def _deliveries(
    plan: _Plan, tenant: Tenant, event_id: str, now: datetime, policy: IntakePolicy, ids: IdSource
) -> list[dict[str, Any]]:
    event = plan.event
    category = event.resolved_category
    critical = category in policy.critical_categories
    base_context = {
        "event": {"id": event_id, "type": event.type, "subject": event.subject, "created_at": now.isoformat()},
        "data": event.data,
        **event.extra_context,
    }
    rows: list[dict[str, Any]] = []

    def row(channel: str, due: datetime, deliver_by: datetime | None, **values: Any) -> dict[str, Any]:
        state = values.pop("state", None) or (DeliveryState.scheduled if due > now else DeliveryState.queued)
        terminal = state in TERMINAL_STATES
        return {
            "id": ids.take("dlv"),
            "tenant_id": tenant.id,
            "event_id": event_id,
            "endpoint_id": None,
            "channel": channel,
            "lane": event.lane,
            "state": state,
            "event_type": event.type,
            "subject": event.subject,
            "attempts": 0,
            "due_at": None if terminal else due,
            "deliver_by": deliver_by,
            "replays": 0,
            "recipient_id": None,
            "address": None,
            "content": None,
            "category": category,
            "schedule_key": event.schedule_key,
            "last_error": None,
            "finished_at": now if terminal else None,
            "created_at": now,
            "updated_at": now,
            **values,
        }

    utc = ZoneInfo("UTC")
    if plan.targets:
        due, deliver_by = _times(plan, utc, now)
        webhook_template = _pick(plan.templates, Channel.webhook, None)
        content = _render(plan, webhook_template, base_context) if webhook_template else None
        rows += [row(Channel.webhook, due, deliver_by, endpoint_id=e.id, content=content) for e in plan.targets]
    for person in plan.people:
        zone = ZoneInfo(person.timezone) if person.timezone else utc
        due, deliver_by = _times(plan, zone, now)
        if not critical:
            quiet_end = after_quiet_hours(due, QuietHours.parse(person.quiet_hours), zone)
            if deliver_by is None or quiet_end < deliver_by:
                due = quiet_end  # past the deadline, sending during quiet hours beats not sending
        context = {
            **base_context,
            "recipient": {"id": person.external_id, "locale": person.locale, "timezone": person.timezone},
        }
        for channel in plan.channels:
            address = person.email if channel == Channel.email else person.phone
            preference = (person.preferences or {}).get(category, {}).get(channel, True)
            extra: dict[str, Any] = {"recipient_id": person.id, "_recipient": person.external_id}
            template = _pick(plan.templates, channel, person.locale)
            reason = _suppression(channel, address, preference or critical, template, person.locale, category)
            if reason or template is None:
                rows.append(row(channel, due, deliver_by, state=DeliveryState.suppressed, last_error=reason, **extra))
                continue
            content = _render(plan, template, context)
            if channel == Channel.email and not critical and policy.unsubscribe is not None:
                content["headers"] = policy.unsubscribe.headers(
                    tenant_id=tenant.id, recipient_id=person.id, category=category, channel=channel, now=now
                )
            rows.append(row(channel, due, deliver_by, address=address, content=content, **extra))
    return rows


def _suppression(
    channel: str, address: str | None, allowed: bool, template: Template | None, locale: str | None, category: str
) -> str | None:
    """Why a delivery to a person is not sent (recorded as ``suppressed``), or None."""
    if not address:
        return f"suppressed: recipient has no {'email address' if channel == Channel.email else 'phone number'}"
    if not allowed:
        return f"suppressed: recipient opted out of {category} by {channel}"
    if template is None:  # a template exists in some locale, but not on this person's chain
        return f"suppressed: no {channel} template for locale {locale!r}"
    return None


def _render(plan: _Plan, template: Template, context: dict[str, Any]) -> dict[str, Any]:
    parts = {"channel": template.channel, "subject": template.subject, "text": template.text,
             "html": template.html, "body": template.body}  # fmt: skip
    try:
        return dict(render_message(parts, context))
    except RenderError as exc:
        where = f"{template.event_type}/{template.channel}/{template.locale or 'default'}"
        raise ValidationError(
            f"{plan.where}data: template {where} failed: {exc.message}", field=f"{plan.where}data"
        ) from None


def _replace_scheduled(session: Session, tenant_id: str, key: str, now: datetime, *, where: str) -> None:
    """Cancel what is pending under ``key`` so the new event's deliveries take its place.

    Refused when the key's deliveries have already gone out (or are going out now): moving a
    reminder that was sent would send it twice.
    """
    rows = session.execute(
        select(Delivery.id, Delivery.state, Delivery.lease_until)
        .where(Delivery.tenant_id == tenant_id, Delivery.schedule_key == key)
        .where(Delivery.state.not_in([DeliveryState.canceled, DeliveryState.suppressed]))
        .with_for_update()
    ).all()
    pending = [
        r.id for r in rows if r.state in (DeliveryState.scheduled, DeliveryState.queued) and r.lease_until is None
    ]
    gone = [r for r in rows if r.id not in set(pending)]
    if gone and not pending:
        raise ConflictError(f"{where}schedule_key: already sent, got {key!r}", field=f"{where}schedule_key")
    cancel(session, pending, now, reason=f"replaced under schedule key {key!r}")


def cancel(session: Session, ids: Sequence[str], now: datetime, *, reason: str) -> None:
    """Cancel the deliveries ``ids``; live timelines hear of it once the session commits."""
    if ids:
        rows = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(list(ids)))
            .values(state=DeliveryState.canceled, due_at=None, finished_at=now, updated_at=now, last_error=reason)
            .returning(Delivery.id, Delivery.tenant_id, Delivery.subject, Delivery.event_id, Delivery.channel)
            .execution_options(synchronize_session=False)
        ).all()
        live.note_deliveries(session, rows, DeliveryState.canceled)
