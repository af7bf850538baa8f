"""The ``herald`` command. Every option falls back to a ``HERALD_*`` variable, shown in ``--help``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from pydantic import ValidationError as SettingsValidationError

from herald import logs
from herald.config import LANES, Settings, explain, get_settings
from herald.errors import HeraldError

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    try:
        return get_settings()
    except SettingsValidationError as exc:
        raise click.ClickException(f"bad setting: {explain(exc)}") from None


def migrated(s: Settings) -> None:
    """Stop with a hint, not a traceback, when the database is not migrated for this code."""
    from herald.store.db import make_engine
    from herald.store.migrate import unmigrated

    engine = make_engine(s.database_url, pool_size=1)
    try:
        problem = unmigrated(engine)
    finally:
        engine.dispose()
    if problem:
        raise click.ClickException(f"{problem}: run `herald migrate` first (`herald up` migrates by itself)")


def handles_errors(func: F) -> F:
    """Map ``HeraldError`` to a clean message and exit code 2 (1 for internal errors)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HeraldError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(2 if exc.status < 500 else 1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("--log-level", envvar="HERALD_LOG_LEVEL", default="INFO", show_envvar=True, show_default=True)
def main(log_level: str) -> None:
    """Herald: notifications and background jobs on Celery + Redis."""
    logs.configure(log_level)


@main.command()
def up() -> None:
    """Run everything on this machine: embedded Redis, SQLite, API, dispatcher, workers, beat."""
    from herald.supervisor import Supervisor

    s = settings()
    if not s.webhook.allow_networks:
        logger.warning("local mode: webhooks to loopback allowed (set HERALD_WEBHOOK__ALLOW_NETWORKS to change)")
        import os

        os.environ["HERALD_WEBHOOK__ALLOW_NETWORKS"] = "127.0.0.0/8,::1/128"
    sys.exit(Supervisor(s).run())


@main.command()
@handles_errors
def migrate() -> None:
    """Apply database migrations (safe to run repeatedly)."""
    from herald.store.db import make_engine
    from herald.store.migrate import upgrade

    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(make_engine(s.database_url))
    click.echo("database is up to date")


@main.command()
@click.option("--host", envvar="HERALD_API__HOST", show_envvar=True, default=None, help="default 127.0.0.1")
@click.option("--port", envvar="HERALD_API__PORT", show_envvar=True, type=int, default=None, help="default 8000")
@click.option("--workers", envvar="HERALD_API__WORKERS", show_envvar=True, type=int, default=1, show_default=True)
def api(host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    s = settings()
    migrated(s)
    uvicorn.run(
        "herald.api.app:app_from_env",
        factory=True,
        host=host or s.api.host,
        port=port if port is not None else s.api.port,
        workers=workers,
        log_config=None,
        access_log=False,
    )


@main.command()
@click.option("--lanes", envvar="HERALD_WORKER__LANES", show_envvar=True, default=",".join(LANES), show_default=True)
@click.option("--concurrency", envvar="HERALD_WORKER__CONCURRENCY", show_envvar=True, type=int, default=None)
@click.option("--name", envvar="HERALD_WORKER__NAME", show_envvar=True, default=None)
def worker(lanes: str, concurrency: int | None, name: str | None) -> None:
    """Run a Celery worker consuming the given lanes."""
    from herald import heap
    from herald.worker.celery_app import make_celery

    chosen = [lane.strip() for lane in lanes.split(",") if lane.strip()]
    unknown = [lane for lane in chosen if lane not in LANES]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown lane {unknown[0] if unknown else ''!r}; lanes are {', '.join(LANES)}")
    s = settings()
    migrated(s)
    app = make_celery(s)
    # A worker of the bulk lane alone is background work: it yields the CPU (nice) and, on
    # SQLite, the write lock to everything else on this machine.
    app.conf.herald_background = set(chosen) <= {"bulk"}
    if app.conf.herald_background:
        _be_background(s)
    argv = [
        "worker",
        "-Q", ",".join(chosen),
        "-c", str(concurrency or s.worker.concurrency),
        "-n", name or f"herald-{'-'.join(chosen)}@%h",
        "--without-gossip",
        "--without-mingle",
        "-l", s.log_level,
    ]  # fmt: skip
    if s.worker.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(s.worker.max_tasks_per_child)]
    heap.freeze_loaded()  # the pool processes fork from here and freeze their own runtime later
    app.worker_main(argv)


def _be_background(s: Settings) -> None:
    """Lower this process's CPU priority by ``HERALD_WORKER__BULK_NICE`` (children inherit it)."""
    if s.worker.bulk_nice:
        os.nice(s.worker.bulk_nice)


@main.command()
def scheduler() -> None:
    """Run the dispatcher: claims due deliveries, publishes batches, reconciles lost ones."""
    from herald import heap
    from herald.api.app import make_redis
    from herald.dispatch.dispatcher import Dispatcher
    from herald.store.db import make_engine, make_sessionmaker
    from herald.worker.celery_app import make_celery

    s = settings()
    migrated(s)
    dispatcher = Dispatcher(
        settings=s,
        sessions=make_sessionmaker(make_engine(s.database_url)),
        celery=make_celery(s),
        client=make_redis(s),
    )
    signal.signal(signal.SIGTERM, lambda *_: dispatcher.stop())
    signal.signal(signal.SIGINT, lambda *_: dispatcher.stop())
    heap.freeze_loaded()
    dispatcher.run()


@main.command()
@click.option(
    "--schedule-file", envvar="HERALD_BEAT__SCHEDULE_FILE", show_envvar=True, default=None,
    help="beat's state file (default <data>/beat-schedule); each beat process needs its own",
)  # fmt: skip
def beat(schedule_file: str | None) -> None:
    """Run Celery beat for Herald's periodic jobs (several beats may run: each tick runs once)."""
    from herald.worker.celery_app import make_celery

    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app = make_celery(s)
    schedule = schedule_file or str((s.data_dir / "beat-schedule").resolve())
    # TickScheduler stamps each message with the instant it was sent: the tick a worker claims.
    app.Beat(schedule=schedule, scheduler="herald.scheduler.beat:TickScheduler", loglevel=s.log_level).run()


# ------------------------------------------------------------------ tenants


@main.group()
def tenants() -> None:
    """Create tenants and manage their API keys."""


def _sessions() -> Any:
    """Sessions for a command; what they change (replays) is published to live timelines on commit."""
    import redis

    from herald import live
    from herald.store.db import make_engine, make_sessionmaker

    s = settings()
    sessions = make_sessionmaker(make_engine(s.database_url))
    live.install(sessions, redis.Redis.from_url(s.redis_url, socket_timeout=5), s.redis.key_prefix)
    return sessions


# A tenant's retry overrides; without them its deliveries follow HERALD_RETRY__*. The window is
# capped at a year so that it fits the column on every database.
max_attempts_option = click.option(
    "--max-attempts", envvar="HERALD_TENANT__MAX_ATTEMPTS", show_envvar=True, type=click.IntRange(1, 100),
    default=None, help="attempts before a delivery of this tenant is dead (default HERALD_RETRY__MAX_ATTEMPTS)",
)  # fmt: skip
retry_window_option = click.option(
    "--retry-window-s", envvar="HERALD_TENANT__RETRY_WINDOW_S", show_envvar=True,
    type=click.IntRange(1, 365 * 24 * 3600), default=None,
    help="no attempt later than this after the first (default HERALD_RETRY__WINDOW_S)",
)  # fmt: skip


@tenants.command("create")
@click.argument("name")
@max_attempts_option
@retry_window_option
@handles_errors
def tenants_create(name: str, max_attempts: int | None, retry_window_s: int | None) -> None:
    """Create tenant NAME and print its first API key (shown once)."""
    from herald.store import queries
    from herald.store.db import transaction

    with transaction(_sessions()) as session:
        tenant = queries.create_tenant(session=session, name=name)
        tenant.retry_max_attempts = max_attempts
        tenant.retry_window_s = retry_window_s
        _, raw = queries.create_api_key(session=session, tenant_id=tenant.id)
    click.echo(f"tenant {tenant.id} ({name}) created")
    click.echo(f"API key (shown once, store it now): {raw}")


@tenants.command("update")
@click.argument("tenant")
@max_attempts_option
@retry_window_option
@handles_errors
def tenants_update(tenant: str, max_attempts: int | None, retry_window_s: int | None) -> None:
    """Change TENANT's (id or name) retry overrides; deliveries already waiting follow the new ones."""
    from herald.errors import ValidationError
    from herald.store import queries
    from herald.store.db import transaction

    if max_attempts is None and retry_window_s is None:
        raise ValidationError("give --max-attempts or --retry-window-s (or both)")
    with transaction(_sessions()) as session:
        found = queries.set_tenant_retry(
            session=session, ref=tenant, max_attempts=max_attempts, retry_window_s=retry_window_s
        )
        label, attempts, window = f"{found.id} ({found.name})", found.retry_max_attempts, found.retry_window_s
    defaults = settings().retry
    shown_attempts = str(attempts) if attempts is not None else f"{defaults.max_attempts} (default)"
    shown_window = f"{window}s" if window is not None else f"{defaults.window_s:g}s (default)"
    click.echo(f"tenant {label} updated: max attempts {shown_attempts}, retry window {shown_window}")


@tenants.command("list")
@handles_errors
def tenants_list() -> None:
    """List tenants."""
    from herald.store import queries

    with _sessions()() as session:
        for tenant in queries.list_tenants(session=session):
            click.echo(f"{tenant.id}\t{tenant.name}\t{tenant.created_at.isoformat()}")


@tenants.command("create-key")
@click.argument("tenant")
@handles_errors
def tenants_create_key(tenant: str) -> None:
    """Add an API key to TENANT (id or name); several keys can be active."""
    from herald.store import queries
    from herald.store.db import transaction

    with transaction(_sessions()) as session:
        found = queries.get_tenant(session=session, ref=tenant)
        _, raw = queries.create_api_key(session=session, tenant_id=found.id)
    click.echo(f"API key (shown once, store it now): {raw}")


@tenants.command("keys")
@click.argument("tenant")
@handles_errors
def tenants_keys(tenant: str) -> None:
    """List TENANT's keys by prefix (the keys themselves are never stored)."""
    from herald.store import queries

    with _sessions()() as session:
        found = queries.get_tenant(session=session, ref=tenant)
        for key in queries.list_api_keys(session=session, tenant_id=found.id):
            state = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "active"
            click.echo(f"hk_{key.prefix}_…\t{key.created_at.isoformat()}\t{state}")


@tenants.command("revoke-key")
@click.argument("prefix")
@handles_errors
def tenants_revoke_key(prefix: str) -> None:
    """Revoke the key whose prefix is PREFIX (as `herald tenants keys` shows it)."""
    from herald.store import queries
    from herald.store.db import transaction

    clean = prefix.removeprefix("hk_").split("_", 1)[0].rstrip("…")
    with transaction(_sessions()) as session:
        queries.revoke_api_key(session=session, prefix=clean)
    click.echo(f"key hk_{clean}_… revoked")


# ------------------------------------------------------------------ dead letters


@main.group()
def dlq() -> None:
    """Inspect and replay dead deliveries."""


@dlq.command("list")
@click.option("--tenant", required=True, help="tenant id or name")
@click.option("--endpoint", default=None)
@click.option("--event-type", default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@handles_errors
def dlq_list(tenant: str, endpoint: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    """List dead deliveries with their last error."""
    from herald.store import queries
    from herald.store.models import DeliveryState

    with _sessions()() as session:
        found = queries.get_tenant(session=session, ref=tenant)
        where = queries.DeliveryFilter(state=DeliveryState.dead, endpoint_id=endpoint, event_type=event_type)
        for d in queries.list_deliveries(session=session, tenant_id=found.id, where=where, cursor=None, limit=limit):
            if as_json:
                click.echo(json.dumps({"id": d.id, "endpoint_id": d.endpoint_id, "event_type": d.event_type,
                                       "attempts": d.attempts, "last_error": d.last_error}))  # fmt: skip
            else:
                click.echo(f"{d.id}\t{d.endpoint_id}\t{d.event_type}\t{d.attempts}\t{d.last_error or ''}")


@dlq.command("replay")
@click.option("--tenant", required=True, help="tenant id or name")
@click.option("--id", "ids", multiple=True, help="a delivery id (repeatable)")
@click.option("--endpoint", default=None, help="replay every dead delivery of this endpoint")
@click.option("--event-type", default=None)
@click.option("--all", "everything", is_flag=True, help="replay every dead delivery of the tenant")
@click.option("--force", is_flag=True, help="also re-send deliveries that are no longer dead")
@handles_errors
def dlq_replay(
    tenant: str, ids: tuple[str, ...], endpoint: str | None, event_type: str | None, everything: bool, force: bool
) -> None:
    """Re-send dead deliveries with their ids unchanged."""
    from herald.api.app import make_redis
    from herald.errors import ValidationError
    from herald.store import queries
    from herald.store.db import transaction
    from herald.store.models import DeliveryState, utcnow

    if not ids and not (endpoint or event_type or everything):
        raise ValidationError("give --id, --endpoint, --event-type or --all")
    s = settings()
    with transaction(_sessions()) as session:
        found = queries.get_tenant(session=session, ref=tenant)
        where = None
        if not ids:
            state = None if force else DeliveryState.dead
            where = queries.DeliveryFilter(state=state, endpoint_id=endpoint, event_type=event_type)
        result = queries.replay_report(
            session=session, tenant_id=found.id, ids=list(ids) or None, where=where, force=force, now=utcnow()
        )
    replayed, skipped = result.replayed, result.skipped
    if replayed:
        from herald import keys

        try:
            make_redis(s).rpush(keys.wake(s.redis.key_prefix), 1)
        except Exception:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")
    for delivery_id, reason in sorted(skipped.items()):
        click.echo(f"skipped {delivery_id}: {reason}")
    click.echo(f"replayed {len(replayed)}, skipped {len(skipped)}")


# ------------------------------------------------------------------ drops


@main.command()
@click.argument("directory", required=False, envvar="HERALD_INGEST__DIR", type=click.Path(file_okay=False))
@click.option("--once", is_flag=True, help="ingest the files waiting now, then exit")
@handles_errors
def watch(directory: str | None, once: bool) -> None:
    """Watch DIRECTORY (env HERALD_INGEST__DIR, default <data>/drops) for files of user ids.

    Each file becomes one webhook per line on the bulk lane; a sub-folder is a campaign with a
    campaign.json. Processed files move to done/ (unreadable ones to failed/) next to a report.
    """
    from pathlib import Path

    from herald import heap
    from herald.api.app import make_redis
    from herald.ingest.watcher import Watcher
    from herald.store.db import make_engine, make_sessionmaker
    from herald.worker.celery_app import make_celery

    s = settings()
    migrated(s)
    _be_background(s)  # ingesting a drop is bulk work: the API and urgent lanes go first
    watcher = Watcher(
        settings=s,
        sessions=make_sessionmaker(make_engine(s.database_url, background=True)),
        client=make_redis(s),
        directory=Path(directory) if directory else None,
        celery=make_celery(s),  # chunks go to the bulk workers directly while the lane has room
    )
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    signal.signal(signal.SIGINT, lambda *_: watcher.stop())
    heap.freeze_loaded()  # each chunk allocates its rows: the collector should not rescan the rest
    watcher.run(once=once)


@main.group(invoke_without_command=True)
@click.option("--tenant", default=None, help="tenant id or name (default: every tenant)")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="newest drops shown")
@click.option("--follow", "-f", is_flag=True, help="redraw every second until the drops shown are finished")
@click.pass_context
@handles_errors
def drops(ctx: click.Context, tenant: str | None, limit: int, follow: bool) -> None:
    """Drops from the watched folder with their delivery progress."""
    import time

    from herald.ingest.drops import DropState, list_drops
    from herald.ingest.report import progress, progress_line
    from herald.store import queries

    if ctx.invoked_subcommand is not None:
        return
    factory = _sessions()
    while True:
        with factory() as session:
            tenant_id = queries.get_tenant(session=session, ref=tenant).id if tenant else None
            shown = list_drops(session=session, tenant_id=tenant_id, limit=limit, newest_first=True)
            counts = progress(session=session, drop_ids=[d.id for d in shown])
        lines = [f"{d.id}  {d.state:<10}  {progress_line(d, counts[d.id])}  {d.name}" for d in reversed(shown)] or [
            "no drops yet"
        ]
        if follow and sys.stdout.isatty():
            click.clear()
        click.echo("\n".join(lines))
        if not follow or all(d.state == DropState.finished for d in shown):
            return
        time.sleep(1.0)


@drops.command("show")
@click.argument("drop_id")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON")
@handles_errors
def drops_show(drop_id: str, as_json: bool) -> None:
    """One drop: counts, progress, timings and its rejected lines."""
    from herald.ingest.drops import get_drop
    from herald.ingest.report import drop_report, progress, progress_line

    with _sessions()() as session:
        drop = get_drop(session=session, tenant_id=None, drop_id=drop_id)
        counts = progress(session=session, drop_ids=[drop.id])[drop.id]
    report = drop_report(drop, counts)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{drop.id}  {drop.name}  ({drop.state})")
    click.echo(f"  tenant {drop.tenant_id}, endpoint {drop.endpoint_id}, event type {drop.event_type}")
    click.echo(f"  {drop.lines:,} lines: {drop.accepted:,} accepted, {drop.rejected:,} rejected")
    click.echo(f"  {progress_line(drop, counts)}")
    for name, value in report["timings"].items():
        if value is not None:
            click.echo(f"  {name}: {value}")
    for rejection in drop.rejections[:50]:
        click.echo(f"  line {rejection['line']}: {rejection['reason']}")
    if drop.rejected > min(50, len(drop.rejections)):
        click.echo(f"  … {drop.rejected - min(50, len(drop.rejections)):,} more rejected lines (see --json)")


@drops.command("dead-letters")
@click.argument("drop_id")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@handles_errors
def drops_dead_letters(drop_id: str, limit: int, as_json: bool) -> None:
    """The drop's dead deliveries with their last error."""
    from herald.ingest.drops import get_drop
    from herald.store import queries
    from herald.store.models import DeliveryState

    with _sessions()() as session:
        drop = get_drop(session=session, tenant_id=None, drop_id=drop_id)
        where = queries.DeliveryFilter(state=DeliveryState.dead, drop_id=drop.id)
        rows = queries.list_deliveries(session=session, tenant_id=drop.tenant_id, where=where, cursor=None, limit=limit)
        for d in rows:
            if as_json:
                click.echo(json.dumps({"id": d.id, "user_id": d.subject, "attempts": d.attempts,
                                       "last_error": d.last_error}))  # fmt: skip
            else:
                click.echo(f"{d.id}\t{d.subject}\t{d.attempts}\t{d.last_error or ''}")


@drops.command("replay")
@click.argument("drop_id")
@click.option("--id", "ids", multiple=True, help="only this delivery of the drop (repeatable)")
@click.option("--force", is_flag=True, help="also re-send deliveries that are no longer dead")
@handles_errors
def drops_replay(drop_id: str, ids: tuple[str, ...], force: bool) -> None:
    """Re-send the drop's dead deliveries with their ids unchanged."""
    from herald import keys
    from herald.api.app import make_redis
    from herald.ingest.drops import get_drop, replay_drop
    from herald.store.db import transaction
    from herald.store.models import utcnow

    s = settings()
    with transaction(_sessions()) as session:
        drop = get_drop(session=session, tenant_id=None, drop_id=drop_id)
        replayed, skipped = replay_drop(session=session, drop=drop, ids=list(ids) or None, force=force, now=utcnow())
    if replayed:
        try:
            make_redis(s).rpush(keys.wake(s.redis.key_prefix), 1)
        except Exception:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")
    click.echo(f"replayed {len(replayed)}, skipped {len(skipped)}")


if __name__ == "__main__":
    main()
