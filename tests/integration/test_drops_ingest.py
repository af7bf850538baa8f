"""Drop ingestion on real SQLite/PostgreSQL and Redis: chunks, resume after a crash, the ledger,
campaign configs, reports."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import event as sql_event
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import IngestSettings, Settings
from herald.ingest.drops import DropState, Ingester, OutcomeKind
from herald.ingest.watcher import Watcher, urgent_check
from herald.logs import RedactingFilter
from herald.store import queries
from herald.store.db import transaction
from herald.store.ids import new_id, new_ids
from herald.store.models import Delivery, Drop, Endpoint, Event, Template, utcnow
from herald.worker.celery_app import make_celery
from herald.worker.delivery import webhook_body
from tests.support import free_port, queued_batches, queued_messages, row_counts, wait_until


@dataclass
class Place:
    """A tenant with an endpoint, and a drop folder."""

    tenant_id: str
    endpoint_id: str
    folder: Path
    settings: Settings
    sessions: sessionmaker[Session]

    def ingester(self, **kwargs: Any) -> Ingester:
        return Ingester(settings=self.settings, sessions=self.sessions, directory=self.folder, **kwargs)

    def campaign(self, name: str, **config: Any) -> Path:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        body = {"tenant": "acme", "endpoint_id": self.endpoint_id, "event_type": "promo.sent"} | config
        (folder / "campaign.json").write_text(json.dumps(body))
        return folder

    def report(self, moved_to: Path) -> dict[str, Any]:
        return dict(json.loads(moved_to.with_name(moved_to.name + ".report.json").read_text()))


def make_endpoint(sessions: sessionmaker[Session], tenant_id: str) -> str:
    with transaction(sessions) as session:
        endpoint = Endpoint(id=new_id("end"), tenant_id=tenant_id, url="http://127.0.0.1:9/hook")
        session.add(endpoint)
    return endpoint.id


@pytest.fixture
def place(settings: Settings, sessions: sessionmaker[Session], tmp_path: Path) -> Place:
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="acme")
    endpoint_id = make_endpoint(sessions, tenant.id)
    ingest = IngestSettings(chunk_size=50, tenant="acme", endpoint_id=endpoint_id, max_rejections=1000)
    tuned = settings.model_copy(update={"ingest": ingest})
    return Place(tenant.id, endpoint_id, tmp_path / "drops", tuned, sessions)


def drop_file(folder: Path, name: str, lines: list[str]) -> Path:
    """Write like a well-behaved sender: to NAME.part, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.part"
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, folder / name)
    return folder / name


def deliveries_by_subject(sessions: sessionmaker[Session], drop_id: str) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Delivery.subject, func.count()).where(Delivery.drop_id == drop_id).group_by(Delivery.subject)
        ).all()
    return {str(subject): int(count) for subject, count in rows}


def get(sessions: sessionmaker[Session], drop_id: str) -> Drop:
    with sessions() as session:
        drop = session.get(Drop, drop_id)
        assert drop is not None
        return drop


MIXED = [
    "# users for the spring campaign",
    "u1",
    "",
    "u2",
    "bad id",
    "u1",
    "  u3  ",
    "x" * 129,
]


def test_a_plain_file_becomes_one_queued_bulk_delivery_per_accepted_line(place: Place) -> None:
    client = redis.Redis.from_url(place.settings.redis_url)
    path = drop_file(place.folder, "users.txt", MIXED)
    outcome = place.ingester(wake=lambda: client.rpush(keys.wake("herald"), 1)).process(path)

    assert outcome.kind == OutcomeKind.ingested and outcome.drop_id
    assert not path.exists() and outcome.moved_to == place.folder / "done" / "users.txt"
    assert outcome.moved_to.read_text().startswith("# users")
    report = place.report(outcome.moved_to)
    assert (report["lines"], report["accepted"], report["rejected"]) == (8, 3, 3)
    assert report["rejections"] == [
        {"line": 5, "reason": "user_id: ' ' not allowed (only A-Z a-z 0-9 _ . : @ -), got 'bad id'"},
        {"line": 6, "reason": "duplicate of line 2"},
        {"line": 8, "reason": "user_id: longer than 128 characters (129)"},
    ]
    assert report["state"] == "delivering" and report["pending"] == 3 and report["delivered"] == 0
    assert report["timings"]["ingest_s"] is not None
    assert deliveries_by_subject(place.sessions, outcome.drop_id) == {"u1": 1, "u2": 1, "u3": 1}
    with place.sessions() as session:
        rows = session.execute(
            select(Delivery, Event)
            .join(Event, Event.id == Delivery.event_id)
            .where(Delivery.drop_id == outcome.drop_id)
        ).all()
    for delivery, event in rows:
        assert (delivery.lane, delivery.state, delivery.channel) == ("bulk", "queued", "webhook")
        assert delivery.endpoint_id == place.endpoint_id and delivery.due_at is not None
        assert delivery.event_type == event.type == "drop.user" and event.subject == delivery.subject
        body = json.loads(webhook_body(event, delivery.content))
        assert body["data"] == {"user_id": delivery.subject} and body["subject"] == delivery.subject
    assert client.llen(keys.wake("herald")) >= 1  # the dispatcher was woken


