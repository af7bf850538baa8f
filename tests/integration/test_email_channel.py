"""EmailChannel against a real aiosmtpd server on loopback (in its own thread), and the outbox."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import ssl
import subprocess
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage as MimeMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from herald.channels.base import EmailMessage, Sent
from herald.channels.email import EmailChannel
from herald.config import SmtpSettings
from herald.errors import ChannelError, PermanentChannelError, TransientChannelError
from herald.links import UnsubscribeClaims, UnsubscribeLinks, verify_unsubscribe
from tests.support import free_port

T = TypeVar("T")
TO = "kunde@example.org"
SENDER = "Acme Support <support@acme.example>"
USER, PASSWORD = "herald", "s3cret-pass"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def message(delivery_id: str = "dlv_01HX3YQ7", **fields: Any) -> EmailMessage:
    values: dict[str, Any] = {
        "delivery_id": delivery_id,
        "to": TO,
        "subject": "Rückmeldung zu Ticket 4711",
        "text": "Your complaint was escalated.\n",
    }
    return EmailMessage(**(values | fields))


def smtp_settings(port: int, **overrides: Any) -> SmtpSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "tls": "none", "sender": SENDER, "timeout_s": 2.0}
    return SmtpSettings(**(values | overrides))


# -- the server -----------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str | None
    rcpt_tos: list[str]
    content: bytes
    peer: Any
    authenticated: bool | None
    tls: bool

    def parsed(self) -> MimeMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, MimeMessage)
        return parsed


@dataclass
class Recorder:
    """An aiosmtpd handler storing each accepted message; ``replies`` answer MAIL, RCPT or DATA instead."""

    replies: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)  # one per MAIL FROM: which connection carried it

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.peers.append(session.peer)
        if "MAIL" in self.replies:
            return self.replies["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if "RCPT" in self.replies:
            return self.replies["RCPT"]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if "DATA" in self.replies:
            return self.replies["DATA"]
        assert isinstance(envelope.content, bytes)
        tls = server.transport is not None and server.transport.get_extra_info("sslcontext") is not None
        self.received.append(
            Received(
                envelope.mail_from, list(envelope.rcpt_tos), envelope.content, session.peer, session.authenticated, tls
            )
        )
        return "250 2.0.0 Ok: queued"


class LoopbackController(Controller):
    """aiosmtpd's threaded Controller on an ephemeral port.

    ``start()`` connects to ``self.port`` to check the server is up, so the real port is read from
    the listening socket first.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextmanager
