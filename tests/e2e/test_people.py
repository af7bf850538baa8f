"""Events to people: recipients, preferences, email over real SMTP, SMS through a real provider, OTP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings, SmsProviderSettings
from herald.store.ids import new_id
from herald.store.models import Delivery, Template, Tenant
from tests.support import MailSink, Processes, SmsProvider, assert_problem, row_counts, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


EMAIL = "dana.customer@example.com"
PHONE = "+4915123456789"


@pytest.fixture
def settings(settings: Settings, mail: MailSink, sms_provider: SmsProvider) -> Settings:
    return settings.model_copy(
        update={
            "smtp": settings.smtp.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": mail.port,
                    "tls": "none",
                    "sender": "Desk <desk@bank.example>",
                    "unsubscribe_url": "https://bank.example/unsubscribe",
                }
            ),
            "sms": settings.sms.model_copy(
                update={"primary": SmsProviderSettings(kind="json", url=sms_provider.url, name="loopback-sms")}
            ),
        }
    )


def add_templates(sessions: sessionmaker[Session], event_type: str) -> None:
    with sessions() as session, session.begin():
        tenant_id = session.query(Tenant.id).scalar()
        session.add_all(
            [
                Template(id=new_id("tpl"), tenant_id=tenant_id, event_type=event_type, channel="email", locale="",
                         subject="Ticket {{ event.subject }}: {{ data.status }}",
                         text="Hello, your ticket is now {{ data.status }}.",
                         html="<p>Your ticket is now <b>{{ data.status }}</b></p>"),
                Template(id=new_id("tpl"), tenant_id=tenant_id, event_type=event_type, channel="email", locale="de",
                         subject="Ticket {{ event.subject }}: {{ data.status }}",
                         text="Hallo, Ihr Ticket ist jetzt {{ data.status }}.", html=None),
                Template(id=new_id("tpl"), tenant_id=tenant_id, event_type=event_type, channel="sms", locale="",
                         text="Ticket {{ event.subject }}: {{ data.status }}"),
            ]
        )  # fmt: skip


def person(client: TestClient, auth: dict[str, str], ref: str, **fields: object) -> None:
    answer = client.put(f"/v1/recipients/{ref}", json=fields, headers=auth)
    assert answer.status_code in (200, 201), answer.text


def test_events_reach_people_by_email_and_sms_per_preferences_and_locale(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    processes: Processes,
    mail: MailSink,
    sms_provider: SmsProvider,
) -> None:
    add_templates(sessions, "ticket.status_changed")
    person(client, auth, "cust-42", email=EMAIL, phone=PHONE, locale="de-AT", timezone="Europe/Vienna")
    person(client, auth, "cust-43", email="quiet@example.com", preferences={"ticket": {"email": False}})
    processes.worker()
    processes.dispatcher()
    answer = client.post(
        "/v1/events",
        json={"type": "ticket.status_changed", "subject": "ticket:4711", "recipients": ["cust-42", "cust-43"],
              "data": {"status": "escalated"}},
        headers=auth,
    )  # fmt: skip
    assert answer.status_code == 202, answer.text
    briefs = {(d["recipient"], d["channel"]): d for d in answer.json()["deliveries"]}
    assert briefs[("cust-43", "email")]["state"] == "suppressed"
    assert briefs[("cust-43", "sms")]["state"] == "suppressed"  # no phone number
    wait_until(lambda: mail.to(EMAIL) and sms_provider.to(PHONE), what="the email and the SMS")
    [message] = mail.to(EMAIL)
    assert message["Subject"] == "Ticket ticket:4711: escalated"
    assert briefs[("cust-42", "email")]["id"] in message["Message-ID"]
    assert "Ihr Ticket ist jetzt escalated" in message.get_payload(decode=True).decode()  # de-AT -> de
    assert message["List-Unsubscribe"].startswith("<https://bank.example/unsubscribe")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    [sms] = sms_provider.to(PHONE)
    assert sms["text"] == "Ticket ticket:4711: escalated" and sms["reference"] == briefs[("cust-42", "sms")]["id"]
    assert not mail.to("quiet@example.com")
    record = client.get(f"/v1/deliveries/{briefs[('cust-43', 'email')]['id']}", headers=auth).json()
    assert record["last_error"] == "suppressed: recipient opted out of ticket by email"
    sms_record = wait_until(
        lambda: (
            (r := client.get(f"/v1/deliveries/{briefs[('cust-42', 'sms')]['id']}", headers=auth).json())["state"]
            == "delivered"
            and r
        ),
        what="the SMS recorded",
    )
    assert sms_record["attempts"][0]["provider"] == "loopback-sms"


def test_critical_categories_ignore_opt_outs(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session], processes: Processes, mail: MailSink
) -> None:
    add_templates(sessions, "security.new_login")
    person(client, auth, "cust-44", email="opted@example.com", preferences={"security": {"email": False}},
           quiet_hours={"start": "00:00", "end": "23:59"})  # fmt: skip
    processes.worker()
    processes.dispatcher()
    answer = client.post(
        "/v1/events",
        json={"type": "security.new_login", "recipients": ["cust-44"], "channels": ["email"], "data": {"status": "x"}},
        headers=auth,
    )
    assert answer.status_code == 202, answer.text
    wait_until(lambda: mail.to("opted@example.com"), what="the critical mail despite opt-out and quiet hours")
    assert "List-Unsubscribe" not in mail.to("opted@example.com")[0]
    assert "List-Unsubscribe-Post" not in mail.to("opted@example.com")[0]


def test_otp_is_sent_verified_once_and_never_stored_or_logged(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    processes: Processes,
    sms_provider: SmsProvider,
    settings: Settings,
) -> None:
    person(client, auth, "cust-50", phone=PHONE)
    processes.worker()
    processes.dispatcher()
    answer = client.post("/v1/otp", json={"recipient": "cust-50", "channel": "sms", "purpose": "login"}, headers=auth)
    assert answer.status_code == 202, answer.text
    assert "code" not in answer.json()
    [sms] = wait_until(lambda: sms_provider.to(PHONE), what="the passcode SMS")
    code = re.search(r"\b(\d{6})\b", sms["text"])
    assert code is not None
    passcode = code.group(1)

    # The database holds no plaintext code anywhere.
    with sessions() as session:
        for table in ("deliveries", "attempts", "otp_codes", "events"):
            dump = " ".join(str(row) for row in session.execute(text(f"SELECT * FROM {table}")).all())
            assert passcode not in dump, table
    wrong = "000000" if passcode != "000000" else "111111"
    assert_problem(
        client.post("/v1/otp/verify", json={"recipient": "cust-50", "code": wrong}, headers=auth),
        422, "otp_invalid", "code",
    )  # fmt: skip
    ok = client.post("/v1/otp/verify", json={"recipient": "cust-50", "code": passcode}, headers=auth)
    assert ok.status_code == 200 and ok.json()["valid"] is True
    again = client.post("/v1/otp/verify", json={"recipient": "cust-50", "code": passcode}, headers=auth)
    assert_problem(again, 422, "otp_invalid", "code")
    for name in processes.running:
        assert passcode not in processes.log(name) and PHONE not in processes.log(name)


def test_otp_attempts_and_send_throttle(
    client: TestClient, auth: dict[str, str], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    person(client, auth, "cust-51", phone=PHONE)
    codes = redis.Redis.from_url(settings.redis_url)

    def waiting_codes() -> int:
        return len(codes.keys(f"{settings.redis.key_prefix}:otp:*"))

    for _ in range(settings.otp.sends_per_window):
        assert client.post("/v1/otp", json={"recipient": "cust-51", "channel": "sms"}, headers=auth).status_code == 202
    before, codes_before = row_counts(sessions), waiting_codes()
    assert codes_before == settings.otp.sends_per_window
    throttled = client.post("/v1/otp", json={"recipient": "cust-51", "channel": "sms"}, headers=auth)
    assert_problem(throttled, 429, "rate_limited", "recipient")
    assert int(throttled.headers["Retry-After"]) > 0
    no_email = client.post("/v1/otp", json={"recipient": "cust-51", "channel": "email"}, headers=auth)
    assert_problem(no_email, 422, "validation_error", "channel")
    assert (row_counts(sessions), waiting_codes()) == (before, codes_before)  # neither wrote a row nor a code

    wrong = [client.post("/v1/otp/verify", json={"recipient": "cust-51", "code": "123456"}, headers=auth)
             for _ in range(settings.otp.max_attempts + 1)]  # fmt: skip
    bodies = [assert_problem(answer, 422, "otp_invalid", "code") for answer in wrong]
    assert all(body == bodies[0] for body in bodies)  # locked or wrong: no difference to see
    assert row_counts(sessions) == before


def test_an_otp_past_its_deadline_or_without_its_code_is_never_sent_nor_replayed(
    client: TestClient,
    auth: dict[str, str],
    sessions: sessionmaker[Session],
    processes: Processes,
    sms_provider: SmsProvider,
    settings: Settings,
) -> None:
    person(client, auth, "cust-52", phone=PHONE)
    late = client.post("/v1/otp", json={"recipient": "cust-52", "channel": "sms"}, headers=auth).json()
    lost = client.post(
        "/v1/otp", json={"recipient": "cust-52", "channel": "sms", "purpose": "pay"}, headers=auth
    ).json()
    with sessions() as session, session.begin():  # as if the worker had been down for the whole TTL
        session.execute(
            update(Delivery).where(Delivery.id == late["delivery_id"]).values(deliver_by=Delivery.created_at)
        )
    redis.Redis.from_url(settings.redis_url).delete(f"{settings.redis.key_prefix}:otp:{lost['delivery_id']}")
    processes.worker()
    processes.dispatcher()

    def state(delivery_id: str) -> str:
        return str(client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()["state"])

    wait_until(lambda: state(late["delivery_id"]) == "expired", what="the late passcode to expire")
    wait_until(lambda: state(lost["delivery_id"]) == "dead", what="the lost passcode to be dead")
    replay = client.post("/v1/dead-letters/replay", json={"ids": [lost["delivery_id"]]}, headers=auth).json()
    assert (replay["replayed"], replay["skipped"]) == ([], [lost["delivery_id"]])
    assert sms_provider.to(PHONE) == []
