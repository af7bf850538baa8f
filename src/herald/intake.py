"""Accepting events: validate targets, fan out to endpoints, honour idempotency keys.

Everything here runs inside the API's one transaction; nothing is sent from here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from herald.errors import ConflictError, NotFoundError, ValidationError
from herald.store import queries
from herald.store.ids import new_id
from herald.store.models import Channel, Delivery, DeliveryState, Endpoint, Event, Tenant


@dataclass(frozen=True)
class NewEvent:
    type: str
    subject: str | None
    data: dict[str, Any]
    lane: str
    endpoint_ids: list[str] | None = None
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        body = json.dumps(
            {
                "type": self.type,
                "subject": self.subject,
                "data": self.data,
                "lane": self.lane,
                "endpoint_ids": self.endpoint_ids,
            },
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(body.encode()).hexdigest()


def accept_events(
    *, session: Session, tenant: Tenant, events: Sequence[NewEvent], now: datetime, field_prefix: str = ""
) -> list[dict[str, Any]]:
    """Write each event and its deliveries; return one answer per event (a stored one for a
    repeated idempotency key). Raises before writing anything if any event is invalid."""
    answers: list[dict[str, Any] | None] = []
    endpoints_by_id: dict[str, Endpoint] = {}
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
                continue
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
        answers.append(None)

    event_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    matching_cache: dict[str, list[Endpoint]] = {}
    written: dict[str, dict[str, Any]] = {}
    for index, event in enumerate(events):
        if answers[index] is not None:
            continue
        if event.idempotency_key is not None and event.idempotency_key in written:
            answers[index] = written[event.idempotency_key]
            continue
        event_id = new_id("evt")
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
        if event.endpoint_ids is not None:
            targets = [endpoints_by_id[i] for i in dict.fromkeys(event.endpoint_ids)]
        else:
            if event.type not in matching_cache:
                matching_cache[event.type] = queries.matching_endpoints(
                    session=session, tenant_id=tenant.id, event_type=event.type
                )
            targets = matching_cache[event.type]
        deliveries = []
        for endpoint in targets:
            delivery_id = new_id("dlv")
            delivery_rows.append(
                {
                    "id": delivery_id,
                    "tenant_id": tenant.id,
                    "event_id": event_id,
                    "endpoint_id": endpoint.id,
                    "channel": Channel.webhook,
                    "lane": event.lane,
                    "state": DeliveryState.queued,
                    "event_type": event.type,
                    "subject": event.subject,
                    "attempts": 0,
                    "due_at": now,
                    "replays": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            deliveries.append(
                {"id": delivery_id, "endpoint_id": endpoint.id, "channel": "webhook", "state": DeliveryState.queued}
            )
        answer = {
            "id": event_id,
            "type": event.type,
            "subject": event.subject,
            "lane": event.lane,
            "created_at": now.isoformat(),
            "deliveries": deliveries,
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
    if event_rows:
        session.execute(insert(Event), event_rows)
    if delivery_rows:
        session.execute(insert(Delivery), delivery_rows)
    return [a for a in answers if a is not None]