def smtp_server(handler: Recorder, port: int = 0, **smtp_kwargs: Any) -> Iterator[LoopbackController]:
    controller = LoopbackController(handler, hostname="127.0.0.1", port=port, server_hostname="mx.test", **smtp_kwargs)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    good = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=good, handled=False)  # handled=False: aiosmtpd answers 535 itself


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    def server(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client(self) -> ssl.SSLContext:
        """A client context trusting only the test certificate (host name checked: 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1 and localhost, made by the openssl command line tool."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Tls(cert, key)


async def send_all(channel: EmailChannel, *messages: EmailMessage) -> list[Sent]:
    async with channel:
        return [await channel.send(msg) for msg in messages]


async def failure(channel: EmailChannel, msg: EmailMessage) -> ChannelError:
    async with channel:
        with pytest.raises(ChannelError) as info:
            await channel.send(msg)
    return info.value


# -- the message ----------------------------------------------------------------------------


def test_sends_a_multipart_message_carrying_the_delivery_id(tmp_path: Path) -> None:
    recorder = Recorder()
    unsubscribe = {
        "List-Unsubscribe": "<https://herald.example/u/tok123>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    msg = message(html="<p>Your complaint was <b>escalated</b>.</p>", headers=unsubscribe)
    with smtp_server(recorder) as server:
        [sent] = run(send_all(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path), msg))

    assert sent == Sent(status_code=250, provider="smtp")
    [received] = recorder.received
    assert received.mail_from == "support@acme.example"
    assert received.rcpt_tos == [TO]
    mime = received.parsed()
    assert mime["From"] == SENDER
    assert mime["To"] == TO
    assert mime["Subject"] == "Rückmeldung zu Ticket 4711"
    assert mime["Message-ID"] == "<dlv_01HX3YQ7@acme.example>"
    assert mime["Herald-Delivery-Id"] == "dlv_01HX3YQ7"
    assert mime["Date"]
    assert mime["List-Unsubscribe"] == unsubscribe["List-Unsubscribe"]
    assert mime["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mime.get_content_type() == "multipart/alternative"
    parts = list(mime.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().splitlines() == ["Your complaint was escalated."]
    assert "<b>escalated</b>" in parts[1].get_content()


def test_long_caller_headers_are_passed_verbatim(tmp_path: Path) -> None:
    """A long List-Unsubscribe URL must stay a URL: folded into RFC 2047 words, clients cannot use it."""
    recorder = Recorder()
    url = "<https://bank.example/unsubscribe/ten_01M811RZXVHF2CTH8HDSG54Q1F/cust-42/ticket?sig=" + "a" * 120 + ">"
    headers = {"List-Unsubscribe": url, "X-Greeting": "Grüezi mitenand"}
    with smtp_server(recorder) as server:
        run(send_all(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path), message(headers=headers)))
    content = recorder.received[0].content
    assert f"List-Unsubscribe: {url}\r\n".encode() in content
    mime = recorder.received[0].parsed()
    assert mime["List-Unsubscribe"] == url
    assert mime["X-Greeting"] == "Grüezi mitenand"  # non-ASCII still goes as encoded words
    assert b"=?utf-8?" in content


@pytest.mark.parametrize("url", ["https://herald.bank.example/v1/public/unsubscribe", ""])
def test_signed_unsubscribe_headers_arrive_as_one_usable_line(tmp_path: Path, url: str) -> None:
    """RFC 2369 / RFC 8058 headers as intake builds them: an https link with one-click POST, or
    without a public URL a mailto: link (one-click needs https) whose subject carries the token."""
    key, now = b"k" * 32, datetime.now(UTC)
    links = UnsubscribeLinks(key=key, url=url, mailto="opt-out+desk@acme.example")
    headers = links.headers(tenant_id="ten_1", recipient_id="rcp_01HX", category="ticket", channel="email", now=now)
    recorder = Recorder()
    with smtp_server(recorder) as server:
        run(send_all(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path), message(headers=headers)))
    content, mime = recorder.received[0].content, recorder.received[0].parsed()
    value = mime["List-Unsubscribe"]
    assert f"List-Unsubscribe: {value}\r\n".encode() in content  # one line, not folded into encoded words
    if url:
        assert value.startswith(f"<{url}?token=") and value.endswith(">")
        assert mime["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        token = value.removeprefix(f"<{url}?token=").removesuffix(">")
    else:
        assert value.startswith("<mailto:opt-out%2Bdesk@acme.example?subject=unsubscribe%20") and value.endswith(">")
        assert "List-Unsubscribe-Post" not in mime
        token = value.removesuffix(">").rpartition("%20")[2]
    claims = verify_unsubscribe(token, key=key, now=now)
    assert claims == UnsubscribeClaims("ten_1", "rcp_01HX", "ticket", "email", claims.expires_at)
    assert claims.expires_at > now + timedelta(days=300)


def test_text_only_mail_is_a_single_part(tmp_path: Path) -> None:
    recorder = Recorder()
    with smtp_server(recorder) as server:
        run(send_all(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path), message(text="Grüße\n")))
    mime = recorder.received[0].parsed()
    assert mime.get_content_type() == "text/plain"
    assert mime.get_content().splitlines() == ["Grüße"]


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"headers": {"List-Unsubscribe": "<https://x.example/u>\r\nBcc: spy@evil.example"}}, "CR or LF"),
        ({"headers": {"X-Note": "one\nInjected: yes"}}, "CR or LF"),
        ({"subject": "Hello\r\nBcc: spy@evil.example"}, "subject"),
        ({"headers": {"From": "ceo@acme.example"}}, "set by the email channel"),
        ({"headers": {"Bad Name": "x"}}, "header name"),
        ({"to": "kunde@example.org\r\nRCPT TO:<spy@evil.example>"}, "to"),
        ({"to": "not-an-address"}, "to"),
        ({"delivery_id": "../../etc/passwd"}, "delivery_id"),
    ],
)
def test_refuses_unsafe_input_before_talking_to_the_server(
    tmp_path: Path, fields: dict[str, Any], complaint: str
) -> None:
    recorder = Recorder()
    with smtp_server(recorder) as server:
        error = run(failure(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path), message(**fields)))
    assert isinstance(error, PermanentChannelError)
    assert complaint in error.message
    assert "evil" not in error.message and TO not in error.message
    assert recorder.peers == [] and recorder.received == []


# -- TLS and authentication ----------------------------------------------------------------


def test_starttls_and_login(tmp_path: Path, tls: Tls) -> None:
    recorder = Recorder()
    with smtp_server(
        recorder, tls_context=tls.server(), require_starttls=True, auth_required=True, authenticator=authenticator
    ) as server:
        settings = smtp_settings(server.port, tls="starttls", username=USER, password=PASSWORD)
        [sent] = run(send_all(EmailChannel(settings, outbox_dir=tmp_path, tls_context=tls.client()), message()))
    assert sent.provider == "smtp"
    [received] = recorder.received
    assert received.tls and received.authenticated


def test_implicit_tls(tmp_path: Path, tls: Tls) -> None:
    recorder = Recorder()
    with smtp_server(recorder, ssl_context=tls.server()) as server:
        settings = smtp_settings(server.port, tls="implicit")
        run(send_all(EmailChannel(settings, outbox_dir=tmp_path, tls_context=tls.client()), message()))
    assert recorder.received[0].tls


def test_bad_credentials_are_transient_and_never_echo_the_password(tmp_path: Path, tls: Tls) -> None:
    """535 refuses Herald's login, not the message: retried, the mail goes out once the setting is fixed."""
    recorder = Recorder()
    with smtp_server(
        recorder, tls_context=tls.server(), require_starttls=True, auth_required=True, authenticator=authenticator
    ) as server:
        settings = smtp_settings(server.port, tls="starttls", username=USER, password="wrong-pass")
        error = run(failure(EmailChannel(settings, outbox_dir=tmp_path, tls_context=tls.client()), message()))
    assert isinstance(error, TransientChannelError)
    assert error.status_code == 535
    assert "HERALD_SMTP__PASSWORD" in error.message and "wrong-pass" not in error.message
    assert recorder.received == []


def test_an_untrusted_certificate_is_refused(tmp_path: Path, tls: Tls) -> None:
    recorder = Recorder()
    with smtp_server(recorder, tls_context=tls.server(), require_starttls=True) as server:
        settings = smtp_settings(server.port, tls="starttls")
        error = run(failure(EmailChannel(settings, outbox_dir=tmp_path), message()))  # system CAs only
    assert isinstance(error, TransientChannelError)
    assert "certificate" in error.message.lower()
    assert recorder.received == []


def test_starttls_is_required_when_configured(tmp_path: Path) -> None:
    """A server that offers no STARTTLS gets nothing in plain text."""
    recorder = Recorder()
    with smtp_server(recorder) as server:
        error = run(failure(EmailChannel(smtp_settings(server.port, tls="starttls"), outbox_dir=tmp_path), message()))
    assert isinstance(error, TransientChannelError)
    assert "STARTTLS" in error.message
    assert recorder.peers == []


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "kind", "code"),
    [
        ({"RCPT": f"550 5.1.1 <{TO}>: Recipient address rejected: mailbox unavailable"}, PermanentChannelError, 550),
        ({"RCPT": "553 5.1.3 mailbox name not allowed"}, PermanentChannelError, 553),
        ({"MAIL": "553 5.7.1 sender rejected"}, PermanentChannelError, 553),
        ({"DATA": "554 5.7.1 message refused as spam"}, PermanentChannelError, 554),
        ({"RCPT": f"450 4.2.0 <{TO}>: greylisted, try again later"}, TransientChannelError, 450),
        ({"DATA": "451 4.3.0 local error, try later"}, TransientChannelError, 451),
        ({"MAIL": "530 5.7.0 Authentication required"}, TransientChannelError, 530),
    ],
)
def test_replies_are_classified_by_code_and_keep_the_connection(
    tmp_path: Path, replies: dict[str, str], kind: type[ChannelError], code: int
) -> None:
    recorder = Recorder(replies=dict(replies))

    async def scenario(channel: EmailChannel) -> ChannelError:
        async with channel:
            with pytest.raises(ChannelError) as info:
                await channel.send(message())
            recorder.replies.clear()
            await channel.send(message("dlv_second"))
        return info.value

    with smtp_server(recorder) as server:
        error = run(scenario(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path)))
    assert type(error) is kind
    assert error.status_code == code
    assert error.provider == "smtp"
    assert error.message.startswith(f"SMTP {code}")
    assert TO not in error.message and "kunde" not in error.message
    # The refusal was answered and reset; the next message went over the same connection.
    assert len(recorder.peers) == 2 and len(set(recorder.peers)) == 1
    assert [r.parsed()["Herald-Delivery-Id"] for r in recorder.received] == ["dlv_second"]


