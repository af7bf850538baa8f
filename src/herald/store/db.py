"""Engine and session factories. SQLite gets WAL and a busy timeout so the API, dispatcher and
workers can share one file; PostgreSQL gets a pool.

On SQLite every transaction that may write begins ``IMMEDIATE`` (it queues for the one write
lock up front instead of failing to upgrade a read lock). Work that only reads uses
``reader(engine)``: it begins deferred and, in WAL mode, never waits for a writer nor makes one
wait, which keeps status reads, metrics scrapes and the dispatcher's idle checks off the lock.

Writers also queue on a file lock beside the database (``flock``) before ``BEGIN IMMEDIATE``.
SQLite's own busy handler polls, sleeping up to 100 ms between tries, so a writer often sleeps
on a lock that was free long ago; a process blocked in ``flock`` is woken the moment the lock is
released. Engines made with ``background=True`` (bulk workers, the drop ingester) first pass a
second, "background" lock, so at most one of them at a time competes with the API, the
dispatcher and the urgent lanes for the write lock: an OTP waits for at most one bulk write.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


class _LockedConnection(sqlite3.Connection):
    """A SQLite connection whose write transactions hold the database's file lock(s).

    ``lock_paths`` is set on a subclass per engine: the write lock, preceded by the background
    lock for background engines. Locks are taken in ``acquire`` (before ``BEGIN IMMEDIATE``) and
    released once the transaction ends, whichever way; a dead process's locks go with it.
    """

    lock_paths: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock_fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in self.lock_paths]
        self._held = 0

    def acquire(self) -> None:
        for fd in self._lock_fds[self._held :]:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held += 1

    def release(self) -> None:
        while self._held:
            self._held -= 1
            fcntl.flock(self._lock_fds[self._held], fcntl.LOCK_UN)

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
    paths = (f"{database}-background.lock",) if background else ()
    return type("LockedConnection", (_LockedConnection,), {"lock_paths": (*paths, f"{database}-write.lock")})


def make_engine(url: str, *, pool_size: int = 10, background: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///…`` or ``postgresql://…``), psycopg 3 for PostgreSQL.

    ``background``: this process does bulk work; on SQLite its writes give way to the others'.
    """
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        connect_args: dict[str, Any] = {"timeout": 30, "check_same_thread": False}
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
                dbapi_conn.acquire()
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                if isinstance(dbapi_conn, _LockedConnection):
                    dbapi_conn.release()
                raise

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


_READ_ONLY = "herald_read_only"


def reader(engine: Engine) -> Engine:
    """``engine`` for work that never writes (same pool; on SQLite its transactions begin deferred)."""
    return engine.execution_options(**{_READ_ONLY: True})


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with factory() as session, session.begin():
        yield session
