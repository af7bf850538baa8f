"""/v1/endpoints: register (with the SSRF guard), read, change, rotate secrets, disable, enable, type filters."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from herald.api.app import create_app
from herald.config import Settings
from herald.store import queries
from herald.store.models import utcnow
from tests import strategies
from tests.support import assert_problem, row_counts

HOOK = "http://127.0.0.1:9/hook"


def make_endpoint(client: TestClient, auth: dict[str, str], **extra: Any) -> dict[str, Any]:
    answer = client.post("/v1/endpoints", json={"url": HOOK, **extra}, headers=auth)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def secrets_now(sessions: sessionmaker[Session], endpoint_id: str, *, later_s: float = 0) -> list[str]:
    with sessions() as session:
        found = queries.active_secrets(
            session=session, endpoint_ids=[endpoint_id], now=utcnow() + timedelta(seconds=later_s)
        )
    return found.get(endpoint_id, [])


@pytest.fixture
def strict_client(settings: Settings) -> Iterator[TestClient]:
    """The API as shipped: no network allowed beyond the public internet (not even loopback)."""
    app = create_app(
        settings.model_copy(update={"webhook": settings.webhook.model_copy(update={"allow_networks": []})})
    )
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


def test_register_shows_the_secret_once(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    created = make_endpoint(client, auth, description="complaints desk", event_types=["ticket.*"], max_rate_per_s=50)
    assert created["id"].startswith("ep_")
    assert created["secret"].startswith("whsec_")
    assert created["enabled"] is True and created["disabled_reason"] is None
    assert (created["url"], created["event_types"], created["max_rate_per_s"]) == (HOOK, ["ticket.*"], 50)
    assert secrets_now(sessions, created["id"]) == [created["secret"]]

    read = client.get(f"/v1/endpoints/{created['id']}", headers=auth)
    assert read.status_code == 200, read.text
    assert read.json()["secret"] is None
    assert {k: v for k, v in read.json().items() if k != "secret"} == {
        k: v for k, v in created.items() if k != "secret"
    }
    listed = client.get("/v1/endpoints", headers=auth).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert listed["data"][0]["secret"] is None
    assert created["secret"] not in read.text + str(listed)
    assert_problem(client.get("/v1/endpoints/ep_01NOSUCHENDPOINT", headers=auth), 404, "not_found", "endpoint_id")


def test_endpoint_listing_pages_with_a_cursor(client: TestClient, auth: dict[str, str]) -> None:
    ids = [make_endpoint(client, auth)["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = client.get("/v1/endpoints", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=auth)
        assert page.status_code == 200, page.text
        seen += [e["id"] for e in page.json()["data"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert_problem(client.get("/v1/endpoints?limit=0", headers=auth), 422, "validation_error", "limit")
    assert_problem(client.get("/v1/endpoints?cursor=a%00b", headers=auth), 422, "validation_error", "cursor")


def test_bad_registrations_name_the_field_and_write_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    cases: list[tuple[Any, str, str]] = [
        ({"url": HOOK, "secret": "whsec_mine"}, "validation_error", "secret"),
        ({}, "validation_error", "url"),
        ({"url": 5}, "validation_error", "url"),
        ({"url": ""}, "validation_error", "url"),
        ({"url": HOOK + "\u0000"}, "validation_error", "url"),
        ({"url": HOOK, "max_rate_per_s": "5"}, "validation_error", "max_rate_per_s"),
        ({"url": HOOK, "max_rate_per_s": 0}, "validation_error", "max_rate_per_s"),
        ({"url": HOOK, "max_rate_per_s": 2.5}, "validation_error", "max_rate_per_s"),
        ({"url": HOOK, "event_types": "ticket.*"}, "validation_error", "event_types"),
        ({"url": HOOK, "event_types": ["ticket.*", "bad type"]}, "validation_error", "event_types.1"),
        ({"url": HOOK, "description": 7}, "validation_error", "description"),
        ({"url": HOOK, "description": "x" * 1001}, "validation_error", "description"),
        ({"url": HOOK, "description": "nul\u0000"}, "validation_error", "description"),
        ([HOOK], "validation_error", "body"),
        ({"url": "ftp://example.com/hook"}, "unsafe_url", "url"),
        ({"url": "http://"}, "unsafe_url", "url"),
        ({"url": "http:///hook"}, "unsafe_url", "url"),
        ({"url": "garbage"}, "unsafe_url", "url"),
        ({"url": "javascript:alert(1)"}, "unsafe_url", "url"),
        ({"url": "//127.0.0.1/hook"}, "unsafe_url", "url"),
        ({"url": "http://user:pw@127.0.0.1:9/hook"}, "unsafe_url", "url"),
        ({"url": "http://[::1/hook"}, "unsafe_url", "url"),
        ({"url": "http://exa mple.com/"}, "unsafe_url", "url"),
    ]
    before = row_counts(sessions)
    for body, code, field in cases:
        answer = client.post("/v1/endpoints", json=body, headers=auth)
        problem = assert_problem(answer, 422, code, field)
        assert "pw" not in problem["detail"]
    answer = client.post("/v1/endpoints", content=b'{"url": ', headers={**auth, "Content-Type": "application/json"})
    assert_problem(answer, 422, "validation_error", "body")
    assert row_counts(sessions) == before


# Every one of these reaches a private, link-local, metadata or carrier-grade NAT address.
NON_PUBLIC_URLS = [
    "http://10.0.0.1/",
    "http://172.16.5.4:8080/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://167772161/",  # 10.0.0.1 in decimal
    "http://2852039166/",  # 169.254.169.254 in decimal
    "http://012.0.0.1/",  # octal
    "http://0251.0376.0251.0376/",  # 169.254.169.254 in octal
    "http://0xa9fea9fe/",  # hex
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://100.64.1/",  # shortened 100.64.0.1
    "http://[::ffff:10.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/",
    "http://[::ffff:100.64.0.1]/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://[::]/",
]
LOOPBACK_URLS = [
    "http://127.0.0.1:9/hook",
    "http://localhost:9/hook",
    "http://app.localhost/",
    "http://2130706433/",  # decimal
    "http://0177.0.0.1/",  # octal
    "http://0x7f000001/",  # hex
    "http://0x7f.1/",
    "http://127.1/",
    "http://[::1]:9/hook",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
]


def test_registration_refuses_non_public_targets_in_every_spelling(
    client: TestClient, strict_client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    before = row_counts(sessions)
    for url in NON_PUBLIC_URLS:
        for api in (client, strict_client):
            assert_problem(api.post("/v1/endpoints", json={"url": url}, headers=auth), 422, "unsafe_url", "url")
    for url in LOOPBACK_URLS:
        assert_problem(strict_client.post("/v1/endpoints", json={"url": url}, headers=auth), 422, "unsafe_url", "url")
    assert row_counts(sessions) == before
    # The test settings allow loopback: the same URLs are refused above by policy, not by accident.
    for url in ("http://127.0.0.1:9/hook", "http://2130706433/", "http://[::1]:9/hook"):
        assert client.post("/v1/endpoints", json={"url": url}, headers=auth).status_code == 201


def test_registration_refuses_private_addresses_in_generated_spellings(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    before = row_counts(sessions)
    private = strategies.ipv4_in(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"])

    @hypothesis_settings(max_examples=40, deadline=None)
    @given(data=st.data(), address=private, mapped=st.booleans())
    def register(data: st.DataObject, address: ipaddress.IPv4Address, mapped: bool) -> None:
        host = f"[::ffff:{address}]" if mapped else data.draw(strategies.legacy_ipv4_spellings(address))
        answer = client.post("/v1/endpoints", json={"url": f"http://{host}/hook"}, headers=auth)
        assert_problem(answer, 422, "unsafe_url", "url")

    register()
    assert row_counts(sessions) == before


def test_patch_changes_fields_and_refuses_bad_values(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint = make_endpoint(client, auth, event_types=["ticket.*"], max_rate_per_s=10)
    path = f"/v1/endpoints/{endpoint['id']}"
    changed = client.patch(
        path, json={"url": "http://127.0.0.2:9/new", "description": "new", "event_types": ["visit.*"]}, headers=auth
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["secret"] is None
    expected = {"url": "http://127.0.0.2:9/new", "description": "new", "event_types": ["visit.*"], "max_rate_per_s": 10}
    assert {k: changed.json()[k] for k in expected} == expected
    cleared = client.patch(path, json={"event_types": None, "max_rate_per_s": None}, headers=auth)
    assert (cleared.json()["event_types"], cleared.json()["max_rate_per_s"]) == (None, None)
    assert cleared.json()["url"] == "http://127.0.0.2:9/new"

    before = client.get(path, headers=auth).json()
    for body, code, field in [
        ({"url": "http://10.0.0.1/"}, "unsafe_url", "url"),
        ({"url": "ftp://127.0.0.1/"}, "unsafe_url", "url"),
        ({"secret": "whsec_x"}, "validation_error", "secret"),
        ({"enabled": False}, "validation_error", "enabled"),
        ({"max_rate_per_s": "5"}, "validation_error", "max_rate_per_s"),
        ({"event_types": [""]}, "validation_error", "event_types.0"),
    ]:
        assert_problem(client.patch(path, json=body, headers=auth), 422, code, field)
    assert client.get(path, headers=auth).json() == before
    assert_problem(client.patch("/v1/endpoints/ep_01NOSUCH", json={}, headers=auth), 404, "not_found", "endpoint_id")


def test_rotate_secret_keeps_the_old_one_for_the_grace_period(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint = make_endpoint(client, auth)
    path = f"/v1/endpoints/{endpoint['id']}/rotate-secret"
    first = endpoint["secret"]

    rotated = client.post(path, json={"grace_s": 60}, headers=auth)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["secret"]
    assert second.startswith("whsec_") and second != first
    assert secrets_now(sessions, endpoint["id"]) == [second, first]
    assert secrets_now(sessions, endpoint["id"], later_s=61) == [second]
    assert client.get(f"/v1/endpoints/{endpoint['id']}", headers=auth).json()["secret"] is None

    default = client.post(path, headers=auth)  # no body: the configured grace (a day)
    assert default.status_code == 200, default.text
    third = default.json()["secret"]
    assert secrets_now(sessions, endpoint["id"]) == [third, second, first]
    assert secrets_now(sessions, endpoint["id"], later_s=3600) == [third, second]

    now = client.post(path, json={"grace_s": 0}, headers=auth)
    assert now.status_code == 200, now.text
    assert secrets_now(sessions, endpoint["id"]) == [now.json()["secret"]]

    before = row_counts(sessions)
    for body, field in [({"grace_s": "5"}, "grace_s"), ({"grace_s": -1}, "grace_s"), ({"grace": 5}, "grace")]:
        assert_problem(client.post(path, json=body, headers=auth), 422, "validation_error", field)
    assert_problem(
        client.post("/v1/endpoints/ep_01NOSUCH/rotate-secret", headers=auth), 404, "not_found", "endpoint_id"
    )
    assert row_counts(sessions) == before
    assert secrets_now(sessions, endpoint["id"]) == [now.json()["secret"]]


def test_event_types_and_enabled_decide_who_gets_deliveries(client: TestClient, auth: dict[str, str]) -> None:
    tickets = make_endpoint(client, auth, event_types=["ticket.*"])["id"]
    paid = make_endpoint(client, auth, event_types=["invoice.paid", "visit.*"])["id"]
    everything = make_endpoint(client, auth)["id"]
    switched_off = make_endpoint(client, auth)["id"]

    disabled = client.post(f"/v1/endpoints/{switched_off}/disable", headers=auth)
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False and disabled.json()["disabled_reason"]
    assert client.get(f"/v1/endpoints/{switched_off}", headers=auth).json()["enabled"] is False

    def targets(event_type: str) -> set[str]:
        answer = client.post("/v1/events", json={"type": event_type}, headers=auth)
        assert answer.status_code == 202, answer.text
        return {d["endpoint_id"] for d in answer.json()["deliveries"]}

    assert targets("ticket.escalated") == {tickets, everything}
    assert targets("ticket.comment.added") == {tickets, everything}
    assert targets("ticketing.created") == {everything}
    assert targets("invoice.paid") == {paid, everything}
    assert targets("invoice.created") == {everything}
    assert targets("visit.reminder") == {paid, everything}

    enabled = client.post(f"/v1/endpoints/{switched_off}/enable", headers=auth)
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True and enabled.json()["disabled_reason"] is None
    assert targets("ticket.escalated") == {tickets, everything, switched_off}

    explicit = client.post("/v1/events", json={"type": "ticket.escalated", "endpoint_ids": [paid, paid]}, headers=auth)
    assert explicit.status_code == 202, explicit.text
    assert [d["endpoint_id"] for d in explicit.json()["deliveries"]] == [paid]
    for action in ("disable", "enable"):
        assert_problem(
            client.post(f"/v1/endpoints/ep_01NOSUCH/{action}", headers=auth), 404, "not_found", "endpoint_id"
        )
