"""The dispatch loop. Woken at once by the API after a commit (a Redis list), and on a short
tick for rows that became due by time (retries, scheduled sends).

A pass over a lane first asks, in a read-only transaction, whether anything is due: an idle lane
costs one index probe and never queues for SQLite's write lock. The in-flight cap is kept from
a count taken now and then plus what this dispatcher claimed since (an upper bound while
deliveries finish), so a busy lane is not counted on every pass either.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import LANES, Settings
from herald.dispatch.batching import chunks
from herald.store import queries
from herald.store.db import make_sessionmaker, reader, transaction
from herald.store.models import utcnow
from herald.worker.celery_app import DELIVER_BATCH

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        celery: Celery,
        client: redis.Redis,
        lanes: tuple[str, ...] = LANES,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self.redis = client
        self.lanes = lanes
        self.reads = make_sessionmaker(reader(sessions.kw["bind"]))
        self.wake_key = keys.wake(settings.redis.key_prefix)
        self.stopping = threading.Event()
        self._last_reconcile = 0.0
        # lane -> (deliveries in flight when last counted, when, claimed by us since)
        self._in_flight: dict[str, tuple[int, float, int]] = {}

    def run(self) -> None:
        """Dispatch until ``stop()``; survives database and broker outages by retrying."""
        logger.info("dispatcher started for lanes %s", ",".join(self.lanes))
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except Exception:
                logger.exception("dispatch step failed; retrying shortly")
                self.stopping.wait(1.0)
                continue
            if not busy:
                self._wait()

    def stop(self) -> None:
        self.stopping.set()

    def _wait(self) -> None:
        try:
            if self.redis.blpop([self.wake_key], timeout=self.settings.dispatch.tick_s):
                self.redis.delete(self.wake_key)
        except redis.RedisError:
            self.stopping.wait(self.settings.dispatch.tick_s)

    def step(self) -> bool:
        """One pass over every lane. Returns True if a lane had more due than one claim takes."""
        now = time.monotonic()
        if now - self._last_reconcile >= self.settings.dispatch.reconcile_every_s:
            self._last_reconcile = now
            returned = self.reconcile()
            if returned:
                logger.warning("reconciler returned %d deliveries whose lease ran out", returned)
        busy = False
        for lane in self.lanes:
            busy |= self.dispatch_lane(lane)
        return busy

    def reconcile(self) -> int:
        """Return deliveries whose lease ran out to due; how many (a read first: usually none)."""
        now = utcnow()
        with self.reads() as session:
            if not queries.any_lease_expired(session=session, now=now):
                return 0
        with transaction(self.sessions) as session:
            return queries.reconcile(session=session, now=now)

    def dispatch_lane(self, lane: str) -> bool:
        cfg = self.settings.dispatch
        now = utcnow()
        with self.reads() as session:
            if not queries.any_due(session=session, lane=lane, now=now):
                return False
        room = cfg.max_in_flight - self._in_flight_bound(lane)
        if room <= 0:
            return False
        limit = min(cfg.max_claim, room)
        with transaction(self.sessions) as session:
            ids = queries.claim_due(session=session, lane=lane, limit=limit, lease_s=cfg.lease_s, now=now)
        count, counted_at, claimed = self._in_flight[lane]
        self._in_flight[lane] = (count, counted_at, claimed + len(ids))
        if not ids:
            return False
        batches = chunks(ids, target_tasks=cfg.target_tasks, max_batch=cfg.max_batch)
        published = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for batch in batches:
                    self.celery.send_task(DELIVER_BATCH, args=[batch], queue=lane, producer=producer)
                    published += 1
        except Exception:
            unsent = [i for batch in batches[published:] for i in batch]
            logger.exception("publishing to lane %s failed; %d deliveries back to due", lane, len(unsent))
            with transaction(self.sessions) as session:
                queries.release(session=session, ids=unsent, now=utcnow())
            raise
        logger.debug("lane %s: %d deliveries in %d tasks", lane, len(ids), len(batches))
        return len(ids) >= limit

    def _in_flight_bound(self, lane: str) -> int:
        """At least as many deliveries as ``lane`` has in flight; counted again (a read) when the
        bound comes near the cap or is older than the reconcile interval."""
        cfg = self.settings.dispatch
        count, counted_at, claimed = self._in_flight.get(lane, (0, -1e9, 0))
        bound = count + claimed
        stale = time.monotonic() - counted_at >= cfg.reconcile_every_s
        if stale or bound + cfg.max_claim > cfg.max_in_flight:
            with self.reads() as session:
                count = queries.in_flight(session=session, lane=lane)
            self._in_flight[lane] = (count, time.monotonic(), 0)
            return count
        return bound