def test_csv_columns_and_campaign_data_reach_the_payload(place: Place) -> None:
    place.campaign("spring", data={"offer": "SPRING10", "name": "customer"}, lane="transactional")
    odd = '"Tab\there \\N back\\slash ""quoted"" é"'  # what COPY's text format must escape
    lines = ["user_id,name,city", "u1,Ann,Oslo", 'u2,,"Bergen, NO"', f"u3,{odd},Troms\u00f8"]
    path = drop_file(place.folder / "spring", "users.csv", lines)
    outcome = place.ingester().process(path)
    assert outcome.kind == OutcomeKind.ingested and outcome.drop_id
    assert outcome.moved_to == place.folder / "done" / "spring" / "users.csv"
    with place.sessions() as session:
        events = {e.subject: e for e in session.scalars(select(Event).where(Event.type == "promo.sent"))}
        lanes = set(session.scalars(select(Delivery.lane).where(Delivery.drop_id == outcome.drop_id)))
    assert events["u1"].data == {"user_id": "u1", "name": "Ann", "city": "Oslo", "offer": "SPRING10"}
    # An empty cell falls back to the campaign's default.
    assert events["u2"].data == {"user_id": "u2", "name": "customer", "city": "Bergen, NO", "offer": "SPRING10"}
    assert events["u3"].data["name"] == 'Tab\there \\N back\\slash "quoted" é'
    assert events["u3"].data["city"] == "Tromsø"
    assert lanes == {"transactional"}
    drop = get(place.sessions, outcome.drop_id)
    assert (drop.campaign, drop.name, drop.path) == ("spring", "spring/users.csv", "done/spring/users.csv")


def test_a_webhook_template_is_rendered_per_line_and_a_failing_line_is_rejected(place: Place) -> None:
    with transaction(place.sessions) as session:
        session.add(
            Template(
                id=new_id("tpl"),
                tenant_id=place.tenant_id,
                event_type="promo.sent",
                channel="webhook",
                locale="",
                body='{"to": {{ data.user_id | tojson }}, "share": {{ (100 // (data.n | int)) | tojson }}}',
            )
        )
    place.campaign("tpl")
    path = drop_file(place.folder / "tpl", "users.csv", ["user_id;n", "u1;4", "u2;0"])
    outcome = place.ingester().process(path)
    assert outcome.drop_id
    with place.sessions() as session:
        [delivery] = session.scalars(select(Delivery).where(Delivery.drop_id == outcome.drop_id)).all()
    assert delivery.content == {"body": {"to": "u1", "share": 25}}
    drop = get(place.sessions, outcome.drop_id)
    assert (drop.accepted, drop.rejected) == (1, 1)
    assert drop.rejections[0]["line"] == 3 and drop.rejections[0]["reason"].startswith("template: body: ")


def add_template(place: Place, locale: str, body: str, event_type: str = "promo.sent") -> None:
    with transaction(place.sessions) as session:
        session.add(
            Template(
                id=new_id("tpl"),
                tenant_id=place.tenant_id,
                event_type=event_type,
                channel="webhook",
                locale=locale,
                body=body,
            )
        )


def greeting(word: str) -> str:
    """A webhook template body that greets the line's user in one language."""
    return '{"text": {{ ("' + word + ' " ~ data.user_id) | tojson }}}'


def payloads(sessions: sessionmaker[Session], drop_id: str) -> dict[str, Any]:
    with sessions() as session:
        rows = session.execute(select(Delivery.subject, Delivery.content).where(Delivery.drop_id == drop_id)).all()
    return {str(subject): content for subject, content in rows}


def test_two_campaigns_on_one_event_type_send_the_payloads_of_the_templates_they_name(place: Place) -> None:
    add_template(place, "", greeting("Hello"))
    add_template(place, "de", greeting("Hallo"))
    add_template(place, "pt-BR", greeting("Olá"))
    place.campaign("german", template="de")
    place.campaign("brazil", template="pt_br")  # any spelling of the locale, stored in canonical case
    place.campaign("plain")  # no template named: the default-locale one
    place.campaign("default", template="default")
    outcomes = {
        name: place.ingester().process(drop_file(place.folder / name, "users.txt", ["u1", "u2"]))
        for name in ("german", "brazil", "plain", "default")
    }

    assert [o.kind for o in outcomes.values()] == [OutcomeKind.ingested] * 3 + [OutcomeKind.duplicate]
    # Naming the default template sends what naming none sends: the same audience is a duplicate.
    assert outcomes["default"].drop_id == outcomes["plain"].drop_id
    sent = {name: payloads(place.sessions, o.drop_id or "") for name, o in outcomes.items() if name != "default"}
    assert sent == {
        "german": {"u1": {"body": {"text": "Hallo u1"}}, "u2": {"body": {"text": "Hallo u2"}}},
        "brazil": {"u1": {"body": {"text": "Olá u1"}}, "u2": {"body": {"text": "Olá u2"}}},
        "plain": {"u1": {"body": {"text": "Hello u1"}}, "u2": {"body": {"text": "Hello u2"}}},
    }


