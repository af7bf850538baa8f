"""Drops from the watched folder: live progress, and their dead letters listed and replayed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, Field

from herald.api.deps import IdPath, IdQuery, SessionDep, TenantDep
from herald.api.routes.deliveries import delivery_out
from herald.api.schemas import DeliveryOut, In, ObjectId, Page, ReplayOut
from herald.ingest.drops import DropState, get_drop, list_drops, replay_drop
from herald.ingest.report import Progress, progress
from herald.store import queries
from herald.store.models import DeliveryState, Drop, utcnow

router = APIRouter(tags=["drops"])

Limit = Annotated[int, Query(ge=1, le=500)]


class DropProgress(BaseModel):
    """Deliveries of the drop by outcome, counted live; ``other`` is expired, canceled or suppressed."""

    delivered: int
    dead: int
    pending: int
    other: int
    percent: float


class RejectionOut(BaseModel):
    line: int
    reason: str


class DropOut(BaseModel):
    id: str
    name: str
    campaign: str | None
    state: str
    file: str
    endpoint_id: str | None
    event_type: str
    lines: int
    accepted: int
    rejected: int
    progress: DropProgress
    created_at: datetime
    ingested_at: datetime | None
    completed_at: datetime | None
    rejections: list[RejectionOut] | None = None


class DropReplayIn(In):
    """Without ``ids``, every dead delivery of the drop; ``force`` as for ``/v1/dead-letters/replay``."""

    ids: list[ObjectId] | None = Field(default=None, min_length=1, max_length=10_000)
    force: bool = Field(default=False, strict=True)


def drop_out(drop: Drop, counts: Progress, *, with_rejections: bool) -> DropOut:
    settled = counts.delivered + counts.dead + counts.other
    total = max(drop.accepted, counts.total)
    return DropOut(
        id=drop.id,
        name=drop.name,
        campaign=drop.campaign,
        state=drop.state,
        file=drop.path,
        endpoint_id=drop.endpoint_id,
        event_type=drop.event_type,
        lines=drop.lines,
        accepted=drop.accepted,
        rejected=drop.rejected,
        progress=DropProgress(
            delivered=counts.delivered,
            dead=counts.dead,
            pending=counts.pending,
            other=counts.other,
            percent=round(100 * settled / total, 1) if total else 100.0,
        ),
        created_at=drop.created_at,
        ingested_at=drop.finished_at,
        completed_at=counts.last_finished_at if drop.state == DropState.finished else None,
        rejections=[RejectionOut(**r) for r in drop.rejections] if with_rejections else None,
    )


@router.get("/v1/drops", response_model=Page[DropOut])
def list_drops_route(
    session: SessionDep, tenant: TenantDep, state: DropState | None = None, cursor: IdQuery = None, limit: Limit = 100
) -> Page[DropOut]:
    rows = list(list_drops(session=session, tenant_id=tenant.id, state=state, cursor=cursor, limit=limit + 1))
    page = rows[:limit]
    counts = progress(session=session, drop_ids=[d.id for d in page])
    return Page[DropOut](
        data=[drop_out(d, counts[d.id], with_rejections=False) for d in page],
        next_cursor=page[-1].id if len(rows) > limit else None,
    )


@router.get("/v1/drops/{drop_id}", response_model=DropOut)
def read_drop(drop_id: IdPath, session: SessionDep, tenant: TenantDep) -> DropOut:
    """A drop with its rejected lines (up to ``HERALD_INGEST__MAX_REJECTIONS``) and live progress."""
    drop = get_drop(session=session, tenant_id=tenant.id, drop_id=drop_id)
    counts = progress(session=session, drop_ids=[drop.id])[drop.id]
    return drop_out(drop, counts, with_rejections=True)


@router.get("/v1/drops/{drop_id}/dead-letters", response_model=Page[DeliveryOut], tags=["dead letters"])
def list_drop_dead_letters(
    drop_id: IdPath, session: SessionDep, tenant: TenantDep, cursor: IdQuery = None, limit: Limit = 100
) -> Page[DeliveryOut]:
    drop = get_drop(session=session, tenant_id=tenant.id, drop_id=drop_id)
    where = queries.DeliveryFilter(state=DeliveryState.dead, drop_id=drop.id)
    rows = list(
        queries.list_deliveries(session=session, tenant_id=tenant.id, where=where, cursor=cursor, limit=limit + 1)
    )
    return Page[DeliveryOut](
        data=[delivery_out(session, d, with_attempts=False) for d in rows[:limit]],
        next_cursor=rows[limit - 1].id if len(rows) > limit else None,
    )


@router.post("/v1/drops/{drop_id}/replay", response_model=ReplayOut, tags=["dead letters"])
def replay_drop_dead_letters(
    drop_id: IdPath,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    body: Annotated[DropReplayIn | None, Body()] = None,
) -> ReplayOut:
    """Re-send the drop's dead deliveries, keeping their ids (the ``webhook-id``)."""
    drop = get_drop(session=session, tenant_id=tenant.id, drop_id=drop_id)
    body = body or DropReplayIn()
    replayed, skipped = replay_drop(session=session, drop=drop, ids=body.ids, force=body.force, now=utcnow())
    session.commit()
    if replayed:
        request.app.state.wake()
    return ReplayOut(replayed=replayed, skipped=skipped)
