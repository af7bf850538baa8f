"""API intake: accepted requests per second of Herald against an empty FastAPI endpoint, same run.

    uv run python bench/api_rate.py [--duration-s 15] [--out bench/results]

Two servers, started the same way (``uvicorn.run`` with ``herald api``'s arguments, one process):
``herald api`` on a fresh SQLite file (a tenant, a key, one endpoint, so each event makes one
delivery; no dispatcher or worker runs, so only intake is measured) and ``empty_app.py`` (the
same paths, parse the JSON and answer 202). The same client (``loadclient.py``, one aiohttp
process) sends the same body to each for ``--warmup-s`` + ``--duration-s``:

    single  POST /v1/events        one event (a 512-byte webhook payload), --concurrency in flight
    batch   POST /v1/events/batch  --batch-size events, --batch-concurrency in flight

Reported: accepted (202) requests and events per second, latency, CPU of server and client, and
Herald / empty for each. Writes ``<out>/api_rate.json`` and ``<out>/api_rate.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests
from common import (
    BENCH_DIR,
    PYTHON,
    CpuMeter,
    Processes,
    command_line,
    common_args,
    create_tenant,
    free_port,
    harness,
    herald_env,
    herald_settings,
    machine_info,
    payload_shape,
    read_line,
    sqlite_database,
    start_redis,
    wait_until,
    write_json,
)


def body_files(tmp: Path, args: argparse.Namespace) -> dict[str, Path]:
    pad, _ = payload_shape(args.payload_bytes)

    def event(i: int) -> dict[str, Any]:
        return {"type": "bench.ping", "subject": f"bench:{i:06d}", "data": {"n": i, "pad": "x" * pad}, "lane": "bulk"}

    single = tmp / "single.json"
    single.write_text(json.dumps(event(1), separators=(",", ":")))
    batch = tmp / "batch.json"
    batch.write_text(json.dumps({"events": [event(i) for i in range(args.batch_size)]}, separators=(",", ":")))
    return {"single": single, "batch": batch}


def serve_up(procs: Processes, name: str, argv: list[str], env: dict[str, str], base: str) -> None:
    procs.start(name, argv, env=env, cwd=BENCH_DIR)

    def up() -> bool:
        procs.check_alive(name)
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{base}/docs" if name == "empty" else f"{base}/healthz", timeout=1).status_code == 200
        return False

    wait_until(up, timeout_s=60, what=f"the {name} server")


def load(
    procs: Processes, args: argparse.Namespace, *, server: str, url: str, body: Path, concurrency: int, key: str
) -> dict[str, Any]:
    name = f"client-{server}-{url.rsplit('/', 1)[1]}"
    argv = [PYTHON, str(BENCH_DIR / "loadclient.py"), "--url", url, "--body-file", str(body),
            "--header", f"Authorization: Bearer {key}", "--concurrency", str(concurrency),
            "--duration-s", str(args.duration_s), "--warmup-s", str(args.warmup_s)]  # fmt: skip
    client = procs.start(name, argv, pipes=True)
    try:
        read_line(client, timeout_s=30, what="the load client")
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        time.sleep(args.warmup_s)  # CPU is counted over the measured window only
        server_mark, client_mark = procs.cpu_s([server])[server], procs.cpu_s([name])[name]
        report: dict[str, Any] = json.loads(
            read_line(client, timeout_s=args.duration_s + 120, what="the load client's report")
        )
        server_cpu = procs.cpu_s([server])[server] - server_mark
        client_cpu = procs.cpu_s([name])[name] - client_mark
    finally:
        procs.stop(name)
    report["server_cores"] = round(server_cpu / args.duration_s, 2)
    report["client_cores"] = round(client_cpu / args.duration_s, 2)
    return report


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    info = machine_info()
    print(f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}; "
          f"{args.duration_s:g}s per variant, batches of {args.batch_size}")  # fmt: skip
    redis = start_redis(procs, tmp, url=args.redis_url, first_db=args.redis_db)
    database_url = sqlite_database(tmp)
    _, key, _ = create_tenant(database_url, endpoint_url="http://127.0.0.1:9/hook")
    env = herald_env(tmp, database_url=database_url, redis_url=redis.claim(0), overrides=args.herald_env)
    bodies = body_files(tmp, args)
    herald_port, empty_port = free_port(), free_port()
    herald_base, empty_base = f"http://127.0.0.1:{herald_port}", f"http://127.0.0.1:{empty_port}"
    serve_up(procs, "herald", [PYTHON, "-m", "herald.cli", "api", "--port", str(herald_port)], env, herald_base)
    serve_up(procs, "empty", [PYTHON, str(BENCH_DIR / "empty_app.py"), "--port", str(empty_port)], env, empty_base)
    cpu = CpuMeter(*[p.pid for p in procs.running.values()])
    results: dict[str, dict[str, Any]] = {}
    for kind, path, concurrency in (
        ("single", "/v1/events", args.concurrency),
        ("batch", "/v1/events/batch", args.batch_concurrency),
    ):
        events = 1 if kind == "single" else args.batch_size
        for server, base in (("empty", empty_base), ("herald", herald_base)):
            print(f"- {server} {path} ({concurrency} in flight) …", flush=True)
            before = cpu.wait_quiet(max_cores=args.quiet_cores, timeout_s=args.quiet_wait_s)
            mark = cpu.start()
            r = load(procs, args, server=server, url=base + path, body=bodies[kind], concurrency=concurrency, key=key)
            r["other_programs_cores"] = round(cpu.others_cores(mark), 3)
            r["other_programs_cores_before"] = round(before, 3)
            r["events_per_request"] = events
            r["events_per_s"] = r["ok_per_s"] * events
            r["concurrency"] = concurrency
            results[f"{server}-{kind}"] = r
            print(f"  {r['ok_per_s']:,.1f} accepted requests/s ({r['events_per_s']:,.0f} events/s), p50 "
                  f"{r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms; other statuses "
                  f"{ {k: v for k, v in r['statuses'].items() if k != '202'} }, errors {r['errors']}; "
                  f"other load {r['other_programs_cores']:.2f}c", flush=True)  # fmt: skip
    ratios = {
        kind: round(results[f"herald-{kind}"]["ok_per_s"] / max(results[f"empty-{kind}"]["ok_per_s"], 1e-9), 4)
        for kind in ("single", "batch")
    }
    for kind, ratio in ratios.items():
        print(f"herald / empty FastAPI endpoint, {kind}: {ratio:.3f}")
    report = {
        "benchmark": "api_rate",
        "machine": info,
        "command": command_line(),
        "parameters": {
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "batch_size": args.batch_size,
            "concurrency": {"single": args.concurrency, "batch": args.batch_concurrency},
            "payload_bytes": args.payload_bytes,
            "database": "sqlite",
            "servers": {
                "herald": "herald api (uvicorn, 1 process)",
                "empty": "bench/empty_app.py (uvicorn, 1 process, async endpoints)",
            },
            "settings": herald_settings(env),
        },
        "results": results,
        "ratios": ratios,
    }
    write_json(args.out / "api_rate.json", report)
    plot(report, args.out / "api_rate.png")
    print(f"wrote {args.out / 'api_rate.json'} and {args.out / 'api_rate.png'}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, kind, title in ((axes[0], "single", "POST /v1/events"), (axes[1], "batch", "POST /v1/events/batch")):
        names = ["empty", "herald"]
        rates = [res[f"{n}-{kind}"]["ok_per_s"] for n in names]
        bars = ax.bar(["empty FastAPI\nendpoint", "Herald"], rates, color=["#7f7f7f", "#1f77b4"])
        labels = [f"{res[f'{n}-{kind}']['ok_per_s']:,.1f} req/s\n({res[f'{n}-{kind}']['events_per_s']:,.0f} events/s)"
                  for n in names]  # fmt: skip
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_ylim(0, max(rates) * 1.3)
        ax.set_ylabel("accepted (202) requests per second")
        events = report["parameters"]["batch_size"] if kind == "batch" else 1
        ax.set_title(f"{title} ({events} event{'s' if events > 1 else ''} a request): "
                     f"Herald = {report['ratios'][kind]:.2f}x empty", fontsize=9)  # fmt: skip
    m = report["machine"]
    fig.suptitle(f"Herald API intake vs an empty FastAPI endpoint (SQLite, {m['cpus_usable']} CPUs, {m['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured seconds per variant")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, single events")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per batch request")
    parser.add_argument("--batch-concurrency", type=int, default=2, help="requests in flight, batches")
    parser.add_argument("--payload-bytes", type=int, default=512, help="webhook body size of each event")
    parser.add_argument("--quiet-cores", type=float, default=0.15)
    parser.add_argument("--quiet-wait-s", type=float, default=10.0)
    common_args(parser)
    return harness(run, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
