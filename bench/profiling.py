"""Optional py-spy sampling of Herald's processes while a benchmark variant runs (``--profile``).

``webhooks.py`` uses it for the batch-API variant, ``drop.py`` for the drop; each process gets a
collapsed ("raw") profile and a summary: self time by package, the hottest functions, and the
inclusive time of Herald's own functions.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import PYTHON, Run


def start_profilers(run: Run, names: list[str]) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """py-spy samples each Herald process (worker with its pool children) while the variant runs."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print("  --profile: py-spy not found (uv pip install py-spy); running without profiles", file=sys.stderr)
        return []
    out = run.args.out / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        proc = run.procs.running[name]
        path = out / f"{name}-{run.args.profile}.txt"
        spy_name = f"py-spy-{name}"
        child = run.procs.start(
            spy_name,
            [
                spy,
                "record",
                "--pid",
                str(proc.pid),
                "--subprocesses",
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                *(["--idle"] if run.args.profile == "wall" else []),
                "-o",
                str(path),
            ],
        )
        started.append((spy_name, child, path))
    time.sleep(1.0)  # py-spy attaches asynchronously
    return started


def stop_profilers(run: Run, profilers: list[tuple[str, subprocess.Popen[bytes], Path]]) -> dict[str, Any]:
    summaries: dict[str, Any] = {}
    for spy_name, _child, path in profilers:
        run.procs.stop(spy_name, sig=signal.SIGINT, grace_s=20)
        if path.exists():
            summary = summarize_profile(path)
            summary_path = path.with_suffix(".summary.txt")
            summary_path.write_text(summary["text"])
            summaries[spy_name.removeprefix("py-spy-")] = {
                "raw": str(path),
                "summary": str(summary_path),
                "samples": summary["samples"],
            }
    return summaries


def summarize_profile(path: Path, top: int = 25, rate_hz: int = 100) -> dict[str, Any]:
    """Where the CPU went, from py-spy's collapsed ("raw") output: self time by package, the
    hottest functions, and inclusive time of Herald's own functions (what each step costs)."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            own[frames[-1]] += count
            packages[_package(frames[-1])] += count
        for frame in set(frames):
            if "(herald/" in frame:
                inclusive[frame] += count

    def pct(c: int) -> str:
        return f"{100 * c / max(total, 1):6.1f} {c / rate_hz:7.2f}"

    lines = [f"{path.name}: {total} samples at {rate_hz} Hz = {total / rate_hz:.1f} thread-seconds", ""]
    lines += ["self %  seconds  package"] + [f"{pct(c)}   {p}" for p, c in packages.most_common(12)]
    lines += ["", "self %  seconds  function"] + [f"{pct(c)}   {f}" for f, c in own.most_common(top)]
    lines += ["", "incl %  seconds  Herald function (including what it calls)"]
    lines += [f"{pct(c)}   {f}" for f, c in inclusive.most_common(top)]
    return {"samples": total, "text": "\n".join(lines) + "\n"}


def _frame(frame: str) -> str:
    """``func (…/site-packages/pkg/mod.py:12)`` → ``func (pkg/mod.py)``."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    func, path = match.groups()
    path = re.sub(r"^.*?(site-packages/|/src/|/lib/python3\.\d+/)", "", path)
    return f"{func} ({path})"


def _package(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1].rstrip(")")
    return path.split("/", 1)[0] if "/" in path else path
