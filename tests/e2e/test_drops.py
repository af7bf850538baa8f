"""Drops in real processes: ``herald watch`` + dispatcher + worker + a receiver, ``kill -9`` in the
middle of a large file, and ``herald drops`` in the terminal."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, sessionmaker

from herald.config import Settings
from herald.store import queries
from herald.store.db import transaction
from herald.store.ids import new_id
from herald.store.models import Delivery, Drop, Endpoint, Event
from tests.e2e.test_delivery import make_endpoint
from tests.support import Processes, Receiver, settings_env, wait_until

pytestmark = pytest.mark.slow


def herald(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "herald.cli", *args], env=settings_env(settings), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def drop_file(folder: Path, name: str, write: Any) -> Path:
    """Write NAME.part, then rename it into place, as senders must."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.part"
    with partial.open("w") as out:
        write(out)
    os.replace(partial, folder / name)
    return folder / name


def the_drop(sessions: sessionmaker[Session]) -> Drop | None:
    with sessions() as session:
        return session.scalars(select(Drop)).one_or_none()


def test_watch_delivers_a_csv_drop_end_to_end_and_reports_it(
    settings: Settings,
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
) -> None:
    endpoint_id = make_endpoint(client, auth, receiver)
    drops = settings.data_dir / "drops"
    campaign = drops / "spring"
    campaign.mkdir(parents=True)
    config = {"tenant": "acme", "endpoint_id": endpoint_id, "event_type": "promo.sent", "data": {"offer": "S10"}}
    (campaign / "campaign.json").write_text(json.dumps(config))
    processes.env.update(
        {"HERALD_INGEST__RESCAN_S": "0.5", "HERALD_INGEST__REPORT_EVERY_S": "0.5", "HERALD_INGEST__CHUNK_SIZE": "500"}
    )
    processes.start("watch", "watch")
    processes.worker(lanes="bulk")
    processes.dispatcher()

    def write(out: Any) -> None:
        out.write("\ufeffuser_id,name\r\n# exported from the CRM\r\n")
        for n in range(2000):
            out.write(f'user-{n},"Customer {n}, Esq."\r\n')
        out.write("bad id,x\r\nuser-7,again\r\nuser-9999\r\n")

    (campaign / "ignored.csv.part").write_text("user_id\nnot-sent\n")
    drop_file(campaign, "users.csv", write)

    wait_until(lambda: len(receiver.ids()) >= 2000, timeout_s=60, what="2,000 webhooks")
    bodies = [json.loads(r.body) for r in receiver.received]
    users = {b["data"]["user_id"] for b in bodies}
    assert users == {f"user-{n}" for n in range(2000)} and len(receiver.ids()) == 2000
    first = next(b for b in bodies if b["data"]["user_id"] == "user-1")
    assert first["type"] == "promo.sent" and first["subject"] == "user-1"
    assert first["data"] == {"user_id": "user-1", "name": "Customer 1, Esq.", "offer": "S10"}
    assert receiver.bad_signatures == 0

    report_file = drops / "done" / "spring" / "users.csv.report.json"
    report = wait_until(
        lambda: report_file.exists() and (r := json.loads(report_file.read_text()))["state"] == "finished" and r,
        timeout_s=30,
        what="the report to say finished",
    )
    assert (report["lines"], report["accepted"], report["rejected"]) == (2005, 2000, 3)
    assert (report["delivered"], report["dead"], report["pending"]) == (2000, 0, 0)
    assert [r["line"] for r in report["rejections"]] == [2003, 2004, 2005]
    assert report["rejections"][1]["reason"] == "duplicate of line 10"
    assert report["timings"]["delivered_at"] and report["timings"]["ingest_s"] is not None
    assert (drops / "done" / "spring" / "users.csv").exists() and not (campaign / "users.csv").exists()
    assert (campaign / "ignored.csv.part").exists()

    listed = herald(settings, "drops")
    assert "[####################] 100% 2,000/2,000 delivered, 0 dead, 3 lines rejected" in listed
    assert "spring/users.csv" in listed and "finished" in listed
    shown = herald(settings, "drops", "show", report["drop_id"])
    assert "2,005 lines: 2,000 accepted, 3 rejected" in shown and "line 2004: duplicate of line 10" in shown

    # The same file again: nothing new is created or sent, and the report says why.
    drop_file(campaign, "users-again.csv", write)
    duplicate = drops / "done" / "spring" / "users-again.csv.report.json"
    wait_until(duplicate.exists, timeout_s=20, what="the duplicate's report")
    assert json.loads(duplicate.read_text())["duplicate_of"] == report["drop_id"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 2000
    assert len(receiver.received) == 2000


def test_watch_hands_its_chunks_to_the_bulk_workers_with_no_dispatcher_running(
    settings: Settings,
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
) -> None:
    """``herald watch`` publishes the chunks it wrote claimed: a watcher and a worker alone deliver."""
    endpoint_id = make_endpoint(client, auth, receiver)
    processes.env.update(
        {
            "HERALD_INGEST__TENANT": "acme",
            "HERALD_INGEST__ENDPOINT_ID": endpoint_id,
            "HERALD_INGEST__CHUNK_SIZE": "100",
        }
    )
    drop_file(settings.data_dir / "drops", "users.txt", lambda out: out.writelines(f"u{n}\n" for n in range(300)))
    processes.start("watch", "watch")
    processes.worker(lanes="bulk")

    def states() -> dict[str, int]:
        with sessions() as session:
            return dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())  # type: ignore[arg-type]

    wait_until(lambda: states() == {"delivered": 300}, timeout_s=60, what="300 deliveries without a dispatcher")
    assert len(receiver.ids()) == 300


