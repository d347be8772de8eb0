"""The audit log at work: batched appends from the bus, signed checkpoints, periodic verification.

The bus hands a batch of one partition's events to `handle_batch` and stores the batch's offsets
only after it returned, so it returns only once its events are committed in the store. The
partitions' batches meet in the batcher, which writes whatever is waiting in one transaction (one
multi-row insert, the hash chain linked in order), which is where the throughput comes from.
Records that are not events are rejected: the bus sends them to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core.bus import BusMessage, Rejected

from tsunagu_audit_log.chain import GENESIS, Checkpoint, Head, NewEvent, Report, Signer, verify
from tsunagu_audit_log.handlers import BadEvent, audit_event, gateway_event
from tsunagu_audit_log.store import AuditStore

log = logging.getLogger("tsunagu.audit")

EVENTS = Counter("tsunagu_audit_events_total", "Audit events appended to the chain", ["type"])
DUPLICATES = Counter("tsunagu_audit_duplicates_total", "Redelivered audit events skipped (already in the chain)")
BAD_EVENTS = Counter("tsunagu_audit_bad_events_total", "Bus records that could not be decoded as events", ["topic"])
INSERT_SECONDS = Histogram(
    "tsunagu_audit_insert_seconds",
    "Latency of one batched append to the chain",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
)
BATCH_SIZE = Histogram(
    "tsunagu_audit_batch_size", "Events per batched append", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
CHAIN_OK = Gauge("tsunagu_audit_chain_ok", "1 when the last verification found the chain intact, 0 when not")
VERIFY_FAILURES = Counter("tsunagu_audit_verify_failures_total", "Verifications that found the chain broken")
CHECKPOINTS = Counter("tsunagu_audit_checkpoints_total", "Signed checkpoints written")


class Batcher:
    """Collects the events of concurrent handlers and appends them together."""

    def __init__(self, store: AuditStore, *, max_batch: int = 500, linger: float = 0.002) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger = linger
        self.appended = asyncio.Event()
        # Each caller's events, written in one transaction (a caller's events are never split).
        self._pending: list[tuple[Sequence[NewEvent], asyncio.Future[None]]] = []
        self._waiting = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("audit-log is stopping"))
        self._pending.clear()
        self._waiting = 0

    async def add(self, event: NewEvent) -> None:
        """Return once `event` is in the chain (or was already); raise when the store failed."""
        await self.add_many([event])

    async def add_many(self, events: Sequence[NewEvent]) -> None:
        """Return once every event is in the chain (or was already), in this order; raise when the store failed."""
        if not events:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((events, future))
        self._waiting += len(events)
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.linger and self._waiting < self.max_batch:
                await asyncio.sleep(self.linger)
            batch: list[tuple[Sequence[NewEvent], asyncio.Future[None]]] = []
            size = 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
                group = self._pending.pop(0)
                batch.append(group)
                size += len(group[0])
            self._waiting -= size
            if not self._pending:
                self._wake.clear()
            if batch:
                await self._write(batch)

    async def _write(self, batch: Sequence[tuple[Sequence[NewEvent], asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        events = [event for group, _ in batch for event in group]
        try:
            rows = await self.store.append(events)
        except Exception as exc:
            log.warning("appending %d events failed: %r", len(events), exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        INSERT_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(events))
        types = Tally(row.type for row in rows)
        for kind, count in types.items():
            EVENTS.labels(kind).inc(count)
        if len(rows) < len(events):
            DUPLICATES.inc(len(events) - len(rows))
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        if rows:
            self.appended.set()


class AuditLog:
    def __init__(
        self,
        store: AuditStore,
        signer: Signer,
        *,
        gateway_topic: str,
        checkpoint_rows: int = 1000,
        checkpoint_interval: float = 60.0,
        max_batch: int = 500,
        linger: float = 0.002,
    ) -> None:
        self.store = store
        self.signer = signer
        self.gateway_topic = gateway_topic
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_interval = checkpoint_interval
        self.batcher = Batcher(store, max_batch=max_batch, linger=linger)

    async def handle_batch(self, messages: Sequence[BusMessage]) -> list[Rejected]:
        """The bus handler: records that are not events are rejected (dead-lettered with the reason) and
        counted; store errors raise so the bus retries the batch."""
        events: list[NewEvent] = []
        rejected: list[Rejected] = []
        for message in messages:
            try:
                event = gateway_event(message) if message.topic == self.gateway_topic else audit_event(message)
            except BadEvent as exc:
                BAD_EVENTS.labels(message.topic).inc()
                rejected.append(Rejected(message, str(exc)))
                continue
            if event is not None:
                events.append(event)
        await self.batcher.add_many(events)
        return rejected

    async def verify(self) -> Report:
        report = await self.store.verify(self.signer)
        CHAIN_OK.set(1 if report.ok else 0)
        if not report.ok:
            VERIFY_FAILURES.inc()
            broken = report.first_broken
            assert broken is not None
            log.error("audit chain is broken at seq %d: %s", broken.seq, broken.reason)
        return report

    async def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the chain head when enough rows or time have passed since the last checkpoint.

        The rows since the last trusted checkpoint are verified first: a checkpoint vouches only
        for a chain that was intact when it was signed.
        """
        last = await self.store.last_checkpoint()
        head = await self.store.head()
        last_seq = last.seq if last is not None else 0
        if head.seq <= last_seq:
            return None
        now_ms = int(time.time() * 1000)
        due = head.seq - last_seq >= self.checkpoint_rows or (
            last is None or now_ms - last.created_ms >= self.checkpoint_interval * 1000
        )
        if not (due or force):
            return None
        start = Head(0, GENESIS)
        if last is not None and self.signer.check(last) is None:
            start = Head(last.seq, last.hash)
        segment = await verify(self.store.rows(start.seq, head.seq), head, [], self.signer, start=start)
        if not segment.ok:
            CHAIN_OK.set(0)
            VERIFY_FAILURES.inc()
            broken = segment.first_broken
            assert broken is not None
            log.error("not signing a checkpoint: the chain is broken at seq %d: %s", broken.seq, broken.reason)
            return None
        checkpoint = self.signer.sign(head, now_ms)
        await self.store.add_checkpoint(checkpoint)
        CHECKPOINTS.inc()
        log.info("signed checkpoint at seq %d", head.seq)
        return checkpoint

    async def run_checkpoints(self) -> None:
        tick = min(1.0, self.checkpoint_interval)
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation that arrives as
            # the event is set, and the stopping service then waits on this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self.batcher.appended.wait()
            self.batcher.appended.clear()
            try:
                await self.checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("checkpoint failed: %r", exc)
            # Under a steady stream every batch sets `appended`: look at most five times a second.
            await asyncio.sleep(min(0.2, tick))

    async def run_verifier(self, interval: float) -> None:
        while True:
            try:
                await self.verify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("background verification failed to run: %r", exc)
            await asyncio.sleep(interval)
