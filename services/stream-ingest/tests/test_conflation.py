"""Conflation with a fake clock: at most one publication per window per channel, the latest value wins."""

from __future__ import annotations

import asyncio

import pytest
from tsunagu_stream_ingest.conflation import Conflator


class FakeTime:
    """A clock that moves only when the test says so, and a sleep that waits for it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(5):
            await asyncio.sleep(0)
        for wake, future in list(self._sleepers):
            if wake <= self.now and not future.done():
                future.set_result(None)
                self._sleepers.remove((wake, future))
        for _ in range(10):
            await asyncio.sleep(0)


class Sink:
    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []
        self.superseded: list[tuple[str, int]] = []
        self.failures = 0

    async def publish(self, channel: str, item: int) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.published.append((channel, item))

    def on_superseded(self, channel: str, item: int) -> None:
        self.superseded.append((channel, item))


def conflator(sink: Sink, time: FakeTime, interval: float = 0.1) -> Conflator[int]:
    return Conflator(
        interval, sink.publish, on_superseded=sink.on_superseded, clock=time.clock, sleep=time.sleep, retry_delay=0.05
    )


async def test_latest_value_wins_and_is_published_when_the_window_opens() -> None:
    sink, time = Sink(), FakeTime()
    relay = conflator(sink, time)
    assert await relay.offer("a", 1) is True
    assert await relay.offer("a", 2) is False
    assert await relay.offer("a", 3) is False
    assert sink.published == [("a", 1)]
    assert sink.superseded == [("a", 2)]
    await time.advance(0.05)
    assert sink.published == [("a", 1)]
    await time.advance(0.05)
    assert sink.published == [("a", 1), ("a", 3)]
    assert relay.held == 0
    # The window after the timer's publication is closed too: the next value waits for it.
    assert await relay.offer("a", 4) is False
    await time.advance(0.1)
    assert sink.published[-1] == ("a", 4)
    # A quiet channel publishes at once again.
    await time.advance(0.5)
    assert await relay.offer("a", 5) is True
    assert sink.published[-1] == ("a", 5)


async def test_channels_are_conflated_independently() -> None:
    sink, time = Sink(), FakeTime()
    relay = conflator(sink, time)
    for n in range(10):
        await relay.offer("hot", n)
        await relay.offer(f"cold-{n}", n)
    assert sink.published.count(("hot", 0)) == 1
    assert [c for c, _ in sink.published if c.startswith("cold")] == [f"cold-{n}" for n in range(10)]
    await time.advance(0.1)
    assert [item for channel, item in sink.published if channel == "hot"] == [0, 9]
    assert len(sink.superseded) == 8


async def test_at_most_max_rate_publications_per_second() -> None:
    sink, time = Sink(), FakeTime()
    relay = conflator(sink, time, interval=0.1)
    for n in range(1000):  # 1,000 records/s for one second
        await relay.offer("a", n)
        await time.advance(0.001)
    await time.advance(0.2)
    values = [item for _, item in sink.published]
    assert 10 <= len(values) <= 12
    assert values == sorted(values)
    assert values[-1] == 999


async def test_a_failed_direct_publish_raises_and_a_failed_timer_publish_is_retried() -> None:
    sink, time = Sink(), FakeTime()
    relay = conflator(sink, time)
    sink.failures = 1
    with pytest.raises(ConnectionError):
        await relay.offer("a", 1)
    assert await relay.offer("a", 1) is True
    await relay.offer("a", 2)
    sink.failures = 1
    await time.advance(0.1)
    assert sink.published == [("a", 1)]
    await time.advance(0.05)
    assert sink.published == [("a", 1), ("a", 2)]


async def test_flush_publishes_every_held_value_at_once() -> None:
    sink, time = Sink(), FakeTime()
    relay = conflator(sink, time, interval=10.0)
    for channel in ("a", "b"):
        await relay.offer(channel, 1)
        await relay.offer(channel, 2)
    assert relay.held == 2
    assert await relay.flush() == 2
    assert sorted(sink.published) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert relay.held == 0
