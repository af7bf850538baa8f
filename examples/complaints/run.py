#!/usr/bin/env python3
"""The complaints desk scenario against a running Herald.

A bank's complaints desk files a ticket for a consumer, changes its status, escalates and resolves
it; the consumer hears about each step by email (and SMS if they have a phone number), and a
consumer link shows them the ticket's timeline without any tenant key.

    python3 run.py up &                                       # Herald
    python3 run.py tenants create bank                        # prints KEY
    uv run python examples/complaints/run.py --api http://127.0.0.1:8000 --key KEY --email you@example.com

Uses only the HTTP API (and ``requests``); every call's failure is printed with its problem body.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import requests

STEPS = [
    ("ticket.submitted", {"status": "submitted", "title": "Card charged twice"}),
    ("ticket.status_changed", {"status": "in review"}),
    ("ticket.escalated", {"status": "escalated", "level": 2}),
    ("ticket.resolved", {"status": "resolved", "resolution": "Refund of 49.90 EUR issued"}),
]

EMAIL = {
    "subject": "Ticket {{ event.subject }}: {{ data.status }}",
    "text": "Hello,\n\nyour complaint {{ event.subject }} is now {{ data.status }}."
    "{% if data.resolution %}\n\n{{ data.resolution }}{% endif %}\n",
    "html": "<p>Your complaint <b>{{ event.subject }}</b> is now <b>{{ data.status }}</b>.</p>"
    "{% if data.resolution %}<p>{{ data.resolution }}</p>{% endif %}",
    "sample_data": {"status": "submitted", "resolution": "Refund issued"},
}
SMS = {"text": "{{ event.subject }}: {{ data.status }}", "sample_data": {"status": "submitted"}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="a tenant API key (herald tenants create …)")
    parser.add_argument("--email", default="consumer@example.com")
    parser.add_argument("--phone", default=None, help="E.164, e.g. +4915123456789")
    parser.add_argument("--ticket", default="ticket:4711")
    parser.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for deliveries")
    args = parser.parse_args()
    herald = Herald(args.api, args.key)

    for event_type, _ in STEPS:
        herald.call("PUT", f"/v1/templates/{event_type}/email/default", EMAIL)
        herald.call("PUT", f"/v1/templates/{event_type}/sms/default", SMS)
    person = {"email": args.email, "locale": "en", "timezone": "Europe/Berlin"}
    if args.phone:
        person["phone"] = args.phone
    herald.call("PUT", "/v1/recipients/consumer-1", person)

    delivery_ids = []
    for event_type, data in STEPS:
        accepted = herald.call(
            "POST",
            "/v1/events",
            {"type": event_type, "subject": args.ticket, "recipients": ["consumer-1"], "data": data,
             "idempotency_key": f"{args.ticket}:{event_type}"},
        )  # fmt: skip
        delivery_ids += [d["id"] for d in accepted["deliveries"]]
        print(f"{event_type:24} accepted as {accepted['id']} ({len(accepted['deliveries'])} deliveries)")

    deadline = time.monotonic() + args.wait_s
    finished = {"delivered", "dead", "expired", "suppressed", "canceled"}
    while time.monotonic() < deadline:
        states = [herald.call("GET", f"/v1/deliveries/{i}")["state"] for i in delivery_ids]
        if all(s in finished for s in states):
            break
        time.sleep(0.5)
    link = herald.call("POST", f"/v1/subjects/{args.ticket}/links", {"ttl_s": 3600})
    timeline = requests.get(link["timeline_url"], timeout=10).json()  # no tenant key: the consumer's view
    print(f"consumer link: {link['timeline_url']}")
    print(json.dumps(timeline, indent=2))


if __name__ == "__main__":
    main()
