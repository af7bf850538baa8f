"""The SMS channel: one HTTP provider interface, two adapters, failover and a circuit breaker.

``JsonSmsProvider`` POSTs a generic JSON body, ``TwilioSmsProvider`` speaks Twilio's form API;
both send the delivery id as the provider's idempotency key. ``SmsChannel`` tries the primary,
then the secondary when the primary fails transiently or its circuit is open. Outcomes:

    2xx                                        Sent(provider=<name>)
    429, 503                                   TransientChannelError(retry_after_s=Retry-After)  failover
    401, 403, 408, 409, 425, 5xx, other codes  TransientChannelError                             failover
    other 4xx (Twilio: 400 {"code": 21211})    PermanentChannelError                             no failover
    timeout, refused, reset                    TransientChannelError                             failover

A provider refusing our credentials is an outage of that provider, not a verdict on the message,
hence 401/403 fail over. Phone numbers and texts (OTP codes travel in them) never reach logs or
error texts: a provider's answer is stripped of both and redacted before it is kept.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import yarl

from herald.channels.base import ChannelLifecycle, Sent, SmsMessage
from herald.channels.email import outbox_path, write_atomic
from herald.channels.webhook import parse_retry_after
from herald.config import SmsProviderSettings, SmsSettings
from herald.errors import ChannelError, ConfigError, PermanentChannelError, TransientChannelError
from herald.logs import redact

logger = logging.getLogger(__name__)

OUTBOX_PROVIDER = "outbox"
TWILIO_URL = "https://api.twilio.com"
ERROR_CHARS = 200
KEEPALIVE_S = 30.0
MAX_BODY_BYTES = 16 * 1024
USER_AGENT = "Herald-SMS/0.1"

_TRANSIENT_4XX = frozenset({401, 403, 408, 409, 425, 429})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_SNIPPET_CHARS = 300
_MAX_CODE = 1_000_000  # provider error codes are short; a longer number could be a phone number


# -- circuit breaker --------------------------------------------------------------------------


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    """Stops calling a failing provider for a while.

    closed → open after ``failures`` consecutive failures → half-open once ``reset_s`` have passed,
    letting one trial call through → closed on its success, open again (for ``reset_s``) on its
    failure. Call ``allow()`` before each call and record its outcome. Pure and meant for one
    event loop; ``clock`` is injectable for tests. A trial whose outcome is never recorded (its
    caller was cancelled) stops blocking the next trial after another ``reset_s``.
    """

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures}")
        if reset_s <= 0:
            raise ValueError(f"reset_s must be positive, got {reset_s}")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None  # None while closed
        self._trial_at: float | None = None  # when the current half-open trial was let through

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.closed
        if self._trial_at is not None or self._clock() - self._opened_at >= self.reset_s:
            return CircuitState.half_open
        return CircuitState.open

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, True once (the trial) per ``reset_s``."""
        if self._opened_at is None:
            return True
        now = self._clock()
        since = self._trial_at if self._trial_at is not None else self._opened_at
        if now - since < self.reset_s:
            return False
        self._trial_at = now
        return True

    def retry_in_s(self) -> float:
        """Seconds until ``allow()`` would let a call through; 0 when it would now."""
        if self._opened_at is None:
            return 0.0
        since = self._trial_at if self._trial_at is not None else self._opened_at
        return max(0.0, self.reset_s - (self._clock() - since))

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_at = None

    def record_failure(self) -> None:
        """Count a failure; the ``failures``-th in a row, or any later one, (re)opens the circuit."""
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._opened_at = self._clock()
            self._trial_at = None


# -- providers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmsSent(Sent):
    """A successful SMS attempt, with the provider's own message id when its answer had one."""

    message_id: str | None = None


class SmsProvider(Protocol):
    """One SMS gateway: ``send`` returns ``Sent`` or raises a ``ChannelError``, both naming ``name``."""

    @property
    def name(self) -> str: ...

    async def send(self, message: SmsMessage) -> Sent: ...


def provider_name(settings: SmsProviderSettings) -> str:
    """The ``name`` setting, else the kind and host (``twilio:api.twilio.com``)."""
    if settings.name:
        return settings.name
    url = settings.url or (TWILIO_URL if settings.kind == "twilio" else "")
    return f"{settings.kind}:{yarl.URL(url).host or '?'}"


