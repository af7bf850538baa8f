"""Delivered webhooks per second: Herald against a raw client, one-Celery-task-per-message and a loop.

    uv run python bench/webhooks.py [--messages N] [--out bench/results]

Every variant runs in this one invocation against the same receiver process (``receiver.py``):

    raw         the ceiling: ``rawclient.py`` processes POSTing the same payload, bare aiohttp
    herald      API + scheduler + worker as real processes; N events through /v1/events/batch,
                timed from the first request until every delivery is ``delivered`` in the database
    celery      one task per message, ``requests`` inside (``celery_baseline.py``), best of a sweep
    sequential  one ``requests.Session`` in a loop, one request at a time, on a smaller N

Prints a table and the ratios, writes ``webhooks.json`` and ``webhooks.png`` to ``--out``.
``--profile`` also samples the Herald processes with py-spy (if installed) and writes summaries.
See ``bench/README.md`` for how to read the results.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
GOALS = {"raw": 0.5, "celery": 5.0}
# A key left in every Redis database the bench uses, so a rerun may flush what a crashed run left
# and a database holding someone else's keys is never flushed.
MARKER = "herald-bench:owner"
# Herald settings the bench applies unless overridden by --herald-env (reported in the results).
HERALD_DEFAULTS: dict[str, str] = {
    "HERALD_WEBHOOK__ALLOW_NETWORKS": "127.0.0.0/8",
    "HERALD_LOG_LEVEL": "WARNING",
}


# ------------------------------------------------------------------ small helpers


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.05, what: str) -> Any:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line(proc: subprocess.Popen[bytes], *, timeout_s: float, what: str) -> str:
    """One line of a child's stdout, or ``TimeoutError`` (the child may be hung or dead)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
    line = proc.stdout.readline().decode(errors="replace").strip()
    if not line:
        raise RuntimeError(f"{what}: the process exited (code {proc.poll()})")
    return line


def loopback(url: str) -> str:
    """``url`` if its host is a loopback address; the bench never talks to anything else."""
    host = re.sub(r"^[a-z+]+://(?:[^@/]*@)?", "", url).split("/")[0].rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"only loopback addresses are used, got {url!r}")
    return url


class Processes:
    """Child processes, each in its own session (Ctrl-C in the terminal reaches only the driver),
    stopped by process group so Celery pool children go too."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[str] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                start_new_session=True,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
            )
        self.running[name] = proc
        self.started.append(name)
        return proc

    def stop(self, name: str, *, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for signum, wait_s in ((sig, grace_s), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # pool children that outlived their parent
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name, grace_s=5.0)

    def check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.running.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; log:\n{self.tail(name)}")

    def cpu_s(self, names: list[str]) -> dict[str, float]:
        """CPU-seconds so far of each named process group (take two and subtract)."""
        return {name: group_cpu_s(self.running[name].pid) for name in names if name in self.running}

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------ other load on the machine

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (every core, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


def process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def group_cpu_s(pgid: int) -> float:
    """CPU-seconds used by the live processes of a process group and the children they reaped."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _CLK_TCK


