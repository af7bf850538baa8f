"""API keys and tenants: absent, wrong, malformed and revoked keys; one tenant never sees another's rows."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from herald.store import queries
from herald.store.db import transaction
from herald.store.models import Delivery, DeliveryState
from tests.support import assert_problem, row_counts

HOOK = "http://127.0.0.1:9/hook"

# (method, path, JSON body) of every route that needs a key; {ep}, {evt} and {dlv} name real rows.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/endpoints", None),
    ("POST", "/v1/endpoints", {"url": HOOK}),
    ("GET", "/v1/endpoints/{ep}", None),
    ("PATCH", "/v1/endpoints/{ep}", {"description": "taken over"}),
    ("POST", "/v1/endpoints/{ep}/rotate-secret", {"grace_s": 0}),
    ("POST", "/v1/endpoints/{ep}/disable", None),
    ("POST", "/v1/endpoints/{ep}/enable", None),
    ("POST", "/v1/events", {"type": "ticket.created", "idempotency_key": "k1"}),
    ("POST", "/v1/events/batch", {"events": [{"type": "ticket.created"}]}),
    ("GET", "/v1/events/{evt}", None),
    ("GET", "/v1/deliveries", None),
    ("GET", "/v1/deliveries/{dlv}", None),
    ("GET", "/v1/dead-letters", None),
    ("POST", "/v1/dead-letters/replay", {"ids": ["{dlv}"]}),
]


@pytest.fixture
def acme_rows(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> dict[str, str]:
    """An endpoint of acme's, an event for it and its delivery, dead (so it is a dead letter)."""
    endpoint = client.post("/v1/endpoints", json={"url": HOOK}, headers=auth).json()
    event = client.post("/v1/events", json={"type": "ticket.created", "subject": "ticket:1"}, headers=auth).json()
    [delivery] = event["deliveries"]
    with transaction(sessions) as session:
        session.execute(
            update(Delivery).where(Delivery.id == delivery["id"]).values(state=DeliveryState.dead, due_at=None)
        )
    return {"ep": endpoint["id"], "evt": event["id"], "dlv": delivery["id"]}


@pytest.fixture
def globex(sessions: sessionmaker[Session]) -> dict[str, str]:
    """Headers with a key of a second tenant."""
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="globex")
        _, raw = queries.create_api_key(session=session, tenant_id=tenant.id)
    return {"Authorization": f"Bearer {raw}"}


def call(client: TestClient, method: str, path: str, body: Any, rows: dict[str, str], **kw: Any) -> httpx2.Response:
    path = path.format(**rows)
    if isinstance(body, dict) and "ids" in body:
        body = {"ids": [i.format(**rows) for i in body["ids"]]}
    return client.request(method, path, json=body, **kw)


def test_requests_without_a_valid_key_get_401_and_change_nothing(
    client: TestClient, auth: dict[str, str], acme_rows: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    raw = auth["Authorization"].removeprefix("Bearer ")
    _, prefix, secret = raw.split("_", 2)
    wrong: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": f"Basic {raw}"},
        {"Authorization": raw},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer hk_only"},
        {"Authorization": f"Bearer xx_{prefix}_{secret}"},
        {"Authorization": f"Bearer hk_{prefix}_{secret[:-1]}"},
        {"Authorization": f"Bearer hk_000000000000_{secret}"},
        {"Authorization": f"Bearer {raw}x"},
    ]
    before = row_counts(sessions)
    for method, path, body in ROUTES:
        for headers in wrong:
            answer = call(client, method, path, body, acme_rows, headers=headers)
            problem = assert_problem(answer, 401, "unauthorized", "authorization")
            assert answer.headers["www-authenticate"] == "Bearer"
            assert secret not in problem["detail"]
    assert row_counts(sessions) == before
    with sessions() as session:
        assert session.get(Delivery, acme_rows["dlv"]).state == DeliveryState.dead  # type: ignore[union-attr]
    # The same requests with the real key succeed: the 401s above are about the key alone.
    assert client.get(f"/v1/endpoints/{acme_rows['ep']}", headers=auth).status_code == 200
    assert client.get("/v1/endpoints", headers={"Authorization": f"bearer {raw}"}).status_code == 200


