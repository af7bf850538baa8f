"""Deliveries and dead letters: read state and attempts, list with filters, replay."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime
from sqlalchemy import select
from sqlalchemy.orm import Session

from herald import live
from herald.api.deps import IdPath, IdQuery, SessionDep, SubjectQuery, TenantDep
from herald.api.schemas import AttemptOut, DeliveryOut, Page, ReplayIn, ReplayOut
from herald.errors import ValidationError
from herald.store import queries
from herald.store.models import Delivery, DeliveryState, utcnow

router = APIRouter(tags=["deliveries"])

Limit = Annotated[int, Query(ge=1, le=500)]


def delivery_out(session: Session, delivery: Delivery, *, with_attempts: bool) -> DeliveryOut:
    attempts = None
    if with_attempts:
        attempts = [
            AttemptOut(
                number=a.number,
                started_at=a.started_at,
                latency_ms=a.latency_ms,
                status_code=a.status_code,
                outcome=a.outcome,
                error=a.error,
                decision=a.decision,
                provider=a.provider,
            )
            for a in queries.attempts_of(session=session, delivery_id=delivery.id)
        ]
    return DeliveryOut(
        id=delivery.id,
        event_id=delivery.event_id,
        endpoint_id=delivery.endpoint_id,
        channel=delivery.channel,
        lane=delivery.lane,
        state=delivery.state,
        event_type=delivery.event_type,
        subject=delivery.subject,
        attempt_count=delivery.attempts,
        next_attempt_at=delivery.due_at,
        deliver_by=delivery.deliver_by,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        replays=delivery.replays,
        created_at=delivery.created_at,
        updated_at=delivery.updated_at,
        finished_at=delivery.finished_at,
        attempts=attempts,
    )


def _page(session: Session, rows: list[Delivery], limit: int) -> Page[DeliveryOut]:
    return Page[DeliveryOut](
        data=[delivery_out(session, d, with_attempts=False) for d in rows[:limit]],
        next_cursor=rows[limit - 1].id if len(rows) > limit else None,
    )


@router.get("/v1/deliveries/{delivery_id}", response_model=DeliveryOut)
def read_delivery(delivery_id: IdPath, session: SessionDep, tenant: TenantDep) -> DeliveryOut:
    delivery = queries.get_delivery(session=session, tenant_id=tenant.id, delivery_id=delivery_id)
    return delivery_out(session, delivery, with_attempts=True)


@router.get("/v1/deliveries", response_model=Page[DeliveryOut])
def list_deliveries(
    session: SessionDep,
    tenant: TenantDep,
    state: DeliveryState | None = None,
    subject: SubjectQuery = None,
    endpoint: IdQuery = None,
    event_type: SubjectQuery = None,
    cursor: IdQuery = None,
    limit: Limit = 100,
) -> Page[DeliveryOut]:
    where = queries.DeliveryFilter(state=state, subject=subject, endpoint_id=endpoint, event_type=event_type)
    rows = queries.list_deliveries(session=session, tenant_id=tenant.id, where=where, cursor=cursor, limit=limit + 1)
    return _page(session, list(rows), limit)


@router.get("/v1/dead-letters", response_model=Page[DeliveryOut], tags=["dead letters"])
def list_dead_letters(
    session: SessionDep,
    tenant: TenantDep,
    subject: SubjectQuery = None,
    endpoint: IdQuery = None,
    event_type: SubjectQuery = None,
    created_after: AwareDatetime | None = None,
    created_before: AwareDatetime | None = None,
    cursor: IdQuery = None,
    limit: Limit = 100,
) -> Page[DeliveryOut]:
    where = queries.DeliveryFilter(
        state=DeliveryState.dead,
        subject=subject,
        endpoint_id=endpoint,
        event_type=event_type,
        created_after=created_after,
        created_before=created_before,
    )
    rows = queries.list_deliveries(session=session, tenant_id=tenant.id, where=where, cursor=cursor, limit=limit + 1)
    return _page(session, list(rows), limit)


class ReplayReport(ReplayOut):
    """A replay's answer; ``reasons`` says, for every skipped id, why it was not re-sent."""

    reasons: dict[str, str]


@router.post("/v1/dead-letters/replay", response_model=ReplayReport, tags=["dead letters"])
def replay_dead_letters(body: ReplayIn, request: Request, session: SessionDep, tenant: TenantDep) -> ReplayReport:
    """Re-send dead deliveries by ids or by filter, keeping their ids (the ``webhook-id``).

    A dead delivery whose ``deliver_by`` has passed is skipped unless ``force`` is given; see
    ``queries.replay_report`` for what ``force`` means.
    """
    if (body.ids is None) == (body.filter is None):
        raise ValidationError("ids: give either ids or filter, not both and not neither", field="ids")
    where = None
    if body.filter is not None:
        f = body.filter
        where = queries.DeliveryFilter(
            endpoint_id=f.endpoint_id,
            event_type=f.event_type,
            subject=f.subject,
            created_after=f.created_after,
            created_before=f.created_before,
        )
    result = queries.replay_report(
        session=session, tenant_id=tenant.id, ids=body.ids, where=where, force=body.force, now=utcnow()
    )
    if result.replayed:  # dead -> queued: live timelines hear of it once committed
        rows = session.execute(
            select(Delivery.id, Delivery.tenant_id, Delivery.subject, Delivery.event_id, Delivery.channel).where(
                Delivery.id.in_(result.replayed)
            )
        ).all()
        live.note_deliveries(session, rows, DeliveryState.queued)
    session.commit()
    if result.replayed:
        request.app.state.wake()
    return ReplayReport(replayed=result.replayed, skipped=sorted(result.skipped), reasons=result.skipped)
