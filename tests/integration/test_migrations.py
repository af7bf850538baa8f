"""Migrations: up, down and up again, and the models match what the migrations build."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from herald.store.db import make_engine
from herald.store.migrate import alembic_config, upgrade
from herald.store.models import Base


def test_migrations_round_trip_and_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        config = alembic_config(engine)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        upgrade(engine)
        upgrade(engine)  # a second run is a no-op
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
