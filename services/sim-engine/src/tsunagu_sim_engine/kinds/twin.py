"""`twin`: a digital twin room. Its entities are devices, driven by their telemetry (mqtt-bridge relays MQTT
topic `a/b` to channel `mqtt:a/b`), and a user's action on one becomes a command to the device through the
platform's command path (Kafka `tsunagu.mqtt.commands`, mqtt-bridge, a receipt on `replies:mqtt#<user>`).

Params:
    devices: {"<entity id>": {"telemetry": "<topic>", "command": "<topic>" (optional),
              "at": [x, y, z] (optional, where it stands when its telemetry carries no position)}}
    stale_after: seconds without telemetry after which a device is shown stale (default 10)
    operators: users who may command devices; empty (the default): whoever may send the room inputs

Telemetry is a JSON object (other payloads are kept as `{"text": ...}` or ignored when not text); its
numeric `x`, `y`, `z` and `heading` move the entity. The entity's `extra` holds `v` (the last telemetry,
at most 2 KB of it), `seen` (wall time of the last telemetry in ms, 0: never) and `stale`.

Input: `{"seq": n, "command": {"device": "<entity id>", "payload": <JSON value>}}`. `seq` is required and
names the command (its id is derived from room, user, client and seq), so an input the engine sees twice
after a crash makes the same command, which mqtt-bridge delivers once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tsunagu_sim_engine.kinds import Entity, InputRejected, number

MQTT_PREFIX = "mqtt:"
# An MQTT topic as a device's own (no wildcards, no $SYS), in the characters channel names allow.
DEVICE_TOPIC = re.compile(r"^[A-Za-z0-9_\-.@/=+!~,]{1,200}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9_\-.:]{1,64}$")
MAX_DEVICES = 10_000
MAX_TELEMETRY_BYTES = 2048
MAX_COMMAND_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """A command a twin room's input made, for the engine to send on the command path."""

    command_id: str
    topic: str
    payload: bytes
    user: str


def _topic(device: str, spec: Mapping[str, Any], field: str, required: bool) -> str:
    topic = spec.get(field)
    if topic in (None, "") and not required:
        return ""
    if not isinstance(topic, str) or not DEVICE_TOPIC.match(topic) or "+" in topic or "#" in topic:
        raise ValueError(f"params.devices.{device}.{field} is one device topic (no wildcards)")
    return topic


class TwinKind:
    name = "twin"

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        devices = params.get("devices")
        if not isinstance(devices, dict) or not devices:
            raise ValueError("params.devices maps entity ids to {telemetry, command, at}")
        if len(devices) > MAX_DEVICES:
            raise ValueError(f"params.devices holds at most {MAX_DEVICES} devices")
        checked: dict[str, dict[str, Any]] = {}
        for device, spec in devices.items():
            if not DEVICE_ID.match(device):
                raise ValueError(f"device id {device!r}: 1 to 64 of A-Z a-z 0-9 _ - . :")
            if not isinstance(spec, dict):
                raise ValueError(f"params.devices.{device} is an object")
            at = spec.get("at", [0, 0, 0])
            if (
                not isinstance(at, list)
                or len(at) not in (2, 3)
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in at)
            ):
                raise ValueError(f"params.devices.{device}.at is [x, y] or [x, y, z]")
            checked[device] = {
                "telemetry": _topic(device, spec, "telemetry", True),
                "command": _topic(device, spec, "command", False),
                "at": [float(v) for v in at] + ([0.0] if len(at) == 2 else []),
            }
        operators = params.get("operators", [])
        if not isinstance(operators, list) or not all(isinstance(user, str) and user for user in operators):
            raise ValueError("params.operators is a list of user names")
        return {
            "devices": checked,
            "stale_after": number(params, "stale_after", 10.0, 0.1, 86400.0),
            "operators": operators,
        }

    def create(self, params: Mapping[str, Any]) -> TwinSimulation:
        return TwinSimulation(self.validate_params(params))


