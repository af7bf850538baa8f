"""The examples run end to end against real Herald processes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from herald.config import Settings
from tests.e2e.test_timeline import start_api
from tests.support import MailSink, Processes, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture
def settings(settings: Settings, mail: MailSink) -> Settings:
    return settings.model_copy(
        update={"smtp": settings.smtp.model_copy(update={"host": "127.0.0.1", "port": mail.port, "tls": "none"})}
    )


def test_complaints_scenario(
    client: TestClient, api_key: str, processes: Processes, mail: MailSink, settings: Settings
) -> None:
    api = start_api(processes, "api")
    processes.worker()
    processes.dispatcher()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "complaints" / "run.py"), "--api", api, "--key", api_key,
         "--email", "consumer@example.com"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    subjects = [m["Subject"] for m in mail.to("consumer@example.com")]
    assert sorted(subjects) == sorted(
        f"Ticket ticket:4711: {s}" for s in ("submitted", "in review", "escalated", "resolved")
    )
    timeline = json.loads(done.stdout[done.stdout.index("{") :])
    assert [e["type"] for e in timeline["events"]] == [
        "ticket.submitted", "ticket.status_changed", "ticket.escalated", "ticket.resolved"
    ]  # fmt: skip
    states = {d["channel"]: d["state"] for e in timeline["events"] for d in e["deliveries"]}
    assert states == {"email": "delivered", "sms": "suppressed"}  # no phone number: recorded, not sent
    # Running the scenario again sends nothing new: every event carries an idempotency key.
    again = subprocess.run(
        [sys.executable, str(EXAMPLES / "complaints" / "run.py"), "--api", api, "--key", api_key, "--wait-s", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert len(mail.to("consumer@example.com")) == 4


def test_clinic_scenario(
    client: TestClient, api_key: str, processes: Processes, mail: MailSink, settings: Settings
) -> None:
    api = start_api(processes, "api")
    processes.worker(wait=True)  # the reminder has a 12 s window before the visit starts
    processes.dispatcher()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "clinic" / "run.py"), "--api", api, "--key", api_key,
         "--email", "patient@example.com", "--starts-in-s", "24", "--reminder-before-s", "12"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "reminder for visit 88: delivered" in done.stdout
    summary = json.loads(done.stdout.rsplit("summary:", 1)[1])
    auth = {"Authorization": f"Bearer {api_key}"}

    def read(path: str) -> dict[str, Any]:
        answer = client.get(path, headers=auth)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    # Moving visit 88 replaced its first reminder; cancelling visit 89 canceled its reminder.
    for replaced in (summary["booked_reminder"], summary["canceled_reminder"]):
        record = read(f"/v1/deliveries/{replaced}")
        assert (record["state"], record["attempt_count"]) == ("canceled", 0), record
    # The moved reminder went out once, at its new time (12 s before the moved visit), not before.
    moved = read(f"/v1/deliveries/{summary['moved_reminder']}")
    assert (moved["state"], moved["attempt_count"]) == ("delivered", 1), moved
    moved_due = datetime.fromisoformat(summary["moved_reminder_due_at"])
    assert datetime.fromisoformat(moved["attempts"][0]["started_at"]) >= moved_due
    # The payment event, sent twice with one idempotency key, is one event with one receipt.
    first, again = summary["receipt_events"]
    assert first == again
    receipts = read(f"/v1/events/{first}")["deliveries"]
    assert [d["channel"] for d in receipts] == ["email"]
    receipt_id = receipts[0]["id"]
    wait_until(lambda: read(f"/v1/deliveries/{receipt_id}")["state"] == "delivered", what="the receipt")
    assert read(f"/v1/deliveries/{receipt_id}")["attempt_count"] == 1

    subjects = sorted(m["Subject"] for m in mail.to("patient@example.com"))
    assert len(subjects) == 2 and subjects[0].startswith("Receipt p-1001") and subjects[1].startswith("Reminder")
    receipt = next(m for m in mail.to("patient@example.com") if m["Subject"].startswith("Receipt"))
    parts = {p.get_content_type(): p.get_payload(decode=True).decode() for p in receipt.walk() if not p.is_multipart()}
    assert "2 x Blood test: 10.00" in parts["text/plain"] and "Total: 107.10 EUR" in parts["text/plain"]
    assert "<th>107.10 EUR</th>" in parts["text/html"]
