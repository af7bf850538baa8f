"""``herald watch``: a thin loop around ``Ingester``.

Woken by file events (``watchfiles``: inotify, or polling where there is none) and, because
kernels drop events when their queue overflows, also rescans the whole folder every
``rescan_s``. Each pass ingests every waiting file, oldest first, then refreshes the reports of
draining drops. A pass that fails (database down) is logged and tried again on the next one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import watchfiles
from sqlalchemy.orm import Session, sessionmaker

from herald import keys
from herald.config import Settings
from herald.ingest.drops import DONE, FAILED, Ingester, Outcome, drops_dir, is_ignored, pending_files

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def urgent_check(client: redis.Redis, prefix: str) -> Callable[[], bool]:
    """Whether the dispatcher handed out urgent-lane work lately (``keys.urgent``); an unreachable
    Redis reads as no: ingestion goes on at full speed."""
    key = keys.urgent(prefix)

    def urgent() -> bool:
        try:
            return bool(client.exists(key))
        except redis.RedisError:
            return False

    return urgent


class Watcher:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        client: redis.Redis,
        directory: Path | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.directory = (directory or drops_dir(settings)).resolve()
        self.redis = client
        self.stopping = threading.Event()
        self.wake_key = keys.wake(settings.redis.key_prefix)
        self.ingester = Ingester(
            settings=settings,
            sessions=sessions,
            directory=self.directory,
            wake=self._wake,
            stop=self.stopping,
            urgent=urgent_check(client, settings.redis.key_prefix),
            celery=celery,
        )

    def run(self, *, once: bool = False) -> None:
        """Ingest what is waiting, then (unless ``once``) watch until ``stop()``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        logger.info("watching %s (rescan every %.1fs)", self.directory, self.settings.ingest.rescan_s)
        self.step()
        if once:
            return
        for _changes in watchfiles.watch(
            self.directory,
            watch_filter=self._relevant,
            debounce=300,
            rust_timeout=int(self.settings.ingest.rescan_s * 1000),
            yield_on_timeout=True,
            stop_event=self.stopping,
            raise_interrupt=False,
        ):
            if self.stopping.is_set():
                break
            self.step()

    def stop(self) -> None:
        self.stopping.set()

    def step(self) -> list[Outcome]:
        """One pass: every waiting file, then the reports."""
        outcomes: list[Outcome] = []
        try:
            for path in pending_files(self.directory):
                if self.stopping.is_set():
                    break
                outcomes.append(self.ingester.process(path))
            self.ingester.refresh_reports()
        except Exception:
            logger.exception("drop folder pass failed; trying again on the next one")
        return outcomes

    def _relevant(self, _change: watchfiles.Change, path: str) -> bool:
        """Only files that could be drops wake the loop (not our own moves to done/ and failed/)."""
        try:
            parts = Path(path).relative_to(self.directory).parts
        except ValueError:
            return False
        return bool(parts) and parts[0] not in (DONE, FAILED) and not any(is_ignored(p) for p in parts)

    def _wake(self) -> None:
        # The rows are committed: if Redis is down the dispatcher's tick still finds them.
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(self.wake_key, 1)
            pipe.ltrim(self.wake_key, -16, -1)
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")
