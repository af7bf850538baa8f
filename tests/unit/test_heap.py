"""``heap.freeze_loaded``: start-up objects leave the collector's rounds; garbage does not stay.

Each case runs in a fresh interpreter: a frozen object is never collected again, and the test
process must not keep what it freezes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_objects_alive_at_the_call_are_frozen_and_later_ones_are_not() -> None:
    out = run(
        """
        import gc
        from herald import heap
        import herald.worker.delivery  # the worker's imports: Celery, SQLAlchemy, aiohttp
        heap.freeze_loaded()
        frozen = gc.get_freeze_count()
        after = [["made later"]]
        print(frozen, gc.is_tracked(after), any(o is after for o in gc.get_objects()))
        """
    )
    frozen, tracked, visible = out.split()
    assert int(frozen) > 10_000  # modules, classes and functions of everything imported
    assert tracked == "True" and visible == "True"  # new objects are still collected as usual


def test_garbage_cycles_present_at_the_call_are_collected_not_frozen() -> None:
    out = run(
        """
        import gc, weakref
        from herald import heap
        class Node:
            pass
        gc.disable()  # keep the cycle alive until freeze_loaded runs
        a, b = Node(), Node()
        a.other, b.other = b, a
        probe = weakref.ref(a)
        del a, b
        heap.freeze_loaded()
        print(probe() is None)
        """
    )
    assert out == "True"


BATCHES = """
    import gc
    from herald import heap
    collections = []
    def work() -> None:
        for _ in range(10):  # ten batches, each holding 20,000 containers alive, then letting go
            held = [[i] for i in range(20_000)]
            del held
    if {freeze}:
        heap.freeze_loaded()
    gc.callbacks.append(lambda phase, info: collections.append(info) if phase == "stop" else None)
    work()
    print(len(collections))
"""


def test_a_batch_worth_of_short_lived_objects_triggers_no_collection_once_frozen() -> None:
    assert int(run(BATCHES.format(freeze=False))) > 100  # CPython's default: one per 700 allocations
    assert int(run(BATCHES.format(freeze=True))) == 0


def test_garbage_cycles_made_later_are_still_collected() -> None:
    out = run(
        """
        import gc, weakref
        from herald import heap
        heap.freeze_loaded()
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        probe = weakref.ref(a)
        del a, b
        kept = [[i] for i in range(heap.YOUNG_THRESHOLD + 1_000)]  # allocations outgrow frees
        print(probe() is None, len(kept))
        """
    )
    assert out.split()[0] == "True"