def test_kill_9_during_ingestion_resumes_without_losing_or_doubling_a_line(
    settings: Settings, api_key: str, processes: Processes, sessions: sessionmaker[Session]
) -> None:
    total = 100_000
    with transaction(sessions) as session:
        tenant = queries.get_tenant(session=session, ref="acme")
        endpoint = Endpoint(id=new_id("end"), tenant_id=tenant.id, url="http://127.0.0.1:9/hook")
        session.add(endpoint)
    processes.env.update(
        {
            "HERALD_INGEST__TENANT": "acme",
            "HERALD_INGEST__ENDPOINT_ID": endpoint.id,
            "HERALD_INGEST__CHUNK_SIZE": "2000",
            "HERALD_INGEST__CHUNK_PAUSE_S": "0.03",  # 50 chunks of at least 30 ms: the kill lands mid-file
        }
    )
    drops = settings.data_dir / "drops"
    path = drop_file(drops, "big.txt", lambda out: out.writelines(f"{n:08d}\n" for n in range(total)))
    processes.start("watch", "watch")
    wait_until(lambda: (d := the_drop(sessions)) is not None and d.lines >= 10_000, timeout_s=60, what="chunks")
    processes.kill("watch")

    drop = the_drop(sessions)
    assert drop is not None and drop.state == "ingesting" and 10_000 <= drop.lines < total
    with sessions() as session:
        committed = session.scalar(select(func.count()).select_from(Delivery))
    assert committed == drop.accepted == drop.lines  # the chunk in flight at the kill left nothing behind
    assert path.exists()

    processes.start("watch-again", "watch")
    wait_until(lambda: (d := the_drop(sessions)) is not None and d.state != "ingesting", timeout_s=60, what="the rest")
    assert "resuming big.txt after line" in processes.log("watch-again")
    drop = the_drop(sessions)
    assert drop is not None and (drop.lines, drop.accepted, drop.rejected) == (total, total, 0)
    with sessions() as session:
        deliveries = session.scalar(select(func.count()).select_from(Delivery))
        subjects = session.scalar(select(func.count(distinct(Delivery.subject))))
        events = session.scalar(select(func.count()).select_from(Event))
    assert deliveries == subjects == events == total
    wait_until((drops / "done" / "big.txt").exists, timeout_s=10, what="the file to move to done/")
    assert not path.exists()


