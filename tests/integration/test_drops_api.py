"""/v1/drops: live progress, tenancy, problem answers, and each drop's dead letters listed and replayed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from herald.config import IngestSettings, Settings
from herald.ingest.drops import DropState, Ingester
from herald.store import queries
from herald.store.db import transaction
from herald.store.ids import new_id
from herald.store.models import Delivery, DeliveryState, Drop, Endpoint, utcnow
from tests.support import assert_problem, row_counts


def ingest(
    settings: Settings, sessions: sessionmaker[Session], folder: Path, campaign: str, tenant: str, lines: list[str]
) -> str:
    """Drop ``lines`` into ``campaign`` (created for ``tenant`` with a new endpoint) and ingest it."""
    with transaction(sessions) as session:
        tenant_id = queries.get_tenant(session=session, ref=tenant).id
        endpoint = Endpoint(id=new_id("end"), tenant_id=tenant_id, url="http://127.0.0.1:9/hook")
        session.add(endpoint)
    endpoint_id = endpoint.id
    (folder / campaign).mkdir(parents=True)
    config = {"tenant": tenant, "endpoint_id": endpoint_id, "event_type": "promo.sent"}
    (folder / campaign / "campaign.json").write_text(json.dumps(config))
    path = folder / campaign / "users.txt"
    path.write_text("\n".join(lines) + "\n")
    tuned = settings.model_copy(update={"ingest": IngestSettings(chunk_size=7)})
    outcome = Ingester(settings=tuned, sessions=sessions, directory=folder).process(path)
    assert outcome.drop_id
    return outcome.drop_id


def set_states(sessions: sessionmaker[Session], drop_id: str, states: list[str]) -> list[str]:
    """What workers leave behind, in delivery id order; returns the ids."""
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Delivery.id).where(Delivery.drop_id == drop_id).order_by(Delivery.id)))
        for delivery_id, state in zip(ids, states, strict=False):
            finished = state in (DeliveryState.delivered, DeliveryState.dead)
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    state=state,
                    due_at=None if finished else utcnow(),
                    finished_at=utcnow() if finished else None,
                    attempts=4 if state == DeliveryState.dead else 1,
                    last_error="HTTP 500" if state == DeliveryState.dead else None,
                )
            )
    return ids


@pytest.fixture
def drop_id(settings: Settings, sessions: sessionmaker[Session], api_key: str, tmp_path: Path) -> str:
    lines = ["# spring", *[f"u{n}" for n in range(20)], "bad id", "u3"]
    return ingest(settings, sessions, tmp_path / "drops", "spring", "acme", lines)


@pytest.fixture
def other_auth(client: TestClient, sessions: sessionmaker[Session]) -> dict[str, str]:
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="globex")
        _, raw = queries.create_api_key(session=session, tenant_id=tenant.id)
    return {"Authorization": f"Bearer {raw}"}


def test_a_drop_shows_its_counts_rejections_and_live_progress(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], drop_id: str
) -> None:
    answer = client.get(f"/v1/drops/{drop_id}", headers=auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["name"], body["campaign"], body["state"], body["file"]) == (
        "spring/users.txt",
        "spring",
        "delivering",
        "done/spring/users.txt",
    )
    assert (body["lines"], body["accepted"], body["rejected"]) == (23, 20, 2)
    assert body["rejections"] == [
        {"line": 22, "reason": "user_id: ' ' not allowed (only A-Z a-z 0-9 _ . : @ -), got 'bad id'"},
        {"line": 23, "reason": "duplicate of line 5"},
    ]
    assert body["progress"] == {"delivered": 0, "dead": 0, "pending": 20, "other": 0, "percent": 0.0}

    set_states(sessions, drop_id, ["delivered"] * 9 + ["dead"] + ["sending"])
    body = client.get(f"/v1/drops/{drop_id}", headers=auth).json()
    assert body["progress"] == {"delivered": 9, "dead": 1, "pending": 10, "other": 0, "percent": 50.0}
    assert body["completed_at"] is None


def test_drops_are_listed_per_tenant_with_cursor_pages_and_a_state_filter(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    drop_id: str,
) -> None:
    second = ingest(settings, sessions, tmp_path / "drops", "autumn", "acme", ["a1", "a2"])
    theirs = ingest(settings, sessions, tmp_path / "drops", "theirs", "globex", ["g1"])
    first_page = client.get("/v1/drops?limit=1", headers=auth).json()
    assert [d["id"] for d in first_page["data"]] == [drop_id] and first_page["data"][0]["rejections"] is None
    assert first_page["data"][0]["progress"]["pending"] == 20
    rest = client.get(f"/v1/drops?limit=1&cursor={first_page['next_cursor']}", headers=auth).json()
    assert [d["id"] for d in rest["data"]] == [second] and rest["next_cursor"] is None
    assert [d["id"] for d in client.get("/v1/drops", headers=other_auth).json()["data"]] == [theirs]
    assert client.get("/v1/drops?state=finished", headers=auth).json()["data"] == []
    assert len(client.get("/v1/drops?state=delivering", headers=auth).json()["data"]) == 2


def test_a_drop_needs_a_key_and_another_tenants_drop_is_not_found(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], sessions: sessionmaker[Session], drop_id: str
) -> None:
    set_states(sessions, drop_id, ["dead"])
    for method, url in [
        ("GET", "/v1/drops"),
        ("GET", f"/v1/drops/{drop_id}"),
        ("GET", f"/v1/drops/{drop_id}/dead-letters"),
        ("POST", f"/v1/drops/{drop_id}/replay"),
    ]:
        assert_problem(client.request(method, url), 401, "unauthorized", "authorization")
    before = row_counts(sessions)
    for method, url in [
        ("GET", f"/v1/drops/{drop_id}"),
        ("GET", f"/v1/drops/{drop_id}/dead-letters"),
        ("POST", f"/v1/drops/{drop_id}/replay"),
    ]:
        assert_problem(client.request(method, url, headers=other_auth), 404, "not_found", "drop_id")
    assert row_counts(sessions) == before
    with sessions() as session:
        assert session.scalar(select(Delivery.state).where(Delivery.drop_id == drop_id).order_by(Delivery.id)) == "dead"


def test_bad_ids_and_filters_are_problems(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(client.get("/v1/drops/drp_nope", headers=auth), 404, "not_found", "drop_id")
    for method, url, field in [
        ("GET", "/v1/drops/bad-id!", "drop_id"),
        ("GET", f"/v1/drops/{'x' * 41}", "drop_id"),
        ("GET", "/v1/drops?state=lost", "state"),
        ("GET", "/v1/drops?limit=0", "limit"),
        ("GET", "/v1/drops?cursor=a%00b", "cursor"),
        ("GET", "/v1/drops/bad-id!/dead-letters", "drop_id"),
        ("POST", "/v1/drops/bad-id!/replay", "drop_id"),
    ]:
        assert_problem(client.request(method, url, headers=auth), 422, "validation_error", field)


def test_bad_replay_bodies_are_problems(client: TestClient, auth: dict[str, str], drop_id: str) -> None:
    for body, field in [
        ({"ids": []}, "ids"),
        ({"ids": ["x!"]}, "ids.0"),
        ({"force": "yes"}, "force"),
        ({"filter": {}}, "filter"),
    ]:
        assert_problem(
            client.post(f"/v1/drops/{drop_id}/replay", json=body, headers=auth), 422, "validation_error", field
        )


def test_dead_letters_of_a_drop_are_listed_and_replayed_with_their_ids(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    drop_id: str,
) -> None:
    other = ingest(settings, sessions, tmp_path / "drops", "other", "acme", ["o1", "o2"])
    ids = set_states(sessions, drop_id, ["dead"] * 3 + ["delivered"] * 17)
    set_states(sessions, other, ["dead", "dead"])
    with transaction(sessions) as session:
        session.execute(update(Drop).where(Drop.id == drop_id).values(state=DropState.finished))

    listed = client.get(f"/v1/drops/{drop_id}/dead-letters?limit=2", headers=auth).json()
    assert [d["id"] for d in listed["data"]] == ids[:2] and listed["data"][0]["last_error"] == "HTTP 500"
    page_two = client.get(f"/v1/drops/{drop_id}/dead-letters?cursor={listed['next_cursor']}", headers=auth).json()
    assert [d["id"] for d in page_two["data"]] == ids[2:3]

    answer = client.post(f"/v1/drops/{drop_id}/replay", headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"replayed": ids[:3], "skipped": []}
    with sessions() as session:
        states = dict(session.execute(select(Delivery.id, Delivery.state).where(Delivery.id.in_(ids[:3]))).all())
        others = set(session.scalars(select(Delivery.state).where(Delivery.drop_id == other)))
        drop = session.get(Drop, drop_id)
    assert set(states.values()) == {"queued"} and others == {"dead"}  # another drop's dead letters stay
    assert drop is not None and drop.state == DropState.delivering  # its report will be rewritten
    assert client.post(f"/v1/drops/{drop_id}/replay", json={}, headers=auth).json() == {"replayed": [], "skipped": []}
    body = client.get(f"/v1/drops/{drop_id}", headers=auth).json()
    assert body["progress"]["pending"] == 3 and body["progress"]["dead"] == 0


def test_replaying_chosen_ids_of_a_drop_refuses_ids_of_another(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    drop_id: str,
) -> None:
    other = ingest(settings, sessions, tmp_path / "drops", "other", "acme", ["o1"])
    ids = set_states(sessions, drop_id, ["dead", "dead", "delivered"])
    [foreign] = set_states(sessions, other, ["dead"])
    answer = client.post(f"/v1/drops/{drop_id}/replay", json={"ids": [ids[0], foreign]}, headers=auth)
    assert_problem(answer, 404, "not_found", "ids")
    answer = client.post(f"/v1/drops/{drop_id}/replay", json={"ids": [ids[0], ids[2]]}, headers=auth)
    assert answer.json() == {"replayed": [ids[0]], "skipped": [ids[2]]}
    forced = client.post(f"/v1/drops/{drop_id}/replay", json={"ids": [ids[2]], "force": True}, headers=auth)
    assert forced.json() == {"replayed": [ids[2]], "skipped": []}
