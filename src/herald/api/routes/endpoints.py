"""Webhook endpoints: register, read, change, rotate secrets, disable and enable."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from herald.api.deps import IdPath, IdQuery, SessionDep, TenantDep
from herald.api.schemas import EndpointIn, EndpointOut, EndpointPatch, Page, RotateIn
from herald.channels import signing, ssrf
from herald.store import queries
from herald.store.ids import new_id
from herald.store.models import Endpoint, utcnow

router = APIRouter(prefix="/v1/endpoints", tags=["endpoints"])


def _out(endpoint: Endpoint, secret: str | None = None) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        description=endpoint.description,
        event_types=endpoint.event_types,
        max_rate_per_s=endpoint.max_rate_per_s,
        max_concurrency=endpoint.max_concurrency,
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
        secret=secret,
    )


def _check(request: Request, url: str) -> None:
    ssrf.check_url(url, allow=request.app.state.allow_networks)


@router.post("", status_code=201, response_model=EndpointOut, response_model_exclude_none=False)
def create_endpoint(body: EndpointIn, request: Request, session: SessionDep, tenant: TenantDep) -> EndpointOut:
    """Register an endpoint; its ``whsec_`` secret is shown in this answer only."""
    _check(request, body.url)
    endpoint = Endpoint(
        id=new_id("ep"),
        tenant_id=tenant.id,
        url=body.url,
        description=body.description,
        event_types=body.event_types,
        max_rate_per_s=body.max_rate_per_s,
        max_concurrency=body.max_concurrency,
        enabled=True,
    )
    session.add(endpoint)
    session.flush()
    secret = signing.generate_secret()
    queries.add_secret(session=session, endpoint_id=endpoint.id, secret=secret, grace_s=0)
    session.commit()
    return _out(endpoint, secret)


@router.get("", response_model=Page[EndpointOut])
def list_endpoints(
    session: SessionDep,
    tenant: TenantDep,
    cursor: IdQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Page[EndpointOut]:
    rows = queries.list_endpoints(session=session, tenant_id=tenant.id, cursor=cursor, limit=limit + 1)
    return Page[EndpointOut](
        data=[_out(e) for e in rows[:limit]], next_cursor=rows[limit - 1].id if len(rows) > limit else None
    )


@router.get("/{endpoint_id}", response_model=EndpointOut)
def read_endpoint(endpoint_id: IdPath, session: SessionDep, tenant: TenantDep) -> EndpointOut:
    return _out(queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointOut)
def update_endpoint(
    endpoint_id: IdPath, body: EndpointPatch, request: Request, session: SessionDep, tenant: TenantDep
) -> EndpointOut:
    endpoint = queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("url") is not None:
        _check(request, changes["url"])
    for name, value in changes.items():
        if name in ("url", "description") and value is None:
            continue
        setattr(endpoint, name, value)
    endpoint.updated_at = utcnow()
    session.commit()
    return _out(endpoint)


@router.post("/{endpoint_id}/rotate-secret", response_model=EndpointOut)
def rotate_secret(
    endpoint_id: IdPath, request: Request, session: SessionDep, tenant: TenantDep, body: RotateIn | None = None
) -> EndpointOut:
    """A new current secret; the old one keeps signing (alongside) for the grace period."""
    endpoint = queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    grace_s = body.grace_s if body and body.grace_s is not None else request.app.state.settings.webhook.secret_grace_s
    secret = signing.generate_secret()
    queries.add_secret(session=session, endpoint_id=endpoint.id, secret=secret, grace_s=grace_s)
    session.commit()
    return _out(endpoint, secret)


@router.post("/{endpoint_id}/disable", response_model=EndpointOut)
def disable_endpoint(endpoint_id: IdPath, session: SessionDep, tenant: TenantDep) -> EndpointOut:
    endpoint = queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    endpoint.enabled = False
    endpoint.disabled_reason = "disabled by API"
    endpoint.updated_at = utcnow()
    session.commit()
    return _out(endpoint)


@router.post("/{endpoint_id}/enable", response_model=EndpointOut)
def enable_endpoint(endpoint_id: IdPath, session: SessionDep, tenant: TenantDep) -> EndpointOut:
    endpoint = queries.get_endpoint(session=session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    endpoint.enabled = True
    endpoint.disabled_reason = None
    endpoint.updated_at = utcnow()
    session.commit()
    return _out(endpoint)