def test_a_failing_receiver_leaves_dead_letters_that_the_cli_lists_and_replays_under_the_same_webhook_ids(
    settings: Settings,
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
) -> None:
    healthy = threading.Event()
    receiver.behaviour = lambda _id, _n: 200 if healthy.is_set() else 500
    endpoint_id = make_endpoint(client, auth, receiver)
    drops = settings.data_dir / "drops"
    campaign = drops / "winback"
    campaign.mkdir(parents=True)
    config = {"tenant": "acme", "endpoint_id": endpoint_id, "event_type": "promo.winback"}
    (campaign / "campaign.json").write_text(json.dumps(config))
    processes.env.update({"HERALD_INGEST__RESCAN_S": "0.5", "HERALD_INGEST__REPORT_EVERY_S": "0.5"})
    processes.start("watch", "watch")
    processes.worker(lanes="bulk")
    processes.dispatcher()
    users = [f"user-{n}" for n in range(10)]
    drop_file(campaign, "users.txt", lambda out: out.writelines(f"{u}\n" for u in users))
    max_attempts = settings.retry.max_attempts
    report_file = drops / "done" / "winback" / "users.txt.report.json"

    def report_when(done: Any) -> Any:
        return lambda: report_file.exists() and done(r := json.loads(report_file.read_text())) and r

    # Every attempt fails: each delivery retries, then dies; the report and the API count the dead.
    report = wait_until(report_when(lambda r: r["state"] == "finished"), timeout_s=60, what="every delivery to die")
    assert (report["accepted"], report["delivered"], report["dead"], report["pending"]) == (10, 0, 10, 0)
    assert len(receiver.received) == 10 * max_attempts and {r.status for r in receiver.received} == {500}
    drop_id = report["drop_id"]
    shown = client.get(f"/v1/drops/{drop_id}", headers=auth).json()
    assert shown["state"] == "finished"
    assert shown["progress"] == {"delivered": 0, "dead": 10, "pending": 0, "other": 0, "percent": 100.0}

    listed = [json.loads(line) for line in herald(settings, "drops", "dead-letters", drop_id, "--json").splitlines()]
    assert sorted(d["user_id"] for d in listed) == users
    assert all(d["attempts"] == max_attempts and "HTTP 500" in d["last_error"] for d in listed), listed
    dead_ids = sorted(d["id"] for d in listed)
    assert sorted(receiver.ids()) == dead_ids  # the webhook-id each attempt carried is the delivery id

    healthy.set()
    assert herald(settings, "drops", "replay", drop_id).strip() == "replayed 10, skipped 0"
    report = wait_until(
        report_when(lambda r: r["state"] == "finished" and r["delivered"] == 10), timeout_s=30, what="the replays"
    )
    assert (report["delivered"], report["dead"], report["pending"]) == (10, 0, 0)
    assert sorted(r.webhook_id for r in receiver.received if r.status == 200) == dead_ids  # once each, same ids
    assert len(receiver.received) == 10 * (max_attempts + 1) and receiver.bad_signatures == 0
    shown = client.get(f"/v1/drops/{drop_id}", headers=auth).json()
    assert shown["progress"] == {"delivered": 10, "dead": 0, "pending": 0, "other": 0, "percent": 100.0}
    assert client.get(f"/v1/drops/{drop_id}/dead-letters", headers=auth).json()["data"] == []


