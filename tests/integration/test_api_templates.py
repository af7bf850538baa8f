"""/v1/templates: upload (validated before writing), read, list, delete, preview with locale fallback."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import httpx2
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from herald.api.app import create_app
from herald.api.routes import templates
from herald.config import Settings
from herald.store import queries
from herald.store.db import transaction
from herald.store.ids import new_id
from herald.store.models import Recipient, Template
from tests.support import row_counts

EMAIL = {
    "subject": "Ticket {{ event.subject }} escalated",
    "text": "Hi {{ data.name }}",
    "html": "<p>{{ data.name }}</p>",
}
SMS = {"text": "Your code is {{ data.code }}"}
WEBHOOK = {"body": '{"name": {{ data.name | tojson }}}'}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API with the templates router (registered here until app.py includes it)."""
    app = create_app(settings)
    if not any(getattr(route, "path", "").startswith("/v1/templates") for route in app.routes):
        app.include_router(templates.router)
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


@pytest.fixture
def other_auth(sessions: sessionmaker[Session]) -> dict[str, str]:
    """A second tenant ('globex')."""
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="globex")
        _, raw = queries.create_api_key(session=session, tenant_id=tenant.id)
    return {"Authorization": f"Bearer {raw}"}


def count_templates(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Template)) or 0)


