"""The one error boundary: every failure leaves the API as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from herald.errors import HeraldError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int, *, code: str, title: str, detail: str, errors: list[dict[str, Any]] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:herald:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    # Only the first element says where the value came from; a field may itself be called "path".
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)]
    return ".".join(parts) or "body"


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            message = "body: malformed JSON"
        elif kind == "extra_forbidden":
            message = f"{_field(loc)}: unknown field"
        else:
            message = f"{_field(loc)}: {err.get('msg', 'invalid')}"
        out.append({"field": _field(loc) if kind != "json_invalid" else "body", "message": message})
    return out


def install(app: FastAPI) -> None:
    """Register the handlers that map every error to a problem response."""

    @app.exception_handler(HeraldError)
    async def _herald(_request: Request, exc: HeraldError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("internal error: %s", exc.code)
        errors = getattr(exc, "errors", None) or ([{"field": exc.field, "message": exc.message}] if exc.field else None)
        response = problem(exc.status, code=exc.code, title=exc.title, detail=exc.message, errors=errors)
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, int(retry_after)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        return problem(
            422,
            code="validation_error",
            title="Invalid request",
            detail="; ".join(e["message"] for e in errors[:5]),
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body json.loads could not take (not UTF-8, nested too deep);
            # routes never raise HTTPException, so this is malformed JSON like any other.
            errors = [{"field": "body", "message": "body: malformed JSON"}]
            return problem(
                422, code="validation_error", title="Invalid request", detail=errors[0]["message"], errors=errors
            )
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        code = codes.get(exc.status_code, "http_error")
        return problem(exc.status_code, code=code, title=str(exc.detail), detail=str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return problem(500, code="internal_error", title="Internal error", detail="internal error")
