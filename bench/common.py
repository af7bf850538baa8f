"""What every benchmark here shares: child processes, CPU and memory readings, Redis, Herald's set-up.

Not a benchmark itself. ``webhooks.py``, ``otp_latency.py``, ``scheduled.py``, ``ingest_memory.py``,
``api_rate.py`` and ``suite.py`` import it (``bench/`` is on ``sys.path`` when they run as scripts).

- ``Processes``: children in their own sessions, stopped by process group, logs in a folder.
- CPU: ``machine_busy_s``, ``group_cpu_s``, ``CpuMeter`` (how much *other* programs used).
- memory: ``group_rss``, ``peak_rss``.
- Redis: ``start_redis`` (a private ``redis-server``, or claimed DBs of a shared one).
- Herald: ``fresh_database``, ``create_tenant``, ``herald_env``, ``start_herald``, ``poll_engine``.
- ``machine_info``, ``pct``, ``summary_ms``, ``harness`` (temp folder + clean-up around a run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
# A key left in every Redis database the bench uses, so a rerun may flush what a crashed run left
# and a database holding someone else's keys is never flushed.
MARKER = "herald-bench:owner"
# Herald settings the bench applies unless overridden by --herald-env (reported in the results).
HERALD_DEFAULTS: dict[str, str] = {
    "HERALD_WEBHOOK__ALLOW_NETWORKS": "127.0.0.0/8",
    "HERALD_LOG_LEVEL": "WARNING",
}
# The issues' goals, in one place (suite.py and the drivers read them from here).
GOALS: dict[str, float] = {
    "herald_over_raw": 0.5,  # issue 2: batch API → delivered, vs the raw aiohttp client
    "herald_over_celery": 5.0,  # issue 2: … vs one Celery task per message
    "drop_over_raw": 0.7,  # issue 5: drop of 100,000 ids → delivered, vs the raw client
    "drop_over_celery": 10.0,  # issue 5: … vs one Celery task per message
    "slow_drop_per_s": 1000.0,  # issue 5: receiver taking 200 ms per request
    "slow_drop_over_sequential": 100.0,  # issue 5: … vs a sequential loop against it
    "ingest_peak_rss_mb": 150.0,  # issue 5: ingester on a 10,000,000-line file
    "otp_p99_ms": 250.0,  # issue 3: OTP request → SMS provider, while a bulk backlog drains
    "late_p99_s": 1.0,  # issue 4: scheduled sends, lateness p99
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
    stopped by process group so Celery pool children go too.

    ``cleanup_redis``: Redis DB URLs to flush when the run ends (``harness`` does it)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[str] = []
        self.cleanup_redis: list[str] = []

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

    def cpu_s(self, names: Sequence[str]) -> dict[str, float]:
        """CPU-seconds so far of each named process group (take two and subtract)."""
        return {name: group_cpu_s(self.running[name].pid) for name in names if name in self.running}

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------ CPU and memory

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (every core, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


def machine_load(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over ``seconds`` (other programs included)."""
    before = machine_busy_s()
    time.sleep(seconds)
    return round((machine_busy_s() - before) / seconds, 2)


def process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _group_pids(pgid: int) -> Iterator[str]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                    yield entry.name
        except (OSError, IndexError, ValueError):
            continue


