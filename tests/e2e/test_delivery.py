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


def test_batch_fans_out_and_metrics_show_states_and_latency(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver)
    make_endpoint(client, auth, receiver, event_types=["ticket.*"])
    make_endpoint(client, auth, receiver, event_types=["visit.*"])
    processes.worker()
    processes.dispatcher()
    events = [{"type": "ticket.created", "subject": f"ticket:{i}"} for i in range(50)]
    answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
    assert answer.status_code == 202, answer.text
    ids = {d["id"] for e in answer.json()["events"] for d in e["deliveries"]}
    assert len(ids) == 100  # two endpoints match ticket.*, the visit.* one does not
    wait_until(lambda: receiver.ids() >= ids, what="all 100 webhooks")
    text = wait_until(
        lambda: (
            (t := client.get("/metrics").text)
            and 'herald_deliveries{channel="webhook",lane="transactional",state="delivered"} 100.0' in t
            and t
        ),
        what="metrics to show 100 delivered",
    )
    assert 'herald_attempt_latency_seconds_count{channel="webhook",lane="transactional"} 100.0' in text
    assert 'herald_due_backlog{lane="transactional"} 0.0' in text


def test_endpoint_max_rate_is_respected(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver, max_rate_per_s=5)
    processes.worker()
    processes.dispatcher()
    events = [{"type": "drop.user", "subject": f"user:{i}", "lane": "bulk"} for i in range(20)]
    answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
    assert answer.status_code == 202, answer.text
    wait_until(lambda: len(receiver.ids()) == 20, what="all 20 webhooks")
    times = sorted(r.at for r in receiver.received)
    # A fixed one-second window allows at most 2 x rate inside any sliding second (a burst at a
    # window's end and the next window's start), and 20 sends at 5/s fill four windows: over 2 s apart.
    assert all(sum(1 for t in times if start <= t < start + 1.0) <= 10 for start in times)
    assert times[-1] - times[0] >= 2.0 - 0.1
