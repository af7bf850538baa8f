"""Delivered webhooks per second: Herald against a raw client, one-Celery-task-per-message and a loop.

    uv run python bench/webhooks.py [--messages N] [--out bench/results]

Every variant runs in this one invocation against the same receiver process (``receiver.py``):

    raw         the ceiling: ``rawclient.py`` processes POSTing the same payload, bare aiohttp
    herald      API + scheduler + worker as real processes; N events through /v1/events/batch,
                timed from the first request until every delivery is ``delivered`` in the database
    drop        watcher + scheduler + worker; a file of N user ids renamed into the watched folder,
                timed from the rename until every delivery is ``delivered`` (``drop.py``; not in
                the default ``--variants``, ``suite.py`` runs it)
    celery      one task per message, ``requests`` inside (``celery_baseline.py``), best of a sweep
    sequential  one ``requests.Session`` in a loop, one request at a time, on a smaller N

``--receiver-delay-ms 200`` makes the receiver slow (issue 5's slow-receiver goals then apply).
Prints a table and the ratios, writes ``<report-name>.json`` and ``.png`` (``webhooks``) to ``--out``.
``--rounds N`` runs the variants N times, interleaved; the ratios then compare each variant's median run.
``--profile`` also samples the Herald processes with py-spy (if installed) and writes summaries.
See ``bench/README.md`` for how to read the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests
from common import (
    BENCH_DIR,
    GOALS,
    PYTHON,
    CpuMeter,
    Processes,
    RedisServer,
    Run,
    celery_ping,
    claim_redis_db,
    command_line,
    create_tenant,
    flush_redis_db,
    fresh_database,
    herald_env,
    herald_settings,
    loopback,
    machine_info,
    payload_shape,
    poll_engine,
    postgres_backends_cpu_s,
    read_line,
    servers_used,
    start_herald,
    start_receiver,
    start_redis,
    wait_delivered,
    wait_until,
    write_json,
)
from drop import WARM_UP_IDS as WARM_UP
from drop import run_drop
from profiling import start_profilers, stop_profilers

# ------------------------------------------------------------------ variants


def run_raw(run: Run, n: int) -> dict[str, Any]:
    processes, concurrency = run.args.raw_processes, run.args.raw_concurrency
    payload_file = run.tmp / "payload.json"
    payload_file.write_bytes(run.payload)
    names = [f"raw-{i}" for i in range(processes)]
    counts = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    try:
        children = [
            run.procs.start(
                name,
                [
                    PYTHON,
                    str(BENCH_DIR / "rawclient.py"),
                    "--url",
                    run.receiver.url,
                    "--count",
                    str(count),
                    "--concurrency",
                    str(concurrency),
                    "--payload-file",
                    str(payload_file),
                    "--timeout-s",
                    str(run.args.variant_timeout_s),
                ],
                pipes=True,
            )
            for name, count in zip(names, counts, strict=True)
        ]
        for name, child in zip(names, children, strict=True):
            read_line(child, timeout_s=30, what=f"{name} to get ready")
        before = run.receiver.count()
        cpu_before, servers_before = run.procs.cpu_s(names), run.servers_cpu_s()
        start = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        end = run.receiver.wait_for(before + n, timeout_s=run.args.variant_timeout_s)
        cpu_after, servers_after = run.procs.cpu_s(names), run.servers_cpu_s()
        reports = [json.loads(read_line(c, timeout_s=30, what="a raw client's report")) for c in children]
    finally:
        for name in names:
            run.procs.stop(name)
    errors = sum(r["errors"] for r in reports)
    cpu_s = sum(cpu_after[name] - cpu_before[name] for name in names)
    return {
        "variant": "raw",
        "cpu_s": cpu_s,
        **servers_used(servers_before, servers_after),
        "label": f"raw aiohttp\n{processes}x{concurrency}",
        "messages": n,
        "elapsed_s": end - start,
        "rate_per_s": n / (end - start),
        "errors": errors,
        "config": {"processes": processes, "concurrency_per_process": concurrency, "keepalive": True},
    }


def run_herald(run: Run, n: int, kind: str, redis_url: str) -> dict[str, Any]:
    flush_redis_db(redis_url)
    with fresh_database(run.tmp, kind, postgres_url=run.args.postgres_url) as (database_url, pg_name):
        tenant_id, api_key, _ = create_tenant(database_url)
        env = herald_env(run.tmp, database_url=database_url, redis_url=redis_url, overrides=run.args.herald_env)
        concurrency = int(env.get("HERALD_WORKER__CONCURRENCY", run.args.herald_worker_concurrency))
        engine = poll_engine(database_url)
        try:
            herald = start_herald(run.procs, env, workers=[("bulk", "bulk", concurrency)], prefix=f"herald-{kind}-")
            try:
                result = _drive_herald(run, n, kind, herald.base, api_key, tenant_id, herald.names, engine, pg_name)
            finally:
                for name in herald.names:
                    run.procs.stop(name)
        finally:
            engine.dispose()
    result["config"] = {
        "database": kind,
        "batch_size": run.args.batch_size,
        "senders": run.args.herald_senders,
        "processes": herald.commands,
        "worker_concurrency": concurrency,
        "settings": herald_settings(env),
    }
    return result


def _drive_herald(
    run: Run,
    n: int,
    kind: str,
    base: str,
    api_key: str,
    tenant_id: str,
    names: list[str],
    engine: Any,
    pg_name: str,
) -> dict[str, Any]:
    from sqlalchemy import text

    http = requests.Session()
    auth = {"Authorization": f"Bearer {api_key}"}
    answer = http.post(f"{base}/v1/endpoints", json={"url": run.receiver.url}, headers=auth, timeout=10)
    if answer.status_code != 201:
        raise RuntimeError(f"creating the endpoint failed: {answer.status_code} {answer.text[:300]}")

    # Warm-up, as for the drop: each worker pool process builds its runtime (database engine,
    # channels) on its first task, seconds on a busy machine; the measured run starts warm.
    warm = [{"type": "bench.warm", "subject": f"warm:{i}", "data": {}, "lane": "bulk"} for i in range(WARM_UP)]
    answer = http.post(f"{base}/v1/events/batch", json={"events": warm}, headers=auth, timeout=30)
    if answer.status_code != 202:
        raise RuntimeError(f"warm-up batch refused: {answer.status_code} {answer.text[:300]}")
    delivered_sql = text("SELECT COUNT(*) FROM deliveries WHERE tenant_id = :t AND state = 'delivered'")

    def warm_done() -> bool:
        run.procs.check_alive(*names)
        with engine.connect() as conn:
            return int(conn.execute(delivered_sql, {"t": tenant_id}).scalar_one()) >= WARM_UP

    wait_until(warm_done, timeout_s=60, interval_s=0.1, what="the warm-up batch to be delivered")

    # CPU of the idle system: a dispatcher or worker that spins when there is no work shows here.
    idle_before = sum(run.procs.cpu_s(names).values())
    time.sleep(1.0)
    idle_cores = sum(run.procs.cpu_s(names).values()) - idle_before

    size = run.args.batch_size
    pad = "x" * run.pad
    bodies = [
        json.dumps(
            {
                "events": [
                    {"type": "bench.ping", "subject": f"bench:{i:06d}", "data": {"n": i, "pad": pad}, "lane": "bulk"}
                    for i in range(start, min(start + size, n))
                ]
            },
            separators=(",", ":"),
        ).encode()
        for start in range(0, n, size)
    ]
    profilers = start_profilers(run, names) if run.args.profile else []
    local = threading.local()

    def post(body: bytes) -> float:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        response = local.http.post(
            f"{base}/v1/events/batch",
            data=body,
            timeout=60,
            headers={**auth, "content-type": "application/json"},
        )
        if response.status_code != 202:
            raise RuntimeError(f"batch refused: {response.status_code} {response.text[:300]}")
        return time.perf_counter()

    receiver_before = run.receiver.stats()
    with engine.connect() as conn:
        own_backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) if pg_name else 0
    pg_before = postgres_backends_cpu_s(run.args.postgres_url, pg_name, exclude=own_backend) if pg_name else {}
    cpu_before, servers_before = run.procs.cpu_s(names), run.servers_cpu_s()
    wall_start = time.time()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=run.args.herald_senders) as pool:
        accepted_at = max(pool.map(post, bodies))
    waited = wait_delivered(
        run.receiver,
        engine,
        tenant_id=tenant_id,
        receiver_target=receiver_before["count"] + n,
        database_target=WARM_UP + n,
        timeout_s=run.args.variant_timeout_s,
        check=lambda: run.procs.check_alive(*names),
        what=f"herald-{kind}",
    )
    end = waited["end"]
    cpu_after, servers_after = run.procs.cpu_s(names), run.servers_cpu_s()
    with engine.connect() as conn:
        states = {row[0]: row[1] for row in conn.execute(
            text("SELECT state, COUNT(*) FROM deliveries WHERE tenant_id = :t GROUP BY state"), {"t": tenant_id}
        )}  # fmt: skip
        last = conn.execute(text("SELECT MAX(finished_at) FROM deliveries WHERE tenant_id = :t"), {"t": tenant_id})
        last_finished = last.scalar_one()
        attempts = int(conn.execute(text("SELECT COUNT(*) FROM attempts")).scalar_one())
    pg_after = postgres_backends_cpu_s(run.args.postgres_url, pg_name, exclude=own_backend) if pg_name else {}
    profiles = stop_profilers(run, profilers)
    prefix = f"herald-{kind}-"
    parts = {name.removeprefix(prefix): round(cpu_after[name] - cpu_before[name], 2) for name in names}
    receiver_after = run.receiver.stats()
    if isinstance(last_finished, str):
        last_finished = dt.datetime.fromisoformat(last_finished)
    if last_finished is not None and last_finished.tzinfo is None:
        last_finished = last_finished.replace(tzinfo=dt.UTC)
    elapsed = end - start
    requests_seen = receiver_after["count"] - receiver_before["count"]
    return {
        "variant": f"herald-{kind}",
        "label": f"Herald batch API\n({'SQLite' if kind == 'sqlite' else 'PostgreSQL'})",
        "messages": n,
        "elapsed_s": elapsed,
        "rate_per_s": n / elapsed,
        "accepted_s": accepted_at - start,
        "accepted_per_s": n / (accepted_at - start),
        "last_finished_after_s": last_finished.timestamp() - wall_start if last_finished else None,
        "states": states,  # the tenant's, warm-up included
        "attempts": attempts,
        "warm_up_deliveries": WARM_UP,
        "receiver_requests": requests_seen,
        "receiver_unique_ids": receiver_after["unique_ids"] - receiver_before["unique_ids"],
        "receiver_bytes_per_request": round(
            (receiver_after["bytes"] - receiver_before["bytes"]) / max(requests_seen, 1)
        ),
        "idle_cpu_cores": round(idle_cores, 3),
        "cpu_s": sum(parts.values()),
        "cpu_s_by_process": parts,
        **servers_used(servers_before, servers_after),
        **(
            {"postgres_cpu_s": round(sum(c - pg_before.get(p, 0.0) for p, c in pg_after.items()), 2)} if pg_name else {}
        ),
        "profiles": profiles,
        "timeline": [(round(t - start, 2), c - receiver_before["count"]) for t, c in waited["timeline"]],
    }


def run_celery(run: Run, n: int, http_mode: str, concurrency: int, prefetch: int, redis_url: str) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH_DIR))
    from celery import Celery
    from celery_baseline import QUEUE, TASK

    flush_redis_db(redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(BENCH_CELERY_BROKER=redis_url, BENCH_CELERY_HTTP=http_mode, BENCH_CELERY_PREFETCH=str(prefetch))
    name = f"celery-{http_mode}-c{concurrency}-p{prefetch}"
    argv = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "celery_baseline",
        "worker",
        "-Q",
        QUEUE,
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "-n",
        "bench-celery@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
    ]
    publisher = Celery("bench-publisher", broker=redis_url, set_as_current=False)
    try:
        run.procs.start(name, argv, env=env, cwd=BENCH_DIR)

        def ready() -> bool:
            run.procs.check_alive(name)
            return celery_ping(redis_url)

        wait_until(ready, timeout_s=30, interval_s=0.2, what=f"the {name} worker")
        payload = run.payload.decode()
        before = run.receiver.count()
        worker_before, servers_before = run.procs.cpu_s([name])[name], run.servers_cpu_s()
        start = time.perf_counter()
        cpu_start = time.process_time()
        with publisher.producer_or_acquire() as producer:
            for _ in range(n):
                publisher.send_task(TASK, args=[run.receiver.url, payload], queue=QUEUE, producer=producer)
        published = time.perf_counter()
        publish_cpu_s = time.process_time() - cpu_start
        end = run.receiver.wait_for(before + n, timeout_s=run.args.variant_timeout_s)
        worker_cpu_s = run.procs.cpu_s([name])[name] - worker_before
        servers_after = run.servers_cpu_s()
    finally:
        run.procs.stop(name)
        publisher.close()
    return {
        "variant": name,
        "label": f"Celery task/msg\n{http_mode}, -c {concurrency}",
        "messages": n,
        "elapsed_s": end - start,
        "rate_per_s": n / (end - start),
        "published_s": published - start,
        "cpu_s": worker_cpu_s + publish_cpu_s,
        "cpu_s_by_process": {"worker": round(worker_cpu_s, 2), "publisher": round(publish_cpu_s, 2)},
        **servers_used(servers_before, servers_after),
        "config": {
            "http": http_mode,
            "pool": "prefork",
            "concurrency": concurrency,
            "prefetch_multiplier": prefetch,
            "acks": "early (Celery default)",
        },
    }


def run_sequential(run: Run, n: int) -> dict[str, Any]:
    http = requests.Session()
    headers = {"content-type": "application/json", "user-agent": "bench-seq/1"}
    deadline = time.monotonic() + run.args.variant_timeout_s
    sent = 0
    servers_before = run.servers_cpu_s()
    start = time.perf_counter()
    cpu_start = time.process_time()
    while sent < n and time.monotonic() < deadline:
        http.post(run.receiver.url, data=run.payload, headers=headers, timeout=15).raise_for_status()
        sent += 1
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    servers_after = run.servers_cpu_s()
    http.close()
    return {
        "variant": "sequential",
        "cpu_s": cpu_s,
        **servers_used(servers_before, servers_after),
        "label": "sequential loop\nrequests.Session",
        "messages": sent,
        "elapsed_s": elapsed,
        "rate_per_s": sent / elapsed,
        "config": {"client": "requests.Session, keep-alive, one request at a time"},
    }


def ratios(results: list[dict[str, Any]], delay_ms: float) -> dict[str, dict[str, Any]]:
    """Each Herald variant (``herald-*``: batch API, ``drop-*``: watched folder) against each
    baseline: by wall-clock rate and by CPU per delivery, and the issues' goals that apply.

    With an instant receiver: issue 2 (batch API ≥ 0.5x raw, ≥ 5x Celery) and issue 5 (drop ≥ 0.7x
    raw, ≥ 10x Celery). With a receiver taking ≥ 200 ms: issue 5 (drop ≥ 1,000/s, ≥ 100x sequential).
    """
    by_kind = representatives(results)
    raw = by_kind.get("raw")
    sequential = by_kind.get("sequential")
    celeries = [r for r in by_kind.values() if r["variant"].startswith("celery")]
    best_celery = max(celeries, key=lambda r: r["rate_per_s"]) if celeries else None
    leanest_celery = min(celeries, key=lambda r: r.get("cpu_us_per_delivery_all_in", 1e12)) if celeries else None
    out: dict[str, dict[str, Any]] = {}
    for herald in (r for r in by_kind.values() if r["variant"].startswith(("herald", "drop"))):
        kind = "drop" if herald["variant"].startswith("drop") else "herald"
        rate = herald["rate_per_s"]
        cost = herald.get("cpu_us_per_delivery_all_in")
        entry: dict[str, Any] = {"rate_per_s": rate}
        goals: dict[str, dict[str, Any]] = {}
        if raw:
            entry["over_raw"] = rate / raw["rate_per_s"]
            if cost and raw.get("cpu_us_per_delivery_all_in"):
                entry["cpu_raw_over_herald"] = raw["cpu_us_per_delivery_all_in"] / cost
            if not delay_ms:
                goals["over_raw"] = _goal(entry["over_raw"], GOALS[f"{kind}_over_raw"])
        if best_celery and leanest_celery:
            entry["over_celery"] = rate / best_celery["rate_per_s"]
            entry["celery_baseline"] = best_celery["variant"]
            entry["over_each_celery"] = {c["variant"]: rate / c["rate_per_s"] for c in celeries}
            if cost and leanest_celery.get("cpu_us_per_delivery_all_in"):
                entry["cpu_celery_over_herald"] = leanest_celery["cpu_us_per_delivery_all_in"] / cost
                entry["cpu_celery_baseline"] = leanest_celery["variant"]
            if not delay_ms:
                goals["over_celery"] = _goal(entry["over_celery"], GOALS[f"{kind}_over_celery"])
        if sequential:
            entry["over_sequential"] = rate / sequential["rate_per_s"]
            if kind == "drop" and delay_ms >= 200:
                goals["over_sequential"] = _goal(entry["over_sequential"], GOALS["slow_drop_over_sequential"])
        if kind == "drop" and delay_ms >= 200:
            goals["rate_per_s"] = _goal(rate, GOALS["slow_drop_per_s"])
        entry["goals"] = goals
        out[herald["variant"]] = entry
    return out


def representatives(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, its run with the median rate (the lower middle one of an even count).

    With ``--rounds N`` every variant runs N times, interleaved (raw, Herald, drop, Celery…, then
    again): the machine's speed drifts over minutes, and a median of interleaved runs compares
    like with like better than one run of each.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault(r["variant"], []).append(r)
    chosen = {}
    for variant, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["rate_per_s"])
        chosen[variant] = ordered[(len(ordered) - 1) // 2]
    return chosen


def _goal(value: float, goal: float) -> dict[str, Any]:
    return {"value": round(value, 3), "goal": goal, "met": value >= goal}


_RATIO_LINES = (("over_raw", "raw client"), ("over_celery", "celery per msg"), ("over_sequential", "sequential"))


def print_table(results: list[dict[str, Any]], table: dict[str, dict[str, Any]]) -> None:
    print()
    print(
        f"{'variant':<24} {'messages':>8} {'seconds':>8} {'deliveries/s':>12} {'CPU-s own':>9} {'Redis/PG':>8} "
        f"{'receiver':>8} {'µs CPU/dlv':>10} {'other load':>10}"
    )
    print("-" * 105)
    nan = float("nan")
    for r in results:
        print(
            f"{r['variant']:<24} {r['messages']:>8} {r['elapsed_s']:>8.2f} {r['rate_per_s']:>12,.0f} "
            f"{r.get('cpu_s', nan):>9.1f} {r.get('service_cpu_s', nan):>8.1f} {r.get('receiver_cpu_s', nan):>8.1f} "
            f"{r.get('cpu_us_per_delivery_all_in', nan):>10,.0f} {r.get('other_programs_cores', nan):>9.2f}c"
        )
    print(
        "CPU-s own: the variant's processes (Herald: API or watcher + scheduler + worker pool; Celery: worker\n"
        "pool + publisher); Redis/PG, receiver: those servers' CPU meanwhile; µs CPU/dlv: all of it per\n"
        "delivery; other load: cores used by unrelated programs meanwhile (near 0 for fair wall-clock numbers)."
    )
    if len(results) > len({r["variant"] for r in results}):  # some variant ran more than once
        print("ratios: each variant's median run of the rounds")
    for variant, entry in table.items():
        print()
        goals = entry["goals"]
        for key, what in _RATIO_LINES:
            if key not in entry:
                continue
            line = f"{variant} / {what:<15} = {entry[key]:7.2f}"
            if key in goals:
                line += f"  (goal ≥ {goals[key]['goal']:g}: {'met' if goals[key]['met'] else 'MISSED'})"
            if key == "over_raw" and "cpu_raw_over_herald" in entry:
                line += f"   CPU per delivery: raw / Herald = {entry['cpu_raw_over_herald']:.2f}"
            if key == "over_celery":
                line += f"  [baseline: the fastest of the sweep, {entry['celery_baseline']}]"
            print(line)
            if key == "over_celery" and "cpu_celery_over_herald" in entry:
                print(
                    f"{'':<{len(variant)}}   CPU per delivery: celery / Herald = "
                    f"{entry['cpu_celery_over_herald']:.2f} (leanest celery: {entry['cpu_celery_baseline']})"
                )
        if "rate_per_s" in goals:
            g = goals["rate_per_s"]
            print(
                f"{variant} rate = {g['value']:,.0f}/s  (goal ≥ {g['goal']:,.0f}/s: {'met' if g['met'] else 'MISSED'})"
            )


COLORS = {"raw": "#7f7f7f", "herald": "#1f77b4", "drop": "#2ca02c", "celery": "#d62728", "sequential": "#9467bd"}


def plot(runs: list[dict[str, Any]], table: dict[str, dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    """Left: delivered webhooks per second, the ratios in a box. Right: CPU per delivery.

    One bar per variant, its median run (what the ratios compare); with several rounds, every
    run is a dot on its variant's bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(representatives(runs).values())
    fig, (ax, ax_cpu) = plt.subplots(
        1, 2, figsize=(max(11, 2.2 * len(results)), 6), gridspec_kw={"width_ratios": [3, 2]}
    )
    labels = [
        r["label"]
        + (f"\n(other load {r['other_programs_cores']:.1f}c)" if r.get("other_programs_cores", 0) > 0.15 else "")
        for r in results
    ]
    bar_colors = [COLORS[r["variant"].split("-")[0]] for r in results]
    rates = [r["rate_per_s"] for r in results]
    bars = ax.bar(range(len(results)), rates, color=bar_colors)
    ax.bar_label(bars, labels=[f"{rate:,.0f}/s" for rate in rates], fontsize=8, padding=2)
    if len(runs) > len(results):
        for i, r in enumerate(results):
            each = [run["rate_per_s"] for run in runs if run["variant"] == r["variant"]]
            ax.scatter([i] * len(each), each, color="black", s=10, zorder=3)
    notes = []
    for variant, entry in table.items():
        parts = [variant + ":"]
        for key, what in _RATIO_LINES:
            if key in entry:
                goal = entry["goals"].get(key)
                parts.append(f"{entry[key]:.2f}x {what}" + (f" (goal ≥ {goal['goal']:g})" if goal else ""))
        if "rate_per_s" in entry["goals"]:
            parts.append(f"{entry['rate_per_s']:,.0f}/s (goal ≥ {entry['goals']['rate_per_s']['goal']:,.0f}/s)")
        notes.append("\n  ".join(parts))
    ax.text(
        0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )  # fmt: skip
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("delivered webhooks per second")
    ax.set_ylim(0, max(run["rate_per_s"] for run in runs) * 1.6)
    ax.set_title(
        f"{info['cpus_usable']} CPUs, {info['payload_bytes']} B payload, receiver delay "
        f"{info['receiver_delay_ms']:g} ms — {info['date']}"
        + (
            f"\nbars: each variant's median of {len(runs) // len(results)} interleaved rounds; dots: every run"
            if len(runs) > len(results)
            else ""
        ),
        fontsize=9,
    )
    costed = [r for r in results if r.get("cpu_us_per_delivery_all_in")]
    if costed:
        costs = [r["cpu_us_per_delivery_all_in"] for r in costed]
        cpu_bars = ax_cpu.barh(range(len(costed)), costs, color=[COLORS[r["variant"].split("-")[0]] for r in costed])
        ax_cpu.bar_label(cpu_bars, labels=[f"{c:,.0f} µs" for c in costs], fontsize=8, padding=2)
        ax_cpu.set_yticks(range(len(costed)), [r["variant"] for r in costed], fontsize=7)
        ax_cpu.invert_yaxis()
        ax_cpu.set_xlim(0, max(costs) * 1.3)
        ax_cpu.set_xlabel("CPU µs per delivery (own + Redis/PG + receiver)")
        ax_cpu.set_title("lower is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", "-n", type=int, default=20_000, help="N for raw, Herald and Celery (20000)")
    parser.add_argument(
        "--celery-messages", type=int, default=None, help="N per Celery configuration (default N/5: it is slow)"
    )
    parser.add_argument("--sequential-messages", type=int, default=None, help="N for the loop (default N/10)")
    parser.add_argument("--drop-messages", type=int, default=None, help="user ids in the drop file (default N)")
    parser.add_argument(
        "--drop-format",
        choices=["csv", "ids"],
        default="csv",
        help="csv: user_id,pad with the body padded to --payload-bytes like the other variants; ids: one id a line",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--report-name", default="webhooks", help="writes <out>/<name>.json and .png")
    parser.add_argument("--receiver-delay-ms", type=float, default=0.0, help="simulate a slow receiver")
    parser.add_argument("--payload-bytes", type=int, default=512, help="webhook body size (512)")
    parser.add_argument("--raw-processes", type=int, default=2)
    parser.add_argument("--raw-concurrency", type=int, default=256, help="in-flight requests per raw process")
    parser.add_argument("--databases", default="sqlite", help="Herald stores to run: sqlite,postgresql")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument(
        "--redis-dbs",
        default="0,0",
        help="DB indexes for Herald and the Celery baseline (tests/conftest.py cycles 1-15, so 0 by default; "
        "variants run one after another and the DB is flushed in between)",
    )
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="start a private redis-server for the run instead of --redis-url (its CPU is then only ours)",
    )
    parser.add_argument("--quiet-cores", type=float, default=0.15, help="wait until other programs use less CPU")
    parser.add_argument("--quiet-wait-s", type=float, default=10.0, help="at most this long, before each variant")
    parser.add_argument(
        "--herald-worker-concurrency",
        type=int,
        default=2,
        help="bulk worker processes (HERALD_WORKER__CONCURRENCY in --herald-env wins)",
    )
    parser.add_argument("--herald-senders", type=int, default=2, help="concurrent /v1/events/batch requests")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per /v1/events/batch request")
    parser.add_argument(
        "--herald-env",
        action="append",
        default=[],
        metavar="HERALD_X=V",
        help="a Herald setting for its processes (repeatable)",
    )
    parser.add_argument(
        "--celery-configs",
        default="post/8,post/16,session/16",
        help="Celery sweep: http/concurrency[/prefetch], http = post | session",
    )
    parser.add_argument(
        "--variants", default="raw,herald,celery,sequential", help="any of raw,herald,drop,celery,sequential"
    )
    parser.add_argument("--variant-timeout-s", type=float, default=150.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variants this many times, interleaved; ratios use each variant's median run",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="cpu",
        choices=["cpu", "wall"],
        help="py-spy the Herald batch-API processes into <out>/profiles/: cpu = running threads only, "
        "wall = idle threads too (lock waits, I/O waits)",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp folder (logs, SQLite files)")
    args = parser.parse_args()
    loopback(args.redis_url)
    args.out = args.out.resolve()
    return args


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    n = args.messages
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"raw", "herald", "drop", "celery", "sequential"}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}")
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("sqlite", "postgresql"):
            raise SystemExit(f"--databases: sqlite or postgresql, got {kind!r}")
    herald_db_index, celery_db_index = (int(i) for i in args.redis_dbs.split(","))
    # SIGTERM unwinds like Ctrl-C, so the cleanups below always run.
    signal.signal(signal.SIGTERM, _interrupt)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with contextlib.ExitStack() as cleanups:
        if not args.keep_temp:
            cleanups.callback(shutil.rmtree, tmp, ignore_errors=True)
        else:
            print(f"keeping {tmp}")
        cleanups.callback(procs.stop_all)
        try:
            if args.private_redis:
                server = start_redis(procs, tmp)
                herald_redis, celery_redis = server.claim(0), server.claim(1)
            else:
                server = RedisServer(args.redis_url, lambda i: claim_redis_db(args.redis_url, i))
                herald_redis = server.claim(herald_db_index)
                celery_redis = server.claim(celery_db_index)
                cleanups.callback(flush_redis_db, herald_redis, keep_marker=False)
                cleanups.callback(flush_redis_db, celery_redis, keep_marker=False)
            receiver = start_receiver(procs, args.receiver_delay_ms)
            pad, payload = payload_shape(args.payload_bytes)
            run = Run(args, receiver, procs, tmp, pad, payload, cleanups, server.base)
            info = {
                **machine_info(),
                "receiver_delay_ms": args.receiver_delay_ms,
                "payload_bytes": args.payload_bytes,
                "redis": "private redis-server" if args.private_redis else f"{args.redis_url} dbs {args.redis_dbs}",
            }
            print(
                f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}, N={n}, "
                f"payload {len(payload)} B, receiver {receiver.url} (delay {args.receiver_delay_ms:g} ms)"
            )

            cpu = CpuMeter(receiver.pid, *([server.pid] if server.pid else []))

            def attempt(what: str, fn: Callable[[], dict[str, Any]]) -> None:
                print(f"- {what} …", flush=True)
                before = cpu.wait_quiet(max_cores=args.quiet_cores, timeout_s=args.quiet_wait_s)
                if before > args.quiet_cores:
                    print(f"  warning: other programs use {before:.2f} cores; the numbers will be low", flush=True)
                first_log = len(procs.started)
                mark = cpu.start()
                try:
                    result = fn()
                except (TimeoutError, RuntimeError, OSError, requests.RequestException, redis.RedisError) as exc:
                    failures.append(f"{what}: {exc}")
                    print(f"  FAILED: {exc}", file=sys.stderr)
                    for name in procs.started[first_log:]:
                        print(f"  --- {name} log tail ---\n{procs.tail(name, 15)}", file=sys.stderr)
                    return
                result["service_cpu_s"] = result["redis_cpu_s"] + result.get("postgres_cpu_s", 0.0)
                # Over the whole attempt (start-up included), so approximate. A private Redis is
                # counted as ours by the meter already; a shared one's CPU is everybody's.
                servers_not_ours = result.get("postgres_cpu_s", 0.0) + (0.0 if server.pid else result["redis_cpu_s"])
                others = cpu.others_cores(mark, also_ours_s=servers_not_ours)
                result["other_programs_cores"] = round(others, 3)
                if result.get("cpu_s"):
                    result["deliveries_per_cpu_s"] = result["messages"] / (result["cpu_s"] + result["service_cpu_s"])
                    all_in_s = result["cpu_s"] + result["service_cpu_s"] + result["receiver_cpu_s"]
                    result["cpu_us_per_delivery_all_in"] = 1e6 * all_in_s / result["messages"]
                if result["other_programs_cores"] > args.quiet_cores:
                    print(f"  warning: other programs used {result['other_programs_cores']:.2f} cores meanwhile")
                results.append(result)
                extra = ""
                if "accepted_per_s" in result:
                    extra = f" (API accepted all in {result['accepted_s']:.2f}s"
                elif "ingested_s" in result:
                    extra = f" (file ingested {result['ingested_s']}s after the rename"
                if "receiver_requests" in result:
                    extra += (
                        f"; receiver saw {result['receiver_requests']} requests, "
                        f"{result['receiver_unique_ids']} distinct ids)"
                    )
                print(f"  {result['rate_per_s']:,.0f} deliveries/s over {result['elapsed_s']:.2f}s{extra}")

            for variant in [v for _ in range(args.rounds) for v in variants]:
                if variant == "raw":
                    attempt(
                        f"raw aiohttp client, {args.raw_processes} processes x {args.raw_concurrency} in flight",
                        lambda: run_raw(run, n),
                    )
                elif variant == "herald":
                    for kind in kinds:
                        attempt(
                            f"Herald end to end on {kind}, batch API",
                            functools.partial(run_herald, run, n, kind, herald_redis),
                        )
                elif variant == "drop":
                    dn = args.drop_messages or n
                    for kind in kinds:
                        attempt(
                            f"Herald drop of {dn:,} ids on {kind}, watched folder",
                            functools.partial(run_drop, run, dn, kind, herald_redis),
                        )
                elif variant == "celery":
                    for config in (c.strip() for c in args.celery_configs.split(",") if c.strip()):
                        http_mode, concurrency, *rest = config.split("/")
                        prefetch = int(rest[0]) if rest else 4
                        cn = args.celery_messages or max(200, n // 5)
                        attempt(
                            f"Celery task per message ({http_mode}, prefork -c {concurrency}, prefetch {prefetch})",
                            functools.partial(run_celery, run, cn, http_mode, int(concurrency), prefetch, celery_redis),
                        )
                elif variant == "sequential":
                    sn = args.sequential_messages or max(200, n // 10)
                    attempt(f"sequential loop, {sn} messages", functools.partial(run_sequential, run, sn))
        except KeyboardInterrupt:
            # Let the clean-ups finish even if Ctrl-C is pressed again.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("\ninterrupted; stopping processes and removing temp files", file=sys.stderr)
            return 130
    if not results:
        print("no variant completed", file=sys.stderr)
        return 1
    table = ratios(results, args.receiver_delay_ms)
    print_table(results, table)
    report = {
        "benchmark": "webhooks",
        "machine": info,
        "messages": n,
        "results": results,
        "rounds": args.rounds,
        # Each variant's median run (see ``representatives``): what the ratios compare.
        "representative": representatives(results),
        "rates_per_s": {v: [r["rate_per_s"] for r in results if r["variant"] == v] for v in representatives(results)},
        "ratios": table,
        "failures": failures,
        "command": command_line(),
    }
    json_path, png_path = args.out / f"{args.report_name}.json", args.out / f"{args.report_name}.png"
    write_json(json_path, report)
    plot(results, table, info, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
