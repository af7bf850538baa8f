"""Herald's exceptions. One root; each class carries a stable ``code`` and an HTTP status.

HeraldError
├── ValidationError          422  bad input, names the field
│   └── PayloadTooLargeError 413
├── AuthError                401  absent, wrong or revoked API key
├── NotFoundError            404  unknown id, or another tenant's
├── ConflictError            409  idempotency key reused with another body, state conflicts
├── UnsafeUrlError           422  webhook target refused (scheme, private address, …)
├── ConfigError                   a bad setting (CLI exit code 2)
└── ChannelError                  a delivery attempt failed
    ├── TransientChannelError     retry later (5xx, timeout, connection)
    └── PermanentChannelError     dead-letter now (4xx, refused target)
"""

from __future__ import annotations


class HeraldError(Exception):
    code = "herald_error"
    status = 500
    title = "Internal error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(HeraldError):
    code = "validation_error"
    status = 422
    title = "Invalid request"

    def __init__(self, message: str, *, field: str | None = None, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message, field=field)
        self.errors = errors or ([{"field": field, "message": message}] if field else [])


class PayloadTooLargeError(ValidationError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class AuthError(HeraldError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class NotFoundError(HeraldError):
    code = "not_found"
    status = 404
    title = "Not found"


class ConflictError(HeraldError):
    code = "conflict"
    status = 409
    title = "Conflict"


class UnsafeUrlError(HeraldError):
    code = "unsafe_url"
    status = 422
    title = "Refused webhook URL"


class RateLimitedError(HeraldError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class OtpError(HeraldError):
    code = "otp_invalid"
    status = 422
    title = "Passcode not accepted"


class ConfigError(HeraldError):
    code = "config_error"
    title = "Bad configuration"


class ChannelError(HeraldError):
    code = "channel_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.provider = provider


class TransientChannelError(ChannelError):
    code = "transient_channel_error"


class PermanentChannelError(ChannelError):
    code = "permanent_channel_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        provider: str | None = None,
        disable_endpoint: bool = False,
    ) -> None:
        super().__init__(message, status_code=status_code, provider=provider)
        self.disable_endpoint = disable_endpoint
