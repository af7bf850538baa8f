"""Ingesting a drop: a file from the watched folder becomes webhook deliveries, in committed chunks.

A file ``DIR/NAME`` (defaults from settings) or ``DIR/CAMPAIGN/NAME`` (``DIR/CAMPAIGN/campaign.json``)
goes through:

1. **target**: tenant, endpoint, event type, lane, webhook template and template data defaults.
   A missing or bad ``campaign.json`` (or one naming a template the tenant does not have), a file
   that is not UTF-8 or a CSV header without ``user_id``: the file moves to ``failed/`` with
   ``NAME.report.json`` saying why, and nothing is written.
2. **ledger**: the key is SHA-256 of the target (tenant, endpoint, event type, and the template's
   locale when the campaign names one other than the default) and the file's bytes, unique in
   ``drops.content_hash``. A key seen before is a duplicate: nothing is created, the file moves to
   ``done/`` with a report naming the first drop. (The target is in the key so one audience file
   can go to two campaigns.)
3. **chunks** of ``chunk_size`` lines: the chunk's events and deliveries and the drop's progress
   (``committed_offset``, the byte offset after the chunk, and ``lines``, its last line number)
   are one transaction. The progress update is a compare-and-set on ``committed_offset``, so of
   two ingesters on one file only one can commit each chunk. While the target's lane has room
   under ``HERALD_DISPATCH__MAX_IN_FLIGHT`` (and the ingester was given a Celery app, as
   ``herald watch`` is), the deliveries are written already claimed (``sending`` under a lease)
   and handed to the lane's workers after the commit, as the dispatcher would have done with a
   second write (``dispatch.handover``); otherwise they are queued, due now, and the dispatcher
   is woken.
4. **end**: the last transaction also sets state ``delivering`` and ``path`` (where the file will
   be in ``done/``); the report is written and the file moved. The watcher rewrites the report
   as deliveries finish, and sets state ``finished`` when none is pending.

After a crash (``kill -9``) the file is still in ``DIR`` and its drop is ``ingesting``: parsing
restarts at the top but only refills the duplicate finder up to ``committed_offset``, then writes
from there, so no line is lost or doubled. If ``campaign.json`` was edited in between, the drop
finishes with the target its key was made from. One event per accepted line (subject and ``data.user_id``
= the user id, plus the CSV columns and the campaign's ``data``): the webhook payload is the event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from herald.api.schemas import EventType, ObjectId
from herald.config import Settings
from herald.content.lookup import DEFAULT_LOCALE, DEFAULT_TEMPLATE, get_template, named_locale
from herald.content.render import RenderError, render_message, template_context
from herald.dispatch.handover import Room, hand_over
from herald.errors import NotFoundError
from herald.ingest.parsers import DropFileError, DropParser, Item, Rejection, Row, digests, scan
from herald.ingest.report import (
    REPORT_SUFFIX,
    drop_report,
    duplicate_report,
    failed_report,
    progress,
    report_path,
    write_report,
)
from herald.ingest.seen import SeenIds
from herald.logs import number
from herald.store import queries
from herald.store.bulk import prepare_insert, run_writes
from herald.store.db import make_sessionmaker, reader, transaction
from herald.store.ids import new_id, new_ids
from herald.store.models import Channel, Delivery, DeliveryState, Drop, Event, Template, utcnow

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
CAMPAIGN_FILE = "campaign.json"


EVENT_COLUMNS = ("id", "tenant_id", "type", "subject", "data", "lane", "created_at")
DELIVERY_COLUMNS = (
    "id", "tenant_id", "event_id", "endpoint_id", "channel", "lane", "state", "event_type", "subject",
    "attempts", "due_at", "replays", "category", "drop_id", "created_at", "updated_at", "content", "lease_until",
)  # fmt: skip


class DropState(StrEnum):
    ingesting = "ingesting"
    delivering = "delivering"
    finished = "finished"


class CampaignConfig(BaseModel):
    """``campaign.json``: ``{"tenant": "acme", "endpoint_id": "end_…", "event_type": "promo.sent",
    "lane": "bulk", "template": "de", "data": {"offer": "spring"}}``.

    ``tenant`` is a name or an id. ``data`` holds template data defaults, under each line's CSV
    columns. ``template`` picks one of the tenant's webhook templates for ``event_type`` by its
    locale (``"de"``, ``"pt-BR"``, or ``"default"``), exactly, without falling back: that is how
    two campaigns on one event type send different payloads, and a campaign naming a template
    that does not exist fails its files. Without ``template``, the default-locale template
    renders each line's payload when there is one, else the payload's ``data`` is the line's.
    A drop is never sent on the ``otp`` lane.
    """

    model_config = ConfigDict(extra="forbid")

    tenant: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    endpoint_id: ObjectId
    event_type: EventType
    lane: Literal["bulk", "transactional"] = "bulk"
    template: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("template")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        """The stored form of the template's locale: ``''`` for ``default``, else the canonical tag."""
        return None if value is None else named_locale(value)


