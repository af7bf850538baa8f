"""The webhook payload: built from the event, or spliced from the stored JSON text of its data."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from herald.worker.delivery import raw_webhook_body, webhook_body
from tests.strategies import event_data


@given(data=event_data, subject=st.none() | st.text(max_size=20), event_type=st.text(min_size=1, max_size=20))
def test_the_spliced_payload_is_the_same_json_as_the_built_one(
    data: dict[str, object], subject: str | None, event_type: str
) -> None:
    created_at = datetime(2026, 11, 29, 12, 30, 15, 123456, tzinfo=UTC)
    event = SimpleNamespace(id="evt_01", type=event_type, subject=subject, created_at=created_at, data=data)
    # As SQLAlchemy's JSON type stores it (default separators, ASCII escapes) and as the worker reads it.
    stored = json.dumps(data)
    spliced = raw_webhook_body(
        event_id="evt_01", type=event_type, subject=subject, created_at=created_at, data_json=stored
    )
    assert json.loads(spliced) == json.loads(webhook_body(event)) == {
        "id": "evt_01", "type": event_type, "subject": subject, "timestamp": created_at.isoformat(), "data": data,
    }  # fmt: skip


def test_a_rendered_template_body_replaces_the_data() -> None:
    created_at = datetime(2026, 11, 29, tzinfo=UTC)
    event = SimpleNamespace(id="evt_02", type="drop.user", subject="user:7", created_at=created_at, data={"a": 1})
    payload = json.loads(webhook_body(event, {"body": {"greeting": "hi"}}))
    assert payload["data"] == {"greeting": "hi"}
