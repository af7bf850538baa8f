"""Herald's whole benchmark suite in one run on one machine: every goal of issues 2-5, one report.

    uv run python bench/suite.py            # full sizes (see bench/README.md for the time it takes)
    uv run python bench/suite.py --quick    # small sizes: checks the machinery in a few minutes

Runs, one after another, each benchmark of ``bench/`` as its own process (each cleans up after
itself) and collects their JSON:

    webhooks   raw aiohttp client, Herald batch API, Herald drop of 100,000 ids, one Celery task per
               message (a sweep, the best counts) and a sequential loop, same receiver (webhooks.py)
    slow       the same receiver taking 200 ms per request: raw client, a drop of 20,000 ids (Herald
               tuned through HERALD_* settings, listed in the results), sequential loop
    ingest     peak RSS and lines/s of ``herald watch`` on files of 1,000,000 and 10,000,000 lines
    api        accepted requests/s of POST /v1/events and /v1/events/batch vs an empty FastAPI app
    isolation  OTP and transactional latency p50/p99: idle, while a drop of 250,000 ids is still being
               ingested, and while the backlog it made drains (100,000 drained before the second
               set of probes ended once the drop got faster, which voids that phase)
    scheduled  memory per scheduled send vs Celery countdown, lateness, a burst of 100,000

Writes ``<out>/suite.json`` (every goal with its value, the key numbers, each step's command,
exit code, duration and background load) and ``<out>/suite.png`` (one figure), with each
benchmark's own JSON and PNG in ``<out>/suite/``; a full run also rewrites the performance table
in the top-level README between its ``<!-- perf-table -->`` markers. ``--quick`` writes to
``bench/results/quick/`` (git-ignored) and leaves the README alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH_DIR, GOALS, PYTHON, machine_busy_s, machine_info, write_json

README = BENCH_DIR.parent / "README.md"
MARK_START, MARK_END = "<!-- perf-table -->", "<!-- /perf-table -->"
X = "\u00d7"  # the multiplication sign of the ratios
# Herald's settings for the slow receiver (a user could set the same; README explains why).
SLOW_SETTINGS = {
    "HERALD_WORKER__CONCURRENCY": "4",
    "HERALD_DISPATCH__MAX_BATCH": "500",
    "HERALD_DISPATCH__TARGET_TASKS": "4",
    "HERALD_WEBHOOK__POOL_SIZE": "500",
}


@dataclass(frozen=True)
class Sizes:
    messages: int  # raw client and Herald batch API
    drop: int  # the drop variant (issue 5: 100,000)
    celery: int  # per Celery configuration
    sequential: int
    slow_drop: int
    slow_sequential: int
    ingest_lines: str
    api_duration_s: float
    api_warmup_s: float
    otps: int
    backlog: int
    scheduled: int
    late: int
    late_span_s: float
    burst: int
    lead_s: float
    timeout_s: float  # per step


# The isolation step's backlog must outlast both probe phases (10 s each at the default rate).
FULL = Sizes(
    messages=100_000, drop=100_000, celery=20_000, sequential=10_000, slow_drop=20_000, slow_sequential=30,
    ingest_lines="1000000,10000000", api_duration_s=15, api_warmup_s=3, otps=200, backlog=250_000,
    scheduled=100_000, late=10_000, late_span_s=60, burst=100_000, lead_s=15, timeout_s=3 * 3600,
)  # fmt: skip
QUICK = Sizes(
    messages=2_000, drop=2_000, celery=400, sequential=300, slow_drop=2_000, slow_sequential=10,
    ingest_lines="20000,100000", api_duration_s=3, api_warmup_s=1, otps=40, backlog=5_000,
    scheduled=2_000, late=300, late_span_s=5, burst=2_000, lead_s=3, timeout_s=900,
)  # fmt: skip
INGEST_KEYS = ("lines", "peak_rss_mb", "lines_per_s", "lines_per_s_ingest", "wall_s")
STEPS = ("webhooks", "slow", "ingest", "api", "isolation", "scheduled")


def step_argv(name: str, s: Sizes, out: Path, args: argparse.Namespace) -> list[str]:
    """The command of one step; ``--herald-env`` items given to the suite go to every step."""
    env_items = [x for item in args.herald_env for x in ("--herald-env", item)]

    def bench(script: str) -> list[str]:
        return [PYTHON, str(BENCH_DIR / script)]

    if name == "webhooks":
        return [*bench("webhooks.py"), "--private-redis", "--variants", "raw,herald,drop,celery,sequential",
                "--messages", str(s.messages), "--drop-messages", str(s.drop), "--celery-messages", str(s.celery),
                "--sequential-messages", str(s.sequential), "--variant-timeout-s", str(min(s.timeout_s, 1800)),
                "--rounds", str(args.rounds), "--report-name", "webhooks", "--out", str(out),
                *env_items]  # fmt: skip
    if name == "slow":
        slow_env = [x for k, v in SLOW_SETTINGS.items() for x in ("--herald-env", f"{k}={v}")]
        return [*bench("webhooks.py"), "--private-redis", "--receiver-delay-ms", "200",
                "--variants", "raw,drop,sequential", "--messages", str(s.slow_drop),
                "--sequential-messages", str(s.slow_sequential), "--variant-timeout-s", str(min(s.timeout_s, 1800)),
                "--report-name", "webhooks-slow", "--out", str(out), *slow_env, *env_items]  # fmt: skip
    if name == "ingest":
        return [*bench("ingest_memory.py"), "--lines", s.ingest_lines, "--out", str(out), *env_items]
    if name == "api":
        return [*bench("api_rate.py"), "--duration-s", str(s.api_duration_s), "--warmup-s", str(s.api_warmup_s),
                "--out", str(out), *env_items]  # fmt: skip
    if name == "isolation":
        return [*bench("otp_latency.py"), "--otps", str(s.otps), "--backlog", str(s.backlog),
                "--backlog-source", "drop", "--drain-timeout-s", "0", "--out", str(out), *env_items]  # fmt: skip
    if name == "scheduled":
        return [*bench("scheduled.py"), "--scheduled", str(s.scheduled), "--late", str(s.late),
                "--late-span-s", str(s.late_span_s), "--burst", str(s.burst), "--lead-s", str(s.lead_s),
                "--out", str(out), *env_items]  # fmt: skip
    raise ValueError(name)


REPORTS = {
    "webhooks": "webhooks.json",
    "slow": "webhooks-slow.json",
    "ingest": "ingest_memory.json",
    "api": "api_rate.json",
    "isolation": "otp_latency.json",
    "scheduled": "scheduled.json",
}


def run_step(name: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one benchmark, its output straight to the terminal; its duration, exit code and how many
    cores *other* programs used meanwhile (machine busy time minus the step's own, reaped, CPU)."""
    print(f"\n=== {name}: {' '.join(Path(a).name if a.startswith('/') else a for a in argv[1:])}", flush=True)
    children = os.times()
    busy, wall = machine_busy_s(), time.monotonic()
    proc = subprocess.Popen(argv, cwd=BENCH_DIR.parent)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"=== {name}: still running after {timeout_s:.0f}s; stopping it", file=sys.stderr)
        proc.send_signal(signal.SIGTERM)  # each benchmark cleans up on SIGTERM
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        rc = rc or -1
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    elapsed = time.monotonic() - wall
    after = os.times()
    ours = (after.children_user + after.children_system) - (children.children_user + children.children_system)
    others = max(0.0, (machine_busy_s() - busy) - ours) / max(elapsed, 1e-6)
    print(f"=== {name}: exit code {rc} after {elapsed:.0f}s; other programs used {others:.2f} cores", flush=True)
    return {
        "command": "python " + " ".join(str(Path(a).relative_to(BENCH_DIR.parent)) if a.startswith(str(BENCH_DIR))
                                        else a for a in argv[1:]),
        "exit_code": rc,
        "seconds": round(elapsed),
        "other_programs_cores": round(others, 2),
    }  # fmt: skip


