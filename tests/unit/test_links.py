"""Consumer link tokens: valid ones verify, tampered or expired ones never do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.errors import AuthError
from herald.links import LinkClaims, sign_link, verify_link

KEY = b"k" * 32
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
subjects = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)


@given(subject=subjects, ttl=st.integers(1, 10**7))
def test_signed_links_verify(subject: str, ttl: int) -> None:
    claims = LinkClaims("ten_1", subject, NOW + timedelta(seconds=ttl))
    assert verify_link(sign_link(claims, key=KEY), key=KEY, now=NOW) == claims.__class__(
        "ten_1", subject, claims.expires_at.replace(microsecond=0)
    )


@given(subject=subjects, position=st.integers(0, 500), char=st.sampled_from("AbZ09-_."))
def test_any_tampering_is_refused(subject: str, position: int, char: str) -> None:
    token = sign_link(LinkClaims("ten_1", subject, NOW + timedelta(days=1)), key=KEY)
    index = position % len(token)
    tampered = token[:index] + char + token[index + 1 :]
    original = verify_link(token, key=KEY, now=NOW)
    try:
        claims = verify_link(tampered, key=KEY, now=NOW)
    except AuthError:
        return
    # Only a change in base64's unused padding bits decodes to the same bytes: nothing was altered.
    assert claims == original


def test_expired_and_foreign_links_are_refused() -> None:
    token = sign_link(LinkClaims("ten_1", "ticket:1", NOW - timedelta(seconds=1)), key=KEY)
    with pytest.raises(AuthError, match="expired"):
        verify_link(token, key=KEY, now=NOW)
    fresh = sign_link(LinkClaims("ten_1", "ticket:1", NOW + timedelta(hours=1)), key=KEY)
    with pytest.raises(AuthError, match="not a valid link token"):
        verify_link(fresh, key=b"other" * 8, now=NOW)
    for garbage in ("", "abc", "a.b.c", "!!!.???", "eyJ0IjoxfQ."):
        with pytest.raises(AuthError):
            verify_link(garbage, key=KEY, now=NOW)
