"""The Celery application factory. Tasks are registered on the app it builds."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

from herald.config import LANES, Settings

DELIVER_BATCH = "herald.deliver_batch"
PERIODIC = "herald.periodic"
PERIODIC_EXPIRES_S = 300.0


def make_celery(settings: Settings) -> Celery:
    """A Celery app on Herald's broker with at-least-once settings.

    ``acks_late`` + ``reject_on_worker_lost``: a message is acknowledged only after its batch is
    recorded, so a killed worker's batch is redelivered. The Redis ``visibility_timeout`` is the
    dispatcher's lease plus a margin: by the time Redis would redeliver an unacknowledged message
    the reconciler has already re-dispatched its rows, and the duplicate finds them taken.
    """
    from herald.scheduler.jobs import jobs as periodic_jobs

    app = Celery("herald", broker=settings.broker_url, set_as_current=False)
    visibility_timeout = int(settings.dispatch.visibility_timeout_s or settings.dispatch.lease_s * 2 + 60)
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": settings.worker.task_events,
        "task_send_sent_event": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "task_queues": [Queue(lane) for lane in LANES],
        "task_default_queue": "transactional",
        "task_create_missing_queues": False,
        "beat_schedule": {
            name: {
                "task": PERIODIC,
                "schedule": every_s,
                "args": [name],
                # A tick nobody ran in time is dropped (the next tick does the same work), but not
                # before a transactional backlog had minutes to drain: expiring after one interval
                # would drop every tick for as long as a backlog lasts.
                "options": {"queue": "transactional", "expires": max(every_s, PERIODIC_EXPIRES_S)},
            }
            for name, every_s in ((job.name, job.every_s) for job in periodic_jobs(settings).values())
        },
        "timezone": "UTC",
        "enable_utc": True,
    }
    app.conf.update(conf)
    app.conf.herald_settings = settings
    from herald.worker import tasks

    tasks.register(app, settings)
    return app
