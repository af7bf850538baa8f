"""Ingester memory: peak RSS of ``herald watch`` on files of millions of user ids, and its lines/s.

    uv run python bench/ingest_memory.py [--lines 1000000,10000000] [--out bench/results]

For each size, on a fresh SQLite file (a tenant and an endpoint; nothing delivers, so the ingester
runs alone): a file of that many distinct user ids (one a line, written in large blocks, a few
seconds for 10,000,000) is renamed into a drop folder, then ``herald watch DIR --once`` ingests it
and exits. Its peak resident memory comes from the kernel (``wait4``'s ``ru_maxrss``, the true
high-water mark of that process), sampled also every 0.25 s for the plot alongside the lines
committed so far. A first run on an empty folder gives the resident size of the process itself
(imports) so the growth due to the file is visible: flat memory means the same peak for 1,000,000
and 10,000,000 lines.

Goal (issue 5): peak ≤ 150 MB on a 10,000,000-line file. Writes ``<out>/ingest_memory.json`` and
``<out>/ingest_memory.png``. Each size's database is deleted after it is measured (10,000,000 lines
make several GB of rows); ``--keep-temp`` keeps them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    GOALS,
    PYTHON,
    Processes,
    command_line,
    common_args,
    create_tenant,
    harness,
    herald_env,
    herald_settings,
    machine_info,
    machine_load,
    poll_engine,
    sqlite_database,
    start_redis,
    write_ids_file,
    write_json,
)

GOAL_MB = GOALS["ingest_peak_rss_mb"]


def ingest_once(
    procs: Processes, env: dict[str, str], folder: Path, database_url: str, *, name: str, timeout_s: float
) -> dict[str, Any]:
    """``herald watch FOLDER --once`` in a child process: wall time, peak RSS, an RSS timeline."""
    from sqlalchemy import text

    argv = [PYTHON, "-m", "herald.cli", "watch", str(folder), "--once"]
    with open(procs.log_dir / f"{name}.log", "ab") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    procs.running[name] = proc  # so Ctrl-C stops it like every other child
    procs.started.append(name)
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        engine = poll_engine(database_url)
        lines, last_query = 0, 0.0
        try:
            while not done.is_set():
                rss = _vm_rss(proc.pid)
                now = time.perf_counter()
                if now - last_query >= 1.0:
                    last_query = now
                    try:
                        with engine.connect() as conn:
                            lines = int(conn.execute(text("SELECT COALESCE(MAX(lines), 0) FROM drops")).scalar_one())
                    except Exception:  # the table is busy or not there yet; the next sample will do
                        pass
                if rss:
                    samples.append((round(now - start, 2), rss, lines))
                done.wait(0.25)
        finally:
            engine.dispose()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            done.set()
            raise TimeoutError(f"{name}: herald watch --once still running after {timeout_s:.0f}s")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    procs.running.pop(name, None)
    done.set()
    sampler.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: herald watch --once exited with {proc.returncode}; log:\n{procs.tail(name)}")
    return {
        "wall_s": round(elapsed, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # MB below = 10^6 bytes, as the goal's 150 MB
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / 1e6, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "samples": samples,
    }


def _vm_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(args: argparse.Namespace, procs: Processes, tmp: Path, redis_url: str, lines: int) -> dict[str, Any]:
    from sqlalchemy import text

    work = tmp / f"lines-{lines}"
    folder = work / "drops"
    folder.mkdir(parents=True)
    database_url = sqlite_database(work)
    tenant_id, _, endpoint_id = create_tenant(database_url, endpoint_url="http://127.0.0.1:9/hook")
    env = herald_env(work, database_url=database_url, redis_url=redis_url, extra={
        "HERALD_INGEST__TENANT": tenant_id,
        "HERALD_INGEST__ENDPOINT_ID": endpoint_id,
    }, overrides=args.herald_env)  # fmt: skip
    env["TMPDIR"] = str(work)  # the ingester's on-disk duplicate finder goes here, and is removed with it
    staged = folder / f"users-{lines}.txt.part"
    started = time.perf_counter()
    file_bytes = write_ids_file(staged, lines)
    write_s = time.perf_counter() - started
    os.replace(staged, folder / staged.stem)
    print(f"  wrote {lines:,} lines ({file_bytes / 1e6:,.1f} MB) in {write_s:.1f}s; ingesting …", flush=True)
    result = ingest_once(procs, env, folder, database_url, name=f"watch-{lines}", timeout_s=args.timeout_s)
    engine = poll_engine(database_url)
    try:
        with engine.connect() as conn:
            columns = "lines, accepted, rejected, state, created_at, finished_at"
            drop = conn.execute(text(f"SELECT {columns} FROM drops")).one()
            deliveries = int(conn.execute(text("SELECT COUNT(*) FROM deliveries")).scalar_one())
    finally:
        engine.dispose()
    ingest_s = _seconds_between(drop[4], drop[5])
    db_file = Path(database_url.removeprefix("sqlite:///"))
    db_bytes = sum(p.stat().st_size for p in db_file.parent.glob(db_file.name + "*"))
    if not args.keep_temp:
        for path in db_file.parent.glob(db_file.name + "*"):
            path.unlink()
    return {
        "lines": lines,
        "file_bytes": file_bytes,
        "file_written_in_s": round(write_s, 2),
        **result,
        "drop": {"lines": drop[0], "accepted": drop[1], "rejected": drop[2], "state": drop[3]},
        "deliveries": deliveries,
        "ingest_s": ingest_s,
        "lines_per_s": round(lines / result["wall_s"]),
        "lines_per_s_ingest": round(lines / ingest_s) if ingest_s else None,
        "database_bytes": db_bytes,
        "settings": herald_settings(env),
    }


def _seconds_between(first: Any, last: Any) -> float | None:
    import datetime as dt

    if first is None or last is None:
        return None
    a, b = (dt.datetime.fromisoformat(v) if isinstance(v, str) else v for v in (first, last))
    return round((b - a).total_seconds(), 2)


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    sizes = [int(s) for s in args.lines.split(",") if s.strip()]
    info = machine_info()
    print(f"{info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}; "
          f"ingesting {', '.join(f'{s:,}' for s in sizes)} lines")  # fmt: skip
    redis_url = start_redis(procs, tmp, url=args.redis_url, first_db=args.redis_db).claim(0)
    load = machine_load()

    print("- herald watch --once on an empty folder (the process itself) …", flush=True)
    empty = tmp / "empty"
    (empty / "drops").mkdir(parents=True)
    empty_url = sqlite_database(empty)
    env = herald_env(empty, database_url=empty_url, redis_url=redis_url, overrides=args.herald_env)
    baseline = ingest_once(procs, env, empty / "drops", empty_url, name="watch-empty", timeout_s=120)
    print(f"  peak {baseline['peak_rss_mb']} MB", flush=True)

    runs = []
    for lines in sizes:
        print(f"- {lines:,} lines …", flush=True)
        result = measure(args, procs, tmp, redis_url, lines)
        runs.append(result)
        print(f"  peak RSS {result['peak_rss_mb']} MB; {result['lines_per_s']:,} lines/s over {result['wall_s']}s "
              f"(ingestion proper {result['lines_per_s_ingest']:,}/s); {result['drop']['accepted']:,} accepted, "
              f"database {result['database_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    largest = max(runs, key=lambda r: r["lines"]) if runs else None
    goal = None
    if largest is not None:
        goal = {
            "rule": f"peak RSS of the ingesting process ≤ {GOAL_MB:g} MB on the largest file",
            "lines": largest["lines"],
            "peak_rss_mb": largest["peak_rss_mb"],
            "goal_mb": GOAL_MB,
            "issue_size": largest["lines"] >= 10_000_000,
            "met": largest["peak_rss_mb"] <= GOAL_MB and largest["drop"]["accepted"] == largest["lines"],
        }
    flat = None
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]
        flat = {
            "from_lines": small["lines"],
            "to_lines": big["lines"],
            "peak_growth_mb": round(big["peak_rss_mb"] - small["peak_rss_mb"], 1),
            "bytes_per_extra_line": round(
                (big["peak_rss_bytes"] - small["peak_rss_bytes"]) / max(big["lines"] - small["lines"], 1), 3
            ),
        }
    report = {
        "benchmark": "ingest_memory",
        "machine": info,
        "command": command_line(),
        "parameters": {"lines": sizes, "database": "sqlite", "process": "herald watch DIR --once"},
        "results": {"machine_cores_busy_at_start": load, "empty_folder": baseline, "runs": runs, "flat": flat},
        "goal": goal,
    }
    write_json(args.out / "ingest_memory.json", report)
    plot(report, args.out / "ingest_memory.png")
    if goal:
        print(f"goal peak ≤ {GOAL_MB:g} MB on {goal['lines']:,} lines: {'MET' if goal['met'] else 'MISSED'} "
              f"({goal['peak_rss_mb']} MB)")  # fmt: skip
    if flat:
        print(f"peak grew {flat['peak_growth_mb']} MB from {flat['from_lines']:,} to {flat['to_lines']:,} lines")
    print(f"wrote {args.out / 'ingest_memory.json'} and {args.out / 'ingest_memory.png'}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for r in res["runs"]:
        lines = [s[2] for s in r["samples"]]
        rss = [s[1] / 1e6 for s in r["samples"]]
        left.plot(lines, rss, label=f"{r['lines']:,} lines: peak {r['peak_rss_mb']} MB, {r['lines_per_s']:,} lines/s")
    left.axhline(GOAL_MB, color="grey", linestyle="--", label=f"goal ≤ {GOAL_MB:g} MB")
    left.axhline(res["empty_folder"]["peak_rss_mb"], color="black", linestyle=":",
                 label=f"the process alone (empty folder): {res['empty_folder']['peak_rss_mb']} MB")  # fmt: skip
    left.set_xlabel("lines committed so far")
    left.set_ylabel("resident memory of herald watch (MB)")
    left.set_ylim(0, max([GOAL_MB * 1.2] + [r["peak_rss_mb"] * 1.2 for r in res["runs"]]))
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    names = [f"{r['lines']:,}" for r in res["runs"]]
    bars = right.bar(names, [r["peak_rss_mb"] for r in res["runs"]], color="tab:blue")
    right.bar_label(bars, labels=[f"{r['peak_rss_mb']} MB\n{r['lines_per_s']:,} lines/s" for r in res["runs"]],
                    fontsize=8)  # fmt: skip
    right.axhline(GOAL_MB, color="grey", linestyle="--")
    right.set_xlabel("lines in the file")
    right.set_ylabel("peak RSS (MB, ru_maxrss)")
    right.set_ylim(0, max([GOAL_MB * 1.3] + [r["peak_rss_mb"] * 1.3 for r in res["runs"]]))
    goal = report.get("goal") or {}
    m = report["machine"]
    fig.suptitle(f"Herald ingester memory (SQLite, {m['cpus_usable']} CPUs, {m['date']}): "
                 f"goal {'MET' if goal.get('met') else 'MISSED'}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="1000000,10000000", help="file sizes, comma-separated, smallest first")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per file")
    common_args(parser)
    return harness(run, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
