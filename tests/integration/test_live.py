"""Worker state changes reach live timelines only when a stream listens to the tenant.

Observed from Redis itself: a pattern subscription sees every PUBLISH on the timeline channels
but does not count as a listener of any one channel (``PUBSUB NUMSUB``), which is what a
worker asks before it builds a batch's messages.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from herald import keys, live
from herald.worker.delivery import Taken, publish_states


def taken(tenant_id: str, n: int, *, subject: str | None = "ticket:1") -> Taken:
    return Taken(
        id=f"dlv_{tenant_id}_{n}", tenant_id=tenant_id, event_id=f"evt_{n}", endpoint_id="ep_1", channel="webhook",
        lane="bulk", subject=subject, attempts=0, first_attempt_at=None, deliver_by=None, address=None, content=None,
        category=None,
    )  # fmt: skip


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    made = redis.Redis.from_url(redis_url)
    yield made
    made.close()


def published(watcher: redis.client.PubSub, wait_s: float = 0.5) -> list[tuple[str, list[dict[str, str]]]]:
    """Every timeline message the pattern subscription saw within ``wait_s``."""
    seen = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        message = watcher.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            seen.append((message["channel"].decode(), json.loads(message["data"])))
    return seen


def publish(client: redis.Redis, prefix: str, changes: list[tuple[Taken, str]]) -> None:
    """As a worker does: ask which tenants a stream follows (``PUBSUB NUMSUB``, at take), then
    queue the batch's state changes for those on the pipeline that records it."""
    channels = {keys.timeline(prefix, d.tenant_id): d.tenant_id for d, _ in changes}
    listening = {channels[c] for c in live.subscribed(client.pubsub_numsub(*channels))}
    pipe = client.pipeline(transaction=False)
    publish_states(pipe, prefix=prefix, changes=changes, listening=listening)
    pipe.execute()


def test_a_batch_is_published_only_to_tenants_a_stream_listens_to(client: redis.Redis) -> None:
    # Pub/sub channels are not per database: a prefix of its own keeps parallel runs apart.
    prefix = f"herald-live-{uuid.uuid4().hex}"
    watcher = client.pubsub()
    watcher.psubscribe(keys.timeline(prefix, "*"))
    listener = client.pubsub()
    try:
        assert watcher.get_message(timeout=1.0) is not None  # psubscribe confirmed
        changes = [(taken("t_a", 1), "delivered"), (taken("t_b", 2), "dead"), (taken("t_a", 3), "retrying")]

        publish(client, prefix, changes)
        assert published(watcher) == []  # nobody listens to either tenant: nothing built or sent

        listener.subscribe(keys.timeline(prefix, "t_a"))
        assert listener.get_message(timeout=1.0) is not None  # subscribe confirmed
        publish(client, prefix, [*changes, (taken("t_a", 4, subject=None), "delivered")])
        [(channel, items)] = published(watcher)
        assert channel == keys.timeline(prefix, "t_a")
        assert items == [
            {"kind": "delivery", "subject": "ticket:1", "delivery_id": "dlv_t_a_1", "event_id": "evt_1",
             "channel": "webhook", "state": "delivered"},
            {"kind": "delivery", "subject": "ticket:1", "delivery_id": "dlv_t_a_3", "event_id": "evt_3",
             "channel": "webhook", "state": "retrying"},
        ]  # fmt: skip
        assert json.loads(listener.get_message(timeout=1.0)["data"]) == items  # type: ignore[index]

        # Queued messages go out only when the recording pipeline runs.
        pipe = client.pipeline(transaction=False)
        publish_states(pipe, prefix=prefix, changes=changes, listening={"t_b"})
        assert published(watcher, wait_s=0.2) == []
        pipe.execute()
        [(channel, items)] = published(watcher)
        assert channel == keys.timeline(prefix, "t_b") and [i["delivery_id"] for i in items] == ["dlv_t_b_2"]
    finally:
        watcher.close()
        listener.close()
