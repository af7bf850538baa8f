"""Request dependencies: a transactional session and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy.orm import Session

from herald.api.schemas import ID_PATTERN, SUBJECT_PATTERN
from herald.errors import AuthError
from herald.store import queries
from herald.store.models import Tenant


def get_session(request: Request) -> Iterator[Session]:
    """A session per request. Routes that write call ``commit()`` themselves before answering,
    so a 2xx always means committed; anything uncommitted is rolled back on close. GET requests
    never write, so theirs only reads (on SQLite it never queues for the write lock)."""
    factory = request.app.state.read_sessions if request.method in ("GET", "HEAD") else request.app.state.sessions
    with factory() as session:
        yield session


def get_tenant(
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> Tenant:
    if not authorization:
        raise AuthError("authorization: missing API key (send 'Authorization: Bearer <key>')", field="authorization")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise AuthError("authorization: expected 'Bearer <key>'", field="authorization")
    return queries.authenticate(session=session, raw=raw.strip())


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
# Ids and filters are checked before they reach the store (PostgreSQL refuses NUL in text).
IdPath = Annotated[str, Path(max_length=40, pattern=ID_PATTERN)]
IdQuery = Annotated[str | None, Query(max_length=40, pattern=ID_PATTERN)]
SubjectQuery = Annotated[str | None, Query(max_length=200, pattern=SUBJECT_PATTERN)]
