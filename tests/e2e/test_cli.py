"""The operator CLI in real processes: migrations, tenants, keys and dead letters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from herald.cli import tenants
from herald.config import Settings, get_settings
from herald.store import queries
from herald.store.db import make_engine, make_sessionmaker, transaction
from herald.store.migrate import alembic_config, upgrade
from herald.store.models import Base, Delivery, Tenant
from tests.conftest import PG_ENV, PG_SKIP
from tests.e2e.test_delivery import delivery, make_endpoint
from tests.support import Processes, Receiver, row_counts, settings_env, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


def herald(
    settings: Settings, *args: str, ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", *args], env=settings_env(settings) | (env or {}), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_tenant_keys_lifecycle(settings: Settings, client: TestClient) -> None:
    created = herald(settings, "tenants", "create", "airline").stdout
    first = re.search(r"hk_\S+", created)
    assert first is not None
    second = re.search(r"hk_\S+", herald(settings, "tenants", "create-key", "airline").stdout)
    assert second is not None
    for key in (first.group(0), second.group(0)):
        assert client.get("/v1/endpoints", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listed = herald(settings, "tenants", "keys", "airline").stdout
    assert first.group(0) not in listed and second.group(0) not in listed  # only prefixes are shown
    prefix = first.group(0).split("_")[1]
    assert f"hk_{prefix}_" in listed
    herald(settings, "tenants", "revoke-key", prefix)
    refused = client.get("/v1/endpoints", headers={"Authorization": f"Bearer {first.group(0)}"})
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert client.get("/v1/endpoints", headers={"Authorization": f"Bearer {second.group(0)}"}).status_code == 200
    duplicate = herald(settings, "tenants", "create", "airline", ok=False)
    assert duplicate.returncode == 2 and "exists" in duplicate.stderr
    missing = herald(settings, "tenants", "keys", "nobody", ok=False)
    assert missing.returncode == 2 and "no such tenant" in missing.stderr


def test_dlq_list_and_replay(
    settings: Settings, client: TestClient, auth: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": "http://127.0.0.1:9/hook"}, headers=auth).json()
    accepted = client.post("/v1/events", json={"type": "ticket.closed"}, headers=auth).json()
    delivery_id = accepted["deliveries"][0]["id"]
    with sessions() as session, session.begin():
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(state="dead", due_at=None, attempts=8, last_error="HTTP 500: boom")
        )
    listed = herald(settings, "dlq", "list", "--tenant", "acme").stdout
    assert delivery_id in listed and "HTTP 500: boom" in listed and endpoint["id"] in listed
    assert "replayed 1, skipped 0" in herald(settings, "dlq", "replay", "--tenant", "acme", "--id", delivery_id).stdout
    assert client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json()["state"] == "queued"
    again = herald(settings, "dlq", "replay", "--tenant", "acme", "--id", delivery_id).stdout
    assert "replayed 0, skipped 1" in again
    assert f"skipped {delivery_id}: state queued: still pending or in flight" in again  # says why
    nothing = herald(settings, "dlq", "replay", "--tenant", "acme", ok=False)
    assert nothing.returncode == 2 and "--id" in nothing.stderr


def herald_env(settings: Settings) -> dict[str, str]:
    return {k: v for k, v in settings_env(settings).items() if k.startswith("HERALD_")}


def retry_overrides(sessions: sessionmaker[Session], name: str) -> tuple[int | None, int | None]:
    with sessions() as session:
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
        return tenant.retry_max_attempts, tenant.retry_window_s


def test_tenant_retry_overrides_are_updated_and_bad_values_write_nothing(
    settings: Settings, api_key: str, sessions: sessionmaker[Session]
) -> None:
    assert retry_overrides(sessions, "acme") == (None, None)
    done = herald(settings, "tenants", "update", "acme", "--max-attempts", "3").stdout
    assert "max attempts 3, retry window 86400s (default)" in done
    assert retry_overrides(sessions, "acme") == (3, None)
    from_env = herald(settings, "tenants", "update", "acme", env={"HERALD_TENANT__RETRY_WINDOW_S": "600"}).stdout
    assert "max attempts 3, retry window 600s" in from_env  # the attempts override is kept
    assert retry_overrides(sessions, "acme") == (3, 600)

    counts = row_counts(sessions)
    bad: list[tuple[list[str], dict[str, str], str]] = [
        (["--max-attempts", "0"], {}, "Invalid value for '--max-attempts'"),
        (["--max-attempts", "101"], {}, "Invalid value for '--max-attempts'"),
        (["--max-attempts", "two"], {}, "Invalid value for '--max-attempts'"),
        (["--retry-window-s", "0"], {}, "Invalid value for '--retry-window-s'"),
        (["--retry-window-s", str(365 * 24 * 3600 + 1)], {}, "Invalid value for '--retry-window-s'"),
        ([], {"HERALD_TENANT__MAX_ATTEMPTS": "-1"}, "Invalid value for '--max-attempts'"),
        ([], {}, "error: give --max-attempts or --retry-window-s"),
    ]
    # In this process (each refused before the database is opened): a process start per case
    # would cost seconds on a busy machine. The exit code and message are the command's own.
    for args, env, message in bad:
        get_settings.cache_clear()
        refused = CliRunner().invoke(tenants, ["update", "acme", *args], env=herald_env(settings) | env)
        get_settings.cache_clear()
        assert refused.exit_code == 2 and message in refused.stderr, (args, refused.stderr, refused.exception)
    nobody = herald(settings, "tenants", "update", "nobody", "--max-attempts", "2", ok=False)
    assert nobody.returncode == 2 and "error: tenant: no such tenant, got 'nobody'" in nobody.stderr
    assert retry_overrides(sessions, "acme") == (3, 600)
    assert row_counts(sessions) == counts


def test_a_worker_honours_the_tenants_max_attempts(
    settings: Settings,
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
) -> None:
    """Always 500 with the tenant's max attempts set to 2 (the default here is 4): dead after exactly 2."""
    assert settings.retry.max_attempts != 2
    herald(settings, "tenants", "update", "acme", "--max-attempts", "2")
    receiver.behaviour = lambda _id, _n: 500
    make_endpoint(client, auth, receiver)
    processes.worker()
    processes.dispatcher()

    def dead(delivery_id: str) -> dict[str, object] | None:
        record = delivery(client, auth, delivery_id)
        return record if record["state"] == "dead" else None

    first, second = (
        client.post("/v1/events", json={"type": "visit.booked"}, headers=auth).json()["deliveries"][0]["id"]
        for _ in range(2)
    )
    record = wait_until(lambda: dead(first), what="the first delivery to die")
    assert record["attempt_count"] == 2 and "gave up after 2 attempts" in str(record["last_error"]) + str(
        record["attempts"]
    )
    wait_until(lambda: dead(second), what="the second delivery to die")  # by then a third try would show
    assert receiver.calls[first] == receiver.calls[second] == 2
    assert receiver.bad_signatures == 0


