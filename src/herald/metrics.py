"""Prometheus metrics that hold across processes.

Counts by state and the due backlog are read from the database at scrape time (the system of
record, so every API process reports the same numbers). Attempt latencies are observed by
workers into Redis hashes of histogram buckets and exposed here as one histogram.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.store import queries
from herald.store.models import utcnow

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_FIELDS = tuple(f"le:{bound}" for bound in LATENCY_BUCKETS_S)


def record_latencies(client: redis.Redis, *, prefix: str, observations: Iterable[tuple[str, str, float]]) -> None:
    """Add (lane, channel, seconds) observations to the shared histogram, in one round trip
    (counted here first, so a batch of a thousand costs a few commands, not thousands)."""
    pipe = client.pipeline(transaction=False)
    queue_latencies(pipe, prefix=prefix, observations=observations)
    pipe.execute()


def queue_latencies(
    pipe: redis.client.Pipeline, *, prefix: str, observations: Iterable[tuple[str, str, float]]
) -> None:
    """``record_latencies``'s commands, queued on ``pipe`` (a worker sends them with its others)."""
    # Per (lane, channel): how many fell first under each bound (the last slot: above them all).
    counts: dict[tuple[str, str], list[int]] = {}
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for lane, channel, seconds in observations:
        slots = counts.get((lane, channel))
        if slots is None:
            slots = counts[(lane, channel)] = [0] * (len(LATENCY_BUCKETS_S) + 1)
        slots[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        sums[(lane, channel)] += seconds
    for (lane, channel), slots in counts.items():
        key = keys.latency(prefix, lane, channel)
        below = 0
        for field, n in zip(_BUCKET_FIELDS, slots, strict=False):  # buckets are cumulative
            below += n
            if below:
                pipe.hincrby(key, field, below)
        pipe.hincrby(key, "count", sum(slots))
        pipe.hincrbyfloat(key, "sum", sums[(lane, channel)])


class HeraldCollector(Collector):
    """Collects Herald's gauges and the latency histogram on every scrape."""

    def __init__(self, *, sessions: sessionmaker[Session], client: redis.Redis, prefix: str, lanes: Sequence[str]):
        self.sessions = sessions
        self.client = client
        self.prefix = prefix
        self.lanes = lanes

    def collect(self) -> Iterator[Any]:
        states = GaugeMetricFamily(
            "herald_deliveries", "Deliveries by state, lane and channel", labels=["state", "lane", "channel"]
        )
        backlog = GaugeMetricFamily("herald_due_backlog", "Deliveries due and not yet dispatched", labels=["lane"])
        oldest = GaugeMetricFamily(
            "herald_due_oldest_age_seconds", "Age of the oldest due, undispatched delivery", labels=["lane"]
        )
        now = utcnow()
        with self.sessions() as session:
            for state, lane, channel, count in queries.state_counts(session=session):
                states.add_metric([state, lane, channel], count)
            due = queries.backlog(session=session, now=now)
        for lane in self.lanes:
            count, first = due.get(lane, (0, None))
            backlog.add_metric([lane], count)
            oldest.add_metric([lane], (now - first).total_seconds() if first else 0.0)
        yield states
        yield backlog
        yield oldest
        yield self._latency()

    def _latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "herald_attempt_latency_seconds", "Delivery attempt latency", labels=["lane", "channel"]
        )
        try:
            names = list(self.client.scan_iter(match=keys.latency_pattern(self.prefix), count=100))
            for name in names:
                key = name.decode() if isinstance(name, bytes) else name
                lane, channel = key.rsplit(":", 2)[-2:]
                raw = {
                    (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in self.client.hgetall(key).items()
                }
                buckets = [(str(b), raw.get(f"le:{b}", 0.0)) for b in LATENCY_BUCKETS_S]
                buckets.append(("+Inf", raw.get("count", 0.0)))
                family.add_metric([lane, channel], buckets, raw.get("sum", 0.0))
        except redis.RedisError:
            logger.warning("metrics: Redis unreachable, latency histogram omitted")
        return family
