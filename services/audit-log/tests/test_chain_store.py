"""The chain on both stores: append, idempotence, verification, tampering, checkpoints, queries."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

from tsunagu_audit_log.chain import GENESIS, Head, Signer, row_hash
from tsunagu_audit_log.service import AuditLog
from tsunagu_audit_log.store import AuditStore, PostgresStore, Query

Events = Any  # the make_event fixture: (n, **fields) -> NewEvent


def audit_log(store: AuditStore, signer: Signer | None = None, rows: int = 1000) -> AuditLog:
    return AuditLog(store, signer or Signer.generate(), gateway_topic="tsunagu.gateway.events", checkpoint_rows=rows)


async def test_append_links_rows_and_verifies(store: AuditStore, make_event: Events) -> None:
    rows = await store.append([make_event(n) for n in range(1, 6)])
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(rows):
        assert after.prev_hash == before.hash
        assert after.hash == row_hash(before.hash, after.seq, after)
    assert await store.head() == Head(5, rows[-1].hash)
    more = await store.append([make_event(6)])
    assert more[0].seq == 6 and more[0].prev_hash == rows[-1].hash
    report = await store.verify(Signer.generate())
    assert report.ok and report.rows_checked == 6 and report.first_broken is None


async def test_duplicate_delivery_is_not_a_second_row(store: AuditStore, make_event: Events) -> None:
    await store.append([make_event(1), make_event(2)])
    again = await store.append([make_event(2), make_event(3), make_event(3)])
    assert [(r.seq, r.event_id) for r in again] == [(3, "ev-3")]
    assert await store.append([make_event(1)]) == []
    assert (await store.head()).seq == 3
    assert (await store.verify(Signer.generate())).ok


async def test_concurrent_appends_never_fork_the_chain(store: AuditStore, make_event: Events) -> None:
    batches = [[make_event(n * 10 + i) for i in range(5)] for n in range(8)]
    await asyncio.gather(*(store.append(batch) for batch in batches))
    report = await store.verify(Signer.generate())
    assert report.ok and report.rows_checked == 40


async def test_altered_details_are_reported_at_their_seq(store: AuditStore, tamper: Any, make_event: Events) -> None:
    await store.append([make_event(n) for n in range(1, 8)])
    await tamper.update_details(4, b'{"n":"forged"}')
    report = await store.verify(Signer.generate())
    assert not report.ok
    assert report.first_broken is not None and report.first_broken.seq == 4
    assert "content" in report.first_broken.reason


async def test_a_removed_row_is_reported(store: AuditStore, tamper: Any, make_event: Events) -> None:
    await store.append([make_event(n) for n in range(1, 8)])
    await tamper.delete(3)
    report = await store.verify(Signer.generate())
    assert report.first_broken is not None and report.first_broken.seq == 3
    assert "missing" in report.first_broken.reason


async def test_a_removed_last_row_is_reported(store: AuditStore, tamper: Any, make_event: Events) -> None:
    await store.append([make_event(n) for n in range(1, 5)])
    await tamper.delete(4)
    report = await store.verify(Signer.generate())
    assert report.first_broken is not None and report.first_broken.seq == 4


async def test_a_row_inserted_past_the_head_is_reported(store: AuditStore, tamper: Any, make_event: Events) -> None:
    rows = await store.append([make_event(n) for n in range(1, 4)])
    forged = dataclasses.replace(rows[-1], seq=4, event_id="forged", prev_hash=rows[-1].hash)
    await tamper.insert_after_head(dataclasses.replace(forged, hash=row_hash(rows[-1].hash, 4, forged)))
    report = await store.verify(Signer.generate())
    assert report.first_broken is not None and report.first_broken.seq == 4
    assert "beyond" in report.first_broken.reason


async def test_rewrite_with_recomputed_hashes_is_caught_by_the_signed_checkpoint(
    store: AuditStore, tamper: Any, make_event: Events
) -> None:
    signer = Signer.generate()
    audit = audit_log(store, signer, rows=5)
    await store.append([make_event(n) for n in range(1, 6)])
    first = await audit.checkpoint()
    assert first is not None and first.seq == 5
    await store.append([make_event(n) for n in range(6, 11)])
    second = await audit.checkpoint()
    assert second is not None and second.seq == 10
    await store.append([make_event(n) for n in range(11, 13)])
    assert (await store.verify(signer)).ok
    await tamper.rewrite(7, b'{"n":"rewritten"}')
    # Every hash links again: only the checkpoint signed before the rewrite tells.
    report = await store.verify(signer)
    assert not report.ok
    assert report.first_broken is not None and report.first_broken.seq == 10
    assert "signed checkpoint" in report.first_broken.reason and "after seq 5" in report.first_broken.reason
    # ... and no new checkpoint vouches for the rewritten chain.
    await store.append([make_event(n) for n in range(13, 20)])
    assert await audit.checkpoint(force=True) is None


async def test_forged_or_foreign_checkpoints_are_not_trusted(store: AuditStore, make_event: Events) -> None:
    signer = Signer.generate()
    await store.append([make_event(n) for n in range(1, 4)])
    genuine = await audit_log(store, signer).checkpoint(force=True)
    assert genuine is not None
    head = await store.head()
    await store.add_checkpoint(Signer.generate().sign(Head(2, head.hash), 1))
    report = await store.verify(signer)
    assert report.first_broken is not None and report.first_broken.seq == 2
    assert "untrusted key" in report.first_broken.reason
    # The same foreign key, once trusted (a rotated key), does not save a checkpoint whose hash lies.
    assert (
        await store.verify(Signer(signer.private_key, [c.public_key for c in await store.checkpoints()]))
    ).ok is False


async def test_a_checkpoint_signature_over_other_values_is_invalid(store: AuditStore, make_event: Events) -> None:
    signer = Signer.generate()
    await store.append([make_event(n) for n in range(1, 4)])
    good = signer.sign(await store.head(), 1000)
    await store.add_checkpoint(dataclasses.replace(good, created_ms=2000))
    report = await store.verify(signer)
    assert report.first_broken is not None and report.first_broken.reason == "checkpoint signature is invalid"


async def test_query_filters_and_paginates_both_ways(store: AuditStore, make_event: Events) -> None:
    await store.append(
        [
            make_event(n, subject="bob" if n % 2 else "carol", action="auth.login" if n % 3 else "auth.revoke")
            for n in range(1, 21)
        ]
    )
    bob = await store.query(Query(subject="bob", limit=100))
    assert [r.seq for r in bob] == [19, 17, 15, 13, 11, 9, 7, 5, 3, 1]
    page1 = await store.query(Query(subject="bob", limit=4))
    page2 = await store.query(Query(subject="bob", limit=4, after_seq=page1[-1].seq))
    assert [r.seq for r in page1 + page2] == [19, 17, 15, 13, 11, 9, 7, 5]
    oldest = await store.query(Query(action="auth.revoke", limit=3, newest_first=False))
    assert [r.seq for r in oldest] == [3, 6, 9]
    nxt = await store.query(Query(action="auth.revoke", limit=3, newest_first=False, after_seq=9))
    assert [r.seq for r in nxt] == [12, 15, 18]
    window = await store.query(
        Query(since_ms=1_700_000_000_005, until_ms=1_700_000_000_009, newest_first=False, limit=100)
    )
    assert [r.seq for r in window] == [5, 6, 7, 8]
    both = await store.query(Query(subject="carol", action="auth.revoke", actor="alice", limit=100))
    assert [r.seq for r in both] == [18, 12, 6]
    assert await store.query(Query(actor="nobody")) == []


async def test_a_removed_chain_head_is_reported_not_a_crash(pg_store: PostgresStore, make_event: Events) -> None:
    await pg_store.append([make_event(1)])
    await pg_store.database.pool.execute(f"DELETE FROM {pg_store.schema}.audit_head")
    report = await pg_store.verify(Signer.generate())
    assert not report.ok and report.first_broken is not None and "head" in report.first_broken.reason
