"""Retries, dead letters and replays against a real receiver, with a real worker and dispatcher."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.e2e.test_delivery import delivery, make_endpoint
from tests.support import Processes, Receiver, wait_until

pytestmark = pytest.mark.slow


def send(client: TestClient, auth: dict[str, str], **extra: object) -> str:
    answer = client.post("/v1/events", json={"type": "ticket.updated", "subject": "ticket:1", **extra}, headers=auth)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["deliveries"][0]["id"])


def settled(client: TestClient, auth: dict[str, str], delivery_id: str, state: str) -> dict[str, object] | None:
    record = delivery(client, auth, delivery_id)
    return record if record["state"] == state else None


@pytest.mark.parametrize("failures", [1, 3])
def test_500_k_times_then_200_is_delivered_on_attempt_k_plus_1_with_one_webhook_id(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes, failures: int
) -> None:
    receiver.behaviour = lambda _id, n: 500 if n <= failures else 200
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    delivery_id = send(client, auth)
    record = wait_until(lambda: settled(client, auth, delivery_id, "delivered"), what="delivery after retries")
    assert record["attempt_count"] == failures + 1
    assert [r.webhook_id for r in receiver.received] == [delivery_id] * (failures + 1)
    assert [r.status for r in receiver.received] == [500] * failures + [200]
    attempts = record["attempts"]
    assert isinstance(attempts, list)
    assert [a["outcome"] for a in attempts] == ["retry"] * failures + ["delivered"]
    assert receiver.bad_signatures == 0


def test_always_500_dies_after_max_attempts_and_replay_delivers_once(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    healthy = False
    receiver.behaviour = lambda _id, _n: 200 if healthy else 500
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    delivery_id = send(client, auth)
    record = wait_until(lambda: settled(client, auth, delivery_id, "dead"), what="the delivery to die")
    max_attempts = client.app.state.settings.retry.max_attempts  # type: ignore[attr-defined]
    assert record["attempt_count"] == max_attempts
    assert len(receiver.received) == max_attempts
    assert "HTTP 500" in str(record["last_error"])
    dead = client.get("/v1/dead-letters", headers=auth).json()["data"]
    assert [d["id"] for d in dead] == [delivery_id]

    healthy = True
    answer = client.post("/v1/dead-letters/replay", json={"ids": [delivery_id]}, headers=auth)
    assert answer.json() == {"replayed": [delivery_id], "skipped": [], "reasons": {}}
    wait_until(lambda: settled(client, auth, delivery_id, "delivered"), what="the replay to deliver")
    again = client.post("/v1/dead-letters/replay", json={"ids": [delivery_id]}, headers=auth)
    assert again.json() == {
        "replayed": [],
        "skipped": [delivery_id],
        "reasons": {delivery_id: "state delivered: not dead; force re-sends it"},
    }
    # Give a wrongly replayed delivery every chance to arrive before counting.
    processes_settle = client.post("/v1/events", json={"type": "ticket.updated"}, headers=auth).json()
    wait_until(
        lambda: settled(client, auth, processes_settle["deliveries"][0]["id"], "delivered"), what="a later event"
    )
    ours = [r for r in receiver.received if r.webhook_id == delivery_id]
    assert [r.status for r in ours] == [500] * max_attempts + [200]


def test_retry_after_on_429_is_honoured(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    receiver.behaviour = lambda _id, n: (429, {"Retry-After": "2"}) if n == 1 else 200
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    delivery_id = send(client, auth)
    wait_until(lambda: settled(client, auth, delivery_id, "delivered"), what="delivery after 429")
    first, second = receiver.received
    assert second.at - first.at >= 2.0 - 0.05  # receiver clock; 50 ms for timestamp granularity
    assert first.webhook_id == second.webhook_id == delivery_id


def test_4xx_dead_letters_at_once_and_410_disables_the_endpoint(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    receiver.behaviour = lambda _id, _n: 400
    endpoint_id = make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()
    bad_request = send(client, auth)
    record = wait_until(lambda: settled(client, auth, bad_request, "dead"), what="400 to dead-letter")
    assert record["attempt_count"] == 1

    receiver.behaviour = lambda _id, _n: 410
    gone = send(client, auth)
    wait_until(lambda: settled(client, auth, gone, "dead"), what="410 to dead-letter")
    endpoint = client.get(f"/v1/endpoints/{endpoint_id}", headers=auth).json()
    assert endpoint["enabled"] is False
    assert "410" in endpoint["disabled_reason"]
    # A disabled endpoint matches no new event.
    answer = client.post("/v1/events", json={"type": "ticket.updated"}, headers=auth)
    assert answer.json()["deliveries"] == []


def test_lanes_are_separate_queues(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    make_endpoint(client, auth, receiver)
    processes.worker(lanes="otp")
    processes.dispatcher()
    bulk = [send(client, auth, lane="bulk") for _ in range(5)]
    otp = send(client, auth, lane="otp")
    wait_until(lambda: settled(client, auth, otp, "delivered"), what="the otp delivery")
    # No bulk worker runs: bulk deliveries sit in their own queue, untouched by the otp worker.
    # They are handed to the bulk lane's queue (sending, under a lease), never attempted.
    wait_until(lambda: all(delivery(client, auth, i)["state"] == "sending" for i in bulk), what="the bulk lane's claim")
    assert all(delivery(client, auth, i)["attempt_count"] == 0 for i in bulk)
    assert receiver.ids() == {otp}
    processes.worker(name="bulk-worker", lanes="bulk")
    wait_until(lambda: receiver.ids() == {otp, *bulk}, what="the bulk worker to drain its lane")


def test_endpoint_concurrency_limit_and_pause_after_503(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes
) -> None:
    receiver.delay_s = 0.3
    make_endpoint(client, auth, receiver, max_concurrency=2)
    # Two workers of two processes each: the limit holds for the fleet, not per process.
    processes.worker("worker-a", concurrency=2)
    processes.worker("worker-b", concurrency=2)
    wait_until(
        lambda: all(" ready." in processes.log(name) for name in ("worker-a", "worker-b")),
        timeout_s=60,
        what="both workers to be ready",
    )
    processes.env["HERALD_DISPATCH__MAX_BATCH"] = "3"  # several messages, so every process gets work
    processes.dispatcher()
    events = [{"type": "drop.user", "subject": f"user:{i}", "lane": "bulk"} for i in range(16)]
    client.post("/v1/events/batch", json={"events": events}, headers=auth)
    wait_until(lambda: len(receiver.ids()) == 16, what="the throttled batch")
    assert receiver.max_in_flight == 2  # four worker processes, at most two requests at once to this endpoint
    assert all(record_attempts(client, auth, i) == 1 for i in receiver.ids())  # held back, never failed

    receiver.received.clear()
    receiver.delay_s = 0.0
    calls: list[str] = []

    def overloaded_once(webhook_id: str, _n: int) -> int | tuple[int, dict[str, str]]:
        calls.append(webhook_id)
        return (503, {"Retry-After": "3"}) if len(calls) == 1 else 200

    receiver.behaviour = overloaded_once
    first = send(client, auth)
    wait_until(lambda: receiver.ids() == {first}, what="the 503")
    refused_at = receiver.received[0].at
    later = [send(client, auth) for _ in range(3)]
    wait_until(lambda: receiver.ids() >= {first, *later}, timeout_s=30, what="everything after the pause")
    # The other deliveries waited out the receiver's Retry-After although none of them got a 503.
    assert all(r.at >= refused_at + 3.0 - 0.05 for r in receiver.received if r.webhook_id in later)
    assert all(record_attempts(client, auth, i) == 1 for i in later)  # held back, not failed


def record_attempts(client: TestClient, auth: dict[str, str], delivery_id: str) -> int:
    wait_until(lambda: settled(client, auth, delivery_id, "delivered"), what="recorded")
    return int(delivery(client, auth, delivery_id)["attempt_count"])  # type: ignore[call-overload]
