"""SmsChannel against real aiohttp provider servers on loopback, run in the test's own event loop."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from herald.channels.base import Sent, SmsMessage
from herald.channels.sms import CircuitState, SmsChannel, SmsSent
from herald.config import SmsProviderSettings, SmsSettings
from herald.errors import ChannelError, ConfigError, PermanentChannelError, TransientChannelError
from tests.support import free_port

T = TypeVar("T")
PHONE = "+4915112345678"
CODE = "482913"
TEXT = f"Your Acme code is {CODE}"
TOKEN = "tok_live_abc123"
SID = "AC0123456789abcdef"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sms(delivery_id: str = "dlv_01HX3YSMS") -> SmsMessage:
    return SmsMessage(delivery_id=delivery_id, to=PHONE, text=TEXT)


def json_provider(url: str, name: str = "alpha", **fields: Any) -> SmsProviderSettings:
    values: dict[str, Any] = {"kind": "json", "url": url, "auth_token": TOKEN, "sender": "ACME", "name": name}
    return SmsProviderSettings(**(values | fields))


def twilio_provider(url: str, name: str = "twilio", **fields: Any) -> SmsProviderSettings:
    values: dict[str, Any] = {
        "kind": "twilio",
        "url": url,
        "account_sid": SID,
        "auth_token": TOKEN,
        "sender": "+15005550006",
        "name": name,
    }
    return SmsProviderSettings(**(values | fields))


def sms_settings(
    primary: SmsProviderSettings | None, secondary: SmsProviderSettings | None = None, **fields: Any
) -> SmsSettings:
    values: dict[str, Any] = {"primary": primary, "secondary": secondary, "timeout_s": 2.0}
    return SmsSettings(**(values | fields))


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the provider servers -------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {key: values[0] for key, values in parse_qs(self.body.decode()).items()}


Handler = Callable[[web.Request, "Gateway"], Awaitable[web.StreamResponse]]


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request, gateway: Gateway) -> web.StreamResponse:
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return handler


async def echo_500(request: web.Request, gateway: Gateway) -> web.StreamResponse:
    """A provider failing with the request echoed back: numbers and codes must not leak from it."""
    return web.Response(status=500, text=f"upstream error for {PHONE}: {TEXT!r} raw={gateway.hits[-1].body!r}")


async def stall(request: web.Request, gateway: Gateway) -> web.StreamResponse:
    await gateway.release.wait()
    return web.Response(status=200)


class Gateway:
    """An SMS provider's HTTP API on 127.0.0.1: records each request, then answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.hits: list[Hit] = []
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Gateway:
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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(Hit(request.path, request.headers, await request.read()))
        return await self.handler(request, self)


async def failure(channel: SmsChannel, msg: SmsMessage) -> ChannelError:
    with pytest.raises(ChannelError) as info:
        await channel.send(msg)
    return info.value


# -- the adapters ---------------------------------------------------------------------------


def test_json_provider_request_shape(tmp_path: Path) -> None:
    async def scenario() -> tuple[Sent, Gateway]:
        async with Gateway(reply(202, {"id": "msg_789", "status": "queued"})) as gateway:
            settings = sms_settings(json_provider(gateway.url + "/v1/messages"))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                sent = await channel.send(sms())
        return sent, gateway

    sent, gateway = run(scenario())
    assert sent == SmsSent(status_code=202, provider="alpha", message_id="msg_789")
    [hit] = gateway.hits
    assert hit.path == "/v1/messages"
    assert hit.json() == {"to": PHONE, "from": "ACME", "text": TEXT, "reference": "dlv_01HX3YSMS"}
    assert hit.headers["Content-Type"].startswith("application/json")
    assert hit.headers["Authorization"] == f"Bearer {TOKEN}"
    assert hit.headers["Idempotency-Key"] == "dlv_01HX3YSMS"


def test_json_provider_without_token_sends_no_authorization(tmp_path: Path) -> None:
    async def scenario() -> tuple[Sent, Gateway]:
        async with Gateway(reply(200, body=None)) as gateway:
            settings = sms_settings(json_provider(gateway.url, auth_token=""))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                sent = await channel.send(sms())
        return sent, gateway

    sent, gateway = run(scenario())
    assert sent == SmsSent(status_code=200, provider="alpha", message_id=None)
    assert "Authorization" not in gateway.hits[0].headers


def test_twilio_provider_request_shape(tmp_path: Path) -> None:
    async def scenario() -> tuple[Sent, Gateway]:
        async with Gateway(reply(201, {"sid": "SM0123", "status": "queued"})) as gateway:
            async with SmsChannel(sms_settings(twilio_provider(gateway.url)), outbox_dir=tmp_path) as channel:
                sent = await channel.send(sms())
        return sent, gateway

    sent, gateway = run(scenario())
    assert sent == SmsSent(status_code=201, provider="twilio", message_id="SM0123")
    [hit] = gateway.hits
    assert hit.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert hit.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert hit.form() == {"To": PHONE, "From": "+15005550006", "Body": TEXT}
    assert hit.headers["Authorization"] == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert hit.headers["I-Twilio-Idempotency-Token"] == "dlv_01HX3YSMS"


