"""Durable scheduled sends, schedule keys, deadlines and recurring sends with real processes."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store.models import Attempt, Delivery, Event, utcnow
from tests.e2e.test_delivery import delivery, make_endpoint
from tests.support import MailSink, Processes, Receiver, assert_problem, row_counts, wait_until

pytestmark = pytest.mark.slow


def at(seconds: float) -> str:
    return (utcnow() + timedelta(seconds=seconds)).isoformat()


def post(client: TestClient, auth: dict[str, str], **body: object) -> dict[str, object]:
    answer = client.post("/v1/events", json={"type": "visit.reminder", **body}, headers=auth)
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def first_id(answer: dict[str, object]) -> str:
    return str(answer["deliveries"][0]["id"])  # type: ignore[index]


def warm_up(client: TestClient, auth: dict[str, str], receiver: Receiver) -> None:
    """Wait until a worker and the dispatcher deliver, so timings measure Herald, not start-up."""
    canary = post(client, auth, subject="canary")
    wait_until(lambda: first_id(canary) in receiver.ids(), timeout_s=60, what="the pipeline to be up")
    receiver.received.clear()


def test_scheduled_sends_are_never_early_and_barely_late(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    warm_up(client, auth, receiver)
    absolute_at = utcnow() + timedelta(seconds=3)
    absolute = post(client, auth, subject="visit:1", send_at=absolute_at.isoformat())
    starts = utcnow() + timedelta(seconds=6)
    relative = post(
        client, auth, subject="visit:2", data={"visit": {"starts_at": starts.isoformat()}},
        send_relative={"field": "visit.starts_at", "offset_s": -2},
    )  # fmt: skip
    assert absolute["deliveries"][0]["state"] == "scheduled"  # type: ignore[index]
    wait_until(lambda: len(receiver.received) == 2, timeout_s=20, what="both scheduled sends")
    by_id = {r.webhook_id: r.at for r in receiver.received}
    for delivery_id, due in ((first_id(absolute), absolute_at), (first_id(relative), starts - timedelta(seconds=2))):
        lateness = by_id[delivery_id] - due.timestamp()
        assert 0 <= lateness < 1.0, (delivery_id, lateness)


def test_schedule_keys_move_cancel_and_refuse_what_was_sent(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes, sessions: sessionmaker[Session]
) -> None:
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    booked = post(client, auth, subject="visit:88", schedule_key="visit:88:reminder", send_at=at(30))
    moved = post(client, auth, subject="visit:88", schedule_key="visit:88:reminder", send_at=at(3))
    assert delivery(client, auth, first_id(booked))["state"] == "canceled"
    pending = client.get("/v1/schedules", params={"prefix": "visit:88"}, headers=auth).json()["data"]
    assert [p["delivery_id"] for p in pending] == [first_id(moved)]
    other = post(client, auth, subject="visit:99", schedule_key="visit:99:reminder", send_at=at(30))
    canceled = client.delete("/v1/schedules/visit:99:reminder", headers=auth)
    assert canceled.status_code == 200 and canceled.json()["canceled"] == [first_id(other)]
    before, record = row_counts(sessions), delivery(client, auth, first_id(other))
    assert_problem(client.delete("/v1/schedules/visit:99:reminder", headers=auth), 409, "conflict", "key")
    assert_problem(client.delete("/v1/schedules/nope", headers=auth), 404, "not_found", "key")
    assert row_counts(sessions) == before and delivery(client, auth, first_id(other)) == record  # nothing written

    wait_until(lambda: receiver.ids() == {first_id(moved)}, timeout_s=20, what="the moved reminder")
    wait_until(lambda: delivery(client, auth, first_id(moved))["state"] == "delivered", what="recorded")
    before, record = row_counts(sessions), delivery(client, auth, first_id(moved))
    late = client.post(
        "/v1/events",
        json={"type": "visit.reminder", "schedule_key": "visit:88:reminder", "send_at": at(30)},
        headers=auth,
    )
    assert_problem(late, 409, "conflict", "schedule_key")
    assert_problem(client.delete("/v1/schedules/visit:88:reminder", headers=auth), 409, "conflict", "key")
    assert row_counts(sessions) == before and delivery(client, auth, first_id(moved)) == record  # nothing written
    assert client.get("/v1/schedules", params={"prefix": "visit:"}, headers=auth).json()["data"] == []


def test_deadlines_expire_instead_of_sending_late(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    canary = post(client, auth, subject="visit:4")  # the pipeline is up before any deadline starts
    wait_until(lambda: delivery(client, auth, first_id(canary))["state"] == "delivered", timeout_s=60, what="canary")
    receiver.behaviour = lambda _id, _n: 503
    # Attempts fail and are retried (quickly in these tests) until the deadline: the delivery
    # expires when the next try would pass it, or when it is due again only after it.
    answer = post(client, auth, subject="visit:5", deliver_by=at(1.5))
    wait_until(lambda: delivery(client, auth, first_id(answer))["state"] == "expired", what="expiry")
    record = delivery(client, auth, first_id(answer))
    deadline = datetime.fromisoformat(str(record["deliver_by"]))
    attempts = record["attempts"]
    assert isinstance(attempts, list) and attempts
    assert all(a["status_code"] == 503 for a in attempts)
    assert "deliver_by" in str(record["last_error"]) + attempts[-1]["decision"], (record, attempts)
    # No attempt starts after the deadline (the receiver's clock may see one started just before
    # it a moment later, so Herald's attempt times are what is checked).
    assert all(datetime.fromisoformat(a["started_at"]) <= deadline for a in attempts)
    assert receiver.calls[first_id(answer)] == len(attempts)
    refused = client.post(
        "/v1/events", json={"type": "visit.reminder", "send_at": at(10), "deliver_by": at(5)}, headers=auth
    )
    assert_problem(refused, 422, "validation_error", "send_at")


def test_quiet_hours_defer_non_critical_sends_to_the_window_s_end_unless_that_passes_the_deadline(
    client: TestClient, auth: dict[str, str], processes: Processes, mail: MailSink
) -> None:
    processes.env |= {"HERALD_SMTP__HOST": "127.0.0.1", "HERALD_SMTP__PORT": str(mail.port), "HERALD_SMTP__TLS": "none"}
    processes.worker()
    processes.dispatcher()
    template = {"subject": "{{ data.n }}", "text": "See you"}
    assert client.put("/v1/templates/visit.reminder/email/default", json=template, headers=auth).status_code < 300
    assert client.put("/v1/recipients/p-0", json={"email": "p0@example.com"}, headers=auth).status_code < 300
    post(client, auth, recipients=["p-0"], data={"n": "canary"})
    wait_until(lambda: mail.to("p0@example.com"), timeout_s=60, what="the pipeline to be up")
    # Quiet hours are whole minutes, so the shortest window that holds "now" ends at the next
    # minute (the one after, if the next is too close to see the window at work): 10 to 70 s away.
    zone = ZoneInfo("Asia/Kolkata")  # UTC+05:30: local minutes, not UTC ones
    now = utcnow()
    end = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if end - now < timedelta(seconds=10):
        end += timedelta(minutes=1)
    window = {"start": (now - timedelta(hours=1)).astimezone(zone).strftime("%H:%M"),
              "end": end.astimezone(zone).strftime("%H:%M")}  # fmt: skip
    person = {"email": "p1@example.com", "timezone": zone.key, "quiet_hours": window}
    assert client.put("/v1/recipients/p-1", json=person, headers=auth).status_code < 300

    deferred = first(post(client, auth, recipients=["p-1"], data={"n": "deferred"}))
    urgent = first(post(client, auth, recipients=["p-1"], data={"n": "urgent"}, category="security"))
    # Waiting for the window to end would pass this one's deadline: as documented, it goes now.
    deadline = end - timedelta(seconds=1)
    bounded = first(post(client, auth, recipients=["p-1"], data={"n": "bounded"}, deliver_by=deadline.isoformat()))
    assert [d["state"] for d in (deferred, urgent, bounded)] == ["scheduled", "queued", "queued"]
    assert datetime.fromisoformat(deferred["due_at"]) == end

    def sent() -> list[str]:
        return sorted(m["Subject"] for m in mail.to("p1@example.com"))

    wait_until(lambda: sent() == ["bounded", "urgent"], timeout_s=10, what="the sends that do not wait")
    record = wait_until(lambda: recorded(client, auth, bounded["id"]), timeout_s=10, what="the bounded send recorded")
    assert started_at(record) < deadline
    wait_until(lambda: utcnow() >= end - timedelta(seconds=0.5), timeout_s=70)
    assert sent() == ["bounded", "urgent"], "the deferred send went out inside quiet hours"
    wait_until(lambda: "deferred" in sent(), timeout_s=30, what="the deferred send after the window")
    record = wait_until(lambda: recorded(client, auth, deferred["id"]), timeout_s=10, what="the deferred send recorded")
    assert record["attempt_count"] == 1 and started_at(record) >= end


def recorded(client: TestClient, auth: dict[str, str], delivery_id: str) -> dict[str, object] | None:
    """The delivery once it is recorded as delivered (the mail may arrive a moment before)."""
    record = delivery(client, auth, delivery_id)
    return record if record["state"] == "delivered" else None


def first(answer: dict[str, object]) -> dict[str, Any]:
    deliveries = answer["deliveries"]
    assert isinstance(deliveries, list)
    return dict(deliveries[0])


def started_at(record: dict[str, object]) -> datetime:
    attempts = record["attempts"]
    assert isinstance(attempts, list) and attempts
    return datetime.fromisoformat(attempts[0]["started_at"])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={"recurring_every_s": 0.5})})


def test_recurring_sends_fire_each_occurrence_once_with_two_beats_and_a_crash(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    endpoint_id = make_endpoint(client, auth, receiver)
    created = client.post(
        "/v1/recurring",
        json={"name": "hourly collection", "cron": "* * * * * */2", "timezone": "Europe/Berlin",
              "event": {"type": "collect.tick", "endpoint_ids": [endpoint_id]}},
        headers=auth,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    processes.worker()
    processes.dispatcher()
    for name in ("beat-a", "beat-b"):
        processes.start(name, "beat", "--schedule-file", str(settings.data_dir / f"{name}.schedule"))
    wait_until(lambda: len(receiver.received) >= 3, timeout_s=30, what="the first occurrences")
    processes.kill("beat-a")
    processes.kill("beat-b")  # every beat down: occurrences are missed...
    gap_from = utcnow()
    wait_until(lambda: utcnow() - gap_from > timedelta(seconds=4), timeout_s=10)
    processes.start("beat-a", "beat", "--schedule-file", str(settings.data_dir / "beat-a.schedule"))
    wait_until(lambda: len(receiver.received) >= 8, timeout_s=30, what="occurrences after the restart")
    processes.kill("beat-a")
    processes.kill("worker")
    with sessions() as session:
        keys = session.scalars(select(Event.idempotency_key).where(Event.type == "collect.tick")).all()
    fire_times = sorted(datetime.fromisoformat(str(k).split(":", 2)[2]) for k in keys)  # recurring:<id>:<instant>
    assert len(set(fire_times)) == len(fire_times), "an occurrence was emitted twice"
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(fire_times)}
    assert gaps == {2.0}, f"occurrences lost or doubled: {sorted(gaps)}"  # ...and caught up after the crash
    per_id: dict[str, int] = {}
    for r in receiver.received:
        per_id[r.webhook_id] = per_id.get(r.webhook_id, 0) + 1
    assert set(per_id.values()) == {1}


# Short, so the wait past every redelivery stays short. Settings insist that the lease exceeds a
# webhook's timeout and the visibility timeout exceeds the lease plus the reconcile interval.
WEBHOOK_TIMEOUT_S, LEASE_S, RECONCILE_S, VISIBILITY_TIMEOUT_S = 3, 4, 1, 6


@pytest.mark.timeout(240)  # about 80 s: sends due in a minute, then a wait past every redelivery
def test_1000_scheduled_sends_survive_worker_kills_exactly_once_and_never_early(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes, sessions: sessionmaker[Session]
) -> None:
    # A visibility timeout far shorter than the wait: with Celery countdowns on Redis this is the
    # set-up that redelivers and duplicates. Herald keeps the time in the database instead.
    processes.env["HERALD_DISPATCH__VISIBILITY_TIMEOUT_S"] = str(VISIBILITY_TIMEOUT_S)
    processes.env["HERALD_WEBHOOK__TOTAL_TIMEOUT_S"] = str(WEBHOOK_TIMEOUT_S)
    processes.env["HERALD_WEBHOOK__CONNECT_TIMEOUT_S"] = "1"
    processes.env["HERALD_DISPATCH__LEASE_S"] = str(LEASE_S)
    processes.env["HERALD_DISPATCH__RECONCILE_EVERY_S"] = str(RECONCILE_S)
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    due = utcnow() + timedelta(seconds=60)
    events = [{"type": "visit.reminder", "subject": f"visit:{i}", "send_at": due.isoformat()} for i in range(1000)]
    answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
    assert answer.status_code == 202, answer.text
    ids = {d["id"] for e in answer.json()["events"] for d in e["deliveries"]}
    assert len(ids) == 1000
    warm_up(client, auth, receiver)  # while the minute runs: the pipeline works, the 1,000 wait
    running = "worker"
    for kill_at in (30, 15):  # kill -9 and restart the workers twice before the sends are due
        wait_until(lambda k=kill_at: utcnow() >= due - timedelta(seconds=k), timeout_s=60)
        processes.kill(running)
        running = f"worker-{kill_at}"
        processes.worker(name=running)
    wait_until(lambda: utcnow() >= due - timedelta(seconds=1), timeout_s=30)
    assert receiver.received == [], "a send went out early"

    wait_until(lambda: receiver.ids() >= ids, timeout_s=60, what="all 1,000 scheduled sends")
    # A duplicate would come late: a message Redis hands out again after the visibility timeout,
    # or rows the reconciler puts back once a lease has passed. Wait past both before counting.
    last = max(r.at for r in receiver.received)
    quiet_for_s = VISIBILITY_TIMEOUT_S + LEASE_S + RECONCILE_S + 2
    wait_until(lambda: time.time() > last + quiet_for_s, timeout_s=quiet_for_s + 5)
    counts = Counter(r.webhook_id for r in receiver.received)
    assert set(counts) == ids
    assert [i for i, n in counts.items() if n > 1] == [], "a send went out twice"
    assert min(r.at for r in receiver.received) >= due.timestamp(), "a send went out early"
    with sessions() as session:
        states = Counter(session.scalars(select(Delivery.state).where(Delivery.id.in_(ids))))
        attempts = dict(
            session.execute(
                select(Attempt.delivery_id, func.count())
                .where(Attempt.delivery_id.in_(ids))
                .group_by(Attempt.delivery_id)
            ).all()
        )
        first_try = session.scalar(select(func.min(Attempt.started_at)).where(Attempt.delivery_id.in_(ids)))
    assert states == {"delivered": 1000}
    assert attempts == dict.fromkeys(ids, 1), "a delivery was attempted more than once"
    assert first_try is not None and first_try >= due
