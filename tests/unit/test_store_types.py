"""UTCDateTime on SQLite: the one-step text conversion writes exactly what SQLAlchemy's own two
steps wrote, so rows written before and after it compare equal (leases are matched with ``=``)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import DateTime
from sqlalchemy.dialects import sqlite

from herald.store.models import UTCDateTime, sqlite_text

DIALECT = sqlite.dialect()
_sqlalchemy_text = DateTime(timezone=True).dialect_impl(DIALECT).bind_processor(DIALECT)
_sqlalchemy_datetime = DateTime(timezone=True).dialect_impl(DIALECT).result_processor(DIALECT, None)

aware = st.datetimes(timezones=st.timezones()) | st.datetimes(timezones=st.just(UTC))


@given(aware)
def test_sqlite_text_is_what_sqlalchemy_wrote(value: datetime) -> None:
    utc = UTCDateTime().process_bind_param(value, DIALECT)
    assert sqlite_text(value) == _sqlalchemy_text(utc)


@given(aware)
def test_sqlite_text_reads_back_as_the_same_instant(value: datetime) -> None:
    text = sqlite_text(value)
    assert text is not None
    # Compared in UTC: Python never calls two ambiguous wall times of different zones equal.
    assert UTCDateTime().process_result_value(_sqlalchemy_datetime(text), DIALECT) == value.astimezone(UTC)


@given(st.lists(aware, min_size=2, max_size=10))
def test_sqlite_text_sorts_as_the_instants_do(values: list[datetime]) -> None:
    # The dispatcher compares due_at and lease_until as text in SQL.
    with sqlite3.connect(":memory:") as db:
        db.execute("CREATE TABLE t (at TEXT)")
        db.executemany("INSERT INTO t VALUES (?)", [(sqlite_text(v),) for v in values])
        ordered = [row[0] for row in db.execute("SELECT at FROM t ORDER BY at")]
    assert ordered == [sqlite_text(v) for v in sorted(values, key=lambda v: v.astimezone(UTC))]


def test_the_type_uses_it_on_sqlite_only() -> None:
    assert UTCDateTime().dialect_impl(DIALECT).bind_processor(DIALECT) is sqlite_text
    from sqlalchemy.dialects import postgresql

    pg = postgresql.psycopg.dialect()
    assert UTCDateTime().dialect_impl(pg).bind_processor(pg) is not sqlite_text


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_text(datetime(2026, 12, 2, 12, 0))


def test_none_stays_none_and_offsets_are_converted() -> None:
    assert sqlite_text(None) is None
    plus_five = datetime(2026, 12, 2, 17, 0, tzinfo=timezone(timedelta(hours=5)))
    assert sqlite_text(plus_five) == "2026-12-02 12:00:00.000000"
