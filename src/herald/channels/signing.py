"""Standard Webhooks signatures: ``whsec_`` secrets, HMAC-SHA256, ``v1,<base64>`` values.

The signed content is ``{msg_id}.{timestamp}.{body}`` with the raw body bytes, keyed with the
base64-decoded part of the secret after ``whsec_``. During a rotation an endpoint has several
secrets; the header then carries one signature per secret, space-separated, and a receiver
accepts the message if any of them verifies. Spec: https://www.standardwebhooks.com/
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
from collections.abc import Sequence
from secrets import token_bytes

from herald.errors import ValidationError

SECRET_PREFIX = "whsec_"
# The spec asks for keys of 24 to 64 bytes; shorter keys are too weak, longer ones hint at a mix-up.
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")


def generate_secret(n_bytes: int = 32) -> str:
    """A new random secret, ``whsec_`` followed by the base64 of ``n_bytes`` (24 to 32) random bytes."""
    if not MIN_KEY_BYTES <= n_bytes <= 32:
        raise ValueError(f"n_bytes: must be between {MIN_KEY_BYTES} and 32, got {n_bytes}")
    return SECRET_PREFIX + base64.b64encode(token_bytes(n_bytes)).decode("ascii")


def sign(*, secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, in order, space-separated.

    Raises ``ValidationError`` (field ``secret``) for a malformed secret and (field ``secrets``)
    for none at all; the message never contains the secret itself.
    """
    if not secrets:
        raise ValidationError("secrets: at least one signing secret is required, got none", field="secrets")
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(_signature(_key(secret), content) for secret in secrets)


def headers(*, secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt; ``msg_id`` stays the same across retries."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets=secrets, msg_id=msg_id, timestamp=timestamp, body=body),
    }


@functools.lru_cache(maxsize=4096)
def _key(secret: str) -> bytes:
    """The HMAC key of ``secret`` (cached: every attempt of a batch signs with the same few secrets)."""
    problem = f"must be '{SECRET_PREFIX}' followed by the base64 of {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes"
    if not secret.startswith(SECRET_PREFIX):
        raise ValidationError(f"secret: {problem}, got a value without the prefix", field="secret")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValidationError(f"secret: {problem}, got invalid base64", field="secret") from exc
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValidationError(f"secret: {problem}, got {len(key)} bytes", field="secret")
    return key


def _signature(key: bytes, content: bytes) -> str:
    digest = hmac.digest(key, content, "sha256")  # OpenSSL's one-shot HMAC, no Python object
    return "v1," + base64.b64encode(digest).decode("ascii")
