"""audit-log application factory: consumers, checkpoints, verification, and the query API."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from tsunagu_core import topics
from tsunagu_core.bus import BatchPolicy, RetryPolicy
from tsunagu_core.config import ConfigError
from tsunagu_core.database import DatabaseUnavailable
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api

from tsunagu_audit_log.chain import Row, Signer
from tsunagu_audit_log.config import AuditSettings
from tsunagu_audit_log.service import AuditLog
from tsunagu_audit_log.store import AuditStore, MemoryStore, PostgresStore, Query, database_for

SERVICE = "audit-log"
NEEDS = ("bus",)
# Named for the service: in `tsunagu run` every service has its own pool and migrations.
DATABASE = "audit-database"
MAX_LIMIT = 1000
# Audit events must not be given up on lightly: ~40 s of retries before the dead-letter topic.
RETRY = RetryPolicy(max_attempts=12, first_backoff=0.1, max_backoff=5.0)

log = logging.getLogger("tsunagu.audit")


class BadRequest(ValueError):
    pass


def load_signer(settings: AuditSettings, *, persistent_store: bool, production: bool = False) -> Signer:
    trusted = []
    for text in filter(None, (part.strip() for part in settings.trusted_keys.split(","))):
        try:
            key = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ConfigError(f"TSUNAGU_AUDIT_TRUSTED_KEYS: {text!r} is not base64") from None
        if len(key) != 32:
            raise ConfigError(f"TSUNAGU_AUDIT_TRUSTED_KEYS: {text!r} is not a 32-byte Ed25519 public key")
        trusted.append(key)
    try:
        if settings.signing_key:
            return Signer.from_text(settings.signing_key, trusted)
        if settings.signing_key_file:
            return Signer.from_file(settings.signing_key_file, trusted)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"TSUNAGU_AUDIT_SIGNING_KEY(_FILE): {exc}") from None
    signer = Signer.generate(trusted)
    if persistent_store and production:
        raise ConfigError(
            "audit-log: TSUNAGU_ENV=production without TSUNAGU_AUDIT_SIGNING_KEY(_FILE): no checkpoint would be"
            " signed, so a rewrite of the chain with recomputed hashes would go unnoticed"
        )
    if persistent_store:
        log.warning(
            "no TSUNAGU_AUDIT_SIGNING_KEY(_FILE): no checkpoints are signed, so a rewrite of the chain with"
            " recomputed hashes goes unnoticed; configure an Ed25519 key"
        )
    else:
        log.warning("audit checkpoints are signed with a key generated at start (memory mode)")
    return signer


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value if value else None


def _time(request: Request, name: str) -> int | None:
    value = _text(request, name)
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be milliseconds since the epoch or an ISO 8601 time, not {value!r}") from None
    if moment.tzinfo is None:
        raise BadRequest(f"{name} must carry a time zone (e.g. 2026-01-01T00:00:00Z)")
    return int(moment.timestamp() * 1000)


def encode_cursor(seq: int, newest_first: bool) -> str:
    raw = json.dumps({"s": seq, "o": "desc" if newest_first else "asc"}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, newest_first: bool) -> int:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        seq, order = value["s"], value["o"]
    except (ValueError, KeyError, TypeError):
        raise BadRequest("cursor is not one this service gave") from None
    if not isinstance(seq, int) or order not in ("asc", "desc"):
        raise BadRequest("cursor is not one this service gave")
    if (order == "desc") != newest_first:
        raise BadRequest("cursor was given for the other order")
    return seq


def parse_query(request: Request) -> Query:
    known = {"subject", "action", "actor", "since", "until", "limit", "cursor", "order"}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc (oldest first) or desc (newest first)")
    newest_first = order == "desc"
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    since, until = _time(request, "since"), _time(request, "until")
    if since is not None and until is not None and since > until:
        raise BadRequest("since is after until")
    cursor = _text(request, "cursor")
    return Query(
        subject=_text(request, "subject"),
        action=_text(request, "action"),
        actor=_text(request, "actor"),
        since_ms=since,
        until_ms=until,
        limit=int(raw_limit),
        after_seq=decode_cursor(cursor, newest_first) if cursor else None,
        newest_first=newest_first,
    )


def row_json(row: Row) -> dict[str, Any]:
    item: dict[str, Any] = {
        "seq": row.seq,
        "event_id": row.event_id,
        "time_ms": row.time_ms,
        "time": datetime.fromtimestamp(row.time_ms / 1000, tz=UTC).isoformat(timespec="milliseconds"),
        "source": row.source,
        "type": row.type,
        "actor": row.actor,
        "action": row.action,
        "subject": row.subject,
        "outcome": row.outcome,
        "client_ip": row.client_ip,
        "prev_hash": row.prev_hash.hex(),
        "hash": row.hash.hex(),
    }
    try:
        item["details"] = json.loads(row.details) if row.details else None
    except ValueError:
        item["details"] = None
        item["details_base64"] = base64.b64encode(row.details).decode()
    return item


def create_app(runtime: Runtime, settings: AuditSettings) -> FastAPI:
    persistent = runtime.settings.database == "postgres"
    store: AuditStore
    needs: tuple[str, ...] = NEEDS
    if persistent:
        database = database_for(runtime.settings.postgres_dsn, settings.schema_name)
        runtime.add_dependency(DATABASE, database)
        store = PostgresStore(database, settings.schema_name)
        needs = (*NEEDS, DATABASE)
    else:
        store = MemoryStore()
    audit = AuditLog(
        store,
        load_signer(settings, persistent_store=persistent, production=runtime.settings.env == "production"),
        gateway_topic=topics.GATEWAY_EVENTS,
        checkpoint_rows=settings.checkpoint_rows,
        checkpoint_interval=settings.checkpoint_interval,
        max_batch=settings.batch_max,
        linger=settings.batch_linger,
    )
    subscribed = [settings.topic, *([topics.GATEWAY_EVENTS] if settings.gateway_events else [])]

    async def prepare() -> None:
        if settings.topic not in topics.ALL:
            await runtime.bus.ensure_topics([settings.topic])

    # Nothing is consumed before the store answers (`needs`); leaving the hook lets the batches in
    # hand reach the store through the batcher and commits them.
    consumers = consumer_hook(
        runtime,
        needs=needs,
        topics=subscribed,
        group=settings.group,
        batch_handler=audit.handle_batch,
        consumers=settings.consumers,
        batch=BatchPolicy(max_messages=settings.batch_max),
        retry=RETRY,
        prepare=prepare,
        name="audit-consume",
    )

    async def when_ready(work: Callable[[], Awaitable[None]]) -> None:
        await runtime.wait_ready(needs)
        await work()

    @asynccontextmanager
    async def run_audit_log() -> AsyncIterator[None]:
        audit.batcher.start()
        tasks = []
        # A key generated at start signs nothing in PostgreSQL: no later run could verify it.
        if not (persistent and audit.signer.ephemeral):
            tasks.append(asyncio.create_task(when_ready(audit.run_checkpoints), name="audit-checkpoints"))
        if settings.verify_interval > 0:
            verifier = when_ready(lambda: audit.run_verifier(settings.verify_interval))
            tasks.append(asyncio.create_task(verifier, name="audit-verify"))
        try:
            async with consumers():
                yield
            # (the consumers stop first: their events in flight still reach the store through the batcher)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await audit.batcher.stop()

    app = create_service_app(
        service=SERVICE, runtime=runtime, needs=needs, hooks=[run_audit_log], **internal_api(runtime)
    )
    app.state.settings = settings
    app.state.audit = audit

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return JSONResponse({"error": f"the audit store is not reachable yet: {exc}"}, status_code=503)

    @app.get("/v1/audit", tags=["audit"])
    async def list_events(request: Request) -> dict[str, Any]:
        """Audit events, newest first (`order=asc`: oldest first), filtered and paginated by an opaque cursor."""
        query = parse_query(request)
        rows = await store.query(query)
        next_cursor = encode_cursor(rows[-1].seq, query.newest_first) if len(rows) == query.limit else None
        return {"items": [row_json(row) for row in rows], "next_cursor": next_cursor}

    @app.get("/v1/audit/verify", tags=["audit"])
    async def verify_chain() -> JSONResponse:
        """Walk the whole chain and its signed checkpoints; `first_broken` says where tampering starts."""
        report = await audit.verify()
        return JSONResponse(report.to_json())

    @app.get("/v1/audit/public-key", tags=["audit"])
    async def public_key(request: Request) -> Any:
        """The Ed25519 key that signs checkpoints: JSON by default, PEM with `Accept: application/x-pem-file`."""
        if "pem" in request.headers.get("accept", ""):
            return PlainTextResponse(audit.signer.public_pem(), media_type="application/x-pem-file")
        return {
            "algorithm": "Ed25519",
            "public_key": base64.b64encode(audit.signer.public_key).decode(),
            "pem": audit.signer.public_pem(),
            "ephemeral": audit.signer.ephemeral,
            "signs_checkpoints": not (persistent and audit.signer.ephemeral),
        }

    return app
