"""How claimed ids are cut into Celery messages: one id when idle, hundreds under load."""

from __future__ import annotations

import math
from collections.abc import Sequence


def chunk_size(claimed: int, *, target_tasks: int, max_batch: int) -> int:
    """Spread ``claimed`` ids over about ``target_tasks`` messages, each at most ``max_batch``."""
    if claimed <= 0:
        return 1
    return max(1, min(max_batch, math.ceil(claimed / target_tasks)))


def chunks(ids: Sequence[str], *, target_tasks: int, max_batch: int) -> list[list[str]]:
    size = chunk_size(len(ids), target_tasks=target_tasks, max_batch=max_batch)
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]
