"""Timelines and live streams across several API processes, for tenants and consumer links."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import Settings
from herald.links import LinkClaims, link_key, sign_link
from herald.store.models import Delivery, Tenant, utcnow
from tests.e2e.test_delivery import make_endpoint
from tests.support import Processes, Receiver, free_port, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


# Issue 3: the stream pushes each change "within a second". Measured from before the request that
# makes the change (or from the receiver's receipt, for a worker's change) to its arrival here,
# with room for a loaded CI machine.
STREAM_LATENCY_S = 1.5


class SseReader:
    """Reads a Server-Sent Events stream in a thread, keeping (event, data) pairs and, for each,
    the wall-clock time it arrived."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.arrived: list[float] = []
        self.lines: list[str] = []
        self.response = requests.get(url, headers=headers or {}, stream=True, timeout=(5, 30))
        assert self.response.status_code == 200, self.response.text
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind = ""
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                self.lines.append(line)
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.arrived.append(time.time())
                    self.events.append((kind, json.loads(line.removeprefix("data: "))))
        except (requests.RequestException, AttributeError):
            pass  # closed by the test

    def close(self) -> None:
        self.response.close()

    def arrival(self, kind: str, **fields: object) -> float:
        """When the first message of ``kind`` with these fields arrived (waits for it)."""

        def find() -> float | None:
            for (k, data), at in zip(list(self.events), list(self.arrived), strict=False):
                if k == kind and all(data.get(name) == value for name, value in fields.items()):
                    return at
            return None

        return float(wait_until(find, timeout_s=30, what=f"{kind} {fields} on the stream"))


