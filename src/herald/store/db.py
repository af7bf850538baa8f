"""Engine and session factories. SQLite gets WAL and a busy timeout so the API, dispatcher and
workers can share one file; PostgreSQL gets a pool.

On SQLite every transaction that may write begins ``IMMEDIATE`` (it queues for the one write
lock up front instead of failing to upgrade a read lock). Work that only reads uses
``reader(engine)``: it begins deferred and, in WAL mode, never waits for a writer nor makes one
wait, which keeps status reads, metrics scrapes and the dispatcher's idle checks off the lock.

Writers also queue on a file lock beside the database (``flock``) before ``BEGIN IMMEDIATE``.
SQLite's own busy handler sleeps up to 100 ms between tries, so a writer often sleeps on a lock
that was free long ago; the file lock is tried every 4 ms at most. Background work (engines made
with ``background=True``: bulk workers, the drop ingester; or ``background(engine)`` for one
transaction) first passes a second, "background" lock, so at most one bulk writer at a time
competes with the API, the dispatcher and the urgent lanes: an OTP waits for one bulk write.

Threads of one process (the API's request threads) queue for each file lock on a thread lock
first, which hands over as soon as it is released: only one of them polls the file lock, and
the others neither sleep through a free lock nor wake every few milliseconds to try it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

# How long a SQLite writer waits for the write lock before "database is locked".
LOCK_TIMEOUT_S = 30.0


# Per lock file, the thread lock its writers in this process queue on (``_LockedConnection``).
_thread_locks: dict[str, threading.Lock] = {}
# A child process starts with none held: a lock copied held from its parent would never open.
os.register_at_fork(after_in_child=_thread_locks.clear)


def _thread_lock(path: str) -> threading.Lock:
    lock = _thread_locks.get(path)
    return lock if lock is not None else _thread_locks.setdefault(path, threading.Lock())


class _LockedConnection(sqlite3.Connection):
    """A SQLite connection whose write transactions hold the database's file lock(s).

    ``database`` and ``background`` are set on a subclass per engine. Locks are taken in
    ``acquire`` (before ``BEGIN IMMEDIATE``) and released once the transaction ends, whichever
    way; a dead process's locks go with it.
    """

    database: str = ""
    background: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock_paths = (f"{self.database}-background.lock", f"{self.database}-write.lock")
        self._lock_fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in self._lock_paths]
        self._held: list[tuple[int, threading.Lock]] = []

    def acquire(self, *, background: bool = False) -> None:
        """Take the write lock, after the background lock for background work.

        Each file lock is polled every few milliseconds rather than waited on, so that a writer
        stuck holding it fails the others after ``LOCK_TIMEOUT_S`` ("database is locked", as
        SQLite's own busy timeout would) instead of hanging them for ever. Before that, threads
        of this process wait their turn on its thread lock, within the same deadline.
        """
        first = 0 if background or self.background else 1
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        for fd, path in zip(self._lock_fds[first:], self._lock_paths[first:], strict=True):
            local = _thread_lock(path)
            if not local.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.release()
                raise sqlite3.OperationalError("database is locked")
            self._held.append((fd, local))
            pause_s = 0.0002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self.release()
                        raise sqlite3.OperationalError("database is locked") from None
                    time.sleep(pause_s)
                    pause_s = min(pause_s * 2, 0.004)

    def release(self) -> None:
        while self._held:
            fd, local = self._held.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)  # nothing happens if this fd's lock was not taken yet
            local.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.release()

    def close(self) -> None:
        self.release()
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []
        super().close()


def _connection_class(url: str, *, background: bool) -> type[_LockedConnection] | None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return type("LockedConnection", (_LockedConnection,), {"database": database, "background": background})


def make_engine(url: str, *, pool_size: int = 10, background: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///…`` or ``postgresql://…``), psycopg 3 for PostgreSQL.

    ``background``: this process does bulk work; on SQLite its writes give way to the others'.
    """
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        connect_args: dict[str, Any] = {"timeout": LOCK_TIMEOUT_S, "check_same_thread": False}
        factory = _connection_class(url, background=background)
        if factory is not None:
            connect_args["factory"] = factory
        engine = create_engine(url, connect_args=connect_args)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Autocommit off at the driver, BEGIN IMMEDIATE ourselves: writers queue on the
            # busy timeout instead of failing with "database is locked" on lock upgrade.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            if conn.get_execution_options().get(_READ_ONLY):
                conn.exec_driver_sql("BEGIN")
                return
            dbapi_conn = conn.connection.dbapi_connection
            if isinstance(dbapi_conn, _LockedConnection):
                dbapi_conn.acquire(background=bool(conn.get_execution_options().get(_BACKGROUND)))
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                if isinstance(dbapi_conn, _LockedConnection):
                    dbapi_conn.release()
                raise

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


_READ_ONLY = "herald_read_only"
_BACKGROUND = "herald_background"


def reader(engine: Engine) -> Engine:
    """``engine`` for work that never writes (same pool; on SQLite its transactions begin deferred)."""
    return engine.execution_options(**{_READ_ONLY: True})


def background(engine: Engine) -> Engine:
    """``engine`` for bulk writes of a process that also does urgent ones (the dispatcher's claims
    for the bulk lane): on SQLite they give way like a background engine's."""
    return engine.execution_options(**{_BACKGROUND: True})


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with factory() as session, session.begin():
        yield session
