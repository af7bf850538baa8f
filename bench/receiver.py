"""The benchmark's webhook receiver: an aiohttp server on loopback that answers 200 and counts.

Run as its own process by ``webhooks.py``; prints ``READY <port>`` on stdout once listening.
``POST /hook`` reads the body, optionally waits ``--delay-ms`` (a slow receiver), answers 200.
``GET /stats`` answers ``{"count", "bytes", "unique_ids"}`` so the driver can take deltas
between variants (``unique_ids`` counts distinct ``webhook-id`` headers, for duplicates).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web


class Counter:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.count = 0
        self.bytes = 0
        self.ids: set[str] = set()

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.count += 1
        self.bytes += len(body)
        webhook_id = request.headers.get("webhook-id")
        if webhook_id:
            self.ids.add(webhook_id)
        return web.Response(text="ok")

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"count": self.count, "bytes": self.bytes, "unique_ids": len(self.ids)})


async def serve(port: int, delay_s: float) -> None:
    counter = Counter(delay_s)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/hook", counter.hook)
    app.router.add_get("/stats", counter.stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # A deep backlog: hundreds of clients connect at once when a variant starts.
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {runner.addresses[0][1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000))
    sys.exit(0)


if __name__ == "__main__":
    main()
