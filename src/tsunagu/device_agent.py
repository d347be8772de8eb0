"""`tsunagu device-agent`: a device's end of WebRTC control (docs/webrtc.md), with aiortc.

The agent connects to the gateway as the device's user and answers the calls of its operators on
`webrtc:control#<device>,<operator>` (the signaling PeerLink speaks: clients/js/src/webrtc.ts). Commands then
come over the data channel as `{"id": "...", "payload": ...}` and are acknowledged there with `{"ack": id}`.
The same commands may also come over MQTT, on the device's command topic (a publish to `mqtt:<topic>` through
the gateway and mqtt-bridge): a controller falls back to that path when the data channel cannot be made or
drops, and resends what was not acknowledged. Each command id is carried out once, whichever path brings it,
so a command that went both ways is not done twice.

Telemetry goes both ways too: every sample to each operator whose data channel is open (low latency, at the
device's rate), and to the MQTT telemetry topic at its own, usually slower, rate (for everyone else: the
board, the twin rooms, history). Samples carry `seq` and `boot`, so a controller that gets one sample by both
paths shows it once.

    pip install 'tsunagu[device-agent]'
    tsunagu device-agent --gateway ws://gw:8080/connection/websocket --token $DEVICE_TOKEN \\
        --device rover-1 --operators alice,bob --mqtt mqtt://broker:1883 --command-topic plant/rover-1/set \\
        --ack-topic plant/rover-1/acks
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("tsunagu.device_agent")

CALL = "control"
# Command ids remembered to refuse a second delivery (by the other path, or a resend).
REMEMBERED_IDS = 100_000

Handler = Callable[[str, Any, str], Awaitable[None] | None]


def control_channel(device: str, operator: str) -> str:
    """The signaling channel of an operator's control link to a device (PeerLink's naming)."""
    return f"webrtc:{CALL}#{','.join(sorted((device, operator)))}"


@dataclass
class Received:
    """What the agent carried out, in order, and by which path."""

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    duplicates: int = 0


class DeviceAgent:
    """Answers operators' calls and carries out commands from the data channel and from MQTT, once each."""

    def __init__(
        self,
        client: Any,  # centrifuge.Client, connected as the device's user
        device: str,
        operators: Sequence[str],
        on_command: Handler,
        ice_servers: Sequence[dict[str, Any]] = (),
        ack_topic: str = "",
        telemetry_topic: str = "",
    ) -> None:
        self.client = client
        self.device = device
        self.operators = list(operators)
        self.on_command = on_command
        self.ice_servers = list(ice_servers)
        # Where a command that came over MQTT is acknowledged (mqtt-bridge relays it to `mqtt:<ack_topic>`,
        # so the controller learns the device, not only the broker, has it); "" for none.
        self.ack_topic = ack_topic
        # Where telemetry samples are published over MQTT (send_telemetry); "" for the data channel only.
        self.telemetry_topic = telemetry_topic
        self.telemetry_sent = {"webrtc": 0, "mqtt": 0}
        self._telemetry_seq = 0
        # Tells a controller that sequence numbers started again (the agent restarted).
        self._boot = int(time.time() * 1000)
        self._mqtt: Any = None
        self._channels: dict[str, Any] = {}  # operator -> its open RTCDataChannel
        self.received = Received()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._links: dict[str, Any] = {}  # operator -> RTCPeerConnection
        self._subscriptions: dict[str, Any] = {}
        self._inbox: dict[str, asyncio.Queue[tuple[str, Any]]] = {}
        self._workers: list[asyncio.Task[None]] = []
        # Set once the MQTT path is subscribed (run_mqtt).
        self.mqtt_ready = asyncio.Event()

    # the two paths

    async def command(self, raw: str | bytes, path: str) -> str | None:
        """Carry out one command (JSON `{"id", "payload"}`) unless its id was carried out before; its id."""
        try:
            message = json.loads(raw)
        except ValueError:
            log.warning("a command that is not JSON over %s: dropped", path)
            return None
        command_id = message.get("id") if isinstance(message, dict) else None
        if not isinstance(command_id, str) or not command_id:
            log.warning("a command without an id over %s: dropped", path)
            return None
        if command_id in self._seen:
            self.received.duplicates += 1
            return command_id
        self._seen[command_id] = None
        if len(self._seen) > REMEMBERED_IDS:
            self._seen.popitem(last=False)
        self.received.ids.append(command_id)
        self.received.paths.append(path)
        outcome = self.on_command(command_id, message.get("payload"), path)
        if outcome is not None:
            await outcome
        return command_id

    async def run_mqtt(self, url: str, topic: str, client_id: str) -> None:
        """The fallback path: the device's command topic, QoS 1, until cancelled."""
        from gmqtt import Client as MqttClient

        parsed = urlparse(url)
        mqtt = MqttClient(client_id, clean_session=False, session_expiry_interval=300)
        subscribed = asyncio.Event()

        async def on_message(client: Any, received_topic: str, payload: bytes, qos: int, properties: Any) -> int:
            command_id = await self.command(payload, "mqtt")
            if command_id is not None and self.ack_topic:
                client.publish(self.ack_topic, json.dumps({"ack": command_id}), qos=1)
            return 0

        mqtt.on_message = on_message
        mqtt.on_subscribe = lambda *args: subscribed.set()
        await mqtt.connect(parsed.hostname or "127.0.0.1", parsed.port or 1883)
        mqtt.subscribe(topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), 10)
        self._mqtt = mqtt
        self.mqtt_ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            self._mqtt = None
            await mqtt.disconnect()

    # telemetry

    def send_telemetry(self, sample: dict[str, Any], mqtt: bool = True) -> int:
        """One sample to every open data channel and, with `mqtt`, to the telemetry topic; its `seq`."""
        self._telemetry_seq += 1
        # ts in ms with µs digits: a controller on the same clock can time the data channel's sub-ms paths.
        body = {**sample, "seq": self._telemetry_seq, "boot": self._boot, "ts": round(time.time() * 1000, 3)}
        over_channel = json.dumps({"telemetry": body})
        for channel in list(self._channels.values()):
            if channel.readyState == "open":
                channel.send(over_channel)
                self.telemetry_sent["webrtc"] += 1
        if mqtt and self.telemetry_topic and self._mqtt is not None and self._mqtt.is_connected:
            self._mqtt.publish(self.telemetry_topic, json.dumps(body), qos=0)
            self.telemetry_sent["mqtt"] += 1
        return self._telemetry_seq

    async def run_telemetry(
        self, sample: Callable[[], dict[str, Any]], every: float = 0.1, mqtt_every: float = 1.0
    ) -> None:
        """`sample()` every `every` seconds over the data channels, one in each `mqtt_every` seconds over MQTT
        too, until cancelled."""
        last_mqtt = 0.0
        while True:
            now = time.monotonic()
            over_mqtt = now - last_mqtt >= mqtt_every
            if over_mqtt:
                last_mqtt = now
            try:
                self.send_telemetry(sample(), mqtt=over_mqtt)
            except Exception:
                log.exception("a telemetry sample failed")
            await asyncio.sleep(every)

    # signaling (the answering side of PeerLink)

    async def start(self) -> None:
        from centrifuge import PublicationContext, SubscriptionEventHandler  # type: ignore[import-untyped]

        agent = self

        class Signals(SubscriptionEventHandler):
            def __init__(self, operator: str) -> None:
                self.operator = operator

            # The SDK runs these on its reading task: a reply awaited here would never be read. They queue
            # the work for the operator's worker instead, which keeps the signals in order.
            async def on_publication(self, ctx: PublicationContext) -> None:
                sender = ctx.pub.info.user if ctx.pub.info is not None else ""
                agent._inbox[self.operator].put_nowait((sender, ctx.pub.data))

            async def on_subscribed(self, ctx: Any) -> None:
                agent._inbox[self.operator].put_nowait((agent.device, {"type": "subscribed"}))

        for operator in self.operators:
            self._inbox[operator] = asyncio.Queue()
            self._workers.append(asyncio.create_task(self._work(operator), name=f"device-agent-{operator}"))
            subscription = self.client.new_subscription(
                control_channel(self.device, operator), events=Signals(operator)
            )
            self._subscriptions[operator] = subscription
            await subscription.subscribe()

    async def _work(self, operator: str) -> None:
        inbox = self._inbox[operator]
        while True:
            sender, signal = await inbox.get()
            try:
                if sender == self.device and signal == {"type": "subscribed"}:
                    await self._send(operator, {"type": "hello"})
                else:
                    await self._signal(operator, sender, signal)
            except Exception:
                log.exception("signaling from %s failed", operator)

    async def _send(self, operator: str, signal: dict[str, Any]) -> None:
        try:
            await self._subscriptions[operator].publish(signal)
        except Exception as exc:
            log.warning("signaling to %s failed: %r", operator, exc)

    async def _signal(self, operator: str, sender: str, signal: Any) -> None:
        if sender != operator or not isinstance(signal, dict):
            return  # our own messages, or somebody else's: only the operator signals this link
        kind = signal.get("type")
        if kind == "hello":
            await self._send(operator, {"type": "hello"})
        elif kind == "offer" and isinstance(signal.get("sdp"), str):
            await self._answer(operator, signal["sdp"])
        elif kind == "candidate" and isinstance(signal.get("candidate"), dict):
            await self._candidate(operator, signal["candidate"])
        elif kind == "bye":
            await self.drop(operator)

    async def _answer(self, operator: str, sdp: str) -> None:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        await self.drop(operator)
        servers = [RTCIceServer(s["urls"], s.get("username"), s.get("credential")) for s in self.ice_servers]
        connection = RTCPeerConnection(RTCConfiguration(iceServers=servers or None))
        self._links[operator] = connection

        @connection.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self._channels[operator] = channel

            @channel.on("close")
            def on_close() -> None:
                if self._channels.get(operator) is channel:
                    del self._channels[operator]

            @channel.on("message")
            async def on_message(message: str | bytes) -> None:
                command_id = await self.command(message, "webrtc")
                if command_id is not None and channel.readyState == "open":
                    channel.send(json.dumps({"ack": command_id}))

        await connection.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        # aiortc gathers its candidates before the answer: they travel in the SDP (no trickle from here).
        await connection.setLocalDescription(await connection.createAnswer())
        await self._send(operator, {"type": "answer", "sdp": connection.localDescription.sdp})

    async def _candidate(self, operator: str, init: dict[str, Any]) -> None:
        from aiortc.sdp import candidate_from_sdp

        connection = self._links.get(operator)
        line = str(init.get("candidate") or "")
        if connection is None or not line:
            return
        candidate = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        with contextlib.suppress(Exception):  # a candidate for a link already replaced
            await connection.addIceCandidate(candidate)

    async def drop(self, operator: str) -> None:
        """Close an operator's data channel link (its controller falls back to MQTT)."""
        connection = self._links.pop(operator, None)
        self._channels.pop(operator, None)
        if connection is not None:
            await connection.close()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for operator in list(self._links):
            await self.drop(operator)


