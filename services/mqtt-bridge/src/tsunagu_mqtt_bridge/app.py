"""mqtt-bridge application factory: the MQTT connection, the relay, the command consumer, `mqtt.request`."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from tsunagu_core import topics
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api

from tsunagu_mqtt_bridge.commands import CommandHandler, Ledger, MemoryLedger, RedisLedger
from tsunagu_mqtt_bridge.config import MqttBridgeSettings
from tsunagu_mqtt_bridge.connection import MqttConnection
from tsunagu_mqtt_bridge.mapping import (
    Rejected,
    parse_mqtt_url,
    payload_to_bytes,
    payload_to_json,
    validate_publish_topic,
)
from tsunagu_mqtt_bridge.relay import REJECTED, Relay

SERVICE = "mqtt-bridge"
NEEDS = ("bus", "broker", "mqtt")
REQUEST_METHOD = "mqtt.request"
RESPONSE_ROOT = "tsunagu/bridge/"

log = logging.getLogger("tsunagu.mqtt_bridge")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runtime: Runtime, settings: MqttBridgeSettings) -> FastAPI:
    client_id = settings.client_id or f"tsunagu-mqtt-bridge-{runtime.settings.node_name}"
    response_prefix = RESPONSE_ROOT + re.sub(r"[^\w\-.]", "_", client_id) + "/"
    relay = Relay(settings, runtime.broker, response_root=RESPONSE_ROOT)
    share = f"$share/{settings.share_group}/" if settings.share_group else ""
    filters = [share + topic_filter for topic_filter in settings.filters] + [response_prefix + "#"]
    connection = MqttConnection(
        parse_mqtt_url(runtime.settings.mqtt_url),
        client_id=client_id,
        session_expiry=settings.session_expiry,
        keepalive=settings.keepalive,
        receive_maximum=settings.receive_maximum,
        reconnect_max=settings.reconnect_max,
        subscriptions=filters,
        handler=relay.handle,
    )
    runtime.add_dependency("mqtt", connection)
    ledger: Ledger = (
        RedisLedger(runtime.settings.redis_url, settings.dedupe_ttl)
        if runtime.settings.broker == "redis"
        else MemoryLedger(settings.dedupe_ttl)
    )
    commands = CommandHandler(connection, runtime.broker, ledger)

    # Commands are sent one at a time, in order (each waits for its PUBACK): an event handler.
    command_consumer = consumer_hook(
        runtime,
        needs=("bus", "broker"),
        topics=[topics.MQTT_COMMANDS],
        group=settings.consumer_group,
        handler=commands.handle,
        name="mqtt-bridge-commands",
    )

    @asynccontextmanager
    async def bridging() -> AsyncIterator[None]:
        # The relay runs before the connection is up: gmqtt hands messages over as soon as it connects.
        relay.start(lambda: runtime.wait_ready(("broker",)))
        try:
            async with command_consumer():
                yield
        finally:
            await relay.stop()
            await ledger.close()

    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS, hooks=[bridging], **internal_api(runtime))
    app.state.settings = settings
    app.state.relay = relay
    app.state.connection = connection

    @app.post("/{method}", tags=["mqtt-bridge"], response_model=None)
    async def rpc(method: str, request: Request) -> JSONResponse | dict[str, Any]:
        """Client RPCs routed here by the gateway (`TSUNAGU_GATEWAY_RPC_ROUTES={"mqtt.": URL}`).

        `mqtt.request` with `{topic, payload, timeout?}` publishes an MQTT 5 request (response topic and
        correlation data) and answers with the device's response `{topic, payload, encoding}`."""
        if method != REQUEST_METHOD:
            return _error(404, f"unknown method {method!r}; this backend serves {REQUEST_METHOD!r}")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return _error(400, "expected {method, user, client, data: {topic, payload, timeout?}}")
        if not body.get("user"):
            return _error(403, "device requests need an authenticated user")
        data: dict[str, Any] = body["data"]
        topic = data.get("topic")
        if not isinstance(topic, str):
            return _error(400, "data.topic must be a string")
        try:
            validate_publish_topic(topic)
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            return _error(400, str(exc))
        if topic.startswith(RESPONSE_ROOT):
            return _error(400, f"topics under {RESPONSE_ROOT!r} are the bridge's own")
        timeout = data.get("timeout", settings.request_timeout)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
            return _error(400, "data.timeout must be a positive number of seconds")
        timeout = min(float(timeout), settings.request_timeout_max)
        payload = payload_to_bytes(data.get("payload", ""))
        if len(payload) > settings.max_payload_bytes:
            return _error(413, f"payload of {len(payload)} bytes > {settings.max_payload_bytes}")
        correlation = uuid.uuid4().hex.encode()
        waiter: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        relay.pending_requests[correlation] = waiter
        try:
            async with asyncio.timeout(timeout):
                await connection.publish(
                    topic,
                    payload,
                    qos=1,
                    timeout=timeout,
                    response_topic=response_prefix + "responses",
                    correlation_data=correlation,
                    user_property=[("user", str(body["user"]))],
                )
                response_topic, response = await waiter
        except TimeoutError:
            return _error(504, f"no response from {topic!r} within {timeout:g}s")
        finally:
            relay.pending_requests.pop(correlation, None)
        return {"topic": response_topic, **payload_to_json(response)}

    return app
