"""Consumer links: signed, expiring, read-only tokens scoped to one tenant's subject.

A token is ``base64url(payload).base64url(hmac)``; the payload names the tenant, the subject and
the expiry. Tokens cannot be widened, and every API process that shares the secret accepts them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from herald.errors import AuthError


@dataclass(frozen=True)
class LinkClaims:
    tenant_id: str
    subject: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(claims: LinkClaims, *, key: bytes) -> str:
    payload = json.dumps(
        {"t": claims.tenant_id, "s": claims.subject, "e": int(claims.expires_at.timestamp())}, separators=(",", ":")
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify_link(token: str, *, key: bytes, now: datetime) -> LinkClaims:
    """The claims of a valid, unexpired token; AuthError otherwise (never saying which check failed
    beyond 'expired', so forgeries learn nothing)."""
    try:
        payload_part, mac_part = token.split(".")
        payload, mac = _unb64(payload_part), _unb64(mac_part)
    except (ValueError, UnicodeEncodeError):
        raise AuthError("token: not a valid link token", field="token") from None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise AuthError("token: not a valid link token", field="token")
    data = json.loads(payload)
    claims = LinkClaims(data["t"], data["s"], datetime.fromtimestamp(data["e"], UTC))
    if claims.expires_at <= now:
        raise AuthError("token: link expired", field="token")
    return claims


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
