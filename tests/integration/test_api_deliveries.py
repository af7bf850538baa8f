"""/v1/deliveries and /v1/dead-letters: state and attempts, filters, cursor pages, replay."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import Settings
from herald.store.db import transaction
from herald.store.models import Attempt, Delivery, DeliveryState, utcnow
from tests.support import assert_problem, row_counts

HOOK = "http://127.0.0.1:9/hook"


def set_state(sessions: sessionmaker[Session], ids: list[str], state: DeliveryState, **values: Any) -> None:
    """What a worker would leave behind: ``dead`` and ``delivered`` rows are finished and not due."""
    if state in (DeliveryState.dead, DeliveryState.delivered):
        values = {"due_at": None, "lease_until": None, "finished_at": utcnow(), "attempts": 3} | values
    with transaction(sessions) as session:
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(state=state, **values))


def snapshot(sessions: sessionmaker[Session]) -> dict[str, tuple[str, int]]:
    with sessions() as session:
        return {i: (s, r) for i, s, r in session.execute(select(Delivery.id, Delivery.state, Delivery.replays))}


@dataclass
class World:
    """Two endpoints and 2 x ``events`` deliveries over two subjects and two types; some of them dead."""

    endpoints: list[str]
    rows: list[dict[str, Any]]  # id, endpoint_id, subject, event_type
    dead: list[str]

    def ids(self, **match: Any) -> list[str]:
        return sorted(r["id"] for r in self.rows if all(r[k] == v for k, v in match.items()))


def build_world(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], events: int) -> World:
    endpoints = [client.post("/v1/endpoints", json={"url": HOOK}, headers=auth).json()["id"] for _ in range(2)]
    batch = [{"type": ("ticket.created", "ticket.closed")[n % 2], "subject": f"ticket:{n % 3}"} for n in range(events)]
    answer = client.post("/v1/events/batch", json={"events": batch}, headers=auth)
    assert answer.status_code == 202, answer.text
    rows = [
        {"id": d["id"], "endpoint_id": d["endpoint_id"], "subject": e["subject"], "event_type": e["type"]}
        for e in answer.json()["events"]
        for d in e["deliveries"]
    ]
    dead = sorted(r["id"] for r in rows[::3])
    set_state(sessions, dead, DeliveryState.dead, last_status_code=500, last_error="HTTP 500")
    for r in rows:
        r["state"] = "dead" if r["id"] in dead else "queued"
    return World(endpoints, rows, dead)


@pytest.fixture
def world(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> World:
    return build_world(client, auth, sessions, events=6)


@pytest.fixture
def wake_list(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


def listed(client: TestClient, auth: dict[str, str], path: str, **params: Any) -> list[str]:
    answer = client.get(path, params=params, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["next_cursor"] is None
    return [row["id"] for row in answer.json()["data"]]


def test_read_delivery_shows_state_and_attempts(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": HOOK}, headers=auth).json()["id"]
    event = client.post("/v1/events", json={"type": "ticket.created", "subject": "ticket:9"}, headers=auth).json()
    [brief] = event["deliveries"]
    fresh = client.get(f"/v1/deliveries/{brief['id']}", headers=auth)
    assert fresh.status_code == 200, fresh.text
    assert (fresh.json()["state"], fresh.json()["attempt_count"], fresh.json()["attempts"]) == ("queued", 0, [])
    assert fresh.json()["next_attempt_at"] is not None

    started = utcnow()
    set_state(sessions, [brief["id"]], DeliveryState.dead, attempts=2, last_status_code=503, last_error="HTTP 503")
    with transaction(sessions) as session:
        for number, decision in ((1, "retry in 0.2s"), (2, "dead: 2 attempts exhausted")):
            session.add(
                Attempt(
                    delivery_id=brief["id"],
                    number=number,
                    started_at=started + timedelta(seconds=number),
                    latency_ms=12,
                    status_code=503,
                    outcome="failed",
                    error="HTTP 503",
                    decision=decision,
                )
            )
    record = client.get(f"/v1/deliveries/{brief['id']}", headers=auth).json()
    assert record["id"] == brief["id"] and record["event_id"] == event["id"] and record["endpoint_id"] == endpoint
    assert (record["state"], record["attempt_count"], record["last_status_code"]) == ("dead", 2, 503)
    assert (record["lane"], record["event_type"], record["subject"]) == ("transactional", "ticket.created", "ticket:9")
    assert record["next_attempt_at"] is None and record["finished_at"] is not None and record["replays"] == 0
    assert [(a["number"], a["status_code"], a["decision"]) for a in record["attempts"]] == [
        (1, 503, "retry in 0.2s"),
        (2, 503, "dead: 2 attempts exhausted"),
    ]
    assert_problem(client.get("/v1/deliveries/dlv_01NOSUCHDELIVERY", headers=auth), 404, "not_found", "delivery_id")
    assert_problem(client.get("/v1/deliveries/dlv%00x", headers=auth), 422, "validation_error", "delivery_id")


def test_delivery_lists_filter_by_state_subject_endpoint_and_type(
    client: TestClient, auth: dict[str, str], world: World
) -> None:
    first, second = world.endpoints
    cases: list[dict[str, Any]] = [
        {},
        {"state": "dead"},
        {"state": "queued"},
        {"state": "delivered"},
        {"subject": "ticket:1"},
        {"subject": "ticket:404"},
        {"endpoint_id": first},
        {"event_type": "ticket.closed"},
        {"state": "dead", "subject": "ticket:0", "endpoint_id": second},
    ]
    for match in cases:
        params = {("endpoint" if k == "endpoint_id" else k): v for k, v in match.items()}
        assert listed(client, auth, "/v1/deliveries", **params) == world.ids(**match), match
        params.pop("state", None)  # dead letters are the dead ones whatever else is asked
        dead = listed(client, auth, "/v1/dead-letters", **params)
        assert dead == world.ids(**{**match, "state": "dead"}), match
    assert world.ids(state="dead") and world.ids(state="queued")  # the world has rows of both kinds

    bad: list[tuple[dict[str, Any], str]] = [
        ({"state": "lost"}, "state"),
        ({"endpoint": "not an id"}, "endpoint"),
        ({"subject": "ticket 1"}, "subject"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "x" * 41}, "cursor"),
    ]
    for query, field in bad:
        assert_problem(client.get("/v1/deliveries", params=query, headers=auth), 422, "validation_error", field)


def test_dead_letter_lists_filter_by_creation_time(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], world: World
) -> None:
    old = world.dead[: len(world.dead) // 2]
    with transaction(sessions) as session:
        session.execute(update(Delivery).where(Delivery.id.in_(old)).values(created_at=utcnow() - timedelta(days=2)))
    boundary = (utcnow() - timedelta(days=1)).isoformat()
    assert listed(client, auth, "/v1/dead-letters") == world.dead
    assert listed(client, auth, "/v1/dead-letters", created_before=boundary) == sorted(old)
    assert listed(client, auth, "/v1/dead-letters", created_after=boundary) == sorted(set(world.dead) - set(old))
    naive = client.get("/v1/dead-letters", params={"created_after": "2024-01-01T00:00:00"}, headers=auth)
    assert_problem(naive, 422, "validation_error", "created_after")
    garbage = client.get("/v1/dead-letters", params={"created_before": "yesterday"}, headers=auth)
    assert_problem(garbage, 422, "validation_error", "created_before")


def test_cursor_pages_walk_every_row_exactly_once(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    world = build_world(client, auth, sessions, events=13)

    @hypothesis_settings(max_examples=25, deadline=None)
    @given(
        limit=st.integers(min_value=1, max_value=30),
        path=st.sampled_from(["/v1/deliveries", "/v1/dead-letters"]),
        match=st.sampled_from([{}, {"subject": "ticket:1"}, {"endpoint_id": world.endpoints[0]}, {"state": "queued"}]),
    )
    def walk(limit: int, path: str, match: dict[str, str]) -> None:
        params = {("endpoint" if k == "endpoint_id" else k): v for k, v in match.items()}
        if path == "/v1/dead-letters":
            params.pop("state", None)
            match = {**match, "state": "dead"}
        seen: list[str] = []
        cursor = None
        for _ in range(len(world.rows) + 2):
            page = client.get(
                path, params=params | {"limit": limit} | ({"cursor": cursor} if cursor else {}), headers=auth
            )
            assert page.status_code == 200, page.text
            ids = [row["id"] for row in page.json()["data"]]
            assert len(ids) <= limit
            seen += ids
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
            assert cursor == ids[-1]
        assert cursor is None
        assert seen == world.ids(**match)

    walk()


def test_replay_by_ids_requeues_dead_letters_once(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    wake_list: redis.Redis,
    world: World,
) -> None:
    chosen, untouched = world.dead[:2], world.dead[2:]
    counts = row_counts(sessions)
    wake_key = keys.wake(settings.redis.key_prefix)
    wake_list.delete(wake_key)

    answer = client.post("/v1/dead-letters/replay", json={"ids": chosen}, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"replayed": chosen, "skipped": [], "reasons": {}}
    assert wake_list.llen(wake_key) >= 1
    for delivery_id in chosen:
        record = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()
        assert (record["id"], record["state"], record["replays"]) == (delivery_id, "queued", 1)
        assert record["attempt_count"] == 0 and record["finished_at"] is None
        assert record["next_attempt_at"] is not None
    assert all(snapshot(sessions)[i] == ("dead", 0) for i in untouched)
    assert listed(client, auth, "/v1/dead-letters") == untouched
    assert row_counts(sessions) == counts  # the same rows, not copies

    again = client.post("/v1/dead-letters/replay", json={"ids": chosen}, headers=auth)
    pending = "state queued: still pending or in flight"
    assert again.json() == {"replayed": [], "skipped": chosen, "reasons": dict.fromkeys(chosen, pending)}
    assert [snapshot(sessions)[i] for i in chosen] == [("queued", 1)] * 2

    set_state(sessions, chosen[:1], DeliveryState.delivered)
    plain = client.post("/v1/dead-letters/replay", json={"ids": chosen[:1]}, headers=auth)
    assert plain.json() == {
        "replayed": [],
        "skipped": chosen[:1],
        "reasons": {chosen[0]: "state delivered: not dead; force re-sends it"},
    }
    forced = client.post("/v1/dead-letters/replay", json={"ids": chosen, "force": True}, headers=auth)
    # the queued one is not re-sent, even by force
    assert forced.json() == {"replayed": chosen[:1], "skipped": chosen[1:], "reasons": {chosen[1]: pending}}
    assert snapshot(sessions)[chosen[0]] == ("queued", 2)
    assert row_counts(sessions) == counts


def deadline(client: TestClient, auth: dict[str, str], delivery_id: str) -> tuple[str, int, datetime | None]:
    record = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()
    by = record["deliver_by"]
    return record["state"], record["replays"], datetime.fromisoformat(by) if by else None


def test_replay_keeps_deadlines_and_skips_passed_ones_unless_forced(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], world: World
) -> None:
    """A replayed visit reminder keeps its deadline (never sent late); one already past it is
    skipped with a reason, and ``force`` sends it late by lifting the deadline."""
    ahead_id, passed_id, none_id, passed_too_id = world.dead
    ahead, passed = utcnow() + timedelta(hours=1), utcnow() - timedelta(hours=1)
    set_state(sessions, [ahead_id], DeliveryState.dead, deliver_by=ahead)
    set_state(sessions, [passed_id, passed_too_id], DeliveryState.dead, deliver_by=passed)
    counts = row_counts(sessions)

    by_filter = client.post("/v1/dead-letters/replay", json={"filter": {}}, headers=auth)
    assert by_filter.status_code == 200, by_filter.text
    assert by_filter.json()["replayed"] == sorted([ahead_id, none_id])
    assert by_filter.json()["skipped"] == sorted([passed_id, passed_too_id])
    for reason in by_filter.json()["reasons"].values():
        assert reason == f"deliver_by {passed.isoformat()} has passed; force sends it late"
    assert deadline(client, auth, ahead_id) == ("queued", 1, ahead)
    assert deadline(client, auth, none_id) == ("queued", 1, None)
    assert deadline(client, auth, passed_id) == ("dead", 0, passed)

    by_ids = client.post("/v1/dead-letters/replay", json={"ids": [passed_id]}, headers=auth).json()
    assert (by_ids["replayed"], by_ids["skipped"], list(by_ids["reasons"])) == ([], [passed_id], [passed_id])
    assert deadline(client, auth, passed_id) == ("dead", 0, passed)

    set_state(sessions, [ahead_id], DeliveryState.dead)
    forced = client.post("/v1/dead-letters/replay", json={"ids": [passed_id, ahead_id], "force": True}, headers=auth)
    assert forced.json() == {"replayed": sorted([passed_id, ahead_id]), "skipped": [], "reasons": {}}
    assert deadline(client, auth, passed_id) == ("queued", 1, None)  # the operator chose a late send
    assert deadline(client, auth, ahead_id) == ("queued", 2, ahead)  # a deadline still ahead holds
    assert deadline(client, auth, passed_too_id) == ("dead", 0, passed)
    assert row_counts(sessions) == counts


def test_one_time_passcodes_are_never_replayed(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], world: World
) -> None:
    otp = world.dead[0]
    set_state(sessions, [otp], DeliveryState.dead, category="otp")
    for force in (False, True):
        answer = client.post("/v1/dead-letters/replay", json={"ids": [otp], "force": force}, headers=auth).json()
        assert answer == {"replayed": [], "skipped": [otp], "reasons": {otp: "one-time passcodes are never replayed"}}
    assert snapshot(sessions)[otp] == ("dead", 0)


def test_replay_by_filter_touches_only_matching_dead_letters(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], world: World
) -> None:
    first = world.endpoints[0]
    match = {"subject": "ticket:0", "endpoint_id": first}
    expected = world.ids(state="dead", **match)
    assert expected and set(world.dead) - set(expected)
    before = snapshot(sessions)

    answer = client.post("/v1/dead-letters/replay", json={"filter": match}, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["replayed"] == expected
    assert sorted(answer.json()["skipped"]) == world.ids(state="queued", **match)
    after = snapshot(sessions)
    assert {i for i in after if after[i] != before[i]} == set(expected)
    assert all(after[i] == ("queued", 1) for i in expected)

    by_type = client.post("/v1/dead-letters/replay", json={"filter": {"event_type": "ticket.closed"}}, headers=auth)
    assert by_type.json()["replayed"] == sorted(
        set(world.ids(state="dead", event_type="ticket.closed")) - set(expected)
    )
    everything = client.post("/v1/dead-letters/replay", json={"filter": {}}, headers=auth)
    assert everything.json()["replayed"] == sorted(set(world.dead) - set(expected) - set(by_type.json()["replayed"]))
    assert listed(client, auth, "/v1/dead-letters") == []
    assert client.post("/v1/dead-letters/replay", json={"filter": {}}, headers=auth).json()["replayed"] == []


def test_bad_replays_get_a_problem_and_change_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], world: World
) -> None:
    before, counts = snapshot(sessions), row_counts(sessions)
    dead = world.dead[0]
    unknown = client.post("/v1/dead-letters/replay", json={"ids": [dead, "dlv_01NOSUCHDELIVERY"]}, headers=auth)
    assert "dlv_01NOSUCHDELIVERY" in assert_problem(unknown, 404, "not_found", "ids")["detail"]
    for body, field in [
        ({}, "ids"),
        ({"force": True}, "ids"),
        ({"ids": [dead], "filter": {"subject": "ticket:0"}}, "ids"),
        ({"ids": []}, "ids"),
        ({"ids": dead}, "ids"),
        ({"ids": ["not an id"]}, "ids.0"),
        ({"ids": [dead], "force": "yes"}, "force"),
        ({"ids": [dead], "colour": 1}, "colour"),
        ({"filter": {"colour": 1}}, "filter.colour"),
        ({"filter": {"endpoint_id": 5}}, "filter.endpoint_id"),
        ({"filter": {"created_after": "2024-01-01T00:00:00"}}, "filter.created_after"),
        ({"filter": "dead"}, "filter"),
    ]:
        assert_problem(client.post("/v1/dead-letters/replay", json=body, headers=auth), 422, "validation_error", field)
    assert (snapshot(sessions), row_counts(sessions)) == (before, counts)
