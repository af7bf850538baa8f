"""Pure time maths: relative sends, quiet hours, cron. No I/O, so every rule is property-tested.

All instants are aware UTC ``datetime``s; local times are computed in an IANA zone with
``zoneinfo`` so daylight-saving changes are right (a local time that does not exist, in the
spring gap, moves forward; one that exists twice, in the autumn fold, takes the first).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from herald.errors import ValidationError


@dataclass(frozen=True)
class Relative:
    """A time relative to an instant in the event's data.

    ``offset_s`` alone: that many seconds from the instant (negative = before). With ``days`` and
    ``at``: the local date ``days`` from the instant's local date, at local time ``at``.
    """

    field: str
    offset_s: float = 0.0
    days: int | None = None
    at: time | None = None


def lookup_instant(data: dict[str, Any], path: str, *, field: str) -> datetime:
    """The aware instant at dotted ``path`` in ``data`` (ISO 8601 with an offset)."""
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValidationError(f"{field}: data has no {path!r}", field=field)
        value = value[part]
    if not isinstance(value, str):
        raise ValidationError(f"{field}: data.{path} must be an ISO 8601 instant, got {value!r}", field=field)
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(f"{field}: data.{path} must be an ISO 8601 instant, got {value!r}", field=field) from None
    if instant.tzinfo is None:
        raise ValidationError(f"{field}: data.{path} needs a UTC offset, got {value!r}", field=field)
    return instant.astimezone(UTC)


def local_to_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant of local ``day`` ``at`` in ``zone``; a time in a spring-forward gap moves
    forward by the gap, a time in an autumn fold takes its first occurrence."""
    # fold=0 (PEP 495) reads a gap time with the offset from before the jump, which lands after
    # the gap once normalised, and a fold time as its first occurrence.
    return datetime.combine(day, at).replace(tzinfo=zone, fold=0).astimezone(UTC)


def resolve_relative(relative: Relative, data: dict[str, Any], zone: ZoneInfo, *, field: str) -> datetime:
    anchor = lookup_instant(data, relative.field, field=field)
    if relative.days is None or relative.at is None:
        return anchor + timedelta(seconds=relative.offset_s)
    local_day = anchor.astimezone(zone).date() + timedelta(days=relative.days)
    return local_to_utc(local_day, relative.at, zone) + timedelta(seconds=relative.offset_s)


@dataclass(frozen=True)
class QuietHours:
    start: time
    end: time

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> QuietHours | None:
        if not raw:
            return None
        return cls(time.fromisoformat(raw["start"]), time.fromisoformat(raw["end"]))

    def contains(self, local: time) -> bool:
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # the window crosses midnight


def after_quiet_hours(when: datetime, quiet: QuietHours | None, zone: ZoneInfo) -> datetime:
    """``when``, or the end of the quiet window it falls in (local time in ``zone``)."""
    if quiet is None:
        return when
    local = when.astimezone(zone)
    if not quiet.contains(local.time().replace(tzinfo=None)):
        return when
    day = local.date()
    if quiet.start > quiet.end and local.time().replace(tzinfo=None) >= quiet.start:
        day += timedelta(days=1)  # late evening: the window ends tomorrow morning
    # In an autumn fold the end may be on the clock twice: the window ``when`` is in ends at the
    # first of them not before ``when`` (a send on the fold's second pass waits for the second).
    ends = _instants(datetime.combine(day, quiet.end), zone, each_occurrence=True)
    return max(next((end for end in ends if end >= when), ends[-1]), when)


def validate_cron(expression: str, *, field: str = "cron") -> str:
    """A 5-field cron expression (an optional 6th field is seconds), or a ValidationError naming ``field``."""
    if len(expression.split()) not in (5, 6) or not croniter.is_valid(expression):
        raise ValidationError(
            f"{field}: not a 5-field cron expression (6 with seconds), got {expression!r}", field=field
        )
    try:  # valid fields can still name a day that never comes (30 February)
        croniter(expression, datetime(2025, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValidationError(f"{field}: the expression never fires, got {expression!r}", field=field) from None
    return expression


def next_fire(expression: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first instant strictly after ``after`` at which ``expression`` fires in ``zone``.

    Daylight-saving changes follow cron's usual rule (Vixie cron, Debian's cron): a schedule with a
    fixed hour fires once on each wall time, so in the autumn fold it fires on the first of the two
    occurrences only, and a wall time skipped by the spring gap fires shifted forward by the gap
    (as :func:`local_to_utc`). A schedule whose hour field starts with ``*`` (hourly or more often)
    follows elapsed time instead and fires on both occurrences of a repeated wall time.
    """
    after = after.astimezone(UTC)
    each_occurrence = expression.split()[1].startswith("*")
    found = _first_after(expression, zone, _wall(after, zone), after, each_occurrence=each_occurrence)
    # Walking the wall clock from ``after`` finds the first firing unless the offset changes near
    # ``after`` or near that firing: wall times then map to instants out of order (the second pass
    # of a fold, a gap's shifted times against the ones just past it). Walking again from each side
    # of such a change covers every run of wall times whose instants are in order.
    day = timedelta(days=1)
    for start, end in ((after - day, after + day), (found - day, found + day)):
        offsets = (_offset(zone, start), _offset(zone, end))
        if offsets[0] != offsets[1]:
            change = _change_between(zone, start, end)
            for offset in offsets:
                # From the change's wall time on that side, skipping what cannot be after ``after``.
                resume = max(change, after) + offset
                resume = resume.replace(tzinfo=None, microsecond=0) - timedelta(seconds=2)
                found = min(found, _first_after(expression, zone, resume, after, each_occurrence=each_occurrence))
    return found


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _offset(zone: ZoneInfo, instant: datetime) -> timedelta:
    return instant.astimezone(zone).utcoffset() or timedelta(0)


def _change_between(zone: ZoneInfo, start: datetime, end: datetime) -> datetime:
    """The instant, to within a second after it, at which ``zone``'s UTC offset changes in (``start``, ``end``]."""
    before = _offset(zone, start)
    while end - start > timedelta(seconds=1):
        middle = start + (end - start) / 2
        if _offset(zone, middle) == before:
            start = middle
        else:
            end = middle
    return end


def _first_after(
    expression: str, zone: ZoneInfo, wall: datetime, after: datetime, *, each_occurrence: bool
) -> datetime:
    """The earliest firing after ``after`` of the first wall time past naive ``wall`` that has one."""
    walls = croniter(expression, wall)
    while True:
        candidate: datetime = walls.get_next(datetime)
        fires = [i for i in _instants(candidate, zone, each_occurrence=each_occurrence) if i > after]
        if fires:
            return fires[0]


def _instants(wall: datetime, zone: ZoneInfo, *, each_occurrence: bool) -> list[datetime]:
    """When naive local ``wall`` fires, in order: its instant; for a repeated one the first (or,
    with ``each_occurrence``, both); for a skipped one, shifted forward past the gap."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second or _wall(second, zone) != wall:
        return [first]  # exists once, or is in a gap: fold=0 reads it with the earlier offset (PEP 495)
    return [first, second] if each_occurrence else [first]