class CpuMeter:
    """How much CPU *other* programs used while a variant ran: machine busy time minus ours.

    Ours = this driver and every child it has reaped (``os.times``) plus the long-lived
    receiver. A benchmark on 2 cores is only meaningful when this stays near zero.
    """

    def __init__(self, receiver_pid: int) -> None:
        self.receiver_pid = receiver_pid

    def _ours(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + process_cpu_s(self.receiver_pid)

    def start(self) -> tuple[float, float, float]:
        return time.monotonic(), machine_busy_s(), self._ours()

    def others_cores(self, since: tuple[float, float, float], *, also_ours_s: float = 0.0) -> float:
        """Average number of cores used by other programs since ``since``; ``also_ours_s`` is CPU
        spent for us by servers we did not start (Redis, PostgreSQL)."""
        wall, busy, ours = since
        elapsed = max(time.monotonic() - wall, 1e-6)
        return max(0.0, (machine_busy_s() - busy) - (self._ours() - ours) - also_ours_s) / elapsed

    def wait_quiet(self, *, max_cores: float, timeout_s: float) -> float:
        """Wait (bounded) until other programs use under ``max_cores``; return the last reading."""
        deadline = time.monotonic() + timeout_s
        while True:
            mark = self.start()
            time.sleep(0.5)
            others = self.others_cores(mark)
            if others <= max_cores or time.monotonic() > deadline:
                return others


# ------------------------------------------------------------------ shared resources


@dataclass
class Receiver:
    url: str
    stats_url: str
    pid: int
    http: requests.Session = field(default_factory=requests.Session)

    def stats(self) -> dict[str, int]:
        return dict(self.http.get(self.stats_url, timeout=5).json())

    def count(self) -> int:
        return self.stats()["count"]

    def wait_for(self, target: int, *, timeout_s: float, interval_s: float = 0.01) -> float:
        """Block until the receiver has counted ``target`` requests; return ``perf_counter()`` then."""
        wait_until(
            lambda: self.count() >= target,
            timeout_s=timeout_s,
            interval_s=interval_s,
            what=f"the receiver to count {target} requests",
        )
        return time.perf_counter()


def start_receiver(procs: Processes, delay_ms: float) -> Receiver:
    proc = procs.start("receiver", [PYTHON, str(BENCH_DIR / "receiver.py"), "--delay-ms", str(delay_ms)], pipes=True)
    line = read_line(proc, timeout_s=20, what="the receiver to start")
    port = int(line.split()[1])
    return Receiver(url=f"http://127.0.0.1:{port}/hook", stats_url=f"http://127.0.0.1:{port}/stats", pid=proc.pid)


def claim_redis_db(base_url: str, index: int) -> str:
    """``base_url/index``, flushed, if it is empty or was the bench's; refuse someone else's keys."""
    url = f"{base_url.rstrip('/')}/{index}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        if client.dbsize() and not client.exists(MARKER):
            raise SystemExit(
                f"Redis DB {index} at {base_url} holds keys the bench did not write; "
                f"choose free indexes with --redis-dbs"
            )
        client.flushdb()
        client.set(MARKER, "bench/webhooks.py")
    finally:
        client.close()
    return url


def flush_redis_db(url: str, *, keep_marker: bool = True) -> None:
    """Empty the DB between variants (marker kept) or at the end (nothing left behind)."""
    with contextlib.suppress(redis.RedisError), contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as c:
        c.flushdb()
        if keep_marker:
            c.set(MARKER, "bench/webhooks.py")


def celery_ping(broker_url: str) -> bool:
    """True once a worker on ``broker_url`` answers a remote-control ping."""
    from celery import Celery

    app = Celery("bench-ping", broker=broker_url, set_as_current=False)
    try:
        return bool(app.control.ping(timeout=0.5))
    finally:
        app.close()


def redis_cpu_s(url: str) -> float:
    """CPU-seconds the Redis server has used since it started (every client's work, not only ours)."""
    try:
        with contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as client:
            info = client.info("cpu")
    except redis.RedisError:
        return 0.0
    return float(info.get("used_cpu_sys", 0.0)) + float(info.get("used_cpu_user", 0.0))


def postgres_backends_cpu_s(admin_url: str, database: str, *, exclude: int = 0) -> dict[int, float]:
    """CPU-seconds so far of each PostgreSQL backend connected to ``database`` (same machine)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        pids = [row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))]
    return {pid: process_cpu_s(pid) for pid in pids if pid != exclude}


def payload_shape(size: int) -> tuple[int, bytes]:
    """The padding that makes a Herald webhook body about ``size`` bytes, and one such body."""
    body = {
        "id": "evt_01JBENCH0000000000000000000",
        "type": "bench.ping",
        "subject": "bench:000001",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        "data": {"n": 1, "pad": ""},
    }
    base = len(json.dumps(body, separators=(",", ":")))
    pad = max(0, size - base)
    body["data"] = {"n": 1, "pad": "x" * pad}
    return pad, json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Run:
    """What every variant needs: the receiver, the payload, a temp folder, the child processes."""

    args: argparse.Namespace
    receiver: Receiver
    procs: Processes
    tmp: Path
    pad: int
    payload: bytes
    cleanups: contextlib.ExitStack

    def servers_cpu_s(self) -> tuple[float, float]:
        """CPU-seconds so far of Redis and of the receiver; variants take two and subtract."""
        return redis_cpu_s(self.args.redis_url), process_cpu_s(self.receiver.pid)


def servers_used(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    return {"redis_cpu_s": round(after[0] - before[0], 2), "receiver_cpu_s": round(after[1] - before[1], 2)}


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


def herald_env(run: Run, *, database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(HERALD_DEFAULTS)
    env.update(
        HERALD_DATA_DIR=str(run.tmp / "herald-data"),
        HERALD_DATABASE__URL=database_url,
        HERALD_REDIS__URL=redis_url,
    )
    for item in run.args.herald_env:
        key, _, value = item.partition("=")
        if not key.startswith("HERALD_") or not _:
            raise SystemExit(f"--herald-env: expected HERALD_NAME=value, got {item!r}")
        env[key] = value
    return env


@contextlib.contextmanager
def herald_database(run: Run, kind: str) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database: a SQLite file in the temp folder or a new PostgreSQL database."""
    from herald.store.db import make_engine
    from herald.store.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{run.tmp / f'herald-{uuid.uuid4().hex[:6]}.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url, ""
        return
    import psycopg

    admin = loopback(run.args.postgres_url)
    name = f"herald_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{admin.rsplit('/', 1)[0] if admin.count('/') > 2 else admin}/{name}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url, name
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def poll_engine(url: str) -> Any:
    """An engine for the driver's progress queries that never takes a write lock.

    Not Herald's ``make_engine``: on SQLite that begins every transaction with ``BEGIN
    IMMEDIATE``, so polling every 20 ms would queue for, and hold, the one write lock that the
    API, dispatcher and workers share. A plain pysqlite connection reads a WAL snapshot instead.
    """
    from sqlalchemy import create_engine

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=1)


def run_herald(run: Run, n: int, kind: str, redis_url: str) -> dict[str, Any]:
    from herald.store import queries
    from herald.store.db import make_engine, make_sessionmaker, transaction

    flush_redis_db(redis_url)
    with herald_database(run, kind) as (database_url, pg_name):
        setup = make_engine(database_url, pool_size=1)
        with transaction(make_sessionmaker(setup)) as session:
            tenant = queries.create_tenant(session=session, name="bench")
            _, api_key = queries.create_api_key(session=session, tenant_id=tenant.id)
            tenant_id = tenant.id
        setup.dispose()
        engine = poll_engine(database_url)
        try:
            env = herald_env(run, database_url=database_url, redis_url=redis_url)
            (run.tmp / "herald-data").mkdir(exist_ok=True)
            port = free_port()
            names = [f"herald-{kind}-{part}" for part in ("api", "scheduler", "worker")]
            api_name, scheduler_name, worker_name = names
            cli = [PYTHON, "-m", "herald.cli"]
            try:
                run.procs.start(api_name, [*cli, "api", "--port", str(port)], env=env)
                run.procs.start(scheduler_name, [*cli, "scheduler"], env=env)
                run.procs.start(
                    worker_name,
                    [
                        *cli,
                        "worker",
                        "--lanes",
                        "bulk",
                        "--concurrency",
                        str(run.args.herald_worker_concurrency),
                        "--name",
                        "bench-bulk@%h",
                    ],
                    env=env,
                )
                result = _drive_herald(run, n, kind, port, api_key, tenant_id, redis_url, names, engine, pg_name)
            finally:
                for name in names:
                    run.procs.stop(name)
        finally:
            engine.dispose()
    result["config"]["settings"] = {k: v for k, v in env.items() if k.startswith("HERALD_")}
    return result


def _drive_herald(
    run: Run,
    n: int,
    kind: str,
    port: int,
    api_key: str,
    tenant_id: str,
    redis_url: str,
    names: list[str],
    engine: Any,
    pg_name: str,
) -> dict[str, Any]:
    from sqlalchemy import text

    base = f"http://127.0.0.1:{port}"
    http = requests.Session()
    auth = {"Authorization": f"Bearer {api_key}"}

    def api_up() -> bool:
        run.procs.check_alive(*names)
        with contextlib.suppress(requests.RequestException):
            return http.get(f"{base}/healthz", timeout=1).status_code == 200
        return False

    def dispatcher_waiting() -> bool:
        # The dispatcher blocks on BLPOP of its wake key once its first pass is done.
        run.procs.check_alive(*names)
        db = redis_url.rsplit("/", 1)[1]  # CLIENT LIST is server-wide: other DBs have dispatchers too
        with contextlib.closing(redis.Redis.from_url(redis_url, socket_timeout=2)) as client:
            return any(c.get("cmd") == "blpop" and str(c.get("db")) == db for c in client.client_list())

    def worker_ready() -> bool:
        run.procs.check_alive(*names)
        return celery_ping(redis_url)

    wait_until(api_up, timeout_s=30, what="the Herald API")
    wait_until(dispatcher_waiting, timeout_s=30, what="the Herald dispatcher")
    wait_until(worker_ready, timeout_s=30, interval_s=0.2, what="the Herald worker")
    answer = http.post(f"{base}/v1/endpoints", json={"url": run.receiver.url}, headers=auth, timeout=10)
    if answer.status_code != 201:
        raise RuntimeError(f"creating the endpoint failed: {answer.status_code} {answer.text[:300]}")

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
    profilers = start_profilers(run, kind, names) if run.args.profile else []
    count_sql = text("SELECT COUNT(*) FROM deliveries WHERE tenant_id = :t AND state = 'delivered'")
    states_sql = text("SELECT state, COUNT(*) FROM deliveries WHERE tenant_id = :t GROUP BY state")
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
    deadline = time.monotonic() + run.args.variant_timeout_s
    delivered, states = 0, {}
    with engine.connect() as conn:
        while True:
            delivered = int(conn.execute(count_sql, {"t": tenant_id}).scalar_one())
            conn.rollback()  # a fresh snapshot on the next poll
            if delivered >= n:
                end = time.perf_counter()
                cpu_after, servers_after = run.procs.cpu_s(names), run.servers_cpu_s()
                break
            if time.monotonic() > deadline:
                states = {row[0]: row[1] for row in conn.execute(states_sql, {"t": tenant_id})}
                raise TimeoutError(
                    f"herald-{kind}: {delivered}/{n} delivered after {run.args.variant_timeout_s:.0f}s; states {states}"
                )
            run.procs.check_alive(*names)
            time.sleep(0.02)
        states = {row[0]: row[1] for row in conn.execute(states_sql, {"t": tenant_id})}
        last = conn.execute(text("SELECT MAX(finished_at) FROM deliveries WHERE tenant_id = :t"), {"t": tenant_id})
        last_finished = last.scalar_one()
        attempts = int(conn.execute(text("SELECT COUNT(*) FROM attempts")).scalar_one())
    pg_after = postgres_backends_cpu_s(run.args.postgres_url, pg_name, exclude=own_backend) if pg_name else {}
    profiles = stop_profilers(run, profilers)
    parts = {name.rsplit("-", 1)[1]: round(cpu_after[name] - cpu_before[name], 2) for name in names}
    receiver_after = run.receiver.stats()
    if isinstance(last_finished, str):
        last_finished = dt.datetime.fromisoformat(last_finished)
    if last_finished is not None and last_finished.tzinfo is None:
        last_finished = last_finished.replace(tzinfo=dt.UTC)
    elapsed = end - start
    return {
        "variant": f"herald-{kind}",
        "label": f"Herald\n({'SQLite' if kind == 'sqlite' else 'PostgreSQL'})",
        "messages": n,
        "elapsed_s": elapsed,
        "rate_per_s": n / elapsed,
        "accepted_s": accepted_at - start,
        "accepted_per_s": n / (accepted_at - start),
        "last_finished_after_s": last_finished.timestamp() - wall_start if last_finished else None,
        "states": states,
        "attempts": attempts,
        "receiver_requests": receiver_after["count"] - receiver_before["count"],
        "receiver_unique_ids": receiver_after["unique_ids"] - receiver_before["unique_ids"],
        "idle_cpu_cores": round(idle_cores, 3),
        "cpu_s": sum(parts.values()),
        "cpu_s_by_process": parts,
        **servers_used(servers_before, servers_after),
        **(
            {"postgres_cpu_s": round(sum(c - pg_before.get(p, 0.0) for p, c in pg_after.items()), 2)} if pg_name else {}
        ),
        "profiles": profiles,
        "config": {
            "database": kind,
            "batch_size": run.args.batch_size,
            "senders": run.args.herald_senders,
            "worker": f"--lanes bulk --concurrency {run.args.herald_worker_concurrency}",
        },
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


# ------------------------------------------------------------------ profiling (optional)


def start_profilers(run: Run, kind: str, names: list[str]) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """py-spy samples each Herald process (worker with its pool children) while the variant runs."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print("  --profile: py-spy not found (uv pip install py-spy); running without profiles", file=sys.stderr)
        return []
    out = run.args.out / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        proc = run.procs.running[name]
        path = out / f"{name}-{run.args.profile}.txt"
        spy_name = f"py-spy-{name}"
        child = run.procs.start(
            spy_name,
            [
                spy,
                "record",
                "--pid",
                str(proc.pid),
                "--subprocesses",
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                *(["--idle"] if run.args.profile == "wall" else []),
                "-o",
                str(path),
            ],
        )
        started.append((spy_name, child, path))
    time.sleep(1.0)  # py-spy attaches asynchronously
    return started


def stop_profilers(run: Run, profilers: list[tuple[str, subprocess.Popen[bytes], Path]]) -> dict[str, Any]:
    summaries: dict[str, Any] = {}
    for spy_name, _child, path in profilers:
        run.procs.stop(spy_name, sig=signal.SIGINT, grace_s=20)
        if path.exists():
            summary = summarize_profile(path)
            summary_path = path.with_suffix(".summary.txt")
            summary_path.write_text(summary["text"])
            summaries[spy_name.removeprefix("py-spy-")] = {
                "raw": str(path),
                "summary": str(summary_path),
                "samples": summary["samples"],
            }
    return summaries


def summarize_profile(path: Path, top: int = 25, rate_hz: int = 100) -> dict[str, Any]:
    """Where the CPU went, from py-spy's collapsed ("raw") output: self time by package, the
    hottest functions, and inclusive time of Herald's own functions (what each step costs)."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            own[frames[-1]] += count
            packages[_package(frames[-1])] += count
        for frame in set(frames):
            if "(herald/" in frame:
                inclusive[frame] += count

    def pct(c: int) -> str:
        return f"{100 * c / max(total, 1):6.1f} {c / rate_hz:7.2f}"

    lines = [f"{path.name}: {total} samples at {rate_hz} Hz = {total / rate_hz:.1f} thread-seconds", ""]
    lines += ["self %  seconds  package"] + [f"{pct(c)}   {p}" for p, c in packages.most_common(12)]
    lines += ["", "self %  seconds  function"] + [f"{pct(c)}   {f}" for f, c in own.most_common(top)]
    lines += ["", "incl %  seconds  Herald function (including what it calls)"]
    lines += [f"{pct(c)}   {f}" for f, c in inclusive.most_common(top)]
    return {"samples": total, "text": "\n".join(lines) + "\n"}


def _frame(frame: str) -> str:
    """``func (…/site-packages/pkg/mod.py:12)`` → ``func (pkg/mod.py)``."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    func, path = match.groups()
    path = re.sub(r"^.*?(site-packages/|/src/|/lib/python3\.\d+/)", "", path)
    return f"{func} ({path})"


def _package(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1].rstrip(")")
    return path.split("/", 1)[0] if "/" in path else path


# ------------------------------------------------------------------ report


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only git: which code was measured
        commit = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    source = hashlib.sha256()
    for path in sorted((BENCH_DIR.parent / "src").rglob("*.py")):
        source.update(str(path.relative_to(BENCH_DIR.parent)).encode() + b"\0" + path.read_bytes())
    import aiohttp
    import celery

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "aiohttp": aiohttp.__version__,
        "requests": requests.__version__,
        "git_commit": commit,
        "src_sha256": source.hexdigest()[:16],
        "receiver_delay_ms": args.receiver_delay_ms,
        "payload_bytes": args.payload_bytes,
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Herald against each baseline: by wall-clock rate (the goals) and by CPU per delivery."""
    by_kind = {r["variant"]: r for r in results}
    raw = by_kind.get("raw")
    sequential = by_kind.get("sequential")
    celeries = [r for r in results if r["variant"].startswith("celery")]
    best_celery = max(celeries, key=lambda r: r["rate_per_s"]) if celeries else None
    leanest_celery = min(celeries, key=lambda r: r.get("cpu_us_per_delivery_all_in", 1e12)) if celeries else None
    out: dict[str, dict[str, Any]] = {}
    for herald in (r for r in results if r["variant"].startswith("herald")):
        rate = herald["rate_per_s"]
        cost = herald.get("cpu_us_per_delivery_all_in")
        entry: dict[str, Any] = {}
        if raw:
            entry["herald_over_raw"] = rate / raw["rate_per_s"]
            entry["herald_over_raw_goal"] = GOALS["raw"]
            entry["herald_over_raw_met"] = entry["herald_over_raw"] >= GOALS["raw"]
            if cost and raw.get("cpu_us_per_delivery_all_in"):
                entry["cpu_raw_over_herald"] = raw["cpu_us_per_delivery_all_in"] / cost
        if best_celery and leanest_celery:
            entry["herald_over_celery"] = rate / best_celery["rate_per_s"]
            entry["celery_baseline"] = best_celery["variant"]
            entry["herald_over_celery_goal"] = GOALS["celery"]
            entry["herald_over_celery_met"] = entry["herald_over_celery"] >= GOALS["celery"]
            entry["herald_over_each_celery"] = {c["variant"]: rate / c["rate_per_s"] for c in celeries}
            if cost and leanest_celery.get("cpu_us_per_delivery_all_in"):
                entry["cpu_celery_over_herald"] = leanest_celery["cpu_us_per_delivery_all_in"] / cost
                entry["cpu_celery_baseline"] = leanest_celery["variant"]
        if sequential:
            entry["herald_over_sequential"] = rate / sequential["rate_per_s"]
        out[herald["variant"]] = entry
    return out


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
        "CPU-s own: the variant's processes (Herald: API + scheduler + worker pool; Celery: worker pool +\n"
        "publisher); Redis/PG, receiver: those servers' CPU meanwhile; µs CPU/dlv: all of it per delivery;\n"
        "other load: cores used by unrelated programs meanwhile (near 0 for fair wall-clock numbers)."
    )
    for variant, entry in table.items():
        print()
        if "herald_over_raw" in entry:
            mark = "met" if entry["herald_over_raw_met"] else "MISSED"
            line = f"{variant} / raw client      = {entry['herald_over_raw']:6.2f}  (goal ≥ {GOALS['raw']}: {mark})"
            if "cpu_raw_over_herald" in entry:
                line += f"   CPU per delivery: raw / Herald = {entry['cpu_raw_over_herald']:.2f}"
            print(line)
        if "herald_over_celery" in entry:
            mark = "met" if entry["herald_over_celery_met"] else "MISSED"
            print(
                f"{variant} / celery per msg  = {entry['herald_over_celery']:6.2f}  (goal ≥ {GOALS['celery']}: "
                f"{mark}; baseline = fastest of the sweep, {entry['celery_baseline']})"
            )
            if "cpu_celery_over_herald" in entry:
                print(
                    f"{'':<{len(variant)}}   CPU per delivery: celery / Herald = "
                    f"{entry['cpu_celery_over_herald']:.2f} (leanest celery: {entry['cpu_celery_baseline']})"
                )
        if "herald_over_sequential" in entry:
            print(f"{variant} / sequential      = {entry['herald_over_sequential']:6.2f}")


def plot(results: list[dict[str, Any]], table: dict[str, dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    """Left: delivered webhooks per second, the ratios in a box. Right: CPU per delivery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"raw": "#7f7f7f", "herald": "#1f77b4", "celery": "#d62728", "sequential": "#9467bd"}
    fig, (ax, ax_cpu) = plt.subplots(
        1, 2, figsize=(max(11, 2.2 * len(results)), 6), gridspec_kw={"width_ratios": [3, 2]}
    )
    labels = [
        r["label"]
        + (f"\n(other load {r['other_programs_cores']:.1f}c)" if r.get("other_programs_cores", 0) > 0.15 else "")
        for r in results
    ]
    bar_colors = [colors[r["variant"].split("-")[0]] for r in results]
    rates = [r["rate_per_s"] for r in results]
    bars = ax.bar(range(len(results)), rates, color=bar_colors)
    ax.bar_label(bars, labels=[f"{rate:,.0f}/s" for rate in rates], fontsize=8, padding=2)
    notes = []
    for variant, entry in table.items():
        parts = [variant + ":"]
        if "herald_over_raw" in entry:
            parts.append(f"{entry['herald_over_raw']:.2f}x raw client (goal ≥ {GOALS['raw']})")
        if "herald_over_celery" in entry:
            parts.append(f"{entry['herald_over_celery']:.1f}x celery per message (goal ≥ {GOALS['celery']:.0f})")
        if "herald_over_sequential" in entry:
            parts.append(f"{entry['herald_over_sequential']:.1f}x sequential")
        notes.append("\n  ".join(parts))
    ax.text(
        0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )  # fmt: skip
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("delivered webhooks per second")
    ax.set_ylim(0, max(rates) * 1.45)
    ax.set_title(
        f"{info['cpus_usable']} CPUs, {info['payload_bytes']} B payload, receiver delay "
        f"{info['receiver_delay_ms']:g} ms — {info['date']}",
        fontsize=9,
    )
    costed = [r for r in results if r.get("cpu_us_per_delivery_all_in")]
    if costed:
        costs = [r["cpu_us_per_delivery_all_in"] for r in costed]
        cpu_bars = ax_cpu.barh(range(len(costed)), costs, color=[colors[r["variant"].split("-")[0]] for r in costed])
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
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
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
    parser.add_argument("--quiet-cores", type=float, default=0.15, help="wait until other programs use less CPU")
    parser.add_argument("--quiet-wait-s", type=float, default=10.0, help="at most this long, before each variant")
    parser.add_argument("--herald-worker-concurrency", type=int, default=2)
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
    parser.add_argument("--variants", default="raw,herald,celery,sequential")
    parser.add_argument("--variant-timeout-s", type=float, default=150.0)
    parser.add_argument(
        "--profile",
        nargs="?",
        const="cpu",
        choices=["cpu", "wall"],
        help="py-spy the Herald processes into <out>/profiles/: cpu = running threads only, "
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
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
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
        cleanups.callback(procs.stop_all)
        try:
            herald_redis = claim_redis_db(args.redis_url, herald_db_index)
            celery_redis = claim_redis_db(args.redis_url, celery_db_index)
            cleanups.callback(flush_redis_db, herald_redis, keep_marker=False)
            cleanups.callback(flush_redis_db, celery_redis, keep_marker=False)
            receiver = start_receiver(procs, args.receiver_delay_ms)
            pad, payload = payload_shape(args.payload_bytes)
            run = Run(args, receiver, procs, tmp, pad, payload, cleanups)
            info = machine_info(args)
            print(
                f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}, N={n}, "
                f"payload {len(payload)} B, receiver {receiver.url} (delay {args.receiver_delay_ms:g} ms)"
            )

            cpu = CpuMeter(receiver.pid)

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
                # Over the whole attempt (start-up included), so approximate; Redis is shared with others.
                others = cpu.others_cores(mark, also_ours_s=result["service_cpu_s"])
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
                    extra = (
                        f" (API accepted all in {result['accepted_s']:.2f}s; receiver saw "
                        f"{result['receiver_requests']} requests, {result['receiver_unique_ids']} distinct ids)"
                    )
                print(f"  {result['rate_per_s']:,.0f} deliveries/s over {result['elapsed_s']:.2f}s{extra}")

            if "raw" in variants:
                attempt(
                    f"raw aiohttp client, {args.raw_processes} processes x {args.raw_concurrency} in flight",
                    lambda: run_raw(run, n),
                )
            if "herald" in variants:
                for kind in (k.strip() for k in args.databases.split(",") if k.strip()):
                    if kind not in ("sqlite", "postgresql"):
                        raise SystemExit(f"--databases: sqlite or postgresql, got {kind!r}")
                    attempt(f"Herald end to end on {kind}", functools.partial(run_herald, run, n, kind, herald_redis))
            if "celery" in variants:
                for config in (c.strip() for c in args.celery_configs.split(",") if c.strip()):
                    http_mode, concurrency, *rest = config.split("/")
                    prefetch = int(rest[0]) if rest else 4
                    cn = args.celery_messages or max(200, n // 5)
                    attempt(
                        f"Celery task per message ({http_mode}, prefork -c {concurrency}, prefetch {prefetch})",
                        functools.partial(run_celery, run, cn, http_mode, int(concurrency), prefetch, celery_redis),
                    )
            if "sequential" in variants:
                sn = args.sequential_messages or max(200, n // 10)
                attempt(f"sequential loop, {sn} messages", lambda: run_sequential(run, sn))
        except KeyboardInterrupt:
            # Let the clean-ups finish even if Ctrl-C is pressed again.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("\ninterrupted; stopping processes and removing temp files", file=sys.stderr)
            return 130
    if not results:
        print("no variant completed", file=sys.stderr)
        return 1
    table = ratios(results)
    print_table(results, table)
    report = {
        "machine": info,
        "messages": n,
        "results": results,
        "ratios": table,
        "failures": failures,
        "command": " ".join([Path(PYTHON).name, *sys.argv]),
    }
    (args.out / "webhooks.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(results, table, info, args.out / "webhooks.png")
    print(f"\nwrote {args.out / 'webhooks.json'} and {args.out / 'webhooks.png'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