def test_default_names_say_kind_and_host(tmp_path: Path) -> None:
    async def scenario() -> tuple[Sent, dict[str, CircuitState]]:
        async with Gateway(reply(500)) as first, Gateway(reply(200, {})) as second:
            settings = sms_settings(twilio_provider(first.url, name=""), json_provider(second.url, name=""))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                return await channel.send(sms()), dict(channel.circuits())

    sent, circuits = run(scenario())
    assert sent.provider == "json:127.0.0.1"
    assert circuits == {"twilio:127.0.0.1": CircuitState.closed, "json:127.0.0.1": CircuitState.closed}


# -- failover -------------------------------------------------------------------------------


def test_fails_over_when_the_primary_answers_500_without_leaking_number_or_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[Sent, Gateway, Gateway]:
        async with Gateway(echo_500) as primary, Gateway(reply(200, {"id": "b-1"})) as secondary:
            settings = sms_settings(json_provider(primary.url), json_provider(secondary.url, name="beta"))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                sent = await channel.send(sms())
        return sent, primary, secondary

    with caplog.at_level(logging.DEBUG):
        sent, primary, secondary = run(scenario())
    assert sent.provider == "beta"
    assert len(primary.hits) == 1 and len(secondary.hits) == 1
    assert secondary.hits[0].headers["Idempotency-Key"] == "dlv_01HX3YSMS"
    failover = [r for r in caplog.records if r.name == "herald.channels.sms" and r.levelno == logging.WARNING]
    assert failover and "alpha: HTTP 500" in failover[0].getMessage()
    for record in caplog.records:
        text = record.getMessage()
        assert PHONE not in text and PHONE[1:] not in text and CODE not in text and TEXT not in text


@pytest.mark.parametrize(
    "primary_handler",
    [reply(500), reply(503, headers={"Retry-After": "30"}), reply(401, {"message": "bad token"}), stall],
    ids=["500", "503", "401-credentials", "timeout"],
)
def test_fails_over_on_transient_failures(tmp_path: Path, primary_handler: Handler) -> None:
    async def scenario() -> tuple[Sent, Gateway]:
        async with Gateway(primary_handler) as primary, Gateway(reply(200, {})) as secondary:
            settings = sms_settings(
                json_provider(primary.url), json_provider(secondary.url, name="beta"), timeout_s=0.3
            )
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                sent = await channel.send(sms())
            assert len(primary.hits) == 1
        return sent, secondary

    sent, secondary = run(scenario())
    assert sent.provider == "beta"
    assert len(secondary.hits) == 1


def test_fails_over_when_the_primary_is_down(tmp_path: Path) -> None:
    async def scenario() -> Sent:
        async with Gateway(reply(200, {})) as secondary:
            down = f"http://127.0.0.1:{free_port()}"
            settings = sms_settings(json_provider(down), json_provider(secondary.url, name="beta"))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                return await channel.send(sms())

    assert run(scenario()).provider == "beta"


def test_a_permanent_refusal_is_not_failed_over(tmp_path: Path) -> None:
    """Twilio says the number is invalid: it is invalid at every provider, so the secondary is not asked."""
    twilio_error = {
        "code": 21211,
        "message": f"The 'To' number {PHONE} is not a valid phone number.",
        "more_info": "https://www.twilio.com/docs/errors/21211",
        "status": 400,
    }

    async def scenario() -> tuple[ChannelError, Gateway, dict[str, CircuitState]]:
        async with Gateway(reply(400, twilio_error)) as primary, Gateway(reply(200, {})) as secondary:
            settings = sms_settings(twilio_provider(primary.url), json_provider(secondary.url, name="beta"))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                error = await failure(channel, sms())
                circuits = dict(channel.circuits())
        return error, secondary, circuits

    error, secondary, circuits = run(scenario())
    assert isinstance(error, PermanentChannelError)
    assert error.status_code == 400 and error.provider == "twilio"
    assert error.message.startswith("twilio: HTTP 400, error 21211: The 'To' number *** is not a valid phone number")
    assert PHONE not in error.message and PHONE[1:] not in error.message
    assert secondary.hits == []
    assert circuits["twilio"] is CircuitState.closed  # the provider answered: it is healthy


def test_when_every_provider_fails_the_error_names_the_last_and_lists_all(tmp_path: Path) -> None:
    async def scenario(secondary_retry_after: str | None) -> ChannelError:
        headers = {"Retry-After": secondary_retry_after} if secondary_retry_after else None
        async with (
            Gateway(reply(503, headers={"Retry-After": "20"})) as primary,
            Gateway(reply(429, headers=headers)) as secondary,
        ):
            settings = sms_settings(json_provider(primary.url), json_provider(secondary.url, name="beta"))
            async with SmsChannel(settings, outbox_dir=tmp_path) as channel:
                return await failure(channel, sms())

    error = run(scenario("5"))
    assert isinstance(error, TransientChannelError)
    assert error.provider == "beta" and error.status_code == 429
    assert error.message == "alpha: HTTP 503; beta: HTTP 429"
    assert error.retry_after_s == 5.0  # the sooner of the two waits
    assert run(scenario(None)).retry_after_s is None  # beta set no wait: retry on the usual schedule