def test_a_campaign_naming_a_template_that_does_not_exist_fails_its_file_and_writes_nothing(place: Place) -> None:
    add_template(place, "de", greeting("Hallo"))
    add_template(place, "fr", greeting("Bonjour"), event_type="promo.other")  # another event type's
    cases = {
        "french": ("fr", "the tenant has no webhook template for 'promo.sent' in locale 'fr'"),
        "austrian": ("de-AT", "the tenant has no webhook template for 'promo.sent' in locale 'de-AT'"),  # no fallback
        "default": ("default", "the tenant has no webhook template for 'promo.sent' in locale 'default'"),
        "private": ("de-x-spring", "must be a locale such as 'pt-BR' or 'default', got 'de-x-spring'"),
    }
    before = row_counts(place.sessions)
    for campaign, (template, error) in cases.items():
        place.campaign(campaign, template=template)
        path = drop_file(place.folder / campaign, "users.txt", ["u1", "u2"])

        outcome = place.ingester().process(path)

        assert outcome.kind == OutcomeKind.failed, campaign
        assert outcome.detail == f"{campaign}/campaign.json: template: {error}"
        assert outcome.moved_to == place.folder / "failed" / campaign / "users.txt" and not path.exists()
        assert place.report(outcome.moved_to)["error"] == outcome.detail
    assert row_counts(place.sessions) == before


def top_level(place: Place, **ingest: Any) -> Ingester:
    """An ingester whose files at the top of the drop folder go out as ``ingest`` sets them."""
    settings = place.settings.model_copy(update={"ingest": place.settings.ingest.model_copy(update=ingest)})
    return Ingester(settings=settings, sessions=place.sessions, directory=place.folder)


def test_a_top_level_file_sends_the_payloads_of_the_template_the_settings_name(place: Place) -> None:
    add_template(place, "", greeting("Hello"), event_type="drop.user")
    add_template(place, "pt-BR", greeting("Olá"), event_type="drop.user")
    # As in campaign.json: any spelling of the locale, stored in canonical case; default by name.
    brazil = IngestSettings(template="pt_br").template
    assert (brazil, IngestSettings(template="DEFAULT").template, IngestSettings().template) == ("pt-BR", "default", "")
    outcomes = {
        name: top_level(place, template=template).process(drop_file(place.folder, f"{name}.txt", ["u1", "u2"]))
        for name, template in (("plain", ""), ("brazil", brazil), ("default", "default"))
    }

    assert [o.kind for o in outcomes.values()] == [OutcomeKind.ingested] * 2 + [OutcomeKind.duplicate]
    assert outcomes["default"].drop_id == outcomes["plain"].drop_id  # the same payloads: the same audience
    assert payloads(place.sessions, outcomes["plain"].drop_id or "") == {
        "u1": {"body": {"text": "Hello u1"}}, "u2": {"body": {"text": "Hello u2"}},
    }  # fmt: skip
    assert payloads(place.sessions, outcomes["brazil"].drop_id or "") == {
        "u1": {"body": {"text": "Olá u1"}}, "u2": {"body": {"text": "Olá u2"}},
    }  # fmt: skip


def test_a_top_level_file_whose_settings_name_a_template_that_does_not_exist_fails_and_writes_nothing(
    place: Place,
) -> None:
    add_template(place, "de", greeting("Hallo"), event_type="drop.user")
    before = row_counts(place.sessions)
    for n, template in enumerate(("fr", "de-AT", "default")):
        path = drop_file(place.folder, f"users-{n}.txt", ["u1", "u2"])

        outcome = top_level(place, template=template).process(path)

        assert outcome.kind == OutcomeKind.failed, template
        assert outcome.detail == (
            f"HERALD_INGEST__TEMPLATE: the tenant has no webhook template for 'drop.user' in locale {template!r}"
        )
        assert outcome.moved_to == place.folder / "failed" / path.name and not path.exists()
        assert place.report(outcome.moved_to)["error"] == outcome.detail
    assert row_counts(place.sessions) == before


