"""What a drop tells its sender: live progress from the deliveries table, and ``NAME.report.json``.

Counts of delivered, dead and pending come from the deliveries themselves (never a counter that
could drift), so ``GET /v1/drops``, ``herald drops`` and the report agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from herald.store.models import TERMINAL_STATES, Delivery, DeliveryState, Drop

REPORT_SUFFIX = ".report.json"


@dataclass(frozen=True)
class Progress:
    """A drop's deliveries by outcome; ``other`` is expired, canceled or suppressed."""

    delivered: int = 0
    dead: int = 0
    pending: int = 0
    other: int = 0
    last_finished_at: datetime | None = None

    @property
    def total(self) -> int:
        return self.delivered + self.dead + self.pending + self.other

    @property
    def final(self) -> bool:
        return self.pending == 0


def progress(*, session: Session, drop_ids: Sequence[str]) -> dict[str, Progress]:
    """Progress of each drop in ``drop_ids`` (a drop without deliveries is all zeros)."""
    counts: dict[str, dict[str, int]] = {i: {} for i in drop_ids}
    last: dict[str, datetime] = {}
    if drop_ids:
        rows = session.execute(
            select(Delivery.drop_id, Delivery.state, func.count(), func.max(Delivery.finished_at))
            .where(Delivery.drop_id.in_(list(drop_ids)))
            .group_by(Delivery.drop_id, Delivery.state)
        ).all()
        for drop_id, state, count, finished in rows:
            if drop_id is None:
                continue
            counts[drop_id][state] = count
            if state in TERMINAL_STATES and finished is not None and (drop_id not in last or finished > last[drop_id]):
                last[drop_id] = finished
    out: dict[str, Progress] = {}
    for drop_id, by_state in counts.items():
        delivered = by_state.pop(DeliveryState.delivered, 0)
        dead = by_state.pop(DeliveryState.dead, 0)
        other = sum(n for s, n in by_state.items() if s in TERMINAL_STATES)
        pending = sum(n for s, n in by_state.items() if s not in TERMINAL_STATES)
        out[drop_id] = Progress(delivered, dead, pending, other, last.get(drop_id))
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start is not None and end is not None else None


def drop_report(drop: Drop, counts: Progress) -> dict[str, Any]:
    """The report of a drop: what was read, what was refused and why, what was delivered, and when."""
    ingest_s = _seconds(drop.created_at, drop.finished_at)
    done_at = counts.last_finished_at if drop.finished_at is not None and counts.final else None
    return {
        "drop_id": drop.id,
        "name": drop.name,
        "campaign": drop.campaign,
        "state": drop.state,
        "tenant_id": drop.tenant_id,
        "endpoint_id": drop.endpoint_id,
        "event_type": drop.event_type,
        "content_hash": drop.content_hash,
        "lines": drop.lines,
        "accepted": drop.accepted,
        "rejected": drop.rejected,
        "rejections": drop.rejections,
        "rejections_listed": len(drop.rejections),
        "delivered": counts.delivered,
        "dead": counts.dead,
        "pending": counts.pending,
        "other": counts.other,
        "timings": {
            "started_at": _iso(drop.created_at),
            "ingested_at": _iso(drop.finished_at),
            "ingest_s": ingest_s,
            "ingest_lines_per_s": round(drop.lines / ingest_s) if ingest_s else None,
            "delivered_at": _iso(done_at),
            "total_s": _seconds(drop.created_at, done_at),
        },
    }


def duplicate_report(*, name: str, original: Drop, at: datetime) -> dict[str, Any]:
    return {
        "name": name,
        "state": "duplicate",
        "duplicate_of": original.id,
        "duplicate_of_name": original.name,
        "content_hash": original.content_hash,
        "message": (
            f"same content and target as drop {original.id} ({original.name}): nothing was created; "
            "to send it again, change the file (a comment line is enough)"
        ),
        "timings": {"seen_at": at.isoformat()},
    }


def failed_report(*, name: str, error: str, at: datetime) -> dict[str, Any]:
    return {"name": name, "state": "failed", "error": error, "timings": {"failed_at": at.isoformat()}}


def report_path(path: Path) -> Path:
    """``done/users.csv`` -> ``done/users.csv.report.json``."""
    return path.with_name(path.name + REPORT_SUFFIX)


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write the report of the file at ``path`` next to it, atomically (a reader never sees half)."""
    target = report_path(path)
    partial = target.with_name(f".{target.name}.part")
    partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def bar(done: int, total: int, *, width: int = 20) -> str:
    """``[##########..........]  50%``; an empty drop is complete."""
    share = done / total if total else 1.0
    filled = min(width, int(share * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {int(share * 100):3d}%"


def progress_line(drop: Drop, counts: Progress) -> str:
    """One terminal line: ``[#####.....]  52% 52,000/100,000 delivered, 12 dead, 47,988 pending``."""
    settled = counts.delivered + counts.dead + counts.other
    total = max(drop.accepted, counts.total)
    text = f"{bar(settled, total)} {counts.delivered:,}/{total:,} delivered, {counts.dead:,} dead"
    if counts.pending:
        text += f", {counts.pending:,} pending"
    if drop.rejected:
        text += f", {drop.rejected:,} lines rejected"
    return text