@pytest.fixture
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """``HERALD_*`` variables naming a database nobody has migrated: by default the SQLite file of
    a data folder that does not exist yet, or a new, empty PostgreSQL database."""
    env = {"HERALD_DATA_DIR": str(tmp_path / "new-data")}
    if request.param == "sqlite":
        yield env
        return
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(PG_SKIP)
    import psycopg

    name = f"herald_m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield env | {"HERALD_DATABASE__URL": f"{admin.rsplit('/', 1)[0]}/{name}"}
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "fresh_database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_migrate_builds_a_fresh_database_and_running_it_again_is_harmless(fresh_database: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")} | fresh_database
    url = Settings(
        data_dir=Path(env["HERALD_DATA_DIR"]), database={"url": env.get("HERALD_DATABASE__URL", "")}
    ).database_url

    def migrate() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "herald.cli", "migrate"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "database is up to date" in done.stdout

    migrate()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
            assert MigrationContext.configure(conn).get_current_revision() == head
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        with transaction(make_sessionmaker(engine)) as session:
            queries.create_tenant(session=session, name="kept")
        migrate()  # again: nothing to do, and nothing lost
        with make_sessionmaker(engine)() as session:
            assert [t.name for t in queries.list_tenants(session=session)] == ["kept"]
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", [["api"], ["worker"], ["scheduler"], ["watch", "--once"]])
def test_a_long_running_command_on_an_unmigrated_database_says_to_migrate(
    tmp_path: Path, redis_url: str, command: list[str]
) -> None:
    """Never migrated, a process stops at once with a hint instead of a traceback from its first
    query, and creates no empty database file on the way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_DATA_DIR": str(tmp_path), "HERALD_REDIS__URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "the database does not exist yet: run `herald migrate` first" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "herald.db").exists()


def test_a_worker_whose_database_cannot_be_opened_says_why(tmp_path: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_DATA_DIR": str(tmp_path), "HERALD_REDIS__URL": redis_url,
            "HERALD_DATABASE__URL": "postgresql://herald:s3cret@127.0.0.1:1/herald"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot open the database (" in done.stderr and "run `herald migrate` first" in done.stderr
    assert "s3cret" not in done.stderr


def test_a_worker_on_a_database_behind_this_codes_migrations_names_both_revisions(
    tmp_path: Path, redis_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    try:
        upgrade(engine, "0004")
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    finally:
        engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_DATA_DIR": str(tmp_path), "HERALD_DATABASE__URL": url, "HERALD_REDIS__URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"the database schema is at revision 0004; this Herald needs {head}: run `herald migrate`" in done.stderr
