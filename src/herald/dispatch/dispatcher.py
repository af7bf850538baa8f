"""The dispatch loop. Woken at once by the API after a commit (a Redis list), and on a short
tick for rows that became due by time (retries, scheduled sends).

A pass over a lane first asks, in a read-only transaction, whether anything is due: an idle lane
costs one index probe and never queues for SQLite's write lock. The in-flight cap is kept from
a count taken now and then plus what this dispatcher claimed since (an upper bound while
deliveries finish), so a busy lane is not counted on every pass either.

The ``bulk`` lane is dispatched by a thread of its own: its claims are large and, on SQLite, give
way to everything else (``store.db.background``), and an OTP must never wait for one to finish
before it is claimed. The urgent lanes' loop is the one the API wakes; it passes the wake on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import LANES, Settings
from herald.dispatch.batching import chunks
from herald.store import queries
from herald.store.db import background, make_sessionmaker, reader, transaction
from herald.store.models import utcnow
from herald.worker.celery_app import DELIVER_BATCH

logger = logging.getLogger(__name__)

BULK = "bulk"


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
        self.bulk_sessions = make_sessionmaker(background(sessions.kw["bind"]))  # bulk claims give way
        self.wake_key = keys.wake(settings.redis.key_prefix)
        self.urgent_key = keys.urgent(settings.redis.key_prefix)
        self.stopping = threading.Event()
        self._bulk_wake = threading.Event()
        self._last_reconcile = 0.0
        # lane -> (deliveries in flight when last counted, when, claimed by us since)
        self._in_flight: dict[str, tuple[int, float, int]] = {}

    def run(self) -> None:
        """Dispatch until ``stop()``; survives database and broker outages by retrying."""
        logger.info("dispatcher started for lanes %s", ",".join(self.lanes))
        urgent = tuple(lane for lane in self.lanes if lane != BULK)
        bulk = threading.Thread(target=self._loop, args=((BULK,), self._bulk_wake.wait), name="dispatch-bulk")
        if BULK in self.lanes:
            bulk.start()
        try:
            self._loop(urgent, self._wait, reconcile=True)
        finally:
            self._bulk_wake.set()
            if bulk.is_alive():
                bulk.join()

    def _loop(self, lanes: tuple[str, ...], wait: Callable[[float], object], *, reconcile: bool = False) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step(lanes, reconcile=reconcile)
            except Exception:
                logger.exception("dispatch step failed; retrying shortly")
                self.stopping.wait(1.0)
                continue
            if not busy:
                wait(self.settings.dispatch.tick_s)
                if lanes == (BULK,):
                    self._bulk_wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self._bulk_wake.set()

    def _wait(self, timeout_s: float) -> None:
        """Block until the API (or anyone) pushes a wake-up, or for ``timeout_s``."""
        try:
            if self.redis.blpop([self.wake_key], timeout=timeout_s):
                self.redis.delete(self.wake_key)
                self._bulk_wake.set()
        except redis.RedisError:
            self.stopping.wait(timeout_s)

    def step(self, lanes: tuple[str, ...] | None = None, *, reconcile: bool = True) -> bool:
        """One pass over ``lanes`` (all of this dispatcher's by default). Returns True if a lane
        had more due than one claim takes."""
        now = time.monotonic()
        if reconcile and now - self._last_reconcile >= self.settings.dispatch.reconcile_every_s:
            self._last_reconcile = now
            returned = self.reconcile()
            if returned:
                logger.warning("reconciler returned %d deliveries whose lease ran out", returned)
        busy = False
        for lane in self.lanes if lanes is None else lanes:
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
        with transaction(self.bulk_sessions if lane == BULK else self.sessions) as session:
            ids = queries.claim_due(session=session, lane=lane, limit=limit, lease_s=cfg.lease_s, now=now)
        count, counted_at, claimed = self._in_flight[lane]
        self._in_flight[lane] = (count, counted_at, claimed + len(ids))
        if not ids:
            return False
        if lane != BULK:
            self._flag_urgent()
        batches = chunks(ids, target_tasks=cfg.target_tasks, max_batch=cfg.max_batch)
        # The claim's lease travels with its messages: a worker sends only rows that still hold it.
        lease = {"lease": queries.lease_expiry(now, cfg.lease_s).isoformat()}
        published = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for batch in batches:
                    self.celery.send_task(DELIVER_BATCH, args=[batch], kwargs=lease, queue=lane, producer=producer)
                    published += 1
        except Exception:
            unsent = [i for batch in batches[published:] for i in batch]
            logger.exception("publishing to lane %s failed; %d deliveries back to due", lane, len(unsent))
            with transaction(self.sessions) as session:
                queries.release(session=session, ids=unsent, now=utcnow())
            raise
        logger.debug("lane %s: %d deliveries in %d tasks", lane, len(ids), len(batches))
        return len(ids) >= limit

    def _flag_urgent(self) -> None:
        """Tell bulk work (the drop ingester) that urgent lanes are busy, for ``yield_for_s``."""
        hold_ms = int(self.settings.ingest.yield_for_s * 1000)
        if hold_ms <= 0:
            return
        try:
            self.redis.set(self.urgent_key, 1, px=hold_ms)
        except redis.RedisError:
            logger.warning("could not flag urgent-lane work; bulk work goes on at full speed")

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
