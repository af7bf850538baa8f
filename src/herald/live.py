"""Live timelines: tell SSE streams (in any API process) what a committed transaction changed.

Code that changes a delivery's state or adds an event outside the worker (cancellations,
replays, passcodes) notes the change on its session; once the session commits, ``install``'s
hook publishes the notes on the tenant's pub/sub channel (``keys.timeline``), the same messages
``worker.delivery.publish_states`` and the API's ``announce`` send. A rollback drops them, so a
stream never shows a change that did not happen. Publishing is best effort: the timeline itself
reads the database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.logs import number

logger = logging.getLogger(__name__)

_NOTES = "herald.live.notes"


class DeliveryRow(Protocol):
    """What a stream message says about a delivery (a ``Delivery`` or a selected row)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def event_id(self) -> str: ...
    @property
    def channel(self) -> str: ...


def delivery_message(row: DeliveryRow, state: str) -> dict[str, Any]:
    """What a stream is told of a delivery that is now in ``state``."""
    return {"kind": "delivery", "subject": row.subject, "delivery_id": row.id, "event_id": row.event_id,
            "channel": str(row.channel), "state": str(state)}  # fmt: skip


def note_deliveries(session: Session, rows: Iterable[DeliveryRow], state: str) -> None:
    """Publish, once ``session`` commits, that these deliveries are now in ``state``."""
    notes = session.info.setdefault(_NOTES, [])
    for row in rows:
        if row.subject:
            notes.append((row.tenant_id, delivery_message(row, state)))


def note_event(session: Session, *, tenant_id: str, subject: str | None, event_id: str, type: str) -> None:
    """Publish, once ``session`` commits, that the event was added to ``subject``'s timeline."""
    if subject:
        message = {"kind": "event", "subject": subject, "event_id": event_id, "type": type}
        session.info.setdefault(_NOTES, []).append((tenant_id, message))


def subscribed(numsub: Iterable[tuple[bytes | str, int]]) -> set[str]:
    """The channels some stream is subscribed to, from a ``PUBSUB NUMSUB`` answer.

    A worker asks at take, in the round trip it makes anyway, and publishes a batch's state
    changes only to those. A stream that subscribes a moment after the answer misses that batch,
    as it would miss one published a moment before it subscribed; ``GET .../timeline`` has the
    state either way. (Pattern subscriptions are not counted: Herald's streams subscribe to
    their tenant's channel.)
    """
    return {(name.decode() if isinstance(name, bytes) else name) for name, count in numsub if count}


def publish(client: redis.Redis, prefix: str, notes: list[tuple[str, dict[str, Any]]]) -> None:
    """Send ``(tenant_id, message)`` notes now; a Redis failure is logged, never raised."""
    try:
        pipe = client.pipeline(transaction=False)
        for tenant_id, message in notes:
            pipe.publish(keys.timeline(prefix, tenant_id), json.dumps(message))
        pipe.execute()
    except redis.RedisError:
        logger.warning("could not publish %s changes to live timelines", number(len(notes)))


def install(sessions: sessionmaker[Session], client: redis.Redis, prefix: str) -> None:
    """Publish the notes of every session from ``sessions`` when it commits; drop them on rollback."""

    @event.listens_for(sessions, "after_commit")
    def _committed(session: Session) -> None:
        notes = session.info.pop(_NOTES, None)
        if notes:
            publish(client, prefix, notes)

    @event.listens_for(sessions, "after_rollback")
    def _rolled_back(session: Session) -> None:
        session.info.pop(_NOTES, None)
