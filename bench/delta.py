"""Bytes per update with fossil deltas, and what they cost the gateway: the board's ticker and the sim's world.

Two publication streams are made offline, as the platform makes them: ticker quotes (a random walk of price,
bid, ask and volume, as stream-ingest relays a feed's records) and the sim's world (the `physics` kind
stepped at 20 Hz with the engine's own JSON codec: keyframes every 20 ticks, the engine's deltas between).
For each: the payload in full as a JSON client receives it in a delta subscription (a JSON string), the
fossil delta against the previous payload the same way (protocol/fossil.py, the gateway's encoder), and
what permessage-deflate sends of each: as the gateway negotiates it (no server context takeover, 12 window
bits: each message compressed on its own, so one compressed frame serves every subscriber), and with a
context kept across messages (for comparison: what a per-connection compressor would give). The encoder's
time per publication is what a node spends once per publication per protocol flavour for all its delta
subscribers of the channel.

The uni_sse columns are whole SSE events as the gateway frames them (its transport's own framing: the
`id:` line with the stream position, then `data:` and the publication push) for a follower of a
recoverable channel, plain and through the stream's gzip compressor (transports/stream_encoding.py), one
write per event: the worst case, where every event is flushed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import zlib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from record import Recorder
from tsunagu_core.broker import Publication
from tsunagu_sim_engine import codec
from tsunagu_sim_engine.kinds import physics
from tsunagu_ws_gateway.protocol import fossil
from tsunagu_ws_gateway.protocol.uni_frames import publication_push
from tsunagu_ws_gateway.transports.http_stream import HttpStreamTransport
from tsunagu_ws_gateway.transports.stream_encoding import GzipStream


def ticker(updates: int, seed: int = 1) -> Iterator[bytes]:
    rnd = random.Random(seed)
    price, volume = 1000.0, 1_250_000
    for n in range(updates):
        price = round(price + rnd.choice((-0.25, 0.0, 0.25, 0.5)), 2)
        volume += rnd.randint(0, 500)
        quote = {
            "symbol": "ACME",
            "name": "Acme Corporation ordinary shares",
            "exchange": "XTKS",
            "currency": "JPY",
            "price": price,
            "bid": round(price - 0.25, 2),
            "ask": round(price + 0.25, 2),
            "volume": volume,
            "n": n,
        }
        yield orjson.dumps(quote)


def world(updates: int, bodies: int, keyframe_every: int = 20) -> Iterator[bytes]:
    simulation = physics.PhysicsKind().create({"bodies": bodies, "gravity": -9.8, "world": 200})
    previous: dict[str, codec.QEntity] = {}
    now = time.time()
    for tick in range(updates):
        simulation.step(0.05, now + tick * 0.05)
        current = {name: codec.quantize(entity) for name, entity in simulation.entities().items()}
        if tick % keyframe_every == 0:
            frame_type, entities = "keyframe", current
        else:
            frame_type, entities = "delta", {n: q for n, q in current.items() if previous.get(n) != q}
        previous = current
        yield codec.encode_json(frame_type, "bench", tick, int((now + tick * 0.05) * 1000), entities)


def measure(payloads: list[bytes]) -> dict[str, float]:
    full_bytes = delta_bytes = deflated_full = deflated_delta = alone_full = alone_delta = 0
    encode_seconds: list[float] = []
    full_deflater = zlib.compressobj(wbits=-15)
    delta_deflater = zlib.compressobj(wbits=-15)

    def alone(data: bytes) -> int:
        # One message, its own compressor (RFC 7692: the 4 trailing bytes of the sync flush are not sent).
        deflater = zlib.compressobj(level=6, wbits=-12, memLevel=5)  # the gateway's COMPRESS_SETTINGS
        return len(deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)) - 4

    previous = b""
    for payload in payloads:
        full = orjson.dumps(payload.decode())  # the JSON string a delta subscriber's full payload is
        started = time.perf_counter()
        delta = fossil.create(previous, payload) if previous else payload
        encode_seconds.append(time.perf_counter() - started)
        sent = orjson.dumps(delta.decode()) if len(delta) < len(payload) else full
        full_bytes += len(full)
        delta_bytes += len(sent)
        deflated_full += len(full_deflater.compress(full) + full_deflater.flush(zlib.Z_SYNC_FLUSH)) - 4
        deflated_delta += len(delta_deflater.compress(sent) + delta_deflater.flush(zlib.Z_SYNC_FLUSH)) - 4
        alone_full += alone(full)
        alone_delta += alone(sent)
        previous = payload
    count = len(payloads)
    return {
        "full": full_bytes / count,
        "fossil": delta_bytes / count,
        "deflate": alone_full / count,
        "fossil+deflate": alone_delta / count,
        "deflate, context kept": deflated_full / count,
        "fossil+deflate, context kept": deflated_delta / count,
        "encode_us_median": statistics.median(encode_seconds[1:]) * 1e6,
        "encode_us_p99": sorted(encode_seconds[1:])[int(0.99 * (count - 1))] * 1e6,
    }


def sse_events(payloads: list[bytes], channel: str = "stream:demo.ticker.ACME") -> list[bytes]:
    """The SSE events a uni_sse follower of `channel` gets for these publications, framed by the gateway."""

    async def frame() -> list[bytes]:
        async def send(message: MutableMapping[str, Any]) -> None:
            raise AssertionError("the stream is never started")

        async def receive() -> MutableMapping[str, Any]:
            raise AssertionError("the stream is never started")

        transport = HttpStreamTransport("uni_sse", send, receive, 1 << 30, event_stream=True)
        epoch = "5f3c9a1e"  # as the brokers make them: 8 hex digits
        transport.positions = {channel: {"offset": 0, "epoch": epoch}}
        return [
            transport._chunk(publication_push(channel, Publication(payload, offset=n + 1, epoch=epoch)))
            for n, payload in enumerate(payloads)
        ]

    return asyncio.run(frame())


def measure_sse(payloads: list[bytes]) -> dict[str, float]:
    events = sse_events(payloads)
    gzip = GzipStream()
    gzipped = sum(len(gzip.encode(event)) for event in events)
    return {"uni_sse event": sum(map(len, events)) / len(events), "uni_sse event, gzip": gzipped / len(events)}


FIGURES = ("full", "fossil", "deflate", "fossil+deflate", "deflate, context kept", "fossil+deflate, context kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--bodies", type=int, default=40)
    args = parser.parse_args()
    streams = {
        "ticker quotes": list(ticker(args.updates)),
        f"sim world, {args.bodies} falling bodies, 20 Hz": list(world(args.updates, args.bodies)),
    }
    recorder = Recorder("delta", {"updates": args.updates, "bodies": args.bodies})
    columns = f"{'full':>7} {'fossil':>7} {'deflate':>8} {'both':>7} {'ctx kept':>9}"
    print(f"{'stream':<40} {columns}  encode µs (median / p99)")
    for name, payloads in streams.items():
        figures = measure(payloads)
        sse = measure_sse(payloads)
        print(
            f"{name:<40} {figures['full']:>6.0f}B {figures['fossil']:>6.0f}B {figures['deflate']:>7.0f}B"
            f" {figures['fossil+deflate']:>6.0f}B {figures['deflate, context kept']:>8.0f}B"
            f"  {figures['encode_us_median']:.0f} / {figures['encode_us_p99']:.0f}"
        )
        for figure in FIGURES:
            ratio = figures[figure] / figures["full"]
            note = f"{ratio:.0%} of full"
            recorder.add(f"{name}: payload bytes per update, {figure}", figures[figure], "B", note=note)
        print(f"{'':<40} uni_sse event {sse['uni_sse event']:.0f}B, gzip {sse['uni_sse event, gzip']:.0f}B")
        for figure, value in sse.items():
            note = f"{value / sse['uni_sse event']:.0%} of the plain event"
            recorder.add(f"{name}: bytes per update, {figure}", value, "B", note=note)
        recorder.add(f"{name}: fossil encode per publication, median", figures["encode_us_median"], "µs")
        recorder.add(f"{name}: fossil encode per publication, p99", figures["encode_us_p99"], "µs")
    recorder.save()


if __name__ == "__main__":
    main()