# ------------------------------------------------------------------ what the reports say


def load(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def goal(issue: str, what: str, value: float | None, target: float, *, at_most: bool = False, unit: str = "",
         note: str = "", met: bool | None = None, goal_text: str = "") -> dict[str, Any]:  # fmt: skip
    """One goal of an issue: its value (None when the goal is not a number) and whether it is met."""
    if met is None and value is not None:
        met = value <= target if at_most else value >= target
    return {"issue": issue, "what": what, "value": value, "goal": target, "at_most": at_most, "unit": unit,
            "met": met, "note": note, "goal_text": goal_text}  # fmt: skip


def summarize(reports: dict[str, dict[str, Any] | None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The key numbers of every report and the issues' goals with their values."""
    key: dict[str, Any] = {}
    goals: list[dict[str, Any]] = []
    wh = reports.get("webhooks")
    if wh:
        # Each variant's median run when the step ran several interleaved rounds.
        rows = wh.get("representative") or {r["variant"]: r for r in wh["results"]}
        celeries = [r for r in rows.values() if r["variant"].startswith("celery")]
        best = max(celeries, key=lambda r: r["rate_per_s"]) if celeries else None
        key["webhooks"] = {
            "raw_per_s": _rate(rows.get("raw")),
            "herald_batch_api_per_s": _rate(rows.get("herald-sqlite")),
            "drop_per_s": _rate(rows.get("drop-sqlite")),
            "celery_best_per_s": _rate(best),
            "celery_best": best["variant"] if best else None,
            "sequential_per_s": _rate(rows.get("sequential")),
            "messages": wh["messages"],
            "drop_messages": rows["drop-sqlite"]["messages"] if "drop-sqlite" in rows else None,
            "other_programs_cores_max": max((r.get("other_programs_cores", 0) for r in wh["results"]), default=None),
            "ratios": wh["ratios"],
        }
        herald, drop = wh["ratios"].get("herald-sqlite", {}), wh["ratios"].get("drop-sqlite", {})
        n_note = f"N = {wh['messages']:,}"
        goals.append(goal("2", "Herald batch API → delivered, / raw aiohttp client", herald.get("over_raw"),
                          GOALS["herald_over_raw"], unit=X, note=n_note))  # fmt: skip
        goals.append(goal("2", "Herald batch API, / one Celery task per message (best of sweep)",
                          herald.get("over_celery"), GOALS["herald_over_celery"], unit=X, note=n_note))  # fmt: skip
        d_note = f"drop of {key['webhooks']['drop_messages'] or 0:,} ids"
        goals.append(goal("5", "drop → delivered, / raw aiohttp client", drop.get("over_raw"),
                          GOALS["drop_over_raw"], unit=X, note=d_note))  # fmt: skip
        goals.append(goal("5", "drop, / one Celery task per message (best of sweep)", drop.get("over_celery"),
                          GOALS["drop_over_celery"], unit=X, note=d_note))  # fmt: skip
    slow = reports.get("slow")
    if slow:
        rows = {r["variant"]: r for r in slow["results"]}
        drop = slow["ratios"].get("drop-sqlite", {})
        key["slow"] = {
            "receiver_delay_ms": slow["machine"]["receiver_delay_ms"],
            "raw_per_s": _rate(rows.get("raw")),
            "drop_per_s": _rate(rows.get("drop-sqlite")),
            "sequential_per_s": _rate(rows.get("sequential")),
            "drop_messages": rows["drop-sqlite"]["messages"] if "drop-sqlite" in rows else None,
            "settings": SLOW_SETTINGS,
            "ratios": slow["ratios"],
        }
        note = f"drop of {key['slow']['drop_messages'] or 0:,} ids, receiver 200 ms"
        goals.append(goal("5", "slow receiver: drop deliveries per second", _rate(rows.get("drop-sqlite")),
                          GOALS["slow_drop_per_s"], unit="/s", note=note))  # fmt: skip
        goals.append(goal("5", "slow receiver: drop / sequential loop", drop.get("over_sequential"),
                          GOALS["slow_drop_over_sequential"], unit=X, note=note))  # fmt: skip
    ingest = reports.get("ingest")
    if ingest:
        runs = ingest["results"]["runs"]
        key["ingest"] = {
            "process_alone_mb": ingest["results"]["empty_folder"]["peak_rss_mb"],
            "runs": [{k: r[k] for k in INGEST_KEYS} for r in runs],
            "flat": ingest["results"]["flat"],
        }
        g = ingest.get("goal") or {}
        goals.append(goal("5", "ingester peak RSS", g.get("peak_rss_mb"), GOALS["ingest_peak_rss_mb"], at_most=True,
                          unit=" MB", note=f"{g.get('lines', 0):,} lines", met=g.get("met")))  # fmt: skip
    api = reports.get("api")
    if api:
        res = api["results"]
        key["api"] = {
            **{f"{k}_requests_per_s": round(v["ok_per_s"], 1) for k, v in res.items()},
            "batch_size": api["parameters"]["batch_size"],
            "herald_over_empty": api["ratios"],
        }
    iso = reports.get("isolation")
    if iso:
        res = iso["results"]
        tx = res["transactional"]
        key["isolation"] = {
            "backlog": iso["parameters"]["backlog"],
            "backlog_source": iso["parameters"]["backlog_source"],
            "otp_idle_ms": _p(res["otp"]["idle"]),
            "otp_busy_ms": _p(res["otp"]["backlog"]),
            "transactional_idle_ms": _p(tx["idle"]) if tx["idle"] else None,
            "transactional_busy_ms": _p(tx["backlog"]) if tx["backlog"] else None,
            "draining_throughout": res["backlog_draining_throughout"],
            "bulk_per_s_meanwhile": res["bulk_deliveries_per_s_during_probes"],
            "intake_s": res["backlog_intake_s"],
        }
        ingesting = res.get("ingesting")
        if ingesting:
            key["isolation"].update({
                "otp_ingesting_ms": _p(res["otp"]["ingesting"]),
                "transactional_ingesting_ms": _p(tx["ingesting"]) if tx.get("ingesting") else None,
                "ingesting_bulk_per_s": ingesting["bulk_deliveries_per_s"],
            })  # fmt: skip
        n = iso["parameters"]["backlog"]
        goals.append(goal("3", "OTP p99, request → SMS provider, while a bulk backlog drains",
                          key["isolation"]["otp_busy_ms"]["p99"], GOALS["otp_p99_ms"], at_most=True, unit=" ms",
                          note=f"backlog of {n:,} from a drop, probed once the file is ingested",
                          met=iso["goal"]["met"]))  # fmt: skip
        if ingesting:
            idle_p99 = key["isolation"]["otp_idle_ms"]["p99"]
            goals.append(goal("5", "OTP p99 while a drop is still being ingested (and drains)",
                              key["isolation"]["otp_ingesting_ms"]["p99"], GOALS["otp_p99_ms"], at_most=True,
                              unit=" ms", goal_text="keep their latency (no number; 250 ms as for issue 3)",
                              note=f"drop of {n:,} ids; idle p99 {_fmt(idle_p99, ' ms')}"))  # fmt: skip
    sch = reports.get("scheduled")
    if sch:
        res, sg = sch["results"], sch["goals"]
        key["scheduled"] = {
            "n": sch["parameters"]["scheduled"],
            "herald_bytes_per_scheduled": res["memory_herald"]["bytes_per_scheduled"],
            "celery_bytes_per_scheduled": res.get("memory_celery_countdown", {}).get("bytes_per_scheduled"),
            "lateness": {k: res["lateness"].get(k) for k in ("n", "p50_s", "p99_s", "max_s", "early")},
            "burst": {k: res.get("burst", {}).get(k) for k in ("n", "received", "all_delivered_after_s", "early")},
        }
        growth = res["memory_herald"]["growth_bytes"]
        note = (f"{sch['parameters']['scheduled']:,} scheduled: Herald Redis {growth['redis']:+,} B, worker "
                f"{growth['worker_rss']:+,} B in all")  # fmt: skip
        celery = res.get("memory_celery_countdown", {}).get("bytes_per_scheduled")
        if celery:
            note += f"; Celery countdown {celery['redis']:,.0f} B Redis + {celery['worker_rss']:,.0f} B worker per task"
        goals.append(goal("4", "Redis and worker memory with the number scheduled", None, 0, goal_text="no growth",
                          note=note, met=sg["herald_no_memory_growth"]["met"]))  # fmt: skip
        goals.append(goal("4", "lateness p99, never early", res["lateness"]["p99_s"], GOALS["late_p99_s"],
                          at_most=True, unit=" s", note=f"{res['lateness']['n']:,} sends over "
                          f"{sch['parameters']['late_span_s']:g} s, {res['lateness']['early']} early",
                          met=sg["lateness_p99_le_1s_never_early"]["met"]))  # fmt: skip
        if "burst" in res:
            b = res["burst"]
            goals.append(goal("4", "time to deliver a burst all due in the same second", b["all_delivered_after_s"],
                              0, unit=" s", goal_text="all delivered, none early (issue: 100,000)",
                              note=f"{b['n']:,} sends; {b['received']:,} received, {b['early']} early",
                              met=b["received"] >= b["n"] and b["early"] == 0))  # fmt: skip
    return key, goals


def _rate(row: dict[str, Any] | None) -> float | None:
    return round(row["rate_per_s"], 1) if row else None


PHASE_LABELS = {"idle": "idle", "ingesting": "ingest", "busy": "drain"}


def _p(phase: dict[str, Any]) -> dict[str, float | None]:
    return {"p50": phase["latency"].get("p50_ms"), "p99": phase["latency"].get("p99_ms")}


# ------------------------------------------------------------------ the README table


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == X:
        # Two decimals up to 100x: a ratio next to a goal of 10x must not round onto it.
        return f"{value:.2f}{X}" if value < 100 else f"{value:,.0f}{X}"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == " ms":
        return f"{value:,.0f} ms"
    if unit == " MB":
        return f"{value:,.0f} MB"
    if unit == " s":
        return f"{value:.2f} s"
    return f"{value:g}{unit}"


def _goal_text(g: dict[str, Any]) -> str:
    if g.get("goal_text"):
        return str(g["goal_text"])
    value = f"{g['goal']:g}{g['unit']}" if g["unit"] != "/s" else f"{g['goal']:,.0f}/s"
    return ("≤ " if g["at_most"] else "≥ ") + value


def _mark(met: bool | None) -> str:
    return "met" if met else ("**missed**" if met is False else "no result")


def perf_table(suite: dict[str, Any]) -> str:
    """The README's performance section, from ``suite.json``."""
    m, key = suite["machine"], suite["key"]
    loads = [s["other_programs_cores"] for s in suite["steps"].values()]
    lines = [
        f"Measured by `{suite['command']}` on {m['date'][:10]} ({m['cpus_usable']} {X} {m['cpu_model']}, Python "
        f"{m['python']}, commit `{m['git_commit']}`): every benchmark in one run on the same machine, Herald and its "
        f"baselines side by side, so the ratios carry over between machines better than the absolute numbers. "
        f"Other programs used at most {max(loads, default=0):.2f} cores during any step. Results: "
        f"[`bench/results/suite.json`](bench/results/suite.json), [`suite.png`](bench/results/suite.png) and each "
        f"benchmark's own files in [`bench/results/suite/`](bench/results/suite/); "
        f"[`bench/README.md`](bench/README.md) describes every benchmark.",
        "",
        "| issue | what | goal | result | verdict |",
        "|---|---|---|---|---|",
    ]
    for g in suite["goals"]:
        result = f"**{_fmt(g['value'], g['unit'])}**" if g["value"] is not None else ""
        detail = "; ".join(x for x in (result, g["note"]) if x)
        lines.append(f"| {g['issue']} | {g['what']} | {_goal_text(g)} | {detail} | {_mark(g['met'])} |")
    rows = []
    if "webhooks" in key:
        w = key["webhooks"]
        rows.append(f"- Webhooks delivered per second, same receiver: raw aiohttp client {_fmt(w['raw_per_s'], '/s')}, "
                    f"Herald batch API {_fmt(w['herald_batch_api_per_s'], '/s')}, Herald drop "
                    f"{_fmt(w['drop_per_s'], '/s')}, one Celery task per message {_fmt(w['celery_best_per_s'], '/s')} "
                    f"(best: `{w['celery_best']}`), sequential loop {_fmt(w['sequential_per_s'], '/s')}.")  # fmt: skip
    if "slow" in key:
        s = key["slow"]
        settings = ", ".join(f"`{k}={v}`" for k, v in s["settings"].items())
        rows.append(f"- Receiver taking 200 ms: raw client {_fmt(s['raw_per_s'], '/s')}, Herald drop "
                    f"{_fmt(s['drop_per_s'], '/s')} (with {settings}), sequential loop "
                    f"{s['sequential_per_s']:.1f}/s.")  # fmt: skip
    if "ingest" in key:
        i = key["ingest"]
        runs = "; ".join(f"{r['lines']:,} lines: peak {r['peak_rss_mb']} MB, {r['lines_per_s']:,} lines/s"
                         for r in i["runs"])  # fmt: skip
        rows.append(f"- Ingester (`herald watch --once`): {runs}; the process alone {i['process_alone_mb']} MB.")
    if "api" in key:
        a = key["api"]
        rows.append(f"- API, accepted requests per second (one uvicorn process each): `POST /v1/events` Herald "
                    f"{a.get('herald-single_requests_per_s')} vs an empty FastAPI endpoint "
                    f"{a.get('empty-single_requests_per_s')} ({a['herald_over_empty']['single']:.2f}{X}); "
                    f"`POST /v1/events/batch` of {a['batch_size']:,} events Herald "
                    f"{a.get('herald-batch_requests_per_s')} vs {a.get('empty-batch_requests_per_s')} "
                    f"({a['herald_over_empty']['batch']:.2f}{X}).")  # fmt: skip
    if "isolation" in key:
        i = key["isolation"]
        tx = ""
        if i["transactional_idle_ms"] and i["transactional_busy_ms"]:
            tx = (f"; transactional webhooks p50/p99 {_ms(i['transactional_idle_ms'])} idle, "
                  f"{_ms(i['transactional_busy_ms'])} while it drains")  # fmt: skip
        drained = "" if i["draining_throughout"] else " (the drop had drained before the probes ended)"
        ingest = ""
        if i.get("otp_ingesting_ms"):
            ingest = f", {_ms(i['otp_ingesting_ms'])} while the file was still being ingested"
            if i.get("transactional_ingesting_ms"):
                tx += f", {_ms(i['transactional_ingesting_ms'])} while it was being ingested"
        rows.append(f"- Lane isolation, drop of {i['backlog']:,} ids (ingested in {i['intake_s']} s): OTP p50/p99 "
                    f"{_ms(i['otp_idle_ms'])} idle, {_ms(i['otp_busy_ms'])} while its backlog drains{ingest}{tx}"
                    f"{drained}.")  # fmt: skip
    if "scheduled" in key:
        sc = key["scheduled"]
        celery = sc["celery_bytes_per_scheduled"]
        per = sc["herald_bytes_per_scheduled"]
        rows.append(f"- Scheduled sends ({sc['n']:,} an hour ahead): Herald {per['redis']:+g} "
                    f"B Redis and {per['worker_rss']:+g} B worker RSS per send"
                    + (f"; Celery `countdown` {celery['redis']:,.0f} B Redis and {celery['worker_rss']:,.0f} B "
                       f"worker RSS per task" if celery else "") + ".")  # fmt: skip
    return "\n".join([*lines, "", *rows])


def _ms(p: dict[str, float | None]) -> str:
    return f"{p['p50']:,.0f}/{p['p99']:,.0f} ms" if p and p["p50"] is not None and p["p99"] is not None else "—"


def rewrite_readme(table: str, path: Path = README) -> bool:
    """Put ``table`` between the README's perf-table markers (re-read right before writing)."""
    text = path.read_text()
    pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        print(f"{path}: no {MARK_START} … {MARK_END} markers; table not written", file=sys.stderr)
        return False
    path.write_text(pattern.sub(lambda _: f"{MARK_START}\n{table}\n{MARK_END}", text, count=1))
    return True


# ------------------------------------------------------------------ the figure


def plot(suite: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = suite["key"]
    fig = plt.figure(figsize=(16, 19), layout="constrained")
    figures = fig.subfigures(2, 1, height_ratios=[1.3, 3])  # the goals' long labels stay up there
    top, bottom = figures[0], figures[1]  # type: ignore[index]
    _plot_goals(top.subplots(), suite["goals"])
    panels = list(bottom.subplots(3, 2).flat)
    _bars(panels[0], key.get("webhooks"), [("raw client", "raw_per_s", "#7f7f7f"),
          ("Herald\nbatch API", "herald_batch_api_per_s", "#1f77b4"), ("Herald drop", "drop_per_s", "#2ca02c"),
          ("Celery task\nper message", "celery_best_per_s", "#d62728"), ("sequential", "sequential_per_s", "#9467bd")],
          "webhooks delivered/s, instant receiver")  # fmt: skip
    _bars(panels[1], key.get("slow"), [("raw client", "raw_per_s", "#7f7f7f"), ("Herald drop", "drop_per_s", "#2ca02c"),
          ("sequential", "sequential_per_s", "#9467bd")], "webhooks delivered/s, receiver taking 200 ms",
          log=True)  # fmt: skip
    ingest = key.get("ingest")
    ax = panels[2]
    if ingest:
        runs = ingest["runs"]
        bars = ax.bar([f"{r['lines']:,} lines" for r in runs], [r["peak_rss_mb"] for r in runs], color="#2ca02c")
        ax.bar_label(bars, labels=[f"{r['peak_rss_mb']} MB\n{r['lines_per_s']:,} lines/s" for r in runs], fontsize=8)
        ax.axhline(GOALS["ingest_peak_rss_mb"], color="grey", linestyle="--", label="goal ≤ 150 MB")
        ax.axhline(ingest["process_alone_mb"], color="black", linestyle=":", label="the process alone")
        ax.set_ylim(0, max([GOALS["ingest_peak_rss_mb"]] + [r["peak_rss_mb"] for r in runs]) * 1.3)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title("ingester peak RSS (MB)", fontsize=10)
    ax = panels[3]
    iso = key.get("isolation")
    if iso:
        labels, values, colors = [], [], []
        for name, k, colour in (("OTP", "otp", "#d62728"), ("tx webhook", "transactional", "#1f77b4")):
            for phase in ("idle", "ingesting", "busy"):
                p = iso.get(f"{k}_{phase}_ms")
                if p:
                    for q in ("p50", "p99"):
                        labels.append(f"{name}\n{PHASE_LABELS[phase]}\n{q}")
                        values.append(p[q] or 0)
                        colors.append({"idle": "#aaaaaa", "ingesting": "#ff7f0e"}.get(phase, colour))
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(values)), labels, fontsize=6.5)
        ax.set_yscale("log")
        ax.axhline(GOALS["otp_p99_ms"], color="grey", linestyle="--", label="goal OTP p99 ≤ 250 ms while draining")
        ax.legend(fontsize=8)
        ax.set_title(
            f"latency (ms): idle, while a drop of {iso['backlog']:,} ids is ingested, while it drains", fontsize=9
        )
    ax = panels[4]
    api = key.get("api")
    if api:
        names = ["empty-single", "herald-single", "empty-batch", "herald-batch"]
        values = [api.get(f"{n}_requests_per_s") or 0 for n in names]
        bars = ax.bar(["empty\n/v1/events", "Herald\n/v1/events", f"empty\nbatch of {api['batch_size']}",
                       f"Herald\nbatch of {api['batch_size']}"], values,
                      color=["#aaaaaa", "#1f77b4", "#aaaaaa", "#1f77b4"])  # fmt: skip
        ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], fontsize=8)
        ax.set_yscale("log")
        r = api["herald_over_empty"]
        ax.set_title(f"API accepted requests/s: Herald = {r['single']:.2f}{X} (single), {r['batch']:.2f}{X} (batch) "
                     f"an empty FastAPI endpoint", fontsize=9)  # fmt: skip
    ax = panels[5]
    sch = key.get("scheduled")
    if sch:
        lat, burst = sch["lateness"], sch["burst"]
        text = [f"{sch['n']:,} scheduled an hour ahead, memory per send:",
                f"  Herald: Redis {sch['herald_bytes_per_scheduled']['redis']:+g} B, "
                f"worker {sch['herald_bytes_per_scheduled']['worker_rss']:+g} B"]  # fmt: skip
        if sch["celery_bytes_per_scheduled"]:
            c = sch["celery_bytes_per_scheduled"]
            text.append(f"  Celery countdown: Redis {c['redis']:,.0f} B, worker {c['worker_rss']:,.0f} B")
        text.append(f"lateness of {lat['n']:,} sends (goal p99 ≤ 1 s):")
        text.append(
            f"  p50 {lat['p50_s']:.2f} s, p99 {lat['p99_s']:.2f} s, max {lat['max_s']:.2f} s, {lat['early']} early"
        )
        if burst.get("n"):
            after = burst["all_delivered_after_s"]
            text.append(f"burst of {burst['n']:,} due in the same second:")
            text.append(f"  {'all delivered after ' + format(after, '.1f') + ' s' if after else 'NOT all delivered'}, "
                        f"{burst['early']} early")  # fmt: skip
        ax.text(0.0, 0.95, "\n".join(text), va="top", fontsize=8.5, family="monospace", transform=ax.transAxes)
    ax.axis("off")
    ax.set_title("scheduled sends", fontsize=10)
    m = suite["machine"]
    fig.suptitle(f"Herald benchmark suite{' (--quick sizes)' if suite['quick'] else ''} — {m['cpus_usable']} {X} "
                 f"{m['cpu_model']}, {m['date']}, commit {m['git_commit']}", fontsize=12)  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_goals(ax: Any, goals: list[dict[str, Any]]) -> None:
    """Each goal as achieved / required (log scale): right of 1 = met."""
    rows = [g for g in goals if g["value"] is not None and g["goal"]]
    labels, scores, colors, texts = [], [], [], []
    for g in rows:
        score = g["goal"] / g["value"] if g["at_most"] else g["value"] / g["goal"]
        labels.append(f"issue {g['issue']}: {g['what']}")
        scores.append(max(score, 1e-3))
        colors.append("#2ca02c" if g["met"] else "#d62728")
        texts.append(f"{_fmt(g['value'], g['unit'])} (goal {_goal_text(g)})")
    bars = ax.barh(range(len(rows)), scores, color=colors)
    ax.bar_label(bars, labels=texts, fontsize=8, padding=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1, color="black", linewidth=1)
    ax.set_xlim(min([*scores, 0.5]) / 2, max([*scores, 2]) * 8)
    ax.set_xlabel("achieved / goal (right of the line: met)")
    others = [g for g in goals if g not in rows]
    title = "the issues' goals"
    if others:
        title += " — also: " + "; ".join(f"{g['what']}: {_mark(g['met'])}" for g in others)
    ax.set_title(title, fontsize=9)


