"""Compaction from a replica whose copy of a document is stale loses nothing (two replicas around a rebalance)."""

from __future__ import annotations

from pycrdt import Doc, Text
from tsunagu_collab.service import doc_from
from tsunagu_collab.store import MemoryStore


async def test_a_stale_snapshot_is_merged_into_the_stored_one_not_written_over_it() -> None:
    store = MemoryStore()
    source: Doc = Doc()
    text = source.get("text", type=Text)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for word in ("one ", "two ", "three "):
        text += word
    first = await store.append("d", updates[0])
    stale = doc_from([updates[0]]).get_update()  # a replica that saw only the first update
    await store.append("d", updates[1])
    last = await store.append("d", updates[2])
    await store.compact("d", source.get_update(), last)  # the current owner compacts everything
    await store.compact("d", stale, first)  # then the stale replica evicts its copy
    stored = await store.load("d")
    assert stored.updates == []
    assert str(doc_from([stored.snapshot]).get("text", type=Text)) == "one two three "
