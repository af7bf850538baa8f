"""SMS length, encoding and segment count, per GSM 03.38 / 3GPP TS 23.038.

A message that fits the GSM 7-bit default alphabet is sent as GSM-7: 160 septets in one
message, 153 per part once it must be split (the user data header takes 7). Characters of the
extension table (``^{}\\[~]|€`` and form feed) cost two septets (escape + character) and are
never split across parts. Anything else forces UCS-2: 70 UTF-16 code units in one message, 67
per part, so an emoji (a surrogate pair) counts two and a pair is never split either.
National language shift tables (Turkish, Spanish, Portuguese…) are not used: providers rarely
apply them, and counting without them never under-estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "\f^{}\\[~]|€"
_GSM_BASIC = frozenset(GSM_BASIC) - {"\x1b"}  # the escape is not a character one can send
_GSM_EXTENSION = frozenset(GSM_EXTENSION)

GSM_SINGLE_SEPTETS = 160
GSM_PART_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_PART_UNITS = 67

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True)
class SmsInfo:
    """``length`` is in septets (GSM-7) or UTF-16 code units (UCS-2); an empty text has 0 segments."""

    length: int
    encoding: Encoding
    segments: int


def is_gsm(text: str) -> bool:
    """Whether ``text`` can be sent in the GSM 7-bit default alphabet (with its extension table)."""
    return all(char in _GSM_BASIC or char in _GSM_EXTENSION for char in text)


def sms_info(text: str) -> SmsInfo:
    """How ``text`` travels as an SMS: its length, its encoding and how many parts it is billed as."""
    if is_gsm(text):
        costs = [2 if char in _GSM_EXTENSION else 1 for char in text]
        return SmsInfo(sum(costs), "GSM-7", _segments(costs, GSM_SINGLE_SEPTETS, GSM_PART_SEPTETS))
    costs = [2 if ord(char) > 0xFFFF else 1 for char in text]
    return SmsInfo(sum(costs), "UCS-2", _segments(costs, UCS2_SINGLE_UNITS, UCS2_PART_UNITS))


def _segments(costs: list[int], single: int, part: int) -> int:
    """Parts needed when characters of the given costs are packed in order, none split in two."""
    total = sum(costs)
    if total == 0:
        return 0
    if total <= single:
        return 1
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:
            segments += 1
            used = 0
        used += cost
    return segments
