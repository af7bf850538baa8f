"""Consumer links: signed, expiring tokens scoped to one tenant's subject or one person's opt-out.

A token is ``base64url(payload).base64url(hmac)``; the payload's ``k`` says what it is for, so a
token for one purpose is refused by every other. Tokens cannot be widened, and every API process
that shares the secret accepts them.

* timeline links (``sign_link``): read-only access to one subject's timeline and stream;
* unsubscribe links (``sign_unsubscribe``): set one recipient's preference for one category and
  channel to false; ``UnsubscribeLinks.headers`` puts one in the ``List-Unsubscribe`` (RFC 2369)
  and ``List-Unsubscribe-Post`` (RFC 8058) headers of non-critical mail.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import os
import secrets
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from herald.config import Settings
from herald.errors import AuthError

_INVALID = "token: not a valid link token"
# The kinds of token; a timeline link from before kinds existed has none.
_TIMELINE = "timeline"
_UNSUBSCRIBE = "unsubscribe"
UNSUBSCRIBE_TTL_S = 400 * 24 * 3600  # mail is read, and unsubscribed from, months after it was sent


@dataclass(frozen=True)
class LinkClaims:
    tenant_id: str
    subject: str
    expires_at: datetime


@dataclass(frozen=True)
class UnsubscribeClaims:
    """Who (a recipient's Herald id, never an address) stops getting what (category by channel)."""

    tenant_id: str
    recipient_id: str
    category: str
    channel: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: dict[str, Any], key: bytes) -> str:
    data = json.dumps(payload, separators=(",", ":")).encode()
    return f"{_b64(data)}.{_b64(hmac.new(key, data, hashlib.sha256).digest())}"


def _verify(token: str, *, key: bytes, kind: str, fields: tuple[str, ...], now: datetime) -> dict[str, Any]:
    """The payload of a valid token of ``kind``; AuthError otherwise, never saying which check
    failed beyond 'expired', so forgeries learn nothing."""
    try:
        payload_part, mac_part = token.split(".")
        payload, mac = _unb64(payload_part), _unb64(mac_part)
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise AuthError(_INVALID, field="token") from None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise AuthError(_INVALID, field="token")
    try:
        data = json.loads(payload)
        valid = (
            isinstance(data, dict)
            and data.get("k", _TIMELINE) == kind
            and all(isinstance(data.get(name), str) for name in fields)
            and isinstance(data.get("e"), int)
        )
    except ValueError:
        valid = False
    if not valid:
        raise AuthError(_INVALID, field="token")
    if datetime.fromtimestamp(data["e"], UTC) <= now:
        raise AuthError("token: link expired", field="token")
    return dict(data)


def sign_link(claims: LinkClaims, *, key: bytes) -> str:
    return _sign({"t": claims.tenant_id, "s": claims.subject, "e": int(claims.expires_at.timestamp())}, key)


def verify_link(token: str, *, key: bytes, now: datetime) -> LinkClaims:
    """The claims of a valid, unexpired timeline link; AuthError otherwise."""
    data = _verify(token, key=key, kind=_TIMELINE, fields=("t", "s"), now=now)
    return LinkClaims(data["t"], data["s"], datetime.fromtimestamp(data["e"], UTC))


def sign_unsubscribe(claims: UnsubscribeClaims, *, key: bytes) -> str:
    payload = {"k": _UNSUBSCRIBE, "t": claims.tenant_id, "r": claims.recipient_id, "c": claims.category,
               "ch": claims.channel, "e": int(claims.expires_at.timestamp())}  # fmt: skip
    return _sign(payload, key)


def verify_unsubscribe(token: str, *, key: bytes, now: datetime) -> UnsubscribeClaims:
    """The claims of a valid, unexpired unsubscribe token; AuthError otherwise."""
    data = _verify(token, key=key, kind=_UNSUBSCRIBE, fields=("t", "r", "c", "ch"), now=now)
    return UnsubscribeClaims(data["t"], data["r"], data["c"], data["ch"], datetime.fromtimestamp(data["e"], UTC))


@dataclass(frozen=True)
class UnsubscribeLinks:
    """How non-critical mail offers an opt-out.

    With ``url`` (``HERALD_SMTP__UNSUBSCRIBE_URL``, the public address of Herald's
    ``/v1/public/unsubscribe`` route, https for RFC 8058) mail carries::

        List-Unsubscribe: <{url}?token={token}>
        List-Unsubscribe-Post: List-Unsubscribe=One-Click

    and a mail client's one-click POST there turns the preference off. Without it mail carries
    ``List-Unsubscribe: <mailto:{mailto}?subject=unsubscribe%20{token}>`` only (RFC 8058 allows
    one-click for https links only): Herald reads no mailbox, so whoever reads ``mailto``
    (``HERALD_SMTP__UNSUBSCRIBE_MAILTO``, default the sender's address) must post the token
    from the subject to ``/v1/public/unsubscribe``.
    """

    key: bytes
    url: str = ""
    mailto: str = ""
    ttl_s: int = UNSUBSCRIBE_TTL_S

    @classmethod
    def from_settings(cls, settings: Settings, *, key: bytes | None = None) -> UnsubscribeLinks:
        smtp = settings.smtp
        mailto = smtp.unsubscribe_mailto or email.utils.parseaddr(smtp.sender)[1]
        signing = key if key is not None else link_key(settings.link_secret.get_secret_value(), settings.data_dir)
        return cls(key=signing, url=smtp.unsubscribe_url, mailto=mailto)

    def token(self, *, tenant_id: str, recipient_id: str, category: str, channel: str, now: datetime) -> str:
        claims = UnsubscribeClaims(tenant_id, recipient_id, category, channel, now + timedelta(seconds=self.ttl_s))
        return sign_unsubscribe(claims, key=self.key)

    def headers(
        self, *, tenant_id: str, recipient_id: str, category: str, channel: str, now: datetime
    ) -> dict[str, str]:
        """The ``List-Unsubscribe`` headers for one recipient's mail of ``category``."""
        token = self.token(tenant_id=tenant_id, recipient_id=recipient_id, category=category, channel=channel, now=now)
        if self.url:
            separator = "&" if "?" in self.url else "?"
            return {
                "List-Unsubscribe": f"<{self.url}{separator}token={token}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            }
        subject = urllib.parse.quote(f"unsubscribe {token}")
        address = urllib.parse.quote(self.mailto, safe="@")
        return {"List-Unsubscribe": f"<mailto:{address}?subject={subject}>"}


def link_key(configured: str, data_dir: Path) -> bytes:
    """The signing key: ``HERALD_LINK_SECRET`` when set (required when API processes run on
    several machines), else a random key created once in the data folder."""
    if configured:
        return configured.encode()
    path = data_dir / "link.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic create-if-absent: two processes starting together agree
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()
