"""Settings: one pydantic-settings object, ``HERALD_`` prefix, nested groups joined by ``__``.

Every setting is listed in the README. Factories take a ``Settings``; nothing reads the
environment at import time. Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LANES: tuple[str, ...] = ("otp", "transactional", "bulk")


class DatabaseSettings(BaseModel):
    """Where the system of record lives. Empty url = SQLite file in the data folder."""

    url: str = ""
    pool_size: int = Field(default=10, ge=1)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            scheme = value.split(":", 1)[0]
            raise ValueError(f"HERALD_DATABASE__URL: unsupported scheme {scheme!r}, expected sqlite or postgresql")
        return value


class RedisSettings(BaseModel):
    """The Celery broker and Herald's wake-up/metrics keys. Empty url = embedded Redis (``herald up``)."""

    url: str = ""
    key_prefix: str = "herald"


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)


class DispatchSettings(BaseModel):
    """How due rows become Celery messages."""

    tick_s: float = Field(default=0.5, gt=0)
    max_batch: int = Field(default=200, ge=1)
    max_claim: int = Field(default=2000, ge=1)
    target_tasks: int = Field(default=2, ge=1)
    max_in_flight: int = Field(default=20000, ge=1)
    lease_s: float = Field(default=120.0, gt=0)
    visibility_timeout_s: float = Field(default=0.0, ge=0)
    reconcile_every_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _visibility_outlasts_lease(self) -> DispatchSettings:
        """Redis must not redeliver an unacknowledged message before the reconciler could act.

        The reconciler returns a delivery to due at the latest ``reconcile_every_s`` after its
        lease ran out; a shorter Redis ``visibility_timeout`` would redeliver every slow batch
        while its rows are still leased (duplicates the lease exists to prevent).
        """
        floor = self.lease_s + self.reconcile_every_s
        if self.visibility_timeout_s and self.visibility_timeout_s <= floor:
            raise ValueError(
                f"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S: must exceed HERALD_DISPATCH__LEASE_S + "
                f"HERALD_DISPATCH__RECONCILE_EVERY_S ({floor:g}), got {self.visibility_timeout_s:g}"
            )
        if not self.visibility_timeout_s and self.reconcile_every_s >= self.lease_s + 60:
            # The derived timeout is 2 x lease + 60 s (worker/celery_app.py::make_celery).
            raise ValueError(
                f"HERALD_DISPATCH__RECONCILE_EVERY_S: must be under HERALD_DISPATCH__LEASE_S + 60 "
                f"({self.lease_s + 60:g}) while the visibility timeout is derived from the lease, "
                f"got {self.reconcile_every_s:g}"
            )
        return self