# Linux keeps a process's peak RSS across fork and exec, so a child of this (large) test process
# would report at least the test's size: a small Python process starts the ingester and reports it.
MEASURE = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as log:
    code = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def peak_rss_mib(settings: Settings, folder: Path, env: dict[str, str]) -> float:
    """Run ``herald watch --once FOLDER`` and return the peak resident memory of that process."""
    log = folder.parent / f"{folder.name}.log"
    herald_cli = [sys.executable, "-m", "herald.cli", "watch", "--once", str(folder)]
    command = [sys.executable, "-c", MEASURE, str(log), *herald_cli]
    done = subprocess.run(command, env=settings_env(settings) | env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, log.read_text() + done.stderr
    return int(done.stdout) / 1024  # KiB on Linux


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the ingester's memory, not the database's
def test_ingestion_memory_does_not_grow_with_the_file(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Peak RSS of ``herald watch --once`` on 10,000 and on 100,000 distinct ids.

    Measured on the 2-core machine: about 101 MB and 105 MB; 1,000,000 lines peak at 111 MB (too
    slow for the suite: SQLite spends about 75 s of CPU on them). What grows is bounded: the page
    caches of the duplicate finder (``herald.ingest.seen``, at most 8 MiB) and of SQLite. Keeping
    each line's id alive (a set of the ids, a list of the lines) adds about 8 MB more here.
    """
    with transaction(sessions) as session:
        tenant = queries.create_tenant(session=session, name="acme")
        endpoint = Endpoint(id=new_id("end"), tenant_id=tenant.id, url="http://127.0.0.1:9/hook")
        session.add(endpoint)
    env = {"HERALD_INGEST__TENANT": "acme", "HERALD_INGEST__ENDPOINT_ID": endpoint.id, "HERALD_LOG_LEVEL": "WARNING"}
    peaks = {}
    for lines in (10_000, 100_000):
        folder = tmp_path / f"drops-{lines}"
        drop_file(folder, "users.txt", lambda out, n=lines: out.writelines(f"user-{i:09d}\n" for i in range(n)))
        peaks[lines] = peak_rss_mib(settings, folder, env)
        assert (folder / "done" / "users.txt").exists()
    with sessions() as session:
        accepted = sorted(d.accepted for d in session.scalars(select(Drop)))
    assert accepted == [10_000, 100_000]
    assert peaks[100_000] - peaks[10_000] < 8.0, peaks


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the file locks are SQLite's
def test_bulk_work_runs_niced_and_behind_the_background_lock_while_urgent_lanes_go_on(
    settings: Settings,
    client: TestClient,
    auth: dict[str, str],
    receiver: Receiver,
    processes: Processes,
    sessions: sessionmaker[Session],
) -> None:
    endpoint = client.post("/v1/endpoints", json={"url": receiver.url}, headers=auth).json()
    processes.env.update({"HERALD_INGEST__TENANT": "acme", "HERALD_INGEST__ENDPOINT_ID": endpoint["id"],
                          "HERALD_INGEST__RESCAN_S": "0.5"})  # fmt: skip
    watch = processes.start("watch", "watch")
    processes.worker("bulk", lanes="bulk", wait=True)
    processes.worker("urgent", lanes="otp,transactional", wait=True)
    processes.dispatcher()
    # Bulk-only workers (and their pool children) and the ingester yield the CPU; the others do not.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    background = min(19, mine + settings.worker.bulk_nice)
    nice = {name: os.getpriority(os.PRIO_PROCESS, processes.running[name].pid) for name in ("bulk", "urgent")}
    assert (os.getpriority(os.PRIO_PROCESS, watch.pid), nice["bulk"], nice["urgent"]) == (background, background, mine)

    # While someone holds the background lock, no bulk write happens (ingestion, the bulk lane's
    # claims and takes) but a transactional event is accepted, dispatched, sent and recorded.
    database = settings.database_url.removeprefix("sqlite:///")
    held = os.open(f"{database}-background.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        drop_file(settings.data_dir / "drops", "users.txt", lambda out: out.writelines(f"u-{n}\n" for n in range(20)))
        dropped_at = time.monotonic()
        answer = client.post("/v1/events", json={"type": "ticket.updated", "subject": "ticket:1",
                                                 "endpoint_ids": [endpoint["id"]]}, headers=auth)  # fmt: skip
        urgent_id = answer.json()["deliveries"][0]["id"]
        wait_until(
            lambda: client.get(f"/v1/deliveries/{urgent_id}", headers=auth).json()["state"] == "delivered",
            timeout_s=30,
            what="the transactional delivery",
        )
        time.sleep(max(0.0, dropped_at + 2.0 - time.monotonic()))  # the watcher sees a file within ms
        assert the_drop(sessions) is None and receiver.ids() == {urgent_id}
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        os.close(held)
    wait_until(lambda: len(receiver.ids()) == 21, timeout_s=60, what="the drop, once the lock is free")
