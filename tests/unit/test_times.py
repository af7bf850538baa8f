"""Time maths across zones and daylight-saving changes (property tests)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald.errors import ValidationError
from herald.scheduler.times import (
    QuietHours,
    Relative,
    after_quiet_hours,
    local_to_utc,
    next_fire,
    resolve_relative,
    validate_cron,
)

ZONES = sorted(
    z for z in available_timezones() if "/" in z and not z.startswith(("Etc/", "SystemV/", "posix/", "right/"))
)
zones = st.sampled_from(ZONES).map(ZoneInfo)
# Dense around DST changes: all of 2026, plus the days around the usual transitions.
days = st.dates(date(2025, 1, 1), date(2027, 12, 31))
times = st.times()
instants = st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31)).map(lambda d: d.replace(tzinfo=UTC))


@given(day=days, at=times, zone=zones)
def test_local_to_utc_is_exact_or_moves_forward_over_a_gap(day: date, at: time, zone: ZoneInfo) -> None:
    instant = local_to_utc(day, at, zone)
    back = instant.astimezone(zone).replace(tzinfo=None)
    wanted = datetime.combine(day, at)
    assert back == wanted or timedelta(0) < back - wanted <= timedelta(hours=2)


def test_dst_examples() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 02:30 does not exist on 2026-03-29 in Berlin: it becomes 03:30 CEST.
    assert local_to_utc(date(2026, 3, 29), time(2, 30), berlin) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    # 02:30 happens twice on 2026-10-25: the first (CEST) is taken.
    assert local_to_utc(date(2026, 10, 25), time(2, 30), berlin) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    # "The day before at 09:00" for a visit right after the spring change stays 09:00 local.
    reminder = resolve_relative(
        Relative(field="visit.starts_at", days=-1, at=time(9, 0)),
        {"visit": {"starts_at": "2026-03-30T10:00:00+02:00"}},
        berlin,
        field="send_relative",
    )
    assert reminder == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 09:00 CEST


@given(anchor=instants, days_before=st.integers(-3, 3), at=times, zone=zones)
def test_day_relative_sends_keep_the_local_wall_time(
    anchor: datetime, days_before: int, at: time, zone: ZoneInfo
) -> None:
    data = {"visit": {"starts_at": anchor.isoformat()}}
    when = resolve_relative(Relative(field="visit.starts_at", days=days_before, at=at), data, zone, field="x")
    local = when.astimezone(zone)
    assert local.date() == anchor.astimezone(zone).date() + timedelta(days=days_before)
    wanted = datetime.combine(local.date(), at)
    assert local.replace(tzinfo=None) == wanted or timedelta(0) < local.replace(tzinfo=None) - wanted <= timedelta(
        hours=2
    )


@given(anchor=instants, offset_s=st.integers(-7 * 86400, 7 * 86400), zone=zones)
def test_offset_relative_sends_are_exact(anchor: datetime, offset_s: int, zone: ZoneInfo) -> None:
    data = {"payment": {"at": anchor.isoformat()}}
    assert resolve_relative(
        Relative(field="payment.at", offset_s=offset_s), data, zone, field="x"
    ) == anchor + timedelta(seconds=offset_s)


def test_relative_errors_name_the_field() -> None:
    zone = ZoneInfo("UTC")
    with pytest.raises(ValidationError, match=r"send_relative: data has no .visit\.starts_at."):
        resolve_relative(Relative(field="visit.starts_at"), {}, zone, field="send_relative")
    with pytest.raises(ValidationError, match="needs a UTC offset"):
        resolve_relative(Relative(field="t"), {"t": "2026-01-01T10:00:00"}, zone, field="send_relative")
    with pytest.raises(ValidationError, match="ISO 8601"):
        resolve_relative(Relative(field="t"), {"t": 5}, zone, field="send_relative")


hhmm = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))


@settings(max_examples=300)
@given(when=instants, start=hhmm, end=hhmm, zone=zones)
def test_quiet_hours_defer_to_the_end_of_the_window(when: datetime, start: time, end: time, zone: ZoneInfo) -> None:
    quiet = QuietHours(start, end)
    result = after_quiet_hours(when, quiet, zone)
    assert result >= when
    assert result - when <= timedelta(hours=26)
    local_before = when.astimezone(zone).time().replace(tzinfo=None)
    if not quiet.contains(local_before):
        assert result == when
    else:
        local_after = result.astimezone(zone).time().replace(tzinfo=None)
        # At (or, across a DST gap, just after) the window's end, and no longer inside it.
        assert not quiet.contains(local_after) or local_after == end


def test_quiet_hours_example() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    quiet = QuietHours.parse({"start": "22:00", "end": "07:00"})
    late = datetime(2026, 11, 22, 22, 30, tzinfo=UTC)  # 23:30 in Berlin
    assert after_quiet_hours(late, quiet, berlin) == datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    noon = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    assert after_quiet_hours(noon, quiet, berlin) == noon


@given(after=instants, hour=st.integers(0, 23), minute=st.integers(0, 59), zone=zones)
def test_cron_fires_at_the_local_wall_time(after: datetime, hour: int, minute: int, zone: ZoneInfo) -> None:
    fire = next_fire(f"{minute} {hour} * * *", zone, after)
    assert fire > after
    assert fire - after <= timedelta(days=2)
    local = fire.astimezone(zone)
    wanted = datetime.combine(local.date(), time(hour, minute))
    assert local.replace(tzinfo=None) == wanted or timedelta(0) < local.replace(tzinfo=None) - wanted <= timedelta(
        hours=2
    )


@pytest.mark.parametrize("expression", ["", "* * * *", "61 * * * *", "* * * * * * *", "a b c d e", "*/0 * * * *"])
def test_bad_cron_is_refused(expression: str) -> None:
    with pytest.raises(ValidationError, match=r"cron: not a 5-field cron expression"):
        validate_cron(expression)
