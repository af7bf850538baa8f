"""Timelines and live streams across several API processes, for tenants and consumer links."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.links import LinkClaims, link_key, sign_link
from herald.store.models import Tenant, utcnow
from tests.e2e.test_delivery import make_endpoint
from tests.support import Processes, Receiver, free_port, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


class SseReader:
    """Reads a Server-Sent Events stream in a thread, keeping (event, data) pairs."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
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
                    self.events.append((kind, json.loads(line.removeprefix("data: "))))
        except (requests.RequestException, AttributeError):
            pass  # closed by the test

    def close(self) -> None:
        self.response.close()


def start_api(processes: Processes, name: str) -> str:
    port = free_port()
    processes.start(name, "api", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
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
    make_endpoint(client, auth, receiver)
    api_a = start_api(processes, "api-a")
    api_b = start_api(processes, "api-b")
    processes.worker(wait=True)
    processes.dispatcher()
    tenant_stream = SseReader(f"{api_b}/v1/subjects/ticket:9/stream", headers=auth)
    link = client.post("/v1/subjects/ticket:9/links", json={"ttl_s": 3600}, headers=auth).json()
    consumer_stream = SseReader(f"{api_b}/v1/public/stream?token={link['token']}")
    try:
        for reader in (tenant_stream, consumer_stream):  # the stream's first line follows its subscription
            wait_until(lambda r=reader: any(line.startswith("retry:") for line in r.lines), what="the subscription")
        posted = requests.post(
            f"{api_a}/v1/events", json={"type": "ticket.escalated", "subject": "ticket:9"}, headers=auth, timeout=10
        ).json()
        requests.post(
            f"{api_a}/v1/events", json={"type": "ticket.noise", "subject": "ticket:10"}, headers=auth, timeout=10
        )
        delivery_id = posted["deliveries"][0]["id"]
        for reader in (tenant_stream, consumer_stream):
            wait_until(
                lambda r=reader: (
                    ("event", {"subject": "ticket:9", "event_id": posted["id"], "type": "ticket.escalated"}) in r.events
                ),
                timeout_s=30,
                what="the new event on the stream",
            )
            wait_until(
                lambda r=reader: any(k == "delivery" and d["delivery_id"] == delivery_id and d["state"] == "delivered"
                                     for k, d in r.events),
                timeout_s=30,
                what="the delivered state on the stream",
            )  # fmt: skip
            assert all(d.get("subject") == "ticket:9" for _, d in reader.events)
    finally:
        tenant_stream.close()
        consumer_stream.close()

    timeline = requests.get(f"{api_b}/v1/public/timeline", params={"token": link["token"]}, timeout=10).json()
    assert [e["type"] for e in timeline["events"]] == ["ticket.escalated"]
    assert timeline["events"][0]["deliveries"][0]["state"] == "delivered"
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
