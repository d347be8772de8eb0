"""The relay: one Kafka record in, at most one channel publication out, a batch at a time.

The bus hands `handle` a batch of one partition's records; their publications go to the broker in
one call (`publish_many`), in record order. On a conflated mapping only the newest record of each
channel in the batch is offered to conflation (the older ones are superseded there and then).
Delivery: the bus stores the batch's offsets only after `handle` returned, and `handle` returns
only after the broker accepted the publications (or conflation held them, see conflation.py, or
the poison records were dead-lettered). A broker failure raises, so the bus retries the batch.

Never shown twice: every publication carries the idempotency key `ingest/{topic}/{partition}/{offset}`
(the broker drops a redelivered one) and the record's position in its tags. Before the first
publication to a channel after a start, the relay reads the channel's newest publication and skips
records of the same partition at or before that position, which also covers redeliveries that
conflation would otherwise group differently, and keys whose idempotency TTL ran out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core.broker import Broker, PublishOptions, PublishRequest
from tsunagu_core.bus import Bus, BusMessage

from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.conflation import Conflator
from tsunagu_stream_ingest.mappings import DLQ_SUFFIX, IngestMapping, PoisonRecord, find_mapping

log = logging.getLogger("tsunagu.stream_ingest")

RECORDS = Counter(
    "tsunagu_ingest_records_total",
    "Kafka records handled by stream-ingest, by outcome (published, duplicate, stale, held, dead_lettered, unmapped)",
    ["mapping", "outcome"],
)
CONFLATED = Counter(
    "tsunagu_ingest_conflated_total",
    "Records superseded by a newer one of their channel before publication",
    ["mapping"],
)
PUBLISH_SECONDS = Histogram(
    "tsunagu_ingest_publish_seconds",
    "Latency of a relayed record's channel publication",
    ["mapping"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
RECORD_AGE = Gauge(
    "tsunagu_ingest_record_age_seconds",
    "Time from the Kafka record's timestamp to its publication, last relayed record per mapping",
    ["mapping"],
)

TAG_TOPIC = "ingest_topic"
TAG_PARTITION = "ingest_partition"
TAG_OFFSET = "ingest_offset"
# Channels whose last relayed position is remembered (least recently used are forgotten).
_POSITIONS_KEPT = 100_000


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ was 14% of the relay's CPU
class Record:
    mapping: IngestMapping
    topic: str
    partition: int
    offset: int
    payload: bytes
    timestamp_ms: int


class Relay:
    def __init__(self, settings: IngestSettings, bus: Bus, broker: Broker) -> None:
        self.settings = settings
        self.bus = bus
        self.broker = broker
        self.mappings = list(settings.mappings)
        self._conflators: dict[str, Conflator[Record]] = {}
        for mapping in self.mappings:
            if mapping.max_rate > 0:
                self._conflators[mapping.label] = Conflator(
                    1.0 / mapping.max_rate, self.publish, on_superseded=self._superseded
                )
        self._positions: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        self._mapping_of: dict[str, IngestMapping | None] = {}
        self._meta_ttl = max(86400.0, settings.history_ttl * 10)
        self._dlq_ready: set[str] = set()

    @property
    def held(self) -> int:
        """Channels whose latest value is held by conflation, waiting for its window."""
        return sum(conflator.held for conflator in self._conflators.values())

    @property
    def topics(self) -> list[str]:
        return [mapping.topic for mapping in self.mappings]

    async def handle_batch(self, messages: Sequence[BusMessage]) -> None:
        outcomes: Tally[tuple[str, str]] = Tally()
        direct: list[tuple[str, Record]] = []
        conflated: dict[str, dict[str, Record]] = {}
        for message in messages:
            try:
                mapping = self._mapping_of[message.topic]
            except KeyError:
                mapping = self._mapping_of[message.topic] = find_mapping(self.mappings, message.topic)
            if mapping is None:
                outcomes["", "unmapped"] += 1
                continue
            try:
                channel = mapping.channel_for(message.topic, message.key, message.partition)
                payload = mapping.payload(message.value)
            except PoisonRecord as exc:
                await self.dead_letter(mapping, message, str(exc))
                continue
            record = Record(mapping, message.topic, message.partition, message.offset, payload, message.timestamp_ms)
            if mapping.label in self._conflators:
                latest = conflated.setdefault(mapping.label, {})
                older = latest.pop(channel, None)  # re-inserted last: offered in the order of newest records
                if older is not None:
                    self._superseded(channel, older)
                    outcomes[mapping.label, "held"] += 1
                latest[channel] = record
            else:
                direct.append((channel, record))
        if direct:
            await self.publish_records(direct, outcomes)
        for label, latest in conflated.items():
            conflator = self._conflators[label]
            offered = await asyncio.gather(*(conflator.offer(channel, record) for channel, record in latest.items()))
            outcomes[label, "held"] += offered.count(False)
        for (label, outcome), count in outcomes.items():
            RECORDS.labels(label, outcome).inc(count)

    def _superseded(self, channel: str, record: Record) -> None:
        CONFLATED.labels(record.mapping.label).inc()

    async def _last_position(self, channel: str) -> tuple[str, int, int] | None:
        known = self._positions.get(channel)
        if known is not None:
            self._positions.move_to_end(channel)
            return known
        newest = await self.broker.history(channel, limit=1, reverse=True, meta_ttl=self._meta_ttl)
        if not newest.publications:
            return None
        tags = newest.publications[0].tags
        try:
            position = (tags[TAG_TOPIC], int(tags[TAG_PARTITION]), int(tags[TAG_OFFSET]))
        except (KeyError, ValueError):
            return None
        self._remember(channel, position)
        return position

    def _remember(self, channel: str, position: tuple[str, int, int]) -> None:
        self._positions[channel] = position
        self._positions.move_to_end(channel)
        if len(self._positions) > _POSITIONS_KEPT:
            self._positions.popitem(last=False)

    async def publish(self, channel: str, record: Record) -> None:
        """Publish a record to its channel; raises when the broker does not accept it."""
        outcomes: Tally[tuple[str, str]] = Tally()
        await self.publish_records([(channel, record)], outcomes)
        for (label, outcome), count in outcomes.items():
            RECORDS.labels(label, outcome).inc(count)

    async def publish_records(self, records: Sequence[tuple[str, Record]], outcomes: Tally[tuple[str, str]]) -> None:
        """Publish records to their channels in one broker call, skipping those already relayed."""
        unknown = {channel for channel, _ in records if channel not in self._positions}
        if unknown:
            # The first publication to a channel since the start: what did an earlier run relay there?
            await asyncio.gather(*(self._last_position(channel) for channel in unknown))
        requests = []
        relayed = []
        for channel, record in records:
            last = self._positions.get(channel)
            if (
                last is not None
                and last[0] == record.topic
                and last[1] == record.partition
                and record.offset <= last[2]
            ):
                outcomes[record.mapping.label, "stale"] += 1
                continue
            requests.append(PublishRequest(channel, record.payload, self._options(record)))
            relayed.append((channel, record))
        if not requests:
            return
        started = time.perf_counter()
        results = await self.broker.publish_many(requests)
        elapsed = time.perf_counter() - started
        now = time.time()
        for (channel, record), result in zip(relayed, results, strict=True):
            self._remember(channel, (record.topic, record.partition, record.offset))
            outcomes[record.mapping.label, "duplicate" if result.duplicate else "published"] += 1
        labels = {record.mapping.label: record for _, record in relayed}
        for label, newest in labels.items():
            PUBLISH_SECONDS.labels(label).observe(elapsed)
            if newest.timestamp_ms > 0:
                RECORD_AGE.labels(label).set(max(0.0, now - newest.timestamp_ms / 1000))

    def _options(self, record: Record) -> PublishOptions:
        return PublishOptions(
            history_size=self.settings.history_size,
            history_ttl=self.settings.history_ttl,
            meta_ttl=self._meta_ttl,
            idempotency_key=f"ingest/{record.topic}/{record.partition}/{record.offset}",
            idempotency_ttl=self.settings.idempotency_ttl,
            tags={TAG_TOPIC: record.topic, TAG_PARTITION: str(record.partition), TAG_OFFSET: str(record.offset)},
        )

    async def dead_letter(self, mapping: IngestMapping, message: BusMessage, reason: str) -> None:
        """Send a record that can never be relayed to `<topic>.dlq`, the reason in its headers."""
        topic = message.topic + DLQ_SUFFIX
        if topic not in self._dlq_ready:
            await self.bus.ensure_topics([topic])
            self._dlq_ready.add(topic)
        headers = dict(message.headers)
        headers.update(
            {
                "tsunagu-dlq-error": reason[:1000],
                "tsunagu-dlq-group": self.settings.consumer_group,
                "tsunagu-dlq-mapping": mapping.label,
                "tsunagu-dlq-origin": f"{message.topic}/{message.partition}/{message.offset}",
            }
        )
        await self.bus.publish(topic, message.value, key=message.key, headers=headers)
        RECORDS.labels(mapping.label, "dead_lettered").inc()
        log.warning("record %s/%d/%d dead-lettered: %s", message.topic, message.partition, message.offset, reason)

    async def flush(self) -> int:
        """Publish every value held by conflation (on shutdown)."""
        flushed = 0
        for conflator in self._conflators.values():
            flushed += await conflator.flush()
        return flushed
