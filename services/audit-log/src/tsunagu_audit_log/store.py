"""Where the chain lives: PostgreSQL in a cluster, memory for the embedded `tsunagu run`.

Appends are serialized by a lock on the single chain head row (`audit_head`, `SELECT ... FOR
UPDATE`), so replicas appending at once take turns and can never fork the chain. Each append is
one transaction: it skips event ids already stored (at-least-once delivery redelivers), links the
rest to the head, writes them with COPY and moves the head. Nothing is half-written.
"""

from __future__ import annotations

import abc
import operator
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
from tsunagu_core.database import Migration, Postgres

from tsunagu_audit_log.chain import GENESIS, Broken, Checkpoint, Head, NewEvent, Report, Row, Signer, link, verify

VERIFY_CHUNK = 2000
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
ROW_COLUMNS = (
    "seq",
    "event_id",
    "time_ms",
    "source",
    "type",
    "actor",
    "action",
    "subject",
    "outcome",
    "client_ip",
    "details",
    "prev_hash",
    "hash",
)


@dataclass(frozen=True, slots=True)
class Query:
    subject: str | None = None
    action: str | None = None
    actor: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 100
    # Rows strictly after this seq in the order asked for (the cursor).
    after_seq: int | None = None
    newest_first: bool = True

    def matches(self, row: Row) -> bool:
        return (
            (self.subject is None or row.subject == self.subject)
            and (self.action is None or row.action == self.action)
            and (self.actor is None or row.actor == self.actor)
            and (self.since_ms is None or row.time_ms >= self.since_ms)
            and (self.until_ms is None or row.time_ms < self.until_ms)
            and (
                self.after_seq is None or (row.seq < self.after_seq if self.newest_first else row.seq > self.after_seq)
            )
        )


class HeadMissing(RuntimeError):
    """The chain head row was removed: nothing can be appended or trusted until an operator looks."""


class AuditStore(abc.ABC):
    @abc.abstractmethod
    async def append(self, events: Sequence[NewEvent]) -> list[Row]:
        """Add the events not stored yet (by event id) to the chain; return the rows written."""

    @abc.abstractmethod
    async def head(self) -> Head: ...

    @abc.abstractmethod
    def rows(self, after_seq: int, upto_seq: int) -> AsyncIterator[Row]:
        """Rows with after_seq < seq <= upto_seq, ascending."""

    @abc.abstractmethod
    async def rows_beyond_head(self) -> int:
        """The highest seq stored past the chain head (0 when none): rows added behind the writer's back."""

    @abc.abstractmethod
    async def query(self, query: Query) -> list[Row]: ...

    @abc.abstractmethod
    async def checkpoints(self) -> list[Checkpoint]: ...

    @abc.abstractmethod
    async def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def last_checkpoint(self) -> Checkpoint | None:
        found = await self.checkpoints()
        return max(found, key=lambda c: c.seq) if found else None

    async def verify(self, signer: Signer) -> Report:
        # Checkpoints before the head, and rows only up to that head: appends running meanwhile
        # move the head past what was read, never below it, so they cannot look like tampering.
        checkpoints = await self.checkpoints()
        try:
            head = await self.head()
        except HeadMissing as exc:
            broken = Broken(1, str(exc))
            return Report(False, 0, len(checkpoints), None, broken, None, [broken])
        report = await verify(self.rows(0, head.seq), head, checkpoints, signer)
        beyond = await self.rows_beyond_head()
        if beyond:
            report.problems.append(Broken(beyond, "row beyond the chain head"))
            report.problems.sort(key=lambda b: b.seq)
            report.first_broken = report.problems[0]
            report.ok = False
        return report


