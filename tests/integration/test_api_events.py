"""POST /v1/events and /v1/events/batch, GET /v1/events/{id}: acceptance, idempotency, lanes, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from herald.api.app import create_app
from herald.config import Settings
from herald.store.models import Delivery
from tests import strategies
from tests.support import assert_problem, row_counts


def make_endpoint(client: TestClient, auth: dict[str, str], **extra: Any) -> str:
    answer = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook", **extra}, headers=auth)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient]:
    """The API with a 2 KiB body limit."""
    app = create_app(settings.model_copy(update={"api": settings.api.model_copy(update={"max_body_bytes": 2048})}))
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


def test_event_is_accepted_with_ids_and_a_status_url(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint_id = make_endpoint(client, auth)
    before = row_counts(sessions)
    answer = client.post(
        "/v1/events",
        json={"type": "ticket.escalated", "subject": "ticket:4711", "data": {"level": 2, "note": "ü\u0000"}},
        headers=auth,
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["id"].startswith("evt_")
    assert accepted["lane"] == "transactional"
    [brief] = accepted["deliveries"]
    assert brief["id"].startswith("dlv_") and brief["endpoint_id"] == endpoint_id and brief["state"] == "queued"
    assert accepted["status_url"].endswith(f"/v1/events/{accepted['id']}")
    after = row_counts(sessions)
    assert (after["events"], after["deliveries"]) == (before["events"] + 1, before["deliveries"] + 1)

    event = client.get(accepted["status_url"], headers=auth)
    assert event.status_code == 200, event.text
    assert event.json()["data"] == {"level": 2, "note": "ü\u0000"}
    assert event.json()["subject"] == "ticket:4711"
    assert [d["id"] for d in event.json()["deliveries"]] == [brief["id"]]
    assert_problem(client.get("/v1/events/evt_01NOSUCHEVENT", headers=auth), 404, "not_found", "event_id")
    assert_problem(client.get("/v1/events/evt%00x", headers=auth), 422, "validation_error", "event_id")


def test_lanes_default_to_transactional_and_are_stored_on_deliveries(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth)
    lanes = {}
    for lane in (None, "otp", "bulk", "transactional"):
        body: dict[str, Any] = {"type": "otp.code"} | ({"lane": lane} if lane else {})
        answer = client.post("/v1/events", json=body, headers=auth)
        assert answer.status_code == 202, answer.text
        assert answer.json()["lane"] == (lane or "transactional")
        lanes[answer.json()["deliveries"][0]["id"]] = lane or "transactional"
    with sessions() as session:
        stored = dict(session.execute(select(Delivery.id, Delivery.lane).where(Delivery.id.in_(lanes))).all())
    assert stored == lanes
    for delivery_id, lane in lanes.items():
        assert client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()["lane"] == lane


def test_same_idempotency_key_and_body_answers_the_same_and_writes_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth)
    body = {"type": "ticket.created", "subject": "ticket:1", "data": {"a": [1, 2]}, "idempotency_key": "req-1"}
    first = client.post("/v1/events", json=body, headers=auth)
    assert first.status_code == 202, first.text
    counts = row_counts(sessions)
    assert counts["idempotency_records"] == 1

    again = client.post("/v1/events", json=dict(reversed(body.items())), headers=auth)
    assert again.status_code == 202, again.text
    assert again.json() == first.json()
    in_batch = client.post("/v1/events/batch", json={"events": [body]}, headers=auth)
    assert in_batch.status_code == 202, in_batch.text
    assert in_batch.json()["events"] == [first.json()]
    assert row_counts(sessions) == counts

    changed = client.post("/v1/events", json={**body, "data": {"a": [2, 1]}}, headers=auth)
    problem = assert_problem(changed, 409, "conflict", "idempotency_key")
    assert "req-1" in problem["detail"]
    other_lane = client.post("/v1/events", json={**body, "lane": "otp"}, headers=auth)
    assert_problem(other_lane, 409, "conflict", "idempotency_key")
    batch = {"events": [{"type": "fresh.one"}, {**body, "subject": "ticket:2"}]}
    assert_problem(
        client.post("/v1/events/batch", json=batch, headers=auth), 409, "conflict", "events.1.idempotency_key"
    )
    assert row_counts(sessions) == counts


def test_a_batch_of_1000_is_accepted_in_one_request(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth)
    before = row_counts(sessions)
    events = [{"type": "drop.line", "subject": f"user:{n}", "lane": "bulk"} for n in range(1000)]
    answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
    assert answer.status_code == 202, answer.text
    accepted = answer.json()["events"]
    assert [a["subject"] for a in accepted] == [e["subject"] for e in events]
    assert len({a["id"] for a in accepted}) == 1000
    after = row_counts(sessions)
    assert after["events"] - before["events"] == 1000
    assert after["deliveries"] - before["deliveries"] == 1000


def test_bad_batches_write_nothing(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> None:
    make_endpoint(client, auth)
    good = [{"type": "ticket.created", "subject": f"ticket:{n}", "idempotency_key": f"k{n}"} for n in range(5)]
    cases: list[tuple[Any, str]] = [
        ({"events": [{"type": "a"}] * 1001}, "events"),
        ({"events": []}, "events"),
        ({"events": [*good[:2], {"type": 5}, *good[3:]]}, "events.2.type"),
        ({"events": [*good[:3], {**good[3], "lane": "fast"}, good[4]]}, "events.3.lane"),
        ({"events": [*good[:4], {"type": "a", "extra": 1}]}, "events.4.extra"),
        ({"events": [*good[:3], {"type": "a", "endpoint_ids": ["ep_01NOSUCHENDPOINT"]}]}, "events.3.endpoint_ids.0"),
        ({"events": [*good, {**good[1], "data": {"x": 1}}]}, "events.5.idempotency_key"),
        ({"events": {"type": "a"}}, "events"),
        ({"event": good}, "event"),
    ]
    before = row_counts(sessions)
    for body, field in cases:
        assert_problem(client.post("/v1/events/batch", json=body, headers=auth), 422, "validation_error", field)
    assert row_counts(sessions) == before


def test_bad_events_get_a_problem_naming_the_field_and_write_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth)
    deep: Any = {}
    for _ in range(40):
        deep = {"d": deep}
    raw_cases: list[tuple[bytes, str]] = [
        (b'{"type": "a",', "body"),
        (b"\x80", "body"),
        (b'{"type": "\xff"}', "body"),
        (b'{"type": "a", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
        (b"", "body"),
        (b"[]", "body"),
        (b'"ticket.created"', "body"),
        (b'{"type": "a", "data": {"x": NaN}}', "data"),
        (b'{"type": "a", "data": {"x": 1e999}}', "data"),
        (json.dumps({"type": "a", "data": deep}).encode(), "data"),
    ]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "a", "colour": "red"}, "colour"),
        ({"type": "a", "path": "/"}, "path"),
        ({"subject": "ticket:1"}, "type"),
        ({"type": 5}, "type"),
        ({"type": "has space"}, "type"),
        ({"type": "a", "data": "x"}, "data"),
        ({"type": "a", "data": [1]}, "data"),
        ({"type": "a", "lane": "fast"}, "lane"),
        ({"type": "a", "lane": "compute"}, "lane"),
        ({"type": "a", "endpoint_ids": "x"}, "endpoint_ids"),
        ({"type": "a", "endpoint_ids": []}, "endpoint_ids"),
        ({"type": "a", "endpoint_ids": ["ep_01NOSUCHENDPOINT"]}, "endpoint_ids.0"),
        ({"type": "a", "endpoint_ids": ["not an id"]}, "endpoint_ids.0"),
        ({"type": "a", "subject": "ticket 1"}, "subject"),
        ({"type": "a", "subject": "ticket:\u00001"}, "subject"),
        ({"type": "a", "subject": 4711}, "subject"),
        ({"type": "a", "idempotency_key": ""}, "idempotency_key"),
        ({"type": "a", "idempotency_key": 7}, "idempotency_key"),
    ]
    before = row_counts(sessions)
    for raw, field in raw_cases:
        answer = client.post("/v1/events", content=raw, headers={**auth, "Content-Type": "application/json"})
        assert_problem(answer, 422, "validation_error", field)
    for body, field in cases:
        assert_problem(client.post("/v1/events", json=body, headers=auth), 422, "validation_error", field)
    assert row_counts(sessions) == before


def test_naming_a_disabled_endpoint_is_refused_and_writes_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    """Accepted, such a delivery could only be dead-lettered at once: the producer hears it now."""
    enabled, disabled = make_endpoint(client, auth), make_endpoint(client, auth)
    assert client.post(f"/v1/endpoints/{disabled}/disable", headers=auth).status_code == 200
    single: list[tuple[dict[str, Any], str]] = [
        ({"type": "a", "endpoint_ids": [disabled]}, "endpoint_ids.0"),
        ({"type": "a", "endpoint_ids": [enabled, disabled], "idempotency_key": "k1"}, "endpoint_ids.1"),
    ]
    batch = {
        "events": [
            {"type": "a", "endpoint_ids": [enabled]},
            {"type": "b"},
            {"type": "a", "endpoint_ids": [enabled, enabled, disabled]},
        ]
    }
    before = row_counts(sessions)
    for body, field in single:
        body_ = assert_problem(client.post("/v1/events", json=body, headers=auth), 422, "validation_error", field)
        assert "endpoint disabled" in body_["detail"] and disabled in body_["detail"]
    answer = client.post("/v1/events/batch", json=batch, headers=auth)
    assert "endpoint disabled" in assert_problem(answer, 422, "validation_error", "events.2.endpoint_ids.2")["detail"]
    assert row_counts(sessions) == before

    assert client.post(f"/v1/endpoints/{disabled}/enable", headers=auth).status_code == 200
    accepted = client.post("/v1/events", json=single[1][0], headers=auth)
    assert accepted.status_code == 202, accepted.text  # the same key was not used up by the refusal
    assert [(d["endpoint_id"], d["state"]) for d in accepted.json()["deliveries"]] == [
        (enabled, "queued"),
        (disabled, "queued"),
    ]


def test_bodies_over_the_limit_get_413_with_or_without_content_length(
    small_client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    small_client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).raise_for_status()
    big = json.dumps({"type": "a", "data": {"blob": "x" * 3000}}).encode()
    before = row_counts(sessions)

    sized = small_client.post("/v1/events", content=big, headers={**auth, "Content-Type": "application/json"})
    assert sized.request.headers["content-length"] == str(len(big))
    assert_problem(sized, 413, "payload_too_large", "body")

    def chunks(body: bytes) -> Iterator[bytes]:
        yield from (body[i : i + 500] for i in range(0, len(body), 500))

    streamed = small_client.post(
        "/v1/events", content=chunks(big), headers={**auth, "Content-Type": "application/json"}
    )
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413, "payload_too_large", "body")
    batch = json.dumps({"events": [{"type": "a", "subject": f"s:{n}"} for n in range(100)]}).encode()
    assert_problem(
        small_client.post("/v1/events/batch", content=chunks(batch), headers=auth), 413, "payload_too_large", "body"
    )
    assert row_counts(sessions) == before

    small = json.dumps({"type": "a", "data": {"blob": "x" * 1500}}).encode()
    accepted = small_client.post(
        "/v1/events", content=chunks(small), headers={**auth, "Content-Type": "application/json"}
    )
    assert accepted.status_code == 202, accepted.text
    assert row_counts(sessions)["events"] == before["events"] + 1


def test_arbitrary_bodies_never_fail_the_server_and_write_only_when_accepted(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth)
    make_endpoint(client, auth, event_types=["ticket.*"])

    @hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=strategies.event_request_bodies)
    def post(body: bytes) -> None:
        before = row_counts(sessions)
        answer = client.post("/v1/events", content=body, headers={**auth, "Content-Type": "application/json"})
        after = row_counts(sessions)
        assert answer.status_code < 500, answer.text
        if answer.status_code != 202:
            assert_problem(answer, answer.status_code, answer.json()["code"], None)
            assert answer.json()["errors"] and all(e["field"] for e in answer.json()["errors"]), answer.json()
            assert after == before
            return
        accepted = answer.json()
        written = after["events"] - before["events"]
        assert written in (0, 1)  # 0: a repeated idempotency key answered from the record
        assert after["deliveries"] - before["deliveries"] == written * len(accepted["deliveries"])
        assert client.get(f"/v1/events/{accepted['id']}", headers=auth).status_code == 200

    post()