def test_server_down_is_transient(tmp_path: Path) -> None:
    error = run(failure(EmailChannel(smtp_settings(free_port()), outbox_dir=tmp_path), message()))
    assert isinstance(error, TransientChannelError)
    assert error.provider == "smtp"
    assert "SMTP connection failed" in error.message


def test_a_server_that_never_greets_times_out(tmp_path: Path) -> None:
    async def scenario() -> ChannelError:
        release = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await failure(EmailChannel(smtp_settings(port, timeout_s=0.3), outbox_dir=tmp_path), message())
        finally:
            release.set()
            server.close()
            await server.wait_closed()

    error = run(scenario())
    assert isinstance(error, TransientChannelError)
    assert "timeout after 0.3s" in error.message


# -- connections ----------------------------------------------------------------------------


def test_reuses_one_connection_for_consecutive_sends(tmp_path: Path) -> None:
    recorder = Recorder()
    with smtp_server(recorder) as server:
        channel = EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path)
        run(send_all(channel, *(message(f"dlv_{n}") for n in range(5))))
    assert len(recorder.received) == 5
    assert len({r.peer for r in recorder.received}) == 1


def test_concurrent_sends_share_a_bounded_pool(tmp_path: Path) -> None:
    recorder = Recorder()

    async def scenario(channel: EmailChannel) -> None:
        async with channel:
            await asyncio.gather(*(channel.send(message(f"dlv_{n}")) for n in range(12)))

    with smtp_server(recorder) as server:
        run(scenario(EmailChannel(smtp_settings(server.port), outbox_dir=tmp_path, pool_size=3)))
    assert sorted(r.parsed()["Herald-Delivery-Id"] for r in recorder.received) == sorted(f"dlv_{n}" for n in range(12))
    assert 1 <= len({r.peer for r in recorder.received}) <= 3


