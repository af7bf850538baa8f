"""The webhook channel: Standard Webhooks POSTs over one keep-alive connection pool per process.

Each attempt is signed afresh (new timestamp, same ``webhook-id``), checked against the SSRF
rules, sent without following redirects, and classified:

    2xx                                   Sent
    410 Gone                              PermanentChannelError(disable_endpoint=True)
    429, 503                              TransientChannelError(retry_after_s=Retry-After)
    3xx, 408, 409, 425, 5xx, other codes  TransientChannelError
    other 4xx                             PermanentChannelError
    timeout, refused, reset, DNS failure  TransientChannelError
    refused target (SSRF), bad secret     PermanentChannelError
"""

from __future__ import annotations

import errno
import re
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from herald.channels import signing
from herald.channels.base import ChannelLifecycle, Sent, WebhookMessage
from herald.channels.ssrf import BlockedAddressError, GuardedResolver, check_url, parse_allow
from herald.config import WebhookSettings
from herald.errors import (
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
    UnsafeUrlError,
    ValidationError,
)
from herald.logs import redact

# Longer than aiohttp's 15 s default: receivers such as nginx keep idle connections for 75 s,
# and a connection reused between bursts saves a TCP (and TLS) handshake per delivery.
KEEPALIVE_S = 30.0
ERROR_CHARS = 200
_MAX_CHECKED_URLS = 10_000

_TRANSIENT_4XX = frozenset({408, 409, 425, 429})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Framing headers would corrupt the pooled connection; signature headers are ours alone.
_RESERVED_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection", *signing.HEADER_NAMES))
_SECONDS = re.compile(r"-?\d+(\.\d+)?")
_SNIPPET_CHARS = ERROR_CHARS * 5
_DELIMITERS = " \"',;<>{}[]"  # whitespace is already collapsed to single spaces