def check_provider(settings: SmsProviderSettings, *, role: str) -> None:
    """Raise ``ConfigError`` naming the ``HERALD_SMS__<ROLE>__…`` key when the settings cannot work."""
    prefix = f"HERALD_SMS__{role.upper()}__"
    if settings.kind == "json" and not settings.url:
        raise ConfigError(f"{prefix}URL: required for kind 'json', got ''")
    if settings.url:
        try:
            url = yarl.URL(settings.url)
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"{prefix}URL: must be an http(s) URL, got {settings.url!r}")
    if settings.kind == "twilio":
        if not settings.account_sid or ":" in settings.account_sid:
            raise ConfigError(
                f"{prefix}ACCOUNT_SID: required for kind 'twilio', without ':', got {settings.account_sid!r}"
            )
        if not settings.sender:
            raise ConfigError(f"{prefix}SENDER: required for kind 'twilio' (the From number), got ''")


class _HttpProvider:
    """What both adapters share: the session, the POST and the classification of answers."""

    def __init__(self, settings: SmsProviderSettings, *, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.name = provider_name(settings)
        self._settings = settings
        self._session = session
        self._timeout_s = timeout_s

    async def _post(self, url: str, message: SmsMessage, **request: Any) -> tuple[int, bytes]:
        """POST and return the status and the start of the body; raise for any other status or no answer."""
        try:
            async with self._session.post(url, allow_redirects=False, **request) as response:
                body = await _read_head(response)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            raise self._no_answer(exc) from exc
        if not 200 <= status < 300:
            raise self._refusal(status, body, retry_after, message)
        return status, body

    def _refusal(self, status: int, body: bytes, retry_after: str | None, message: SmsMessage) -> ChannelError:
        code, detail = _detail(body)
        # The code is a bare number of a few digits, which redaction would mask as a possible OTP.
        prefix = f"{self.name}: HTTP {status}" + (f", error {code}" if code is not None else "")
        text = _text(prefix, detail, message)
        if status in _RETRY_AFTER_STATUSES:
            return TransientChannelError(
                text, status_code=status, provider=self.name, retry_after_s=parse_retry_after(retry_after)
            )
        if 400 <= status < 500 and status not in _TRANSIENT_4XX:
            return PermanentChannelError(text, status_code=status, provider=self.name)
        return TransientChannelError(text, status_code=status, provider=self.name)

    def _no_answer(self, exc: Exception) -> TransientChannelError:
        """The error for an attempt that got no response: always transient (another try may work)."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            reason = "connect timeout"
        elif isinstance(exc, TimeoutError):
            reason = f"timeout after {self._timeout_s}s"
        elif isinstance(exc, aiohttp.ClientConnectorDNSError):
            reason = "DNS lookup failed"
        elif isinstance(exc, aiohttp.ClientSSLError):
            reason = f"TLS error: {exc.os_error}"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            refused = exc.os_error.errno == errno.ECONNREFUSED
            reason = "connection refused" if refused else f"connection failed: {exc.os_error.strerror or exc.os_error}"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            reason = "server disconnected"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return TransientChannelError(redact(f"{self.name}: {reason}", limit=ERROR_CHARS), provider=self.name)


class JsonSmsProvider(_HttpProvider):
    """A generic JSON gateway: POST ``{"to", "from", "text", "reference"}`` to ``url``.

    Sends ``Authorization: Bearer <auth_token>`` when a token is set and ``Idempotency-Key:
    <delivery_id>``. Any 2xx is sent; ``id`` (or ``message_id``, ``messageId``, ``sid``) in a JSON
    answer becomes ``SmsSent.message_id``.
    """

    async def send(self, message: SmsMessage) -> Sent:
        headers = {"Idempotency-Key": message.delivery_id}
        token = self._settings.auth_token.get_secret_value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = {
            "to": message.to,
            "from": self._settings.sender or None,
            "text": message.text,
            "reference": message.delivery_id,
        }
        status, body = await self._post(self._settings.url, message, json=payload, headers=headers)
        return SmsSent(status_code=status, provider=self.name, message_id=_message_id(body))


class TwilioSmsProvider(_HttpProvider):
    """Twilio's Messages API (or a compatible one at ``url``): a form POST with HTTP basic auth.

    Posts ``To``, ``From``, ``Body`` to ``{url}/2010-04-01/Accounts/{account_sid}/Messages.json``
    with ``I-Twilio-Idempotency-Token: <delivery_id>``. 200/201 is sent (``sid`` becomes
    ``SmsSent.message_id``); a 400 carries Twilio's error code (21211: invalid number) and is
    permanent.
    """

    def __init__(self, settings: SmsProviderSettings, *, session: aiohttp.ClientSession, timeout_s: float) -> None:
        super().__init__(settings, session=session, timeout_s=timeout_s)
        base = (settings.url or TWILIO_URL).rstrip("/")
        self._url = f"{base}/2010-04-01/Accounts/{quote(settings.account_sid, safe='')}/Messages.json"
        # Built by hand: aiohttp 3.14 deprecates BasicAuth, and its replacement is not in 3.10.
        credentials = f"{settings.account_sid}:{settings.auth_token.get_secret_value()}".encode()
        self._authorization = "Basic " + base64.b64encode(credentials).decode("ascii")

    async def send(self, message: SmsMessage) -> Sent:
        form = {"To": message.to, "From": self._settings.sender, "Body": message.text}
        headers = {"Authorization": self._authorization, "I-Twilio-Idempotency-Token": message.delivery_id}
        status, body = await self._post(self._url, message, data=form, headers=headers)
        return SmsSent(status_code=status, provider=self.name, message_id=_message_id(body))


def make_provider(settings: SmsProviderSettings, *, session: aiohttp.ClientSession, timeout_s: float) -> SmsProvider:
    """The adapter for ``settings.kind``."""
    if settings.kind == "twilio":
        return TwilioSmsProvider(settings, session=session, timeout_s=timeout_s)
    return JsonSmsProvider(settings, session=session, timeout_s=timeout_s)


# -- the channel ------------------------------------------------------------------------------


@dataclass
class _Route:
    settings: SmsProviderSettings
    name: str
    breaker: CircuitBreaker
    provider: SmsProvider | None = None


class SmsChannel(ChannelLifecycle):
    """Delivers ``SmsMessage``s through the primary provider, failing over to the secondary.

    ``start()`` in the event loop that will send and ``close()`` before that loop ends (or use
    ``async with``); one keep-alive HTTP session serves both providers and ``send`` may be called
    concurrently. Without a primary, messages are appended to ``{outbox_dir}/{delivery_id}.txt``
    (``settings.outbox_dir`` wins over ``outbox_dir``). Raises ``ConfigError`` for unusable
    provider settings. ``clock`` drives the circuit breakers (tests pass a fake one).
    """

    def __init__(self, settings: SmsSettings, *, outbox_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.secondary is not None and settings.primary is None:
            raise ConfigError("HERALD_SMS__SECONDARY__*: set without HERALD_SMS__PRIMARY__*")
        self._settings = settings
        self._outbox_dir = settings.outbox_dir or outbox_dir
        self._routes: list[_Route] = []
        for role, provider in (("primary", settings.primary), ("secondary", settings.secondary)):
            if provider is None:
                continue
            check_provider(provider, role=role)
            breaker = CircuitBreaker(settings.circuit_failures, settings.circuit_reset_s, clock)
            name = provider_name(provider)
            if any(route.name == name for route in self._routes):
                # Sent.provider and the circuits must tell the two apart.
                raise ConfigError(f"HERALD_SMS__SECONDARY__NAME: must differ from the primary's, got {name!r}")
            self._routes.append(_Route(provider, name, breaker))
        self._session: aiohttp.ClientSession | None = None
        self._started = False

    @property
    def uses_outbox(self) -> bool:
        """True when messages are written to the outbox folder instead of being sent."""
        return not self._routes

    def circuits(self) -> Mapping[str, CircuitState]:
        """Each provider's circuit state by provider name, primary first."""
        return {route.name: route.breaker.state for route in self._routes}

    async def start(self) -> None:
        """Open the HTTP session; calling it again while open does nothing."""
        if self._started:
            return
        self._started = True
        if self.uses_outbox:
            logger.warning("no SMS provider set (HERALD_SMS__PRIMARY__*): SMS are written to %s", self._outbox_dir)
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
        )
        try:
            for route in self._routes:
                route.provider = make_provider(
                    route.settings, session=self._session, timeout_s=self._settings.timeout_s
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the HTTP session; circuit states survive a restart."""
        self._started = False
        for route in self._routes:
            route.provider = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, message: SmsMessage) -> Sent:
        """Send one SMS; return ``Sent`` naming the provider used, else raise a ``ChannelError``.

        A transient failure or an open circuit at the primary moves the attempt to the secondary
        (a primary that timed out may still have delivered: the recipient can get two texts).
        When every provider fails, the ``TransientChannelError`` names the last one tried and
        lists each failure; ``retry_after_s`` is set only when every provider asked for a wait.
        """
        if not self._started:
            raise RuntimeError("SmsChannel.send() called before start()")
        if self.uses_outbox:
            return await self._write_outbox(message)
        failures: list[TransientChannelError] = []
        for route in self._routes:
            if route.provider is None:
                raise RuntimeError("SmsChannel.send() called while closing")
            if not route.breaker.allow():
                failures.append(
                    TransientChannelError(
                        f"{route.name}: circuit open", provider=route.name, retry_after_s=route.breaker.retry_in_s()
                    )
                )
                continue
            try:
                sent = await route.provider.send(message)
            except TransientChannelError as exc:
                self._failed(route, exc, message)
                failures.append(exc)
                continue
            except PermanentChannelError:
                # The provider answered and judged the message (an invalid or opted-out number):
                # it is healthy, and the number is bad at every provider, so no failover.
                route.breaker.record_success()
                raise
            route.breaker.record_success()
            return sent
        raise _exhausted(failures) from failures[-1]

    def _failed(self, route: _Route, exc: TransientChannelError, message: SmsMessage) -> None:
        before = route.breaker.state
        route.breaker.record_failure()
        extra = {"delivery_id": message.delivery_id, "provider": route.name, "status_code": exc.status_code}
        logger.warning("SMS provider failed: %s", exc.message, extra=extra)
        if before is not CircuitState.open and route.breaker.state is CircuitState.open:
            logger.error(
                "SMS provider %s: circuit open after %d consecutive failures, next trial in %.0fs",
                route.name,
                route.breaker.failures,
                route.breaker.retry_in_s(),
                extra=extra,
            )

    async def _write_outbox(self, message: SmsMessage) -> Sent:
        path = outbox_path(self._outbox_dir, message.delivery_id, ".txt")
        record = (
            f"Delivery-Id: {message.delivery_id}\nTo: {message.to}\nDate: {email.utils.formatdate(usegmt=True)}\n\n"
            f"{message.text}\n"
        ).encode()
        try:
            await asyncio.to_thread(_append_atomic, path, record)
        except OSError as exc:
            raise TransientChannelError(
                redact(f"outbox: cannot write {path}: {exc.strerror or exc}", limit=ERROR_CHARS),
                provider=OUTBOX_PROVIDER,
            ) from exc
        logger.info("SMS written to the outbox", extra={"delivery_id": message.delivery_id, "path": str(path)})
        return Sent(status_code=None, provider=OUTBOX_PROVIDER)


def _exhausted(failures: list[TransientChannelError]) -> TransientChannelError:
    last = failures[-1]
    waits = [failure.retry_after_s for failure in failures]
    return TransientChannelError(
        _cut("; ".join(failure.message for failure in failures)),
        status_code=last.status_code,
        provider=last.provider,
        retry_after_s=None if None in waits else min(w for w in waits if w is not None),
    )


def _append_atomic(path: Path, record: bytes) -> None:
    """Add ``record`` to ``path`` (a blank line apart) so that readers never see a partial file."""
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    write_atomic(path, old + b"\n" + record if old else record)


async def _read_head(response: aiohttp.ClientResponse) -> bytes:
    """Up to ``MAX_BODY_BYTES`` of the body; a read error ends the read (the status decides)."""
    head = bytearray()
    try:
        while len(head) < MAX_BODY_BYTES:
            chunk = await response.content.read(MAX_BODY_BYTES - len(head))
            if not chunk:
                break
            head += chunk
    except (aiohttp.ClientError, TimeoutError):
        pass
    return bytes(head)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _message_id(body: bytes) -> str | None:
    data = _json(body)
    if not isinstance(data, dict):
        return None
    for key in ("id", "message_id", "messageId", "sid"):
        value = data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def _detail(body: bytes) -> tuple[int | None, str]:
    """A provider's error answer: its numeric error code (Twilio's 21211) and one line of text."""
    data = _json(body)
    if isinstance(data, dict):
        code, text = data.get("code"), data.get("message") or data.get("error") or data.get("detail")
        if isinstance(text, dict):
            text = text.get("message")
        number = code if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < _MAX_CODE else None
        if number is not None or isinstance(text, str):
            return number, text if isinstance(text, str) else ""
    return None, " ".join(body[: _SNIPPET_CHARS * 4].decode("utf-8", "replace").split())


def _text(prefix: str, detail: str, message: SmsMessage) -> str:
    """``prefix: detail`` with the number and text stripped from ``detail`` and the rest redacted."""
    for value in (message.to, message.text):
        if value:
            detail = detail.replace(value, "***")
    detail = redact(detail[:_SNIPPET_CHARS])
    return _cut(f"{prefix}: {detail}" if detail else prefix)


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"
