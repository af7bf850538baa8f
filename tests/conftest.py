"""Shared fixtures: real Redis, SQLite and PostgreSQL, the API app, a receiver, Herald processes.

PostgreSQL tests run when ``HERALD_TEST_POSTGRES_URL`` names a server (``.ci/run`` sets it);
each such test gets a fresh database cloned from a migrated template.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy.orm import Session, sessionmaker

from herald.api.app import create_app
from herald.config import Settings
from herald.store import queries
from herald.store.db import make_engine, make_sessionmaker, transaction
from herald.store.migrate import upgrade
from tests.support import MailSink, Processes, Receiver, SmsProvider, free_port, sqlite_database, wait_until

# Examples are judged on what they find, not on how fast a loaded 2-core machine draws them:
# wall-clock health checks and deadlines only turn the neighbours' load into flaky failures.
hypothesis_settings.register_profile("herald", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("herald")

PG_ENV = "HERALD_TEST_POSTGRES_URL"
PG_SKIP = f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/postgres); .ci/run sets it"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``HERALD_*`` variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("HERALD_") and name != PG_ENV:
            monkeypatch.delenv(name)


# ------------------------------------------------------------------ Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://host:port`` of a real Redis: the machine's on 6379, else one started here."""
    url = os.environ.get("HERALD_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
        yield url
        return
    except (redis.RedisError, OSError):
        pass
    from herald.supervisor import redis_server_path

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [redis_server_path(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    wait_until(lambda: _pings(url), timeout_s=10, what="test Redis to start")
    yield url
    proc.terminate()
    proc.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


_db_index = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url(redis_server: str, worker_id: str) -> Iterator[str]:
    """A Redis database index of its own for this test, flushed before and after.

    Under pytest-xdist each worker process owns one index (tests in a worker run one at a time).
    """
    index = 1 + int(worker_id.removeprefix("gw")) % 15 if worker_id.startswith("gw") else next(_db_index)
    url = f"{redis_server}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


# ------------------------------------------------------------------ databases


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str | None]:
    admin = os.environ.get(PG_ENV)
    if not admin:
        yield None
        return
    import psycopg

    name = f"herald_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_replace_db(admin, name))
    upgrade(engine)
    engine.dispose()
    yield name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _replace_db(url: str, name: str) -> str:
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, pg_template: str | None) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a PostgreSQL database cloned from the template."""
    if request.param == "sqlite":
        yield sqlite_database(tmp_path)
        return
    admin = os.environ.get(PG_ENV)
    if not admin or pg_template is None:
        pytest.skip(PG_SKIP)
    import psycopg

    name = f"herald_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _replace_db(admin, name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------ Herald


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    """Settings for a fast test: short ticks, leases and retry delays; loopback receivers allowed."""
    return Settings(
        data_dir=tmp_path / "data",
        log_level="INFO",
        database={"url": database_url},
        redis={"url": redis_url},
        dispatch={"tick_s": 0.1, "lease_s": 20.0, "reconcile_every_s": 1.0},
        retry={"max_attempts": 4, "base_delay_s": 0.2, "factor": 2.0, "max_delay_s": 2.0, "jitter": 0.1},
        webhook={"allow_networks": ["127.0.0.0/8", "::1/128"], "total_timeout_s": 5.0, "connect_timeout_s": 2.0},
        worker={"concurrency": 2},
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()
    app.state.redis.close()


@pytest.fixture
def api_key(sessions: sessionmaker[Session]) -> str:
    """A tenant ('acme') and one of its API keys."""
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="acme")
        _, raw = queries.create_api_key(session=session, tenant_id=tenant.id)
    return raw


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def mail() -> Iterator[MailSink]:
    """A real SMTP server (aiosmtpd) on loopback."""
    sink = MailSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def sms_provider() -> Iterator[SmsProvider]:
    """A JSON SMS provider on loopback."""
    provider = SmsProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def processes(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    yield procs
    procs.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for log in sorted(logs.iterdir()):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
    shutil.rmtree(logs, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
