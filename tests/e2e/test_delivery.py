"""The spine end to end: API → store → dispatcher → Redis → a real Celery worker → a receiver."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support import Processes, Receiver, wait_until

pytestmark = pytest.mark.slow


def make_endpoint(client: TestClient, auth: dict[str, str], receiver: Receiver, **extra: object) -> str:
    answer = client.post("/v1/endpoints", json={"url": receiver.url, **extra}, headers=auth)
    assert answer.status_code == 201, answer.text
    receiver.secrets.append(answer.json()["secret"])
    return str(answer.json()["id"])


def delivery(client: TestClient, auth: dict[str, str], delivery_id: str) -> dict[str, object]:
    answer = client.get(f"/v1/deliveries/{delivery_id}", headers=auth)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_event_is_delivered_signed_and_recorded(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    answer = client.post(
        "/v1/events", json={"type": "ticket.created", "subject": "ticket:4711", "data": {"n": 1}}, headers=auth
    )
    assert answer.status_code == 202, answer.text
    [brief] = answer.json()["deliveries"]
    wait_until(lambda: brief["id"] in receiver.ids(), what="the webhook to arrive")
    state = wait_until(lambda: delivery(client, auth, brief["id"])["state"] == "delivered" and True, what="recorded")
    assert state
    record = delivery(client, auth, brief["id"])
    assert record["attempt_count"] == 1
    attempts = record["attempts"]
    assert isinstance(attempts, list) and attempts[0]["status_code"] == 200
    assert receiver.bad_signatures == 0
    assert b'"ticket:4711"' in receiver.received[0].body