class RetrySettings(BaseModel):
    """Default retry policy; tenants may override attempts and window."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    base_delay_s: float = Field(default=5.0, ge=0)
    factor: float = Field(default=5.0, ge=1)
    max_delay_s: float = Field(default=6 * 3600.0, ge=0)
    window_s: float = Field(default=24 * 3600.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1)


class WebhookSettings(BaseModel):
    connect_timeout_s: float = Field(default=5.0, gt=0)
    total_timeout_s: float = Field(default=15.0, gt=0)
    max_response_bytes: int = Field(default=64 * 1024, ge=0)
    pool_size: int = Field(default=256, ge=1)
    secret_grace_s: float = Field(default=24 * 3600.0, ge=0)
    allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    user_agent: str = "Herald-Webhooks/0.1"

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"HERALD_WEBHOOK__ALLOW_NETWORKS: not a network, got {net!r}") from None
        return value


class SmtpSettings(BaseModel):
    """Outgoing mail. Without a host, mail is written as ``.eml`` files to the outbox folder."""

    host: str = ""
    port: int = Field(default=587, ge=1, le=65535)
    username: str = ""
    password: SecretStr = SecretStr("")
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    sender: str = "Herald <herald@localhost>"
    timeout_s: float = Field(default=15.0, gt=0)
    outbox_dir: Path | None = None
    # The public URL of Herald's one-click route (POST /v1/public/unsubscribe); without it,
    # List-Unsubscribe is a mailto: to ``unsubscribe_mailto`` (default: the sender's address).
    unsubscribe_url: str = ""
    unsubscribe_mailto: str = ""


class SmsProviderSettings(BaseModel):
    """One SMS provider: ``json`` (generic JSON over HTTP) or ``twilio`` (Twilio-compatible form API)."""

    kind: Literal["json", "twilio"] = "json"
    url: str = ""
    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    sender: str = ""
    name: str = ""


class SmsSettings(BaseModel):
    """SMS providers: a primary and an optional secondary taking over when the primary fails.
    Without a primary, messages are written to the outbox folder."""

    primary: SmsProviderSettings | None = None
    secondary: SmsProviderSettings | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    circuit_failures: int = Field(default=5, ge=1)
    circuit_reset_s: float = Field(default=30.0, gt=0)
    outbox_dir: Path | None = None


class OtpSettings(BaseModel):
    """One-time passcodes: length, lifetime, verification attempts and send throttling."""

    length: int = Field(default=6, ge=4, le=10)
    ttl_s: int = Field(default=300, ge=30, le=3600)
    max_attempts: int = Field(default=5, ge=1, le=20)
    sends_per_window: int = Field(default=5, ge=1)
    window_s: int = Field(default=900, ge=1)
    pepper: SecretStr = SecretStr("")


class SchedulerSettings(BaseModel):
    """Periodic jobs driven by Celery beat."""

    recurring_every_s: float = Field(default=10.0, gt=0)
    cleanup_every_s: float = Field(default=3600.0, gt=0)
    # A backstop to the dispatcher's own reconciler: leases that ran out go back to due even
    # while no dispatcher runs (it dispatches them when it is back).
    reconcile_every_s: float = Field(default=60.0, gt=0)
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)


class WorkerSettings(BaseModel):
    concurrency: int = Field(default=2, ge=1)
    max_tasks_per_child: int = Field(default=0, ge=0)
    # CPU priority offset (nice) of workers that serve only the bulk lane and of the drop
    # ingester, so that on a shared machine the urgent lanes and the API go first.
    bulk_nice: int = Field(default=10, ge=0, le=19)
    # Celery task events (task-received, -started, -succeeded) for monitors such as Flower. Off:
    # each costs the worker's main process a Redis publish per task, about a third of its CPU
    # while a drop drains, and Herald's own /metrics and delivery records do not need them.
    task_events: bool = False


class IngestSettings(BaseModel):
    """The watched drop folder (``herald watch``): where, how fast, and the target of top-level files.

    Files in a sub-folder use that folder's ``campaign.json``; files at the top level use
    ``tenant``, ``endpoint_id``, ``event_type``, ``lane`` and ``template`` from here. ``template``
    names one of the tenant's webhook templates by its locale, as ``campaign.json`` does (stored
    in canonical case; ``default`` for the default locale); empty: the default-locale template
    renders the payloads when the tenant has one.
    """

    dir: Path | None = None
    # A chunk is one write transaction; on SQLite everything else waits for it, so keep it short.
    chunk_size: int = Field(default=1000, ge=1, le=100_000)
    chunk_pause_s: float = Field(default=0.0, ge=0)
    # While urgent lanes (otp, transactional) have been busy in the last ``yield_for_s`` seconds,
    # chunks are this small with this pause between them, so an urgent write waits less for the
    # lock and the CPU; 0 turns yielding off.
    yield_for_s: float = Field(default=5.0, ge=0)
    yield_chunk_size: int = Field(default=250, ge=1, le=100_000)
    yield_pause_s: float = Field(default=0.02, ge=0)
    rescan_s: float = Field(default=5.0, gt=0)
    report_every_s: float = Field(default=30.0, gt=0)
    max_rejections: int = Field(default=1000, ge=0)
    tenant: str = ""
    endpoint_id: str = ""
    event_type: str = "drop.user"
    lane: Literal["transactional", "bulk"] = "bulk"
    template: str = ""

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if not value:
            return value
        from herald.content.lookup import DEFAULT_TEMPLATE, named_locale  # loads the models: not at import

        try:
            return named_locale(value) or DEFAULT_TEMPLATE
        except ValueError as exc:
            raise ValueError(f"HERALD_INGEST__TEMPLATE: {exc}") from None

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}", value):
            raise ValueError(f"HERALD_INGEST__EVENT_TYPE: not an event type, got {value!r}")
        return value


class Settings(BaseSettings):
    """All of Herald's configuration."""

    model_config = SettingsConfigDict(env_prefix="HERALD_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("herald-data")
    log_level: str = "INFO"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    sms: SmsSettings = Field(default_factory=SmsSettings)
    otp: OtpSettings = Field(default_factory=OtpSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    link_secret: SecretStr = SecretStr("")
    critical_categories: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["otp", "security"])

    @field_validator("critical_categories", mode="before")
    @classmethod
    def _split_categories(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _lease_covers_timeouts(self) -> Settings:
        if self.dispatch.lease_s <= self.webhook.total_timeout_s:
            raise ValueError(
                f"HERALD_DISPATCH__LEASE_S: must exceed HERALD_WEBHOOK__TOTAL_TIMEOUT_S "
                f"({self.webhook.total_timeout_s}), got {self.dispatch.lease_s}"
            )
        return self

    @property
    def outbox_dir(self) -> Path:
        """Where email and SMS go when no provider is configured."""
        return self.data_dir / "outbox"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'herald.db').resolve()}"

    @property
    def redis_url(self) -> str:
        return self.redis.url or f"unix://{(self.data_dir / 'redis.sock').resolve()}"

    @property
    def broker_url(self) -> str:
        """The Celery broker URL (kombu spells a unix socket ``redis+socket://``)."""
        url = self.redis_url
        if url.startswith("unix://"):
            return "redis+socket://" + url.removeprefix("unix://")
        return url


def explain(error: ValidationError) -> str:
    """The first problem of a settings error, naming its ``HERALD_*`` variable (never its value:
    it may be a secret)."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"] or message.startswith("HERALD_"):  # our validators name the variable
        return message
    return "HERALD_" + "__".join(str(part) for part in first["loc"]).upper() + ": " + message


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (CLI and servers only)."""
    return Settings()