@dataclass(frozen=True)
class Target:
    """Where a drop's lines go, resolved against the database."""

    tenant_id: str
    endpoint_id: str
    event_type: str
    lane: str
    data: dict[str, Any]
    campaign: str | None
    template: dict[str, str | None] | None = None
    locale: str | None = None  # the template the campaign named ('' = default); None: it named none

    @property
    def salt(self) -> bytes:
        key = f"{self.tenant_id}\0{self.endpoint_id}\0{self.event_type}\0"
        # Only a named template other than the default changes what is sent, so only it joins the key
        # (and ledger keys made before campaigns could name templates stay valid).
        return (key + f"template={self.locale}\0" if self.locale else key).encode()


class OutcomeKind(StrEnum):
    ingested = "ingested"
    duplicate = "duplicate"
    failed = "failed"
    skipped = "skipped"  # vanished, or another ingester has it
    stopped = "stopped"  # asked to stop between chunks; resumes next time


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    name: str
    drop_id: str | None = None
    moved_to: Path | None = None
    detail: str = ""


@dataclass
class _Tally:
    """A drop's progress as committed."""

    offset: int
    lines: int
    accepted: int
    rejected: int
    rejections: list[dict[str, Any]] = field(default_factory=list)


class _TakenOverError(Exception):
    """Another ingester committed progress on this drop first; this one stops."""


def is_ignored(name: str) -> bool:
    """Names the watcher never reads: partial uploads, hidden files, configs and reports."""
    return name.startswith(".") or name.endswith((".part", REPORT_SUFFIX)) or name == CAMPAIGN_FILE


def pending_files(directory: Path) -> list[Path]:
    """Files waiting in ``directory`` and its campaign folders, oldest first."""
    found: list[tuple[float, Path]] = []

    def add(path: Path) -> None:
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            pass

    if not directory.is_dir():
        return []
    for entry in directory.iterdir():
        if is_ignored(entry.name):
            continue
        if entry.is_file():
            add(entry)
        elif entry.is_dir() and entry.name not in (DONE, FAILED):
            for inner in entry.iterdir():
                if inner.is_file() and not is_ignored(inner.name):
                    add(inner)
    return [path for _, path in sorted(found)]


def drops_dir(settings: Settings) -> Path:
    return settings.ingest.dir or settings.data_dir / "drops"


# ---------------------------------------------------------------- reading drops


def get_drop(*, session: Session, tenant_id: str | None, drop_id: str) -> Drop:
    """A drop by id; another tenant's is not found (``tenant_id=None``: any tenant, for the CLI)."""
    drop = session.get(Drop, drop_id)
    if drop is None or (tenant_id is not None and drop.tenant_id != tenant_id):
        raise NotFoundError(f"drop_id: no such drop, got {drop_id!r}", field="drop_id")
    return drop


def list_drops(
    *,
    session: Session,
    tenant_id: str | None,
    state: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
    newest_first: bool = False,
) -> Sequence[Drop]:
    query = select(Drop)
    if tenant_id is not None:
        query = query.where(Drop.tenant_id == tenant_id)
    if state is not None:
        query = query.where(Drop.state == state)
    if cursor:
        query = query.where(Drop.id < cursor if newest_first else Drop.id > cursor)
    query = query.order_by(Drop.id.desc() if newest_first else Drop.id).limit(limit)
    return session.scalars(query).all()