def test_reconnects_when_the_server_dropped_the_pooled_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay restarts between two sends: the pooled connection is dead, the send still succeeds.

    The loop is blocked while the relay stops, so the channel only learns of it when MAIL FROM
    finds the connection closed: the retry on a fresh connection is what saves the send.
    """
    first, second = Recorder(), Recorder()

    async def scenario(channel: EmailChannel, port: int) -> None:
        async with channel:
            with smtp_server(first, port=port):
                await channel.send(message("dlv_before"))
            with smtp_server(second, port=port):
                await channel.send(message("dlv_after"))

    port = free_port()
    with caplog.at_level(logging.INFO, logger="herald.channels.email"):
        run(scenario(EmailChannel(smtp_settings(port), outbox_dir=tmp_path), port))
    assert any("reconnecting" in record.getMessage() for record in caplog.records)
    assert [r.parsed()["Herald-Delivery-Id"] for r in first.received] == ["dlv_before"]
    assert [r.parsed()["Herald-Delivery-Id"] for r in second.received] == ["dlv_after"]


# -- the outbox -----------------------------------------------------------------------------


def test_without_a_host_mail_goes_to_the_outbox(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = tmp_path / "outbox"
    channel = EmailChannel(SmtpSettings(sender=SENDER), outbox_dir=outbox)
    with caplog.at_level(logging.INFO, logger="herald.channels.email"):
        sent = run(send_all(channel, message(html="<p>hi</p>"), message("dlv_other")))

    assert sent == [Sent(status_code=None, provider="outbox")] * 2
    assert sorted(path.name for path in outbox.iterdir()) == ["dlv_01HX3YQ7.eml", "dlv_other.eml"]  # no temp files
    mime = email.message_from_bytes((outbox / "dlv_01HX3YQ7.eml").read_bytes(), policy=email.policy.default)
    assert isinstance(mime, MimeMessage)
    assert mime["To"] == TO and mime["Message-ID"] == "<dlv_01HX3YQ7@acme.example>"
    assert mime.get_content_type() == "multipart/alternative"
    assert (outbox / "dlv_other.eml").stat().st_mode & 0o077 == 0  # holds addresses: owner only
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(outbox) in warnings[0].getMessage()
    assert all(TO not in r.getMessage() and "acme.example" not in r.getMessage() for r in caplog.records)


def test_settings_outbox_dir_wins(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen"
    channel = EmailChannel(SmtpSettings(sender=SENDER, outbox_dir=chosen), outbox_dir=tmp_path / "default")
    run(send_all(channel, message()))
    assert (chosen / "dlv_01HX3YQ7.eml").exists()
    assert not (tmp_path / "default").exists()
