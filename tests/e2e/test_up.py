"""``herald up`` as a user runs it: one command, embedded Redis and SQLite, supervised parts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import Receiver, free_port, wait_until

pytestmark = pytest.mark.slow


class Up:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        self.env |= {"HERALD_DATA_DIR": str(data_dir), "HERALD_API__PORT": str(self.port)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "herald.cli", "up"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_until(self.ready, timeout_s=150, interval_s=0.2, what="herald up to be ready")

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.base}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "herald.cli", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def children(self) -> dict[int, str]:
        """pid → command line of every process in the supervisor's tree."""
        assert self.proc is not None
        # -ww: never cut command lines to the terminal width (CI sets COLUMNS=80, which hid the
        # "worker --lanes transactional" at the end of a long interpreter path).
        out = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "-g", str(self.proc.pid)], capture_output=True, text=True
        )
        rows = [line.strip().split(" ", 1) for line in out.stdout.splitlines() if line.strip()]
        return {int(pid): args for pid, args in rows}

    def leftovers(self) -> list[str]:
        """Processes anywhere on the machine still naming this data folder (a child that left
        the supervisor's process group, such as a Redis started in a session of its own)."""
        out = subprocess.run(["pgrep", "-af", self.env["HERALD_DATA_DIR"]], capture_output=True, text=True)
        return out.stdout.splitlines()

    def stop(self, timeout_s: float = 40, *, group: bool = False) -> int:
        """SIGINT to the supervisor alone (``kill -INT``), or with ``group`` to its whole process
        group, as Ctrl-C in a terminal does: every child then gets it at the same moment."""
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        return code


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    runner = Up(tmp_path / "data", tmp_path / "up.log")
    yield runner
    if runner.proc is not None and runner.proc.poll() is None:
        os.killpg(runner.proc.pid, signal.SIGKILL)
        runner.proc.wait(10)
    for line in runner.leftovers():  # after a failure, nothing of this test outlives it
        try:
            os.kill(int(line.split(" ", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def post(up: Up, path: str, key: str, body: dict[str, object]) -> dict[str, object]:
    answer = requests.post(f"{up.base}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code in (201, 202), answer.text
    return dict(answer.json())


@pytest.mark.timeout(400)  # two cold starts of seven processes on a busy 2-core machine
def test_herald_up_runs_restarts_stops_on_ctrl_c_and_resumes(up: Up, receiver: Receiver) -> None:
    """Both ways of stopping are covered by this one run (a cold start costs tens of seconds):
    the first stop is a terminal's Ctrl-C (SIGINT to the whole group), the second ``kill -INT``."""
    up.start()
    assert (Path(up.env["HERALD_DATA_DIR"]) / "herald.db").exists()
    key = re.search(r"(hk_\S+)", up.cli("tenants", "create", "clinic"))
    assert key is not None
    api_key = key.group(1)
    endpoint = post(up, "/v1/endpoints", api_key, {"url": receiver.url})
    receiver.secrets.append(str(endpoint["secret"]))
    first = post(up, "/v1/events", api_key, {"type": "visit.booked", "subject": "visit:88"})
    first_id = first["deliveries"][0]["id"]  # type: ignore[index]
    wait_until(lambda: first_id in receiver.ids(), what="the first webhook")

    # kill -9 the transactional worker: the supervisor brings it back within seconds.
    workers = {pid for pid, args in up.children().items() if "worker --lanes transactional" in args}
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: {p for p, a in up.children().items() if "worker --lanes transactional" in a} - workers,
        timeout_s=15,
        what="the worker to be restarted",
    )
    second = post(up, "/v1/events", api_key, {"type": "visit.moved", "subject": "visit:88"})
    second_id = second["deliveries"][0]["id"]  # type: ignore[index]
    wait_until(lambda: second_id in receiver.ids(), what="a webhook through the restarted worker")

    logged = up.log.stat().st_size
    assert up.stop(group=True) == 0  # the supervisor's exit status for a requested stop
    assert up.children() == {}, "Ctrl-C left processes behind"
    assert up.leftovers() == [], "Ctrl-C left processes of this data folder behind"
    stopping = up.log.read_bytes()[logged:].decode(errors="replace")
    assert "Herald stopped" in stopping, stopping[-3000:]
    for unclean in ("restarting", "killing it"):
        assert unclean not in stopping, f"{unclean!r} while stopping:\n{stopping[-3000:]}"
    assert list(Path(up.env["HERALD_DATA_DIR"]).glob("appendonly*")), "embedded Redis kept no append-only file"
    assert not (Path(up.env["HERALD_DATA_DIR"]) / "redis.sock").exists(), "Redis did not shut down cleanly"
    # The embedded Redis is in a session of its own: Ctrl-C does not reach it, the supervisor stops
    # it last, so workers in warm shutdown can still ack their messages.
    assert "Traceback" not in stopping, stopping[-3000:]

    up.start()  # the same folder: everything where it was
    answer = requests.get(
        f"{up.base}/v1/deliveries/{second_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    )
    assert answer.status_code == 200
    assert answer.json()["state"] == "delivered"
    assert up.stop() == 0  # kill -INT to the supervisor alone: it stops its children itself
    assert up.children() == {}, "kill -INT left processes behind"
    assert up.leftovers() == [], "kill -INT left processes of this data folder behind"
    assert receiver.bad_signatures == 0
