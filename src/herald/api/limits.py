"""Request body cap, enforced before any route reads the body (413 as problem+json)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.api.problems import problem


class BodyLimit:
    """Refuses bodies over ``max_bytes``: by ``Content-Length`` up front, or while reading a body
    sent without one (chunked), before the app sees any of it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"body: larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _too_large(detail)(scope, receive, send)
                    return
        # Read the whole body here (at most max_bytes of it) and hand it on in one message: a body
        # refused while the route is reading it would surface as FastAPI's 400 "error parsing the body".
        chunks: list[bytes] = []
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away; let the app see it
                await self.app(scope, _replay(message, receive), send)
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await _too_large(detail)(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(whole, receive), send)


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that answers ``first`` once, then defers to ``receive`` (for the disconnect)."""
    pending = [first]

    async def replay_receive() -> Message:
        return pending.pop() if pending else await receive()

    return replay_receive


def _too_large(detail: str) -> Response:
    errors = [{"field": "body", "message": detail}]
    return problem(413, code="payload_too_large", title="Payload too large", detail=detail, errors=errors)