class WebhookChannel(ChannelLifecycle):
    """Delivers ``WebhookMessage``s; one instance, and so one connection pool, per worker process.

    ``start()`` in the event loop that will send and ``close()`` before that loop ends (or use
    ``async with``). ``send`` may be called concurrently; the pool holds at most
    ``settings.pool_size`` connections. ``resolver`` replaces the DNS resolver that the SSRF guard
    wraps (tests use it to point a name at a local receiver).
    """

    def __init__(self, settings: WebhookSettings, *, resolver: AbstractResolver | None = None) -> None:
        self._settings = settings
        self._allow = parse_allow(settings.allow_networks)
        self._inner_resolver = resolver
        self._resolver: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        # url -> parsed URL, or the refusal: a batch sends to a handful of URLs thousands of
        # times, and the check (a URL parse, address maths) is the same every time.
        self._checked: dict[str, URL | PermanentChannelError] = {}
        # Lower-cased keys, so a message header cannot sneak in a second "Webhook-Id".
        self._fixed_headers = {
            "content-type": "application/json",
            "user-agent": settings.user_agent,
            "accept-encoding": "identity",
        }

    async def start(self) -> None:
        """Open the connection pool; calling it again while open does nothing."""
        if self._session is not None:
            return
        self._resolver = GuardedResolver(allow=self._allow, resolver=self._inner_resolver)
        connector = aiohttp.TCPConnector(
            limit=self._settings.pool_size, resolver=self._resolver, keepalive_timeout=KEEPALIVE_S
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self._settings.total_timeout_s, connect=self._settings.connect_timeout_s
            ),
            # Receivers of different tenants share this session: no cookies may carry over.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Only the first bytes of a body are read, for the error text; asking for compression
            # would let a small response inflate in memory. So each request says "identity"
            # itself (``_headers``): skip_auto_headers would cost aiohttp a multidict built,
            # sorted and merged on every request.
            auto_decompress=False,
        )

    async def close(self) -> None:
        """Close the pool and the resolver; the channel may be started again afterwards."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            # A connector given a resolver leaves closing it to the caller.
            await self._resolver.close()
            self._resolver = None

    async def send(self, message: WebhookMessage) -> Sent:
        """POST one signed message; return ``Sent`` for a 2xx, else raise a ``ChannelError``.

        Errors carry ``status_code`` when the receiver answered, ``retry_after_s`` from a
        ``Retry-After`` on 429/503, and a short redacted text safe to store on the attempt.
        """
        if self._session is None:
            raise RuntimeError("WebhookChannel.send() called before start()")
        url = self._checked_url(message.url)
        try:
            signed = signing.headers(
                secrets=message.secrets, msg_id=message.delivery_id, timestamp=int(time.time()), body=message.body
            )
        except ValidationError as exc:
            raise PermanentChannelError(_text(exc.message)) from exc
        try:
            async with self._session.post(
                url, data=message.body, headers=self._headers(message, signed), allow_redirects=False
            ) as response:
                head = await _read_head(response, self._settings.max_response_bytes)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise self._failure(exc) from exc
        return _outcome(status, retry_after, head)

    def _checked_url(self, url: str) -> URL:
        """``url`` parsed, once the SSRF rules allow it (raises ``PermanentChannelError`` otherwise).

        Names are still vetted at connect time by the guarded resolver; what is cached here is
        only the verdict on the URL's own spelling, which never changes.
        """
        verdict = self._checked.get(url)
        if verdict is None:
            try:
                check_url(url, allow=self._allow, resolve=False)
                verdict = URL(url, encoded=False)
            except UnsafeUrlError as exc:
                verdict = PermanentChannelError(_text(exc.message))
            if len(self._checked) >= _MAX_CHECKED_URLS:
                self._checked.clear()
            self._checked[url] = verdict
        if isinstance(verdict, PermanentChannelError):
            raise PermanentChannelError(verdict.message)
        return verdict

    def _headers(self, message: WebhookMessage, signed: dict[str, str]) -> dict[str, str]:
        if not message.headers:  # the usual case; this runs once per attempt
            return {**self._fixed_headers, **signed}
        headers = self._fixed_headers.copy()
        headers.update(
            (name.lower(), value) for name, value in message.headers.items() if name.lower() not in _RESERVED_HEADERS
        )
        headers.update(signed)
        return headers

    def _failure(self, exc: Exception) -> ChannelError:
        """The channel error for an attempt that got no response."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TransientChannelError(_text(f"connect timeout after {self._settings.connect_timeout_s}s"))
        if isinstance(exc, TimeoutError):
            return TransientChannelError(_text(f"timeout after {self._settings.total_timeout_s}s"))
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            if isinstance(exc.os_error, BlockedAddressError):
                return PermanentChannelError("url: host resolves only to non-public addresses")
            return TransientChannelError("DNS lookup failed")
        if isinstance(exc, aiohttp.ClientSSLError):
            return TransientChannelError(_text(f"TLS error: {exc.os_error}"))
        if isinstance(exc, aiohttp.ClientConnectorError):
            if exc.os_error.errno == errno.ECONNREFUSED:
                return TransientChannelError("connection refused")
            return TransientChannelError(_text(f"connection failed: {exc.os_error.strerror or exc.os_error}"))
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return TransientChannelError("server disconnected")
        if isinstance(exc, aiohttp.InvalidURL):
            # e.g. "http://1.2.3.4.5/": not an address, yet too numeric for aiohttp to resolve.
            return PermanentChannelError(_text(f"url: not usable by the HTTP client, got {str(exc.url)!r}"))
        if isinstance(exc, aiohttp.ClientError | OSError):
            return TransientChannelError(_text(f"{type(exc).__name__}: {exc}"))
        # A ValueError that is not an aiohttp.ClientError: the request itself cannot be built
        # (e.g. a newline in a header value); sending it again will not help.
        return PermanentChannelError(_text(f"invalid request: {exc}"))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date.

    ``None`` for a missing or unreadable value; a negative delay or a date in the past is 0.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return max(0.0, float(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # "-0000" means UTC with no zone information
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _read_head(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body, never more; read errors end the read early.

    The status has already decided the outcome and the body only feeds the error text, so a
    receiver that stalls or breaks mid-body does not turn a 2xx into a failure. A body left
    unread makes aiohttp close the connection on release instead of pooling it.
    """
    length = response.content_length
    if length is not None and length <= limit:  # the usual case: a short body, read at once
        try:
            return await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return b""
    head = bytearray()
    try:
        while len(head) < limit:
            chunk = await response.content.read(limit - len(head))
            if not chunk:
                break
            head += chunk
    except (aiohttp.ClientError, TimeoutError):
        pass
    return bytes(head)


# ``Sent`` is immutable: one per success status serves every attempt that got it.
_SENT = {status: Sent(status_code=status) for status in range(200, 300)}


def _outcome(status: int, retry_after: str | None, head: bytes) -> Sent:
    if 200 <= status < 300:
        return _SENT[status]
    snippet = _snippet(head)
    text = _text(f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}")
    if 300 <= status < 400:
        raise TransientChannelError(_text(f"HTTP {status}: redirects are not followed"), status_code=status)
    if status == 410:
        raise PermanentChannelError(text, status_code=status, disable_endpoint=True)
    if status in _RETRY_AFTER_STATUSES:
        raise TransientChannelError(text, status_code=status, retry_after_s=parse_retry_after(retry_after))
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        raise PermanentChannelError(text, status_code=status)
    raise TransientChannelError(text, status_code=status)


def _snippet(head: bytes) -> str:
    """The start of a response body as one line, short enough to redact quickly."""
    text = " ".join(head[: _SNIPPET_CHARS * 4].decode("utf-8", "replace").split())
    if len(text) > _SNIPPET_CHARS:
        # redact's patterns take quadratic time on long runs (64 KiB of body cost seconds), so cut
        # first, at whitespace or JSON/HTML punctuation: dropping the cut-off last token means no
        # fragment the patterns no longer recognise can slide into view as masks shorten text.
        cut = max(text.rfind(delimiter, 0, _SNIPPET_CHARS) for delimiter in _DELIMITERS)
        text = text[:cut] if cut > 0 else text[:_SNIPPET_CHARS]
    return text


def _text(text: str) -> str:
    return redact(text, limit=ERROR_CHARS)
