"""The dispatch loop. Woken at once by the API after a commit (a Redis list), and on a short
tick for rows that became due by time (retries, scheduled sends).

A pass over a lane first asks, in a read-only transaction, whether anything is due: an idle lane
costs one index probe and never queues for SQLite's write lock. Only then is the lane's in-flight
count read (through an index of the leased rows alone, so it costs at most ``max_in_flight``
entries): fresh before every claim, because other writers claim too (other dispatchers on
PostgreSQL, the drop ingester), and a count remembered from earlier would let the lane overshoot
its cap by what they claimed since.

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
from herald.dispatch.handover import Room, hand_over, room
from herald.logs import number
from herald.store import queries
from herald.store.db import background, make_sessionmaker, reader, transaction
from herald.store.models import utcnow

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
        self.bulk_room = Room(reads=self.reads, config=settings.dispatch)

    def run(self) -> None:
        """Dispatch until ``stop()``; survives database and broker outages by retrying."""
        logger.info("dispatcher started for lanes %s", ",".join(self.lanes))
        urgent = tuple(lane for lane in self.lanes if lane != BULK)
        bulk = None
        if BULK in self.lanes:
            bulk = threading.Thread(target=self._loop, args=((BULK,), self._bulk_wake.wait), name="dispatch-bulk")
            bulk.start()
        try:
            self._loop(urgent, self._wait, reconcile=True)
        finally:
            self._bulk_wake.set()
            if bulk is not None:
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
                logger.warning("reconciler returned %s deliveries whose lease ran out", number(returned))
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
        # A large drop wakes the bulk loop after every chunk it queues; the bulk lane's count
        # remembers a full lane for a tick. Urgent lanes are counted at every pass.
        free = self.bulk_room.at_least(lane, 1) if lane == BULK else room(reads=self.reads, config=cfg, lane=lane)
        limit = min(cfg.max_claim, free)
        if limit <= 0:
            return False
        with transaction(self.bulk_sessions if lane == BULK else self.sessions) as session:
            ids = queries.claim_due(session=session, lane=lane, limit=limit, lease_s=cfg.lease_s, now=now)
        if not ids:
            return False
        if lane != BULK:
            self._flag_urgent()
        # The claim's lease travels with its messages: a worker sends only rows that still hold it.
        lease_until = queries.lease_expiry(now, cfg.lease_s)
        if not hand_over(
            celery=self.celery, sessions=self.sessions, config=cfg, lane=lane, ids=ids, lease_until=lease_until
        ):
            self.stopping.wait(1.0)  # the broker refused: the ids are due again; try again shortly
            return False
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