def crash_after(chunks: int) -> Callable[[int], None]:
    def hook(n: int) -> None:
        if n == chunks:
            raise RuntimeError(f"simulated crash after chunk {n}")

    return hook


def test_a_crash_after_some_chunks_resumes_without_losing_or_doubling_a_line(place: Place) -> None:
    lines = [f"u{n}" for n in range(1, 1001)]
    lines[10] = "bad id"  # line 11, in the first chunk
    lines[700] = "u5"  # line 701: a duplicate of a line committed before the crash
    lines[900] = "u850"  # line 901: a duplicate of a line read after it
    path = drop_file(place.folder, "big.txt", lines)

    with pytest.raises(RuntimeError, match="after chunk 4"):
        place.ingester(on_chunk=crash_after(4)).process(path)
    with place.sessions() as session:
        drop = session.scalars(select(Drop)).one()
    assert drop.state == DropState.ingesting and drop.lines == 200 and drop.committed_offset > 0
    assert len(deliveries_by_subject(place.sessions, drop.id)) == 199

    outcome = place.ingester().process(path)
    assert outcome.kind == OutcomeKind.ingested and outcome.drop_id == drop.id
    by_subject = deliveries_by_subject(place.sessions, drop.id)
    assert set(by_subject.values()) == {1} and len(by_subject) == 997
    drop = get(place.sessions, drop.id)
    assert (drop.lines, drop.accepted, drop.rejected, drop.state) == (1000, 997, 3, DropState.delivering)
    assert [(r["line"], r["reason"]) for r in drop.rejections] == [
        (11, "user_id: ' ' not allowed (only A-Z a-z 0-9 _ . : @ -), got 'bad id'"),
        (701, "duplicate of line 5"),
        (901, "duplicate of line 850"),
    ]
    with place.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 997


def test_two_ingesters_on_one_file_never_commit_the_same_chunk(place: Place) -> None:
    path = drop_file(place.folder, "race.txt", [f"u{n}" for n in range(500)])
    results = []

    def other_ingester_takes_over(n: int) -> None:
        if n == 2:  # while the first is between chunks, a second one resumes and finishes the file
            results.append(place.ingester().process(path))

    first = place.ingester(on_chunk=other_ingester_takes_over).process(path)
    assert [r.kind for r in results] == [OutcomeKind.ingested]
    assert first.kind == OutcomeKind.skipped and "took over" in first.detail
    by_subject = deliveries_by_subject(place.sessions, results[0].drop_id or "")
    assert len(by_subject) == 500 and set(by_subject.values()) == {1}


def test_the_ingested_log_line_keeps_its_counts_through_redaction(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    # Logs mask every bare run of 4+ digits as a possible code: counts are written 1,200.
    path = drop_file(place.folder, "users.txt", [f"u{i}" for i in range(1_200)] + ["bad id"])
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="herald.ingest.drops"):
        outcome = place.ingester().process(path)
    assert outcome.kind == OutcomeKind.ingested
    assert f"drop {outcome.drop_id}: users.txt ingested: 1,201 lines, 1,200 accepted, 1 rejected" in caplog.text


def test_the_same_file_again_creates_nothing_and_says_so(place: Place) -> None:
    first = place.ingester().process(drop_file(place.folder, "users.txt", MIXED))
    before = row_counts(place.sessions)
    again = place.ingester().process(drop_file(place.folder, "users.txt", MIXED))
    copy = place.ingester().process(drop_file(place.folder, "renamed.txt", MIXED))

    assert again.kind == copy.kind == OutcomeKind.duplicate
    assert again.drop_id == copy.drop_id == first.drop_id
    assert row_counts(place.sessions) == before
    assert again.moved_to is not None and again.moved_to.parent == place.folder / "done"
    assert again.moved_to.name.startswith("users-dup-") and again.moved_to.name.endswith(".txt")
    report = place.report(again.moved_to)
    assert report["state"] == "duplicate" and report["duplicate_of"] == first.drop_id
    assert f"drop {first.drop_id} (users.txt): nothing was created" in report["message"]
    assert (place.folder / "done" / "users.txt").exists()  # the first one's file is untouched


def test_the_same_audience_for_another_campaign_is_a_new_drop(place: Place) -> None:
    place.campaign("spring")
    place.campaign("autumn", event_type="promo.autumn")
    first = place.ingester().process(drop_file(place.folder / "spring", "users.txt", ["u1", "u2"]))
    second = place.ingester().process(drop_file(place.folder / "autumn", "users.txt", ["u1", "u2"]))
    assert first.kind == second.kind == OutcomeKind.ingested and first.drop_id != second.drop_id


