"""Ids: prefixed ULIDs, made one at a time or in blocks, all distinct and of one format."""

from __future__ import annotations

import re
from collections import Counter

from herald.store.ids import IdSource, new_id, new_ids

ULID = re.compile(r"[0-9ABCDEFGHJKMNPQRSTVWXYZ]{26}")


def test_every_way_of_making_ids_gives_the_same_format() -> None:
    source = IdSource()
    made = [new_id("dlv"), *new_ids("dlv", 3), *(source.take("dlv") for _ in range(IdSource.BLOCK + 5))]
    assert all(i.startswith("dlv_") and ULID.fullmatch(i.removeprefix("dlv_")) for i in made)
    assert len(set(made)) == len(made)


def test_an_id_source_keeps_prefixes_apart_and_refills() -> None:
    source = IdSource()
    events = [source.take("evt") for _ in range(2 * IdSource.BLOCK + 1)]
    deliveries = [source.take("dlv") for _ in range(3)]
    assert all(i.startswith("evt_") for i in events) and all(i.startswith("dlv_") for i in deliveries)
    assert len(set(events)) == len(events)
    # Blocks are handed out in the order they were made: the time part never goes back.
    assert [i[4:14] for i in events] == sorted(i[4:14] for i in events)


def test_the_random_part_of_block_made_ids_uses_the_whole_alphabet_evenly() -> None:
    # 16,000 random characters: each of the 32 is expected 500 times (standard deviation ~22);
    # a table that favoured some characters (fewer random bits than the ULID's 80) would show.
    randoms = "".join(i[-16:] for i in new_ids("dlv", 1_000))
    counts = Counter(randoms)
    assert set(counts) == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert all(350 < n < 650 for n in counts.values()), counts
