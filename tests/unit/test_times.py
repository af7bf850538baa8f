"""Time maths across zones and daylight-saving changes (property tests)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

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
from tests.strategies import offset_changes, utc_offset, wall_times, zoned_days, zoned_instants

# Instants that are not near an offset change, for the rules that do not depend on one.
instants = st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31)).map(lambda d: d.replace(tzinfo=UTC))
BERLIN = ZoneInfo("Europe/Berlin")


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def showing(day: date, at: time, zone: ZoneInfo) -> list[datetime]:
    """The instants at which local ``day`` ``at`` is on the clock, found by search rather than by
    PEP 495 folds: one, two (an autumn fold) or, in a spring gap, none; then the one instant the
    wall time stands for is the one that reads it with the offset from before the jump forward,
    which is when the clock shows it plus the gap's length."""
    naive = datetime.combine(day, at)
    near = naive.replace(tzinfo=UTC)
    offsets = {utc_offset(zone, near + timedelta(hours=h)) for h in range(-30, 31)}
    found = sorted({near - o for o in offsets if wall(near - o, zone) == naive})
    return found or [near - min(offsets)]  # the offset before a jump forward is the smaller one


def intended(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant local ``day`` ``at`` stands for: the only one, the first of two, or past the gap."""
    return showing(day, at, zone)[0]


@given(zoned=zoned_days(), at=wall_times)
def test_local_to_utc_is_exact_takes_a_fold_s_first_pass_and_moves_forward_over_a_gap(
    zoned: tuple[ZoneInfo, date], at: time
) -> None:
    zone, day = zoned
    assert local_to_utc(day, at, zone) == intended(day, at, zone)


def test_dst_examples() -> None:
    # 02:30 does not exist on 2026-03-29 in Berlin: it becomes 03:30 CEST.
    assert local_to_utc(date(2026, 3, 29), time(2, 30), BERLIN) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    # 02:30 happens twice on 2026-10-25: the first (CEST) is taken.
    assert local_to_utc(date(2026, 10, 25), time(2, 30), BERLIN) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    # "The day before at 09:00" for a visit right after the spring change stays 09:00 local.
    reminder = resolve_relative(
        Relative(field="visit.starts_at", days=-1, at=time(9, 0)),
        {"visit": {"starts_at": "2026-03-30T10:00:00+02:00"}},
        BERLIN,
        field="send_relative",
    )
    assert reminder == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 09:00 CEST


def test_the_intended_instant_helper_agrees_with_known_changes() -> None:
    """The oracle the properties use, checked against hand-worked Berlin and Lord Howe (30-minute) changes."""
    assert showing(date(2026, 10, 25), time(2, 30), BERLIN) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 25, 1, 30, tzinfo=UTC),
    ]
    assert showing(date(2026, 3, 29), time(2, 30), BERLIN) == [datetime(2026, 3, 29, 1, 30, tzinfo=UTC)]
    lord_howe = ZoneInfo("Australia/Lord_Howe")  # 02:00 -> 02:30 on 2026-10-04
    assert intended(date(2026, 10, 4), time(2, 15), lord_howe) == datetime(2026, 10, 3, 15, 45, tzinfo=UTC)
    assert datetime(2026, 3, 29, 1, 0, tzinfo=UTC) in offset_changes("Europe/Berlin")


@given(zoned=zoned_instants(), days_before=st.integers(-3, 3), at=wall_times)
def test_day_relative_sends_keep_the_local_wall_time(
    zoned: tuple[ZoneInfo, datetime], days_before: int, at: time
) -> None:
    zone, anchor = zoned
    data = {"visit": {"starts_at": anchor.isoformat()}}
    when = resolve_relative(Relative(field="visit.starts_at", days=days_before, at=at), data, zone, field="x")
    assert when == intended(anchor.astimezone(zone).date() + timedelta(days=days_before), at, zone)


@given(zoned=zoned_instants(), offset_s=st.integers(-7 * 86400, 7 * 86400))
def test_offset_relative_sends_are_exact(zoned: tuple[ZoneInfo, datetime], offset_s: int) -> None:
    zone, anchor = zoned
    data = {"payment": {"at": anchor.astimezone(zone).isoformat()}}
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


@settings(max_examples=200)
@given(zoned=zoned_instants(), start=hhmm, end=hhmm)
def test_quiet_hours_defer_to_the_end_of_the_window(zoned: tuple[ZoneInfo, datetime], start: time, end: time) -> None:
    zone, when = zoned
    quiet = QuietHours(start, end)
    result = after_quiet_hours(when, quiet, zone)
    local = when.astimezone(zone)
    if not quiet.contains(local.time().replace(tzinfo=None)):
        assert result == when
        return
    # The window ends on the local day it started (tomorrow if it crosses midnight and ``when`` is
    # before midnight): at the first time that day's end is on the clock (or stands for, past a
    # gap) not before ``when``.
    late = start > end and local.time().replace(tzinfo=None) >= start
    ends = [i for i in showing(local.date() + timedelta(days=int(late)), end, zone) if i >= when]
    assert result == min(ends)


def test_quiet_hours_example() -> None:
    quiet = QuietHours.parse({"start": "22:00", "end": "07:00"})
    late = datetime(2026, 11, 22, 22, 30, tzinfo=UTC)  # 23:30 in Berlin
    assert after_quiet_hours(late, quiet, BERLIN) == datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    noon = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    assert after_quiet_hours(noon, quiet, BERLIN) == noon
    # 02:10 on the second pass of Berlin's autumn fold waits for the 02:45 that follows it (CET),
    # not the 02:45 CEST that was already past.
    fold = QuietHours(time(2, 0), time(2, 45))
    second_pass = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)
    assert after_quiet_hours(second_pass, fold, BERLIN) == datetime(2026, 10, 25, 1, 45, tzinfo=UTC)


# ---------------------------------------------------------------- cron


def fires(expression: str, zone: ZoneInfo, after: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        after = next_fire(expression, zone, after)
        found.append(after)
    return found


def test_a_daily_cron_fires_once_across_berlin_s_changes() -> None:
    # The audit's case: 02:30 is repeated on 2026-10-25 (fires once, CEST) and skipped on
    # 2026-03-29 (fires at 03:30 CEST, shifted forward by the gap).
    assert fires("30 2 * * *", BERLIN, datetime(2026, 10, 24, 12, tzinfo=UTC), 3) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
        datetime(2026, 10, 27, 1, 30, tzinfo=UTC),
    ]
    assert fires("30 2 * * *", BERLIN, datetime(2026, 3, 28, 12, tzinfo=UTC), 2) == [
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]
    # Resuming from inside the fold (02:10 CET, after the 02:30 CEST run) does not run it again.
    assert next_fire("30 2 * * *", BERLIN, datetime(2026, 10, 25, 1, 10, tzinfo=UTC)) == datetime(
        2026, 10, 26, 1, 30, tzinfo=UTC
    )


def test_hourly_and_faster_crons_follow_elapsed_time_across_changes() -> None:
    # Hour field "*": both passes of the fold, so still one run per real hour...
    assert fires("30 * * * *", BERLIN, datetime(2026, 10, 24, 23, 45, tzinfo=UTC), 4) == [
        datetime(2026, 10, 25, h, 30, tzinfo=UTC) for h in range(0, 4)
    ]
    # ...and every two seconds stays every two seconds through the fold and the gap.
    for change in (datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 3, 29, 1, tzinfo=UTC)):
        start = change - timedelta(seconds=5)
        assert fires("* * * * * */2", BERLIN, start, 5) == [start + timedelta(seconds=s) for s in (1, 3, 5, 7, 9)]
    # A fixed hour with every quarter: 02:00-02:45 once, on the first pass.
    assert fires("*/15 2 * * *", BERLIN, datetime(2026, 10, 24, 23, 50, tzinfo=UTC), 5) == [
        datetime(2026, 10, 25, 0, m, tzinfo=UTC) for m in (0, 15, 30, 45)
    ] + [datetime(2026, 10, 26, 1, 0, tzinfo=UTC)]
    # Lord Howe skips 02:00-02:30: 02:15 and 02:20 fire at 02:45 and 02:50, after the real 02:40.
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    assert [f.astimezone(lord_howe).strftime("%d %H:%M") for f in fires(
        "15,20,40 2 * * *", lord_howe, datetime(2026, 10, 3, 12, tzinfo=UTC), 4
    )] == ["04 02:40", "04 02:45", "04 02:50", "05 02:15"]  # fmt: skip


@settings(max_examples=200)
@given(zoned=zoned_instants(), at=hhmm | st.builds(time, st.integers(0, 23), st.integers(0, 59)))
def test_a_daily_cron_fires_exactly_once_on_each_local_day(zoned: tuple[ZoneInfo, datetime], at: time) -> None:
    zone, after = zoned
    got = fires(f"{at.minute} {at.hour} * * *", zone, after, 4)
    first_day = after.astimezone(zone).date() - timedelta(days=1)
    by_day = {first_day + timedelta(days=d): intended(first_day + timedelta(days=d), at, zone) for d in range(7)}
    due = [(day, instant) for day, instant in by_day.items() if instant > after][:4]
    assert got == [instant for _, instant in due]
    assert [(day - due[0][0]).days for day, _ in due] == [0, 1, 2, 3]  # consecutive days, one run each


def reference_fires(
    minutes: set[int], hours: set[int] | None, zone: ZoneInfo, after: datetime, until: datetime
) -> list[datetime]:
    """Firings of ``minutes hours * * *`` in (after, until], minute by minute on the real clock:
    each minute whose wall time matches (with a fixed hour, only a fold's first pass), plus each
    matching wall time a gap skips, at the instant that reads it with the offset from before."""
    found = set()
    t = after.replace(second=0, microsecond=0)
    while t <= until:
        local = t.astimezone(zone)
        if local.minute in minutes and (hours is None or (local.hour in hours and local.fold == 0)):
            found.add(t)
        t += timedelta(minutes=1)
    for change in offset_changes(zone.key):
        before, now = utc_offset(zone, change - timedelta(seconds=1)), utc_offset(zone, change)
        if now > before and after - timedelta(days=1) <= change <= until:
            skipped = change  # the instant the first skipped wall time (change + before) stands for
            while skipped < change + (now - before):
                shown = wall(skipped, ZoneInfo("UTC")) + before
                if shown.minute in minutes and (hours is None or shown.hour in hours):
                    found.add(skipped)
                skipped += timedelta(minutes=1)
    return sorted(f for f in found if after < f <= until)


@given(
    zoned=zoned_instants(),
    minutes=st.sets(st.sampled_from([0, 15, 30, 45, 59]) | st.integers(0, 59), min_size=1, max_size=3),
    hours=st.none() | st.sets(st.sampled_from([0, 1, 2, 3, 23]) | st.integers(0, 23), min_size=1, max_size=3),
)
def test_cron_matches_a_minute_by_minute_reference(
    zoned: tuple[ZoneInfo, datetime], minutes: set[int], hours: set[int] | None
) -> None:
    zone, after = zoned
    expression = f"{','.join(map(str, sorted(minutes)))} {','.join(map(str, sorted(hours))) if hours else '*'} * * *"
    expected = reference_fires(minutes, hours, zone, after, after + timedelta(days=4))[:3]
    assert fires(expression, zone, after, 3) == expected


@pytest.mark.parametrize("expression", ["", "* * * *", "61 * * * *", "* * * * * * *", "a b c d e", "*/0 * * * *"])
def test_bad_cron_is_refused(expression: str) -> None:
    with pytest.raises(ValidationError, match=r"cron: not a 5-field cron expression"):
        validate_cron(expression)


@pytest.mark.parametrize("expression", ["0 0 30 2 *", "0 0 31 4,6,9,11 *"])
def test_a_cron_that_never_fires_is_refused(expression: str) -> None:
    with pytest.raises(ValidationError, match=r"cron: the expression never fires"):
        validate_cron(expression)
    assert validate_cron("0 0 29 2 *") == "0 0 29 2 *"  # leap days come