def replay_drop(
    *, session: Session, drop: Drop, ids: Sequence[str] | None, force: bool, now: datetime
) -> tuple[list[str], list[str]]:
    """Replay the drop's dead deliveries (or ``ids`` among its deliveries); see ``queries.replay``.

    A finished drop is draining again, so the watcher rewrites its report when the replays end.
    """
    replayed, skipped = queries.replay(
        session=session,
        tenant_id=drop.tenant_id,
        ids=ids,
        where=queries.DeliveryFilter(drop_id=drop.id),
        force=force,
        now=now,
    )
    if replayed and drop.state == DropState.finished:
        drop.state = DropState.delivering
    return replayed, skipped


# ---------------------------------------------------------------- ingesting


class Ingester:
    """Turns files of the drop folder into deliveries; see the module docstring for the steps.

    ``wake`` is called after each committed chunk left for the dispatcher; with ``celery``,
    chunks are handed to the lane's workers directly while the lane has room. ``on_chunk(n)`` is
    called after the n-th chunk this call committed (tests raise there to simulate a crash);
    ``stop`` ends ingestion between chunks.
    ``urgent()`` says whether urgent lanes are busy now: the next chunks are then smaller and
    paused (``yield_chunk_size``, ``yield_pause_s``).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        directory: Path | None = None,
        wake: Callable[[], None] = lambda: None,
        stop: threading.Event | None = None,
        on_chunk: Callable[[int], None] = lambda _n: None,
        urgent: Callable[[], bool] = lambda: False,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.celery = celery
        self.config = settings.ingest
        self.sessions = sessions
        # Reads (progress counts) that must not queue for SQLite's write lock nor hold it.
        self.reads = make_sessionmaker(reader(sessions.kw["bind"]))
        self.directory = (directory or drops_dir(settings)).resolve()
        self.wake = wake
        self.stop = stop or threading.Event()
        self.on_chunk = on_chunk
        self.urgent = urgent
        self._reported: dict[str, float] = {}
        self.room = Room(reads=self.reads, config=settings.dispatch)

    def process(self, path: Path) -> Outcome:
        """Ingest, resume, or set aside one file of the drop folder."""
        path = path.resolve()
        name = path.relative_to(self.directory).as_posix()
        campaign = name.split("/", 1)[0] if "/" in name else None
        try:
            target = self._target(campaign)
            with path.open("rb") as stream:
                digest = scan(stream, salt=target.salt).digest
                stalled = self._stalled(name, digest)
                if stalled is not None:  # campaign.json was edited after a crash: finish with the first target
                    first = self._first_target(stream, stalled, target)
                    if first is not None:
                        logger.warning("drop %s: %s changed target mid-ingestion; keeping the first", stalled.id, name)
                        target, digest = first, stalled.content_hash
                stream.seek(0)
                next(iter(DropParser(stream)), None)  # a bad CSV header fails the file now
        except DropFileError as exc:
            return self._fail(path, name, campaign, exc.message)
        except FileNotFoundError:
            return Outcome(OutcomeKind.skipped, name, detail="file vanished")
        try:
            with transaction(self.sessions) as session:
                drop, action = self._ledger(session, name, digest, target)
                session.flush()
                drop_id = drop.id
        except IntegrityError:
            return Outcome(OutcomeKind.skipped, name, detail="another ingester registered it first")
        if action == "duplicate":
            return self._duplicate(path, name, campaign, drop)
        if action == "finish":
            return self._finish(path, drop_id)
        try:
            return self._ingest(path, name, drop, target)
        except _TakenOverError:
            logger.warning("drop %s: another ingester is ingesting %s; leaving it to it", drop_id, name)
            return Outcome(OutcomeKind.skipped, name, drop_id, detail="another ingester took over")

    def _stalled(self, name: str, digest: str) -> Drop | None:
        """An unfinished drop of this file under another target (its campaign.json was edited)."""
        with self.reads() as session:
            return session.scalar(
                select(Drop).where(Drop.path == name, Drop.state == DropState.ingesting, Drop.content_hash != digest)
            )

    def _first_target(self, stream: BinaryIO, stalled: Drop, target: Target) -> Target | None:
        """The target ``stalled`` was started with, if this file's bytes under it give its key.

        The drop row keeps tenant, endpoint and event type but not the template's locale, so each
        of the tenant's webhook templates for that event type is tried (one pass over the file).
        """
        first = replace(target, tenant_id=stalled.tenant_id, endpoint_id=stalled.endpoint_id or "",
                        event_type=stalled.event_type)  # fmt: skip
        with self.reads() as session:
            named = session.scalars(
                select(Template.locale).where(
                    Template.tenant_id == first.tenant_id,
                    Template.event_type == first.event_type,
                    Template.channel == Channel.webhook,
                    Template.locale != DEFAULT_LOCALE,
                )
            ).all()
        candidates = [replace(first, locale=locale) for locale in [None, *named]]
        stream.seek(0)
        keys = digests(stream, salts=[c.salt for c in candidates])
        match = next((c for c, key in zip(candidates, keys, strict=True) if key == stalled.content_hash), None)
        if match is None:
            return None
        with self.reads() as session:
            template = _webhook_template(
                session,
                tenant_id=match.tenant_id,
                event_type=match.event_type,
                locale=match.locale,
                label=f"drop {stalled.id}: template",
            )
        return replace(match, template=template)

    def _ledger(self, session: Session, name: str, digest: str, target: Target) -> tuple[Drop, str]:
        """The drop for this content and what to do: new, resume, finish (move) or duplicate."""
        drop = session.scalar(select(Drop).where(Drop.content_hash == digest))
        if drop is None:
            drop = Drop(
                id=new_id("drp"),
                tenant_id=target.tenant_id,
                name=name,
                path=name,
                content_hash=digest,
                campaign=target.campaign,
                endpoint_id=target.endpoint_id,
                event_type=target.event_type,
                state=DropState.ingesting,
                lines=0,
                accepted=0,
                rejected=0,
                rejections=[],
                committed_offset=0,
                created_at=utcnow(),
            )
            session.add(drop)
            return drop, "new"
        if drop.state == DropState.ingesting:
            if drop.path != name and (self.directory / drop.path).exists():
                return drop, "duplicate"  # a copy of a file still being ingested
            drop.path = name
            return drop, "resume"
        if drop.name == name and not (self.directory / drop.path).exists():
            return drop, "finish"  # committed, but the move to done/ did not happen
        return drop, "duplicate"

    def _target(self, campaign: str | None) -> Target:
        """The campaign's target from its ``campaign.json``, or the settings' for a top-level file."""
        if campaign is None:
            cfg = self.config
            if not cfg.tenant or not cfg.endpoint_id:
                raise DropFileError(
                    "file at the top of the drop folder: set HERALD_INGEST__TENANT and "
                    "HERALD_INGEST__ENDPOINT_ID, or drop it into a campaign folder with a campaign.json"
                )
            config = CampaignConfig(
                tenant=cfg.tenant, endpoint_id=cfg.endpoint_id, event_type=cfg.event_type, lane=cfg.lane,
                template=cfg.template or None,
            )  # fmt: skip
        else:
            config = _load_campaign(self.directory / campaign / CAMPAIGN_FILE, campaign)
        where = f"{campaign}/{CAMPAIGN_FILE}" if campaign else "HERALD_INGEST__"
        with self.reads() as session:
            try:
                tenant = queries.get_tenant(session=session, ref=config.tenant)
                endpoint = queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=config.endpoint_id)
            except NotFoundError as exc:
                raise DropFileError(f"{where}: {exc.message}") from None
            label = f"{where}: template" if campaign else "HERALD_INGEST__TEMPLATE"
            template = _webhook_template(
                session, tenant_id=tenant.id, event_type=config.event_type, locale=config.template, label=label
            )
        return Target(
            tenant.id, endpoint.id, config.event_type, config.lane, config.data, campaign, template, config.template
        )

    def _pace(self) -> tuple[int, float]:
        """The next chunk's size and the pause after it: smaller and paused while urgent lanes are busy."""
        if self.config.yield_for_s and self.urgent():
            return min(self.config.yield_chunk_size, self.config.chunk_size), max(
                self.config.yield_pause_s, self.config.chunk_pause_s
            )
        return self.config.chunk_size, self.config.chunk_pause_s

    def _ingest(self, path: Path, name: str, drop: Drop, target: Target) -> Outcome:
        tally = _Tally(drop.committed_offset, drop.lines, drop.accepted, drop.rejected, list(drop.rejections))
        resume_at = drop.committed_offset
        if resume_at:
            logger.info("drop %s: resuming %s after line %s", drop.id, name, number(drop.lines))
        else:
            logger.info("drop %s: ingesting %s", drop.id, name)
        size, pause_s = self._pace()
        chunks = 0
        with SeenIds() as seen, path.open("rb") as stream:
            parser = DropParser(stream)
            replayed: list[tuple[str, int]] = []
            chunk: list[Item] = []
            for item in parser:
                if item.end <= resume_at:  # committed before the crash: only remember its id
                    if isinstance(item, Row):
                        replayed.append((item.user_id, item.line))
                        if len(replayed) >= size:
                            seen.add(replayed)
                            replayed = []
                    continue
                if replayed:
                    seen.add(replayed)
                    replayed = []
                chunk.append(item)
                if len(chunk) >= size:
                    self._commit(drop.id, target, chunk, seen, tally, lines=item.line, end=item.end)
                    chunk = []
                    chunks += 1
                    self.on_chunk(chunks)
                    size, pause_s = self._pace()
                    if self.stop.wait(pause_s):
                        logger.info("drop %s: stopping after line %s; resumes on restart", drop.id, number(tally.lines))
                        return Outcome(OutcomeKind.stopped, name, drop.id)
            if replayed:
                seen.add(replayed)
            destination = self._free_path(DONE, target.campaign, path.name, drop.id)
            self._commit(
                drop.id,
                target,
                chunk,
                seen,
                tally,
                lines=parser.lines,
                end=parser.offset,
                destination=destination.relative_to(self.directory).as_posix(),
            )
        return self._finish(path, drop.id)

    def _commit(
        self,
        drop_id: str,
        target: Target,
        items: list[Item],
        seen: SeenIds,
        tally: _Tally,
        *,
        lines: int,
        end: int,
        destination: str | None = None,
    ) -> None:
        """Write one chunk and the progress after it in one transaction; the last one ends ingestion."""
        rows = [i for i in items if isinstance(i, Row)]
        duplicates = seen.add([(r.user_id, r.line) for r in rows])
        refused = [(i.line, i.reason) for i in items if isinstance(i, Rejection)]
        refused += [(line, f"duplicate of line {first}") for line, first in duplicates.items()]
        now = utcnow()
        accepted = [r for r in rows if r.line not in duplicates]
        lease_until = self._claim(target.lane, len(accepted), now)
        events, deliveries, failed = self._rows(target, drop_id, accepted, now, lease_until)
        refused += failed
        refused.sort()
        listed = max(0, self.config.max_rejections - len(tally.rejections))  # rejections the report still lists
        rejections = tally.rejections + [{"line": line, "reason": reason} for line, reason in refused[:listed]]
        values: dict[str, Any] = {
            "committed_offset": end,
            "lines": lines,
            "accepted": tally.accepted + len(events),
            "rejected": tally.rejected + len(refused),
            "rejections": rejections,
        }
        if destination is not None:
            values.update(state=DropState.delivering, path=destination, finished_at=now)
        dialect = self.sessions.kw["bind"].dialect
        writes = [
            prepare_insert(dialect, Event, EVENT_COLUMNS, events),
            prepare_insert(dialect, Delivery, DELIVERY_COLUMNS, deliveries),
        ]
        with transaction(self.sessions) as session:
            claimed = session.execute(
                update(Drop)
                .where(Drop.id == drop_id, Drop.committed_offset == tally.offset, Drop.state == DropState.ingesting)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                raise _TakenOverError(drop_id)
            run_writes(session.connection(), writes)
        tally.offset, tally.lines = end, lines
        tally.accepted, tally.rejected, tally.rejections = values["accepted"], values["rejected"], rejections
        if lease_until is not None and deliveries and self.celery is not None:
            ids = [row[0] for row in deliveries]
            config, lane = self.settings.dispatch, target.lane
            handed = hand_over(
                celery=self.celery, sessions=self.sessions, config=config, lane=lane, ids=ids, lease_until=lease_until
            )
            if handed:
                return  # the workers have them; the dispatcher has nothing to do
        if events:
            self.wake()

    def _claim(self, lane: str, count: int, now: datetime) -> datetime | None:
        """The lease to write ``count`` deliveries of ``lane`` under, already claimed; None to
        leave them to the dispatcher (no Celery app, or no room in flight for them all)."""
        if self.celery is None or not count:
            return None
        if not self.room.at_least(lane, count):
            return None
        return queries.lease_expiry(now, self.settings.dispatch.lease_s)

    def _rows(
        self, target: Target, drop_id: str, rows: list[Row], now: datetime, lease_until: datetime | None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[int, str]]]:
        """Event and delivery rows (``EVENT_COLUMNS``, ``DELIVERY_COLUMNS``) for accepted lines,
        claimed under ``lease_until`` if given, else queued; lines whose template fails are refused."""
        events: list[tuple[Any, ...]] = []
        deliveries: list[tuple[Any, ...]] = []
        refused: list[tuple[int, str]] = []
        defaults = target.data
        category = target.event_type.split(".", 1)[0]
        tenant_id, endpoint_id, event_type, lane = target.tenant_id, target.endpoint_id, target.event_type, target.lane
        webhook = Channel.webhook.value
        state = (DeliveryState.queued if lease_until is None else DeliveryState.sending).value
        due_at = now if lease_until is None else None
        event_ids, delivery_ids = new_ids("evt", len(rows)), new_ids("dlv", len(rows))
        for row, event_id, delivery_id in zip(rows, event_ids, delivery_ids, strict=True):
            columns = {k: v for k, v in row.data.items() if v != "" or k not in defaults} if defaults else row.data
            data = {**defaults, **columns, "user_id": row.user_id}
            content = None
            if target.template is not None:
                event = {"id": event_id, "type": event_type, "subject": row.user_id, "created_at": now.isoformat()}
                try:
                    content = render_message(target.template, template_context(data=data, event=event))
                except RenderError as exc:
                    refused.append((row.line, f"template: {exc.message}"))
                    continue
            events.append((event_id, tenant_id, event_type, row.user_id, data, lane, now))
            deliveries.append(
                (delivery_id, tenant_id, event_id, endpoint_id, webhook, lane, state, event_type, row.user_id,
                 0, due_at, 0, category, drop_id, now, now, content, lease_until)
            )  # fmt: skip
        return events, deliveries, refused

    # ------------------------------------------------------------ moving files

    def _free_path(self, folder: str, campaign: str | None, name: str, tag: str) -> Path:
        """``DIR/folder/[campaign/]name``, or ``stem-tag.suffix`` when that name is taken."""
        base = self.directory / folder / (campaign or "")
        candidate = base / name
        if candidate.exists() or report_path(candidate).exists():
            original = Path(name)
            candidate = base / f"{original.stem}-{tag}{original.suffix}"
        return candidate

    def _move(self, path: Path, destination: Path, report: dict[str, Any]) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_report(destination, report)
        os.replace(path, destination)

    def _finish(self, path: Path, drop_id: str) -> Outcome:
        with self.reads() as session:
            drop = get_drop(session=session, tenant_id=None, drop_id=drop_id)
            counts = progress(session=session, drop_ids=[drop_id])[drop_id]
        destination = self.directory / drop.path
        self._move(path, destination, drop_report(drop, counts))
        self._reported[drop_id] = time.monotonic()
        logger.info(
            "drop %s: %s ingested: %s lines, %s accepted, %s rejected; moved to %s",
            drop.id, drop.name, number(drop.lines), number(drop.accepted), number(drop.rejected), drop.path,
        )  # fmt: skip
        return Outcome(OutcomeKind.ingested, drop.name, drop.id, destination)

    def _duplicate(self, path: Path, name: str, campaign: str | None, original: Drop) -> Outcome:
        now = utcnow()
        destination = self._free_path(DONE, campaign, path.name, "dup-" + now.strftime("%Y%m%dT%H%M%S%f"))
        self._move(path, destination, duplicate_report(name=name, original=original, at=now))
        logger.warning(
            "drop file %s: same content and target as drop %s (%s); nothing created, moved to %s",
            name, original.id, original.name, destination.relative_to(self.directory),
        )  # fmt: skip
        return Outcome(OutcomeKind.duplicate, name, original.id, destination)

    def _fail(self, path: Path, name: str, campaign: str | None, error: str) -> Outcome:
        now = utcnow()
        destination = self._free_path(FAILED, campaign, path.name, now.strftime("%Y%m%dT%H%M%S%f"))
        try:
            self._move(path, destination, failed_report(name=name, error=error, at=now))
        except FileNotFoundError:
            return Outcome(OutcomeKind.skipped, name, detail="file vanished")
        logger.error("drop file %s failed: %s; moved to %s", name, error, destination.relative_to(self.directory))
        return Outcome(OutcomeKind.failed, name, moved_to=destination, detail=error)

    # ------------------------------------------------------------ reports

    def refresh_reports(self) -> None:
        """Every ``report_every_s``, rewrite the reports of draining drops; finish the drained ones.

        Counting a drop's deliveries reads all of them, so it is not done on every pass.
        """
        now = time.monotonic()
        # A read: counting a large drop's deliveries takes a while, and holding the write lock
        # meanwhile would stall every worker's records and every claim.
        with self.reads() as session:
            drops = [
                d
                for d in session.scalars(select(Drop).where(Drop.state == DropState.delivering))
                if now - self._reported.get(d.id, 0.0) >= self.config.report_every_s
            ]
            counts = progress(session=session, drop_ids=[d.id for d in drops])
        for drop in drops:
            current = counts[drop.id]
            if current.final:
                with transaction(self.sessions) as session:
                    session.execute(
                        update(Drop)
                        .where(Drop.id == drop.id, Drop.state == DropState.delivering)
                        .values(state=DropState.finished)
                        .execution_options(synchronize_session=False)
                    )
                drop.state = DropState.finished
                logger.info("drop %s: %s delivered, %s dead", drop.id, number(current.delivered), number(current.dead))
            path = self.directory / drop.path
            if path.is_file():
                write_report(path, drop_report(drop, current))
            self._reported[drop.id] = now


