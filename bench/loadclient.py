"""An HTTP load generator for ``api_rate.py``: one aiohttp session, ``--concurrency`` requests in flight.

Run as a process (so its CPU is its own): it sets up, prints ``READY``, waits for a line on
stdin, then POSTs ``--body-file`` to ``--url`` for ``--warmup-s`` (not counted) and
``--duration-s`` (counted), and prints one JSON line: responses with ``--expect`` status per
second, the other statuses, errors and latency percentiles. The same client, settings and body go
to Herald and to the empty endpoint it is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


async def hammer(args: argparse.Namespace, body: bytes, headers: dict[str, str]) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.perf_counter()
        counting_from = start + args.warmup_s
        until = counting_from + args.duration_s

        async def lane() -> None:
            nonlocal errors
            while True:
                sent = time.perf_counter()
                if sent >= until:
                    return
                try:
                    async with session.post(args.url, data=body) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                done = time.perf_counter()
                if counting_from <= done <= until:  # throughput = completions inside the window
                    if status == 0:
                        errors += 1
                    else:
                        statuses[str(status)] = statuses.get(str(status), 0) + 1
                        latencies.append(done - sent)

        await asyncio.gather(*(lane() for _ in range(args.concurrency)))
    ok = statuses.get(str(args.expect), 0)
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None

    return {
        "ok": ok,
        "ok_per_s": ok / args.duration_s,
        "statuses": statuses,
        "errors": errors,
        "duration_s": args.duration_s,
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--header", action="append", default=[], help="NAME: value (repeatable)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--expect", type=int, default=202, help="the status that counts as accepted")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    headers = {"content-type": "application/json", "user-agent": "bench-load/1"}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    print(json.dumps(asyncio.run(hammer(args, body, headers))), flush=True)


if __name__ == "__main__":
    main()