# -- the circuit ----------------------------------------------------------------------------


def test_an_open_circuit_skips_the_primary_until_a_trial_succeeds(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with Gateway(reply(500)) as primary, Gateway(reply(200, {})) as secondary:
            settings = sms_settings(
                json_provider(primary.url),
                json_provider(secondary.url, name="beta"),
                circuit_failures=2,
                circuit_reset_s=30.0,
            )
            async with SmsChannel(settings, outbox_dir=tmp_path, clock=clock) as channel:
                for n in range(2):
                    assert (await channel.send(sms(f"dlv_{n}"))).provider == "beta"
                assert channel.circuits()["alpha"] is CircuitState.open
                assert len(primary.hits) == 2

                for n in range(2, 5):
                    assert (await channel.send(sms(f"dlv_{n}"))).provider == "beta"
                assert len(primary.hits) == 2  # not even called while open
                assert len(secondary.hits) == 5

                clock.now += 30.0
                primary.handler = reply(200, {"id": "a-1"})
                sent = await channel.send(sms("dlv_trial"))
                assert sent.provider == "alpha"  # the half-open trial went to the primary and worked
                assert channel.circuits()["alpha"] is CircuitState.closed
                assert len(primary.hits) == 3 and len(secondary.hits) == 5

    run(scenario())


def test_an_open_circuit_without_secondary_says_when_to_retry(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> tuple[ChannelError, ChannelError, Gateway]:
        async with Gateway(reply(500)) as primary:
            settings = sms_settings(json_provider(primary.url), circuit_failures=1, circuit_reset_s=30.0)
            async with SmsChannel(settings, outbox_dir=tmp_path, clock=clock) as channel:
                first = await failure(channel, sms())
                clock.now += 10.0
                second = await failure(channel, sms())
        return first, second, primary

    first, second, primary = run(scenario())
    assert isinstance(first, TransientChannelError) and first.status_code == 500
    assert isinstance(second, TransientChannelError)
    assert second.message == "alpha: circuit open" and second.provider == "alpha"
    assert second.retry_after_s == pytest.approx(20.0)
    assert len(primary.hits) == 1


# -- outbox and settings --------------------------------------------------------------------


def test_without_a_primary_sms_go_to_the_outbox(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = tmp_path / "outbox"

    async def scenario() -> list[Sent]:
        async with SmsChannel(SmsSettings(), outbox_dir=outbox) as channel:
            return [await channel.send(sms()), await channel.send(sms()), await channel.send(sms("dlv_other"))]

    with caplog.at_level(logging.INFO, logger="herald.channels.sms"):
        sent = run(scenario())
    assert sent == [Sent(status_code=None, provider="outbox")] * 3
    assert sorted(path.name for path in outbox.iterdir()) == ["dlv_01HX3YSMS.txt", "dlv_other.txt"]  # no temp files
    content = (outbox / "dlv_01HX3YSMS.txt").read_text()
    assert content.count(f"To: {PHONE}\n") == 2 and content.count(TEXT) == 2  # appended, not replaced
    assert content.startswith("Delivery-Id: dlv_01HX3YSMS\n")
    assert (outbox / "dlv_other.txt").stat().st_mode & 0o077 == 0  # holds codes: owner only
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(outbox) in warnings[0].getMessage()
    assert all(PHONE not in r.getMessage() and CODE not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (SmsSettings(primary=SmsProviderSettings(kind="json")), "HERALD_SMS__PRIMARY__URL"),
        (SmsSettings(primary=SmsProviderSettings(kind="json", url="ftp://x")), "HERALD_SMS__PRIMARY__URL"),
        (SmsSettings(primary=SmsProviderSettings(kind="twilio", sender="+1")), "HERALD_SMS__PRIMARY__ACCOUNT_SID"),
        (SmsSettings(primary=SmsProviderSettings(kind="twilio", account_sid="AC1")), "HERALD_SMS__PRIMARY__SENDER"),
        (SmsSettings(secondary=SmsProviderSettings(url="https://x.example")), "HERALD_SMS__SECONDARY"),
        (
            SmsSettings(primary=SmsProviderSettings(url="https://a.example"), secondary=SmsProviderSettings()),
            "HERALD_SMS__SECONDARY__URL",
        ),
        (
            SmsSettings(
                primary=SmsProviderSettings(url="https://a.example/v1"),
                secondary=SmsProviderSettings(url="https://a.example/v2"),
            ),
            "HERALD_SMS__SECONDARY__NAME",
        ),
    ],
)
def test_unusable_settings_name_the_key(tmp_path: Path, settings: SmsSettings, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        SmsChannel(settings, outbox_dir=tmp_path)
