"""sim-engine at 60 Hz: tick cost and bytes per client, area of interest + deltas versus full snapshots.

One room with ENTITIES entities runs in the engine's own fixed-timestep loop (`Room.run`) for
SECONDS seconds; what each tick sends is published to the broker (memory by default, the stack's
Redis with `--redis`). CLIENTS simulated subscribers each follow one entity and subscribe either to
the room channel or to the 3x3 cells around their entity; their bytes per second are counted from the
publications the engine really made (payload bytes, before the gateway's framing).

- `avatar`: every user sends a move 10 times a second (random walk within the speed limit);
- `physics`: pymunk bodies, all moving, a random push on 1 in 6 bodies each tick.
Full snapshots = a keyframe of every entity every tick on one channel, the naive design.

    uv run python bench/sim.py [--kind avatar|physics] [--entities 1000] [--clients 500] [--seconds 10]
        [--broker redis|memory] [--publish batch|per-call|both] [--hz 60] [--far-every N --far-ring R]

Level of detail (`--far-every N`): the room also sends each cell's `.far` channel every N ticks; a client
viewing the (2R+1)x(2R+1) cells around it is counted twice: all of them at the full rate, and the 3x3 at the
full rate plus the ring beyond on the far channels.

`--publish per-call` publishes a tick's output as concurrent single publishes, 64 at a time (the
engine before publish_many); `batch` (the engine's way) sends it in one `publish_many` call.
Raw results go to bench/results/<time>-sim.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid
from collections import defaultdict

from record import Recorder
from tsunagu_core.broker import Broker, MemoryBroker, PublishOptions, PublishRequest
from tsunagu_sim_engine.aoi import cell_channel, far_channel
from tsunagu_sim_engine.codec import encode
from tsunagu_sim_engine.engine import publish_all
from tsunagu_sim_engine.kinds import load_kinds
from tsunagu_sim_engine.room import PendingInput, Room, RoomSpec

REDIS = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_room(
    kind: str, entities: int, encoding: str, cell: float, send_every: int = 1, hz: int = 60, far_every: int = 0
) -> Room:
    world = (entities * 40) ** 0.5  # about 40 square units per entity, whatever the count
    params: dict[str, object] = {"world": world}
    if kind == "avatar":
        params |= {"max_speed": 10, "max_avatars": entities}
    else:
        params |= {"bodies": entities, "radius": 0.5, "damping": 0.9, "max_impulse": 5}
    body = {
        "room": f"bench{uuid.uuid4().hex[:6]}",
        "kind": kind,
        "tick_hz": hz,
        "keyframe_every": hz,
        "encoding": encoding,
        "aoi": {"cell_size": cell, "margin": cell * 0.1, "far_every": far_every},
        "params": params,
        "max_inputs_per_second": 100,
        "send_every": send_every,
    }
    return Room(RoomSpec.parse(body))


async def run(args: argparse.Namespace, encoding: str, mode: str, recorder: Recorder) -> None:
    broker: Broker
    if args.broker == "redis":
        from tsunagu_core.broker.redis import RedisBroker

        broker = RedisBroker(REDIS)
    else:
        broker = MemoryBroker()
    await broker.start()
    room = make_room(args.kind, args.entities, encoding, args.cell, args.send_every, args.hz, args.far_every)
    rng = random.Random(7)
    world = float(room.spec.params["world"])
    names = [f"user{i}" for i in range(args.entities)]
    positions = {n: [rng.uniform(-world, world) * 0.9, rng.uniform(-world, world) * 0.9] for n in names}
    if args.kind == "avatar":
        for name in names:
            room.submit(PendingInput(name, "c", 0, json.dumps({"p": positions[name]}).encode()))
    bytes_by_channel: dict[str, int] = defaultdict(int)
    publishes = 0
    options = PublishOptions()
    ticks = 0

    async def publish(pubs: list[tuple[str, bytes]], replies: list[tuple[str, bytes]]) -> None:
        nonlocal publishes, ticks
        ticks += 1
        for channel, data in pubs:
            bytes_by_channel[channel] += len(data)
        publishes += len(pubs)
        if mode == "batch":
            await publish_all(broker, [PublishRequest(channel, data, options) for channel, data in pubs])
        else:
            for start in range(0, len(pubs), 64):
                chunk = pubs[start : start + 64]
                await asyncio.gather(*(broker.publish(channel, data, options) for channel, data in chunk))

    async def clients_send() -> None:
        # Inputs, as the bus consumer would queue them (outside the tick): each avatar moves 10 times
        # a second; 1 body in 6 is pushed each tick.
        turn = 0
        while True:
            await asyncio.sleep(1 / args.hz)
            turn += 1
            generate(names[turn % 6 :: 6])

    def generate(share: list[str]) -> None:
        for name in share:
            if args.kind == "avatar":
                p = positions[name]
                p[0] = max(-world, min(world, p[0] + rng.uniform(-0.15, 0.15)))
                p[1] = max(-world, min(world, p[1] + rng.uniform(-0.15, 0.15)))
                data: dict[str, object] = {"p": p}
            else:
                data = {"push": f"b{name[4:]}", "impulse": [rng.uniform(-2, 2), rng.uniform(-2, 2)]}
            room.submit(PendingInput(name, "c", 0, json.dumps(data).encode()))

    task = asyncio.create_task(room.run(publish, None, 60))
    sender = asyncio.create_task(clients_send())
    await asyncio.sleep(args.seconds)
    task.cancel()
    sender.cancel()
    await asyncio.gather(task, sender, return_exceptions=True)
    # The naive alternative: every entity, every tick, on one channel.
    full_bytes = len(encode(encoding, "keyframe", room.spec.room, room.tick, 0, room.sent)) * room.tick  # type: ignore[arg-type]
    await broker.close()

    seconds = args.seconds
    durations = sorted(room.recent_ticks) or [float("nan")]
    entity_names = list(room.sent)
    assert room.cells is not None
    clients = [entity_names[i % len(entity_names)] for i in range(args.clients)]
    aoi_rates, wide_rates, lod_rates = [], [], []
    ring = args.far_ring
    for followed in clients:
        cx, cy = room.cells.cells[followed]
        around = [(cx + dx, cy + dy) for dx in range(-ring, ring + 1) for dy in range(-ring, ring + 1)]
        near = [c for c in around if max(abs(c[0] - cx), abs(c[1] - cy)) <= 1]
        far = [c for c in around if max(abs(c[0] - cx), abs(c[1] - cy)) > 1]
        near_bytes = sum(bytes_by_channel.get(cell_channel(room.spec.room, c), 0) for c in near)
        aoi_rates.append(near_bytes / seconds)
        # The same view radius without level of detail: every cell of it at the full rate...
        wide_rates.append(sum(bytes_by_channel.get(cell_channel(room.spec.room, c), 0) for c in around) / seconds)
        # ...and with it: the 3x3 at the full rate, the ring beyond at the far rate.
        far_bytes = sum(bytes_by_channel.get(far_channel(room.spec.room, c), 0) for c in far)
        lod_rates.append((near_bytes + far_bytes) / seconds)
    room_rate = bytes_by_channel[f"sim:{room.spec.room}"] / seconds
    full_rate = full_bytes / seconds
    aoi = statistics.mean(aoi_rates)
    wide, lod = statistics.mean(wide_rates), statistics.mean(lod_rates)
    print(
        f"{args.kind} {encoding:<6} {len(entity_names):>5} entities, {args.clients} clients, "
        f"{args.broker} broker, {mode} publishes, send every {args.send_every} tick(s), "
        f"{ticks / seconds:.1f} publishing ticks/s"
    )
    p50, p99 = statistics.median(durations), durations[int(len(durations) * 0.99) - 1]
    recorder.add(
        f"{encoding} {mode}",
        ticks / seconds,
        "ticks/s",
        encoding=encoding,
        publish=mode,
        tick_p50_ms=p50 * 1000,
        tick_p99_ms=p99 * 1000,
        overruns=room.overruns,
        ticks=room.tick,
        overrun_share=room.overruns / max(room.tick, 1),
        publishes_per_second=publishes / seconds,
        bytes_per_client_per_second={"full": full_rate, "room": room_rate, "aoi": aoi},
    )
    side = 2 * ring + 1
    if args.far_every:
        recorder.add(
            f"{encoding} {mode}: bytes per client per second, {side}x{side} cells at {args.hz} Hz (no level of detail)",
            wide,
            "B/s",
        )
        far_hz = args.hz / args.far_every
        recorder.add(
            f"{encoding} {mode}: bytes per client per second, 3x3 at {args.hz} Hz + the ring to {side}x{side}"
            f" at {far_hz:g} Hz (level of detail)",
            lod,
            "B/s",
            note=f"{lod / max(wide, 1):.0%} of the same view without level of detail",
        )
    print(
        f"  tick p50 {statistics.median(durations) * 1000:6.2f} ms  p99 "
        f"{durations[int(len(durations) * 0.99) - 1] * 1000:6.2f} ms  overruns {room.overruns} "
        f"({room.overruns / max(room.tick, 1):.1%} of {room.tick} ticks)  publishes/s {publishes / seconds:,.0f}"
    )
    print(
        f"  bytes/client/s: full snapshots {full_rate:>11,.0f}  room deltas+keyframes {room_rate:>10,.0f}  "
        f"AOI(3x3 cells)+deltas {aoi:>8,.0f}  (x{full_rate / max(aoi, 1):.0f} less than full)"
    )
    if args.far_every:
        print(
            f"  view of {side}x{side} cells: all at {args.hz} Hz {wide:>10,.0f} B/s; 3x3 at {args.hz} Hz + ring at"
            f" {args.hz / args.far_every:g} Hz (level of detail) {lod:>10,.0f} B/s ({lod / max(wide, 1):.0%})"
        )
    print(
        f"  all {args.clients} clients: full {full_rate * args.clients / 1e6:,.1f} MB/s, "
        f"AOI+deltas {aoi * args.clients / 1e6:,.2f} MB/s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("avatar", "physics"), default="avatar")
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cell", type=float, default=20.0, help="AOI cell size")
    parser.add_argument("--encoding", choices=("json", "binary", "both"), default="both")
    parser.add_argument("--send-every", type=int, default=1, help="ticks between state publications")
    parser.add_argument("--broker", choices=("redis", "memory"), default="redis")
    parser.add_argument("--publish", choices=("batch", "per-call", "both"), default="both")
    parser.add_argument("--hz", type=int, default=60, help="the room's tick rate")
    parser.add_argument("--far-every", type=int, default=0, help="ticks between far (level-of-detail) sends; 0 off")
    parser.add_argument("--far-ring", type=int, default=3, help="cells of view radius (with far channels beyond 1)")
    args = parser.parse_args()
    load_kinds()
    started = time.monotonic()
    recorder = Recorder("sim", vars(args))
    for encoding in ("json", "binary") if args.encoding == "both" else (args.encoding,):
        for mode in ("per-call", "batch") if args.publish == "both" else (args.publish,):
            asyncio.run(run(args, encoding, mode, recorder))
    recorder.save()
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
