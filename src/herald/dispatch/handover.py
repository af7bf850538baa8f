"""Handing claimed deliveries to a lane's workers: the claim's ids cut into Celery messages that
carry its lease (a worker sends only rows that still hold it).

Two writers claim: the dispatcher (due rows, ``queries.claim_due``) and the drop ingester, which
writes a chunk's deliveries already claimed while the lane has room, saving the dispatcher a
second write per delivery. Both hand over here; if the broker refuses a message, the ids not
handed over go back to due at once (``queries.release``) and the dispatcher tries them again.
Rows whose process dies between its commit and its publish keep their lease until it runs out;
the reconciler then returns them to due: late, never lost.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from herald.config import DispatchSettings
from herald.dispatch.batching import chunks
from herald.logs import number
from herald.store import queries
from herald.store.db import transaction
from herald.store.models import utcnow

if TYPE_CHECKING:  # the API imports this module (through ingest.drops) and never needs Celery loaded
    from celery import Celery

logger = logging.getLogger(__name__)


def hand_over(
    *,
    celery: Celery,
    sessions: sessionmaker[Session],
    config: DispatchSettings,
    lane: str,
    ids: list[str],
    lease_until: datetime,
) -> bool:
    """Publish the claimed ``ids`` of ``lane`` (all under the lease ``lease_until``) as batches.

    Returns False if publishing failed: the ids not yet published are then back to due
    (committed through ``sessions``), and the error is logged.
    """
    from herald.worker.celery_app import DELIVER_BATCH

    batches = chunks(ids, target_tasks=config.target_tasks, max_batch=config.max_batch)
    lease = {"lease": lease_until.isoformat()}
    published = 0
    try:
        with celery.producer_or_acquire() as producer:
            for batch in batches:
                celery.send_task(DELIVER_BATCH, args=[batch], kwargs=lease, queue=lane, producer=producer)
                published += 1
    except Exception:
        unsent = [i for batch in batches[published:] for i in batch]
        logger.exception("publishing to lane %s failed; %s deliveries back to due", lane, number(len(unsent)))
        with transaction(sessions) as session:
            queries.release(session=session, ids=unsent, now=utcnow())
        return False
    logger.debug("lane %s: %s deliveries in %s tasks", lane, number(len(ids)), number(len(batches)))
    return True


def room(*, reads: sessionmaker[Session], config: DispatchSettings, lane: str) -> int:
    """How many more deliveries of ``lane`` may be handed to the broker now: ``max_in_flight`` less
    those in flight, counted afresh (``reads`` is a read-only sessionmaker; the count walks the
    in-flight index, which holds at most about ``max_in_flight`` rows of the lane)."""
    with reads() as session:
        return config.max_in_flight - queries.in_flight(session=session, lane=lane)


class Room:
    """``room`` for a writer that asks again and again while a lane is full (the dispatcher's
    bulk loop at every wake-up, the drop ingester at every chunk).

    Room comes back as workers finish, not at those moments, and each count walks up to
    ``max_in_flight`` leased rows: while a large drop waits for room, counting for every chunk
    cost the ingester 9% of its CPU. So a lane found with less room than a caller needed is not
    counted again for ``tick_s`` for a need at least as large; the dispatcher hands out what
    waits meanwhile, as it would anyway.
    """

    def __init__(self, *, reads: sessionmaker[Session], config: DispatchSettings) -> None:
        self.reads = reads
        self.config = config
        self._short: dict[str, tuple[float, int]] = {}  # lane -> (when, room found) of a short count

    def at_least(self, lane: str, count: int) -> int:
        """The room of ``lane`` if it holds ``count`` more deliveries, else 0."""
        short = self._short.get(lane)
        if short is not None and count > short[1] and time.monotonic() - short[0] < self.config.tick_s:
            return 0
        free = room(reads=self.reads, config=self.config, lane=lane)
        if free < count:
            self._short[lane] = (time.monotonic(), free)
            return 0
        self._short.pop(lane, None)
        return free
