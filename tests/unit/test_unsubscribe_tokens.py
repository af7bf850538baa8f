"""Unsubscribe tokens: valid ones verify, tampered, expired or other kinds of token never do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.errors import AuthError
from herald.links import (
    LinkClaims,
    UnsubscribeClaims,
    UnsubscribeLinks,
    sign_link,
    sign_unsubscribe,
    verify_link,
    verify_unsubscribe,
)

KEY = b"k" * 32
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
categories = st.from_regex(r"[a-z0-9_.-]{1,60}", fullmatch=True)


@given(category=categories, channel=st.sampled_from(["email", "sms"]), ttl=st.integers(1, 10**8))
def test_signed_unsubscribe_tokens_verify(category: str, channel: str, ttl: int) -> None:
    claims = UnsubscribeClaims(
        "ten_1", "rcp_1", category, channel, (NOW + timedelta(seconds=ttl)).replace(microsecond=0)
    )
    assert verify_unsubscribe(sign_unsubscribe(claims, key=KEY), key=KEY, now=NOW) == claims


@given(position=st.integers(0, 500), char=st.sampled_from("AbZ09-_."))
def test_any_tampering_is_refused(position: int, char: str) -> None:
    token = sign_unsubscribe(UnsubscribeClaims("ten_1", "rcp_1", "ticket", "email", NOW + timedelta(days=1)), key=KEY)
    index = position % len(token)
    tampered = token[:index] + char + token[index + 1 :]
    original = verify_unsubscribe(token, key=KEY, now=NOW)
    try:
        claims = verify_unsubscribe(tampered, key=KEY, now=NOW)
    except AuthError:
        return
    assert claims == original  # only base64's unused padding bits changed: nothing was altered


def test_a_token_of_one_kind_is_refused_as_the_other() -> None:
    later = NOW + timedelta(days=1)
    timeline = sign_link(LinkClaims("ten_1", "ticket:1", later), key=KEY)
    unsubscribe = sign_unsubscribe(UnsubscribeClaims("ten_1", "rcp_1", "ticket", "email", later), key=KEY)
    with pytest.raises(AuthError, match="not a valid link token"):
        verify_unsubscribe(timeline, key=KEY, now=NOW)
    with pytest.raises(AuthError, match="not a valid link token"):
        verify_link(unsubscribe, key=KEY, now=NOW)
    expired = sign_unsubscribe(UnsubscribeClaims("ten_1", "rcp_1", "ticket", "email", NOW), key=KEY)
    with pytest.raises(AuthError, match="expired"):
        verify_unsubscribe(expired, key=KEY, now=NOW)
    with pytest.raises(AuthError, match="not a valid link token"):
        verify_unsubscribe(unsubscribe, key=b"other" * 8, now=NOW)


def test_headers_name_no_person_and_fall_back_to_mailto() -> None:
    kwargs = {"tenant_id": "ten_1", "recipient_id": "rcp_1", "category": "ticket", "channel": "email", "now": NOW}
    https = UnsubscribeLinks(key=KEY, url="https://h.example/v1/public/unsubscribe?src=mail").headers(**kwargs)
    assert https["List-Unsubscribe"].startswith("<https://h.example/v1/public/unsubscribe?src=mail&token=")
    assert https["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    mailto = UnsubscribeLinks(key=KEY, mailto="desk@bank.example").headers(**kwargs)
    assert list(mailto) == ["List-Unsubscribe"]
    assert mailto["List-Unsubscribe"].startswith("<mailto:desk@bank.example?subject=unsubscribe%20")
