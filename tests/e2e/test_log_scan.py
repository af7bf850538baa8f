"""Secrets and personal data never reach a log line, even at DEBUG, in any process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from fastapi.testclient import TestClient

from herald.config import Settings, SmsProviderSettings
from tests.e2e.test_timeline import start_api
from tests.support import MailSink, Processes, Receiver, SmsProvider, sqlite_database, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Scenario tests run on SQLite only; the delivery spine's e2e tests cover both databases."""
    return sqlite_database(tmp_path)


EXAMPLES = Path(__file__).parents[2] / "examples"
EMAIL = "seeded.person+desk@complaints-example.org"
PHONE = "+4917612345678"
SMTP_USER, SMTP_PASSWORD = "desk-mailer", "Smtp-Pa55word-Seeded-7Q"
SMS_TOKEN = "sms-auth-token-seeded-4f9c2b7e1d"


class AuthMailSink(MailSink):
    """The loopback SMTP server offering AUTH (over plain text: it is loopback); records logins."""

    def __init__(self) -> None:
        super().__init__()
        self.logins: list[str] = []

        def authenticate(server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                SMTP_USER.encode(),
                SMTP_PASSWORD.encode(),
            )
            if ok:
                self.logins.append(mechanism)
            return AuthResult(success=ok)

        self.controller.loop.close()  # the parent's controller, never started, is replaced
        self.controller = Controller(
            self.controller.handler, hostname="127.0.0.1", port=self.port,
            authenticator=authenticate, auth_require_tls=False,
        )  # fmt: skip


class TokenSmsProvider(SmsProvider):
    """The loopback SMS provider, refusing requests without the provider's auth token."""

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {SMS_TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await super()._handle(request)


def listening(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


@pytest.fixture
def mail() -> Iterator[MailSink]:
    sink = AuthMailSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def sms_provider() -> Iterator[SmsProvider]:
    provider = TokenSmsProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def settings(settings: Settings, mail: MailSink, sms_provider: SmsProvider, tmp_path: Path) -> Settings:
    smtp = {"host": "127.0.0.1", "port": mail.port, "tls": "none", "username": SMTP_USER, "password": SMTP_PASSWORD}
    return settings.model_copy(
        update={
            "log_level": "DEBUG",
            "smtp": settings.smtp.model_copy(update=smtp),
            "sms": settings.sms.model_copy(
                update={"primary": SmsProviderSettings(url=sms_provider.url, auth_token=SMS_TOKEN)}
            ),
            "ingest": settings.ingest.model_copy(update={"dir": tmp_path / "drops", "rescan_s": 0.5}),
            "scheduler": settings.scheduler.model_copy(update={"recurring_every_s": 1.0}),
        }
    )


def test_complaints_and_otp_at_debug_leak_nothing(
    client: TestClient,
    api_key: str,
    processes: Processes,
    receiver: Receiver,
    mail: MailSink,
    sms_provider: SmsProvider,
) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    endpoint = client.post("/v1/endpoints", json={"url": receiver.url}, headers=auth).json()
    secret = endpoint["secret"]
    # Every long-running process Herald has, each with its own log.
    processes.env |= {"HERALD_INGEST__TENANT": "acme", "HERALD_INGEST__ENDPOINT_ID": endpoint["id"]}
    api = start_api(processes, "api", wait=False)
    processes.worker()
    processes.dispatcher()
    processes.start("beat", "beat", "--schedule-file", str(processes.log_dir.parent / "beat-schedule"))
    processes.start("watcher", "watch")
    wait_until(lambda: listening(api), timeout_s=30, what="the API to listen")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "complaints" / "run.py"), "--api", api, "--key", api_key,
         "--email", EMAIL, "--phone", PHONE],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_until(  # the example waits 30 s for its deliveries; a loaded machine may need longer
        lambda: len(mail.to(EMAIL)) == 4 and len(sms_provider.to(PHONE)) == 4, timeout_s=60, what="the scenario's mail"
    )
    otp = requests.post(f"{api}/v1/otp", json={"recipient": "consumer-1", "channel": "sms"}, headers=auth, timeout=10)
    assert otp.status_code == 202, otp.text
    texts = wait_until(
        lambda: [m["text"] for m in sms_provider.to(PHONE) if "code" in m["text"]], timeout_s=60, what="the OTP"
    )
    code = re.search(r"\b\d{6}\b", texts[0])
    assert code is not None
    wrong = requests.post(
        f"{api}/v1/otp/verify", json={"recipient": "consumer-1", "code": "000001"}, headers=auth, timeout=10
    )
    assert wrong.status_code == 422
    ok = requests.post(
        f"{api}/v1/otp/verify", json={"recipient": "consumer-1", "code": code.group(0)}, headers=auth, timeout=10
    )
    assert ok.status_code == 200
    assert mail.logins and all(r.get("to") == PHONE for r in sms_provider.received)  # the secrets were used

    # A dropped file whose user ids are an address and a phone number (the second is refused).
    drops = processes.settings.ingest.dir
    assert drops is not None
    drops.mkdir(parents=True, exist_ok=True)
    (drops / "people.txt").write_text(f"{EMAIL}\n{PHONE}\nplain-user-1\n")
    wait_until(lambda: list((drops / "done").glob("people*")), timeout_s=60, what="the drop to be ingested")
    wait_until(lambda: "herald.periodic" in processes.log("worker"), timeout_s=60, what="beat's periodic jobs to run")
    processes.stop_all()

    # Herald's own processes, logging as in production (the pytest process also hosts the test's
    # SMTP and SMS servers, whose logs are the receivers', not Herald's).
    logs = {name: processes.log(name) for name in ("api", "worker", "dispatcher", "beat", "watcher")}
    assert all(logs.values()), "a process logged nothing: the scan would prove nothing"
    assert all("DEBUG" in logs[name] for name in ("worker", "beat")), "a process did not log at DEBUG"
    assert "people.txt" in logs["watcher"], "the watcher did not log the drop"
    seeds = {
        "email": EMAIL,
        "email local part": EMAIL.split("@")[0],
        "phone": PHONE,
        "phone digits": PHONE.lstrip("+"),
        "otp code": code.group(0),
        "api key": api_key,
        "api key secret part": api_key.split("_", 2)[2],
        "webhook secret": secret,
        "webhook secret key": secret.removeprefix("whsec_"),
        "SMTP password": SMTP_PASSWORD,
        "SMS provider token": SMS_TOKEN,
    }
    for where, text in logs.items():
        for what, seed in seeds.items():
            assert seed not in text, f"{what} appears in the {where} log"
