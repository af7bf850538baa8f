"""GET /metrics, /healthz and /readyz: gauges from the system of record, readiness of the broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.api.app import create_app
from herald.config import Settings
from herald.metrics import LATENCY_BUCKETS_S, record_latencies
from herald.store.db import transaction
from herald.store.models import Delivery, DeliveryState, utcnow
from tests.support import free_port

Labels = tuple[tuple[str, str], ...]


def scrape(client: TestClient) -> dict[str, dict[Labels, float]]:
    """Every sample of /metrics by name, then by its sorted labels."""
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def by_lane(samples: dict[Labels, float]) -> dict[str, float]:
    return {dict(labels)["lane"]: value for labels, value in samples.items()}


@pytest.fixture
def redis_down_client(settings: Settings) -> Iterator[TestClient]:
    """The API pointed at a Redis port nothing listens on."""
    down = settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(settings.model_copy(update={"redis": down}))
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


def deliveries_of(client: TestClient, auth: dict[str, str], lane: str, count: int) -> list[str]:
    events = [{"type": "ticket.created", "lane": lane}] * count
    answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
    assert answer.status_code == 202, answer.text
    return [d["id"] for e in answer.json()["events"] for d in e["deliveries"]]


def test_metrics_count_deliveries_and_the_due_backlog_per_lane(
    client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    empty = scrape(client)
    assert by_lane(empty["herald_due_backlog"]) == {"otp": 0, "transactional": 0, "bulk": 0}
    assert by_lane(empty["herald_due_oldest_age_seconds"]) == {"otp": 0, "transactional": 0, "bulk": 0}

    assert client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).status_code == 201
    otp = deliveries_of(client, auth, "otp", 2)
    bulk = deliveries_of(client, auth, "bulk", 3)
    transactional = deliveries_of(client, auth, "transactional", 1)
    now = utcnow()
    with transaction(sessions) as session:
        session.execute(update(Delivery).where(Delivery.id == otp[0]).values(due_at=now - timedelta(seconds=120)))
        session.execute(update(Delivery).where(Delivery.id == bulk[0]).values(state=DeliveryState.dead, due_at=None))
        session.execute(
            update(Delivery)
            .where(Delivery.id == bulk[1])
            .values(state=DeliveryState.scheduled, due_at=now + timedelta(hours=1))
        )
        session.execute(
            update(Delivery).where(Delivery.id == transactional[0]).values(state=DeliveryState.delivered, due_at=None)
        )

    samples = scrape(client)
    states = {
        dict(labels)["state"] + "/" + dict(labels)["lane"]: v for labels, v in samples["herald_deliveries"].items()
    }
    assert {dict(labels)["channel"] for labels in samples["herald_deliveries"]} == {"webhook"}
    assert states == {
        "queued/otp": 2,
        "queued/bulk": 1,
        "dead/bulk": 1,
        "scheduled/bulk": 1,
        "delivered/transactional": 1,
    }
    assert by_lane(samples["herald_due_backlog"]) == {"otp": 2, "transactional": 0, "bulk": 1}
    ages = by_lane(samples["herald_due_oldest_age_seconds"])
    assert 120 <= ages["otp"] < 180
    assert 0 <= ages["bulk"] < 60
    assert ages["transactional"] == 0


def test_health_and_readiness(client: TestClient) -> None:
    health = client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}


def test_readiness_fails_when_redis_is_unreachable_but_the_api_still_accepts(
    redis_down_client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    ready = redis_down_client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.headers["content-type"] == "application/problem+json"
    problem = ready.json()
    assert (problem["type"], problem["status"], problem["code"]) == ("urn:herald:problem:not_ready", 503, "not_ready")
    assert problem["title"] and problem["detail"]
    assert problem["checks"]["database"] == "ok"
    assert problem["checks"]["broker"].startswith("unreachable")

    assert redis_down_client.get("/healthz").status_code == 200
    assert "herald_due_backlog" in scrape(redis_down_client)
    # The database is the system of record: the event is committed and found by the dispatcher's tick.
    answer = redis_down_client.post("/v1/events", json={"type": "ticket.created"}, headers=auth)
    assert answer.status_code == 202, answer.text
    with sessions() as session:
        assert session.execute(text("SELECT count(*) FROM events")).scalar_one() == 1


def test_latency_histogram_counts_each_observation_under_every_bound_it_fits(
    client: TestClient, settings: Settings
) -> None:
    """Workers add batches of attempt latencies; a scrape shows Prometheus' cumulative buckets."""
    store = redis.Redis.from_url(settings.redis_url)
    prefix = settings.redis.key_prefix
    observation = st.tuples(
        st.sampled_from(["otp", "bulk"]),
        st.sampled_from(["webhook", "sms"]),
        st.one_of(st.sampled_from([0.0, *LATENCY_BUCKETS_S, 45.0]), st.floats(0, 60, allow_nan=False)),
    )

    @hypothesis_settings(max_examples=40)
    @given(batches=st.lists(st.lists(observation, max_size=30), max_size=4))
    def check(batches: list[list[tuple[str, str, float]]]) -> None:
        store.delete(*[keys.latency(prefix, lane, ch) for lane in ("otp", "bulk") for ch in ("webhook", "sms")])
        for batch in batches:
            record_latencies(store, prefix=prefix, observations=batch)
        seen = [o for batch in batches for o in batch]
        buckets = scrape(client).get("herald_attempt_latency_seconds_bucket", {})
        for lane, channel in {(lane, channel) for lane, channel, _ in seen}:
            mine = [s for ln, ch, s in seen if (ln, ch) == (lane, channel)]
            for bound in LATENCY_BUCKETS_S:
                labels = (("channel", channel), ("lane", lane), ("le", str(bound)))
                assert buckets[labels] == sum(1 for s in mine if s <= bound), (labels, mine)
            assert buckets[(("channel", channel), ("lane", lane), ("le", "+Inf"))] == len(mine)
        assert len(buckets) == 13 * len({(lane, channel) for lane, channel, _ in seen})

    try:
        check()
    finally:
        store.close()