def _webhook_template(
    session: Session, *, tenant_id: str, event_type: str, locale: str | None, label: str
) -> dict[str, str | None] | None:
    """The parts of the tenant's webhook template for ``event_type`` in ``locale`` (exactly).

    ``locale=None`` (the target named no template): the default-locale one, or None if there is
    none. A named template that does not exist is a ``DropFileError`` naming ``label``.
    """
    found = get_template(
        session=session,
        tenant_id=tenant_id,
        event_type=event_type,
        channel=Channel.webhook.value,
        locale=DEFAULT_LOCALE if locale is None else locale,
    )
    if found is None:
        if locale is None:
            return None
        raise DropFileError(
            f"{label}: the tenant has no webhook template for {event_type!r} in locale {locale or DEFAULT_TEMPLATE!r}"
        )
    return {"channel": Channel.webhook.value, "body": found.body}


def _load_campaign(path: Path, campaign: str) -> CampaignConfig:
    where = f"{campaign}/{CAMPAIGN_FILE}"
    try:
        raw = json.loads(path.read_bytes(), parse_constant=_not_json)
    except FileNotFoundError:
        raise DropFileError(f"{where}: missing (every folder in the drop folder is a campaign and needs one)") from None
    except (ValueError, RecursionError) as exc:
        raise DropFileError(f"{where}: not valid JSON ({exc})") from None
    try:
        return CampaignConfig.model_validate(raw)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "campaign"
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif first["type"] == "value_error":  # our own validators' messages, without pydantic's prefix
            message = str(first.get("ctx", {}).get("error", first["msg"]))
        else:
            message = first["msg"]
        raise DropFileError(f"{where}: {loc}: {message}") from None


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
