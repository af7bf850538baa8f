"""Scheduled sends: memory per scheduled delivery (Herald vs Celery countdown), lateness, a burst.

    uv run python bench/scheduled.py [--scheduled 100000] [--late 10000 --late-span-s 60] [--burst 100000]

One run, real processes (``herald api``, ``herald scheduler``, ``herald worker --lanes
bulk,transactional --concurrency 2``; SQLite; Redis as in ``otp_latency.py``: a private
``redis-server`` unless ``--redis-url``), a loopback webhook receiver that timestamps receipt:

    memory    --scheduled events through POST /v1/events/batch with ``send_at`` an hour ahead:
              Redis ``used_memory`` and the worker's RSS (process group) before and after.
              Then the same N as Celery tasks with ``countdown=3600`` (the tiny Celery app below,
              on another Redis DB of the same server, a prefork worker of 2 that prefetches
              them): Redis and worker memory before, after publishing, after the prefetch.
    lateness  --late events with ``send_at`` spread evenly over --late-span-s seconds (starting
              --lead-s after intake); the receiver computes receipt - send_at from the event data.
    burst     --burst events all due in the same second: time from that second to the last
              receipt (and the lateness distribution of all of them).

Writes ``<out>/scheduled.json`` and ``<out>/scheduled.png``.

The Celery side is started as ``python -m celery -A scheduled worker`` from ``bench/``; the app is
defined here (``BENCH_CELERY_BROKER``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402  (after the sys.path line: celery imports this module from bench/)
    GOALS,
    celery_ping,
    command_line,
    common_args,
    create_tenant,
    flush_redis_db,
    group_rss,
    harness,
    herald_env,
    herald_settings,
    machine_info,
    machine_load,
    pct,
    redis_used_memory,
    sqlite_database,
    start_herald,
    start_redis,
    wait_until,
    write_json,
)
from otp_latency import LoopbackServer, create_endpoint, post_batches  # noqa: E402

PYTHON = sys.executable
COUNTDOWN_QUEUE = "bench-countdown"
GOAL_LATE_P99_S = GOALS["late_p99_s"]

app = Celery("bench_scheduled", broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/15"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=COUNTDOWN_QUEUE,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.reminder", ignore_result=True)  # type: ignore[untyped-decorator]
def reminder(data: dict[str, Any]) -> None:
    """What a countdown reminder would do an hour from now (never runs in the bench)."""


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def bodies_for(events: list[dict[str, Any]], size: int = 1000) -> list[bytes]:
    return [json.dumps({"events": events[s : s + size]}, separators=(",", ":")).encode()
            for s in range(0, len(events), size)]  # fmt: skip


def wait_stable(measure: Any, *, settle_s: float, timeout_s: float) -> int:
    """A memory reading once it stopped changing by more than 1% for ``settle_s`` (bounded)."""
    deadline = time.monotonic() + timeout_s
    last, since = measure(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = measure()
        if abs(now - last) > 0.01 * max(last, 1):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
    return int(measure())


def herald_memory(base: str, api_key: str, procs: Any, redis_url: str, n: int, hook_tag: str) -> dict[str, Any]:
    worker_pid = procs.running["worker-bulk"].pid
    disp_pid = procs.running["scheduler"].pid
    before = {"redis": redis_used_memory(redis_url), "worker_rss": group_rss(worker_pid),
              "dispatcher_rss": group_rss(disp_pid)}  # fmt: skip
    send_at = time.time() + 3600
    events = [{"type": "visit.reminder", "subject": f"visit:{i:07d}", "lane": "transactional", "send_at": iso(send_at),
               "schedule_key": f"visit:{i}:reminder", "data": {"n": i, "tag": hook_tag, "visit": {"id": i}}}
              for i in range(n)]  # fmt: skip
    # Two steps (N/10, then the rest) so the growth with N shows, not only its end point.
    steps, intake_s, done = [], 0.0, 0
    for upto in (max(1, n // 10), n):
        intake_s += post_batches(base, api_key, bodies_for(events[done:upto]), senders=2)
        done = upto
        time.sleep(3)  # a few dispatcher ticks
        steps.append({
            "scheduled": done,
            "redis": wait_stable(lambda: redis_used_memory(redis_url), settle_s=3, timeout_s=20),
            "worker_rss": group_rss(worker_pid),
            "dispatcher_rss": group_rss(disp_pid),
        })  # fmt: skip
    after = {k: v for k, v in steps[-1].items() if k != "scheduled"}
    import redis

    with contextlib.closing(redis.Redis.from_url(redis_url)) as c:
        keys = c.dbsize()
    return {
        "n": n,
        "intake_s": round(intake_s, 2),
        "intake_per_s": round(n / intake_s, 1),
        "before_bytes": before,
        "after_bytes": after,
        "redis_keys_after": keys,
        "steps": steps,
        "growth_bytes": {k: after[k] - before[k] for k in before},
        "bytes_per_scheduled": {k: round((after[k] - before[k]) / n, 2) for k in before},
    }


def celery_memory(procs: Any, celery_url: str, n: int) -> dict[str, Any]:
    import redis

    env = {**os.environ, "BENCH_CELERY_BROKER": celery_url}
    procs.start("celery-countdown", [PYTHON, "-m", "celery", "-A", "scheduled", "worker", "-Q", COUNTDOWN_QUEUE,
                                     "-c", "2", "-P", "prefork", "--without-gossip", "--without-mingle",
                                     "--without-heartbeat", "-l", "WARNING", "-n", "countdown@%h"],
                env=env, cwd=BENCH_DIR)  # fmt: skip
    wait_until(lambda: (procs.check_alive("celery-countdown"), celery_ping(celery_url))[1], timeout_s=60,
                 interval_s=0.3, what="the Celery countdown worker")  # fmt: skip
    pid = procs.running["celery-countdown"].pid
    time.sleep(1)
    before = {"redis": redis_used_memory(celery_url), "worker_rss": group_rss(pid)}
    publisher = Celery("bench-publisher", broker=celery_url, set_as_current=False)
    publisher.conf.update(task_serializer="json", task_default_queue=COUNTDOWN_QUEUE)
    start = time.perf_counter()
    with publisher.producer_or_acquire() as producer:
        for i in range(n):
            publisher.send_task("bench.reminder", args=[{"n": i, "tag": "celery", "visit": {"id": i}}],
                                countdown=3600, queue=COUNTDOWN_QUEUE, producer=producer)  # fmt: skip
    publish_s = time.perf_counter() - start
    publisher.close()
    after_publish = {"redis": redis_used_memory(celery_url), "worker_rss": group_rss(pid)}
    client = redis.Redis.from_url(celery_url)
    prefetched = False
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: client.llen(COUNTDOWN_QUEUE) == 0, timeout_s=180, interval_s=0.5,
                     what="the Celery worker to prefetch every countdown task")  # fmt: skip
        prefetched = True
    after = {
        "redis": wait_stable(lambda: redis_used_memory(celery_url), settle_s=3, timeout_s=30),
        "worker_rss": wait_stable(lambda: group_rss(pid), settle_s=3, timeout_s=30),
    }
    left_in_queue = client.llen(COUNTDOWN_QUEUE)
    unacked = client.hlen("unacked")
    client.close()
    procs.stop("celery-countdown")
    return {
        "n": n,
        "publish_s": round(publish_s, 2),
        "all_prefetched_by_worker": prefetched,
        "left_in_queue": left_in_queue,
        "unacked_in_redis": unacked,
        "before_bytes": before,
        "after_publish_bytes": after_publish,
        "after_prefetch_bytes": after,
        "growth_bytes": {k: after[k] - before[k] for k in before},
        "bytes_per_scheduled": {k: round((after[k] - before[k]) / n, 2) for k in before},
    }


def timed_sends(base: str, api_key: str, server: Any, *, tag: str, n: int, first_due: float,
                span_s: float) -> dict[str, Any]:  # fmt: skip
    step = span_s / n if n > 1 and span_s > 0 else 0.0
    events = []
    for i in range(n):
        due = first_due + i * step
        events.append({"type": "visit.reminder", "subject": f"{tag}:{i:07d}", "lane": "transactional",
                       "send_at": iso(due), "data": {"n": i, "tag": tag, "send_at_ts": due}})  # fmt: skip
    intake_s = post_batches(base, api_key, bodies_for(events), senders=2)
    accepted_at = time.time()
    return {"intake_s": round(intake_s, 2), "accepted_before_first_due_s": round(first_due - accepted_at, 2)}


def collect(server: Any, tag: str, n: int, timeout_s: float) -> list[float]:
    deadline = time.monotonic() + timeout_s
    values: list[float] = []
    while time.monotonic() < deadline:
        if server.stats()["tags"].get(tag, 0) >= n:
            break
        time.sleep(0.5)
    values = server.hook_records()["lateness"].get(tag, [])
    return list(values)


def lateness_summary(values: list[float], n: int) -> dict[str, Any]:
    return {
        "n": n,
        "received": len(values),
        "early": sum(1 for v in values if v < 0),
        "earliest_s": round(min(values), 4) if values else None,
        "p50_s": round(pct(values, 50) or 0, 4),
        "p90_s": round(pct(values, 90) or 0, 4),
        "p99_s": round(pct(values, 99) or 0, 4),
        "max_s": round(max(values), 4) if values else None,
    }


def run(args: argparse.Namespace, procs: Any, tmp: Path) -> int:
    info = machine_info()
    print(f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}; scheduled {args.scheduled:,}, "
          f"lateness {args.late:,} over {args.late_span_s:g}s, burst {args.burst:,}")  # fmt: skip
    claim = start_redis(procs, tmp, url=args.redis_url, first_db=args.redis_db).claim
    redis_url, celery_url = claim(0), claim(1)
    server = LoopbackServer(procs)
    database_url = sqlite_database(tmp)
    _, api_key, _ = create_tenant(database_url)
    env = herald_env(tmp, database_url=database_url, redis_url=redis_url, overrides=args.herald_env)
    base = start_herald(procs, env, workers=[("bulk", "bulk,transactional", 2)]).base
    create_endpoint(base, api_key, f"{server.base}/hook")
    # Warm-up: one immediate delivery so pools and imports are loaded before memory is measured.
    post_batches(base, api_key, bodies_for([{"type": "warm", "subject": "warm:1", "data": {}}]), senders=1)
    wait_until(lambda: server.stats()["count"] >= 1, timeout_s=30, what="the warm-up delivery")
    time.sleep(2)
    results: dict[str, Any] = {"machine_cores_busy_at_start": machine_load()}

    print(f"- Herald: {args.scheduled:,} scheduled an hour ahead …", flush=True)
    results["memory_herald"] = herald_memory(base, api_key, procs, redis_url, args.scheduled, "hour")
    print(f"  {json.dumps(results['memory_herald']['bytes_per_scheduled'])} bytes per scheduled delivery "
          f"(intake {results['memory_herald']['intake_s']}s)", flush=True)  # fmt: skip

    if args.celery:
        n_celery = args.celery_scheduled or args.scheduled
        print(f"- Celery countdown=3600: {n_celery:,} tasks …", flush=True)
        results["memory_celery_countdown"] = celery_memory(procs, celery_url, n_celery)
        print(f"  {json.dumps(results['memory_celery_countdown']['bytes_per_scheduled'])} bytes per scheduled task",
              flush=True)  # fmt: skip
        flush_redis_db(celery_url, keep_marker=False)

    print(f"- lateness: {args.late:,} due over {args.late_span_s:g}s …", flush=True)
    est = args.late / max(results["memory_herald"]["intake_per_s"], 1.0)
    first_due = time.time() + est * 1.5 + args.lead_s
    late_meta = timed_sends(base, api_key, server, tag="late", n=args.late, first_due=first_due,
                            span_s=args.late_span_s)  # fmt: skip
    late = collect(server, "late", args.late, timeout_s=(first_due - time.time()) + args.late_span_s + 60)
    results["lateness"] = {**late_meta, "span_s": args.late_span_s, **lateness_summary(late, args.late)}
    print(f"  {json.dumps(results['lateness'])}", flush=True)

    if args.burst:
        print(f"- burst: {args.burst:,} due in the same second …", flush=True)
        est = args.burst / max(results["memory_herald"]["intake_per_s"], 1.0)
        due = float(int(time.time() + est * 1.5 + args.lead_s))
        meta = timed_sends(base, api_key, server, tag="burst", n=args.burst, first_due=due, span_s=0.0)
        burst = collect(server, "burst", args.burst, timeout_s=(due - time.time()) + args.burst_timeout_s)
        summary = lateness_summary(burst, args.burst)
        summary["all_delivered_after_s"] = summary["max_s"] if len(burst) >= args.burst else None
        summary["deliveries_per_s"] = round(len(burst) / summary["max_s"], 1) if burst and summary["max_s"] else None
        results["burst"] = {**meta, **summary}
        print(f"  {json.dumps(results['burst'])}", flush=True)

    final = server.hook_records()
    results["receiver"] = {"count": final["count"], "unique_ids": final["unique_ids"]}
    results["lateness_values"] = {k: [round(v, 4) for v in final["lateness"].get(k, [])] for k in ("late", "burst")}
    goals = {
        "herald_no_memory_growth": {
            "rule": "total growth below the noise floor (Redis < 1 MiB, worker RSS < 4 MiB), i.e. only database rows",
            "met": results["memory_herald"]["growth_bytes"]["redis"] < 2**20
            and results["memory_herald"]["growth_bytes"]["worker_rss"] < 4 * 2**20,
        },
        "lateness_p99_le_1s_never_early": {
            "met": results["lateness"]["received"] == args.late
            and results["lateness"]["early"] == 0
            and results["lateness"]["p99_s"] <= GOAL_LATE_P99_S,
        },
    }
    if args.burst:
        goals["burst_never_early"] = {"met": results["burst"]["early"] == 0}
    report = {
        "benchmark": "scheduled",
        "machine": info,
        "command": command_line(),
        "parameters": {
            "scheduled": args.scheduled,
            "celery_scheduled": (args.celery_scheduled or args.scheduled) if args.celery else 0,
            "late": args.late,
            "late_span_s": args.late_span_s,
            "burst": args.burst,
            "redis": "private redis-server" if not args.redis_url else f"{args.redis_url} db {args.redis_db}",
            "database": "sqlite",
            "processes": ["api", "scheduler", "worker --lanes bulk,transactional --concurrency 2"],
            "settings": herald_settings(env),
        },
        "results": results,
        "goals": goals,
    }
    write_json(args.out / "scheduled.json", report)
    plot(report, args.out / "scheduled.png")
    for name, goal in goals.items():
        print(f"goal {name}: {'MET' if goal['met'] else 'MISSED'}")
    print(f"wrote {args.out / 'scheduled.json'} and {args.out / 'scheduled.png'}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    panels = 3 if "burst" in res else 2
    fig, axes = plt.subplots(1, panels, figsize=(16 if panels == 3 else 11, 5))
    ax = axes[0]
    labels, redis_b, worker_b = [], [], []
    sides = (("memory_herald", "Herald\n(send_at, DB rows)"), ("memory_celery_countdown", "Celery\ncountdown"))
    for key, label in sides:
        if key in res:
            labels.append(f"{label}\nN = {res[key]['n']:,}")
            redis_b.append(res[key]["bytes_per_scheduled"]["redis"])
            worker_b.append(res[key]["bytes_per_scheduled"]["worker_rss"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], redis_b, width=0.4, label="Redis used_memory")
    ax.bar([i + 0.2 for i in x], worker_b, width=0.4, label="worker RSS")
    for i in x:
        ax.text(i - 0.2, redis_b[i], f"{redis_b[i]:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, worker_b[i], f"{worker_b[i]:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("bytes per scheduled send (growth / N)")
    ax.set_title("memory per send scheduled an hour ahead")
    ax.legend(fontsize=8)
    for ax, key, title in list(zip(axes[1:], ("late", "burst"), ("lateness", "burst"), strict=False)):
        values = sorted(res["lateness_values"].get(key, []))
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.axvline(0, color="black", linewidth=0.8)
        if key == "late":
            ax.axvline(GOAL_LATE_P99_S, color="grey", linestyle="--", label="goal p99 ≤ 1 s")
            r = res["lateness"]
            ax.set_title(f"{title}: {r['n']:,} over {r['span_s']:g}s — p50 {r['p50_s']:.2f}s, p99 {r['p99_s']:.2f}s, "
                         f"early {r['early']}", fontsize=9)  # fmt: skip
            ax.legend(fontsize=8)
        elif "burst" in res:
            r = res["burst"]
            ax.set_title(f"burst: {r['n']:,} due in one second — all in {r['max_s']}s", fontsize=9)
        ax.set_xlabel("receipt - send_at (s)")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"Herald scheduled sends (SQLite, {m['cpus_usable']} CPUs, {m['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduled", type=int, default=100_000, help="N scheduled an hour ahead (memory)")
    parser.add_argument("--no-celery", dest="celery", action="store_false", help="skip the Celery countdown side")
    parser.add_argument("--celery-scheduled", type=int, default=None,
                        help="N Celery countdown tasks (default --scheduled; each one costs ~10 kB of worker memory, "
                             "so 1,000,000 would need ~10 GB: compare bytes per task at a smaller N)")  # fmt: skip
    parser.add_argument("--late", type=int, default=10_000, help="sends for the lateness distribution")
    parser.add_argument("--late-span-s", type=float, default=60.0)
    parser.add_argument("--lead-s", type=float, default=10.0, help="margin between intake and the first due time")
    parser.add_argument("--burst", type=int, default=100_000, help="sends due in the same second (0: skip)")
    parser.add_argument("--burst-timeout-s", type=float, default=600.0)
    common_args(parser)
    return harness(run, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
