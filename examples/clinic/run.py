#!/usr/bin/env python3
"""The clinic scenario against a running Herald.

A visits service books visits and Herald emails a reminder the day before at 09:00 in the
patient's time zone; moving a visit moves its reminder (same schedule key), cancelling cancels it.
A payments service emails a receipt after each payment; sending the same payment twice delivers
once (the payment id is the idempotency key).

    uv run python examples/clinic/run.py --api http://127.0.0.1:8000 --key KEY --email patient@example.com

For a demonstration in seconds rather than days, ``--starts-in-s 20 --reminder-before-s 10``
schedules the reminder relative to the visit's start instead of "the day before at 09:00".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

REMINDER = {
    "subject": "Reminder: your visit on {{ data.visit.starts_at[:10] }}",
    "text": "Hello {{ data.patient_name }},\n\nthis is a reminder of your visit with {{ data.visit.doctor }} "
    "at {{ data.visit.starts_at[11:16] }} (UTC).\n",
    "sample_data": {"patient_name": "Ada", "visit": {"starts_at": "2026-12-01T10:00:00+00:00", "doctor": "Dr. Who"}},
}
RECEIPT = {
    "subject": "Receipt {{ data.payment_id }}",
    "text": "Receipt {{ data.payment_id }}\n"
    "{% for line in data.lines %}{{ line.qty }} x {{ line.name }}: {{ '%.2f' | format(line.qty * line.unit) }}\n"
    "{% endfor %}Tax ({{ data.tax_rate * 100 }}%): {{ '%.2f' | format(data.tax) }}\n"
    "Total: {{ '%.2f' | format(data.total) }} {{ data.currency }}\n",
    "html": "<h1>Receipt {{ data.payment_id }}</h1><table>"
    "{% for line in data.lines %}<tr><td>{{ line.qty }} x {{ line.name }}</td>"
    "<td>{{ '%.2f' | format(line.qty * line.unit) }}</td></tr>{% endfor %}"
    "<tr><td>Tax</td><td>{{ '%.2f' | format(data.tax) }}</td></tr>"
    "<tr><th>Total</th><th>{{ '%.2f' | format(data.total) }} {{ data.currency }}</th></tr></table>",
    "sample_data": {"payment_id": "p-1", "lines": [{"name": "Consultation", "qty": 1, "unit": 80.0}],
                    "tax_rate": 0.19, "tax": 15.2, "total": 95.2, "currency": "EUR"},
}  # fmt: skip


class Herald:
    def __init__(self, api: str, key: str) -> None:
        self.api = api.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = self.session.request(method, f"{self.api}{path}", json=body, timeout=10)
        if answer.status_code >= 400:
            sys.exit(f"{method} {path} -> {answer.status_code}: {answer.text}")
        return answer.json() if answer.content else {}


def reminder(args: argparse.Namespace, visit: str, starts_at: datetime) -> dict[str, Any]:
    """The reminder event for a visit: one schedule key per visit, never sent after it starts."""
    if args.starts_in_s is not None:
        when = {"field": "visit.starts_at", "offset_s": -args.reminder_before_s}
    else:
        when = {"field": "visit.starts_at", "days": -1, "at": "09:00"}
    return {
        "type": "visit.reminder",
        "subject": f"visit:{visit}",
        "recipients": ["patient-7"],
        "channels": ["email"],
        "data": {"patient_name": "Ada", "visit": {"starts_at": starts_at.isoformat(), "doctor": "Dr. Okafor"}},
        "schedule_key": f"visit:{visit}:reminder",
        "send_relative": when,
        "deliver_by_relative": {"field": "visit.starts_at"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--email", default="patient@example.com")
    parser.add_argument("--starts-in-s", type=float, default=None, help="visits start this soon (demo mode)")
    parser.add_argument("--reminder-before-s", type=float, default=10.0)
    args = parser.parse_args()
    herald = Herald(args.api, args.key)
    herald.call("PUT", "/v1/templates/visit.reminder/email/default", REMINDER)
    herald.call("PUT", "/v1/templates/payment.succeeded/email/default", RECEIPT)
    herald.call("PUT", "/v1/recipients/patient-7", {"email": args.email, "timezone": "Europe/Berlin"})

    now = datetime.now(UTC)
    soon = timedelta(seconds=args.starts_in_s) if args.starts_in_s is not None else timedelta(days=3)
    booked = herald.call("POST", "/v1/events", reminder(args, "88", now + soon * 2))
    print("booked visit 88, reminder due", booked["deliveries"][0]["due_at"])
    moved = herald.call("POST", "/v1/events", reminder(args, "88", now + soon))
    print("moved visit 88, reminder now due", moved["deliveries"][0]["due_at"])
    other = herald.call("POST", "/v1/events", reminder(args, "89", now + soon * 2))
    canceled = herald.call("DELETE", "/v1/schedules/visit:89:reminder")
    print("canceled visit 89:", canceled["canceled"])

    lines = [{"name": "Consultation", "qty": 1, "unit": 80.0}, {"name": "Blood test", "qty": 2, "unit": 5.0}]
    payment = {
        "type": "payment.succeeded",
        "subject": "payment:p-1001",
        "recipients": ["patient-7"],
        "idempotency_key": "payment:p-1001",
        "data": {
            "payment_id": "p-1001",
            "currency": "EUR",
            "tax_rate": 0.19,
            "tax": 17.1,
            "total": 107.1,
            "lines": lines,
        },
    }
    first = herald.call("POST", "/v1/events", payment)
    second = herald.call("POST", "/v1/events", payment)  # the payments service retried: same answer, no new send
    print("receipt event", first["id"], "(sent twice, accepted once:", first == second, ")")
    pending = herald.call("GET", "/v1/schedules?prefix=visit:")
    print(json.dumps({"pending": pending["data"]}, indent=2, default=str))
    state = None
    if args.starts_in_s is not None:
        deadline = time.monotonic() + args.starts_in_s + 30
        reminder_id = moved["deliveries"][0]["id"]
        while time.monotonic() < deadline:
            state = herald.call("GET", f"/v1/deliveries/{reminder_id}")["state"]
            if state in ("delivered", "dead", "expired"):
                print("reminder for visit 88:", state)
                break
            time.sleep(0.5)
    # One line a script (or the example's test) can read back: what to look up in Herald.
    summary = {
        "booked_reminder": booked["deliveries"][0]["id"],
        "moved_reminder": moved["deliveries"][0]["id"],
        "moved_reminder_due_at": moved["deliveries"][0]["due_at"],
        "canceled_reminder": other["deliveries"][0]["id"],
        "receipt_events": [first["id"], second["id"]],
        "reminder_state": state,
    }
    print("summary:", json.dumps(summary))


if __name__ == "__main__":
    main()
