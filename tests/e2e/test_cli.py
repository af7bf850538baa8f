"""The operator CLI in real processes: tenants, keys and dead letters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store.models import Delivery
from tests.support import settings_env, sqlite_database

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


def herald(settings: Settings, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", *args], env=settings_env(settings), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_tenant_keys_lifecycle(settings: Settings, client: TestClient) -> None:
    created = herald(settings, "tenants", "create", "airline").stdout
    first = re.search(r"hk_\S+", created)
    assert first is not None
    second = re.search(r"hk_\S+", herald(settings, "tenants", "create-key", "airline").stdout)
    assert second is not None
    for key in (first.group(0), second.group(0)):
        assert client.get("/v1/endpoints", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listed = herald(settings, "tenants", "keys", "airline").stdout
    assert first.group(0) not in listed and second.group(0) not in listed  # only prefixes are shown
    prefix = first.group(0).split("_")[1]
    assert f"hk_{prefix}_" in listed
    herald(settings, "tenants", "revoke-key", prefix)
    refused = client.get("/v1/endpoints", headers={"Authorization": f"Bearer {first.group(0)}"})
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert client.get("/v1/endpoints", headers={"Authorization": f"Bearer {second.group(0)}"}).status_code == 200
    duplicate = herald(settings, "tenants", "create", "airline", ok=False)
    assert duplicate.returncode == 2 and "exists" in duplicate.stderr
    missing = herald(settings, "tenants", "keys", "nobody", ok=False)
    assert missing.returncode == 2 and "no such tenant" in missing.stderr


def test_dlq_list_and_replay(
    settings: Settings, client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).json()
    accepted = client.post("/v1/events", json={"type": "ticket.closed"}, headers=auth).json()
    delivery_id = accepted["deliveries"][0]["id"]
    with sessions() as session, session.begin():
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(state="dead", due_at=None, attempts=8, last_error="HTTP 500: boom")
        )
    listed = herald(settings, "dlq", "list", "--tenant", "acme").stdout
    assert delivery_id in listed and "HTTP 500: boom" in listed and endpoint["id"] in listed
    assert "replayed 1, skipped 0" in herald(settings, "dlq", "replay", "--tenant", "acme", "--id", delivery_id).stdout
    assert client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()["state"] == "queued"
    again = herald(settings, "dlq", "replay", "--tenant", "acme", "--id", delivery_id).stdout
    assert "replayed 0, skipped 1" in again
    nothing = herald(settings, "dlq", "replay", "--tenant", "acme", ok=False)
    assert nothing.returncode == 2 and "--id" in nothing.stderr
