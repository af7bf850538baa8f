"""Adaptive batch sizes: one id when idle, large batches under load."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from herald.dispatch.batching import chunk_size, chunks


def test_idle_sends_one_at_a_time() -> None:
    assert chunks(["a"], target_tasks=8, max_batch=200) == [["a"]]


def test_load_makes_large_batches() -> None:
    assert chunk_size(2000, target_tasks=8, max_batch=200) == 200
    assert chunk_size(80, target_tasks=8, max_batch=200) == 10


@given(n=st.integers(0, 5000), target=st.integers(1, 64), max_batch=st.integers(1, 500))
def test_chunks_cover_every_id_once_within_bounds(n: int, target: int, max_batch: int) -> None:
    ids = [str(i) for i in range(n)]
    parts = chunks(ids, target_tasks=target, max_batch=max_batch)
    assert [i for part in parts for i in part] == ids
    assert all(1 <= len(part) <= max_batch for part in parts)