class _Device:
    __slots__ = ("command", "entity", "position", "seen", "telemetry", "value")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.telemetry: str = spec["telemetry"]
        self.command: str = spec["command"]
        self.position: list[float] = [*spec["at"], 0.0]  # x, y, z, heading
        self.value: Any = None
        self.seen = 0  # wall ms of the last telemetry
        self.entity = self._entity(stale=True)

    def _entity(self, *, stale: bool) -> Entity:
        x, y, z, heading = self.position
        return Entity(x, y, z, heading, {"v": self.value, "seen": self.seen, "stale": stale})

    def observe(self, data: bytes, time_ms: int, stale_after: float) -> None:
        try:
            value = json.loads(data)
        except ValueError:
            try:
                value = {"text": data.decode()}
            except UnicodeDecodeError:
                value = None
        if isinstance(value, dict):
            for index, field in enumerate(("x", "y", "z", "heading")):
                coordinate = value.get(field)
                if (
                    isinstance(coordinate, int | float)
                    and not isinstance(coordinate, bool)
                    and math.isfinite(coordinate)
                ):
                    self.position[index] = float(coordinate)
        if len(json.dumps(value)) > MAX_TELEMETRY_BYTES:
            value = {"truncated": True}
        self.value = value
        self.seen = time_ms
        self.entity = self._entity(stale=self.is_stale(time.time(), stale_after))

    def is_stale(self, wall: float, stale_after: float) -> bool:
        return self.seen == 0 or wall - self.seen / 1000 > stale_after


class TwinSimulation:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.stale_after = float(params["stale_after"])
        self.operators = set(params["operators"])
        self.devices = {name: _Device(spec) for name, spec in params["devices"].items()}
        self.by_channel: dict[str, list[_Device]] = {}
        for device in self.devices.values():
            self.by_channel.setdefault(MQTT_PREFIX + device.telemetry, []).append(device)
        self.room = ""
        self._commands: list[DeviceCommand] = []

    # what the engine feeds the room besides inputs

    def sources(self) -> list[str]:
        """The broker channels whose publications drive the room: its devices' telemetry."""
        return sorted(self.by_channel)

    def observe(self, channel: str, data: bytes, time_ms: int) -> None:
        for device in self.by_channel.get(channel, ()):
            device.observe(data, time_ms or int(time.time() * 1000), self.stale_after)

    def take_commands(self) -> list[DeviceCommand]:
        commands, self._commands = self._commands, []
        return commands

    # the Simulation interface

    def apply(self, user: str, data: Mapping[str, Any], now: float) -> None:
        self.apply_input(user, data, now, client="", seq=0)

    def apply_input(self, user: str, data: Mapping[str, Any], now: float, *, client: str, seq: int) -> None:
        command = data.get("command")
        if not isinstance(command, dict):
            raise InputRejected("bad_input", 'a twin room takes {"seq": n, "command": {"device", "payload"}}')
        if self.operators and user not in self.operators:
            raise InputRejected("forbidden", f"user {user!r} is not an operator of this twin")
        name = command.get("device")
        device = self.devices.get(name) if isinstance(name, str) else None
        if device is None:
            raise InputRejected("unknown_entity", f"no device {name!r} in this room")
        if not device.command:
            raise InputRejected("not_commandable", f"device {name!r} takes no commands")
        if seq <= 0:
            raise InputRejected("seq_required", "a command needs a positive seq: it names the command")
        payload = json.dumps(command.get("payload"), separators=(",", ":")).encode()
        if len(payload) > MAX_COMMAND_BYTES:
            raise InputRejected("too_large", f"a command payload is at most {MAX_COMMAND_BYTES} bytes")
        # The same input (redelivered after a crash) names the same command: mqtt-bridge sends it once.
        identity = f"{self.room}\x00{user}\x00{client}\x00{seq}".encode()
        command_id = "twin-" + hashlib.sha256(identity).hexdigest()[:32]
        self._commands.append(DeviceCommand(command_id, device.command, payload, user))

    def step(self, dt: float, now: float) -> None:
        wall = time.time()
        for device in self.devices.values():
            stale = device.is_stale(wall, self.stale_after)
            if stale != device.entity.extra["stale"]:
                device.entity = device._entity(stale=stale)

    def entities(self) -> dict[str, Entity]:
        return {name: device.entity for name, device in self.devices.items()}

    def snapshot(self) -> dict[str, Any]:
        return {name: {"p": d.position, "v": d.value, "seen": d.seen} for name, d in self.devices.items()}

    def restore(self, state: Mapping[str, Any]) -> None:
        for name, saved in state.items():
            device = self.devices.get(name)
            if device is None or not isinstance(saved, dict):
                continue
            device.position = [float(v) for v in saved.get("p", device.position)]
            device.value = saved.get("v")
            device.seen = int(saved.get("seen", 0))
            device.entity = device._entity(stale=device.is_stale(time.time(), self.stale_after))
