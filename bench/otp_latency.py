"""Lane isolation: OTP and transactional-webhook latency, at idle and while a bulk backlog drains.

    uv run python bench/otp_latency.py [--otps 200] [--rate 20] [--backlog 100000] [--out bench/results]

One run, real processes on a fresh SQLite file (``--database postgresql``: a fresh PostgreSQL
database) and an empty Redis: ``herald api``, ``herald
scheduler`` (the dispatcher), ``herald watch DIR`` and one worker per lane, as DESIGN.md §1.5 lays
them out (``--worker NAME=LANES:CONCURRENCY``; default, as ``herald up`` runs them: ``otp=otp:2``,
``transactional=transactional:2``, ``bulk=bulk:2``). A loopback aiohttp process (this file, ``--serve``) is the
JSON SMS provider and the webhook receiver and timestamps every message it receives.

    idle     --otps OTP requests (``POST /v1/otp``, SMS) paced at --rate per second over
             --recipients recipients and, interleaved over the same window, transactional events
             at --tx-rate per second (``POST /v1/events``, lane ``transactional``, their own endpoint)
    backlog  a bulk backlog of --backlog deliveries, then the same probes while it drains:
             ``--backlog-source drop`` (default): a file of that many user ids renamed into the
             watched folder (issue 5 point 7). Two phases: ``ingesting``, the probes start once the
             drop's first deliveries arrive, while the ingester is still writing its chunks and
             the first ones drain; ``backlog``, the probes start once the whole file is ingested
             and run while the backlog it made drains.
             ``--backlog-source api``: events through POST /v1/events/batch (lane bulk, 1,000 per
             request, 2 at a time); the probes (``backlog``) start once all are accepted.

Latency = time the request was sent (driver clock) → time the SMS provider / receiver got the
message (same machine clock). The goal (issue 3): OTP p99 ≤ 250 ms while a backlog of bulk
deliveries drains, judged on the ``backlog`` phase; the ``ingesting`` phase is reported beside it
(no goal: it also measures the ingester's writes). Each phase says whether the backlog was still
draining when its last probe arrived. Writes
``<out>/otp_latency.json`` and ``<out>/otp_latency.png``.

Redis: by default a private ``redis-server`` on a free loopback port (see ``common.start_redis``);
``--redis-url redis://127.0.0.1:6379 --redis-db N`` uses a shared server instead. The loopback
server and ``post_batches`` are also used by ``scheduled.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402  (after the sys.path line: celery imports this module from bench/)
    GOALS,
    PYTHON,
    Processes,
    command_line,
    common_args,
    create_tenant,
    fresh_database,
    harness,
    herald_env,
    herald_settings,
    machine_info,
    machine_load,
    read_line,
    start_herald,
    start_redis,
    summary_ms,
    wait_until,
    write_ids_file,
    write_json,
)

GOAL_P99_MS = GOALS["otp_p99_ms"]
DEFAULT_WORKERS = ["otp=otp:2", "transactional=transactional:2", "bulk=bulk:2"]  # as `herald up` runs them


# ------------------------------------------------------------------ the loopback servers (--serve)


def serve(port: int) -> None:
    """The SMS provider and webhook receiver in one aiohttp process; prints ``READY <port>``.

    ``POST /sms``  generic JSON provider: records ``reference`` (the delivery id) → receipt time.
    ``POST /hook`` webhook receiver: counts; when the event data has ``send_at_ts`` and ``tag``,
                   records receipt - send_at per tag (lateness).
    ``POST /tx``   a second webhook receiver (transactional probes): records receipt - ``data.sent_ts``
                   per ``data.tag``.
    ``GET /stats`` counts; ``GET /sms/records``, ``GET /hook/records`` the recorded times.
    """
    import asyncio

    from aiohttp import web

    sms: dict[str, float] = {}
    hook: dict[str, Any] = {"count": 0, "first": None, "last": None}
    ids: set[str] = set()
    lateness: dict[str, list[float]] = {}
    tx: dict[str, list[float]] = {}

    async def on_sms(request: web.Request) -> web.Response:
        now = time.time()
        body = await request.json()
        sms.setdefault(str(body.get("reference")), now)
        return web.json_response({"id": f"msg-{len(sms)}"})

    async def on_hook(request: web.Request) -> web.Response:
        now = time.time()
        body = await request.read()
        hook["count"] += 1
        hook["first"] = hook["first"] or now
        hook["last"] = now
        wid = request.headers.get("webhook-id")
        if wid:
            ids.add(wid)
        if b'"send_at_ts"' in body:
            data = json.loads(body).get("data", {})
            lateness.setdefault(str(data.get("tag")), []).append(now - float(data["send_at_ts"]))
        return web.Response(text="ok")

    async def on_tx(request: web.Request) -> web.Response:
        now = time.time()
        data = json.loads(await request.read()).get("data", {})
        tx.setdefault(str(data.get("tag")), []).append(now - float(data.get("sent_ts", now)))
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        tags = {k: len(v) for k, v in lateness.items()}
        return web.json_response(
            {**hook, "unique_ids": len(ids), "sms": len(sms), "tags": tags, "tx": {k: len(v) for k, v in tx.items()}}
        )

    async def sms_records(_: web.Request) -> web.Response:
        return web.json_response(sms)

    async def hook_records(_: web.Request) -> web.Response:
        return web.json_response({**hook, "unique_ids": len(ids), "lateness": lateness, "tx": tx})

    async def main() -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/sms", on_sms)
        app.router.add_post("/hook", on_hook)
        app.router.add_post("/tx", on_tx)
        app.router.add_get("/stats", stats)
        app.router.add_get("/sms/records", sms_records)
        app.router.add_get("/hook/records", hook_records)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"READY {runner.addresses[0][1]}", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# ------------------------------------------------------------------ shared helpers (also for scheduled.py)


class LoopbackServer:
    def __init__(self, procs: Processes) -> None:
        import requests

        proc = procs.start("servers", [PYTHON, str(Path(__file__).resolve()), "--serve"], pipes=True)
        port = int(read_line(proc, timeout_s=20, what="the loopback servers").split()[1])
        self.base = f"http://127.0.0.1:{port}"
        self.pid = proc.pid
        self.http = requests.Session()

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get(f"{self.base}/stats", timeout=10).json())

    def bulk_count(self) -> int:
        return int(self.stats()["count"])

    def sms_records(self) -> dict[str, float]:
        return dict(self.http.get(f"{self.base}/sms/records", timeout=30).json())

    def hook_records(self) -> dict[str, Any]:
        return dict(self.http.get(f"{self.base}/hook/records", timeout=60).json())


def post_batches(base: str, api_key: str, bodies: list[bytes], senders: int) -> float:
    """POST every body to /v1/events/batch, ``senders`` at a time; seconds until all were accepted."""
    import requests

    local = threading.local()
    headers = {"Authorization": f"Bearer {api_key}", "content-type": "application/json"}

    def post(body: bytes) -> None:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        answer = local.http.post(f"{base}/v1/events/batch", data=body, headers=headers, timeout=120)
        if answer.status_code != 202:
            raise RuntimeError(f"batch refused: {answer.status_code} {answer.text[:300]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=senders) as pool:
        list(pool.map(post, bodies))
    return time.perf_counter() - start


def create_endpoint(base: str, api_key: str, url: str) -> str:
    import requests

    answer = requests.post(f"{base}/v1/endpoints", json={"url": url}, timeout=10,
                           headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
    if answer.status_code != 201:
        raise RuntimeError(f"creating the endpoint failed: {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["id"])


def parse_workers(items: list[str]) -> list[tuple[str, str, int]]:
    """``NAME=LANES:CONCURRENCY`` items (``bulk=bulk,transactional:2``) → ``(name, lanes, c)``."""
    workers = []
    for item in items:
        name, sep, rest = item.partition("=")
        lanes, sep2, concurrency = rest.rpartition(":")
        if not (sep and sep2 and name and lanes and concurrency.isdigit()):
            raise SystemExit(f"--worker: expected NAME=LANES:CONCURRENCY, got {item!r}")
        workers.append((name, lanes, int(concurrency)))
    return workers


# ------------------------------------------------------------------ the probes


class Probes:
    """Paced OTP requests and transactional events; their latencies to the loopback server."""

    def __init__(self, base: str, api_key: str, server: LoopbackServer, tx_endpoint: str, recipients: int) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.server = server
        self.tx_endpoint = tx_endpoint
        self.recipients = recipients
        self.local = threading.local()

    def _http(self) -> Any:
        import requests

        if not hasattr(self.local, "http"):
            self.local.http = requests.Session()
        return self.local.http

    def _otp(self, i: int) -> dict[str, Any]:
        body = {"recipient": f"otp-{i % self.recipients}", "channel": "sms", "purpose": "login"}
        sent = time.time()
        answer = self._http().post(f"{self.base}/v1/otp", json=body, headers=self.headers, timeout=30)
        api_s = time.time() - sent
        delivery = answer.json().get("delivery_id") if answer.status_code == 202 else None
        return {"sent": sent, "api_s": api_s, "status": answer.status_code, "delivery_id": delivery}

    def _tx(self, i: int, tag: str) -> dict[str, Any]:
        sent = time.time()
        body = {"type": "ticket.status_changed", "subject": f"ticket:{i}", "lane": "transactional",
                "endpoint_ids": [self.tx_endpoint], "data": {"tag": tag, "sent_ts": sent, "n": i}}  # fmt: skip
        answer = self._http().post(f"{self.base}/v1/events", json=body, headers=self.headers, timeout=30)
        return {"sent": sent, "api_s": time.time() - sent, "status": answer.status_code}

    def run(self, *, n: int, rate: float, tx_rate: float, tag: str, timeout_s: float) -> dict[str, Any]:
        """``n`` OTPs paced at ``rate`` per second and, over the same window, transactional events
        at ``tx_rate`` per second (none if 0)."""
        otp_futures, tx_futures = [], []
        start = time.time() + 0.1
        m = round(n * tx_rate / rate)
        schedule = sorted([(i / rate, 0, i) for i in range(n)] + [(j / tx_rate, 1, j) for j in range(m)])
        with ThreadPoolExecutor(max_workers=32) as pool:
            for at, kind, i in schedule:
                delay = start + at - time.time()
                if delay > 0:
                    time.sleep(delay)
                if kind == 0:
                    otp_futures.append(pool.submit(self._otp, i))
                else:
                    tx_futures.append(pool.submit(self._tx, i, tag))
            otps = [f.result() for f in otp_futures]
            txs = [f.result() for f in tx_futures]
        wanted = {r["delivery_id"] for r in otps if r["delivery_id"]}
        tx_wanted = sum(1 for r in txs if r["status"] == 202)
        deadline = time.monotonic() + timeout_s
        records: dict[str, float] = {}
        while time.monotonic() < deadline:
            records = self.server.sms_records()
            if wanted <= records.keys() and self.server.stats()["tx"].get(tag, 0) >= tx_wanted:
                break
            time.sleep(0.2)
        latencies, points = [], []
        for r in otps:
            got = records.get(r["delivery_id"] or "")
            if got is not None:
                latencies.append(got - r["sent"])
                points.append((r["sent"], got - r["sent"]))
        tx_latencies = list(self.server.hook_records()["tx"].get(tag, []))
        ended = max((p[0] + p[1] for p in points), default=time.time())
        if tx_latencies:
            ended = max(ended, max(r["sent"] for r in txs) + max(tx_latencies))
        return {
            "otp": {
                "requests": n,
                "rate_per_s": rate,
                "recipients": self.recipients,
                "received": len(latencies),
                "not_received": len(wanted) - len(latencies),
                "http_errors": _errors(otps),
                "latency": summary_ms(latencies),
                "api_response": summary_ms([r["api_s"] for r in otps]),
                "points": [(round(t - start, 3), round(lat * 1000, 2)) for t, lat in points],
            },
            "transactional": {
                "requests": len(txs),
                "rate_per_s": tx_rate,
                "received": len(tx_latencies),
                "not_received": tx_wanted - len(tx_latencies),
                "http_errors": _errors(txs),
                "latency": summary_ms(tx_latencies),
                "api_response": summary_ms([r["api_s"] for r in txs]),
                "latencies_ms": [round(v * 1000, 2) for v in tx_latencies],
            }
            if m
            else None,
            "started": start,
            "ended": ended,
        }


def _errors(answers: list[dict[str, Any]]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for r in answers:
        if r["status"] != 202:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return errors


# ------------------------------------------------------------------ the benchmark


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    with fresh_database(tmp, args.database, postgres_url=args.postgres_url) as (database_url, _):
        return _run(args, procs, tmp, database_url)


def _run(args: argparse.Namespace, procs: Processes, tmp: Path, database_url: str) -> int:
    import requests

    info = machine_info()
    print(f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}; "
          f"{args.otps} OTPs at {args.rate}/s, backlog {args.backlog:,} bulk deliveries "
          f"({args.backlog_source})")  # fmt: skip
    redis_url = start_redis(procs, tmp, url=args.redis_url, first_db=args.redis_db).claim(0)
    server = LoopbackServer(procs)
    drops = tmp / "drops"
    drops.mkdir()
    _, api_key, bulk_endpoint = create_tenant(database_url, endpoint_url=f"{server.base}/hook")
    # Written before anything starts, so writing it is not part of the load.
    staged = drops / f"bulk-{args.backlog}.txt.part"
    if args.backlog_source == "drop":
        write_ids_file(staged, args.backlog, prefix="bulk-")
    warm = drops / "warm-up.txt.part"
    write_ids_file(warm, 20, prefix="warm-")
    env = herald_env(tmp, database_url=database_url, redis_url=redis_url, extra={
        "HERALD_SMS__PRIMARY__KIND": "json",
        "HERALD_SMS__PRIMARY__URL": f"{server.base}/sms",
        "HERALD_OTP__SENDS_PER_WINDOW": "1000000",
        "HERALD_INGEST__TENANT": "bench",
        "HERALD_INGEST__ENDPOINT_ID": bulk_endpoint,
    }, overrides=args.herald_env)  # fmt: skip
    workers = parse_workers(args.worker or DEFAULT_WORKERS)
    herald = start_herald(procs, env, workers=workers, watch_dir=drops)
    base = herald.base
    tx_endpoint = create_endpoint(base, api_key, f"{server.base}/tx")
    headers = {"Authorization": f"Bearer {api_key}"}
    for i in range(args.recipients):
        answer = requests.put(f"{base}/v1/recipients/otp-{i}", json={"phone": f"+1555{i:07d}"}, headers=headers,
                              timeout=10)  # fmt: skip
        if answer.status_code not in (200, 201):
            raise RuntimeError(f"recipient refused: {answer.status_code} {answer.text[:300]}")
    # Warm-up (imports, connection pools; the drop proves the watcher is watching), not measured.
    os.replace(warm, warm.with_suffix(""))

    def bulk_reached(count: int) -> bool:
        procs.check_alive(*herald.names)
        return server.bulk_count() >= count

    wait_until(lambda: bulk_reached(20), timeout_s=60, what="the warm-up drop")
    probes = Probes(base, api_key, server, tx_endpoint, args.recipients)
    probes.run(n=5, rate=5, tx_rate=5 if args.tx_rate else 0, tag="warm-up", timeout_s=30)
    warm_count = server.bulk_count()

    print("- idle …", flush=True)
    load_idle = machine_load()
    idle = probes.run(n=args.otps, rate=args.rate, tx_rate=args.tx_rate, tag="idle", timeout_s=60)
    _say(idle)

    intake_s = None
    ingesting: dict[str, Any] | None = None
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        http = requests.Session()
        while not stop.is_set():
            with contextlib.suppress(requests.RequestException):
                timeline.append((time.time(), int(http.get(f"{server.base}/stats", timeout=5).json()["count"])))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    if args.backlog_source == "drop":
        print(f"- dropping a file of {args.backlog:,} user ids into the watched folder …", flush=True)
        dropped_at = time.time()
        os.replace(staged, drops / staged.stem)
        start_at = warm_count + min(args.start_after, args.backlog // 10)
        wait_until(lambda: bulk_reached(start_at), timeout_s=300, interval_s=0.1, what="the drop's first deliveries")
        print(f"  first {start_at - warm_count:,} delivered {time.time() - dropped_at:.1f}s after the rename",
              flush=True)  # fmt: skip
        sampler.start()
        print("- while the drop is ingested and drains …", flush=True)
        ingesting = phase(probes, server, args, tag="ingesting", warm_count=warm_count)
        _say(ingesting)
        print("- waiting for the ingester to finish the file …", flush=True)
        intake_s = wait_ingested(base, api_key, staged.stem, since=dropped_at)
        print(f"  ingested {intake_s:.1f}s after the rename", flush=True)
    else:
        print(f"- creating a backlog of {args.backlog:,} bulk events through the batch API …", flush=True)
        bodies = [
            json.dumps({"events": [{"type": "bench.bulk", "subject": f"bulk:{i:07d}", "data": {"n": i}, "lane": "bulk",
                                    "endpoint_ids": [bulk_endpoint]}
                                   for i in range(s, min(s + 1000, args.backlog))]}, separators=(",", ":")).encode()
            for s in range(0, args.backlog, 1000)
        ]  # fmt: skip
        dropped_at = time.time()
        intake_s = post_batches(base, api_key, bodies, senders=2)
        print(f"  accepted in {intake_s:.1f}s", flush=True)
        sampler.start()
    print(f"- while the backlog drains ({server.bulk_count() - warm_count:,} of {args.backlog:,} delivered so far) …",
          flush=True)  # fmt: skip
    busy = phase(probes, server, args, tag="busy", warm_count=warm_count)
    busy_load = machine_load(0.5)
    _say(busy)

    drained_after_s = None
    if args.drain_timeout_s > 0 and busy["bulk_delivered_at_end"] < args.backlog:
        print("- waiting for the backlog to drain …", flush=True)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: server.bulk_count() - warm_count >= args.backlog, timeout_s=args.drain_timeout_s,
                       interval_s=0.5, what="the backlog")  # fmt: skip
    stop.set()
    sampler.join(5)
    final = server.stats()
    if final["count"] - warm_count >= args.backlog and final["last"]:
        drained_after_s = final["last"] - dropped_at
    for p in (ingesting, busy):
        if p is not None:
            window = [(t, c) for t, c in timeline if p["started"] <= t <= p["ended"]]
            p["bulk_deliveries_per_s"] = None
            if len(window) >= 2:
                p["bulk_deliveries_per_s"] = round(
                    (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-6), 1
                )
    draining_throughout = busy["draining_throughout"]
    bulk_rate = busy["bulk_deliveries_per_s"]
    otp_busy = busy["otp"]
    p99 = otp_busy["latency"].get("p99_ms")
    goal_met = bool(p99 is not None and p99 <= GOAL_P99_MS and draining_throughout and otp_busy["not_received"] == 0)
    report = {
        "benchmark": "otp_latency",
        "machine": info,
        "command": command_line(),
        "parameters": {
            "otps": args.otps,
            "rate_per_s": args.rate,
            "recipients": args.recipients,
            "transactional_rate_per_s": args.tx_rate,
            "backlog": args.backlog,
            "backlog_source": args.backlog_source,
            "redis": "private redis-server" if not args.redis_url else f"{args.redis_url} db {args.redis_db}",
            "database": args.database,
            "processes": herald.commands,
            "settings": herald_settings(env),
        },
        "results": {
            "otp": {"idle": idle["otp"], "backlog": otp_busy, **({"ingesting": ingesting["otp"]} if ingesting else {})},
            "transactional": {
                "idle": idle["transactional"],
                "backlog": busy["transactional"],
                **({"ingesting": ingesting["transactional"]} if ingesting else {}),
            },
            "idle_machine_cores_busy": load_idle,
            "after_backlog_machine_cores_busy": busy_load,
            "backlog_intake_s": round(intake_s, 2) if intake_s is not None else None,
            "backlog_delivered_when_probes_started": busy["bulk_delivered_at_start"],
            "backlog_delivered_when_probes_done": busy["bulk_delivered_at_end"],
            "backlog_draining_throughout": draining_throughout,
            "bulk_deliveries_per_s_during_probes": bulk_rate,
            "ingesting": {
                k: ingesting[k]
                for k in (
                    "bulk_delivered_at_start",
                    "bulk_delivered_at_end",
                    "draining_throughout",
                    "bulk_deliveries_per_s",
                )
            }
            if ingesting
            else None,
            "backlog_drained_after_s": round(drained_after_s, 1) if drained_after_s else None,
            "backlog_final_count": final["count"] - warm_count,
            "backlog_unique_ids": final["unique_ids"] - warm_count,
            "bulk_timeline": [(round(t - busy["started"], 2), c - warm_count) for t, c in timeline],
        },
        "goal": {"p99_ms_during_backlog_max": GOAL_P99_MS, "met": goal_met},
    }
    write_json(args.out / "otp_latency.json", report)
    plot(report, args.out / "otp_latency.png")
    drained = "" if draining_throughout else "; the backlog had drained before the probes ended"
    print(f"goal OTP p99 ≤ {GOAL_P99_MS:g} ms while the backlog drains: {'MET' if goal_met else 'MISSED'} "
          f"(p99 {p99} ms{drained})")  # fmt: skip
    print(f"wrote {args.out / 'otp_latency.json'} and {args.out / 'otp_latency.png'}")
    return 0


def phase(probes: Probes, server: LoopbackServer, args: argparse.Namespace, *, tag: str,
          warm_count: int) -> dict[str, Any]:  # fmt: skip
    """One round of probes, with how far the bulk backlog got meanwhile and whether it was still
    draining when the last probe arrived."""
    at_start = server.bulk_count() - warm_count
    result = probes.run(n=args.otps, rate=args.rate, tx_rate=args.tx_rate, tag=tag, timeout_s=120)
    at_end = server.bulk_count() - warm_count
    result.update(bulk_delivered_at_start=at_start, bulk_delivered_at_end=at_end,
                  draining_throughout=at_end < args.backlog)  # fmt: skip
    return result


def wait_ingested(base: str, api_key: str, name: str, *, since: float) -> float:
    """Seconds from ``since`` until ``GET /v1/drops`` shows the drop called ``name`` ingested."""
    import requests

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"
    found: dict[str, Any] = {}

    def ingested() -> bool:
        page = http.get(f"{base}/v1/drops", params={"limit": 10}, timeout=30).json()["data"]
        found.update(next((d for d in page if d["name"] == name and d["ingested_at"]), {}))
        return bool(found)

    wait_until(ingested, timeout_s=600, interval_s=1.0, what=f"the ingestion of {name}")
    return time.time() - since


def _say(phase: dict[str, Any]) -> None:
    o = phase["otp"]
    line = f"  OTP p50 {o['latency'].get('p50_ms')} ms, p99 {o['latency'].get('p99_ms')} ms "
    line += f"({o['received']}/{o['requests']})"
    t = phase["transactional"]
    if t:
        line += (f"; transactional p50 {t['latency'].get('p50_ms')} ms, p99 {t['latency'].get('p99_ms')} ms "
                 f"({t['received']}/{t['requests']})")  # fmt: skip
    print(line, flush=True)
    if "bulk_delivered_at_start" in phase:
        print(f"  bulk delivered {phase['bulk_delivered_at_start']:,} → {phase['bulk_delivered_at_end']:,} meanwhile",
              flush=True)  # fmt: skip


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for key, colour in (("idle", "tab:green"), ("ingesting", "tab:orange"), ("backlog", "tab:red")):
        if key not in res["otp"]:
            continue
        values = sorted(lat for _, lat in res["otp"][key]["points"])
        if values:
            lat = res["otp"][key]["latency"]
            label = f"OTP {key}: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
            left.plot(values, [(i + 1) / len(values) for i in range(len(values))], color=colour, label=label)
        tx = res["transactional"][key]
        if tx and tx["latency"].get("n"):
            lat, values = tx["latency"], sorted(tx["latencies_ms"])
            left.plot(values, [(i + 1) / len(values) for i in range(len(values))], "--", color=colour,
                      label=f"transactional {key}: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms")  # fmt: skip
    left.axvline(GOAL_P99_MS, color="grey", linestyle="--", label=f"goal OTP p99 ≤ {GOAL_P99_MS:g} ms")
    left.set_xscale("log")
    left.set_xlabel("latency, request sent → SMS provider / receiver got it (ms)")
    left.set_ylabel("fraction")
    left.legend(loc="lower right", fontsize=7)
    left.grid(alpha=0.3)
    pts = res["otp"]["backlog"]["points"]
    right.scatter([t for t, _ in pts], [lat for _, lat in pts], s=8, color="tab:red", label="OTP latency (ms)")
    right.axhline(GOAL_P99_MS, color="grey", linestyle="--")
    right.set_xlabel("seconds since the first probe of the backlog run")
    right.set_ylabel("OTP latency (ms)")
    twin = right.twinx()
    tl = res["bulk_timeline"]
    twin.plot([t for t, _ in tl], [c for _, c in tl], color="tab:blue", label="bulk webhooks delivered")
    twin.axhline(report["parameters"]["backlog"], color="tab:blue", linestyle=":", alpha=0.5)
    twin.set_ylabel("bulk webhooks delivered (receiver count)")
    right.set_title(f"while {report['parameters']['backlog']:,} bulk deliveries drain "
                    f"({report['parameters']['backlog_source']})", fontsize=9)  # fmt: skip
    m = report["machine"]
    fig.suptitle(f"Herald lane isolation ({report['parameters']['database']}, {m['cpus_usable']} CPUs, {m['date']}): "
                 f"OTP goal {'MET' if report['goal']['met'] else 'MISSED'}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--otps", type=int, default=200, help="OTP requests per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="OTP requests per second")
    parser.add_argument("--recipients", type=int, default=20)
    parser.add_argument("--tx-rate", type=float, default=10.0,
                        help="transactional events per second over the same window (0: OTPs only)")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=100_000, help="bulk deliveries (issue 5 names 1,000,000)")
    parser.add_argument("--backlog-source", choices=["drop", "api"], default="drop")
    parser.add_argument("--start-after", type=int, default=1000,
                        help="drop: start the probes once this many (at most backlog/10) were delivered")  # fmt: skip
    parser.add_argument("--worker", action="append", default=[], metavar="NAME=LANES:C",
                        help=f"a Herald worker (repeatable; default {' '.join(DEFAULT_WORKERS)})")  # fmt: skip
    parser.add_argument("--drain-timeout-s", type=float, default=300.0, help="0: do not wait for the drain")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="server for --database postgresql (a fresh database per run, dropped after)")  # fmt: skip
    common_args(parser)
    args = parser.parse_args()
    if args.serve:
        serve(0)
        return 0
    return harness(run, args)


if __name__ == "__main__":
    sys.exit(main())