def group_cpu_s(pgid: int) -> float:
    """CPU-seconds used by the live processes of a process group and the children they reaped."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _CLK_TCK


def _status_kib(pid: str | int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0


def group_rss(pgid: int) -> int:
    """Bytes of resident memory of every live process in a process group (a worker and its pool)."""
    return sum(_status_kib(pid, "VmRSS:") for pid in _group_pids(pgid)) * 1024


def peak_rss(pid: int) -> int:
    """The largest resident size one live process has had so far, in bytes (``VmHWM``)."""
    return _status_kib(pid, "VmHWM:") * 1024


class CpuMeter:
    """How much CPU *other* programs used while a variant ran: machine busy time minus ours.

    Ours = this driver and every child it has reaped (``os.times``) plus the long-lived servers
    it started (``pids``: the receiver, a private Redis). A benchmark on 2 cores is only
    meaningful when this stays near zero.
    """

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def _ours(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + sum(process_cpu_s(p) for p in self.pids)

    def start(self) -> tuple[float, float, float]:
        return time.monotonic(), machine_busy_s(), self._ours()

    def others_cores(self, since: tuple[float, float, float], *, also_ours_s: float = 0.0) -> float:
        """Average number of cores used by other programs since ``since``; ``also_ours_s`` is CPU
        spent for us by servers we did not start (a shared Redis, PostgreSQL)."""
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


# ------------------------------------------------------------------ the webhook receiver


@dataclass
class Receiver:
    url: str
    stats_url: str
    pid: int
    delay_ms: float = 0.0
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


def start_receiver(procs: Processes, delay_ms: float, *, name: str = "receiver") -> Receiver:
    """``receiver.py`` in its own process: answers 200 (after ``delay_ms``) and counts."""
    proc = procs.start(name, [PYTHON, str(BENCH_DIR / "receiver.py"), "--delay-ms", str(delay_ms)], pipes=True)
    line = read_line(proc, timeout_s=20, what="the receiver to start")
    port = int(line.split()[1])
    return Receiver(
        url=f"http://127.0.0.1:{port}/hook", stats_url=f"http://127.0.0.1:{port}/stats", pid=proc.pid, delay_ms=delay_ms
    )


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
    """What every throughput variant needs: the receiver, the payload, a temp folder, the child
    processes, and the Redis server (``redis_base``, for its CPU)."""

    args: argparse.Namespace
    receiver: Receiver
    procs: Processes
    tmp: Path
    pad: int
    payload: bytes
    cleanups: contextlib.ExitStack
    redis_base: str

    def servers_cpu_s(self) -> tuple[float, float]:
        """CPU-seconds so far of Redis and of the receiver; variants take two and subtract."""
        return redis_cpu_s(self.redis_base), process_cpu_s(self.receiver.pid)


def servers_used(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    return {"redis_cpu_s": round(after[0] - before[0], 2), "receiver_cpu_s": round(after[1] - before[1], 2)}


def wait_delivered(
    receiver: Receiver,
    engine: Any,
    *,
    tenant_id: str,
    receiver_target: int,
    database_target: int,
    timeout_s: float,
    check: Callable[[], None],
    what: str,
) -> dict[str, Any]:
    """Wait until the tenant has ``database_target`` deliveries ``delivered`` in the database.

    Counting rows every few milliseconds costs the database (and so Herald) real CPU at 100,000
    rows, so the receiver's count is watched first (every 25 ms, a cheap HTTP call) and the
    database only once the receiver has seen ``receiver_target`` requests (every 20 ms). Returns
    ``{"end": perf_counter() when done, "timeline": [(perf_counter, receiver count), …]}``.
    """
    from sqlalchemy import text

    count_sql = text("SELECT COUNT(*) FROM deliveries WHERE tenant_id = :t AND state = 'delivered'")
    states_sql = text("SELECT state, COUNT(*) FROM deliveries WHERE tenant_id = :t GROUP BY state")
    deadline = time.monotonic() + timeout_s
    timeline: list[tuple[float, int]] = []
    last_sample = 0.0
    seen = 0
    while seen < receiver_target:
        seen = receiver.count()
        now = time.perf_counter()
        if now - last_sample >= 0.5:
            timeline.append((now, seen))
            last_sample = now
        if time.monotonic() > deadline:
            break
        check()
        time.sleep(0.025)
    with engine.connect() as conn:
        while True:
            delivered = int(conn.execute(count_sql, {"t": tenant_id}).scalar_one())
            conn.rollback()  # a fresh snapshot on the next poll
            if delivered >= database_target:
                end = time.perf_counter()
                break
            if time.monotonic() > deadline:
                states = {row[0]: row[1] for row in conn.execute(states_sql, {"t": tenant_id})}
                raise TimeoutError(
                    f"{what}: {delivered}/{database_target} delivered after {timeout_s:.0f}s "
                    f"(receiver saw {seen}); states {states}"
                )
            check()
            time.sleep(0.02)
    timeline.append((end, receiver.count()))
    return {"end": end, "timeline": timeline}


# ------------------------------------------------------------------ Redis


def claim_redis_db(base_url: str, index: int) -> str:
    """``base_url/index``, flushed, if it is empty or was the bench's; refuse someone else's keys."""
    url = f"{base_url.rstrip('/')}/{index}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        if client.dbsize() and not client.exists(MARKER):
            raise SystemExit(
                f"Redis DB {index} at {base_url} holds keys the bench did not write; "
                f"choose free indexes with --redis-dbs / --redis-db"
            )
        client.flushdb()
        client.set(MARKER, "bench")
    finally:
        client.close()
    return url


def flush_redis_db(url: str, *, keep_marker: bool = True) -> None:
    """Empty the DB between variants (marker kept) or at the end (nothing left behind)."""
    with contextlib.suppress(redis.RedisError), contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as c:
        c.flushdb()
        if keep_marker:
            c.set(MARKER, "bench")


@dataclass
class RedisServer:
    """Where the bench's Redis lives: ``claim(i)`` gives a flushed DB URL; ``pid`` if private."""

    base: str
    claim: Callable[[int], str]
    pid: int = 0


