"""audit-log as its own process on real Kafka and PostgreSQL: nothing lost or doubled across a kill -9."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tsunagu_core import topics
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.envelope import wrap
from tsunagu_core.testing import KAFKA_BOOTSTRAP, POSTGRES_DSN, drop_schema
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent


async def publish(bus: KafkaBus, run: str, numbers: range) -> list[str]:
    envelopes = [
        wrap(
            "audit.event",
            AuditEvent(actor=f"user-{n % 7}", action="auth.login", subject=run, details=b'{"n":%d}' % n, outcome="ok"),
            source="e2e",
        )
        for n in numbers
    ]
    await asyncio.gather(
        *(bus.publish(topics.AUDIT, e.SerializeToString(), key=f"user-{i % 7}") for i, e in enumerate(envelopes))
    )
    return [e.id for e in envelopes]


def listed(base: str, **params: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    query: dict[str, str] = {**params, "limit": "1000", "order": "asc"}
    while True:
        body = httpx.get(base + "/v1/audit", params=query, timeout=10).json()
        found += body["items"]
        if not body["next_cursor"]:
            return found
        query["cursor"] = body["next_cursor"]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def tamper(schema: str, seq: int) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f"UPDATE {schema}.audit_log SET details = $1 WHERE seq = $2", b'{"n":"forged"}', seq)
    finally:
        await conn.close()


def test_every_event_exactly_once_across_a_kill_and_the_chain_verifies(
    start_service: Any, real_env: dict[str, str], tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:10]
    schema, group = f"audit_e2e_{run}", f"audit-e2e-{run}"
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "audit.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    env = {
        **real_env,
        "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
        "TSUNAGU_AUDIT_GROUP": group,
        "TSUNAGU_AUDIT_SIGNING_KEY_FILE": str(key_file),
        "TSUNAGU_AUDIT_CHECKPOINT_ROWS": "50",
        "TSUNAGU_AUDIT_CHECKPOINT_INTERVAL": "1",
    }
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id=f"audit-e2e-{run}")
    loop = asyncio.Runner()
    loop.run(bus.start())
    first = second = start_service(["serve", "audit-log"], env)
    try:
        first.wait_ready()
        ids = loop.run(publish(bus, run, range(0, 300)))
        wait_for(lambda: len(listed(first.base, subject=run)) >= 30, 30, "the first events to be stored")
        first.process.kill()  # kill -9, mid-stream
        first.process.wait()
        ids += loop.run(publish(bus, run, range(300, 400)))
        forced = GatewayEvent(
            kind=GatewayEvent.DISCONNECTED, user_id=f"u-{run}", session_id="s1", code=3500, reason="token revoked"
        )
        logout = wrap("gateway.disconnected", forced, source="ws-gateway/e2e")
        loop.run(bus.publish(topics.GATEWAY_EVENTS, logout.SerializeToString(), key=f"u-{run}"))

        second = start_service(["serve", "audit-log"], env)
        second.wait_ready()
        wait_for(lambda: len(listed(second.base, subject=run)) >= 400, 45, "every event after the restart")
        rows = listed(second.base, subject=run)
        assert sorted(row["event_id"] for row in rows) == sorted(ids), "each event exactly once"
        assert sorted(row["details"]["n"] for row in rows) == list(range(400))
        # The forced logout rides on another topic: it may come a little later.
        wait_for(lambda: listed(second.base, subject=f"u-{run}"), 15, "the forced logout")
        forced_rows = listed(second.base, subject=f"u-{run}")
        assert [(r["action"], r["event_id"]) for r in forced_rows] == [("session.forced_logout", logout.id)]

        public = httpx.get(second.base + "/v1/audit/public-key").json()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert base64.b64decode(public["public_key"]) == raw and public["ephemeral"] is False
        # The checkpointer signs at least once more once it has seen the last events.
        wait_for(
            lambda: (
                httpx.get(second.base + "/v1/audit/verify", timeout=30).json()["last_checkpoint"]["seq"]
                >= rows[-1]["seq"]
            ),
            15,
            "a checkpoint covering every row",
        )
        report = httpx.get(second.base + "/v1/audit/verify", timeout=30).json()
        assert report["ok"] is True, report
        assert report["rows_checked"] >= 401 and report["first_broken"] is None
        metrics = httpx.get(second.base + "/metrics").text
        assert "tsunagu_audit_chain_ok 1.0" in metrics
        assert "tsunagu_audit_insert_seconds_count" in metrics

        # Someone with database access alters one row behind the service's back.
        loop.run(tamper(schema, rows[10]["seq"]))
        broken = httpx.get(second.base + "/v1/audit/verify", timeout=30).json()
        assert broken["ok"] is False and broken["first_broken"]["seq"] == rows[10]["seq"], broken
        assert "tsunagu_audit_chain_ok 0.0" in httpx.get(second.base + "/metrics").text
        assert second.stop() == 0
    finally:
        loop.run(bus.close())
        loop.run(drop_schema(schema))
        loop.close()
        for service in (first, second):
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait()
        admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)


def appended(base: str) -> float:
    """Audit events this replica appended (its /metrics), whatever their type."""
    total = 0.0
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tsunagu_audit_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_replicas_share_the_partitions_and_the_chain_holds_when_one_is_killed(
    start_service: Any, real_env: dict[str, str]
) -> None:
    """Two audit-log replicas in one consumer group append to one chain; one is killed -9 mid-stream; the
    survivor takes its partitions: every event once, per-actor order kept, and the chain verifies across
    both writers."""
    run = uuid.uuid4().hex[:10]
    schema, group = f"audit_e2e_{run}", f"audit-e2e-{run}"
    env = {
        **real_env,
        "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
        "TSUNAGU_AUDIT_GROUP": group,
        "TSUNAGU_AUDIT_CHECKPOINT_INTERVAL": "1",
    }
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id=f"audit-e2e-{run}")
    loop = asyncio.Runner()
    loop.run(bus.start())
    replicas = [start_service(["serve", "audit-log"], env) for _ in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        doomed, survivor = replicas
        ids: list[str] = []
        # Both hold partitions once the group has settled: publish until each has appended some.
        batch = 0
        deadline = time.monotonic() + 60
        while not (appended(doomed.base) and appended(survivor.base)):
            assert time.monotonic() < deadline, "the two replicas never shared the partitions"
            ids += loop.run(publish(bus, run, range(batch * 70, batch * 70 + 70)))
            batch += 1
            time.sleep(1)
        start = batch * 70
        # Ranges start at multiples of 7, so an event's actor is its Kafka key (publish keys by position).
        ids += loop.run(publish(bus, run, range(start, start + 294)))
        doomed.process.kill()  # kill -9 while the second part streams in
        doomed.process.wait()
        ids += loop.run(publish(bus, run, range(start + 294, start + 392)))
        wait_for(lambda: len(listed(survivor.base, subject=run)) >= len(ids), 60, "every event after the kill")
        rows = listed(survivor.base, subject=run)
        assert sorted(row["event_id"] for row in rows) == sorted(ids), "each event exactly once"
        for actor in {row["actor"] for row in rows}:  # per key, in publish order
            numbers = [row["details"]["n"] for row in rows if row["actor"] == actor]
            assert numbers == sorted(numbers), f"{actor}'s events out of order"
        report = httpx.get(survivor.base + "/v1/audit/verify", timeout=30).json()
        assert report["ok"] is True and report["first_broken"] is None, report
        assert report["rows_checked"] >= len(ids)
    finally:
        loop.run(bus.close())
        loop.run(drop_schema(schema))
        loop.close()
        admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)
