"""The bridge's MQTT 5 connection (gmqtt): a runtime dependency named "mqtt".

- Persistent session (clean start off, session expiry), so messages for the bridge wait at the
  broker while it is away, and its unacknowledged QoS 1 publishes are resent after a reconnect.
- `optimistic_acknowledgement=False`: an incoming QoS 1 message is PUBACKed only after the handler
  returned, i.e. after the platform accepted it; a handler that raises sends no PUBACK, so the broker
  redelivers the message on the next connection.
- Reconnects back off exponentially up to `reconnect_max`; subscriptions are renewed on every connect.
- `publish()` returns once the broker acknowledged the QoS 1 publish (PUBACK), which gmqtt does not
  expose: the in-flight store below resolves a future per packet id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gmqtt import Client, Message, Subscription
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv50
from gmqtt.storage import PersistentStorage
from prometheus_client import Gauge
from tsunagu_core.tls import client_context

from tsunagu_mqtt_bridge.mapping import BrokerAddress

log = logging.getLogger("tsunagu.mqtt_bridge.connection")

CONNECTED = Gauge("tsunagu_mqtt_connected", "1 while the bridge holds an MQTT connection")

MessageHandler = Callable[[str, bytes, int, dict[str, Any]], Awaitable[int]]


HANDSHAKE_TIMEOUT = 10.0


class MqttError(Exception):
    """The MQTT broker did not take a publish."""


class _InflightStore(PersistentStorage):
    """gmqtt's in-flight QoS store, telling waiters when the broker acknowledged their packet id."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: dict[int, asyncio.Future[None]] = {}

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        waiter = self.waiters.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        # The broker started a new session: what was in flight is gone and will not be resent.
        super().clear()
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(MqttError("the broker lost the session before acknowledging"))


class _Client(Client):
    backoff_first = 0.2
    backoff_max = 10.0

    def publish_tracked(self, topic: str, payload: bytes, qos: int, retain: bool, **properties: Any) -> int:
        """gmqtt's publish, returning the packet id."""
        message = Message(topic, payload, qos=qos, retain=retain, **properties)
        mid, package = self._connection.publish(message)
        if qos > 0:
            self._persistent_storage.push_message(mid, package)
        return int(mid)

    async def reconnect(self, delay: bool = False) -> None:
        failures = self._connection_state.failed_connections
        self.reconnect_delay = min(self.backoff_first * 2**failures, self.backoff_max)
        await super().reconnect(delay)


class MqttConnection:
    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        session_expiry: int,
        keepalive: int,
        reconnect_max: float,
        receive_maximum: int = 1000,
        subscriptions: Sequence[str],
        handler: MessageHandler,
    ) -> None:
        self.address = address
        # mqtts://: TLS with the TSUNAGU_TLS_* CA and client certificate (mTLS to a broker that requires one)
        self.ssl: ssl.SSLContext | bool = client_context() if address.ssl else False
        self.client_id = client_id
        self.keepalive = keepalive
        self.topic_filters = list(subscriptions)
        self.handler = handler
        self.connected = asyncio.Event()
        self._handshake_lost = asyncio.Event()
        self._store = _InflightStore()
        self._client = _Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            persistent_storage=self._store,
            session_expiry_interval=session_expiry,
            # MQTT 5 flow control: QoS 1 messages the broker may have unacknowledged to us at once (the
            # relay PUBACKs a batch after one broker call, so this is how big a batch can get).
            receive_maximum=receive_maximum,
            logger=logging.getLogger("tsunagu.mqtt_bridge.gmqtt"),
        )
        self._client.backoff_max = reconnect_max
        self._client.set_config({"reconnect_retries": UNLIMITED_RECONNECTS, "reconnect_delay": 0.2})
        if address.username:
            self._client.set_auth_credentials(address.username, address.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._subscriptions: list[Subscription] | None = None
        self._started = False

    # Dependency protocol (lifecycle.Runtime retries start() with backoff until it succeeds).

    async def start(self) -> None:
        """Connect once; the runtime retries with backoff. gmqtt waits for a CONNACK forever and
        reconnects by itself meanwhile, also when the broker drops every handshake (a plaintext client on
        its TLS-only port): the first attempt's loss, or a 10 s wait, ends it with the reason instead."""
        where = f"MQTT broker at {self.address.host}:{self.address.port}"
        self._handshake_lost.clear()
        connect = asyncio.ensure_future(
            self._client.connect(
                self.address.host, self.address.port, ssl=self.ssl, keepalive=self.keepalive, version=MQTTv50
            )
        )
        lost = asyncio.ensure_future(self._handshake_lost.wait())
        try:
            done, _ = await asyncio.wait(
                {connect, lost}, timeout=HANDSHAKE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if connect in done and connect.exception() is None:
            self._started = True
            return
        connect.cancel()
        with contextlib.suppress(Exception):
            await self._client.disconnect()  # stops gmqtt's own reconnecting until the next start()
        error = connect.exception() if connect.done() and not connect.cancelled() else None
        if isinstance(error, ssl.SSLError):
            raise MqttError(f"{where}: TLS handshake failed: {error} (check TSUNAGU_TLS_*)") from None
        if error is not None:
            raise MqttError(f"{where}: {error!r}") from None
        if not self.address.ssl:
            hint = "the port requires TLS? use mqtts://"
        else:
            hint = "check TSUNAGU_TLS_* and the broker's certificate"
        what = "closed the connection during" if lost in done else f"did not answer within {HANDSHAKE_TIMEOUT:.0f}s of"
        raise MqttError(f"{where} {what} the MQTT handshake: {hint}")

    async def ping(self) -> None:
        if not self.is_connected:
            raise MqttError(f"not connected to {self.address.host}:{self.address.port}, reconnecting")

    async def close(self) -> None:
        if self._started:
            self._started = False
            try:
                await asyncio.wait_for(self._client.disconnect(), 5)
            except Exception as exc:  # the socket may be gone already
                log.debug("mqtt disconnect: %r", exc)
        self.connected.clear()
        CONNECTED.set(0)

    @property
    def is_connected(self) -> bool:
        return bool(self._client._connection is not None and self._client.is_connected)

    # callbacks

    def _on_connect(self, client: Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        if self._subscriptions is None:
            self._subscriptions = [Subscription(f, qos=1) for f in self.topic_filters]
            client.subscribe(self._subscriptions)
        else:
            for subscription in self._subscriptions:
                client.resubscribe(subscription)
        self.connected.set()
        CONNECTED.set(1)
        log.info(
            "connected to MQTT %s:%d as %s (session present: %s)",
            self.address.host,
            self.address.port,
            self.client_id,
            bool(flags),
        )

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:
        if not self.connected.is_set():
            self._handshake_lost.set()
        self.connected.clear()
        CONNECTED.set(0)
        log.warning("MQTT connection lost; reconnecting")

    async def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        return await self.handler(topic, payload, qos, properties)

    # publishing

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float, **properties: Any
    ) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1) or for the write (QoS 0).

        Raises TimeoutError when not connected, or not acknowledged, within `timeout`; the message is
        then dropped from the in-flight store so it is not resent later."""
        async with asyncio.timeout(timeout):
            await self.connected.wait()
            mid = self._client.publish_tracked(topic, payload, qos, retain, **properties)
            if qos == 0:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._store.waiters[mid] = waiter
            try:
                await waiter
            except asyncio.CancelledError:
                self._store.waiters.pop(mid, None)
                self._store.remove_message_by_mid(mid)
                raise