def test_a_revoked_key_is_refused(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> None:
    assert client.get("/v1/endpoints", headers=auth).status_code == 200
    prefix = auth["Authorization"].split("_")[1]
    with transaction(sessions) as session:
        queries.revoke_api_key(session=session, prefix=prefix)
    before = row_counts(sessions)
    for method, path, body in [("GET", "/v1/endpoints", None), ("POST", "/v1/events", {"type": "a"})]:
        answer = client.request(method, path, json=body, headers=auth)
        problem = assert_problem(answer, 401, "unauthorized", "authorization")
        assert "revoked" in problem["detail"]
        assert answer.headers["www-authenticate"] == "Bearer"
    assert row_counts(sessions) == before


def test_another_tenants_ids_answer_404_and_never_appear_in_lists(
    client: TestClient,
    auth: dict[str, str],
    globex: dict[str, str],
    acme_rows: dict[str, str],
    sessions: sessionmaker[Session],
) -> None:
    fields = {"ep": "endpoint_id", "evt": "event_id", "dlv": "delivery_id"}
    before = row_counts(sessions)
    for method, path, body in ROUTES:
        if "{" not in path and "ids" not in (body or {}):
            continue
        answer = call(client, method, path, body, acme_rows, headers=globex)
        kind = next((k for k in fields if "{" + k + "}" in path), None)
        assert_problem(answer, 404, "not_found", fields[kind] if kind else "ids")
    assert row_counts(sessions) == before
    acme_view = client.get(f"/v1/endpoints/{acme_rows['ep']}", headers=auth).json()
    assert (acme_view["description"], acme_view["enabled"]) == ("", True)
    with sessions() as session:
        assert session.get(Delivery, acme_rows["dlv"]).state == DeliveryState.dead  # type: ignore[union-attr]

    # globex's own rows, to show its lists are not simply empty
    own = client.post("/v1/endpoints", json={"url": HOOK}, headers=globex).json()["id"]
    event = client.post("/v1/events", json={"type": "ticket.created", "subject": "ticket:1"}, headers=globex).json()
    assert [d["endpoint_id"] for d in event["deliveries"]] == [own]
    acme_ids = set(acme_rows.values())
    for path in ("/v1/endpoints", "/v1/deliveries", "/v1/deliveries?subject=ticket:1", "/v1/dead-letters"):
        listed = {row["id"] for row in client.get(path, headers=globex).json()["data"]}
        assert not listed & acme_ids, path
    assert {row["id"] for row in client.get("/v1/deliveries", headers=globex).json()["data"]} == {
        d["id"] for d in event["deliveries"]
    }
    replay = client.post("/v1/dead-letters/replay", json={"filter": {"subject": "ticket:1"}}, headers=globex)
    assert replay.status_code == 200, replay.text
    assert acme_rows["dlv"] not in replay.json()["replayed"] + replay.json()["skipped"]

    before = row_counts(sessions)
    targeted = client.post("/v1/events", json={"type": "a", "endpoint_ids": [own, acme_rows["ep"]]}, headers=globex)
    assert_problem(targeted, 422, "validation_error", "endpoint_ids.1")
    targeted = client.post("/v1/events", json={"type": "a", "endpoint_ids": [acme_rows["ep"]]}, headers=globex)
    assert_problem(targeted, 422, "validation_error", "endpoint_ids.0")
    batch = {"events": [{"type": "a"}, {"type": "a", "endpoint_ids": [acme_rows["ep"]]}]}
    assert_problem(
        client.post("/v1/events/batch", json=batch, headers=globex), 422, "validation_error", "events.1.endpoint_ids.0"
    )
    assert row_counts(sessions) == before
    with sessions() as session:
        assert session.get(Delivery, acme_rows["dlv"]).state == DeliveryState.dead  # type: ignore[union-attr]


def test_idempotency_keys_belong_to_one_tenant(
    client: TestClient, auth: dict[str, str], globex: dict[str, str]
) -> None:
    body = {"type": "ticket.created", "idempotency_key": "shared-key"}
    acme = client.post("/v1/events", json=body, headers=auth)
    theirs = client.post("/v1/events", json={**body, "subject": "other"}, headers=globex)
    assert acme.status_code == theirs.status_code == 202, theirs.text
    assert acme.json()["id"] != theirs.json()["id"]
