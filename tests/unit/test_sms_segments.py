"""SMS length, encoding and segments per GSM 03.38: known answers and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.content.sms import SmsInfo, sms_info
from tests.strategies import (
    GSM_BASIC_CHARS,
    GSM_EXTENSION_CHARS,
    NON_GSM_CHARS,
    gsm_basic_texts,
    gsm_texts,
    sms_texts,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", SmsInfo(0, "GSM-7", 0)),
        ("Hello", SmsInfo(5, "GSM-7", 1)),
        ("a" * 160, SmsInfo(160, "GSM-7", 1)),
        ("a" * 161, SmsInfo(161, "GSM-7", 2)),
        ("a" * 306, SmsInfo(306, "GSM-7", 2)),
        ("a" * 307, SmsInfo(307, "GSM-7", 3)),
        ("€", SmsInfo(2, "GSM-7", 1)),  # escape + character
        ("{" * 80, SmsInfo(160, "GSM-7", 1)),
        ("{" * 81, SmsInfo(162, "GSM-7", 2)),
        # 152 septets then a two-septet character: it may not straddle parts, so it opens the second.
        ("a" * 152 + "€" + "a" * 10, SmsInfo(164, "GSM-7", 2)),
        ("a" * 152 + "€" + "a" * 152, SmsInfo(306, "GSM-7", 3)),
        ("Olá, o seu código é 1234", SmsInfo(24, "UCS-2", 1)),
        ("ç" * 70, SmsInfo(70, "UCS-2", 1)),
        ("ç" * 71, SmsInfo(71, "UCS-2", 2)),
        ("ç" * 134, SmsInfo(134, "UCS-2", 2)),
        ("ç" * 135, SmsInfo(135, "UCS-2", 3)),
        ("😀", SmsInfo(2, "UCS-2", 1)),  # a surrogate pair: two UTF-16 code units
        ("😀" * 35, SmsInfo(70, "UCS-2", 1)),
        ("ç" * 66 + "😀" + "ç", SmsInfo(69, "UCS-2", 1)),
        ("ç" * 66 + "😀" + "ç" * 5, SmsInfo(73, "UCS-2", 2)),
        ("ç" * 66 + "😀" + "ç" * 66, SmsInfo(134, "UCS-2", 3)),  # the pair is not split across parts
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà\r\n", SmsInfo(44, "GSM-7", 1)),
        ("\x1b", SmsInfo(1, "UCS-2", 1)),  # the escape itself is not a character one can send
    ],
)
def test_known_answers(text: str, expected: SmsInfo) -> None:
    assert sms_info(text) == expected


def test_every_table_character_is_gsm_and_no_other() -> None:
    for char in GSM_BASIC_CHARS:
        assert sms_info(char) == SmsInfo(1, "GSM-7", 1), repr(char)
    for char in GSM_EXTENSION_CHARS:
        assert sms_info(char) == SmsInfo(2, "GSM-7", 1), repr(char)
    for char in NON_GSM_CHARS:
        assert sms_info(char).encoding == "UCS-2", repr(char)


@given(text=gsm_basic_texts)
def test_basic_gsm_text_costs_one_septet_a_character(text: str) -> None:
    info = sms_info(text)
    n = len(text)
    assert info.encoding == "GSM-7"
    assert info.length == n
    assert info.segments == (0 if n == 0 else 1 if n <= 160 else math.ceil(n / 153))


@given(text=gsm_texts)
def test_extension_characters_cost_two_septets(text: str) -> None:
    info = sms_info(text)
    extension = sum(char in GSM_EXTENSION_CHARS for char in text)
    assert info == SmsInfo(info.length, "GSM-7", info.segments)
    assert info.length == len(text) + extension
    if info.length > 160:
        # At most one septet per part is lost to a two-septet character that would straddle it.
        assert math.ceil(info.length / 153) <= info.segments <= math.ceil(info.length / 152)


@given(text=sms_texts)
def test_ucs2_counts_utf16_code_units(text: str) -> None:
    info = sms_info(text)
    if info.encoding == "UCS-2":
        units = len(text.encode("utf-16-le")) // 2
        assert info.length == units
        single, part = 70, 67
    else:
        single, part = 160, 153
    if info.length == 0:
        assert info.segments == 0
    elif info.length <= single:
        assert info.segments == 1
    else:
        assert info.segments >= math.ceil(info.length / part)
        assert info.segments * part >= info.length


@given(text=sms_texts, more=st.text(alphabet=GSM_BASIC_CHARS + GSM_EXTENSION_CHARS + NON_GSM_CHARS, max_size=20))
def test_segments_never_shrink_as_text_grows(text: str, more: str) -> None:
    before, after = sms_info(text), sms_info(text + more)
    assert after.segments >= before.segments
    if before.encoding == "UCS-2":
        assert after.encoding == "UCS-2"


@given(text=gsm_texts, char=st.sampled_from(NON_GSM_CHARS))
def test_one_foreign_character_switches_to_ucs2(text: str, char: str) -> None:
    info = sms_info(text + char)
    assert info.encoding == "UCS-2"
    assert info.length == len((text + char).encode("utf-16-le")) // 2