def _bars(
    ax: Any, data: dict[str, Any] | None, spec: list[tuple[str, str, str]], title: str, log: bool = False
) -> None:
    ax.set_title(title, fontsize=10)
    if not data:
        return
    shown = [(label, float(data[k]), colour) for label, k, colour in spec if data.get(k) is not None]
    bars = ax.bar([s[0] for s in shown], [s[1] for s in shown], color=[s[2] for s in shown])
    ax.bar_label(bars, labels=[f"{s[1]:,.0f}" if s[1] >= 10 else f"{s[1]:.1f}" for s in shown], fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(s[1] for s in shown) * 1.2)


# ------------------------------------------------------------------ main


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the machinery")
    parser.add_argument("--out", type=Path, default=None, help="bench/results (--quick: bench/results/quick)")
    parser.add_argument("--only", default="", help=f"run only these steps: {','.join(STEPS)}")
    parser.add_argument("--skip", default="", help="skip these steps")
    parser.add_argument("--herald-env", action="append", default=[], help="HERALD_NAME=value for every step")
    parser.add_argument("--rounds", type=int, default=3,
                        help="webhooks step: interleaved rounds of its variants; ratios use medians (3)")  # fmt: skip
    parser.add_argument("--readme", dest="readme", action="store_true", default=None,
                        help="rewrite the README table (the default for a full run of every step)")  # fmt: skip
    parser.add_argument("--no-readme", dest="readme", action="store_false")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing; rebuild suite.json/png and the table from <out>/suite")  # fmt: skip
    args = parser.parse_args()
    out = (args.out or (BENCH_DIR / "results" / ("quick" if args.quick else ""))).resolve()
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    unknown = (only | skip) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; steps are {', '.join(STEPS)}")
    steps = [s for s in STEPS if (not only or s in only) and s not in skip]
    sizes = QUICK if args.quick else FULL
    reports_dir = out / "suite"
    reports_dir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free / 1e9
    if "ingest" in steps and not args.quick and free_gb < 25 and not args.collect_only:
        print(f"warning: {free_gb:.0f} GB free in the temp folder; 10,000,000 lines need about 10 GB", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: the running step is stopped cleanly
    started = time.monotonic()
    previous = load(out / "suite.json") or {}
    step_info: dict[str, Any] = dict(previous.get("steps", {})) if args.collect_only else {}
    try:
        for name in [] if args.collect_only else steps:
            argv = step_argv(name, sizes, reports_dir, args)
            step_info[name] = run_step(name, argv, sizes.timeout_s)
            step_info[name]["report"] = f"suite/{REPORTS[name]}"
    except KeyboardInterrupt:
        print("\ninterrupted; the suite's report is not written", file=sys.stderr)
        return 130
    reports = {name: load(reports_dir / REPORTS[name]) for name in STEPS}
    for name, info in step_info.items():
        if info.get("exit_code") not in (0, None) or reports.get(name) is None:
            info["problem"] = "failed or no report; see its output above"
    key, goals = summarize({k: v for k, v in reports.items() if k in step_info or args.collect_only})
    suite = {
        "benchmark": "suite",
        "quick": args.quick,
        # Rebuilt from earlier reports, the results are still those of the machine and code measured.
        "machine": previous["machine"] if args.collect_only and previous.get("machine") else machine_info(),
        "command": "uv run python bench/suite.py" + (" --quick" if args.quick else ""),
        "argv": " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "sizes": sizes.__dict__,
        "slow_receiver_settings": SLOW_SETTINGS,
        "steps": step_info,
        "goals": goals,
        "key": key,
    }
    write_json(out / "suite.json", suite)
    plot(suite, out / "suite.png")
    table = perf_table(suite)
    (out / "perf-table.md").write_text(table + "\n")
    print("\n" + table + "\n")
    complete = set(step_info) == set(STEPS) and not any("problem" in i for i in step_info.values())
    write_readme = args.readme if args.readme is not None else (complete and not args.quick)
    if write_readme and rewrite_readme(table):
        print(f"rewrote the performance table in {README}")
    elif not write_readme:
        print(f"README left alone ({'--quick' if args.quick else 'not every step ran cleanly'}); "
              f"the table is in {out / 'perf-table.md'}")  # fmt: skip
    print(f"wrote {out / 'suite.json'} and {out / 'suite.png'} in {suite['seconds']}s")
    for g in goals:
        print(f"  issue {g['issue']}: {g['what']}: {_mark(g['met'])}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
