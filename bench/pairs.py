"""Before/after pairs: the drop of 100,000 ids against the raw client, alternating two versions of
Herald on one machine, to tell a change of a few percent from the machine's drift.

    uv run python bench/pairs.py --old-src ../old/src --pairs 6 --out bench/results/DIR
    uv run python bench/pairs.py --new-env HERALD_DISPATCH__MAX_BATCH=400 --pairs 5 --out DIR

Each pair runs ``webhooks.py --private-redis --variants raw,drop`` once per side, the raw client
and the drop side by side in each run. ``PYTHONPATH`` picks each side's source tree (a worktree
of an older commit, say; this checkout's ``src`` by default) and ``--old-env``/``--new-env`` add
Herald settings. Odd pairs run the old side first, even pairs the new side first, so neither
always gets the machine's first minute.

The same code's rate drifts by 10-30% between runs minutes apart, and its CPU per delivery by
about 10%: only runs back to back compare. Writes each run's own report
(``<out>/<side>-<n>.json`` and ``.png``), then ``pairs.json`` (every run, the medians, the
change of Herald's CPU within each pair, the pairs each side won), ``pairs.txt`` and
``pairs.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import BENCH_DIR, PYTHON, command_line, machine_info, write_json

SIDES = ("old", "new")
DROP = "drop-sqlite"


def run_side(args: argparse.Namespace, side: str, n: int) -> dict[str, Any]:
    """One ``webhooks.py`` run of ``side``; its raw and drop results."""
    src: Path = getattr(args, f"{side}_src")
    command = [
        PYTHON, str(BENCH_DIR / "webhooks.py"), "--private-redis", "--variants", "raw,drop",
        "--messages", str(args.messages), "--drop-messages", str(args.messages),
        "--report-name", f"{side}-{n}", "--out", str(args.out),
    ]  # fmt: skip
    for item in getattr(args, f"{side}_env"):
        command += ["--herald-env", item]
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    settings = " ".join(getattr(args, f"{side}_env"))
    print(f"- pair {n}, {side} ({src}{' ' + settings if settings else ''}) …", flush=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((args.out / f"{side}-{n}.json").read_text())
    found = {r["variant"]: r for r in report["results"] if r.get("variant") in ("raw", DROP)}
    raw, drop = found["raw"], found[DROP]
    row = {
        "side": side,
        "pair": n,
        "raw_per_s": raw["rate_per_s"],
        "drop_per_s": drop["rate_per_s"],
        "over_raw": drop["rate_per_s"] / raw["rate_per_s"],
        "herald_cpu_s": drop["cpu_s"],
        "cpu_s_by_process": drop.get("cpu_s_by_process", {}),
        "receiver_cpu_s": drop.get("receiver_cpu_s"),
    }
    print(f"  raw {row['raw_per_s']:,.0f}/s, drop {row['drop_per_s']:,.0f}/s, {row['over_raw']:.3f}x; "
          f"Herald CPU {row['herald_cpu_s']:.2f} s", flush=True)  # fmt: skip
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {side: {r["pair"]: r for r in rows if r["side"] == side} for side in SIDES}
    pairs = sorted(set(by["old"]) & set(by["new"]))
    cpu_change = [by["new"][p]["herald_cpu_s"] / by["old"][p]["herald_cpu_s"] - 1 for p in pairs]
    return {
        "median_over_raw": {s: statistics.median(r["over_raw"] for r in by[s].values()) for s in SIDES if by[s]},
        "median_herald_cpu_s": {
            s: statistics.median(r["herald_cpu_s"] for r in by[s].values()) for s in SIDES if by[s]
        },
        "herald_cpu_change_per_pair": cpu_change,
        "median_herald_cpu_change": statistics.median(cpu_change) if cpu_change else None,
        "pairs_new_won": sum(by["new"][p]["over_raw"] > by["old"][p]["over_raw"] for p in pairs),
        "pairs": len(pairs),
    }


def text(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        f"{r['side']} {r['pair']}: raw {r['raw_per_s']:6.0f}/s drop {r['drop_per_s']:6.0f}/s "
        f"{r['over_raw']:.3f}x Herald CPU {r['herald_cpu_s']:.2f} s {r['cpu_s_by_process']}"
        for r in rows
    ]
    medians, cpu = summary["median_over_raw"], summary["median_herald_cpu_s"]
    lines += [f"median drop / raw: {s} {medians[s]:.3f}x, Herald CPU {cpu[s]:.2f} s" for s in medians]
    if summary["pairs"]:
        changes = ", ".join(f"{c * 100:+.1f}%" for c in summary["herald_cpu_change_per_pair"])
        median = summary["median_herald_cpu_change"] * 100
        lines.append(f"Herald CPU, new against old in each pair: {changes}; median {median:+.1f}%")
        lines.append(f"pairs where new had the higher drop / raw: {summary['pairs_new_won']} of {summary['pairs']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ratio, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    for side, marker in zip(SIDES, ("o", "s"), strict=True):
        mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["pair"])
        ratio.plot([r["pair"] for r in mine], [r["over_raw"] for r in mine], marker=marker, label=side)
        cpu.plot([r["pair"] for r in mine], [r["herald_cpu_s"] for r in mine], marker=marker, label=side)
    ratio.axhline(0.7, color="grey", linestyle="--", linewidth=1, label="goal 0.7x")
    ratio.set(title="drop / raw client, per run", xlabel="pair", ylabel="ratio")
    cpu.set(title="Herald's CPU for the drop, per run", xlabel="pair", ylabel="CPU-seconds")
    for axis in (ratio, cpu):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = BENCH_DIR.parent / "src"
    parser.add_argument("--old-src", type=Path, default=here, help="the old side's src/ (default: this checkout's)")
    parser.add_argument("--new-src", type=Path, default=here, help="the new side's src/ (default: this checkout's)")
    parser.add_argument("--old-env", action="append", default=[], metavar="HERALD_X=V", help="old side's setting")
    parser.add_argument("--new-env", action="append", default=[], metavar="HERALD_X=V", help="new side's setting")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--messages", type=int, default=100_000, help="raw client requests and drop ids per run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for side in SIDES:
        if not (getattr(args, f"{side}_src") / "herald").is_dir():
            parser.error(f"--{side}-src: no herald package in {getattr(args, f'{side}_src')}")
    if args.old_src.resolve() == args.new_src.resolve() and args.old_env == args.new_env:
        parser.error("the two sides are the same: give --old-src/--new-src or --old-env/--new-env")
    args.out = args.out.resolve()
    rows: list[dict[str, Any]] = []
    for n in range(1, args.pairs + 1):
        for side in SIDES if n % 2 else SIDES[::-1]:
            rows.append(run_side(args, side, n))
    summary = summarize(rows)
    report = {
        "benchmark": "pairs",
        "machine": machine_info(),
        "command": command_line(),
        "sides": {
            s: {"src": str(getattr(args, f"{s}_src").resolve()), "env": getattr(args, f"{s}_env")} for s in SIDES
        },
        "messages": args.messages,
        "runs": rows,
        "summary": summary,
    }
    write_json(args.out / "pairs.json", report)
    (args.out / "pairs.txt").write_text(text(rows, summary))
    plot(rows, args.out / "pairs.png")
    print(text(rows, summary), end="")
    print(f"wrote {args.out / 'pairs.json'}, pairs.txt and pairs.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