def start_api(processes: Processes, name: str, *, wait: bool = True) -> str:
    port = free_port()
    processes.start(name, "api", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    if wait:
        wait_until(lambda: _up(base), timeout_s=30, what=f"{name} to listen")
    return base


def _up(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_streams_push_events_and_state_changes_across_api_processes(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes, settings: Settings
) -> None:
    endpoint_id = make_endpoint(client, auth, receiver)
    api_a = start_api(processes, "api-a", wait=False)  # start everything, then wait for it all at once
    api_b = start_api(processes, "api-b", wait=False)
    processes.worker()
    processes.dispatcher()
    for base in (api_a, api_b):
        wait_until(lambda base=base: _up(base), timeout_s=30, what=f"{base} to listen")
    wait_until(lambda: " ready." in processes.log("worker"), timeout_s=60, what="the worker to be ready")
    tenant_stream = SseReader(f"{api_b}/v1/subjects/ticket:9/stream", headers=auth)
    link = client.post("/v1/subjects/ticket:9/links", json={"ttl_s": 3600}, headers=auth).json()
    consumer_stream = SseReader(f"{api_b}/v1/public/stream?token={link['token']}")
    readers = (tenant_stream, consumer_stream)
    try:
        for reader in readers:  # the stream's first line follows its subscription
            wait_until(lambda r=reader: any(line.startswith("retry:") for line in r.lines), what="the subscription")
        posted_at = time.time()
        posted = requests.post(
            f"{api_a}/v1/events", json={"type": "ticket.escalated", "subject": "ticket:9"}, headers=auth, timeout=10
        ).json()
        requests.post(
            f"{api_a}/v1/events", json={"type": "ticket.noise", "subject": "ticket:10"}, headers=auth, timeout=10
        )
        delivery_id = posted["deliveries"][0]["id"]
        for reader in readers:
            arrived = reader.arrival("event", event_id=posted["id"], type="ticket.escalated", subject="ticket:9")
            assert arrived - posted_at <= STREAM_LATENCY_S, f"the new event took {arrived - posted_at:.2f}s"
            arrived = reader.arrival("delivery", delivery_id=delivery_id, state="delivered")
            sent_at = max(r.at for r in receiver.received if r.webhook_id == delivery_id)
            assert arrived - sent_at <= STREAM_LATENCY_S, f"the delivered state took {arrived - sent_at:.2f}s"

        # A cancellation made through the other process reaches the stream as fast.
        later = {"type": "ticket.reminder", "subject": "ticket:9", "endpoint_ids": [endpoint_id],
                 "send_at": "2099-01-01T00:00:00Z", "schedule_key": "ticket:9:reminder"}  # fmt: skip
        pending = requests.post(f"{api_a}/v1/events", json=later, headers=auth, timeout=10).json()
        canceled_at = time.time()
        answer = requests.delete(f"{api_a}/v1/schedules/ticket:9:reminder", headers=auth, timeout=10)
        assert answer.status_code == 200, answer.text
        for reader in readers:
            arrived = reader.arrival("delivery", delivery_id=pending["deliveries"][0]["id"], state="canceled")
            assert arrived - canceled_at <= STREAM_LATENCY_S, f"the cancellation took {arrived - canceled_at:.2f}s"
            assert all(d.get("subject") == "ticket:9" for _, d in reader.events)
    finally:
        tenant_stream.close()
        consumer_stream.close()

    timeline = requests.get(f"{api_b}/v1/public/timeline", params={"token": link["token"]}, timeout=10).json()
    assert [e["type"] for e in timeline["events"]] == ["ticket.escalated", "ticket.reminder"]
    assert timeline["events"][0]["deliveries"][0]["state"] == "delivered"
    assert timeline["events"][1]["deliveries"][0]["state"] == "canceled"
    tenant_view = client.get("/v1/subjects/ticket:9/timeline", headers=auth).json()
    assert tenant_view == timeline


def test_consumer_links_are_scoped_signed_and_expire(
    client: TestClient, auth: dict[str, str], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client.post("/v1/events", json={"type": "ticket.created", "subject": "ticket:1"}, headers=auth)
    client.post("/v1/events", json={"type": "ticket.created", "subject": "ticket:2"}, headers=auth)
    link = client.post("/v1/subjects/ticket:1/links", headers=auth).json()
    answer = client.get("/v1/public/timeline", params={"token": link["token"]})
    assert answer.status_code == 200 and answer.json()["subject"] == "ticket:1"
    assert "authorization" not in {k.lower() for k in answer.request.headers}
    for bad in (link["token"][:-2] + "xx", "not-a-token-at-all", link["token"].replace(".", "..")):
        refused = client.get("/v1/public/timeline", params={"token": bad})
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    key = link_key("", Path(settings.data_dir))
    with sessions() as session:
        tenant_id = str(session.scalar(select(Tenant.id)))
    expired = sign_link(LinkClaims(tenant_id, "ticket:1", utcnow() - timedelta(seconds=1)), key=key)
    refused = client.get("/v1/public/timeline", params={"token": expired})
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    assert client.post("/v1/subjects/ticket:1/links", json={"ttl_s": 5}, headers=auth).status_code == 422
    assert client.post("/v1/subjects/ticket:1/links").status_code == 401


class Published:
    """What a tenant's live timelines are told, read from Redis pub/sub as every SSE stream reads it."""

    def __init__(self, settings: Settings, tenant_id: str) -> None:
        self.client = redis.Redis.from_url(settings.redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.timeline(settings.redis.key_prefix, tenant_id))
        wait_until(lambda: self.pubsub.subscribed, what="the subscription")
        self.pubsub.get_message(timeout=1)  # the subscription's confirmation
        self.seen: list[dict[str, Any]] = []

    def until(self, **fields: object) -> list[dict[str, Any]]:
        """Every message up to and including the first one with these fields (waits for it)."""

        def read() -> bool:
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None:
                payload = json.loads(message["data"])
                self.seen += payload if isinstance(payload, list) else [payload]
            return any(all(m.get(k) == v for k, v in fields.items()) for m in self.seen)

        wait_until(read, timeout_s=10, interval_s=0, what=f"{fields} published")
        index = next(i for i, m in enumerate(self.seen) if all(m.get(k) == v for k, v in fields.items()))
        taken, self.seen = self.seen[: index + 1], self.seen[index + 1 :]
        return taken

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def published_event(client: TestClient, auth: dict[str, str], delivery_id: str) -> str:
    return str(client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()["event_id"])


def test_cancellations_replays_and_passcodes_reach_live_timelines_once_committed(
    client: TestClient, auth: dict[str, str], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        tenant_id = str(session.scalar(select(Tenant.id)))
    client.put("/v1/templates/visit.reminder/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    client.put("/v1/recipients/cust-1", json={"email": "c1@example.com", "phone": "+4915123456789"}, headers=auth)

    def remind(subject: str, key: str, send_at: str = "2099-01-01T00:00:00Z") -> str:
        body = {"type": "visit.reminder", "subject": subject, "recipients": ["cust-1"], "send_at": send_at,
                "schedule_key": key}  # fmt: skip
        answer = client.post("/v1/events", json=body, headers=auth)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["deliveries"][0]["id"])

    first = remind("visit:88", "visit:88:reminder")
    published = Published(settings, tenant_id)
    try:
        moved = remind("visit:88", "visit:88:reminder", send_at="2098-01-01T00:00:00Z")  # replaces the first
        taken = published.until(delivery_id=first)
        assert taken[-1] == {"kind": "delivery", "subject": "visit:88", "delivery_id": first,
                             "event_id": taken[-1]["event_id"], "channel": "email", "state": "canceled"}  # fmt: skip

        assert client.delete("/v1/schedules/visit:88:reminder", headers=auth).status_code == 200
        assert published.until(delivery_id=moved)[-1]["state"] == "canceled"

        sent = client.post("/v1/otp", json={"recipient": "cust-1", "channel": "sms"}, headers=auth).json()
        otp = published.until(kind="event", subject=sent["subject"])[-1]
        assert otp["type"] == "otp.login" and otp["subject"].startswith("otp:rcp_")

        # A refused batch publishes nothing: its first event's cancellation was rolled back.
        waiting = remind("visit:90", "visit:90:reminder")
        gone = remind("visit:91", "visit:91:reminder")
        with sessions() as session, session.begin():
            session.execute(update(Delivery).where(Delivery.id == gone).values(state="delivered"))
        batch = {
            "events": [
                {"type": "visit.reminder", "subject": f"visit:{n}", "recipients": ["cust-1"],
                 "schedule_key": f"visit:{n}:reminder", "send_at": "2098-01-01T00:00:00Z"}
                for n in (90, 91)
            ]
        }  # fmt: skip
        assert client.post("/v1/events/batch", json=batch, headers=auth).status_code == 409
        client.post("/v1/events", json={"type": "sentinel", "subject": "sentinel"}, headers=auth)
        before_sentinel = published.until(kind="event", subject="sentinel")
        assert not [m for m in before_sentinel if m.get("delivery_id") == waiting]
        with sessions() as session:
            assert session.scalar(select(Delivery.state).where(Delivery.id == waiting)) == "scheduled"

        dead = remind("visit:92", "visit:92:reminder")
        with sessions() as session, session.begin():
            session.execute(update(Delivery).where(Delivery.id == dead).values(state="dead", due_at=None))
        replay = client.post("/v1/dead-letters/replay", json={"ids": [dead]}, headers=auth)
        assert replay.json()["replayed"] == [dead], replay.text
        assert published.until(delivery_id=dead)[-1] == {"kind": "delivery", "subject": "visit:92", "delivery_id": dead,
            "event_id": published_event(client, auth, dead), "channel": "email", "state": "queued"}  # fmt: skip

        assert client.delete("/v1/recipients/cust-1", headers=auth).status_code == 204
        assert published.until(delivery_id=waiting)[-1]["state"] == "canceled"
    finally:
        published.close()