def test_a_crash_between_the_last_commit_and_the_move_is_finished_not_duplicated(place: Place) -> None:
    path = drop_file(place.folder, "users.txt", ["u1", "u2"])
    outcome = place.ingester().process(path)
    assert outcome.moved_to is not None
    # The state a crash right after the last commit leaves: rows committed, file not moved yet.
    os.replace(outcome.moved_to, path)
    outcome.moved_to.with_name("users.txt.report.json").unlink()
    before = row_counts(place.sessions)
    again = place.ingester().process(path)
    assert again.kind == OutcomeKind.ingested and again.moved_to == outcome.moved_to
    assert row_counts(place.sessions) == before and place.report(outcome.moved_to)["accepted"] == 2


UNREADABLE = [
    # campaign folder, its campaign.json (None: absent), the file, the error
    ("nocfg", None, "u1\n", r"^nocfg/campaign.json: missing"),
    ("badjson", "{nope", "u1\n", r"^badjson/campaign.json: not valid JSON"),
    ("extra", {"endpoint": "x"}, "u1\n", r"^extra/campaign.json: endpoint: unknown field"),
    ("tenant", {"tenant": "nobody"}, "u1\n", r"^tenant/campaign.json: tenant: no such tenant, got 'nobody'"),
    ("endpoint", {"endpoint_id": "end_x"}, "u1\n", r"endpoint_id: no such endpoint, got 'end_x'"),
    ("type", {"event_type": "bad type"}, "u1\n", r"^type/campaign.json: event_type: String should match"),
    ("lane", {"lane": "otp"}, "u1\n", r"^lane/campaign.json: lane: Input should be 'bulk' or 'transactional'"),
    ("nan", '{"tenant": "acme", "data": {"x": NaN}}', "u1\n", r"^nan/campaign.json: not valid JSON \(NaN is not"),
    ("utf8", {}, b"u1\nu\xff2\n", r"^line 2: not valid UTF-8"),
    ("header", {}, "id,name\nu1,Ann\n", r"^line 1: CSV header has no user_id column"),
]


def test_a_file_that_cannot_be_read_goes_to_failed_with_a_report_and_writes_nothing(place: Place) -> None:
    before = row_counts(place.sessions)
    for campaign, config, content, error in UNREADABLE:
        folder = place.folder / campaign
        folder.mkdir(parents=True)
        if isinstance(config, dict):
            place.campaign(campaign, **config)
        elif isinstance(config, str):
            (folder / "campaign.json").write_text(config)
        path = folder / "users.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

        outcome = place.ingester().process(path)

        assert outcome.kind == OutcomeKind.failed and re.search(error, outcome.detail), (campaign, outcome.detail)
        assert outcome.moved_to == place.folder / "failed" / campaign / "users.csv" and not path.exists()
        report = place.report(outcome.moved_to)
        assert report["state"] == "failed" and report["error"] == outcome.detail
        assert report["name"] == f"{campaign}/users.csv"
    assert row_counts(place.sessions) == before


def test_a_top_level_file_without_default_target_fails(place: Place) -> None:
    place.settings = place.settings.model_copy(update={"ingest": IngestSettings()})
    outcome = place.ingester().process(drop_file(place.folder, "users.txt", ["u1"]))
    assert outcome.kind == OutcomeKind.failed and "HERALD_INGEST__TENANT" in outcome.detail


def test_rejections_are_listed_up_to_the_cap_and_all_counted(place: Place) -> None:
    capped = place.settings.ingest.model_copy(update={"max_rejections": 3})
    place.settings = place.settings.model_copy(update={"ingest": capped})
    outcome = place.ingester().process(drop_file(place.folder, "users.txt", ["a b"] * 120 + ["u1"]))
    assert outcome.moved_to is not None
    report = place.report(outcome.moved_to)
    assert (report["rejected"], report["rejections_listed"], report["accepted"]) == (120, 3, 1)
    assert [r["line"] for r in report["rejections"]] == [1, 2, 3]


def test_reports_follow_deliveries_and_a_drained_drop_is_finished(place: Place) -> None:
    outcome = place.ingester().process(drop_file(place.folder, "users.txt", ["u1", "u2", "u3"]))
    assert outcome.moved_to is not None and outcome.drop_id
    ingester = place.ingester()
    with place.sessions() as session:
        ids = list(
            session.scalars(select(Delivery.id).where(Delivery.drop_id == outcome.drop_id).order_by(Delivery.id))
        )
    with transaction(place.sessions) as session:  # what workers leave behind
        for delivery_id, state in zip(ids, ["delivered", "delivered", "dead"], strict=True):
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(state=state, due_at=None, finished_at=utcnow(), attempts=1)
            )
    ingester.refresh_reports()
    report = place.report(outcome.moved_to)
    assert (report["delivered"], report["dead"], report["pending"], report["state"]) == (2, 1, 0, "finished")
    assert report["timings"]["delivered_at"] is not None and report["timings"]["total_s"] is not None
    assert get(place.sessions, outcome.drop_id).state == DropState.finished


