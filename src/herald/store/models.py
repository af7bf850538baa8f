"""Tables of the system of record. Redis holds nothing that cannot be rebuilt from these."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive, as text).

    On SQLite a value is written in one step (``sqlite_text``) instead of this decorator's step
    followed by SQLAlchemy's own, which formats through a dict of seven fields: a worker writes
    two timestamps per attempt. The text is the one SQLAlchemy writes, so values compare equal
    however they were written.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime stored: {value!r}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name == "sqlite":
            return sqlite_text
        return super().bind_processor(dialect)


def sqlite_text(value: datetime | None) -> str | None:
    """An aware datetime as SQLite stores it: UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime stored: {value!r}")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


class DeliveryState(StrEnum):
    scheduled = "scheduled"
    queued = "queued"
    sending = "sending"
    delivered = "delivered"
    retrying = "retrying"
    dead = "dead"
    expired = "expired"
    canceled = "canceled"
    suppressed = "suppressed"


TERMINAL_STATES = frozenset(
    {
        DeliveryState.delivered,
        DeliveryState.dead,
        DeliveryState.expired,
        DeliveryState.canceled,
        DeliveryState.suppressed,
    }
)


class Lane(StrEnum):
    otp = "otp"
    transactional = "transactional"
    bulk = "bulk"


class Channel(StrEnum):
    webhook = "webhook"
    email = "email"
    sms = "sms"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    retry_max_attempts: Mapped[int | None] = mapped_column(Integer)
    retry_window_s: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class Endpoint(Base):
    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    event_types: Mapped[list[str] | None] = mapped_column(JSON)
    max_rate_per_s: Mapped[int | None] = mapped_column(Integer)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class EndpointSecret(Base):
    """A signing secret; the current one has no ``expires_at``, rotated ones sign until it passes."""

    __tablename__ = "endpoint_secrets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"), index=True)
    secret: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()


class Event(Base):
    __tablename__ = "events"
    # Also serves look-ups by tenant alone (its leading column): no second index on tenant_id.
    __table_args__ = (Index("ix_events_tenant_subject", "tenant_id", "subject"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    lane: Mapped[str] = mapped_column(String(20))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    """The answer given for an idempotency key, replayed when the same body comes again."""

    __tablename__ = "idempotency_records"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _where_set(name: str, *columns: str, column: str) -> Index:
    """An index on ``columns`` of the rows where ``column`` is not NULL (SQLite and PostgreSQL)."""
    condition = sql_text(f"{column} IS NOT NULL")
    return Index(name, *columns, sqlite_where=condition, postgresql_where=condition)


class Delivery(Base):
    """One message to one address over one channel.

    ``due_at`` is set while the delivery waits to be dispatched and cleared when the dispatcher
    claims it; ``lease_until`` is set while a Celery message for it is in flight.
    """

    __tablename__ = "deliveries"
    # Indexes on columns most rows leave empty (or empty once finished) hold only the rows that
    # set them: every insert and state change writes fewer index entries, and the dispatcher's
    # indexes stay the size of the work in hand rather than of the history. Every query on
    # them compares the column (``=``, ``<=``, ``IS NOT NULL``), which both databases read as
    # implying the index's condition.
    __table_args__ = (
        _where_set("ix_deliveries_due", "lane", "due_at", column="due_at"),
        _where_set("ix_deliveries_lease", "lease_until", column="lease_until"),
        # The dispatcher's in-flight count reads nothing else.
        _where_set("ix_deliveries_in_flight", "lane", column="lease_until"),
        Index("ix_deliveries_tenant_state", "tenant_id", "state"),
        Index("ix_deliveries_tenant_subject", "tenant_id", "subject"),
        _where_set("ix_deliveries_schedule_key", "tenant_id", "schedule_key", column="schedule_key"),
        _where_set("ix_deliveries_recipient_id", "recipient_id", column="recipient_id"),
        _where_set("ix_deliveries_drop_id", "drop_id", column="drop_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str | None] = mapped_column(ForeignKey("endpoints.id", ondelete="SET NULL"), index=True)
    channel: Mapped[str] = mapped_column(String(20))
    lane: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    event_type: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime | None] = mapped_column()
    lease_until: Mapped[datetime | None] = mapped_column()
    deliver_by: Mapped[datetime | None] = mapped_column()
    first_attempt_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    replays: Mapped[int] = mapped_column(Integer, default=0)
    recipient_id: Mapped[str | None] = mapped_column(ForeignKey("recipients.id", ondelete="SET NULL"))
    address: Mapped[str | None] = mapped_column(Text)
    content: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    category: Mapped[str | None] = mapped_column(String(60))
    schedule_key: Mapped[str | None] = mapped_column(String(200))
    drop_id: Mapped[str | None] = mapped_column(ForeignKey("drops.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Attempt(Base):
    """One try of a delivery, with the retry decision taken after it."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    latency_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String(60))


class Recipient(Base):
    """A person: addresses, locale, time zone, preferences (category -> channel -> bool), quiet hours."""

    __tablename__ = "recipients"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id", name="uq_recipients_external"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(20))
    locale: Mapped[str | None] = mapped_column(String(35))
    timezone: Mapped[str | None] = mapped_column(String(64))
    preferences: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    quiet_hours: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Template(Base):
    """Per tenant x event type x channel x locale ('' = the default locale)."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("tenant_id", "event_type", "channel", "locale", name="uq_templates_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(20))
    locale: Mapped[str] = mapped_column(String(35), default="")
    subject: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class OtpCode(Base):
    """A one-time passcode: only its hash is kept."""

    __tablename__ = "otp_codes"
    __table_args__ = (Index("ix_otp_tenant_recipient", "tenant_id", "recipient_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    recipient_id: Mapped[str] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(20))
    purpose: Mapped[str] = mapped_column(String(60))
    code_hash: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    consumed_at: Mapped[datetime | None] = mapped_column()
    delivery_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Recurring(Base):
    """A tenant-defined recurring send: a cron expression in a time zone and the event to emit."""

    __tablename__ = "recurring"
    __table_args__ = (Index("ix_recurring_due", "enabled", "next_fire_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64))
    event: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_fire_at: Mapped[datetime | None] = mapped_column()
    last_fired_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PeriodicRun(Base):
    """One firing of a periodic job; the primary key makes a second beat's same tick a no-op."""

    __tablename__ = "periodic_runs"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    fire_at: Mapped[datetime] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Drop(Base):
    """A file of user ids from the watched folder, with progress that survives a crash."""

    __tablename__ = "drops"
    __table_args__ = (UniqueConstraint("content_hash", name="uq_drops_hash"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    campaign: Mapped[str | None] = mapped_column(String(200))
    endpoint_id: Mapped[str | None] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))
    lines: Mapped[int] = mapped_column(Integer, default=0)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    rejections: Mapped[list[Any]] = mapped_column(JSON, default=list)
    committed_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
