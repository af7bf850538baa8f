"""The API baseline: empty FastAPI endpoints at Herald's paths, served exactly as ``herald api`` serves.

    python bench/empty_app.py --port 8001

``POST /v1/events`` and ``POST /v1/events/batch`` parse the JSON body (FastAPI, into a ``dict``)
and answer 202 with a small JSON body; nothing is validated, stored or woken. Served by
``uvicorn.run`` with the same arguments as ``herald api`` (``src/herald/cli.py``): an app factory,
one worker, ``log_config=None``, no access log, uvicorn's default loop and HTTP parser.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/events", status_code=202)
    async def create_event(body: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": 1}

    @app.post("/v1/events/batch", status_code=202)
    async def create_events(body: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": len(body.get("events", []))}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        "empty_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=1,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
