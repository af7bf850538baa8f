"""Keeping the garbage collector off what a long-running process loaded at start-up.

A Herald process holds hundreds of thousands of long-lived objects (Celery, SQLAlchemy, FastAPI,
pydantic and their modules, the engine, the pools) before it does any work. Each delivery, request
or chunk then allocates short-lived containers, which trigger collections; every so often a full
one walks the whole heap. Frozen, the start-up objects are skipped by every collection; measured
on the 2-core machine, a worker's send path went from ~175 to ~125 µs of CPU per webhook and
the ingester's collector time from 13% to 2% of its CPU.
"""

from __future__ import annotations

import gc


def freeze_loaded() -> None:
    """Exempt every object alive now from later collections (``gc.freeze``).

    Call once, when a process is set up and about to start its work loop. What it frees later is
    still freed by reference counting; only cycles among frozen objects are never collected,
    so the garbage present now is collected first.
    """
    gc.collect()
    gc.freeze()
