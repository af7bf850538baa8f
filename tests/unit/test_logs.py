"""Personal data and secrets never survive redaction, in messages or in log records."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.logs import RedactingFilter, number, redact

emails = st.from_regex(r"[a-z][a-z0-9._]{0,15}@[a-z]{2,10}\.(com|org|co\.uk)", fullmatch=True)
phones = st.from_regex(r"\+[1-9][0-9]{7,13}", fullmatch=True)
codes = st.from_regex(r"[0-9]{4,8}", fullmatch=True)
api_keys = st.from_regex(r"hk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,43}", fullmatch=True)
webhook_secrets = st.from_regex(r"whsec_[A-Za-z0-9+/]{32}={0,2}", fullmatch=True)
words = st.text(st.sampled_from("abc xyz:-,"), max_size=20)


@given(before=words, secret=st.one_of(emails, phones, codes, api_keys, webhook_secrets), after=words)
def test_secrets_are_masked_wherever_they_appear(before: str, secret: str, after: str) -> None:
    assert secret not in redact(f"{before} {secret} {after}")


def test_ordinary_operational_text_survives() -> None:
    text = "API on http://127.0.0.1:8000 started redis (pid 19317), version 6.2.14, delivery dlv_01KAQ3XYZ"
    assert redact(text) == text


def test_durations_survive_but_a_number_after_a_word_does_not() -> None:
    assert redact("Task herald.deliver_batch[abc] succeeded in 0.012345678s: None").endswith("in 0.012345678s: None")
    assert "15555550100" not in redact("sent to tel:+15555550100 and 15555550100")


def test_limit_cuts_long_text() -> None:
    assert len(redact("x" * 500, limit=100)) == 100


def test_filter_masks_arguments_and_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("herald.test")
    handler_filter = RedactingFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        try:
            raise ValueError("bad code 493817 for jo@example.com")
        except ValueError:
            logger.exception("sending to %s failed", "+447700900123")
    finally:
        caplog.handler.removeFilter(handler_filter)
    text = caplog.text
    assert "+447700900123" not in text and "493817" not in text and "jo@example.com" not in text
    assert "sending to *** failed" in text


@given(n=st.integers(min_value=0, max_value=10**15))
def test_numbers_written_for_logs_survive_redaction(n: int) -> None:
    text = f"drop drp_01KAQ3XYZ: users.csv ingested: {number(n)} lines, {number(n)} accepted"
    assert redact(text) == text
    assert number(n).replace(",", "") == str(n)


def test_a_bare_count_of_four_digits_or_more_is_masked_as_a_possible_code() -> None:
    # Why counts go through ``number``: the filter cannot tell 100000 lines from a passcode.
    assert redact("100000 lines") == "*** lines"
