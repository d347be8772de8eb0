"""Documents: apply updates from Kafka in order, persist, fan out to gateways, compact, serve late joiners.

Per batch of one Kafka partition (a document's updates are all in one partition, so they are
applied in order): apply each update to the in-memory pycrdt Doc -> merge each run of consecutive
updates of one client into one update (`pycrdt.merge_updates`) -> append the merged update to the
store -> publish the batch's merged updates on broker channels `collab:{doc}` in one call (with
history, so a gateway catches up by offset) -> return, and only then the bus commits the offsets.
Runs are per client because the gateway skips the connection an update came from. A replica that
dies before the commit has its updates replayed by the next owner of the partition; Yjs updates are
idempotent, so a replay changes nothing. A malformed update goes to the dead-letter topic.

Several replicas share the partitions, and a partition moves when one joins or dies. The in-memory Doc
of a document whose partition another replica consumed meanwhile lacks that replica's updates, so:
a batch that does not start where this replica last left its partition drops that partition's
documents from memory (the next update reopens them from the store); late joiners get the state
from the store, never from memory (this replica may no longer own the document); and compaction
merges into the stored snapshot instead of replacing it (a stale replica evicting its copy loses nothing).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge
from pycrdt import Array, Doc, Map, Text, merge_updates
from tsunagu_core import topics
from tsunagu_core.broker import Broker, PublishOptions, PublishRequest
from tsunagu_core.bus import Bus, BusMessage, Rejected
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of, publish_event
from tsunagu_core.wire.events_pb2 import CollabUpdate

from tsunagu_collab.config import CollabSettings
from tsunagu_collab.store import Store, Version

log = logging.getLogger("tsunagu.collab")

UPDATE_EVENT = "collab.update"
VALID_DOC = re.compile(r"^[\w\-.@]{1,200}$")

APPLIED = Counter("tsunagu_collab_updates_applied_total", "Yjs updates applied and persisted")
REJECTED = Counter("tsunagu_collab_updates_rejected_total", "Updates dropped as malformed")
COMPACTIONS = Counter("tsunagu_collab_compactions_total", "Documents compacted into a snapshot")
OPEN_DOCS = Gauge("tsunagu_collab_open_documents", "Documents held in memory")


class DocError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def channel_of(doc: str) -> str:
    return f"collab:{doc}"


def check_doc(doc: str) -> str:
    if not VALID_DOC.match(doc):
        raise DocError(400, f"invalid document id {doc[:64]!r}: 1-200 letters, digits, '-', '_', '.', '@'")
    return doc


@dataclass(slots=True)
class OpenDoc:
    ydoc: Doc
    snapshot_bytes: int
    appended_bytes: int = 0
    appended: int = 0
    last_seq: int = 0
    partition: tuple[str, int] | None = None  # the Kafka partition its updates last came from
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def doc_from(updates: list[bytes]) -> Doc:
    ydoc: Doc = Doc()
    for update in updates:
        if update:
            ydoc.apply_update(update)
    return ydoc


def content_of(ydoc: Doc) -> dict[str, Any]:
    """JSON of the root types. Yjs updates do not say which kind a root type is, so it is inferred:
    a map with keys, else a non-empty text, else an array, else an empty text."""
    content: dict[str, Any] = {}
    for key in list(ydoc.keys()):
        as_map = ydoc.get(key, type=Map).to_py() or {}
        if as_map:
            content[key] = as_map
            continue
        as_array = ydoc.get(key, type=Array).to_py() or []
        if as_array and not all(isinstance(item, str) and len(item) == 1 for item in as_array):
            content[key] = as_array
            continue
        content[key] = str(ydoc.get(key, type=Text))
    return content


class DocService:
    def __init__(self, settings: CollabSettings, store: Store, bus: Bus, broker: Broker, node: str) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.broker = broker
        self.node = node
        self.docs: dict[str, OpenDoc] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        # per Kafka partition: the offset after the last event this replica handled
        self._next_offset: dict[tuple[str, int], int] = {}

    def publish_options(self) -> PublishOptions:
        return PublishOptions(
            history_size=self.settings.history_size,
            history_ttl=self.settings.history_ttl,
            meta_ttl=max(86400.0, self.settings.history_ttl * 10),
        )

    async def open(self, doc: str) -> OpenDoc:
        opened = self.docs.get(doc)
        if opened is not None:
            opened.last_used = time.monotonic()
            return opened
        lock = self._opening.setdefault(doc, asyncio.Lock())
        async with lock:
            opened = self.docs.get(doc)
            if opened is None:
                stored = await self.store.load(doc)
                ydoc = doc_from([stored.snapshot, *stored.updates])
                opened = OpenDoc(ydoc, len(stored.snapshot), stored.stored_bytes - len(stored.snapshot))
                opened.appended = len(stored.updates)
                opened.last_seq = stored.last_seq
                self.docs[doc] = opened
                OPEN_DOCS.set(len(self.docs))
        self._opening.pop(doc, None)
        return opened

    # the Kafka consumer

    def _follow(self, messages: Sequence[BusMessage]) -> None:
        """Drop from memory the documents of a partition another replica consumed since this one last
        did (the batch starts past where it left off): they lack the other replica's updates. A batch
        starting before is a replay of events this replica applied already (idempotent), not a gap."""
        first = messages[0]
        pair = (first.topic, first.partition)
        expected = self._next_offset.get(pair)
        if expected is not None and first.offset > expected:
            stale = [doc for doc, opened in self.docs.items() if opened.partition == pair]
            for doc in stale:
                del self.docs[doc]
            if stale:
                log.info("partition %s[%d] was consumed elsewhere: reloading %d documents", *pair, len(stale))
            OPEN_DOCS.set(len(self.docs))
        self._next_offset[pair] = max(m.offset for m in messages) + 1

    async def handle_batch(self, messages: Sequence[BusMessage]) -> list[Rejected]:
        rejected: list[Rejected] = []
        if not messages:
            return rejected
        self._follow(messages)  # a batch is one partition's events
        partition = (messages[0].topic, messages[0].partition)
        by_doc: dict[str, list[tuple[BusMessage, CollabUpdate]]] = {}  # in Kafka order
        for message in messages:
            try:
                update = payload_of(envelope_of(message), CollabUpdate)
                check_doc(update.doc)
            except (EnvelopeError, DocError) as exc:
                REJECTED.inc()
                rejected.append(Rejected(message, str(exc)))
                continue
            by_doc.setdefault(update.doc, []).append((message, update))
        publications: list[PublishRequest] = []
        for doc, pairs in by_doc.items():
            published, malformed = await self._apply_many(doc, [update for _, update in pairs], partition)
            publications += published
            rejected += [Rejected(pairs[index][0], reason) for index, reason in malformed]
        if publications:
            await self.broker.publish_many(publications)
            APPLIED.inc(len(publications))
        return rejected

    async def apply(self, update: CollabUpdate) -> None:
        """Apply, persist and publish one update (a malformed one is dropped with a warning)."""
        publications, _ = await self._apply_many(update.doc, [update])
        if publications:
            await self.broker.publish_many(publications)
            APPLIED.inc(len(publications))

    async def _apply_many(
        self, doc: str, updates: Sequence[CollabUpdate], partition: tuple[str, int] | None = None
    ) -> tuple[list[PublishRequest], list[tuple[int, str]]]:
        """Apply and persist a document's updates in order: the publications to make for them, and
        the malformed ones (their index and why)."""
        opened = await self.open(doc)
        if partition is not None:
            opened.partition = partition
        options = self.publish_options()
        publications = []
        malformed = []
        async with opened.lock:
            runs: list[tuple[CollabUpdate, list[bytes]]] = []
            for index, update in enumerate(updates):
                try:
                    opened.ydoc.apply_update(update.update)
                except Exception as exc:
                    REJECTED.inc()
                    log.warning("dropping a malformed update to %s from %s: %r", doc, update.client_id, exc)
                    malformed.append((index, f"malformed Yjs update: {exc!r}"))
                    continue
                if runs and runs[-1][0].client_id == update.client_id:
                    runs[-1][1].append(update.update)
                else:
                    runs.append((update, [update.update]))
            for first, parts in runs:
                merged = first
                if len(parts) > 1:
                    merged = CollabUpdate()
                    merged.CopyFrom(first)
                    merged.update = merge_updates(*parts)
                opened.last_seq = await self.store.append(doc, merged.update)
                opened.appended += 1
                opened.appended_bytes += len(merged.update)
                publications.append(PublishRequest(channel_of(doc), merged.SerializeToString(), options))
            opened.last_used = time.monotonic()
            if opened.appended_bytes > max(opened.snapshot_bytes, self.settings.compact_min_bytes) or (
                opened.appended >= self.settings.compact_max_updates
            ):
                await self._compact(doc, opened)
        return publications, malformed

    async def _compact(self, doc: str, opened: OpenDoc) -> None:
        snapshot = opened.ydoc.get_update()
        await self.store.compact(doc, snapshot, opened.last_seq)
        opened.snapshot_bytes = len(snapshot)
        opened.appended = 0
        opened.appended_bytes = 0
        COMPACTIONS.inc()

    async def evict_idle(self) -> None:
        now = time.monotonic()
        for doc, opened in list(self.docs.items()):
            if now - opened.last_used < self.settings.idle_seconds:
                continue
            async with opened.lock:
                if opened.appended:
                    await self._compact(doc, opened)
                if self.docs.get(doc) is opened:
                    del self.docs[doc]
        OPEN_DOCS.set(len(self.docs))

    async def flush(self) -> None:
        for doc, opened in list(self.docs.items()):
            async with opened.lock:
                if opened.appended:
                    try:
                        await self._compact(doc, opened)
                    except Exception as exc:
                        log.warning("compacting %s on shutdown failed: %r", doc, exc)

    # late joiners and the HTTP API

    async def state(self, doc: str) -> tuple[bytes, int, str, Doc]:
        """The document and the channel position it includes (every publication up to `offset`)."""
        check_doc(doc)
        # Position first, then the state: every update published up to that offset was persisted
        # before it was published. From the store, not memory: the replica that now owns the
        # document's partition may be another one, and this one's copy may lack its updates.
        position = (await self.broker.history(channel_of(doc), limit=0)).position
        stored = await self.store.load(doc)
        ydoc = doc_from([stored.snapshot, *stored.updates])
        return ydoc.get_update(), position.offset, position.epoch, ydoc

    async def document(self, doc: str, with_content: bool) -> dict[str, Any]:
        update, offset, epoch, ydoc = await self.state(doc)
        body: dict[str, Any] = {
            "doc": doc,
            "update": base64.b64encode(update).decode(),
            "offset": offset,
            "epoch": epoch,
            "size": len(update),
        }
        if with_content:
            body["content"] = content_of(ydoc)
        return body

    async def stored_bytes(self, doc: str) -> int:
        return (await self.store.load(check_doc(doc))).stored_bytes

    async def delete(self, doc: str) -> bool:
        check_doc(doc)
        opened = self.docs.pop(doc, None)
        if opened is not None:
            async with opened.lock:
                pass
        OPEN_DOCS.set(len(self.docs))
        return await self.store.delete(doc)

    async def snapshot_version(self, doc: str, label: str) -> Version:
        update, _, _, _ = await self.state(doc)
        return await self.store.add_version(doc, update, label)

    async def versions(self, doc: str) -> list[Version]:
        return await self.store.versions(check_doc(doc))

    async def restore(self, doc: str, version: int) -> int:
        """Bring the document's content back to a version: the change is an ordinary update through Kafka,
        so every replica and client gets it the usual way. Returns its size in bytes."""
        old_state = await self.store.version_state(check_doc(doc), version)
        if old_state is None:
            raise DocError(404, f"document {doc!r} has no version {version}")
        current, _, _, _ = await self.state(doc)
        target = content_of(doc_from([old_state]))
        ydoc = doc_from([current])
        before = ydoc.get_state()
        now = content_of(ydoc)
        with ydoc.transaction():
            for key in set(now) | set(target):
                value = target.get(key, "")
                if isinstance(value, dict):
                    ymap = ydoc.get(key, type=Map)
                    for name in list(ymap.keys()):
                        if name not in value:
                            del ymap[name]
                    for name, item in value.items():
                        ymap[name] = item
                elif isinstance(value, list):
                    yarray = ydoc.get(key, type=Array)
                    del yarray[:]
                    yarray.extend(value)
                else:
                    ytext = ydoc.get(key, type=Text)
                    if str(ytext) != value:
                        del ytext[:]
                        ytext += value
        change = ydoc.get_update(before)
        event = CollabUpdate(doc=doc, update=change, client_id=f"restore-{version}", node=self.node)
        await publish_event(self.bus, topics.COLLAB_UPDATES, UPDATE_EVENT, event, key=doc, source=f"collab/{self.node}")
        return len(change)
