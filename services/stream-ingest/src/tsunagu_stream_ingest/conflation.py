"""Conflation: at most one publication per `interval` per channel, the latest value winning.

A record whose channel's window is open is published at once and the caller awaits it (so the bus
stores its offset only after the broker accepted it). A record arriving while the window is closed
is held as the channel's pending value, replacing (superseding) any value held before, and a timer
publishes the pending value when the window opens, so the final value of a burst is never dropped.

The trade-off for at-least-once: the caller returns at once for a held record, so its offset may
be committed before its value is published. If the process dies in that window (at most
`interval` seconds per hot channel) the held value is lost until the channel's next record; a
clean stop publishes every held value (`flush`). Holding the consumer until the window opens
would instead stall every other channel of the partition, which is what conflation exists to avoid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("tsunagu.stream_ingest.conflation")

T = TypeVar("T")

# Channels whose window has long closed are forgotten after this many offers, to bound memory.
_PRUNE_EVERY = 10_000


@dataclass(slots=True)
class _Channel(Generic[T]):
    last: float
    pending: T | None = None
    timer: asyncio.Task[None] | None = None


class Conflator(Generic[T]):
    def __init__(
        self,
        interval: float,
        publish: Callable[[str, T], Awaitable[None]],
        *,
        on_superseded: Callable[[str, T], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_delay: float = 0.2,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._publish = publish
        self._on_superseded = on_superseded
        self._clock = clock
        self._sleep = sleep
        self._retry_delay = retry_delay
        self._channels: dict[str, _Channel[T]] = {}
        self._offers = 0
        self._closed = False

    @property
    def held(self) -> int:
        """Channels with a value waiting for their window."""
        return sum(1 for state in self._channels.values() if state.pending is not None)

    async def offer(self, channel: str, item: T) -> bool:
        """Publish `item` now (True) or hold it until the window opens (False); raises when a publish now fails."""
        self._offers += 1
        if self._offers % _PRUNE_EVERY == 0:
            self._prune()
        now = self._clock()
        state = self._channels.get(channel)
        if state is None or (
            state.timer is None and state.pending is None and now - state.last >= self.interval and not self._closed
        ):
            await self._publish(channel, item)
            if state is None:
                self._channels[channel] = _Channel(last=now)
            else:
                state.last = now
            return True
        if state.pending is not None and self._on_superseded is not None:
            self._on_superseded(channel, state.pending)
        state.pending = item
        if state.timer is None and not self._closed:
            state.timer = asyncio.create_task(self._fire(channel, state), name=f"conflate-{channel}")
        return False

    async def _fire(self, channel: str, state: _Channel[T]) -> None:
        try:
            while state.pending is not None:
                delay = state.last + self.interval - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                item = state.pending
                if item is None:
                    break
                state.pending = None
                previous, state.last = state.last, self._clock()
                try:
                    await self._publish(channel, item)
                except asyncio.CancelledError:
                    state.last = previous
                    if state.pending is None:
                        state.pending = item
                    raise
                except Exception as exc:
                    log.warning("publishing the held value of %s failed, retrying: %r", channel, exc)
                    state.last = previous
                    if state.pending is None:
                        state.pending = item
                    await self._sleep(self._retry_delay)
        finally:
            state.timer = None

    def _prune(self) -> None:
        now = self._clock()
        idle = [
            name
            for name, state in self._channels.items()
            if state.timer is None and state.pending is None and now - state.last >= self.interval
        ]
        for name in idle:
            del self._channels[name]

    async def flush(self) -> int:
        """Stop the timers and publish every held value at once (on shutdown); returns how many."""
        self._closed = True
        timers = [state.timer for state in self._channels.values() if state.timer is not None]
        for timer in timers:
            timer.cancel()
        for timer in timers:
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        flushed = 0
        for channel, state in self._channels.items():
            item = state.pending
            if item is None:
                continue
            state.pending = None
            try:
                await self._publish(channel, item)
                flushed += 1
            except Exception as exc:
                log.error("could not publish the held value of %s on shutdown: %r", channel, exc)
        return flushed
