"""Recipients, recurring sends, schedules and OTP over the API: behaviour and every bad input."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.api.app import create_app
from herald.config import Settings
from herald.errors import AuthError
from herald.links import LinkClaims, UnsubscribeLinks, sign_link, verify_unsubscribe
from herald.store.models import Delivery, OtpCode, Recipient, utcnow
from tests.support import assert_problem, row_counts


def put(client: TestClient, auth: dict[str, str], ref: str, body: dict[str, Any]) -> Any:
    return client.put(f"/v1/recipients/{ref}", json=body, headers=auth)


def test_recipient_lifecycle(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> None:
    body = {"email": "ana@example.com", "phone": "+351912345678", "locale": "pt-BR", "timezone": "America/Sao_Paulo",
            "preferences": {"ticket": {"sms": False}}, "quiet_hours": {"start": "22:00", "end": "07:00"}}  # fmt: skip
    created = put(client, auth, "cust-1", body)
    assert created.status_code == 201 and created.json()["phone"] == "+351912345678"
    replaced = put(client, auth, "cust-1", {**body, "locale": "pt"})
    assert replaced.status_code == 200 and replaced.json()["locale"] == "pt"
    assert client.get("/v1/recipients/cust-1", headers=auth).json()["preferences"] == {"ticket": {"sms": False}}
    client.put("/v1/templates/visit.reminder/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    pending = client.post(
        "/v1/events", json={"type": "visit.reminder", "recipients": ["cust-1"], "send_at": "2099-01-01T00:00:00Z"},
        headers=auth,
    ).json()  # fmt: skip
    assert client.delete("/v1/recipients/cust-1", headers=auth).status_code == 204
    assert_problem(client.get("/v1/recipients/cust-1", headers=auth), 404, "not_found", "external_id")
    with sessions() as session:
        row = session.scalar(select(Delivery).where(Delivery.id == pending["deliveries"][0]["id"]))
    assert row is not None and row.state == "canceled" and row.address is None and row.content is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"phone": "0151 2345"}, "phone"),
        ({"phone": "+0123456789"}, "phone"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"locale": "english please"}, "locale"),
        ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours.start"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours.end"),
        ({"preferences": {"ticket": {"pigeon": True}}}, "preferences.ticket.pigeon.[key]"),
        ({"preferences": {"ticket": {"sms": "no"}}}, "preferences.ticket.sms"),
        ({"nickname": "x"}, "nickname"),
    ],
)
def test_bad_recipients_are_refused_and_write_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], body: dict[str, Any], field: str
) -> None:
    before = row_counts(sessions)
    assert_problem(put(client, auth, "cust-2", body), 422, "validation_error", field)
    assert row_counts(sessions) == before


def test_bad_external_ids_and_cross_tenant(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    assert_problem(put(client, auth, "bad id", {}), 422, "validation_error", "external_id")
    put(client, auth, "cust-3", {"email": "c3@example.com"})
    from herald.store import queries
    from herald.store.db import transaction

    with transaction(sessions) as session:
        other = queries.create_tenant(session=session, name="other")
        _, raw = queries.create_api_key(session=session, tenant_id=other.id)
    theirs = {"Authorization": f"Bearer {raw}"}
    assert_problem(client.get("/v1/recipients/cust-3", headers=theirs), 404, "not_found", "external_id")
    refused = client.post("/v1/events", json={"type": "a.b", "recipients": ["cust-3"]}, headers=theirs)
    assert_problem(refused, 422, "validation_error", "recipients.0")


def test_events_to_people_need_templates_and_channels_with_templates(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    put(client, auth, "cust-4", {"email": "c4@example.com"})
    before = row_counts(sessions)
    no_template = client.post("/v1/events", json={"type": "a.b", "recipients": ["cust-4"]}, headers=auth)
    assert_problem(no_template, 422, "validation_error", "recipients")
    client.put("/v1/templates/a.b/email/default", json={"subject": "S", "text": "{{ data.x }}"}, headers=auth)
    before = row_counts(sessions)
    no_sms = client.post(
        "/v1/events", json={"type": "a.b", "recipients": ["cust-4"], "channels": ["sms"]}, headers=auth
    )
    assert_problem(no_sms, 422, "validation_error", "channels.0")
    missing = client.post("/v1/events", json={"type": "a.b", "recipients": ["cust-4"]}, headers=auth)
    assert_problem(missing, 422, "validation_error", "data")  # the template needs data.x
    both = client.post(
        "/v1/events", json={"type": "a.b", "send_at": "2099-01-01T00:00:00Z",
                            "send_relative": {"field": "x"}}, headers=auth,
    )  # fmt: skip
    assert_problem(both, 422, "validation_error", None)
    assert row_counts(sessions) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "n", "cron": "every day", "event": {"type": "a.b", "endpoint_ids": ["ep_1"]}}, "cron"),
        ({"name": "n", "cron": "0 9 30 2 *", "event": {"type": "a.b", "endpoint_ids": ["ep_1"]}}, "cron"),  # never
        ({"name": "n", "cron": "0 9 * * *", "timezone": "Nowhere/City", "event": {"type": "a.b"}}, "timezone"),
        ({"name": "n", "cron": "0 9 * * *", "event": {"type": "a.b"}}, "event"),
        ({"name": "n", "cron": "0 9 * * *", "event": {"type": "a.b", "idempotency_key": "k"}}, "event.idempotency_key"),
        ({"cron": "0 9 * * *", "event": {"type": "a.b"}}, "name"),
    ],
)
def test_bad_recurring_sends_are_refused(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], body: dict[str, Any], field: str
) -> None:
    before = row_counts(sessions)
    assert_problem(client.post("/v1/recurring", json=body, headers=auth), 422, "validation_error", field)
    assert row_counts(sessions) == before


def test_recurring_lifecycle(client: TestClient, auth: dict[str, str]) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).json()
    created = client.post(
        "/v1/recurring",
        json={"name": "daily", "cron": "0 9 * * *", "timezone": "Europe/Berlin",
              "event": {"type": "report.daily", "endpoint_ids": [endpoint["id"]]}},
        headers=auth,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    next_fire = created.json()["next_fire_at"]
    assert next_fire.endswith(("07:00:00Z", "08:00:00Z"))  # 09:00 in Berlin, winter or summer
    assert [r["id"] for r in client.get("/v1/recurring", headers=auth).json()] == [created.json()["id"]]
    assert client.delete(f"/v1/recurring/{created.json()['id']}", headers=auth).status_code == 204
    assert_problem(client.get(f"/v1/recurring/{created.json()['id']}", headers=auth), 404, "not_found", "recurring_id")


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "field"),
    [
        ("/v1/otp", {"recipient": "nobody", "channel": "sms"}, 404, "not_found", "recipient"),
        ("/v1/otp", {"recipient": "cust-5", "channel": "pigeon"}, 422, "validation_error", "channel"),
        ("/v1/otp", {"recipient": "cust-5", "channel": "sms", "purpose": "Log In"}, 422, "validation_error", "purpose"),
        ("/v1/otp", {"recipient": "cust-5", "channel": "sms", "code": "123456"}, 422, "validation_error", "code"),
        ("/v1/otp/verify", {"recipient": "cust-5", "code": "12ab56"}, 422, "validation_error", "code"),
        ("/v1/otp/verify", {"recipient": "cust-5", "code": "123456"}, 422, "otp_invalid", "code"),
        ("/v1/otp/verify", {"recipient": "nobody", "code": "123456"}, 422, "otp_invalid", "code"),
    ],
)
def test_bad_otp_requests(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    path: str,
    body: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    put(client, auth, "cust-5", {"phone": "+4915123456789"})
    before = row_counts(sessions)
    assert_problem(client.post(path, json=body, headers=auth), status, code, field)
    assert row_counts(sessions) == before


def test_schedule_key_paths_are_validated(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(
        client.get("/v1/schedules", params={"prefix": "a b"}, headers=auth), 422, "validation_error", "prefix"
    )
    assert_problem(client.delete("/v1/schedules/unknown", headers=auth), 404, "not_found", "key")


# ------------------------------------------------------------------ personal data in answers

ADDRESS = "dana.customer@example.com"


def test_answers_never_echo_an_address_used_as_an_id(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    """A tenant's id for a person may be an email address or a phone number: errors mask it."""
    client.put("/v1/templates/a.b/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    before = row_counts(sessions)
    answers = [
        (client.get(f"/v1/recipients/{ADDRESS}", headers=auth), 404, "not_found", "external_id"),
        (client.delete(f"/v1/recipients/{ADDRESS}", headers=auth), 404, "not_found", "external_id"),
        (client.get("/v1/recipients/4915123456789", headers=auth), 404, "not_found", "external_id"),
        (client.post("/v1/events", json={"type": "a.b", "recipients": [ADDRESS]}, headers=auth),
         422, "validation_error", "recipients.0"),
        (client.post("/v1/otp", json={"recipient": ADDRESS, "channel": "sms"}, headers=auth),
         404, "not_found", "recipient"),
        (client.post("/v1/otp/verify", json={"recipient": ADDRESS, "code": "123456"}, headers=auth),
         422, "otp_invalid", "code"),
        (client.post("/v1/templates/preview", json={"channel": "sms", "text": "t", "recipient": ADDRESS},
                     headers=auth), 404, "not_found", "recipient"),
    ]  # fmt: skip
    for answer, status, code, field in answers:
        assert_problem(answer, status, code, field)
        assert ADDRESS not in answer.text and "dana.customer" not in answer.text and "4915123456789" not in answer.text
    assert "***@***" in answers[0][0].json()["detail"]  # masked, not dropped: the shape still helps
    assert row_counts(sessions) == before


def test_a_passcode_timeline_is_named_by_herald_id_not_the_person(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    put(client, auth, ADDRESS, {"phone": "+4915123456789"})
    sent = client.post("/v1/otp", json={"recipient": ADDRESS, "channel": "sms"}, headers=auth)
    assert sent.status_code == 202, sent.text
    with sessions() as session:
        recipient_id = session.scalar(select(Recipient.id).where(Recipient.external_id == ADDRESS))
        delivery = session.scalar(select(Delivery).where(Delivery.id == sent.json()["delivery_id"]))
    assert sent.json()["subject"] == f"otp:{recipient_id}"
    assert delivery is not None and delivery.subject == f"otp:{recipient_id}"
    timeline = client.get(f"/v1/subjects/otp:{recipient_id}/timeline", headers=auth).json()
    assert [e["type"] for e in timeline["events"]] == ["otp.login"]
    assert ADDRESS not in str(timeline["subject"]) + str([e["type"] for e in timeline["events"]])


def test_a_consumer_link_never_names_the_recipients(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    """A ticket's events may go to several people; whoever holds the consumer link sees none of them."""
    client.put("/v1/templates/ticket.updated/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    for ref in (ADDRESS, "other.person@example.org"):
        put(client, auth, ref, {"email": "inbox@example.net"})
    body = {"type": "ticket.updated", "subject": "ticket:5", "recipients": [ADDRESS, "other.person@example.org"]}
    assert client.post("/v1/events", json=body, headers=auth).status_code == 202
    tenant_view = client.get("/v1/subjects/ticket:5/timeline", headers=auth).json()
    assert {d["recipient"] for d in tenant_view["events"][0]["deliveries"]} == {ADDRESS, "other.person@example.org"}
    link = client.post("/v1/subjects/ticket:5/links", headers=auth).json()
    public = client.get("/v1/public/timeline", params={"token": link["token"]})
    assert public.status_code == 200, public.text
    assert [d["recipient"] for d in public.json()["events"][0]["deliveries"]] == [None, None]
    assert "@" not in public.text
    for event in tenant_view["events"]:
        for delivery in event["deliveries"]:
            delivery["recipient"] = None
    assert public.json() == tenant_view  # otherwise the same


# ------------------------------------------------------------------ passcodes


def otp_code(settings: Settings, delivery_id: str) -> str:
    """The plaintext the worker would put in the message (it waits in Redis, never in the database)."""
    raw = redis.Redis.from_url(settings.redis_url).get(keys.otp_code(settings.redis.key_prefix, delivery_id))
    assert raw is not None
    return raw.decode()


def test_every_failed_verification_answers_alike(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    """No passcode, wrong, expired, used, locked, unknown person: one answer, so guessing learns nothing."""
    put(client, auth, "cust-60", {"phone": "+4915123456789"})

    def verify(code: str, recipient: str = "cust-60", purpose: str = "login") -> Any:
        body = {"recipient": recipient, "code": code, "purpose": purpose}
        return client.post("/v1/otp/verify", json=body, headers=auth)

    def wrong(code: str) -> str:
        return "000000" if code != "000000" else "111111"

    failures = [verify("123456"), verify("123456", recipient="nobody")]  # no passcode; no such person
    sent = client.post("/v1/otp", json={"recipient": "cust-60", "channel": "sms"}, headers=auth).json()
    code = otp_code(settings, sent["delivery_id"])
    failures.append(verify(wrong(code)))
    assert verify(code).status_code == 200
    failures.append(verify(code))  # used
    expired = client.post("/v1/otp", json={"recipient": "cust-60", "channel": "sms", "purpose": "pay"}, headers=auth)
    with sessions() as session, session.begin():
        session.execute(update(OtpCode).where(OtpCode.id == expired.json()["id"]).values(expires_at=utcnow()))
    failures.append(verify(otp_code(settings, expired.json()["delivery_id"]), purpose="pay"))
    locked = client.post("/v1/otp", json={"recipient": "cust-60", "channel": "sms", "purpose": "x"}, headers=auth)
    locked_code = otp_code(settings, locked.json()["delivery_id"])
    for _ in range(settings.otp.max_attempts):
        failures.append(verify(wrong(locked_code), purpose="x"))
    failures.append(verify(locked_code, purpose="x"))  # the right code, too late

    bodies = [assert_problem(answer, 422, "otp_invalid", "code") for answer in failures]
    assert all(body == bodies[0] for body in bodies), {body["detail"] for body in bodies}
    with sessions() as session:
        attempts = session.scalar(select(OtpCode.attempts).where(OtpCode.id == locked.json()["id"]))
    assert attempts == settings.otp.max_attempts  # wrong codes counted; the locked one is refused


def test_the_send_throttle_holds_under_concurrent_requests(
    settings: Settings, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    """Requests racing through two API processes never get more than the window's passcodes out."""
    limit, racers = settings.otp.sends_per_window, 3 * settings.otp.sends_per_window
    apps = [create_app(settings) for _ in range(2)]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        assert put(first, auth, "cust-61", {"phone": "+4915123456789"}).status_code == 201
        # FastAPI and pydantic build some schemas on a route's first use, and doing that from
        # many threads at once races (AttributeError: __pydantic_core_schema__): the race under
        # test is the throttle's, so each app serves the route once first (a refused request).
        for client in (first, second):
            assert client.post("/v1/otp", json={"recipient": "cust-61"}, headers=auth).status_code == 422
        start = threading.Barrier(racers)
        statuses: list[int] = []

        def request(client: TestClient) -> None:
            start.wait(10)
            answer = client.post("/v1/otp", json={"recipient": "cust-61", "channel": "sms"}, headers=auth)
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=request, args=((first, second)[i % 2],)) for i in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for app in apps:
        app.state.engine.dispose()
        app.state.redis.close()
    assert sorted(statuses) == [202] * limit + [429] * (racers - limit)
    counts = row_counts(sessions)
    assert (counts["otp_codes"], counts["deliveries"], counts["events"]) == (limit, limit, limit)


# ------------------------------------------------------------------ one-click unsubscribe


@pytest.fixture
def links(client: TestClient) -> UnsubscribeLinks:
    """The API's own link signer (the key every API process shares)."""
    policy = client.app.state.intake_policy  # type: ignore[attr-defined]
    assert policy.unsubscribe is not None
    return policy.unsubscribe  # type: ignore[no-any-return]


def subscribed_person(client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]) -> str:
    """cust-70, with a ticket email waiting to be sent; returns the Herald id."""
    put(client, auth, "cust-70", {"email": "c70@example.com", "preferences": {"ticket": {"sms": False}}})
    client.put("/v1/templates/ticket.updated/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    pending = client.post(
        "/v1/events", json={"type": "ticket.updated", "subject": "ticket:70", "recipients": ["cust-70"],
                            "send_at": "2099-01-01T00:00:00Z"}, headers=auth,
    )  # fmt: skip
    assert pending.status_code == 202, pending.text
    with sessions() as session:
        return str(session.scalar(select(Recipient.id).where(Recipient.external_id == "cust-70")))


def test_one_click_unsubscribe_turns_the_preference_off(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], links: UnsubscribeLinks
) -> None:
    recipient_id = subscribed_person(client, auth, sessions)
    with sessions() as session:
        tenant_id = str(session.scalar(select(Recipient.tenant_id).where(Recipient.id == recipient_id)))
    token = links.token(
        tenant_id=tenant_id, recipient_id=recipient_id, category="ticket", channel="email", now=utcnow()
    )

    page = client.get("/v1/public/unsubscribe", params={"token": token})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'method="post"' in page.text and "ticket messages by email" in page.text
    assert client.get("/v1/recipients/cust-70", headers=auth).json()["preferences"] == {"ticket": {"sms": False}}

    def one_click() -> Any:  # what a mail client sends (RFC 8058 section 3.2), with no API key
        return client.post(
            "/v1/public/unsubscribe", params={"token": token}, content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip

    answer = one_click()
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"category": "ticket", "channel": "email", "subscribed": False, "canceled": 1}
    expected = {"ticket": {"sms": False, "email": False}}
    assert client.get("/v1/recipients/cust-70", headers=auth).json()["preferences"] == expected
    with sessions() as session:
        states = session.scalars(select(Delivery.state).where(Delivery.recipient_id == recipient_id)).all()
    assert states == ["canceled"]  # the waiting ticket mail is not sent either
    later = client.post("/v1/events", json={"type": "ticket.updated", "recipients": ["cust-70"]}, headers=auth)
    assert [d["state"] for d in later.json()["deliveries"]] == ["suppressed"]
    assert one_click().json()["canceled"] == 0  # repeating it is harmless


def test_bad_unsubscribe_tokens_are_refused_and_change_nothing(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    links: UnsubscribeLinks,
    settings: Settings,
) -> None:
    recipient_id = subscribed_person(client, auth, sessions)
    with sessions() as session:
        tenant_id = str(session.scalar(select(Recipient.tenant_id).where(Recipient.id == recipient_id)))
    claims = {"tenant_id": tenant_id, "recipient_id": recipient_id, "category": "ticket", "channel": "email"}
    good = links.token(**claims, now=utcnow())
    payload, mac = good.split(".")
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    other_key = UnsubscribeLinks(key=b"someone else's key" * 2)
    bad = {
        "expired": links.token(**claims, now=utcnow() - timedelta(seconds=links.ttl_s + 1)),
        "tampered payload": f"{forged_payload}.{mac}",
        "tampered signature": f"{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",
        "another key": other_key.token(**claims, now=utcnow()),
        "a timeline link": sign_link(LinkClaims(tenant_id, "ticket:70", utcnow() + timedelta(hours=1)),
                                     key=links.key),
        "garbage": "not-a-token-at-all",
    }  # fmt: skip
    with pytest.raises(AuthError, match="expired"):
        verify_unsubscribe(bad["expired"], key=links.key, now=utcnow())
    before = row_counts(sessions)
    with sessions() as session:
        stored_before = session.execute(select(Recipient.preferences, Recipient.updated_at)).one()
    for what, token in bad.items():
        for method in (client.post, client.get):
            answer = method("/v1/public/unsubscribe", params={"token": token})
            body = assert_problem(answer, 401, "unauthorized", "token")
            assert ("expired" in body["detail"]) == (what == "expired"), what
    assert_problem(client.post("/v1/public/unsubscribe"), 422, "validation_error", "token")
    assert row_counts(sessions) == before
    with sessions() as session:
        assert session.execute(select(Recipient.preferences, Recipient.updated_at)).one() == stored_before
        assert session.scalars(select(Delivery.state)).all() == ["scheduled"]


@pytest.fixture
def unsubscribe_settings(settings: Settings) -> Settings:
    url = "https://herald.bank.example/v1/public/unsubscribe"
    return settings.model_copy(update={"smtp": settings.smtp.model_copy(update={"unsubscribe_url": url})})


@pytest.fixture
def signing_client(unsubscribe_settings: Settings) -> Iterator[TestClient]:
    app = create_app(unsubscribe_settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


def test_non_critical_mail_carries_a_signed_one_click_link(
    signing_client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    client = signing_client
    put(client, auth, "cust-71", {"email": "c71@example.com"})
    for event_type in ("ticket.updated", "security.new_login"):
        client.put(f"/v1/templates/{event_type}/email/default", json={"subject": "S", "text": "T"}, headers=auth)
    sent = {
        event_type: client.post("/v1/events", json={"type": event_type, "recipients": ["cust-71"]}, headers=auth)
        for event_type in ("ticket.updated", "security.new_login")
    }
    with sessions() as session:
        content = {
            event_type: session.scalar(
                select(Delivery.content).where(Delivery.id == answer.json()["deliveries"][0]["id"])
            )
            for event_type, answer in sent.items()
        }
        recipient_id = session.scalar(select(Recipient.id).where(Recipient.external_id == "cust-71"))
    assert "headers" not in (content["security.new_login"] or {})  # critical: no way out
    headers = (content["ticket.updated"] or {})["headers"]
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    prefix = "<https://herald.bank.example/v1/public/unsubscribe?token="
    assert headers["List-Unsubscribe"].startswith(prefix) and "cust-71" not in headers["List-Unsubscribe"]
    token = headers["List-Unsubscribe"].removeprefix(prefix).removesuffix(">")
    answer = client.post("/v1/public/unsubscribe", params={"token": token})
    assert answer.status_code == 200, answer.text
    with sessions() as session:
        preferences = session.scalar(select(Recipient.preferences).where(Recipient.id == recipient_id))
    assert preferences == {"ticket": {"email": False}}
