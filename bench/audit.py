"""Audit-log insert throughput: the PostgreSQL store alone, and Kafka -> audit-log -> PostgreSQL.

- store: `PostgresStore.append` in a schema of its own, batches of 1, 50 and 500 events, and 8
  concurrent writers of one event each (they take turns on the chain head lock);
- service: `tsunagu serve audit-log` as its own process consuming a private topic in a fresh group
  and schema; N events are published into Kafka as fast as the producer goes, and the clock stops
  when the last one is in the chain (the chain is then verified). It runs twice: "before" with
  `TSUNAGU_AUDIT_BATCH_MAX=6` (at most 6 events per transaction, what six one-event-at-a-time
  consumers gave) and "after" with the defaults (batches of up to 500 from one batch consumer).
Needs the stack's Kafka and PostgreSQL. Everything it creates (schemas, topic) is removed at the end.
Raw results go to bench/results/<time>-audit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
from confluent_kafka.admin import AdminClient
from record import Recorder
from tsunagu_audit_log.chain import NewEvent
from tsunagu_audit_log.store import PostgresStore, database_for
from tsunagu_core.bus import Outgoing
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.envelope import wrap
from tsunagu_core.wire.events_pb2 import AuditEvent

REPO = Path(__file__).resolve().parents[1]
KAFKA = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
POSTGRES = os.environ.get("TSUNAGU_POSTGRES_DSN", "postgresql://tsunagu:tsunagu@127.0.0.1:5432/tsunagu")
DETAILS = b'{"channel":"finance:orders","signature":"' + b"x" * 88 + b'"}'


recorder: Recorder


def report(name: str, count: int, seconds: float, **details: object) -> None:
    recorder.add(name, count / seconds, "events/s", events=count, seconds=seconds, **details)
    print(f"  {name:<58} {count / seconds:>10,.0f} events/s  ({count:,} in {seconds:.2f} s)", flush=True)


def event(n: int, run: str) -> NewEvent:
    return NewEvent(
        event_id=f"{run}-{n}",
        time_ms=int(time.time() * 1000),
        source="bench",
        type="audit.event",
        actor=f"user-{n % 100}",
        action="channel.publish",
        subject=f"finance:orders-{n % 10}",
        outcome="ok",
        client_ip="10.0.0.1",
        details=DETAILS,
    )


async def drop(schema: str, service: str) -> None:
    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.execute("DELETE FROM tsunagu_migrations WHERE service = $1", service)
    finally:
        await conn.close()


async def bench_store(events: int) -> None:
    run = uuid.uuid4().hex[:8]
    schema = f"audit_bench_{run}"
    database = database_for(POSTGRES, schema)
    await database.start()
    store = PostgresStore(database, schema)
    n = 0
    try:
        for batch in (1, 50, 500):
            total = min(events, 2000) if batch == 1 else events
            started = time.perf_counter()
            for _ in range(total // batch):
                await store.append([event(n + i, run) for i in range(batch)])
                n += batch
            report(f"store append, batches of {batch}", total, time.perf_counter() - started)
        total = min(events, 2000)
        started = time.perf_counter()

        async def writer(k: int) -> None:
            for i in range(total // 8):
                await store.append([event(10_000_000 + k * 1_000_000 + i, run)])

        await asyncio.gather(*(writer(k) for k in range(8)))
        report("store append, 8 concurrent writers of 1 event", total, time.perf_counter() - started)
        started = time.perf_counter()
        head = await store.head()
        rows = 0
        async for _ in store.rows(0, head.seq):
            rows += 1
        report("chain walk (read back for verify)", rows, time.perf_counter() - started)
    finally:
        await database.close()
        await drop(schema, database.service)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def bench_service(events: int, consumers: int, label: str, settings: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:8]
    schema, topic, group = f"audit_bench_{run}", f"tsunagu.audit.bench-{run}", f"audit-bench-{run}"
    bus = KafkaBus(KAFKA, client_id=f"audit-bench-{run}")
    await bus.start()
    await bus.ensure_topics([topic])
    port = free_port()
    env = {
        **os.environ,
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_DATABASE": "postgres",
        "TSUNAGU_KAFKA_BOOTSTRAP": KAFKA,
        "TSUNAGU_POSTGRES_DSN": POSTGRES,
        "TSUNAGU_AUDIT_TOPIC": topic,
        "TSUNAGU_AUDIT_GROUP": group,
        "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
        "TSUNAGU_AUDIT_CONSUMERS": str(consumers),
        "TSUNAGU_AUDIT_GATEWAY_EVENTS": "false",
        "TSUNAGU_AUDIT_VERIFY_INTERVAL": "0",
        "TSUNAGU_LOG_LEVEL": "warning",
        **settings,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tsunagu", "serve", "audit-log", "--port", str(port), cwd=REPO, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for _ in range(300):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("audit-log never became ready")

            async def newest() -> int:
                items = (await http.get("/v1/audit", params={"limit": "1"})).json()["items"]
                return int(items[0]["seq"]) if items else 0

            # One event first, so the group has joined and the partitions are assigned before the clock runs.
            warm = wrap("audit.event", AuditEvent(actor="bench", action="warmup"), source="bench")
            await bus.publish(topic, warm.SerializeToString(), key="bench")
            while await newest() < 1:
                await asyncio.sleep(0.05)
            started = time.perf_counter()
            pending = []
            for n in range(events):
                payload = AuditEvent(
                    actor=f"user-{n % 100}", action="channel.publish", subject="finance:orders", details=DETAILS
                )
                envelope = wrap("audit.event", payload, source="bench")
                pending.append(Outgoing(topic, envelope.SerializeToString(), key=f"user-{n % 100}"))
                if len(pending) == 1000:
                    await bus.publish_many(pending)
                    pending = []
            await bus.publish_many(pending)
            published = time.perf_counter() - started
            while await newest() < events + 1:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            report(f"{label}: Kafka publish_many ({events:,} events, batches of 1,000)", events, published)
            details = {"configuration": label, "settings": settings, "target": ">= 10,000/s, verify passes"}
            samples = {}
            for line in (await http.get("/metrics")).text.splitlines():
                name, _, value = line.partition(" ")
                if name.startswith(("tsunagu_audit_batch_size_", "tsunagu_audit_insert_seconds_")):
                    samples[name] = float(value)
            batches = samples.get("tsunagu_audit_batch_size_count", 0) or 1
            print(
                f"  {batches:,.0f} batches, {samples.get('tsunagu_audit_batch_size_sum', 0) / batches:.1f} events each,"
                f" {1000 * samples.get('tsunagu_audit_insert_seconds_sum', 0) / batches:.2f} ms per insert",
                flush=True,
            )
            verify = (await http.get("/v1/audit/verify")).json()
            print(f"  verify: ok={verify['ok']} rows_checked={verify['rows_checked']}", flush=True)
            report(
                f"{label}: Kafka -> audit-log -> PostgreSQL, {consumers} consumer(s)",
                events,
                elapsed,
                batches=batches,
                events_per_batch=samples.get("tsunagu_audit_batch_size_sum", 0) / batches,
                verify_ok=verify["ok"],
                rows_checked=verify["rows_checked"],
                **details,
            )
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
        await bus.close()
        admin = AdminClient({"bootstrap.servers": KAFKA})
        for future in admin.delete_topics([topic], operation_timeout=10).values():
            future.result()
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            future.result()
        await drop(schema, f"audit-log/{schema}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--only", choices=["store", "service"], default=None)
    parser.add_argument("--configurations", default="before,after")
    args = parser.parse_args()
    global recorder
    recorder = Recorder("audit", vars(args))
    print(f"audit-log insert throughput ({os.cpu_count()} cores)", flush=True)
    try:
        if args.only != "service":
            await bench_store(min(args.events, 20_000))
        if args.only != "store":
            # "before" gets a fifth of the events: at its ~500/s the full count takes minutes.
            configurations = {
                "before": ({"TSUNAGU_AUDIT_BATCH_MAX": "6"}, 6, max(1000, args.events // 5)),
                "after": ({}, args.consumers, args.events),
            }
            for name in args.configurations.split(","):
                settings, consumers, events = configurations[name]
                await bench_service(events, consumers, name, settings)
    finally:
        recorder.save()


if __name__ == "__main__":
    asyncio.run(main())
