"""Thin Celery tasks: decode ids, call the delivery logic. Names are explicit so that moving a
module never orphans queued messages."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery

from herald.config import Settings
from herald.scheduler import jobs
from herald.worker.celery_app import DELIVER_BATCH, PERIODIC
from herald.worker.delivery import runtime_for

logger = logging.getLogger(__name__)


def register(app: Celery, settings: Settings) -> None:
    # shared=False: the tasks belong to this app only (a second app in one process, as in tests,
    # would otherwise inherit them and Celery warns about the duplicate names).
    @app.task(name=DELIVER_BATCH, ignore_result=True, shared=False)
    def deliver_batch(ids: list[Any], lease: Any = None) -> None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            logger.error("deliver_batch: expected a list of delivery ids, dropping message")
            return
        try:
            lease_until = datetime.fromisoformat(lease) if isinstance(lease, str) else None
        except ValueError:
            lease_until = None
        if lease_until is None or lease_until.tzinfo is None:
            # A message without its claim's lease (from a dispatcher older than this worker, or
            # damaged): its rows stay claimed until the lease runs out, then the reconciler
            # hands them out again in a message this worker can use. Late, never lost.
            logger.warning("deliver_batch: message without a usable lease; its rows go back to due when it runs out")
            return
        runtime_for(settings, background=app.conf.get("herald_background", False)).deliver(ids, lease_until)

    @app.task(name=PERIODIC, ignore_result=True, shared=False)
    def periodic(name: str) -> None:
        runtime = runtime_for(settings)
        if jobs.run(settings, runtime.sessions, name):
            runtime.wake()
