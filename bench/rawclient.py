"""The ceiling: a bare aiohttp client POSTing one payload ``--count`` times, ``--concurrency`` at once.

Run as a process by ``webhooks.py`` (several in parallel). It sets up, prints ``READY``, waits
for a line on stdin (the start signal, so process start-up is not timed), sends, and prints one
JSON line ``{"sent", "errors", "elapsed_s"}``. One keep-alive pool per process, like a Herald
worker process; no signing, no database: what the machine can do without Herald's bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


async def send_all(url: str, payload: bytes, count: int, concurrency: int, timeout_s: float) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=15)
    headers = {"content-type": "application/json", "user-agent": "bench-raw/1"}
    remaining = count
    errors = 0
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.perf_counter()

        async def one_lane() -> None:
            nonlocal remaining, errors
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                try:
                    async with session.post(url, data=payload, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(one_lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"sent": count - max(remaining, 0), "errors": errors, "elapsed_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--payload-file", required=True)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    with open(args.payload_file, "rb") as f:
        payload = f.read()
    result = asyncio.run(send_all(args.url, payload, args.count, args.concurrency, args.timeout_s))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