def test_the_watcher_pass_ignores_partial_hidden_and_config_files(place: Place) -> None:
    place.campaign("spring")
    drop_file(place.folder / "spring", "a.txt", ["u1"])
    (place.folder / "b.txt.part").write_text("u2\n")
    (place.folder / ".c.txt").write_text("u3\n")
    (place.folder / "campaign.json").write_text("{}")
    (place.folder / "spring" / "deeper").mkdir()
    (place.folder / "spring" / "deeper" / "d.txt").write_text("u4\n")
    watcher = Watcher(
        settings=place.settings,
        sessions=place.sessions,
        client=redis.Redis.from_url(place.settings.redis_url),
        directory=place.folder,
    )
    outcomes = watcher.step()
    assert [(o.kind, o.name) for o in outcomes] == [(OutcomeKind.ingested, "spring/a.txt")]
    assert watcher.step() == []  # done/ and failed/ are not read again
    assert (place.folder / "b.txt.part").exists() and (place.folder / ".c.txt").exists()


def test_new_ids_have_the_store_format_and_sort_by_time() -> None:
    before = new_id("dlv")
    time.sleep(0.002)
    batch = new_ids("dlv", 1000)
    time.sleep(0.002)
    after = new_id("dlv")
    assert len(set(batch)) == 1000
    assert all(re.fullmatch(r"dlv_[0-9A-HJKMNP-TV-Z]{26}", i) for i in batch)
    assert all(before < i < after for i in batch)


def test_a_resumed_drop_moves_on_when_its_file_was_renamed(place: Place) -> None:
    path = drop_file(place.folder, "first.txt", [f"u{n}" for n in range(200)])
    with pytest.raises(RuntimeError):
        place.ingester(on_chunk=crash_after(1)).process(path)
    renamed = place.folder / "second.txt"
    shutil.move(path, renamed)
    outcome = place.ingester().process(renamed)
    assert outcome.kind == OutcomeKind.ingested
    assert len(deliveries_by_subject(place.sessions, outcome.drop_id or "")) == 200


def test_editing_the_campaign_after_a_crash_finishes_the_drop_with_its_first_target(place: Place) -> None:
    place.campaign("spring")
    path = drop_file(place.folder / "spring", "users.txt", [f"u{n}" for n in range(300)])
    with pytest.raises(RuntimeError):
        place.ingester(on_chunk=crash_after(2)).process(path)
    place.campaign("spring", event_type="promo.changed")
    outcome = place.ingester().process(path)
    assert outcome.kind == OutcomeKind.ingested
    with place.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Drop)) == 1
        types = set(session.scalars(select(Delivery.event_type)))
    assert types == {"promo.sent"}
    assert len(deliveries_by_subject(place.sessions, outcome.drop_id or "")) == 300


@pytest.mark.parametrize(("first", "then"), [("de", "en"), ("de", None), (None, "de")])
def test_editing_the_template_after_a_crash_finishes_the_drop_with_its_first_template(
    place: Place, first: str | None, then: str | None
) -> None:
    add_template(place, "", greeting("Hello"))
    add_template(place, "de", greeting("Hallo"))
    add_template(place, "en", greeting("Hi"))
    words = {None: "Hello", "de": "Hallo", "en": "Hi"}
    place.campaign("spring", **({"template": first} if first else {}))
    path = drop_file(place.folder / "spring", "users.txt", [f"u{n}" for n in range(300)])
    with pytest.raises(RuntimeError):
        place.ingester(on_chunk=crash_after(2)).process(path)
    place.campaign("spring", **({"template": then} if then else {}))

    outcome = place.ingester().process(path)

    assert outcome.kind == OutcomeKind.ingested
    with place.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Drop)) == 1
    sent = payloads(place.sessions, outcome.drop_id or "")
    assert len(sent) == 300
    assert sent == {f"u{n}": {"body": {"text": f"{words[first]} u{n}"}} for n in range(300)}


def drop_named(sessions: sessionmaker[Session], name: str) -> Drop | None:
    with sessions() as session:
        return session.scalar(select(Drop).where(Drop.name == name))


