"""Secrets and personal data never reach a log line, even at DEBUG, in any process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
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


@pytest.fixture
def settings(settings: Settings, mail: MailSink, sms_provider: SmsProvider) -> Settings:
    return settings.model_copy(
        update={
            "log_level": "DEBUG",
            "smtp": settings.smtp.model_copy(update={"host": "127.0.0.1", "port": mail.port, "tls": "none"}),
            "sms": settings.sms.model_copy(update={"primary": SmsProviderSettings(url=sms_provider.url)}),
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
    api = start_api(processes, "api")
    processes.worker()
    processes.dispatcher()
    auth = {"Authorization": f"Bearer {api_key}"}
    endpoint = requests.post(f"{api}/v1/endpoints", json={"url": receiver.url}, headers=auth, timeout=10).json()
    secret = endpoint["secret"]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "complaints" / "run.py"), "--api", api, "--key", api_key,
         "--email", EMAIL, "--phone", PHONE],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(mail.to(EMAIL)) == 4 and len(sms_provider.to(PHONE)) == 4
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
    processes.stop_all()

    # Herald's own processes, logging as in production (the pytest process also hosts the test's
    # SMTP and SMS servers, whose logs are the receivers', not Herald's).
    logs = {name: processes.log(name) for name in ("api", "worker", "dispatcher")}
    assert all(logs.values()), "a process logged nothing: the scan would prove nothing"
    assert "DEBUG" in logs["worker"], "the worker did not log at DEBUG"
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
    }
    for where, text in logs.items():
        for what, seed in seeds.items():
            assert seed not in text, f"{what} appears in the {where} log"
