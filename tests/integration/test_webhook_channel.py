"""WebhookChannel against a real aiohttp receiver on loopback, run in the test's own event loop."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from standardwebhooks import Webhook

from herald.channels.base import Sent, WebhookMessage
from herald.channels.webhook import WebhookChannel, parse_retry_after
from herald.config import WebhookSettings
from herald.errors import ChannelError, PermanentChannelError, TransientChannelError

T = TypeVar("T")
SECRET = "whsec_" + base64.b64encode(b"integration-test-key-32-bytes!!!").decode()
BODY = b'{"type":"ticket.escalated","subject":"ticket:4711"}'


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_settings(**overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {"allow_networks": ["127.0.0.0/8"], "connect_timeout_s": 1.0, "total_timeout_s": 3.0}
    return WebhookSettings(**(values | overrides))


def message(url: str, **fields: Any) -> WebhookMessage:
    values: dict[str, Any] = {"delivery_id": "dlv_01HX3Y", "url": url, "secrets": [SECRET], "body": BODY}
    return WebhookMessage(**(values | fields))


# -- the receiver ---------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    peer_port: int


Handler = Callable[[web.Request, "Receiver"], Awaitable[web.StreamResponse]]


async def ok(request: web.Request, receiver: Receiver) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


def answer(status: int, text: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return handler


class Receiver:
    """An aiohttp server on 127.0.0.1 that records every request, then answers with ``handler``.

    Handlers that stall wait on ``release``, which is set before the server shuts down.
    """

    def __init__(self, handler: Handler = ok) -> None:
        self.handler = handler
        self.hits: list[Hit] = []
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site.port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.hits.append(Hit(request.path, request.headers, await request.read(), peer[1] if peer else -1))
        return await self.handler(request, self)


async def failure(channel: WebhookChannel, msg: WebhookMessage) -> ChannelError:
    with pytest.raises(ChannelError) as info:
        await channel.send(msg)
    return info.value


# -- delivery -------------------------------------------------------------------------------


def test_delivers_a_signed_message() -> None:
    async def scenario() -> tuple[Sent, Receiver]:
        async with Receiver() as receiver, WebhookChannel(make_settings(user_agent="Herald-Test/1")) as channel:
            sent = await channel.send(message(receiver.url + "/hook", headers={"X-Tenant": "acme"}))
        return sent, receiver

    sent, receiver = run(scenario())

    assert sent == Sent(status_code=200)
    [hit] = receiver.hits
    assert hit.path == "/hook"
    assert hit.body == BODY
    assert hit.headers["webhook-id"] == "dlv_01HX3Y"
    assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["user-agent"] == "Herald-Test/1"
    assert hit.headers["x-tenant"] == "acme"
    assert hit.headers["accept-encoding"] == "identity"  # no compressed body to inflate
    Webhook(SECRET).verify(hit.body, dict(hit.headers), json_parse=False)


def test_rotated_secrets_both_verify() -> None:
    new_secret = "whsec_" + base64.b64encode(b"n" * 24).decode()

    async def scenario() -> Receiver:
        async with Receiver() as receiver, WebhookChannel(make_settings()) as channel:
            await channel.send(message(receiver.url + "/hook", secrets=[SECRET, new_secret]))
        return receiver

    [hit] = run(scenario()).hits
    for secret in (SECRET, new_secret):
        Webhook(secret).verify(hit.body, dict(hit.headers), json_parse=False)


def test_message_headers_cannot_replace_the_signature_headers() -> None:
    async def scenario() -> Receiver:
        async with Receiver() as receiver, WebhookChannel(make_settings()) as channel:
            headers = {"Webhook-Id": "forged", "WEBHOOK-SIGNATURE": "v1,forged", "Content-Length": "1"}
            await channel.send(message(receiver.url + "/hook", headers=headers))
        return receiver

    [hit] = run(scenario()).hits
    assert hit.headers.getall("webhook-id") == ["dlv_01HX3Y"]
    assert len(hit.headers.getall("webhook-signature")) == 1
    Webhook(SECRET).verify(hit.body, dict(hit.headers), json_parse=False)


def test_connections_are_kept_alive_and_reused() -> None:
    async def scenario() -> Receiver:
        async with Receiver() as receiver, WebhookChannel(make_settings()) as channel:
            for n in range(5):
                await channel.send(message(receiver.url + f"/hook/{n}", delivery_id=f"dlv_{n}"))
        return receiver

    receiver = run(scenario())

    assert receiver.paths() == [f"/hook/{n}" for n in range(5)]
    assert len({hit.peer_port for hit in receiver.hits}) == 1


def test_error_bodies_do_not_cost_the_connection() -> None:
    async def scenario() -> Receiver:
        async with Receiver(answer(500, "boom")) as receiver, WebhookChannel(make_settings()) as channel:
            for _ in range(3):
                await failure(channel, message(receiver.url + "/hook"))
        return receiver

    assert len({hit.peer_port for hit in run(scenario()).hits}) == 1


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, PermanentChannelError),
        (401, PermanentChannelError),
        (404, PermanentChannelError),
        (413, PermanentChannelError),
        (422, PermanentChannelError),
        (408, TransientChannelError),
        (409, TransientChannelError),
        (425, TransientChannelError),
        (429, TransientChannelError),
        (500, TransientChannelError),
        (502, TransientChannelError),
        (503, TransientChannelError),
        (504, TransientChannelError),
    ],
)
def test_status_codes_are_classified(status: int, kind: type[ChannelError]) -> None:
    async def scenario() -> ChannelError:
        async with Receiver(answer(status, "nope")) as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook"))

    error = run(scenario())

    assert type(error) is kind
    assert error.status_code == status
    assert error.message == f"HTTP {status}: nope"
    if isinstance(error, PermanentChannelError):
        assert not error.disable_endpoint


def test_gone_disables_the_endpoint() -> None:
    async def scenario() -> ChannelError:
        async with Receiver(answer(410)) as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook"))

    error = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.disable_endpoint
    assert error.status_code == 410


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_sent(status: int) -> None:
    async def scenario() -> Sent:
        async with Receiver(answer(status)) as receiver, WebhookChannel(make_settings()) as channel:
            return await channel.send(message(receiver.url + "/hook"))

    assert run(scenario()) == Sent(status_code=status)


def test_error_text_is_short_and_redacted() -> None:
    body = "user jane@example.com failed, token=abc123 " + "x" * 5000

    async def scenario() -> ChannelError:
        async with Receiver(answer(500, body)) as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook"))

    error = run(scenario())

    assert error.message.startswith("HTTP 500: user ***@*** failed, token=***")
    assert len(error.message) <= 200


def test_redirects_are_not_followed() -> None:
    async def redirect(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        if request.path == "/hook":
            raise web.HTTPFound(receiver.url + "/target")
        return web.Response(text="should not be reached")

    async def scenario() -> tuple[ChannelError, Receiver]:
        async with Receiver(redirect) as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook")), receiver

    error, receiver = run(scenario())

    assert isinstance(error, TransientChannelError)
    assert error.status_code == 302
    assert "not followed" in error.message
    assert receiver.paths() == ["/hook"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds(status: int) -> None:
    async def scenario() -> ChannelError:
        handler = answer(status, headers={"Retry-After": "7"})
        async with Receiver(handler) as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook"))

    error = run(scenario())

    assert isinstance(error, TransientChannelError)
    assert error.retry_after_s == 7


def test_retry_after_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)

    async def scenario() -> ChannelError:
        async with Receiver(answer(503, headers={"Retry-After": when})) as receiver:
            async with WebhookChannel(make_settings()) as channel:
                return await failure(channel, message(receiver.url + "/hook"))

    retry_after_s = run(scenario()).retry_after_s

    assert retry_after_s is not None
    assert 100 < retry_after_s <= 120


def test_retry_after_only_counts_on_429_and_503() -> None:
    async def scenario() -> ChannelError:
        async with Receiver(answer(500, headers={"Retry-After": "7"})) as receiver:
            async with WebhookChannel(make_settings()) as channel:
                return await failure(channel, message(receiver.url + "/hook"))

    assert run(scenario()).retry_after_s is None


_NOW = datetime(2026, 5, 9, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("1.5", 1.5),
        ("Sat, 09 May 2026 12:01:00 GMT", 60.0),
        ("Sat, 09 May 2026 11:00:00 GMT", 0.0),
        ("Sat, 09 May 2026 12:00:30 -0000", 30.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("7 seconds", None),
        ("Sat, 99 Foo 2026", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=_NOW) == seconds


# -- failures without a usable response -----------------------------------------------------


def test_a_hanging_receiver_times_out() -> None:
    async def hang(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        await receiver.release.wait()
        return web.Response()

    async def scenario() -> tuple[ChannelError, float]:
        async with Receiver(hang) as receiver, WebhookChannel(make_settings(total_timeout_s=0.5)) as channel:
            started = time.monotonic()
            error = await failure(channel, message(receiver.url + "/hook"))
            return error, time.monotonic() - started

    error, elapsed_s = run(scenario())

    assert isinstance(error, TransientChannelError)
    assert error.message == "timeout after 0.5s"
    assert error.status_code is None
    assert 0.4 < elapsed_s < 10  # stopped by the 0.5 s timeout, not by the receiver (which never answers)


def test_a_2xx_whose_body_stalls_still_counts_as_sent() -> None:
    async def stall(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        await response.write(b"accepted, and then nothing")
        await receiver.release.wait()
        return response

    async def scenario() -> tuple[Sent, float]:
        async with Receiver(stall) as receiver, WebhookChannel(make_settings(total_timeout_s=0.5)) as channel:
            started = time.monotonic()
            sent = await channel.send(message(receiver.url + "/hook"))
            return sent, time.monotonic() - started

    sent, elapsed_s = run(scenario())

    assert sent == Sent(status_code=200)
    assert elapsed_s < 10  # the stalled body would have kept it forever


@pytest.mark.parametrize("status", [200, 500])
def test_a_huge_response_body_is_not_read(status: int) -> None:
    total = 50 * 1024 * 1024
    chunk = b"x" * (64 * 1024)
    written = 0

    async def flood(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse(status=status, headers={"Content-Length": str(total)})
        await response.prepare(request)
        try:
            while written < total:
                await response.write(chunk)
                written += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: that is the point
        return response

    async def scenario() -> tuple[Sent | ChannelError, float]:
        async with Receiver(flood) as receiver, WebhookChannel(make_settings()) as channel:
            started = time.monotonic()
            try:
                outcome: Sent | ChannelError = await channel.send(message(receiver.url + "/hook"))
            except ChannelError as exc:
                outcome = exc
            return outcome, time.monotonic() - started

    outcome, elapsed_s = run(scenario())

    assert elapsed_s < 10
    assert written < total // 2  # back-pressure stopped the sender long before 50 MB
    if status == 200:
        assert outcome == Sent(status_code=200)
    else:
        assert isinstance(outcome, TransientChannelError)
        assert outcome.message.startswith("HTTP 500: xxx")
        assert len(outcome.message) <= 200


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on ``port`` now.

    async def scenario() -> ChannelError:
        async with WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(f"http://127.0.0.1:{port}/hook"))

    error = run(scenario())

    assert isinstance(error, TransientChannelError)
    assert error.message == "connection refused"
    assert error.status_code is None


# -- refused targets ------------------------------------------------------------------------


def test_loopback_is_refused_without_an_allow_list() -> None:
    async def scenario() -> tuple[ChannelError, Receiver]:
        async with Receiver() as receiver, WebhookChannel(make_settings(allow_networks=[])) as channel:
            return await failure(channel, message(receiver.url + "/hook")), receiver

    error, receiver = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.message.startswith("url: host is not a public address")
    assert receiver.hits == []


def test_a_bad_secret_is_permanent_and_sends_nothing() -> None:
    async def scenario() -> tuple[ChannelError, Receiver]:
        async with Receiver() as receiver, WebhookChannel(make_settings()) as channel:
            return await failure(channel, message(receiver.url + "/hook", secrets=["whsec_short"])), receiver

    error, receiver = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.message.startswith("secret: ")
    assert receiver.hits == []


def test_a_header_injection_is_permanent_and_sends_nothing() -> None:
    async def scenario() -> tuple[ChannelError, Receiver]:
        async with Receiver() as receiver, WebhookChannel(make_settings()) as channel:
            msg = message(receiver.url + "/hook", headers={"X-Note": "a\r\nX-Injected: 1"})
            return await failure(channel, msg), receiver

    error, receiver = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.message.startswith("invalid request: ")
    assert receiver.hits == []


def test_a_host_the_client_cannot_use_is_permanent() -> None:
    async def scenario() -> ChannelError:
        async with WebhookChannel(make_settings()) as channel:
            return await failure(channel, message("http://1.2.3.4.5/hook"))

    error = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.message.startswith("url: ")


class StaticResolver(AbstractResolver):
    """Answers from a table instead of DNS; unknown names fail as DNS would."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError(None, "Name or service not known")
        return [
            ResolveResult(hostname=host, host=self.answers[host], port=port, family=socket.AF_INET, proto=0, flags=0)
        ]

    async def close(self) -> None:
        pass


