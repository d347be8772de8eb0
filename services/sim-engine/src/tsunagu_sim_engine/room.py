"""One room: its spec, the fixed-timestep loop that owns its state, inputs applied in tick order,
and what each tick sends (keyframes, deltas, per-cell channels, rejections)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from tsunagu_sim_engine.aoi import Cell, CellTracker, cell_channel, far_channel
from tsunagu_sim_engine.codec import Encoding, QEntity, encode, quantize
from tsunagu_sim_engine.kinds import Entity, InputRejected, Simulation, get_kind, kind_names

log = logging.getLogger("tsunagu.sim.room")

TICK_SECONDS = Histogram(
    "tsunagu_sim_tick_seconds",
    "Work of one room tick: inputs, step, encoding, publishing",
    ["kind"],
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.033, 0.066, 0.1, 0.25, 1.0),
)
TICK_OVERRUNS = Counter("tsunagu_sim_tick_overruns_total", "Ticks that ended after the next one was due", ["kind"])
ENTITIES = Gauge("tsunagu_sim_entities", "Entities in the rooms this replica runs", ["kind"])
BYTES_SENT = Counter("tsunagu_sim_bytes_sent_total", "Bytes of state and replies published", ["kind", "channel"])
INPUTS = Counter("tsunagu_sim_inputs_total", "Inputs by outcome", ["kind", "outcome"])

ROOM_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
REPLIES = "replies:sim#{user}"
TICKS_SKIPPED = Counter(
    "tsunagu_sim_ticks_skipped_total", "Ticks not run because the loop fell too far behind to catch up", ["kind"]
)
MAX_CATCH_UP = 5


@dataclass(slots=True)
class RoomSpec:
    room: str
    kind: str
    params: dict[str, Any]
    tick_hz: int = 20
    keyframe_every: int = 0  # ticks; 0 → once a second
    encoding: Encoding = "json"
    cell_size: float = 0.0  # 0: no per-cell channels
    cell_margin: float = 0.0
    max_inputs_per_second: float = 30.0
    send_every: int = 1  # ticks between state publications (the send rate is tick_hz / send_every)
    far_every: int = 0  # ticks between cells' level-of-detail (`.far`) publications; 0: none

    def __post_init__(self) -> None:
        if self.keyframe_every <= 0:
            self.keyframe_every = self.tick_hz

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, body: Any) -> RoomSpec:
        """A spec from a client's JSON; ValueError with a message for the 400 answer."""
        if not isinstance(body, dict):
            raise ValueError("the body is a JSON object")
        room = body.get("room")
        if not isinstance(room, str) or not ROOM_NAME.match(room):
            raise ValueError("room is 1 to 64 characters of A-Z a-z 0-9 _ -")
        kind_name = body.get("kind")
        kind = get_kind(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            raise ValueError(f"kind is one of {', '.join(kind_names())}")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise ValueError("params is a JSON object")
        params = kind.validate_params(params)
        tick_hz = body.get("tick_hz", 20)
        if isinstance(tick_hz, bool) or not isinstance(tick_hz, int) or not 1 <= tick_hz <= 60:
            raise ValueError("tick_hz is an integer from 1 to 60")
        keyframe_every = body.get("keyframe_every", tick_hz)
        if isinstance(keyframe_every, bool) or not isinstance(keyframe_every, int) or not 1 <= keyframe_every <= 600:
            raise ValueError("keyframe_every is a number of ticks from 1 to 600")
        encoding = body.get("encoding", "json")
        if encoding not in ("json", "binary"):
            raise ValueError('encoding is "json" or "binary"')
        aoi = body.get("aoi", {})
        if not isinstance(aoi, dict):
            raise ValueError("aoi is an object {cell_size, margin}")
        cell_size = aoi.get("cell_size", 0)
        margin = aoi.get("margin", cell_size * 0.1 if isinstance(cell_size, int | float) else 0)
        if isinstance(cell_size, bool) or not isinstance(cell_size, int | float) or not 0 <= cell_size <= 1e5:
            raise ValueError("aoi.cell_size is a number from 0 (off) to 100000")
        if not isinstance(margin, int | float) or not 0 <= margin < max(cell_size, 1e-9) / 2:
            raise ValueError("aoi.margin is a number from 0 to under half the cell size")
        far_every = aoi.get("far_every", 0)
        if isinstance(far_every, bool) or not isinstance(far_every, int) or not 0 <= far_every <= 600:
            raise ValueError("aoi.far_every is a number of ticks from 0 (off) to 600")
        if far_every and not cell_size:
            raise ValueError("aoi.far_every needs aoi.cell_size: far channels are per cell")
        send_every = body.get("send_every", 1)
        if isinstance(send_every, bool) or not isinstance(send_every, int) or not 1 <= send_every <= 60:
            raise ValueError("send_every is a number of ticks from 1 to 60")
        rate = body.get("max_inputs_per_second", 30)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.1 <= rate <= 1000:
            raise ValueError("max_inputs_per_second is a number from 0.1 to 1000")
        cell, margin = float(cell_size), float(margin)
        return cls(
            room, kind.name, params, tick_hz, keyframe_every, encoding, cell, margin, rate, send_every, far_every
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoomSpec:
        # the registry entry may carry the matchmaker's "match" block beside the spec (see matchmaker.py)
        return cls(**{key: value for key, value in data.items() if key != "match"})


@dataclass(frozen=True, slots=True)
class PendingInput:
    user: str
    client: str
    seq: int
    data: bytes
    content_type: str = "application/json"


@dataclass(slots=True)
class TickOutput:
    publications: list[tuple[str, bytes]] = field(default_factory=list)
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    # Device commands the tick's inputs made (kinds with `take_commands`: twin rooms).
    commands: list[Any] = field(default_factory=list)


Publish = Callable[[list[tuple[str, bytes]], list[tuple[str, bytes]]], Awaitable[None]]
SendCommands = Callable[[list[Any]], Awaitable[None]]
Snapshotter = Callable[["Room"], Awaitable[bool]]


def create_simulation(spec: RoomSpec) -> Simulation:
    kind = get_kind(spec.kind)
    if kind is None:
        raise ValueError(f"kind {spec.kind!r} is not registered on this replica")
    return kind.create(spec.params)


class Room:
    def __init__(self, spec: RoomSpec, *, wall: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.sim = create_simulation(spec)
        self._quantize_cache: dict[str, tuple[Entity, QEntity]] = {}
        self.dt = 1.0 / spec.tick_hz
        self.tick = 0
        self.wall = wall
        self.epoch_ms = int(wall() * 1000)  # wall time of tick 0
        self.queue: deque[PendingInput] = deque()
        # Publications of the channels the kind follows (`sources`), applied at the next tick like inputs.
        self.observations: deque[tuple[str, bytes, int]] = deque()
        # Optional parts of the kind interface (kinds/__init__.py): identified inputs, sources, commands.
        self._apply_input = getattr(self.sim, "apply_input", None)
        self._take_commands = getattr(self.sim, "take_commands", None)
        if hasattr(self.sim, "room"):
            self.sim.room = spec.room
        self.sent: dict[str, QEntity] = {}
        self.cells = CellTracker(spec.cell_size, spec.cell_margin) if spec.cell_size > 0 else None
        self.buckets: dict[str, tuple[float, float]] = {}
        self.seqs: dict[str, int] = {}
        self.overruns = 0
        self.skipped_ticks = 0
        self.last_tick_seconds = 0.0
        self.recent_ticks: deque[float] = deque(maxlen=1024)  # durations of the last ticks, for percentiles
        self._entity_count = 0
        self._applied = INPUTS.labels(spec.kind, "applied")
        self._rejected = INPUTS.labels(spec.kind, "rejected")
        self._duplicate = INPUTS.labels(spec.kind, "duplicate")
        self.cell_members: dict[Cell, set[str]] = {}
        # What each cell's far channel last sent (level of detail).
        self.far_sent: dict[Cell, dict[str, QEntity]] = {}

    @property
    def now(self) -> float:
        return self.tick * self.dt

    def tick_time_ms(self) -> int:
        return self.epoch_ms + round(self.tick * self.dt * 1000)

    def submit(self, item: PendingInput) -> None:
        self.queue.append(item)

    def sources(self) -> list[str]:
        """The channels whose publications drive this room (a twin's device telemetry); none for most kinds."""
        sources = getattr(self.sim, "sources", None)
        return list(sources()) if sources is not None else []

    def observe(self, channel: str, data: bytes, time_ms: int) -> None:
        self.observations.append((channel, data, time_ms))

    # state out of the room

    def snapshot(self) -> dict[str, Any]:
        return {
            "tick": self.tick,
            "epoch_ms": self.epoch_ms,
            "sim": self.sim.snapshot(),
            "seqs": dict(self.seqs),
            "saved_ms": int(self.wall() * 1000),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        self.tick = int(snapshot["tick"])
        self.epoch_ms = int(snapshot["epoch_ms"])
        self.sim.restore(snapshot["sim"])
        self.seqs = {k: int(v) for k, v in snapshot.get("seqs", {}).items()}
        # Resume the clock where the room stopped: the timestamps clients interpolate stay monotonic.
        self.epoch_ms = min(self.epoch_ms, int(self.wall() * 1000) - round(self.tick * self.dt * 1000))

    def state(self) -> dict[str, Any]:
        entities = {name: list(q[:4]) + ([json.loads(q[4])] if q[4] else []) for name, q in self._quantized().items()}
        return {"room": self.spec.room, "tick": self.tick, "time": self.tick_time_ms(), "q": 0.01, "e": entities}

    def _quantized(self) -> dict[str, QEntity]:
        # Quantized once per Entity object: kinds hand back the same object for an unchanged entity.
        previous = self._quantize_cache
        current: dict[str, tuple[Entity, QEntity]] = {}
        out = {}
        for name, entity in self.sim.entities().items():
            cached = previous.get(name)
            if cached is None or cached[0] is not entity:
                cached = (entity, quantize(entity))
            current[name] = cached
            out[name] = cached[1]
        self._quantize_cache = current
        return out

    # inputs

    def _reply(self, item: PendingInput, reason: str, message: str) -> tuple[str, bytes]:
        self._rejected.inc()
        body = {
            "type": "sim.rejected",
            "room": self.spec.room,
            "client": item.client,
            "client_seq": item.seq,
            "tick": self.tick,
            "reason": reason,
            "message": message,
        }
        return REPLIES.format(user=item.user), json.dumps(body).encode()

    def _allowed(self, user: str) -> bool:
        rate = self.spec.max_inputs_per_second
        tokens, at = self.buckets.get(user, (rate, self.now))
        tokens = min(rate, tokens + (self.now - at) * rate)
        if tokens < 1.0:
            self.buckets[user] = (tokens, self.now)
            return False
        self.buckets[user] = (tokens - 1.0, self.now)
        return True

    def _apply_inputs(self, replies: list[tuple[str, bytes]]) -> None:
        if self.observations:
            observe = self.sim.observe  # type: ignore[attr-defined]
            while self.observations:
                observe(*self.observations.popleft())
        while self.queue:
            item = self.queue.popleft()
            client_key = f"{item.user}/{item.client}"
            if item.seq > 0:
                if item.seq <= self.seqs.get(client_key, 0):
                    self._duplicate.inc()
                    continue
                self.seqs[client_key] = item.seq
            if not item.user:
                replies.append(self._reply(item, "unauthenticated", "inputs need an authenticated user"))
                continue
            if not self._allowed(item.user):
                limit = self.spec.max_inputs_per_second
                replies.append(self._reply(item, "too_frequent", f"at most {limit:g} inputs a second per user"))
                continue
            try:
                data = json.loads(item.data)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                replies.append(self._reply(item, "bad_input", "an input is a JSON object"))
                continue
            try:
                if self._apply_input is not None:
                    self._apply_input(item.user, data, self.now, client=item.client, seq=item.seq)
                else:
                    self.sim.apply(item.user, data, self.now)
            except InputRejected as exc:
                replies.append(self._reply(item, exc.reason, exc.message))
                continue
            self._applied.inc()

    # the tick

    def step_once(self) -> TickOutput:
        """Apply queued inputs, advance one tick, and encode what the tick sends."""
        out = TickOutput()
        self._apply_inputs(out.replies)
        if self._take_commands is not None:
            out.commands = self._take_commands()
        self.tick += 1
        self.sim.step(self.dt, self.now)
        keyframe = self.tick % self.spec.keyframe_every == 0
        if not keyframe and self.tick % self.spec.send_every:
            return out  # not a send tick: the next delta carries every change since the last one
        current = self._quantized()
        changed = {name: q for name, q in current.items() if self.sent.get(name) != q}
        gone = [name for name in self.sent if name not in current]
        room, time_ms, encoding = self.spec.room, self.tick_time_ms(), self.spec.encoding
        if keyframe:
            out.publications.append((f"sim:{room}", encode(encoding, "keyframe", room, self.tick, time_ms, current)))
        elif changed or gone:
            frame = encode(encoding, "delta", room, self.tick, time_ms, changed, gone)
            out.publications.append((f"sim:{room}", frame))
        if self.cells is not None:
            self._cells(out, current, changed, gone, keyframe, time_ms)
        self.sent = current
        if len(current) != self._entity_count:
            ENTITIES.labels(self.spec.kind).inc(len(current) - self._entity_count)
            self._entity_count = len(current)
        return out

    def _cells(
        self,
        out: TickOutput,
        current: dict[str, QEntity],
        changed: dict[str, QEntity],
        gone: list[str],
        keyframe: bool,
        time_ms: int,
    ) -> None:
        """Per-cell channels, updated incrementally: only entities that changed can change cells."""
        assert self.cells is not None
        members = self.cell_members
        updates: dict[Cell, dict[str, QEntity]] = {}
        left: dict[Cell, list[str]] = {}
        for name in gone:
            old = self.cells.cells.get(name)
            if old is not None:
                members[old].discard(name)
                left.setdefault(old, []).append(name)
                self.cells.forget(name)
        for name, q in changed.items():
            old = self.cells.cells.get(name)
            cell = self.cells.place(name, q[0] * 0.01, q[1] * 0.01)
            if old != cell:
                if old is not None:
                    members[old].discard(name)
                    left.setdefault(old, []).append(name)
                members.setdefault(cell, set()).add(name)
            updates.setdefault(cell, {})[name] = q
        room, encoding, tick = self.spec.room, self.spec.encoding, self.tick
        # Cell keyframes are staggered over the keyframe interval (each cell has its slot), so a
        # keyframe tick is not a burst of one publication per cell.
        slots = max(1, self.spec.keyframe_every // self.spec.send_every)
        slot = (tick // self.spec.send_every) % slots
        keyed = set()
        for cell, names in members.items():
            if names and (cell[0] * 31 + cell[1] * 17) % slots == slot:
                keyed.add(cell)
                entities = {name: current[name] for name in names}
                frame = encode(encoding, "keyframe", room, tick, time_ms, entities)
                out.publications.append((cell_channel(room, cell), frame))
        for cell in updates.keys() | left.keys():
            if cell not in keyed:
                frame = encode(encoding, "delta", room, tick, time_ms, updates.get(cell, {}), left.get(cell, ()))
                out.publications.append((cell_channel(room, cell), frame))
        if self.spec.far_every and tick % self.spec.far_every == 0:
            self._far_cells(out, current, time_ms)
        for cell in [cell for cell, names in members.items() if not names]:
            del members[cell]

    def _far_cells(self, out: TickOutput, current: dict[str, QEntity], time_ms: int) -> None:
        """Level of detail: each cell's entities on its `.far` channel at the lower rate, as a delta against
        what that channel sent last (keyframes staggered over the keyframe interval, as the cells' are)."""
        room, encoding, tick, every = self.spec.room, self.spec.encoding, self.tick, self.spec.far_every
        slots = max(1, self.spec.keyframe_every // every)
        slot = (tick // every) % slots
        far_sent = self.far_sent
        for cell in self.cell_members.keys() | far_sent.keys():
            names = self.cell_members.get(cell, ())
            entities = {name: current[name] for name in names}
            previous = far_sent.get(cell, {})
            if entities and (cell[0] * 31 + cell[1] * 17) % slots == slot:
                frame = encode(encoding, "keyframe", room, tick, time_ms, entities)
            else:
                changed = {name: q for name, q in entities.items() if previous.get(name) != q}
                gone = [name for name in previous if name not in entities]
                if not changed and not gone:
                    continue
                frame = encode(encoding, "delta", room, tick, time_ms, changed, gone)
            out.publications.append((far_channel(room, cell), frame))
            if entities:
                far_sent[cell] = entities
            else:
                far_sent.pop(cell, None)

    def close(self) -> None:
        if self._entity_count:
            ENTITIES.labels(self.spec.kind).dec(self._entity_count)
            self._entity_count = 0

    async def run(
        self,
        publish: Publish,
        snapshotter: Snapshotter | None,
        snapshot_every: int,
        send_commands: SendCommands | None = None,
    ) -> None:
        """The fixed-timestep loop: tick n is due at start + n·dt (absolute, so sleeps never drift);
        a tick that ends after the next is due counts an overrun; more than MAX_CATCH_UP ticks behind,
        the schedule is reset instead of bursting to catch up."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        kind = self.spec.kind
        try:
            while True:
                delay = start + n * self.dt - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                began = time.perf_counter()
                output = self.step_once()
                if output.commands and send_commands is not None:
                    await send_commands(output.commands)
                if output.publications or output.replies:
                    await publish(output.publications, output.replies)
                if snapshotter is not None and self.tick % snapshot_every == 0 and not await snapshotter(self):
                    return
                self.last_tick_seconds = time.perf_counter() - began
                TICK_SECONDS.labels(kind).observe(self.last_tick_seconds)
                self.recent_ticks.append(self.last_tick_seconds)
                n += 1
                behind = loop.time() - (start + n * self.dt)
                if behind > 0:
                    self.overruns += 1
                    TICK_OVERRUNS.labels(kind).inc()
                    if behind > MAX_CATCH_UP * self.dt:
                        # The ticks not run (the schedule restarts from now); counted, not lost from sight.
                        self.skipped_ticks += int(behind / self.dt)
                        TICKS_SKIPPED.labels(kind).inc(int(behind / self.dt))
                        start = loop.time() - n * self.dt
        finally:
            self.close()
