"""Request and response bodies. ``*In`` forbid unknown fields; ``*Out`` are what we answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from herald.store.models import Lane

EventType = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")]
EventTypeFilter = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}(\.\*)?)$")]
Subject = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s]+$")]
ShortText = Annotated[str, StringConstraints(max_length=1000)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=40)]


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointIn(In):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    description: ShortText = ""
    event_types: list[EventTypeFilter] | None = Field(default=None, max_length=100)
    max_rate_per_s: int | None = Field(default=None, ge=1, le=100_000, strict=True)


class EndpointPatch(In):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    description: ShortText | None = None
    event_types: list[EventTypeFilter] | None = Field(default=None, max_length=100)
    max_rate_per_s: int | None = Field(default=None, ge=1, le=100_000, strict=True)


class RotateIn(In):
    grace_s: int | None = Field(default=None, ge=0, le=7 * 24 * 3600, strict=True)


class EndpointOut(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str] | None
    max_rate_per_s: int | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    secret: str | None = None


class EventIn(In):
    type: EventType
    subject: Subject | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    endpoint_ids: list[ObjectId] | None = Field(default=None, min_length=1, max_length=100)
    idempotency_key: Key | None = None
    lane: Lane = Lane.transactional


class BatchIn(In):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class DeliveryBrief(BaseModel):
    id: str
    endpoint_id: str | None
    channel: str
    state: str


class EventAccepted(BaseModel):
    id: str
    type: str
    subject: str | None
    lane: str
    created_at: datetime
    deliveries: list[DeliveryBrief]
    status_url: str


class BatchAccepted(BaseModel):
    events: list[EventAccepted]


class EventOut(BaseModel):
    id: str
    type: str
    subject: str | None
    lane: str
    data: dict[str, Any]
    created_at: datetime
    deliveries: list[DeliveryBrief]


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    latency_ms: int
    status_code: int | None
    outcome: str
    error: str | None
    decision: str
    provider: str | None


class DeliveryOut(BaseModel):
    id: str
    event_id: str
    endpoint_id: str | None
    channel: str
    lane: str
    state: str
    event_type: str
    subject: str | None
    attempt_count: int
    next_attempt_at: datetime | None
    deliver_by: datetime | None
    last_status_code: int | None
    last_error: str | None
    replays: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    attempts: list[AttemptOut] | None = None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None


class ReplayFilter(In):
    endpoint_id: ObjectId | None = None
    event_type: EventType | None = None
    subject: Subject | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class ReplayIn(In):
    ids: list[ObjectId] | None = Field(default=None, min_length=1, max_length=10_000)
    filter: ReplayFilter | None = None
    force: bool = Field(default=False, strict=True)


class ReplayOut(BaseModel):
    replayed: list[str]
    skipped: list[str]
