"""What every Broker engine promises (memory and Redis run the same tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from tsunagu_core.broker import Broker, ClientInfo, PublishOptions, PublishRequest, StreamPosition
from tsunagu_core.testing import Recorder, eventually

KEEP = PublishOptions(history_size=100, history_ttl=60)


def channel() -> str:
    return f"chat:{uuid.uuid4().hex[:8]}"


def recorder_of(broker: Broker) -> Recorder:
    assert isinstance(broker.handler, Recorder)
    return broker.handler


async def test_offsets_increase_within_one_epoch(broker: Broker) -> None:
    ch = channel()
    results = [await broker.publish(ch, f"m{i}".encode(), KEEP) for i in range(5)]
    assert [r.offset for r in results] == [1, 2, 3, 4, 5]
    assert len({r.epoch for r in results}) == 1 and results[0].epoch


async def test_history_since_limit_and_reverse(broker: Broker) -> None:
    ch = channel()
    for i in range(1, 8):
        await broker.publish(ch, f"m{i}".encode(), KEEP)
    everything = await broker.history(ch)
    assert [p.data for p in everything.publications] == [f"m{i}".encode() for i in range(1, 8)]
    epoch = everything.position.epoch
    assert everything.position == StreamPosition(7, epoch)

    since = await broker.history(ch, since=StreamPosition(4, epoch))
    assert [p.offset for p in since.publications] == [5, 6, 7]
    limited = await broker.history(ch, since=StreamPosition(2, epoch), limit=2)
    assert [p.offset for p in limited.publications] == [3, 4]
    newest = await broker.history(ch, limit=3, reverse=True)
    assert [p.offset for p in newest.publications] == [7, 6, 5]
    before = await broker.history(ch, since=StreamPosition(3, epoch), reverse=True)
    assert [p.offset for p in before.publications] == [2, 1]
    position_only = await broker.history(ch, limit=0)
    assert position_only.publications == [] and position_only.position.offset == 7


async def test_since_from_another_epoch_reads_from_the_start(broker: Broker) -> None:
    ch = channel()
    for i in range(3):
        await broker.publish(ch, f"m{i}".encode(), KEEP)
    result = await broker.history(ch, since=StreamPosition(2, "not-this-epoch"))
    assert [p.offset for p in result.publications] == [1, 2, 3]
    assert result.position.epoch != "not-this-epoch"


async def test_history_is_bounded_by_size(broker: Broker) -> None:
    ch = channel()
    for i in range(10):
        await broker.publish(ch, f"m{i}".encode(), PublishOptions(history_size=4, history_ttl=60))
    result = await broker.history(ch)
    assert [p.offset for p in result.publications] == [7, 8, 9, 10]
    assert result.position.offset == 10


async def test_history_expires_but_position_survives(broker: Broker) -> None:
    ch = channel()
    options = PublishOptions(history_size=10, history_ttl=0.3, meta_ttl=30)
    first = await broker.publish(ch, b"a", options)
    await broker.publish(ch, b"b", options)
    await asyncio.sleep(0.6)
    result = await broker.history(ch)
    assert result.publications == []
    # Same epoch and top offset: a client holding offset 1 learns it missed offset 2 for good.
    assert result.position == StreamPosition(2, first.epoch)


async def test_lost_stream_position_starts_a_new_epoch(broker: Broker) -> None:
    ch = channel()
    options = PublishOptions(history_size=10, history_ttl=0.2, meta_ttl=0.3)
    old = await broker.publish(ch, b"a", options)
    await asyncio.sleep(0.6)
    new = await broker.publish(ch, b"b", options)
    assert new.offset == 1 and new.epoch != old.epoch


async def test_idempotency_key_applies_a_publish_once(broker: Broker) -> None:
    ch = channel()
    await broker.subscribe(ch)
    options = PublishOptions(history_size=10, history_ttl=60, idempotency_key="order-42")
    first = await broker.publish(ch, b"pay", options)
    again = await broker.publish(ch, b"pay", options)
    assert (again.offset, again.epoch, again.duplicate) == (first.offset, first.epoch, True)
    assert not first.duplicate
    other = await broker.publish(ch, b"pay", PublishOptions(history_size=10, idempotency_key="order-43"))
    assert other.offset == first.offset + 1
    assert [p.offset for p in (await broker.history(ch)).publications] == [1, 2]
    recorder = recorder_of(broker)
    await eventually(lambda: len(recorder.publications) == 2)
    await asyncio.sleep(0.05)
    assert len(recorder.publications) == 2


async def test_subscribers_get_publications_with_offset_info_and_tags(broker: Broker) -> None:
    ch, quiet = channel(), channel()
    await broker.subscribe(ch)
    info = ClientInfo(user="ann", client="c1", conn_info=b'{"name":"Ann"}')
    await broker.publish(quiet, b"nobody listens", KEEP)
    result = await broker.publish(ch, b"hello", PublishOptions(history_size=10, info=info, tags={"k": "v"}))
    recorder = recorder_of(broker)
    await eventually(lambda: len(recorder.publications) == 1)
    got_channel, publication = recorder.publications[0]
    assert got_channel == ch
    assert (publication.data, publication.offset, publication.epoch) == (b"hello", 1, result.epoch)
    assert publication.info == info and dict(publication.tags) == {"k": "v"}
    assert publication.time_ms > 0


async def test_publish_without_history_is_delivered_without_offset(broker: Broker) -> None:
    ch = channel()
    await broker.subscribe(ch)
    result = await broker.publish(ch, b"ephemeral")
    assert result.offset == 0
    recorder = recorder_of(broker)
    await eventually(lambda: len(recorder.publications) == 1)
    assert (await broker.history(ch)).publications == []


async def test_unsubscribed_channel_is_not_delivered(broker: Broker) -> None:
    ch = channel()
    await broker.subscribe(ch)
    await broker.unsubscribe(ch)
    await broker.publish(ch, b"x", KEEP)
    await asyncio.sleep(0.1)
    assert recorder_of(broker).publications == []


async def test_remove_history(broker: Broker) -> None:
    ch = channel()
    await broker.publish(ch, b"x", KEEP)
    await broker.remove_history(ch)
    assert (await broker.history(ch)).publications == []


async def test_presence_add_list_stats_remove_and_expire(broker: Broker) -> None:
    ch = channel()
    ann = ClientInfo(user="ann", client="c1")
    await broker.add_presence(ch, "c1", ann, ttl=30)
    await broker.add_presence(ch, "c2", ClientInfo(user="ann", client="c2"), ttl=30)
    await broker.add_presence(ch, "c3", ClientInfo(user="bob", client="c3"), ttl=0.3)
    present = await broker.presence(ch)
    assert set(present) == {"c1", "c2", "c3"} and present["c1"] == ann
    stats = await broker.presence_stats(ch)
    assert (stats.num_clients, stats.num_users) == (3, 2)
    await broker.remove_presence(ch, "c2")
    await asyncio.sleep(0.6)
    assert set(await broker.presence(ch)) == {"c1"}


async def test_join_and_leave_reach_subscribers(broker: Broker) -> None:
    ch = channel()
    await broker.subscribe(ch)
    info = ClientInfo(user="ann", client="c1")
    await broker.publish_presence(ch, True, info)
    await broker.publish_presence(ch, False, info)
    recorder = recorder_of(broker)
    await eventually(lambda: len(recorder.presence) == 2)
    assert recorder.presence == [(ch, True, info), (ch, False, info)]


async def test_concurrent_publishes_each_get_one_offset_and_reach_history(broker: Broker) -> None:
    """Hundreds of publishes in flight at once (the Redis engine pipelines them) lose and double nothing;
    one failing publish (idempotent duplicate) does not disturb the others in its batch."""
    ch = channel()
    options = PublishOptions(history_size=1000, history_ttl=60, idempotency_ttl=60)
    keyed = dataclasses.replace(options, idempotency_key="k")
    first = await broker.publish(ch, b'"key"', keyed)
    results = await asyncio.gather(
        *(broker.publish(ch, f'{{"n":{n}}}'.encode(), options) for n in range(300)),
        broker.publish(ch, b'"key"', keyed),
    )
    *fresh, again = results
    assert again.duplicate and again.offset == first.offset
    assert sorted(r.offset for r in fresh) == list(range(2, 302))
    history = await broker.history(ch, limit=1000)
    assert len(history.publications) == 301
    assert {p.data for p in history.publications[1:]} == {f'{{"n":{n}}}'.encode() for n in range(300)}


async def test_publish_many_keeps_per_channel_order_offsets_and_idempotency(broker: Broker) -> None:
    a, b, quiet = channel(), channel(), channel()
    await broker.subscribe(a)
    await broker.subscribe(b)
    await broker.publish(a, b"before", KEEP)
    once = dataclasses.replace(KEEP, idempotency_key="k1")
    requests = [PublishRequest(a if i % 2 else b, f"m{i}".encode(), KEEP) for i in range(600)]
    requests += [PublishRequest(quiet, b"once", once), PublishRequest(quiet, b"once", once)]
    requests.append(PublishRequest(a, b"ephemeral"))
    results = await broker.publish_many(requests)
    assert len(results) == len(requests)
    assert [r.offset for r in results[1:600:2]] == list(range(2, 302)), "offsets of one channel skip or repeat"
    assert [r.offset for r in results[0:600:2]] == list(range(1, 301))
    assert results[600].offset == results[601].offset == 1 and results[601].duplicate and not results[600].duplicate
    assert results[602].offset == 0
    history = await broker.history(a, limit=-1)
    assert history.position.offset == 301 and history.position.epoch == results[1].epoch
    assert [p.data for p in history.publications][-3:] == [b"m595", b"m597", b"m599"]
    recorder = recorder_of(broker)
    await eventually(lambda: len(recorder.publications) == 1 + 600 + 1)
    received_a = [p.data for ch, p in recorder.publications if ch == a]
    assert received_a == [b"before", *(f"m{i}".encode() for i in range(1, 600, 2)), b"ephemeral"]
    assert [p.offset for ch, p in recorder.publications if ch == b] == list(range(1, 301))
