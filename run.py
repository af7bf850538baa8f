#!/usr/bin/env python3
"""Quickstart bootstrap: needs only Python 3.11+.

    python3 run.py up        # Herald with embedded defaults (SQLite + embedded Redis) in ./herald-data
    python3 run.py test      # the test suite (extra arguments go to pytest)
    python3 run.py <cmd>     # any other `herald` command, e.g. `tenants create acme`

Installs uv into ./.tools if it is not on PATH, then `uv run --frozen` builds .venv from the
committed uv.lock before running anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
UV_VERSION = "0.13.9"


def find_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    tools = ROOT / ".tools"
    uv = tools / "bin" / "uv"
    if not uv.exists():
        print(f"run.py: installing uv {UV_VERSION} into {tools}", file=sys.stderr)
        venv.create(tools, with_pip=True)
        subprocess.check_call([str(tools / "bin" / "python"), "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}"])
    return str(uv)


def main() -> None:
    if sys.version_info < (3, 11):
        sys.exit("run.py: Herald needs Python 3.11 or newer")
    args = sys.argv[1:] or ["up"]
    uv = find_uv()
    # Every Herald part and every e2e test is a fresh interpreter: without bytecode caches each
    # one re-parses Celery, SQLAlchemy and FastAPI from source (about 4 s of CPU a start here).
    # So uv compiles what it installs, and Python may cache Herald's own modules.
    os.environ.setdefault("UV_COMPILE_BYTECODE", "1")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if args[0] == "test":
        os.chdir(ROOT)  # pytest finds its configuration and tests from the project root
        command = [uv, "run", "--frozen", "--project", str(ROOT), "pytest", *args[1:]]
    else:
        command = [uv, "run", "--frozen", "--project", str(ROOT), "herald", *args]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