def assert_problem(answer: httpx2.Response, status: int, code: str, field: str | None) -> dict[str, Any]:
    """An RFC 9457 answer with Herald's ``code`` that names ``field`` among its errors."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert (body["type"], body["status"], body["code"]) == (f"urn:herald:problem:{code}", status, code)
    assert body["title"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


def put(client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any]) -> httpx2.Response:
    return client.put(f"/v1/templates/{path}", json=body, headers=auth)


def test_upload_read_replace_list_and_delete(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    created = put(client, auth, "ticket.escalated/email/pt-br", EMAIL)
    assert created.status_code == 201, created.text
    template = created.json()
    assert template["id"].startswith("tpl_")
    assert (template["event_type"], template["channel"], template["locale"]) == ("ticket.escalated", "email", "pt-BR")
    assert {k: template[k] for k in ("subject", "text", "html", "body")} == {**EMAIL, "body": None}

    for spelling in ("pt-BR", "pt-br", "PT_br"):
        read = client.get(f"/v1/templates/ticket.escalated/email/{spelling}", headers=auth)
        assert read.status_code == 200, read.text
        assert read.json() == template

    replaced = put(client, auth, "ticket.escalated/email/pt-BR", {"subject": "Novo: {{ data.n }}", "text": "t"})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["id"] == template["id"]
    assert (replaced.json()["subject"], replaced.json()["html"]) == ("Novo: {{ data.n }}", None)
    assert replaced.json()["created_at"] == template["created_at"]
    assert count_templates(sessions) == 1

    assert put(client, auth, "ticket.escalated/email/default", EMAIL).json()["locale"] == "default"
    assert put(client, auth, "ticket.escalated/sms/default", SMS).status_code == 201
    assert put(client, auth, "ticket.created/webhook/default", WEBHOOK).status_code == 201
    listed = client.get("/v1/templates", headers=auth).json()
    assert len(listed["data"]) == 4 and listed["next_cursor"] is None
    assert [t["id"] for t in listed["data"]] == sorted(t["id"] for t in listed["data"])
    only = client.get("/v1/templates", params={"event_type": "ticket.escalated", "channel": "email"}, headers=auth)
    assert sorted(t["locale"] for t in only.json()["data"]) == ["default", "pt-BR"]
    by_locale = client.get("/v1/templates", params={"locale": "default"}, headers=auth).json()["data"]
    assert len(by_locale) == 3
    page = client.get("/v1/templates", params={"limit": 3}, headers=auth).json()
    rest = client.get("/v1/templates", params={"limit": 3, "cursor": page["next_cursor"]}, headers=auth).json()
    assert [t["id"] for t in page["data"] + rest["data"]] == [t["id"] for t in listed["data"]]

    deleted = client.delete("/v1/templates/ticket.escalated/email/pt-BR", headers=auth)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(client.get("/v1/templates/ticket.escalated/email/pt-BR", headers=auth), 404, "not_found", "template")
    assert_problem(client.delete("/v1/templates/ticket.escalated/email/pt-BR", headers=auth), 404, "not_found", None)
    assert count_templates(sessions) == 3


BAD_UPLOADS: list[tuple[str, dict[str, Any], str]] = [
    ("t/email/default", {"text": "t"}, "subject"),
    ("t/email/default", {"subject": "s"}, "text"),
    ("t/email/default", {"subject": "s", "text": "t", "body": "{}"}, "body"),
    ("t/sms/default", {"text": "t", "html": "<p>"}, "html"),
    ("t/sms/default", {}, "text"),
    ("t/webhook/default", {"text": "t"}, "body"),
    ("t/webhook/default", {"body": "[1]"}, "body"),
    ("t/webhook/default", {"body": '{"a": "{{ data.a }}", }'}, "body"),
    ("t/webhook/default", {"body": '{"a": {{ data.a }}}', "sample_data": {"a": "text"}}, "body"),
    ("t/sms/default", {"text": "t", "locale": "pt"}, "locale"),
    ("t/sms/default", {"text": 5}, "text"),
    ("t/sms/default", {"text": "a\x00b"}, "text"),
    ("t/sms/default", {"text": "a" * 131073}, "text"),
    ("t/sms/default", {"text": "t", "sample_data": [1]}, "sample_data"),
    ("t/fax/default", {"text": "t"}, "channel"),
    ("t/sms/klingon-of-the-far-reaches", {"text": "t"}, "locale"),
    ("t/sms/12", {"text": "t"}, "locale"),
    ("bad%20type/sms/default", {"text": "t"}, "event_type"),
    ("-x/sms/default", {"text": "t"}, "event_type"),
]


def test_bad_uploads_name_the_field_and_write_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    for path, body, field in BAD_UPLOADS:
        assert_problem(put(client, auth, path, body), 422, "validation_error", field)
    answer = client.put(
        "/v1/templates/t/sms/default", content=b"{", headers={**auth, "content-type": "application/json"}
    )
    assert_problem(answer, 422, "validation_error", "body")
    assert count_templates(sessions) == 0


def test_template_errors_name_the_part_and_the_line(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    answer = put(
        client,
        auth,
        "ticket.escalated/email/default",
        {
            "subject": "{{ ''.__class__.__mro__ }}",
            "text": "Hello {{ data.name }},\n\nyour ticket {{ data.id }",
            "html": "<p>\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        },
    )
    problem = assert_problem(answer, 422, "validation_error", "text")
    assert problem["errors"] == [
        {"field": "subject", "message": "subject: line 1: access to attribute '__class__' of 'str' object is unsafe"},
        {"field": "text", "message": "text: line 3: unexpected '}'"},
        {"field": "html", "message": ANY},
    ]
    # The steps or the clock run out first, depending on the machine.
    assert re.fullmatch(
        r"html: line 2: render budget exceeded: (took more than 200 ms of CPU|more than 1000000 steps)",
        problem["errors"][2]["message"],
    )
    assert problem["detail"] == problem["errors"][0]["message"]
    assert count_templates(sessions) == 0

    # A refused replacement leaves the stored template as it was.
    assert put(client, auth, "ticket.escalated/sms/default", SMS).status_code == 201
    refused = put(client, auth, "ticket.escalated/sms/default", {"text": "ok\n{{ 1 / 0 }}"})
    assert assert_problem(refused, 422, "validation_error", "text")["detail"] == "text: line 2: division by zero"
    assert client.get("/v1/templates/ticket.escalated/sms/default", headers=auth).json()["text"] == SMS["text"]
    assert count_templates(sessions) == 1


def test_any_upload_is_stored_or_refused_never_an_error(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    fragments = st.sampled_from(
        ["{{", "}}", "{%", "%}", "{#", "#}", " data.x ", " for ", " in ", " endfor ", "|", "(", ")", "'", "\n", "a"]
    )
    sources = st.lists(fragments, max_size=12).map("".join) | st.text(max_size=30)

    @hypothesis_settings(max_examples=30, deadline=None)
    @given(source=sources, channel=st.sampled_from(["sms", "webhook"]))
    def upload(source: str, channel: str) -> None:
        part = "text" if channel == "sms" else "body"
        answer = put(client, auth, f"fuzz/{channel}/default", {part: source})
        assert answer.status_code in (200, 201, 422), answer.text
        if answer.status_code == 422:
            assert answer.json()["errors"][0]["field"] == part

    upload()
    assert count_templates(sessions) <= 2


def make_recipient(sessions: sessionmaker[Session], locale: str | None) -> str:
    with transaction(sessions) as session:
        tenant = queries.get_tenant(session=session, ref="acme")
        session.add(
            Recipient(
                id=new_id("rcp"), tenant_id=tenant.id, external_id="user-42", email="ana@example.com", locale=locale
            )
        )
    return "user-42"


def test_preview_walks_the_locale_chain(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    for locale, greeting in (("default", "Hello"), ("pt", "Olá"), ("pt-PT", "Olá (PT)")):
        assert put(client, auth, f"visit.reminder/sms/{locale}", {"text": greeting + " {{ data.name }}"}).is_success
    ids = {t["locale"]: t["id"] for t in client.get("/v1/templates", headers=auth).json()["data"]}

    def preview(**extra: Any) -> dict[str, Any]:
        body = {"event_type": "visit.reminder", "channel": "sms", "data": {"name": "Ana"}, **extra}
        answer = client.post("/v1/templates/preview", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    assert preview(locale="pt-BR") == {
        "channel": "sms",
        "locale": "pt",
        "template_id": ids["pt"],
        "text": "Olá Ana",
        "length": 7,
        "encoding": "UCS-2",
        "segments": 1,
    }
    assert preview(locale="pt-pt")["text"] == "Olá (PT) Ana"
    assert preview(locale="fr-FR")["locale"] == "default"
    assert preview(locale="default")["text"] == "Hello Ana"
    assert preview()["text"] == "Hello Ana"
    assert preview(recipient={"locale": "pt_BR"})["text"] == "Olá Ana"
    assert preview(recipient=make_recipient(sessions, "pt-PT"))["text"] == "Olá (PT) Ana"
    assert preview(recipient={"ref": "user-42"})["text"] == "Olá (PT) Ana"
    # An explicit locale wins over the recipient's.
    assert preview(recipient="user-42", locale="en")["text"] == "Hello Ana"
    # Templates see the recipient as a send does: the tenant's id for the person, locale, time zone.
    for recipient, expected in (("user-42", "user-42/pt-PT/"), ({"id": "u-9", "timezone": "UTC"}, "u-9//UTC")):
        body = {"channel": "sms", "text": "{{ recipient.id }}/{{ recipient.locale }}/{{ recipient.timezone }}"}
        answer = client.post("/v1/templates/preview", json={**body, "recipient": recipient}, headers=auth)
        assert answer.json()["text"] == expected, answer.text


def test_preview_renders_each_channel_as_a_send_would(client: TestClient, auth: dict[str, str]) -> None:
    data = {"name": "<script>alert(1)</script>", "code": "123456"}

    def preview(**body: Any) -> dict[str, Any]:
        answer = client.post("/v1/templates/preview", json={"data": data, **body}, headers=auth)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    email = preview(
        channel="email",
        subject="Hi {{ data.name }}\r\nBcc: x@example.com",
        text="{{ data.name }}",
        html="<b>{{ data.name }}</b>",
    )
    assert email == {
        "channel": "email",
        "subject": "Hi <script>alert(1)</script> Bcc: x@example.com",
        "text": "<script>alert(1)</script>",
        "html": "<b>&lt;script&gt;alert(1)&lt;/script&gt;</b>",
    }
    assert "html" not in preview(channel="email", subject="s", text="t")
    assert preview(channel="sms", text="{{ 'a' * 161 }}") | {"text": ""} == {
        "channel": "sms",
        "text": "",
        "length": 161,
        "encoding": "GSM-7",
        "segments": 2,
    }
    assert preview(channel="sms", text="Code {{ data.code }} 😀") == {
        "channel": "sms",
        "text": "Code 123456 😀",
        "length": 14,
        "encoding": "UCS-2",
        "segments": 1,
    }
    assert preview(channel="webhook", body='{"who": {{ data.name | tojson }}, "n": 1}')["body"] == {
        "who": data["name"],
        "n": 1,
    }


def test_bad_previews_are_problems_that_change_nothing(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    assert put(client, auth, "visit.reminder/sms/default", SMS).status_code == 201

    def preview(body: dict[str, Any]) -> httpx2.Response:
        return client.post("/v1/templates/preview", json=body, headers=auth)

    missing = assert_problem(
        preview({"event_type": "visit.reminder", "channel": "sms", "data": {}}), 422, "render_error", "text"
    )
    assert missing["detail"] == "text: line 1: 'dict object' has no attribute 'code'"
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"channel": "sms", "text": "a\n{{ x }"}, 422, "render_error", "text"),
        ({"channel": "sms", "text": "{{ cycler.__init__.__globals__ }}"}, 422, "render_error", "text"),
        ({"channel": "webhook", "body": '{"a": {{ data.a }}}', "data": {"a": "x"}}, 422, "render_error", "body"),
        ({"event_type": "visit.reminder", "channel": "sms", "text": "t"}, 422, "validation_error", "text"),
        ({"channel": "sms"}, 422, "validation_error", "event_type"),
        ({"channel": "sms", "text": "t", "locale": "pt"}, 422, "validation_error", "locale"),
        ({"channel": "sms", "html": "<p>"}, 422, "validation_error", "text"),
        ({"channel": "fax", "text": "t"}, 422, "validation_error", "channel"),
        ({"text": "t"}, 422, "validation_error", "channel"),
        ({"channel": "sms", "text": "t", "data": [1]}, 422, "validation_error", "data"),
        ({"channel": "sms", "text": "t", "extra": 1}, 422, "validation_error", "extra"),
        ({"event_type": "visit.reminder", "channel": "sms", "locale": "!!"}, 422, "validation_error", "locale"),
        ({"event_type": "visit.reminder", "channel": "email"}, 404, "not_found", "template"),
        ({"event_type": "no.such", "channel": "sms", "data": {"code": 1}}, 404, "not_found", "template"),
        ({"event_type": "visit.reminder", "channel": "sms", "recipient": "nobody"}, 404, "not_found", "recipient"),
        ({"channel": "sms", "text": "t", "recipient": {"nick": "x"}}, 422, "validation_error", "recipient.nick"),
        ({"channel": "sms", "text": "t", "recipient": 5}, 422, "validation_error", "recipient"),
        (
            {"channel": "sms", "text": "t", "recipient": {"ref": "u", "locale": "pt"}},
            422,
            "validation_error",
            "recipient",
        ),
    ]
    for body, status, code, field in cases:
        assert_problem(preview(body), status, code, field)
    with sessions() as session:
        counts = session.execute(text("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM deliveries)")).one()
    assert tuple(counts) == (0, 0)
    assert count_templates(sessions) == 1


def test_tenants_never_see_each_others_templates(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    mine = put(client, auth, "ticket.created/sms/default", SMS).json()
    path = "/v1/templates/ticket.created/sms/default"
    assert_problem(client.get(path, headers=other_auth), 404, "not_found", "template")
    assert_problem(client.delete(path, headers=other_auth), 404, "not_found", "template")
    assert client.get("/v1/templates", headers=other_auth).json()["data"] == []
    preview = {"event_type": "ticket.created", "channel": "sms", "data": {"code": 1}}
    assert_problem(client.post("/v1/templates/preview", json=preview, headers=other_auth), 404, "not_found", None)
    make_recipient(sessions, "pt")
    assert_problem(
        client.post("/v1/templates/preview", json={**preview, "recipient": "user-42"}, headers=other_auth),
        404,
        "not_found",
        "recipient",
    )

    theirs = put(client, other_auth, "ticket.created/sms/default", {"text": "theirs {{ data.code }}"}).json()
    assert theirs["id"] != mine["id"]
    sms_report = ("length", "encoding", "segments")  # in the upload's answer only
    assert client.get(path, headers=auth).json() == {k: v for k, v in mine.items() if k not in sms_report}
    answer = client.post("/v1/templates/preview", json=preview, headers=auth).json()
    assert (answer["template_id"], answer["text"]) == (mine["id"], "Your code is 1")
    assert_problem(client.get("/v1/templates", headers={"Authorization": "Bearer nope"}), 401, "unauthorized", None)
    assert count_templates(sessions) == 2


def test_an_sms_upload_reports_length_encoding_and_segments_as_the_preview_does(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    cases = [
        ({"text": "Ticket {{ data.ticket }}: {{ data.status }}", "sample_data": {"ticket": 4711, "status": "open"}},
         (17, "GSM-7", 1)),
        ({"text": "{{ 'x' * 155 }} {{ data.curly }}", "sample_data": {"curly": "{}[]"}}, (164, "GSM-7", 2)),
        ({"text": "Código {{ data.code }} ✅", "sample_data": {"code": "123456"}}, (15, "UCS-2", 1)),
        ({"text": "{{ data.word * 71 }}", "sample_data": {"word": "ü"}}, (71, "GSM-7", 1)),
        ({"text": "{{ data.word * 71 }}", "sample_data": {"word": "ж"}}, (71, "UCS-2", 2)),
        ({"text": "  Hi {{ data.missing }}  "}, (4, "GSM-7", 1)),  # trimmed as a send is; missing -> 0
    ]  # fmt: skip
    for body, expected in cases:
        answer = put(client, auth, "ticket.sms/sms/default", body)
        assert answer.status_code in (200, 201), answer.text
        stored = answer.json()
        assert (stored["length"], stored["encoding"], stored["segments"]) == expected, body
        preview = client.post(
            "/v1/templates/preview",
            json={"channel": "sms", "event_type": "ticket.sms", "data": body.get("sample_data", {"missing": 0})},
            headers=auth,
        ).json()
        assert (preview["length"], preview["encoding"], preview["segments"]) == expected, body
    email = put(client, auth, "ticket.sms/email/default", EMAIL).json()
    assert not {"length", "encoding", "segments"} & set(email)  # an SMS report is for SMS only
    before = row_counts(sessions)
    refused = put(client, auth, "ticket.sms/sms/default", {"text": "{{ 1/0 }}"})
    assert_problem(refused, 422, "validation_error", "text")
    assert "length" not in refused.json() and row_counts(sessions) == before


def test_a_json_body_template_round_trips(client: TestClient, auth: dict[str, str]) -> None:
    body = json.dumps({"type": "{{ event.type }}", "items": "{{ data.items | tojson }}"})
    stored = put(client, auth, "order.shipped/webhook/default", {"body": body})
    assert stored.status_code == 201, stored.text
    assert client.get("/v1/templates/order.shipped/webhook/default", headers=auth).json()["body"] == body
