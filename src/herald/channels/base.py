"""The channel protocol. A channel sends one message and either returns what the receiver
answered or raises ``TransientChannelError`` (retry) / ``PermanentChannelError`` (dead-letter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self


@dataclass(frozen=True)
class WebhookMessage:
    """Everything needed to POST one webhook; ``delivery_id`` is the constant ``webhook-id``."""

    delivery_id: str
    url: str
    secrets: list[str]
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EmailMessage:
    """One email; ``delivery_id`` becomes the ``Message-ID`` and the ``Herald-Delivery-Id`` header."""

    delivery_id: str
    to: str
    subject: str
    text: str
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SmsMessage:
    """One SMS; ``delivery_id`` is passed as the provider's idempotency/reference field."""

    delivery_id: str
    to: str
    text: str


@dataclass(frozen=True)
class Sent:
    """A successful attempt."""

    status_code: int | None
    provider: str | None = None


class Channel(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class ChannelLifecycle:
    """``async with channel:`` starts it and closes it, for every channel."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
