"""The HTTP API: ``create_app(settings)`` builds it; nothing is created at import time."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import redis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from herald import __version__, heap, keys, live
from herald.api import problems
from herald.api.limits import BodyLimit
from herald.api.routes import (
    deliveries,
    drops,
    endpoints,
    events,
    ops,
    otp,
    recipients,
    recurring,
    schedules,
    subjects,
    templates,
    unsubscribe,
)
from herald.config import LANES, Settings
from herald.intake import IntakePolicy
from herald.links import link_key
from herald.metrics import HeraldCollector
from herald.store.db import make_engine, make_sessionmaker, reader

logger = logging.getLogger(__name__)


def make_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Herald", version=__version__)
    engine = make_engine(settings.database_url, pool_size=settings.database.pool_size)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.read_sessions = make_sessionmaker(reader(engine))  # GET requests, metrics, streams
    app.state.redis = make_redis(settings)
    app.state.allow_networks = [ipaddress.ip_network(n, strict=False) for n in settings.webhook.allow_networks]
    wake_key = keys.wake(settings.redis.key_prefix)

    def wake() -> None:
        # The rows are committed: if Redis is down the dispatcher's tick still finds them.
        try:
            pipe = app.state.redis.pipeline(transaction=False)
            pipe.rpush(wake_key, 1)
            pipe.ltrim(wake_key, -16, -1)
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not wake the dispatcher; it will find the work on its next tick")

    app.state.wake = wake
    app.state.link_key = link_key(settings.link_secret.get_secret_value(), settings.data_dir)
    app.state.intake_policy = IntakePolicy.from_settings(settings, link_key=app.state.link_key)
    prefix = settings.redis.key_prefix
    live.install(app.state.sessions, app.state.redis, prefix)  # cancellations, replays, passcodes

    def announce(tenant_id: str, answers: list[dict[str, Any]]) -> None:
        """Tell live timelines about new events (best effort: the timeline itself reads the database)."""
        messages = [
            {"kind": "event", "subject": answer["subject"], "event_id": answer["id"], "type": answer["type"]}
            for answer in answers
            if answer.get("subject")
        ]
        if not messages:
            return
        try:  # one message for the whole batch: streams take a list of changes
            app.state.redis.publish(keys.timeline(prefix, tenant_id), json.dumps(messages))
        except redis.RedisError:
            logger.warning("could not announce new events to live timelines")

    app.state.announce = announce
    registry = CollectorRegistry()
    registry.register(
        HeraldCollector(
            sessions=app.state.read_sessions, client=app.state.redis, prefix=settings.redis.key_prefix, lanes=LANES
        )
    )
    app.state.registry = registry
    problems.install(app)
    for module in (endpoints, events, deliveries, recipients, templates, otp, subjects, schedules, recurring, ops):
        app.include_router(module.router)
    app.include_router(drops.router)
    app.include_router(unsubscribe.router)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory for ``herald api``: settings from ``HERALD_*`` variables."""
    from herald.config import get_settings

    app = create_app(get_settings())
    heap.freeze_loaded()  # a batch of 1,000 events allocates its models and rows
    return app
