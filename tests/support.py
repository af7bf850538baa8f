"""Test support: a real webhook receiver on loopback, Herald processes, and waiting helpers."""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import redis
from aiohttp import web
from pydantic import BaseModel, SecretStr
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from herald.config import Settings
from herald.store.db import make_engine
from herald.store.migrate import upgrade
from herald.store.models import Base
from herald.worker.celery_app import DELIVER_BATCH


def wait_until(
    predicate: Callable[[], Any], *, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    webhook_id: str
    timestamp: str
    body: bytes
    at: float
    status: int


class ThreadedServer:
    """An aiohttp app served on 127.0.0.1 from its own thread and event loop."""

    def __init__(self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.path = path
        self.handler = handler
        self.port = 0

    def start(self, port: int = 0) -> int:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post(self.path, self.handler)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024).start()
            self.port = self._runner.addresses[0][1]
            ready.set()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.port

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


Behaviour = Callable[[str, int], "int | tuple[int, dict[str, str]]"]


@dataclass
class Receiver:
    """An aiohttp server in a thread. ``behaviour(webhook_id, nth_call) -> status`` decides answers;
    every request's signature is verified against ``secrets`` (if any are set)."""

    behaviour: Behaviour = lambda _id, _n: 200
    delay_s: float = 0.0
    secrets: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    port: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ids(self) -> set[str]:
        return {r.webhook_id for r in self.received}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if self.secrets and not any(self._verifies(s, body, headers) for s in self.secrets):
            self.bad_signatures += 1
        webhook_id = headers.get("webhook-id", "")
        self.calls[webhook_id] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        answer = self.behaviour(webhook_id, self.calls[webhook_id])
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        self.received.append(Received(webhook_id, headers.get("webhook-timestamp", ""), body, time.time(), status))
        return web.Response(status=status, headers=extra, text="ok")

    @staticmethod
    def _verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
        try:
            Webhook(secret).verify(body, headers)
            return True
        except Exception:
            return False

    def start(self) -> Receiver:
        self._server = ThreadedServer("/hook", self._handle)
        self.port = self._server.start(self.port)
        return self

    def stop(self) -> None:
        self._server.stop()


def settings_env(settings: Settings) -> dict[str, str]:
    """``HERALD_*`` variables that make a child process build the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}

    def put(name: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for sub in type(value).model_fields:
                put(f"{name}__{sub.upper()}", getattr(value, sub))
        elif isinstance(value, SecretStr):
            env[name] = value.get_secret_value()
        elif isinstance(value, list):
            env[name] = ",".join(str(v) for v in value)
        elif value is not None:
            env[name] = str(value)

    for name in Settings.model_fields:
        put(f"HERALD_{name.upper()}", getattr(settings, name))
    return env


class Processes:
    """Herald's parts as real child processes (``python -m herald.cli …``), stopped at teardown."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.env = settings_env(settings)
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "herald.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = proc
        return proc

    def worker(
        self, name: str = "worker", lanes: str = "otp,transactional,bulk", concurrency: int = 2, *, wait: bool = False
    ) -> None:
        """Start a Celery worker; with ``wait``, return once it consumes (timing-sensitive tests)."""
        self.start(name, "worker", "--lanes", lanes, "--concurrency", str(concurrency), "--name", f"{name}@%h")
        if wait:
            wait_until(lambda: " ready." in self.log(name), timeout_s=60, what=f"{name} to be ready")

    def dispatcher(self, name: str = "dispatcher") -> None:
        self.start(name, "scheduler")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker and its pool children)."""
        proc = self.running.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for name in list(self.running):
            proc = self.running[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(name)
                    continue
            self.running.pop(name, None)


def queued_messages(client: redis.Redis, queue: str) -> list[tuple[list[str], datetime]]:
    """The Celery broker's messages (kombu's Redis transport keeps a queue as a list; ``LPUSH``
    publishes): the id batch and the claim's lease of every message waiting in ``queue``, oldest first."""
    messages = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH: the newest is at the head
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        assert envelope["properties"]["body_encoding"] == "base64"
        assert envelope["headers"]["task"] == DELIVER_BATCH
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert set(kwargs) == {"lease"}
        lease = datetime.fromisoformat(kwargs["lease"])
        assert lease.tzinfo is not None
        [ids] = args
        messages.append((ids, lease))
    return messages


def queued_batches(client: redis.Redis, queue: str) -> list[list[str]]:
    """The id batches of every message waiting in ``queue``, oldest first."""
    return [ids for ids, _lease in queued_messages(client, queue)]


def row_counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """How many rows every table holds: compare before and after to prove nothing was written."""
    tables = [t.name for t in Base.metadata.sorted_tables]
    with sessions() as session:
        row = session.execute(text("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in tables))).one()
    return dict(zip(tables, row, strict=True))


def assert_problem(answer: httpx2.Response, status: int, code: str, field: str | None) -> dict[str, Any]:
    """An RFC 9457 answer with Herald's ``code`` that names ``field`` among its errors."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"urn:herald:problem:{code}"
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


class MailSink:
    """A real SMTP server (aiosmtpd) on loopback that keeps every message it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[email.message.Message] = []
        self.port = free_port()
        sink = self

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
                sink.messages.append(email.message_from_bytes(envelope.content))
                return "250 2.0.0 Ok: queued"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> MailSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def to(self, address: str) -> list[email.message.Message]:
        return [m for m in self.messages if m["To"] == address]


@dataclass
class SmsProvider:
    """A generic JSON SMS provider on loopback: records ``{to, from, text, reference}`` bodies."""

    status: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sms"

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.json_response({"id": f"msg-{len(self.received)}"}, status=self.status)

    def start(self) -> SmsProvider:
        self._server = ThreadedServer("/sms", self._handle)
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("to") == number]


def sqlite_database(tmp_path: Path) -> str:
    """A migrated SQLite file (modules that pin themselves to SQLite override ``database_url`` with it)."""
    url = f"sqlite:///{tmp_path / 'herald.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url
