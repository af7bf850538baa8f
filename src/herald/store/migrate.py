"""Apply Alembic migrations (``herald migrate``; ``herald up`` runs it too)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from herald.store.db import reader

_SCRIPTS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database at ``engine`` to ``revision``. Safe to run concurrently on PostgreSQL
    (an advisory lock serialises migrators) and repeatedly anywhere."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7206410)")
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def unmigrated(engine: Engine) -> str | None:
    """Why the database at ``engine`` is not ready for this code (cannot be opened, has no
    schema, or is behind its migrations), or None when it is at the latest revision. A read."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    file = engine.url.database or ""
    sqlite = engine.url.get_backend_name() == "sqlite"
    on_disk = sqlite and file not in ("", ":memory:") and not file.startswith("file:")
    if on_disk and not Path(file).exists():  # opening it would create an empty file: just say so
        return "the database does not exist yet"
    try:
        with reader(engine).connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except DBAPIError as exc:
        # The driver's own first line ("unable to open database file", "connection refused"):
        # never the URL, which may hold a password.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        return f"cannot open the database ({reason})"
    if current is None:
        return "the database has no schema yet"
    if current != head:
        return f"the database schema is at revision {current}; this Herald needs {head}"
    return None