class MemoryStore(AuditStore):
    def __init__(self) -> None:
        self.log: list[Row] = []
        self.ids: set[str] = set()
        self.chain_head = Head(0, GENESIS)
        self.signed: dict[int, Checkpoint] = {}

    async def append(self, events: Sequence[NewEvent]) -> list[Row]:
        fresh: list[NewEvent] = []
        for event in events:
            if event.event_id not in self.ids:
                self.ids.add(event.event_id)
                fresh.append(event)
        rows = link(self.chain_head, fresh)
        self.log.extend(rows)
        if rows:
            self.chain_head = Head(rows[-1].seq, rows[-1].hash)
        return rows

    async def head(self) -> Head:
        return self.chain_head

    async def rows(self, after_seq: int, upto_seq: int) -> AsyncIterator[Row]:
        for row in list(self.log):
            if after_seq < row.seq <= upto_seq:
                yield row

    async def rows_beyond_head(self) -> int:
        return max((row.seq for row in self.log if row.seq > self.chain_head.seq), default=0)

    async def query(self, query: Query) -> list[Row]:
        ordered = reversed(self.log) if query.newest_first else iter(self.log)
        found = []
        for row in ordered:
            if query.matches(row):
                found.append(row)
                if len(found) == query.limit:
                    break
        return found

    async def checkpoints(self) -> list[Checkpoint]:
        return sorted(self.signed.values(), key=lambda c: c.seq)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.signed.setdefault(checkpoint.seq, checkpoint)


def migrations(schema: str) -> list[Migration]:
    s = schema
    return [
        Migration(
            1,
            "hash chain, head and checkpoints",
            f"""
            CREATE SCHEMA IF NOT EXISTS {s};
            CREATE TABLE {s}.audit_log (
                seq bigint PRIMARY KEY,
                event_id text NOT NULL UNIQUE,
                time_ms bigint NOT NULL,
                source text NOT NULL,
                type text NOT NULL,
                actor text NOT NULL,
                action text NOT NULL,
                subject text NOT NULL,
                outcome text NOT NULL,
                client_ip text NOT NULL,
                details bytea NOT NULL,
                prev_hash bytea NOT NULL,
                hash bytea NOT NULL,
                recorded_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE INDEX audit_log_subject ON {s}.audit_log (subject, seq);
            CREATE INDEX audit_log_action ON {s}.audit_log (action, seq);
            CREATE INDEX audit_log_actor ON {s}.audit_log (actor, seq);
            CREATE INDEX audit_log_time ON {s}.audit_log (time_ms, seq);
            CREATE TABLE {s}.audit_head (
                id smallint PRIMARY KEY CHECK (id = 1),
                seq bigint NOT NULL,
                hash bytea NOT NULL
            );
            INSERT INTO {s}.audit_head (id, seq, hash) VALUES (1, 0, '\\x{GENESIS.hex()}');
            CREATE TABLE {s}.audit_checkpoints (
                seq bigint PRIMARY KEY,
                hash bytea NOT NULL,
                created_ms bigint NOT NULL,
                public_key bytea NOT NULL,
                signature bytea NOT NULL
            );
            """,
        )
    ]


def database_for(dsn: str, schema: str) -> Postgres:
    """The `database` dependency of audit-log; each schema has its own migration history, kept in it."""
    if not IDENTIFIER.match(schema):
        raise ValueError(f"not a plain PostgreSQL schema name: {schema!r}")
    service = "audit-log" if schema == "public" else f"audit-log/{schema}"
    return Postgres(dsn, service=service, migrations=migrations(schema), max_size=8, schema=schema)


_ROW_VALUES = operator.attrgetter(*ROW_COLUMNS)  # the fields of Row, in order


def _row(record: asyncpg.Record) -> Row:
    get = record.__getitem__
    return Row(
        seq=get("seq"),
        event_id=get("event_id"),
        time_ms=get("time_ms"),
        source=get("source"),
        type=get("type"),
        actor=get("actor"),
        action=get("action"),
        subject=get("subject"),
        outcome=get("outcome"),
        client_ip=get("client_ip"),
        details=bytes(get("details")),
        prev_hash=bytes(get("prev_hash")),
        hash=bytes(get("hash")),
    )