def named(receiver: Receiver, host: str) -> str:
    return receiver.url.replace("127.0.0.1", host) + "/hook"


def test_names_are_resolved_through_the_guard() -> None:
    async def scenario() -> tuple[Sent, Receiver]:
        resolver = StaticResolver({"hooks.example.test": "127.0.0.1"})
        async with Receiver() as receiver, WebhookChannel(make_settings(), resolver=resolver) as channel:
            return await channel.send(message(named(receiver, "hooks.example.test"))), receiver

    sent, receiver = run(scenario())

    assert sent == Sent(status_code=200)
    assert receiver.hits[0].headers["host"].startswith("hooks.example.test:")


def test_a_name_resolving_to_a_blocked_address_is_permanent() -> None:
    async def scenario() -> tuple[ChannelError, Receiver]:
        resolver = StaticResolver({"rebound.example.test": "127.0.0.1"})
        settings = make_settings(allow_networks=[])
        async with Receiver() as receiver, WebhookChannel(settings, resolver=resolver) as channel:
            return await failure(channel, message(named(receiver, "rebound.example.test"))), receiver

    error, receiver = run(scenario())

    assert isinstance(error, PermanentChannelError)
    assert error.message == "url: host resolves only to non-public addresses"
    assert "127.0.0.1" not in error.message
    assert receiver.hits == []


def test_a_dns_failure_is_transient() -> None:
    async def scenario() -> ChannelError:
        async with WebhookChannel(make_settings(), resolver=StaticResolver({})) as channel:
            return await failure(channel, message("http://nowhere.example.test/hook"))

    error = run(scenario())

    assert isinstance(error, TransientChannelError)
    assert error.message == "DNS lookup failed"


def test_send_before_start_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="before start"):
        run(WebhookChannel(make_settings()).send(message("http://127.0.0.1/hook")))
