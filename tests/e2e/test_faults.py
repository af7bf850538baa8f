"""Faults with nothing of Herald's mocked: a worker killed with SIGKILL, Redis flushed or restarted."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store.models import Delivery
from herald.supervisor import redis_server_path
from tests.e2e.test_delivery import make_endpoint
from tests.support import Processes, Receiver, free_port, wait_until

pytestmark = pytest.mark.slow


class PrivateRedis:
    """A Redis server of this test's own, so it can be flushed and restarted without harming others."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: self._pings(), timeout_s=10, what="private Redis")

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(settings: Settings, private_redis: PrivateRedis) -> Settings:
    """Short leases so lost work comes back within seconds, on a Redis this test may break."""
    return settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"url": private_redis.url}),
            "dispatch": settings.dispatch.model_copy(update={"lease_s": 4.0, "reconcile_every_s": 0.5}),
            "webhook": settings.webhook.model_copy(update={"total_timeout_s": 2.0, "connect_timeout_s": 1.0}),
        }
    )


def accept(client: TestClient, auth: dict[str, str], count: int) -> set[str]:
    ids: set[str] = set()
    for start in range(0, count, 1000):
        events = [{"type": "drop.user", "subject": f"user:{i}"} for i in range(start, min(count, start + 1000))]
        answer = client.post("/v1/events/batch", json={"events": events}, headers=auth)
        assert answer.status_code == 202, answer.text
        ids |= {d["id"] for e in answer.json()["events"] for d in e["deliveries"]}
    assert len(ids) == count
    return ids


def delivered(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(Delivery.state == "delivered")) or 0)


def start_in_flight(
    client: TestClient, auth: dict[str, str], receiver: Receiver, processes: Processes, count: int
) -> set[str]:
    """Accept ``count`` deliveries to a slow receiver and return once about a tenth are in flight."""
    receiver.delay_s = 0.2
    make_endpoint(client, auth, receiver)
    ids = accept(client, auth, count)
    processes.worker()
    processes.dispatcher()
    wait_until(lambda: len(receiver.received) >= count // 10, what="deliveries to be in flight")
    return ids


def assert_recovered(
    receiver: Receiver, processes: Processes, sessions: sessionmaker[Session], ids: set[str], *, timeout_s: float
) -> None:
    """Every id reached the receiver and is recorded delivered, thanks to the reconciler."""
    wait_until(lambda: receiver.ids() >= ids, timeout_s=timeout_s, what="every delivery id to reach the receiver")
    wait_until(lambda: delivered(sessions) == len(ids), timeout_s=30, what="every delivery recorded as delivered")
    assert "reconciler returned" in processes.log("dispatcher")


def test_kill_9_worker_with_2000_in_flight_loses_nothing(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
) -> None:
    receiver.delay_s = 0.2
    make_endpoint(client, auth, receiver)
    ids = accept(client, auth, 2000)
    processes.worker()
    processes.dispatcher()
    wait_until(lambda: len(receiver.received) >= 300, what="deliveries to be in flight")
    processes.kill("worker")  # SIGKILL to the worker and its pool processes
    assert len(receiver.ids()) < 2000, "the kill came too late to prove anything"
    processes.worker(name="worker-2")
    wait_until(lambda: receiver.ids() >= ids, timeout_s=90, what="every delivery id to reach the receiver")
    wait_until(lambda: delivered(sessions) == 2000, timeout_s=30, what="every delivery recorded as delivered")
    assert receiver.bad_signatures == 0


def test_redis_flushall_mid_run_is_recovered_by_the_reconciler(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
    private_redis: PrivateRedis,
) -> None:
    ids = start_in_flight(client, auth, receiver, processes, 1000)
    redis.Redis.from_url(private_redis.url).flushall()
    assert len(receiver.ids()) < 1000, "the flush came too late to prove anything"
    assert_recovered(receiver, processes, sessions, ids, timeout_s=90)
    # New work after the flush still flows, although the flush also removed kombu's bindings.
    later = accept(client, auth, 10)
    wait_until(lambda: receiver.ids() >= later, timeout_s=30, what="work accepted after the flush")


def test_redis_restarted_empty_mid_run_is_recovered(
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
    private_redis: PrivateRedis,
) -> None:
    ids = start_in_flight(client, auth, receiver, processes, 1000)
    private_redis.stop()
    private_redis.start()  # same port, nothing kept
    assert_recovered(receiver, processes, sessions, ids, timeout_s=120)