def start_redis(procs: Processes, tmp: Path, *, url: str = "", first_db: int = 0) -> RedisServer:
    """A private ``redis-server`` on a free loopback port (no persistence), or, with ``url``, DBs
    ``first_db + i`` of that shared server (refused if they hold keys the bench did not write;
    flushed at the end through ``procs.cleanup_redis``).

    A private server is the clean place for numbers: the test suite cycles through and flushes
    DBs 1-15 of the shared one, and its CPU and ``used_memory`` are everybody's.
    """
    if url:
        base = loopback(url)

        def claim(index: int) -> str:
            claimed = claim_redis_db(base, first_db + index)
            procs.cleanup_redis.append(claimed)
            return claimed

        return RedisServer(base, claim)
    port = free_port()
    folder = tmp / "redis"
    folder.mkdir(exist_ok=True)
    proc = procs.start(
        "redis",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--databases", "4"],
    )  # fmt: skip
    base = f"redis://127.0.0.1:{port}"

    def ping() -> bool:
        procs.check_alive("redis")
        with contextlib.suppress(redis.RedisError), contextlib.closing(redis.Redis.from_url(base)) as c:
            return bool(c.ping())
        return False

    wait_until(ping, timeout_s=15, what="the private redis-server")
    return RedisServer(base, lambda index: f"{base}/{index}", proc.pid)


def celery_ping(broker_url: str) -> bool:
    """True once a worker on ``broker_url`` answers a remote-control ping."""
    return bool(celery_workers(broker_url))


def celery_workers(broker_url: str) -> set[str]:
    """Names of the Celery workers answering a ping on ``broker_url``."""
    from celery import Celery

    app = Celery("bench-ping", broker=broker_url, set_as_current=False)
    try:
        return {name for reply in app.control.ping(timeout=0.5) for name in reply}
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


def redis_used_memory(url: str) -> int:
    with contextlib.closing(redis.Redis.from_url(url, socket_timeout=10)) as c:
        return int(c.info("memory")["used_memory"])


def postgres_backends_cpu_s(admin_url: str, database: str, *, exclude: int = 0) -> dict[int, float]:
    """CPU-seconds so far of each PostgreSQL backend connected to ``database`` (same machine)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        pids = [row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))]
    return {pid: process_cpu_s(pid) for pid in pids if pid != exclude}


# ------------------------------------------------------------------ Herald


def sqlite_database(tmp: Path) -> str:
    """The URL of a fresh, migrated SQLite file in ``tmp``."""
    from herald.store.db import make_engine
    from herald.store.migrate import upgrade

    url = f"sqlite:///{tmp / f'herald-{uuid.uuid4().hex[:6]}.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@contextlib.contextmanager
def fresh_database(
    tmp: Path, kind: str = "sqlite", *, postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database, ``(url, PostgreSQL database name or "")``: a SQLite file in
    ``tmp`` or a new PostgreSQL database (dropped afterwards)."""
    from herald.store.db import make_engine
    from herald.store.migrate import upgrade

    if kind == "sqlite":
        yield sqlite_database(tmp), ""
        return
    import psycopg

    admin = loopback(postgres_url)
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


