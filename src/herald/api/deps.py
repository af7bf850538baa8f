"""Request dependencies: a transactional session and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from herald.errors import AuthError
from herald.store import queries
from herald.store.models import Tenant


def get_session(request: Request) -> Iterator[Session]:
    """A session per request. Routes that write call ``commit()`` themselves before answering,
    so a 2xx always means committed; anything uncommitted is rolled back on close."""
    with request.app.state.sessions() as session:
        yield session


def get_tenant(
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> Tenant:
    if not authorization:
        raise AuthError("authorization: missing API key (send 'Authorization: Bearer <key>')")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise AuthError("authorization: expected 'Bearer <key>'")
    return queries.authenticate(session=session, raw=raw.strip())


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
