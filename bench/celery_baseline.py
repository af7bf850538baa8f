"""The baseline Herald replaces: one Celery task per webhook, sent with ``requests``.

Started by ``webhooks.py`` as ``python -m celery -A celery_baseline worker …`` (cwd ``bench/``).
Configured by environment so the driver can try several set-ups:

    BENCH_CELERY_BROKER   redis://127.0.0.1:6379/<db>       (required)
    BENCH_CELERY_HTTP     post     requests.post() per task (a new connection each time)
                          session  one requests.Session per worker process (keep-alive)
    BENCH_CELERY_PREFETCH worker_prefetch_multiplier        (default 4, Celery's default)

Celery's fastest reasonable defaults otherwise: early acknowledgement, no results, JSON.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from celery import Celery

QUEUE = "bench-per-message"
TASK = "bench.post_one"

app = Celery("bench_baseline", broker=os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/15"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_HTTP = os.environ.get("BENCH_CELERY_HTTP", "post")
_HEADERS = {"content-type": "application/json", "user-agent": "bench-celery/1"}
_session: tuple[int, requests.Session] | None = None


def _post(url: str, payload: str) -> requests.Response:
    global _session
    if _HTTP == "session":
        if _session is None or _session[0] != os.getpid():
            _session = (os.getpid(), requests.Session())
        return _session[1].post(url, data=payload, headers=_HEADERS, timeout=15)
    return requests.post(url, data=payload, headers=_HEADERS, timeout=15)


@app.task(name=TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def post_one(url: str, payload: str) -> Any:
    _post(url, payload).raise_for_status()
