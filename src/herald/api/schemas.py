"""Request and response bodies. ``*In`` forbid unknown fields; ``*Out`` are what we answer."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from herald.store.models import Lane

EventType = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")]
EventTypeFilter = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}(\.\*)?)$")]
# No control characters anywhere we store text: PostgreSQL refuses NUL in text columns.
SUBJECT_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
ID_PATTERN = r"^[A-Za-z0-9_]+$"
Subject = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=SUBJECT_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
Key = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=ID_PATTERN)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=r"^[^\x00-\x1f\x7f]+$")]
MAX_DATA_DEPTH = 32


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointIn(In):
    url: Url
    description: ShortText = ""
    event_types: list[EventTypeFilter] | None = Field(default=None, max_length=100)
    max_rate_per_s: int | None = Field(default=None, ge=1, le=100_000, strict=True)
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000, strict=True)


class EndpointPatch(In):
    url: Url | None = None
    description: ShortText | None = None
    event_types: list[EventTypeFilter] | None = Field(default=None, max_length=100)
    max_rate_per_s: int | None = Field(default=None, ge=1, le=100_000, strict=True)
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000, strict=True)


class RotateIn(In):
    grace_s: int | None = Field(default=None, ge=0, le=7 * 24 * 3600, strict=True)


class EndpointOut(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str] | None
    max_rate_per_s: int | None
    max_concurrency: int | None = None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    secret: str | None = None


def _known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone, got {value!r}") from None
    return value


TimeZone = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_known_zone)]
RecipientRef = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Category = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,60}$")]


class RelativeIn(In):
    """A time relative to an ISO 8601 instant in ``data`` (``field`` is a dotted path).

    ``{"field": "visit.starts_at", "offset_s": -86400}``: 24 hours before. ``{"field": …, "days": -1,
    "at": "09:00"}``: the day before at 09:00 in the recipient's time zone.
    """

    field: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){0,9}$")]
    offset_s: float = Field(default=0.0, ge=-366 * 86400, le=366 * 86400, allow_inf_nan=False)
    days: int | None = Field(default=None, ge=-366, le=366, strict=True)
    at: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] | None = None

    @model_validator(mode="after")
    def _days_with_at(self) -> RelativeIn:
        if (self.days is None) != (self.at is None):
            raise ValueError("days and at: give both or neither")
        return self


class EventIn(In):
    type: EventType
    subject: Subject | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    endpoint_ids: list[ObjectId] | None = Field(default=None, min_length=1, max_length=100)
    idempotency_key: Key | None = None
    lane: Lane = Lane.transactional
    recipients: list[RecipientRef] | None = Field(default=None, min_length=1, max_length=1000)
    channels: list[Literal["email", "sms"]] | None = Field(default=None, min_length=1, max_length=2)
    category: Category | None = None
    send_at: AwareDatetime | None = None
    send_relative: RelativeIn | None = None
    deliver_by: AwareDatetime | None = None
    deliver_by_relative: RelativeIn | None = None
    schedule_key: Key | None = None

    @model_validator(mode="after")
    def _one_send_time(self) -> EventIn:
        if self.send_at is not None and self.send_relative is not None:
            raise ValueError("send_at and send_relative: give one, not both")
        if self.deliver_by is not None and self.deliver_by_relative is not None:
            raise ValueError("deliver_by and deliver_by_relative: give one, not both")
        return self

    @field_validator("data")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Refuse what the JSON column or the answer cannot hold: NaN/Infinity, very deep nesting."""
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, float) and not math.isfinite(item):
                raise PydanticCustomError("json_number", "numbers must be finite (NaN and Infinity are not JSON)")
            if isinstance(item, dict | list):
                if depth > MAX_DATA_DEPTH:
                    raise PydanticCustomError("json_depth", f"nested deeper than {MAX_DATA_DEPTH} levels")
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
        return value


class BatchIn(In):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class DeliveryBrief(BaseModel):
    id: str
    endpoint_id: str | None
    channel: str
    state: str
    recipient: str | None = None
    due_at: datetime | None = None


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
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None


class ReplayIn(In):
    ids: list[ObjectId] | None = Field(default=None, min_length=1, max_length=10_000)
    filter: ReplayFilter | None = None
    force: bool = Field(default=False, strict=True)


class ReplayOut(BaseModel):
    replayed: list[str]
    skipped: list[str]