def create_tenant(database_url: str, *, endpoint_url: str = "") -> tuple[str, str, str]:
    """A tenant ``bench``, an API key and, with ``endpoint_url``, a webhook endpoint: ``(tenant id,
    key, endpoint id or "")``. Straight into the store (``herald tenants create`` does the same);
    the endpoint skips the API's address check, which ``HERALD_WEBHOOK__ALLOW_NETWORKS`` would pass."""
    from herald.channels import signing
    from herald.store import queries
    from herald.store.db import make_engine, make_sessionmaker, transaction
    from herald.store.ids import new_id
    from herald.store.models import Endpoint

    engine = make_engine(database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            tenant = queries.create_tenant(session=session, name="bench")
            _, api_key = queries.create_api_key(session=session, tenant_id=tenant.id)
            endpoint_id = ""
            if endpoint_url:  # as POST /v1/endpoints does it: the row and a signing secret
                endpoint_id = new_id("ep")
                session.add(Endpoint(id=endpoint_id, tenant_id=tenant.id, url=endpoint_url, enabled=True))
                session.flush()
                queries.add_secret(
                    session=session, endpoint_id=endpoint_id, secret=signing.generate_secret(), grace_s=0
                )
            return tenant.id, api_key, endpoint_id
    finally:
        engine.dispose()


def herald_env(
    tmp: Path,
    *,
    database_url: str,
    redis_url: str,
    extra: dict[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, str]:
    """The environment of Herald's processes: no inherited ``HERALD_*``, the bench's defaults,
    ``extra``, then ``overrides`` (``HERALD_NAME=value`` items from ``--herald-env``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(HERALD_DEFAULTS)
    env.update(HERALD_DATA_DIR=str(tmp / "herald-data"), HERALD_DATABASE__URL=database_url, HERALD_REDIS__URL=redis_url)
    env.update(extra or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key.startswith("HERALD_") or not sep:
            raise SystemExit(f"--herald-env: expected HERALD_NAME=value, got {item!r}")
        env[key] = value
    (tmp / "herald-data").mkdir(exist_ok=True)
    return env


def herald_settings(env: dict[str, str]) -> dict[str, str]:
    """The ``HERALD_*`` part of ``env``, for the results."""
    return {k: v for k, v in sorted(env.items()) if k.startswith("HERALD_")}


@dataclass
class Herald:
    """Herald's processes for one run: their names in ``Processes`` and the API's URL (if any)."""

    names: list[str]
    base: str
    env: dict[str, str]
    commands: dict[str, str]


def start_herald(
    procs: Processes,
    env: dict[str, str],
    *,
    workers: Sequence[tuple[str, str, int]],
    prefix: str = "",
    api: bool = True,
    watch_dir: Path | None = None,
    timeout_s: float = 90.0,
) -> Herald:
    """``herald scheduler``, a ``herald worker`` per ``(name, lanes, concurrency)``, and optionally
    ``herald api`` and ``herald watch DIR``; returns once the API answers, the dispatcher waits on
    its wake key and every worker answers a ping. (The watcher has no readiness signal: callers
    drop a small warm-up file and wait for it.)"""
    cli = [PYTHON, "-m", "herald.cli"]
    commands: dict[str, str] = {}
    port = free_port()
    starts: list[tuple[str, list[str], dict[str, str]]] = []
    if api:
        starts.append(("api", [*cli, "api", "--port", str(port)], env))
    starts.append(("scheduler", [*cli, "scheduler"], env))
    for name, lanes, concurrency in workers:
        argv = [*cli, "worker", "--lanes", lanes, "--concurrency", str(concurrency), "--name", f"{prefix}{name}@%h"]
        starts.append((f"worker-{name}", argv, env))
    if watch_dir is not None:
        starts.append(("watch", [*cli, "watch", str(watch_dir)], env))
    names = []
    for name, argv, child_env in starts:
        procs.start(prefix + name, argv, env=child_env)
        names.append(prefix + name)
        commands[prefix + name] = "herald " + " ".join(argv[3:])
    base = f"http://127.0.0.1:{port}" if api else ""
    redis_url = env["HERALD_REDIS__URL"]
    db = redis_url.rsplit("/", 1)[1] if redis_url.count("/") > 2 else "0"

    def api_up() -> bool:
        procs.check_alive(*names)
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        return False

    def dispatcher_waiting() -> bool:
        # The dispatcher blocks on BLPOP of its wake key once its first pass is done.
        # CLIENT LIST is server-wide: other DBs may have dispatchers too.
        procs.check_alive(*names)
        with contextlib.closing(redis.Redis.from_url(redis_url, socket_timeout=2)) as client:
            return any(c.get("cmd") == "blpop" and str(c.get("db")) == db for c in client.client_list())

    def workers_ready() -> bool:
        procs.check_alive(*names)
        found = {n.split("@")[0] for n in celery_workers(redis_url)}
        return all(f"{prefix}{name}" in found for name, _, _ in workers)

    if api:
        wait_until(api_up, timeout_s=timeout_s, what="the Herald API")
    wait_until(dispatcher_waiting, timeout_s=timeout_s, what="the Herald dispatcher")
    wait_until(workers_ready, timeout_s=timeout_s, interval_s=0.3, what="the Herald workers")
    return Herald(names, base, env, commands)


def poll_engine(url: str) -> Any:
    """An engine for the driver's progress queries that never takes a write lock.

    Not Herald's ``make_engine``: on SQLite that begins every transaction with ``BEGIN
    IMMEDIATE``, so polling would queue for, and hold, the one write lock that the API,
    dispatcher and workers share. A plain pysqlite connection reads a WAL snapshot instead.
    """
    from sqlalchemy import create_engine

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=1)


def write_ids_file(path: Path, n: int, *, prefix: str = "user-", pad: int = 0, start: int = 0) -> int:
    """A drop file of ``n`` distinct user ids, written in 1 MiB-ish blocks (10 million lines in a few
    seconds); with ``pad`` > 0 a CSV ``user_id,pad`` whose second column is ``pad`` x's, so each
    webhook body is about as large as the other variants'. Returns the file's size."""
    block = 50_000
    with path.open("w", encoding="ascii", newline="\n") as out:
        if pad:
            out.write("user_id,pad\n")
            tail = "," + "x" * pad + "\n"
        else:
            tail = "\n"
        for first in range(start, start + n, block):
            last = min(first + block, start + n)
            out.write(tail.join(f"{prefix}{i:09d}" for i in range(first, last)) + tail)
    return path.stat().st_size


# ------------------------------------------------------------------ numbers


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "min_ms": round(min(ms), 2),
        "p50_ms": round(pct(ms, 50) or 0, 2),
        "p90_ms": round(pct(ms, 90) or 0, 2),
        "p99_ms": round(pct(ms, 99) or 0, 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def machine_info() -> dict[str, Any]:
    """The machine, the versions and the code measured (git commit and a hash of ``src/``)."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only git: which code was measured
        commit = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "describe", "--always", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        # "-dirty" for uncommitted code only: the results a run writes as it goes do not count.
        changed = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)bench/results"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()  # fmt: skip
        if commit and changed:
            commit += "-dirty"
    source = hashlib.sha256()
    for path in sorted((BENCH_DIR.parent / "src").rglob("*.py")):
        source.update(str(path.relative_to(BENCH_DIR.parent)).encode() + b"\0" + path.read_bytes())
    redis_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        redis_version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    import aiohttp
    import celery

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "aiohttp": aiohttp.__version__,
        "requests": requests.__version__,
        "redis_server": redis_version,
        "git_commit": commit,
        "src_sha256": source.hexdigest()[:16],
    }