def test_a_file_that_no_event_announced_is_found_by_the_periodic_rescan(place: Place) -> None:
    """The watcher starts with a pass over the folder and only then subscribes to file events, so a
    file written during that first pass produces no event; the rescan every ``rescan_s`` finds it."""
    rescan_s = 2.0
    slow = place.settings.ingest.model_copy(update={"chunk_size": 1, "chunk_pause_s": 0.2, "rescan_s": rescan_s})
    place.settings = place.settings.model_copy(update={"ingest": slow})
    drop_file(place.folder, "first.txt", [f"u{n}" for n in range(10)])  # 10 chunks: about 2 s
    watcher = Watcher(
        settings=place.settings,
        sessions=place.sessions,
        client=redis.Redis.from_url(place.settings.redis_url),
        directory=place.folder,
    )
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        # The first pass has listed the folder and is ingesting first.txt; nothing watches for events yet.
        wait_until(lambda: drop_named(place.sessions, "first.txt"), timeout_s=20, what="the first pass")
        drop_file(place.folder, "unannounced.txt", ["v1", "v2"])
        first = wait_until(
            lambda: (d := drop_named(place.sessions, "first.txt")) and d.finished_at and d, timeout_s=20, what="first"
        )
        assert drop_named(place.sessions, "unannounced.txt") is None  # the first pass did not see it
        found = wait_until(
            lambda: (d := drop_named(place.sessions, "unannounced.txt")) and d.state != DropState.ingesting and d,
            timeout_s=rescan_s + 15,
            what="the rescan to ingest the file no event announced",
        )
    finally:
        watcher.stop()
        thread.join(15)
    assert not thread.is_alive()
    # Found by the timer, not an event: only after the first pass ended and a rescan interval passed.
    assert (found.created_at - first.finished_at).total_seconds() >= rescan_s
    assert deliveries_by_subject(place.sessions, found.id) == {"v1": 1, "v2": 1}
    assert (place.folder / "done" / "unannounced.txt").exists()


def test_chunks_shrink_and_pause_while_urgent_lanes_are_busy(place: Place) -> None:
    """The dispatcher flags urgent-lane work in Redis (``keys.urgent``); the watcher's ingester reads
    the flag before each chunk: small chunks with a pause while it is set, full ones otherwise."""
    settings = place.settings
    client = redis.Redis.from_url(settings.redis_url)
    flag = keys.urgent(settings.redis.key_prefix)
    tuned = settings.ingest.model_copy(update={"chunk_size": 50, "yield_chunk_size": 20, "yield_pause_s": 0.0})
    place.settings = settings.model_copy(update={"ingest": tuned})
    try:
        counted: dict[str, int] = {}

        def ingest(name: str) -> None:
            path = drop_file(place.folder, name, [f"u{name[0]}{n:04d}" for n in range(200)])
            chunks: list[int] = []
            outcome = place.ingester(on_chunk=chunks.append, urgent=urgent_check(client, settings.redis.key_prefix))
            assert outcome.process(path).kind is OutcomeKind.ingested
            counted[name] = len(chunks)

        ingest("calm.txt")
        client.set(flag, 1, px=60_000)  # what the dispatcher does when it hands out urgent work
        ingest("busy.txt")
        client.delete(flag)
        assert counted == {"calm.txt": 4, "busy.txt": 10}  # 200 lines in full chunks of 50, or of 20
        with place.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Delivery)) == 400  # nothing lost either way
    finally:
        client.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_progress_reports_are_counted_without_the_write_lock(place: Place) -> None:
    """Counting a drop's deliveries reads all of them: done under SQLite's write lock, it would
    stall every worker's records and every claim for as long. While another writer holds the
    lock, the report of a draining drop is still rewritten."""
    outcome = place.ingester().process(drop_file(place.folder, "users.txt", ["u1", "u2"]))
    assert outcome.moved_to is not None
    report = outcome.moved_to.with_name(outcome.moved_to.name + ".report.json")
    report.unlink()
    refreshed = threading.Event()
    holder = place.sessions.kw["bind"].connect()
    held = holder.begin()  # another writer holds the lock
    try:
        worker = threading.Thread(target=lambda: (place.ingester().refresh_reports(), refreshed.set()))
        worker.start()
        assert refreshed.wait(10), "the report waited for the write lock"
    finally:
        held.rollback()
        holder.close()
    worker.join(30)
    assert place.report(outcome.moved_to)["pending"] == 2


# ------------------------------------------------------------------ chunks handed to the workers


def refused_broker(settings: Settings) -> Settings:
    """``settings`` with the broker on a port nobody listens on."""
    return settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"})}
    )


@pytest.fixture
def celery_of() -> Iterator[Callable[[Settings], Celery]]:
    made: list[Celery] = []

    def make(settings: Settings) -> Celery:
        made.append(make_celery(settings))
        return made[-1]

    yield make
    for app in made:
        app.close()


def claims(sessions: sessionmaker[Session], drop_id: str | None) -> dict[str, tuple[str, bool, datetime | None]]:
    """Each delivery of the drop: its state, whether it is due, and its lease."""
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.state, Delivery.due_at, Delivery.lease_until).where(
                Delivery.drop_id == drop_id
            )
        ).all()
    return {r.id: (str(r.state), r.due_at is not None, r.lease_until) for r in rows}


