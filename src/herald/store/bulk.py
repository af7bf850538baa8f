"""Writing many rows fast: prepared outside a transaction, run inside the caller's.

Inserts are COPY on PostgreSQL and one ``executemany`` of ready tuples on SQLite; updates by key
are one ``executemany`` of ready tuples on both (psycopg pipelines it into one round trip).

A drop writes two rows per line. SQLAlchemy's ``insert(...)`` with a list of dicts spends more
time building parameters than the database spends storing them, and psycopg runs an executemany
as one statement per row; measured on the 2-core machine, 50,000 lines took 4.7 s on SQLite and
11 s on PostgreSQL that way. Values here still go through each column's own bind processor
(aware datetimes, JSON) on SQLite, and are written as the same text for COPY on PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, Connection, Dialect, Table

from herald.store.models import Base


@dataclass(frozen=True)
class Write:
    """A bulk write made ready outside any transaction: on SQLite everyone else waits while a
    writer holds the lock, so the Python work (parameters, JSON, COPY text) is done before."""

    statement: str
    params: list[tuple[Any, ...]] | str  # executemany parameters, or COPY text

    def run(self, connection: Connection) -> None:
        if isinstance(self.params, str):
            cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor, cursor.copy(self.statement) as copy:
                copy.write(self.params)
            return
        connection.exec_driver_sql(self.statement, self.params)


def prepare_insert(
    dialect: Dialect, model: type[Base], columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Write | None:
    """The insert of ``rows`` (values in the order of ``columns``) into ``model``'s table."""
    if not rows:
        return None
    table = cast(Table, model.__table__)
    names = ", ".join(columns)
    if dialect.name == "postgresql":
        return Write(f"COPY {table.name} ({names}) FROM STDIN", _copy_text(table, columns, rows))
    marks = ", ".join("?" * len(columns))
    return Write(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", _bound(dialect, table, columns, rows))


def prepare_update(
    dialect: Dialect,
    model: type[Base],
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    where: Sequence[str],
    where_sql: str = "",
) -> Write | None:
    """``UPDATE`` one row per item of ``rows``: values of ``columns``, then of the ``where`` columns
    that pick the row (compared with ``=``); ``where_sql`` adds a fixed condition.

    A value ``None`` in a ``where`` column matches nothing (SQL's ``= NULL``), so callers only key on
    columns that are set.
    """
    if not rows:
        return None
    table = cast(Table, model.__table__)
    mark = "%s" if dialect.name == "postgresql" else "?"
    assignments = ", ".join(f"{name} = {mark}" for name in columns)
    condition = " AND ".join([*(f"{name} = {mark}" for name in where), *([where_sql] if where_sql else [])])
    statement = f"UPDATE {table.name} SET {assignments} WHERE {condition}"
    return Write(statement, _bound(dialect, table, [*columns, *where], rows))


def run_writes(connection: Connection, writes: Sequence[Write | None]) -> None:
    for write in writes:
        if write is not None:
            write.run(connection)


def _bound(
    dialect: Dialect, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> list[tuple[Any, ...]]:
    """Rows with each value through its column's bind processor (aware datetime -> SQLite text, dict -> JSON)."""
    processors: list[Callable[[Any], Any] | None] = [
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    ]
    convert = [(i, p) for i, p in enumerate(processors) if p is not None]
    last: dict[int, tuple[Any, Any]] = {}
    ready: list[tuple[Any, ...]] = []
    for row in rows:
        values = list(row)
        for i, process in convert:
            value = values[i]
            if value is None:
                continue
            seen = last.get(i)
            if seen is not None and seen[0] is value:  # one timestamp shared by a whole chunk
                values[i] = seen[1]
            else:
                values[i] = process(value)
                last[i] = (value, values[i])
        ready.append(tuple(values))
    return ready


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def _escaped(value: str) -> str:
    # translate() with a mapping is slow; most values (ids, states) need no escaping at all.
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


def _copy_text(table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` in COPY's text format: tab-separated, ``\\N`` for NULL, backslash escapes.

    Building the text ourselves is about 3x cheaper than psycopg's ``write_row`` per row.
    """
    is_json = [isinstance(table.c[name].type, JSON) for name in columns]
    last: list[tuple[Any, str] | None] = [None] * len(columns)
    lines: list[str] = []
    for row in rows:
        fields: list[str] = []
        for i, value in enumerate(row):
            if value is None:
                fields.append("\\N")
            elif is_json[i]:
                fields.append(_escaped(json.dumps(value)))
            elif isinstance(value, str):
                fields.append(_escaped(value))
            elif isinstance(value, bool):
                fields.append("t" if value else "f")
            elif isinstance(value, int | float):
                fields.append(str(value))
            elif isinstance(value, datetime):
                seen = last[i]
                if seen is None or seen[0] is not value:  # one timestamp shared by a whole chunk
                    if value.tzinfo is None:
                        raise ValueError(f"{columns[i]}: naive datetime stored: {value!r}")
                    seen = last[i] = (value, value.astimezone(UTC).isoformat())
                fields.append(seen[1])
            else:
                raise TypeError(f"{columns[i]}: cannot COPY a {type(value).__name__}")
        lines.append("\t".join(fields))
    lines.append("")
    return "\n".join(lines)