def command_line() -> str:
    """How this run was started, for the results."""
    return " ".join(["python", *[str(a) for a in sys.argv]])


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


# ------------------------------------------------------------------ running a benchmark


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def harness(run: Callable[[argparse.Namespace, Processes, Path], int], args: argparse.Namespace) -> int:
    """Temp folder, child processes and Redis clean-up around ``run``, Ctrl-C and SIGTERM included."""
    # SIGTERM unwinds like Ctrl-C, so the clean-ups always run; SIGINT too when started with it
    # ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-", dir=getattr(args, "tmp_dir", None)))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    with contextlib.ExitStack() as cleanups:
        if not args.keep_temp:
            cleanups.callback(shutil.rmtree, tmp, ignore_errors=True)
        else:
            print(f"keeping {tmp}")

        def flush_claimed() -> None:
            for url in procs.cleanup_redis:
                flush_redis_db(url, keep_marker=False)

        cleanups.callback(flush_claimed)
        cleanups.callback(procs.stop_all)
        try:
            return run(args, procs, tmp)
        except KeyboardInterrupt:
            # Let the clean-ups finish even if Ctrl-C is pressed again.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("\ninterrupted; stopping processes and removing temp files", file=sys.stderr)
            return 130
        except Exception:
            for name in procs.started:
                print(f"--- {name} log tail ---\n{procs.tail(name, 15)}", file=sys.stderr)
            raise


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--redis-url", default="", help="use this (shared, loopback) Redis instead of a private one")
    parser.add_argument("--redis-db", type=int, default=0, help="first DB index on --redis-url")
    parser.add_argument("--herald-env", action="append", default=[], help="HERALD_NAME=value, repeatable")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp folder (logs, SQLite files)")
