"""Engine and session factories. SQLite gets WAL and a busy timeout so the API, dispatcher and
workers can share one file; PostgreSQL gets a pool.

On SQLite every transaction that may write begins ``IMMEDIATE`` (it queues for the one write
lock up front instead of failing to upgrade a read lock). Work that only reads uses
``reader(engine)``: it begins deferred and, in WAL mode, never waits for a writer nor makes one
wait, which keeps status reads, metrics scrapes and the dispatcher's idle checks off the lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for ``url`` (``sqlite:///…`` or ``postgresql://…``), psycopg 3 for PostgreSQL."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

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
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

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