def test_with_room_in_flight_each_chunk_is_written_claimed_and_handed_to_the_bulk_workers(
    place: Place, celery_of: Callable[[Settings], Celery]
) -> None:
    broker = redis.Redis.from_url(place.settings.redis_url)
    woken: list[int] = []
    path = drop_file(place.folder, "users.txt", [f"u{n}" for n in range(120)])  # chunks of 50, 50 and 20
    outcome = place.ingester(celery=celery_of(place.settings), wake=lambda: woken.append(1)).process(path)

    assert outcome.kind == OutcomeKind.ingested
    rows = claims(place.sessions, outcome.drop_id)
    assert len(rows) == 120 and {(state, due) for state, due, _ in rows.values()} == {("sending", False)}
    messages = queued_messages(broker, "bulk")
    handed = [(i, lease) for ids, lease in messages for i in ids]
    assert sorted(handed) == sorted((i, lease) for i, (_, _, lease) in rows.items())  # each once, under its lease
    assert len({lease for _, lease in messages}) == 3  # one claim per chunk
    assert woken == []  # nothing was left for the dispatcher
    with place.sessions() as session:
        assert not queries.any_due(session=session, lane="bulk", now=utcnow())


def test_chunks_the_lane_has_no_room_for_are_queued_for_the_dispatcher(
    place: Place, celery_of: Callable[[Settings], Celery]
) -> None:
    broker = redis.Redis.from_url(place.settings.redis_url)
    dispatch = place.settings.dispatch.model_copy(update={"max_in_flight": 60})
    tight = place.settings.model_copy(update={"dispatch": dispatch})
    woken: list[int] = []
    path = drop_file(place.folder, "users.txt", [f"u{n}" for n in range(120)])
    ingester = Ingester(
        settings=tight,
        sessions=place.sessions,
        directory=place.folder,
        celery=celery_of(tight),
        wake=lambda: woken.append(1),
    )
    outcome = ingester.process(path)

    rows = claims(place.sessions, outcome.drop_id)
    sending = {i for i, (state, due, lease) in rows.items() if (state, due) == ("sending", False) and lease}
    queued = {i for i, (state, due, lease) in rows.items() if (state, due, lease) == ("queued", True, None)}
    assert (len(sending), len(queued)) == (50, 70)  # the first chunk fitted under 60; then 10 places were left
    assert sorted(i for ids in queued_batches(broker, "bulk") for i in ids) == sorted(sending)
    assert woken == [1, 1]  # once for each chunk left to the dispatcher


def test_while_the_lane_is_full_chunks_do_not_count_it_again_until_a_tick_has_passed(
    place: Place, celery_of: Callable[[Settings], Celery]
) -> None:
    """Counting the in-flight rows of a full lane for every chunk was waste while a large drop
    waits for room; a chunk no larger than the room last seen is still counted (and claimed)."""
    dispatch = place.settings.dispatch.model_copy(update={"max_in_flight": 60, "tick_s": 60.0})
    tight = place.settings.model_copy(update={"dispatch": dispatch})
    counts: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "count(*)" in statement and "lease_until IS NOT NULL" in statement:
            counts.append(statement)

    path = drop_file(place.folder, "users.txt", [f"u{n}" for n in range(155)])  # chunks of 50, 50, 50 and 5
    ingester = Ingester(settings=tight, sessions=place.sessions, directory=place.folder, celery=celery_of(tight))
    engine = place.sessions.kw["bind"]
    sql_event.listen(engine, "before_cursor_execute", seen)
    try:
        outcome = ingester.process(path)
    finally:
        sql_event.remove(engine, "before_cursor_execute", seen)

    rows = claims(place.sessions, outcome.drop_id)
    sending = {i for i, (state, due, lease) in rows.items() if (state, due) == ("sending", False) and lease}
    queued = {i for i, (state, due, lease) in rows.items() if (state, due, lease) == ("queued", True, None)}
    # The first chunk fits under 60; the second finds 10 places; the third is not counted; the
    # last (5 lines) fits in the 10 places seen, is counted and claimed.
    assert (len(sending), len(queued), len(counts)) == (55, 100, 3)


def test_chunks_the_broker_refuses_go_back_to_due_and_ingestion_goes_on(
    place: Place, celery_of: Callable[[Settings], Celery]
) -> None:
    woken: list[int] = []
    path = drop_file(place.folder, "users.txt", [f"u{n}" for n in range(120)])
    ingester = place.ingester(celery=celery_of(refused_broker(place.settings)), wake=lambda: woken.append(1))
    outcome = ingester.process(path)

    assert outcome.kind == OutcomeKind.ingested and get(place.sessions, outcome.drop_id or "").accepted == 120
    rows = claims(place.sessions, outcome.drop_id)
    assert len(rows) == 120 and set(rows.values()) == {("queued", True, None)}  # the dispatcher's to hand out
    assert woken == [1, 1, 1]
