"""The ``drop`` variant of ``webhooks.py``: a file of N user ids through a watched folder.

    uv run python bench/webhooks.py --variants raw,drop,celery,sequential [--drop-messages N]

Real processes, as production runs them for drops: ``herald watch DIR``, ``herald scheduler`` and
``herald worker --lanes bulk``, on a fresh database with a tenant and an endpoint pointing at the
run's receiver (no API: a drop needs none). Top-level files of ``DIR`` go to that endpoint
through ``HERALD_INGEST__TENANT`` / ``HERALD_INGEST__ENDPOINT_ID``.

1. Before anything starts, the file is written next to its final name as ``NAME.part`` (the
   watcher ignores it): N distinct ids, as a CSV ``user_id,pad`` whose padding makes each webhook
   body about ``--payload-bytes`` like the other variants' (``--drop-format ids``: one id per line).
2. A warm-up drop of 20 ids is delivered first (imports, pools; it also proves the watcher is
   watching, since the watcher itself gives no readiness signal).
3. The clock starts at the atomic rename ``NAME.part`` → ``NAME`` and stops when every one of the
   N deliveries is ``delivered`` **in the database** (the receiver's count is watched first, then
   the database is polled every 20 ms).

The result also says when the watcher registered the drop (``detected_s``), when the last chunk
was committed (``ingested_s``), the watcher's peak RSS and the delivered count over time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    Run,
    create_tenant,
    flush_redis_db,
    fresh_database,
    herald_env,
    herald_settings,
    peak_rss,
    poll_engine,
    postgres_backends_cpu_s,
    servers_used,
    start_herald,
    wait_delivered,
    wait_until,
    write_ids_file,
)
from profiling import start_profilers, stop_profilers

WARM_UP_IDS = 20


def drop_pad(payload_bytes: int) -> int:
    """Padding that makes a drop's webhook body (``{"id","type","subject","timestamp","data":
    {"pad","user_id"}}``) about ``payload_bytes`` long."""
    body = {
        "id": "evt_01JBENCH0000000000000000000",
        "type": "drop.user",
        "subject": "user-000000001",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        "data": {"pad": "", "user_id": "user-000000001"},
    }
    return max(1, payload_bytes - len(json.dumps(body, separators=(",", ":"))))


def run_drop(run: Run, n: int, kind: str, redis_url: str) -> dict[str, Any]:
    flush_redis_db(redis_url)
    folder = run.tmp / f"drops-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    pad = drop_pad(run.args.payload_bytes) if run.args.drop_format == "csv" else 0
    name = f"users-{n}.{'csv' if pad else 'txt'}"
    staged = folder / f"{name}.part"
    written = time.perf_counter()
    file_bytes = write_ids_file(staged, n, pad=pad)
    write_s = time.perf_counter() - written
    warm = folder / "warm-up.txt.part"
    write_ids_file(warm, WARM_UP_IDS, prefix="warm-")
    with fresh_database(run.tmp, kind, postgres_url=run.args.postgres_url) as (database_url, pg_name):
        tenant_id, _, endpoint_id = create_tenant(database_url, endpoint_url=run.receiver.url)
        env = herald_env(
            run.tmp,
            database_url=database_url,
            redis_url=redis_url,
            extra={"HERALD_INGEST__TENANT": tenant_id, "HERALD_INGEST__ENDPOINT_ID": endpoint_id},
            overrides=run.args.herald_env,
        )
        concurrency = int(env.get("HERALD_WORKER__CONCURRENCY", run.args.herald_worker_concurrency))
        engine = poll_engine(database_url)
        prefix = f"drop-{kind}-"
        try:
            herald = start_herald(
                run.procs, env, workers=[("bulk", "bulk", concurrency)], prefix=prefix, api=False, watch_dir=folder
            )
            try:
                result = _drive(run, n, kind, staged, folder / name, warm, tenant_id, herald.names, engine, pg_name)
            finally:
                for process in herald.names:
                    run.procs.stop(process)
        finally:
            engine.dispose()
    result["config"] = {
        "database": kind,
        "file": {"format": run.args.drop_format, "lines": n, "bytes": file_bytes, "written_in_s": round(write_s, 2)},
        "processes": herald.commands,
        "worker_concurrency": concurrency,
        "settings": herald_settings(env),
    }
    return result


def _drive(
    run: Run,
    n: int,
    kind: str,
    staged: Path,
    final: Path,
    warm: Path,
    tenant_id: str,
    names: list[str],
    engine: Any,
    pg_name: str,
) -> dict[str, Any]:
    from sqlalchemy import text

    delivered_sql = text("SELECT COUNT(*) FROM deliveries WHERE tenant_id = :t AND state = 'delivered'")

    def delivered() -> int:
        with engine.connect() as conn:
            return int(conn.execute(delivered_sql, {"t": tenant_id}).scalar_one())

    def warm_done() -> bool:
        run.procs.check_alive(*names)
        return delivered() >= WARM_UP_IDS

    os.replace(warm, warm.with_suffix(""))
    # The watcher notices the file at once (inotify) or at its next rescan (5 s by default).
    wait_until(warm_done, timeout_s=60, interval_s=0.1, what="the warm-up drop to be delivered")

    # CPU of the idle system: a dispatcher, watcher or worker that spins without work shows here.
    idle_before = sum(run.procs.cpu_s(names).values())
    time.sleep(1.0)
    idle_cores = sum(run.procs.cpu_s(names).values()) - idle_before

    with engine.connect() as conn:
        own_backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) if pg_name else 0
    pg_before = postgres_backends_cpu_s(run.args.postgres_url, pg_name, exclude=own_backend) if pg_name else {}
    receiver_before = run.receiver.stats()
    profilers = start_profilers(run, names) if run.args.profile else []
    cpu_before, servers_before = run.procs.cpu_s(names), run.servers_cpu_s()
    wall_start = time.time()
    start = time.perf_counter()
    os.replace(staged, final)
    waited = wait_delivered(
        run.receiver,
        engine,
        tenant_id=tenant_id,
        receiver_target=receiver_before["count"] + n,
        database_target=WARM_UP_IDS + n,
        timeout_s=run.args.variant_timeout_s,
        check=lambda: run.procs.check_alive(*names),
        what=f"drop-{kind}",
    )
    end = waited["end"]
    cpu_after, servers_after = run.procs.cpu_s(names), run.servers_cpu_s()
    pg_after = postgres_backends_cpu_s(run.args.postgres_url, pg_name, exclude=own_backend) if pg_name else {}
    profiles = stop_profilers(run, profilers)
    watcher_peak = peak_rss(run.procs.running[f"drop-{kind}-watch"].pid)
    with engine.connect() as conn:
        drop = conn.execute(
            text("SELECT id, lines, accepted, rejected, created_at, finished_at FROM drops WHERE name = :n"),
            {"n": final.name},
        ).one()
        states = dict(
            conn.execute(
                text("SELECT state, COUNT(*) FROM deliveries WHERE drop_id = :d GROUP BY state"), {"d": drop[0]}
            ).all()
        )
    receiver_after = run.receiver.stats()
    prefix = f"drop-{kind}-"
    parts = {name.removeprefix(prefix): round(cpu_after[name] - cpu_before[name], 2) for name in names}
    elapsed = end - start
    requests_seen = receiver_after["count"] - receiver_before["count"]
    result: dict[str, Any] = {
        "variant": f"drop-{kind}",
        "label": f"Herald drop\n({'SQLite' if kind == 'sqlite' else 'PostgreSQL'})",
        "messages": n,
        "elapsed_s": elapsed,
        "rate_per_s": n / elapsed,
        "detected_s": _after(drop[4], wall_start),
        "ingested_s": _after(drop[5], wall_start),
        "drop": {"id": drop[0], "lines": drop[1], "accepted": drop[2], "rejected": drop[3]},
        "states": states,
        "warm_up_deliveries": WARM_UP_IDS,
        "receiver_requests": requests_seen,
        "receiver_unique_ids": receiver_after["unique_ids"] - receiver_before["unique_ids"],
        "receiver_bytes_per_request": round(
            (receiver_after["bytes"] - receiver_before["bytes"]) / max(requests_seen, 1)
        ),
        "watcher_peak_rss_mb": round(watcher_peak / 2**20, 1),
        "idle_cpu_cores": round(idle_cores, 3),
        "cpu_s": sum(parts.values()),
        "cpu_s_by_process": parts,
        **servers_used(servers_before, servers_after),
        "profiles": profiles,
        "timeline": [(round(t - start, 2), c - receiver_before["count"]) for t, c in waited["timeline"]],
    }
    if pg_name:
        result["postgres_cpu_s"] = round(sum(c - pg_before.get(p, 0.0) for p, c in pg_after.items()), 2)
    return result


def _after(value: Any, wall_start: float) -> float | None:
    """Seconds from ``wall_start`` to a timestamp read from the database (SQLite gives text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return round(float(value.timestamp()) - wall_start, 3)
