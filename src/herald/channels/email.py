"""The email channel: SMTP through aiosmtplib over a small pool of reused connections, or ``.eml``
files in the outbox folder when no SMTP host is configured.

Every message carries its delivery id twice, as ``Message-ID: <delivery_id@sender-domain>`` and as
``Herald-Delivery-Id``, so a duplicate from an at-least-once retry can be recognised. Outcomes:

    250 to DATA                                    Sent(status_code=250, provider="smtp")
    4xx to MAIL FROM, RCPT TO or DATA              TransientChannelError(status_code=code)
    5xx to MAIL FROM, RCPT TO or DATA              PermanentChannelError(status_code=code)
    530/534/535/538 (authentication), any step     TransientChannelError(status_code=code)
    greeting, EHLO, STARTTLS, AUTH, TLS failures   TransientChannelError
    refused, timeout, dropped connection           TransientChannelError
    CR/LF or reserved header, unusable address     PermanentChannelError

Why a refused login is transient: the server refusing *us* (bad credentials, TLS or AUTH not
offered) says nothing about the message. Dead-lettering every mail until an operator fixes
``HERALD_SMTP__PASSWORD`` would leave each to be replayed by hand; retried, they go out once the
setting is fixed, and the retry window bounds how long they try.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.generator
import email.utils
import io
import logging
import os
import re
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage as MimeMessage
from email.policy import EmailPolicy
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from herald.channels.base import ChannelLifecycle, EmailMessage, Sent
from herald.config import SmtpSettings
from herald.errors import ChannelError, ConfigError, PermanentChannelError, TransientChannelError
from herald.logs import redact

logger = logging.getLogger(__name__)

SMTP_PROVIDER = "smtp"
OUTBOX_PROVIDER = "outbox"
ERROR_CHARS = 200
POOL_SIZE = 4
# Servers drop idle clients (RFC 5321 4.5.3.2.7 asks them to wait 5 minutes; many wait less). An
# older connection is closed rather than reused; a reused one found dead gets one fresh retry.
MAX_IDLE_S = 30.0
QUIT_TIMEOUT_S = 2.0

_AUTH_CODES = frozenset({530, 534, 535, 538})
# Set by the channel; a caller's copy would be a second, conflicting header (or, for Cc/Bcc, a
# recipient the envelope never names).
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "herald-delivery-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: printable ASCII except ':'
# A delivery id becomes a Message-ID's dot-atom and a file name, so it must be safe as both.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")
_MAX_ID_CHARS = 128
_MAX_HEADER_CHARS = 990  # RFC 5322 2.1.1: 998 characters per line, name and ": " included


class _MailPolicy(EmailPolicy):
    """The SMTP policy, except that callers' plain ASCII header values are kept verbatim.

    Python folds a long unstructured value such as ``List-Unsubscribe: <https://…/long-url>`` into
    RFC 2047 encoded words, which no mail client reads back as a URL (RFC 2369 wants it as is).
    Herald's own headers, and non-ASCII values (which need encoded words), are folded as usual.
    """

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if isinstance(value, str) and value.isascii() and name.lower() not in _RESERVED_HEADERS:
            return name, value  # CR/LF were refused before; "refold_source=none" keeps it one line
        return super().header_store_parse(name, value)


_POLICY = _MailPolicy(linesep="\r\n", refold_source="none")


def _flatten(mime: MimeMessage, *, utf8: bool, eight_bit: bool) -> bytes:
    """The message as sent: UTF-8 headers only for an SMTPUTF8 server, 8-bit bodies only for 8BITMIME."""
    policy = _POLICY.clone(utf8=utf8, cte_type="8bit" if eight_bit else "7bit")
    with io.BytesIO() as buffer:
        email.generator.BytesGenerator(buffer, policy=policy).flatten(mime)
        return buffer.getvalue()


@dataclass
class _Idle:
    client: aiosmtplib.SMTP
    since: float


class _Connections:
    """The SMTP connections not yet gone, so that ``close()`` can wait until their sockets are shut.

    ``SMTP.close()`` only starts closing: a TLS connection still exchanges close_notify with the
    server. A socket left closing when the event loop ends is never closed (ResourceWarning).
    """

    def __init__(self) -> None:
        self._live: set[SMTPProtocol] = set()
        self._none_left = asyncio.Event()
        self._none_left.set()

    def opened(self, protocol: SMTPProtocol) -> None:
        self._live.add(protocol)
        self._none_left.clear()

    def gone(self, protocol: SMTPProtocol) -> None:
        self._live.discard(protocol)
        if not self._live:
            self._none_left.set()

    async def wait_gone(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_left.wait(), timeout_s)


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client reporting when a connection is opened and when it is finally gone.

    Overrides two private hooks of aiosmtplib 5 (``_create_connection``, ``_on_connection_lost``):
    it offers no public way to learn that a closed connection's socket is shut.
    """

    def __init__(self, *, connections: _Connections, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connections = connections

    async def _create_connection(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        try:
            return await super()._create_connection(timeout)
        finally:
            if self.protocol is not None:  # connected, even if the greeting then failed
                self._connections.opened(self.protocol)

    def _on_connection_lost(self, protocol: SMTPProtocol) -> None:
        self._connections.gone(protocol)
        super()._on_connection_lost(protocol)


class EmailChannel(ChannelLifecycle):
    """Delivers ``EmailMessage``s over SMTP, or into ``outbox_dir`` when ``settings.host`` is empty.

    ``start()`` in the event loop that will send and ``close()`` before that loop ends (or use
    ``async with``). ``send`` may be called concurrently: each SMTP conversation holds one of at
    most ``pool_size`` connections, opened on first use and reused while the server keeps them.
    ``settings.outbox_dir`` wins over ``outbox_dir``. ``tls_context`` replaces the default
    (system CAs, host name checked) for STARTTLS and implicit TLS, e.g. to trust a private CA.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        outbox_dir: Path,
        pool_size: int = POOL_SIZE,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        envelope_from = email.utils.parseaddr(settings.sender)[1]
        if "@" not in envelope_from or _has_newline(settings.sender):
            raise ConfigError(f"HERALD_SMTP__SENDER: not an email address, got {settings.sender!r}")
        self._settings = settings
        self._outbox_dir = settings.outbox_dir or outbox_dir
        self._pool_size = pool_size
        self._tls_context = tls_context
        self._envelope_from = envelope_from
        domain = envelope_from.rpartition("@")[2]
        self._id_domain = domain if _DOMAIN.fullmatch(domain) else "herald"
        self._local_hostname: str | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Idle] = []
        self._connections = _Connections()

    @property
    def uses_outbox(self) -> bool:
        """True when mail is written to the outbox folder instead of being sent."""
        return not self._settings.host

    async def start(self) -> None:
        """Get ready to send; calling it again while open does nothing. Connects lazily."""
        if self._slots is not None:
            return
        self._slots = asyncio.Semaphore(self._pool_size)
        self._connections = _Connections()
        if self.uses_outbox:
            logger.warning("no SMTP host set (HERALD_SMTP__HOST): mail is written to %s, not sent", self._outbox_dir)

    async def close(self) -> None:
        """Say QUIT on idle connections and wait (briefly) until every socket is shut.

        A send still in flight finishes on its connection, which is then closed, not pooled. The
        channel may be started again afterwards.
        """
        self._slots = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(entry.client) for entry in idle))
        await self._connections.wait_gone(QUIT_TIMEOUT_S)

    async def send(self, message: EmailMessage) -> Sent:
        """Send one message; return ``Sent`` once the server accepted it, else raise a ``ChannelError``.

        Errors carry the SMTP reply code in ``status_code`` when the server answered, and a short
        redacted text (no addresses) safe to store on the attempt.
        """
        slots = self._slots
        if slots is None:
            raise RuntimeError("EmailChannel.send() called before start()")
        mime = self.compose(message)
        if self.uses_outbox:
            return await self._write_outbox(message.delivery_id, mime)
        async with slots:
            try:
                await self._deliver(mime, message.to, slots)
            except ChannelError:
                raise
            except (aiosmtplib.SMTPException, OSError, ValueError) as exc:  # TimeoutError is an OSError
                raise _failure(exc, message, timeout_s=self._settings.timeout_s) from exc
        return Sent(status_code=250, provider=SMTP_PROVIDER)

    def compose(self, message: EmailMessage) -> MimeMessage:
        """The MIME message for ``message``; raises ``PermanentChannelError`` for unusable input."""
        delivery_id = message.delivery_id
        if len(delivery_id) > _MAX_ID_CHARS or not _SAFE_ID.fullmatch(delivery_id):
            raise PermanentChannelError(_text(f"delivery_id: not usable in a Message-ID, got {delivery_id!r}"))
        if _has_newline(message.to) or "@" not in message.to:
            raise PermanentChannelError("to: not an email address")
        if _has_newline(message.subject):
            raise PermanentChannelError("subject: contains CR or LF")
        for name, value in message.headers.items():
            if not _FIELD_NAME.fullmatch(name):
                raise PermanentChannelError(_text(f"headers: not a header name, got {name!r}"))
            if name.lower() in _RESERVED_HEADERS:
                raise PermanentChannelError(f"headers: {name!r} is set by the email channel")
            if _has_newline(value):
                raise PermanentChannelError(f"headers: {name!r} contains CR or LF")
            if len(name) + len(value) > _MAX_HEADER_CHARS:
                raise PermanentChannelError(f"headers: {name!r} is longer than a mail line may be")
        mime = MimeMessage(policy=_POLICY)
        try:
            mime["From"] = self._settings.sender
            mime["To"] = message.to
            mime["Subject"] = message.subject
            mime["Date"] = email.utils.formatdate(usegmt=True)
            mime["Message-ID"] = f"<{delivery_id}@{self._id_domain}>"
            mime["Herald-Delivery-Id"] = delivery_id
            for name, value in message.headers.items():
                mime[name] = value
            mime.set_content(message.text)
            if message.html is not None:
                mime.add_alternative(message.html, subtype="html")
        except (ValueError, TypeError, email.errors.MessageError) as exc:
            raise PermanentChannelError(_text(f"message: cannot be built: {exc}", message.to)) from exc
        return mime

    async def _deliver(self, mime: MimeMessage, to: str, slots: asyncio.Semaphore) -> None:
        client = self._take_idle()
        if client is not None:
            try:
                await self._transact(client, mime, to, slots)
                return
            except aiosmtplib.SMTPServerDisconnected:
                # The server dropped the pooled connection just as it was reused. Nearly always
                # that is before MAIL FROM, so one retry on a fresh connection; if it was after
                # DATA, the duplicate carries the same Message-ID.
                logger.info("pooled SMTP connection was closed by the server; reconnecting")
        client = await self._connect()
        await self._transact(client, mime, to, slots)

    async def _transact(self, client: aiosmtplib.SMTP, mime: MimeMessage, to: str, slots: asyncio.Semaphore) -> None:
        try:
            # What aiosmtplib's send_message does, flattened with Herald's policy instead of its own.
            options = []
            utf8 = not (self._envelope_from + to).isascii()
            if utf8:
                if not client.supports_extension("smtputf8"):
                    raise aiosmtplib.SMTPNotSupported("a non-ASCII address needs SMTPUTF8, which the server lacks")
                options.append("SMTPUTF8")
            eight_bit = client.supports_extension("8bitmime")
            if eight_bit:
                options.append("BODY=8BITMIME")
            data = _flatten(mime, utf8=utf8, eight_bit=eight_bit)
            await client.sendmail(self._envelope_from, [to], data, mail_options=options)
        except (
            aiosmtplib.SMTPResponseException,
            aiosmtplib.SMTPRecipientsRefused,
            aiosmtplib.SMTPNotSupported,
            ValueError,
        ):
            # The server answered (aiosmtplib has sent RSET) or nothing was sent: still in step.
            self._release(client, slots)
            raise
        except BaseException:
            # Timeouts and cancellation can leave a reply in flight: never reuse that conversation.
            client.close()
            raise
        self._release(client, slots)

    async def _connect(self) -> _Client:
        settings = self._settings
        if self._local_hostname is None:
            # aiosmtplib would look the name up on every connect; it can take seconds without DNS.
            self._local_hostname = (await asyncio.to_thread(socket.getfqdn)).strip() or "localhost"
        try:
            client = _Client(
                connections=self._connections,
                hostname=settings.host,
                port=settings.port,
                username=settings.username or None,
                password=settings.password.get_secret_value() if settings.username else None,
                local_hostname=self._local_hostname,
                timeout=settings.timeout_s,
                use_tls=settings.tls == "implicit",
                # True, not None: never fall back to plain text when the server offers no STARTTLS.
                start_tls=settings.tls == "starttls",
                tls_context=self._tls_context,
            )
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # no STARTTLS or login: learn the extensions now
                await client.ehlo()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise TransientChannelError(
                f"SMTP login refused ({exc.code}): check HERALD_SMTP__USERNAME and HERALD_SMTP__PASSWORD",
                status_code=exc.code,
                provider=SMTP_PROVIDER,
            ) from exc
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            raise TransientChannelError(
                _text(f"SMTP connect timeout after {settings.timeout_s}s"), provider=SMTP_PROVIDER
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:  # greeting, EHLO or STARTTLS refused
            raise TransientChannelError(
                _text(f"SMTP {exc.code} while connecting: {exc.message}"), status_code=exc.code, provider=SMTP_PROVIDER
            ) from exc
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:  # refused, TLS, no AUTH/STARTTLS offered
            raise TransientChannelError(
                _text(f"SMTP connection failed: {_describe(exc)}"), provider=SMTP_PROVIDER
            ) from exc
        return client

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        """The most recently used pooled connection that is still open and not too old."""
        now = time.monotonic()
        while self._idle:
            entry = self._idle.pop()
            if entry.client.is_connected and now - entry.since < MAX_IDLE_S:
                return entry.client
            entry.client.close()
        return None

    def _release(self, client: aiosmtplib.SMTP, slots: asyncio.Semaphore) -> None:
        if client.is_connected and slots is self._slots and len(self._idle) < self._pool_size:
            self._idle.append(_Idle(client, time.monotonic()))
        else:
            client.close()

    async def _write_outbox(self, delivery_id: str, mime: MimeMessage) -> Sent:
        path = outbox_path(self._outbox_dir, delivery_id, ".eml")
        try:
            await asyncio.to_thread(write_atomic, path, _flatten(mime, utf8=True, eight_bit=True))
        except OSError as exc:
            raise TransientChannelError(
                _text(f"outbox: cannot write {path}: {exc.strerror or exc}"), provider=OUTBOX_PROVIDER
            ) from exc
        logger.info("mail written to the outbox", extra={"delivery_id": delivery_id, "path": str(path)})
        return Sent(status_code=None, provider=OUTBOX_PROVIDER)


def outbox_path(directory: Path, delivery_id: str, suffix: str) -> Path:
    """``{directory}/{delivery_id}{suffix}``; ``PermanentChannelError`` if the id is not a safe file name."""
    if len(delivery_id) > _MAX_ID_CHARS or not _SAFE_ID.fullmatch(delivery_id):
        raise PermanentChannelError(_text(f"delivery_id: not usable as a file name, got {delivery_id!r}"))
    return directory / f"{delivery_id}{suffix}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    The file is created readable by its owner only (outbox files hold addresses and codes).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _failure(exc: Exception, message: EmailMessage, *, timeout_s: float) -> ChannelError:
    """The channel error for a failed mail transaction on an open connection."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]  # one recipient per message
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = _text(f"SMTP {exc.code}: {exc.message}", message.to)
        if exc.code in _AUTH_CODES or not 500 <= exc.code < 600:
            return TransientChannelError(text, status_code=exc.code, provider=SMTP_PROVIDER)
        return PermanentChannelError(text, status_code=exc.code, provider=SMTP_PROVIDER)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # e.g. a non-ASCII address and a server without SMTPUTF8: this message cannot go there.
        return PermanentChannelError(
            _text(f"SMTP server cannot take this message: {exc.message}", message.to), provider=SMTP_PROVIDER
        )
    if isinstance(exc, ValueError):
        return PermanentChannelError("to: not a usable email address", provider=SMTP_PROVIDER)
    if isinstance(exc, TimeoutError):
        return TransientChannelError(_text(f"SMTP timeout after {timeout_s}s"), provider=SMTP_PROVIDER)
    return TransientChannelError(_text(f"SMTP connection lost: {_describe(exc)}", message.to), provider=SMTP_PROVIDER)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPException):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _has_newline(value: str) -> bool:
    return "\r" in value or "\n" in value


def _text(text: str, *personal: str) -> str:
    """A short error text with ``personal`` values (the recipient) and other personal data masked."""
    for value in personal:
        if value:
            text = text.replace(value, "***")
    return redact(text, limit=ERROR_CHARS)


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit(timeout=QUIT_TIMEOUT_S)
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        client.close()
