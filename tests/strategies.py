"""Hypothesis strategies shared by the test suite."""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import string
import time
import zoneinfo
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time

from hypothesis import strategies as st

# Standard Webhooks keys are 24 to 64 bytes.
secrets = st.binary(min_size=24, max_size=64).map(lambda key: "whsec_" + base64.b64encode(key).decode("ascii"))

msg_ids = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=64)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=20,
)
# JSON documents as sent on the wire (UTF-8, not necessarily ASCII).
json_bodies = _json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8"))

# Within the 5-minute tolerance receivers apply around "now".
recent_timestamps = st.integers(min_value=-240, max_value=240).map(lambda offset: int(time.time()) + offset)


def _decimal(value: int) -> str:
    return str(value)


def _octal(value: int) -> str:
    return "0" + format(value, "o")


def _hex(value: int) -> str:
    return "0x" + format(value, "x")


_RENDERINGS: tuple[Callable[[int], str], ...] = (_decimal, _octal, _hex)


def ipv4_in(networks: Sequence[str]) -> st.SearchStrategy[ipaddress.IPv4Address]:
    """Any address inside one of ``networks``."""
    parsed = [ipaddress.IPv4Network(net) for net in networks]
    return st.sampled_from(parsed).flatmap(
        lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv4Address)
    )