async def run_agent(args: Any) -> None:  # the CLI's `device-agent`
    from centrifuge import Client

    async def print_command(command_id: str, payload: Any, path: str) -> None:
        print(json.dumps({"id": command_id, "payload": payload, "path": path}), flush=True)

    client = Client(args.gateway, token=args.token)
    await client.connect()
    agent = DeviceAgent(
        client,
        args.device,
        args.operators.split(","),
        print_command,
        ack_topic=args.ack_topic,
        telemetry_topic=args.telemetry_topic,
    )
    await agent.start()
    started = time.monotonic()

    def host_sample() -> dict[str, Any]:
        # What any host can tell about itself; a real device's agent samples its sensors here instead.
        load1, _, _ = os.getloadavg()
        return {
            "device": args.device,
            "uptime_s": round(time.monotonic() - started, 1),
            "load1": round(load1, 2),
            "commands": len(agent.received.ids),
            "last_command": agent.received.ids[-1] if agent.received.ids else None,
        }

    tasks = [asyncio.create_task(agent.run_mqtt(args.mqtt, args.command_topic, f"tsunagu-device-{args.device}"))]
    if args.telemetry_every > 0:
        tasks.append(
            asyncio.create_task(agent.run_telemetry(host_sample, args.telemetry_every, args.telemetry_mqtt_every))
        )
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.close()
        await client.disconnect()
