"""Broadcast to unidirectional SSE subscribers (`/connection/uni_sse`) against the native WebSocket, on our
gateway, same run: N subscribers of one channel, publications through the server API with a window in
flight, every delivery checked for loss, duplication and order by the Go load generator (bench/loadgen),
server on CPU 0 and load on CPU 1 (bench/broadcast.py's setup). Not in the Makefile.

    uv run python bench/uni_fanout.py --clients 1000 --seconds 10 --window 4

The SSE subscribers follow the channel as server-side subscriptions (the token's `subs` claim); the
WebSocket ones subscribe with the subscribe command. Figures: deliveries per second of the run and per
CPU-second of the server process.
"""

from __future__ import annotations

import argparse
import time

import jwt
from broadcast import BIN, SECRET, ensure_tools, measure
from record import Recorder


def follower_token() -> str:
    claims = {"sub": "bench", "subs": {"bench": {}}, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, SECRET, "HS256")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not (BIN / "loadgen").exists():
        ensure_tools()
    recorder = Recorder("uni-fanout", vars(args))
    load = f"{args.clients} subscribers, one channel, ~200 B, {args.seconds:.0f} s, {args.window} in flight"
    print(f"\n{load} (server API)\n")
    print("| transport | run | deliveries/s | per server CPU-second | lost/dup/reordered | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in range(1, args.repeat + 1):
        for transport in ("websocket", "uni_sse"):
            extra = ["-publish", "http"]
            if transport == "uni_sse":
                # (later flags win: the SSE endpoint's URL, over http://, and a token with the subs claim)
                extra += ["-url", "http://127.0.0.1:{port}/connection/uni_sse", "-token", follower_token()]
            r, _ = measure("tsunagu", args.clients, args.seconds, args.window, None, *extra)
            for figure, unit in (("deliveries_per_second", "1/s"), ("deliveries_per_server_cpu_second", "1/s")):
                recorder.add(f"{transport} {figure}", r[figure], unit, note=f"run {run}", run=run, raw=r)
            problems = f"{r['lost']}/{r['duplicated']}/{r['out_of_order']}"
            print(f"| {transport} | {run} | {r['deliveries_per_second']:,.0f} | "
                  f"{r['deliveries_per_server_cpu_second']:,.0f} | {problems} | {r['latency_p99_ms']:.1f} |",
                  flush=True)  # fmt: skip
    recorder.save()


if __name__ == "__main__":
    main()