class PostgresStore(AuditStore):
    def __init__(self, database: Postgres, schema: str = "public") -> None:
        if not IDENTIFIER.match(schema):
            raise ValueError(f"not a plain PostgreSQL schema name: {schema!r}")
        self.database = database
        self.schema = schema
        self.columns = ", ".join(ROW_COLUMNS)

    async def append(self, events: Sequence[NewEvent]) -> list[Row]:
        if not events:
            return []
        s = self.schema
        # Two statements in the transaction: lock the head and learn which ids are stored already,
        # then write the rows and move the head together (COPY would cost a round trip more).
        async with self.database.pool.acquire() as conn, conn.transaction():
            head_record = await conn.fetchrow(
                f"SELECT h.seq, h.hash, ARRAY(SELECT event_id FROM {s}.audit_log WHERE event_id = ANY($1::text[]))"
                f" AS stored FROM {s}.audit_head h WHERE h.id = 1 FOR UPDATE OF h",
                [e.event_id for e in events],
            )
            if head_record is None:
                raise HeadMissing(f"{s}.audit_head has no row: the chain head was removed")
            seen = set(head_record["stored"])
            fresh = []
            for event in events:
                if event.event_id not in seen:
                    seen.add(event.event_id)
                    fresh.append(event)
            rows = link(Head(head_record["seq"], bytes(head_record["hash"])), fresh)
            if not rows:
                return []
            # attrgetter, not dataclasses.astuple (which deep-copies: 20% of a 500-row append)
            columns = list(zip(*map(_ROW_VALUES, rows), strict=True))
            await conn.execute(
                f"WITH written AS (INSERT INTO {s}.audit_log ({self.columns})"
                " SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],"
                " $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[], $12::bytea[], $13::bytea[]))"
                f" UPDATE {s}.audit_head SET seq = $14, hash = $15 WHERE id = 1",
                *columns,
                rows[-1].seq,
                rows[-1].hash,
            )
        return rows

    async def head(self) -> Head:
        record = await self.database.pool.fetchrow(f"SELECT seq, hash FROM {self.schema}.audit_head WHERE id = 1")
        if record is None:
            raise HeadMissing(f"{self.schema}.audit_head has no row: the chain head was removed")
        return Head(record["seq"], bytes(record["hash"]))

    async def rows(self, after_seq: int, upto_seq: int) -> AsyncIterator[Row]:
        sql = f"SELECT {self.columns} FROM {self.schema}.audit_log WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
        position = after_seq
        while True:
            records = await self.database.pool.fetch(sql, position, upto_seq, VERIFY_CHUNK)
            for record in records:
                yield _row(record)
            if len(records) < VERIFY_CHUNK:
                return
            position = records[-1]["seq"]

    async def rows_beyond_head(self) -> int:
        s = self.schema
        value = await self.database.pool.fetchval(
            f"SELECT max(l.seq) FROM {s}.audit_log l, {s}.audit_head h WHERE h.id = 1 AND l.seq > h.seq"
        )
        return int(value or 0)

    async def query(self, query: Query) -> list[Row]:
        conditions: list[str] = []
        params: list[object] = []

        def where(sql: str, value: object) -> None:
            params.append(value)
            conditions.append(sql.format(f"${len(params)}"))

        if query.subject is not None:
            where("subject = {}", query.subject)
        if query.action is not None:
            where("action = {}", query.action)
        if query.actor is not None:
            where("actor = {}", query.actor)
        if query.since_ms is not None:
            where("time_ms >= {}", query.since_ms)
        if query.until_ms is not None:
            where("time_ms < {}", query.until_ms)
        if query.after_seq is not None:
            where("seq < {}" if query.newest_first else "seq > {}", query.after_seq)
        params.append(query.limit)
        clause = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        order = "DESC" if query.newest_first else "ASC"
        sql = f"SELECT {self.columns} FROM {self.schema}.audit_log {clause} ORDER BY seq {order} LIMIT ${len(params)}"
        return [_row(record) for record in await self.database.pool.fetch(sql, *params)]

    async def checkpoints(self) -> list[Checkpoint]:
        records = await self.database.pool.fetch(
            f"SELECT seq, hash, created_ms, public_key, signature FROM {self.schema}.audit_checkpoints ORDER BY seq"
        )
        return [
            Checkpoint(r["seq"], bytes(r["hash"]), r["created_ms"], bytes(r["public_key"]), bytes(r["signature"]))
            for r in records
        ]

    async def last_checkpoint(self) -> Checkpoint | None:
        r = await self.database.pool.fetchrow(
            f"SELECT seq, hash, created_ms, public_key, signature FROM {self.schema}.audit_checkpoints"
            " ORDER BY seq DESC LIMIT 1"
        )
        if r is None:
            return None
        return Checkpoint(r["seq"], bytes(r["hash"]), r["created_ms"], bytes(r["public_key"]), bytes(r["signature"]))

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        await self.database.pool.execute(
            f"INSERT INTO {self.schema}.audit_checkpoints (seq, hash, created_ms, public_key, signature)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
            checkpoint.seq,
            checkpoint.hash,
            checkpoint.created_ms,
            checkpoint.public_key,
            checkpoint.signature,
        )
