"""SQLite writers queue on file locks beside the database (``store.db``), readers do not.

The locks are probed from outside with a non-blocking ``flock``, as another Herald process would
meet them; a real process is killed with -9 while holding one.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, make_url, text

from herald.store import db as store_db
from herald.store.db import background, make_engine, reader
from tests.support import sqlite_database, wait_until


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    url = sqlite_database(tmp_path)
    yield url, tmp_path / "herald.db"


def held(path: Path) -> bool:
    """Whether some other open file holds ``path``'s lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def locks(db: Path) -> tuple[bool, bool]:
    """(background lock held, write lock held)."""
    return held(Path(f"{db}-background.lock")), held(Path(f"{db}-write.lock"))


@contextmanager
def engine_for(url: str, *, background: bool = False) -> Iterator[Engine]:
    engine = make_engine(url, background=background)
    try:
        yield engine
    finally:
        engine.dispose()


def turn_taken(db: Path) -> bool:
    """Whether a thread of this process holds its turn at the write lock (``store_db``)."""
    return store_db._thread_lock(f"{db}-write.lock").locked()


def test_a_write_transaction_holds_the_write_lock_until_it_ends(database: tuple[str, Path]) -> None:
    url, db = database
    with engine_for(url) as engine:
        assert locks(db) == (False, False)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'a', '2026-01-01')"))
            assert locks(db) == (False, True)
            assert turn_taken(db)  # the process's other threads wait for it, not for the file lock
        assert locks(db) == (False, False)  # committed
        assert not turn_taken(db)
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_2', 'b', '2026-01-01')"))
            assert locks(db) == (False, True)
            assert turn_taken(db)
            raise RuntimeError("rolled back")
        assert locks(db) == (False, False)  # rolled back
        assert not turn_taken(db)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["ten_1"]


def test_readers_take_no_lock(database: tuple[str, Path]) -> None:
    url, db = database
    with engine_for(url) as engine, reader(engine).begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 0
        assert locks(db) == (False, False)


def test_a_background_writer_holds_the_background_lock_too(database: tuple[str, Path]) -> None:
    url, db = database
    with engine_for(url, background=True) as engine:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'a', '2026-01-01')"))
            assert locks(db) == (True, True)
        assert locks(db) == (False, False)
    with engine_for(url) as engine:  # one transaction of an urgent process marked as bulk work
        with background(engine).begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_2', 'b', '2026-01-01')"))
            assert locks(db) == (True, True)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_3', 'c', '2026-01-01')"))
            assert locks(db) == (False, True)
        assert locks(db) == (False, False)


HOLDER = """
import sys, time
from sqlalchemy import text
from herald.store.db import make_engine
engine = make_engine(sys.argv[1], background=True)
conn = engine.connect()
conn.begin()
conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_9', 'z', '2026-01-01')"))
print("holding", flush=True)
time.sleep(600)
"""


def test_a_writer_killed_with_9_leaves_no_lock_behind(database: tuple[str, Path]) -> None:
    url, db = database
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert locks(db) == (True, True)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        wait_until(lambda: locks(db) == (False, False), timeout_s=5, what="the dead writer's locks to go")
        with engine_for(url) as engine, engine.begin() as conn:  # the next writer goes straight on
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'a', '2026-01-01')"))
            assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["ten_1"]  # ten_9 died with it
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_writer_stuck_holding_the_lock_fails_the_others_after_the_timeout(
    database: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, db = database
    monkeypatch.setattr(store_db, "LOCK_TIMEOUT_S", 0.3)
    with engine_for(url) as stuck, engine_for(url) as other, stuck.connect() as held_conn:
        held_conn.begin()
        held_conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'a', '2026-01-01')"))
        with pytest.raises(sqlite3.OperationalError, match="database is locked"), other.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_2', 'b', '2026-01-01')"))
        assert locks(db) == (False, True)  # the loser holds nothing; the stuck writer still does
        held_conn.rollback()
    assert locks(db) == (False, False)


def test_threads_of_one_process_take_turns_and_every_write_lands(database: tuple[str, Path]) -> None:
    """The API's request threads share one engine: each waits its turn on the process's thread
    lock, then on the file lock, and none times out while the others write."""
    url, _ = database
    with engine_for(url) as engine:

        def writer(n: int) -> None:
            for i in range(25):
                with engine.begin() as conn:
                    conn.execute(
                        text("INSERT INTO tenants (id, name, created_at) VALUES (:id, :id, '2026-01-01')"),
                        {"id": f"ten_{n}_{i}"},
                    )

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 200


def test_a_thread_waiting_for_its_turn_fails_after_the_timeout_and_holds_nothing(
    database: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, db = database
    monkeypatch.setattr(store_db, "LOCK_TIMEOUT_S", 0.3)
    failures: list[BaseException] = []
    with engine_for(url) as engine, engine.connect() as held_conn:
        held_conn.begin()
        held_conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'a', '2026-01-01')"))

        def other() -> None:
            try:
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_2', 'b', '2026-01-01')"))
            except sqlite3.OperationalError as exc:
                failures.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        assert [str(e) for e in failures] == ["database is locked"]
        held_conn.commit()
    assert locks(db) == (False, False)
    with engine_for(url) as engine, engine.begin() as conn:  # the loser left no turn taken behind
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_3', 'c', '2026-01-01')"))
        assert conn.execute(text("SELECT id FROM tenants ORDER BY id")).scalars().all() == ["ten_1", "ten_3"]


def _write_after_fork(url: str, done: Any) -> None:
    store_db.LOCK_TIMEOUT_S = 5.0
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_child', 'c', '2026-01-01')"))
        done.set()
    finally:
        engine.dispose()


def test_a_process_forked_while_a_thread_waits_its_turn_does_not_inherit_that_turn(
    database: tuple[str, Path],
) -> None:
    """Celery forks its pool processes: a turn on the thread lock taken in the parent (by some
    request thread about to write) must not stay taken in the child, where no thread would end it."""
    url, _ = database
    context = multiprocessing.get_context("fork")
    done = context.Event()
    turn = store_db._thread_lock(f"{make_url(url).database}-write.lock")
    assert turn.acquire(timeout=5)
    try:
        child = context.Process(target=_write_after_fork, args=(url, done))
        child.start()
        child.join(15)
    finally:
        turn.release()
    assert child.exitcode == 0 and done.is_set()
    with engine_for(url) as engine, engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["ten_child"]