@st.composite
def legacy_ipv4_spellings(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """``address`` as inet_aton reads it: 1 to 4 parts, each decimal, octal or hex (``0x7f.1``)."""
    octets = address.packed
    parts = draw(st.sampled_from([1, 2, 3, 4]))
    values = {
        1: [int(address)],
        2: [octets[0], int.from_bytes(octets[1:], "big")],
        3: [octets[0], octets[1], int.from_bytes(octets[2:], "big")],
        4: list(octets),
    }[parts]
    return ".".join(draw(st.sampled_from(_RENDERINGS))(value) for value in values)


# ---------------------------------------------------------------- API request bodies

_event_types = st.sampled_from(["ticket.created", "ticket.escalated", "visit.reminder", "a"])
_event_fields: dict[str, st.SearchStrategy[object]] = {
    "type": _event_types | _json_values,
    "subject": st.sampled_from(["ticket:4711", "visit:88"]) | st.text(max_size=12) | _json_values,
    "data": st.dictionaries(st.text(max_size=8), _json_values, max_size=4) | _json_values,
    "lane": st.sampled_from(["otp", "transactional", "bulk"]) | _json_values,
    "endpoint_ids": st.lists(st.text(max_size=12), max_size=3) | _json_values,
    "idempotency_key": st.text(max_size=12) | _json_values,
    "unknown": _json_values,
}
# Mostly valid events, so that acceptance is exercised as often as refusal.
_likely_events = st.fixed_dictionaries(
    {"type": _event_types},
    optional={
        "subject": st.text(st.characters(codec="utf-8", exclude_categories=("Z", "Cc")), min_size=1, max_size=12),
        "data": st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
        "lane": st.sampled_from(["otp", "transactional", "bulk"]),
        "idempotency_key": st.text(string.ascii_letters, min_size=1, max_size=2),
    },
)
# Bodies for POST /v1/events: events that are mostly valid, events whose fields may hold anything,
# arbitrary JSON documents and bytes that are not JSON at all.
event_request_bodies = st.one_of(
    _likely_events.map(lambda body: json.dumps(body).encode("utf-8")),
    st.fixed_dictionaries({}, optional=_event_fields).map(lambda body: json.dumps(body).encode("utf-8")),
    json_bodies,
    st.binary(max_size=64),
)


# ---------------------------------------------------------------- SMS texts and locales

# Spelled out here rather than imported, so the tests check herald.content.sms against the table.
GSM_BASIC_CHARS = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION_CHARS = "\f^{}\\[~]|€"
# Outside GSM 03.38: accented letters it lacks, a CJK ideograph, emoji beyond the BMP (surrogate pairs).
NON_GSM_CHARS = "çãõúíâêôÁ✓中😀🚀"

gsm_basic_texts = st.text(alphabet=GSM_BASIC_CHARS, max_size=700)
gsm_texts = st.text(alphabet=GSM_BASIC_CHARS + GSM_EXTENSION_CHARS, max_size=700)
sms_texts = gsm_texts | st.text(alphabet=GSM_BASIC_CHARS + GSM_EXTENSION_CHARS + NON_GSM_CHARS, max_size=400)


def _mixed_case(draw: st.DrawFn, text: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in text)


@st.composite
def locale_tags(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A BCP 47 tag in any case with ``-`` or ``_``, and its canonical subtags (``["pt", "BR"]``)."""
    language = draw(st.text(string.ascii_lowercase, min_size=2, max_size=3))
    subtags = [language]
    if draw(st.booleans()):
        subtags.append(draw(st.text(string.ascii_lowercase, min_size=4, max_size=4)).title())
    if draw(st.booleans()):
        region = draw(
            st.text(string.ascii_uppercase, min_size=2, max_size=2) | st.from_regex(r"[0-9]{3}", fullmatch=True)
        )
        subtags.append(region)
    separator = draw(st.sampled_from(["-", "_"]))
    return _mixed_case(draw, separator.join(subtags)), subtags


# ---------------------------------------------------------------- time zones and daylight saving

ZONE_NAMES = tuple(
    sorted(
        name
        for name in zoneinfo.available_timezones()
        if "/" in name and not name.startswith(("Etc/", "SystemV/", "posix/", "right/"))
    )
)
_SPAN = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC))


def utc_offset(zone: zoneinfo.ZoneInfo, instant: datetime) -> timedelta:
    return instant.astimezone(zone).utcoffset() or timedelta(0)


@functools.cache
def offset_changes(name: str) -> tuple[datetime, ...]:
    """Every instant in 2025 to 2027 at which zone ``name`` changes its UTC offset (the first second
    of the new offset), found by scanning week by week and bisecting to the second."""
    zone = zoneinfo.ZoneInfo(name)
    start, end = (int(t.timestamp()) for t in _SPAN)
    changes = []
    before = utc_offset(zone, datetime.fromtimestamp(start, UTC))
    week = 7 * 86400
    for day in range(start, end, week):
        after = utc_offset(zone, datetime.fromtimestamp(day + week, UTC))
        if after != before:
            low, high = day, day + week
            while high - low > 1:
                middle = (low + high) // 2
                if utc_offset(zone, datetime.fromtimestamp(middle, UTC)) == before:
                    low = middle
                else:
                    high = middle
            changes.append(datetime.fromtimestamp(high, UTC))
        before = after
    return tuple(changes)


@functools.cache
def changing_zone_names() -> tuple[str, ...]:
    """The zones that change their UTC offset in 2025 to 2027 (daylight saving, mostly)."""
    return tuple(name for name in ZONE_NAMES if offset_changes(name))


_any_zone_name = st.sampled_from(ZONE_NAMES)
# Half the draws from zones that change offset: those are where local time goes wrong.
_zone_names = _any_zone_name | st.deferred(lambda: st.sampled_from(changing_zone_names()))
zones = _zone_names.map(zoneinfo.ZoneInfo)
_uniform_instants = st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31)).map(lambda d: d.replace(tzinfo=UTC))


@st.composite
def zoned_instants(draw: st.DrawFn) -> tuple[zoneinfo.ZoneInfo, datetime]:
    """A zone and an instant in 2025 to 2027, most often within hours (else days) of one of the
    zone's offset changes, on a whole minute or not."""
    name = draw(_zone_names)
    changes = offset_changes(name)
    if not changes or draw(st.integers(0, 3)) == 0:
        return zoneinfo.ZoneInfo(name), draw(_uniform_instants)
    change = draw(st.sampled_from(changes))
    seconds = draw(st.integers(-3 * 3600, 3 * 3600) | st.integers(-3 * 86400, 3 * 86400))
    if draw(st.booleans()):
        seconds -= seconds % 60
    micros = draw(st.sampled_from([0, 0, 1, 500_000, 999_999]))
    return zoneinfo.ZoneInfo(name), change + timedelta(seconds=seconds, microseconds=micros)


@st.composite
def zoned_days(draw: st.DrawFn) -> tuple[zoneinfo.ZoneInfo, date]:
    """A zone and a local date in 2025 to 2027, most often the day of one of its offset changes or next to it."""
    zone, instant = draw(zoned_instants())
    return zone, instant.astimezone(zone).date() + timedelta(days=draw(st.sampled_from([0, 0, 0, -1, 1])))


# Local wall times, often on the round hours and half hours where offset changes happen.
wall_times = st.times() | st.builds(dt_time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59]))


# ---------------------------------------------------------------- event data (webhook payloads)

json_values: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_data: st.SearchStrategy[dict[str, object]] = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
