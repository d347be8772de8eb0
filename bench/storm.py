"""The reconnect storm (issue 24): `--clients` subscribers with recovery on two gateway replicas, one killed.

Two `tsunagu serve ws-gateway` processes share the stack's Redis; `--clients` light clients of the native
JSON protocol (tsunagu_core.testing_storm, `--per-worker` to a process), half homed on each replica, each
subscribed with recovery to one of `--channels` channels, each channel published `--rate` times a second
through the survivor's `/api/batch`. After `--kill-after` seconds the first replica gets SIGKILL: its
clients reconnect to the survivor after the SDKs' full-jitter backoff (0.5 s min, 10 s max), past its
connect rate (default 2,000/s, burst 2,000: `TSUNAGU_GATEWAY_CONNECT_RATE`), and recover from history.

Figures: seconds from the kill until every moved client had recovered (p50/p99/max over clients), lost,
duplicated and reordered publications over every client, connects shed by the survivor, and the
publish -> deliver latency (p50/p99/max) of the survivor's own clients before the kill and during the storm
(from the kill until the last client recovered). Clients and gateways share this machine's cores.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from record import record
from tsunagu_core.testing_storm import Storm, publish_steadily

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-that-is-long-enough-for-hs256"
API_KEY = "bench"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(port: int, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_LOG_LEVEL": "warning",
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": API_KEY,
        "TSUNAGU_GATEWAY_NAMESPACES": '{"storm": {}}',
        "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
        **extra,
    }
    command = [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(port: int) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway on {port} never became ready")


async def shed(port: int) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    prefix = "tsunagu_gateway_connects_shed_total{"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ordered = sorted(values)
    return {
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
        "count": len(ordered),
    }


def latencies(directory: str, since: float, until: float) -> list[float]:
    """Publish -> deliver in ms of the samples (arrival time, latency) that arrived within [since, until)."""
    found: list[float] = []
    for path in Path(directory).glob("worker-*.bin"):
        samples = array.array("d")
        samples.frombytes(path.read_bytes())
        found += [samples[i + 1] * 1000 for i in range(0, len(samples), 2) if since <= samples[i] < until]
    return found


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    uptime_before = uptime()
    ports = [free_port(), free_port()]
    extra = {
        "TSUNAGU_GATEWAY_CONNECT_RATE": str(args.connect_rate),
        "TSUNAGU_GATEWAY_CONNECT_BURST": str(args.connect_burst),
    }
    gateways = [start_gateway(port, extra) for port in ports]
    samples = tempfile.mkdtemp(prefix="storm-")
    storm: Storm | None = None
    try:
        await asyncio.gather(*(wait_ready(port) for port in ports))
        run_id = uuid.uuid4().hex[:8]
        channels = [f"storm:{run_id}-{n}" for n in range(args.channels)]
        urls = [f"ws://127.0.0.1:{port}/connection/websocket" for port in ports]
        specs = [
            {
                "user": f"storm-{n}",
                "channel": channels[n % args.channels],
                "urls": urls if n % 2 == 0 else urls[::-1],
                "witness": n % 2 == 1,
            }
            for n in range(args.clients)
        ]
        storm = Storm(
            SECRET, specs, clients_per_worker=args.per_worker, min_delay=0.5, max_delay=10.0, samples_dir=samples
        )
        connect_started = time.time()
        await storm.start(ready_timeout=300)
        connect_seconds = time.time() - connect_started
        print(f"{storm.subscribed} of {args.clients} subscribed in {connect_seconds:.1f} s", flush=True)
        shed_before = await shed(ports[1])
        count = int(args.seconds * args.rate)
        kill_tick = int(args.kill_after * args.rate)
        killed: list[float] = []
        publish_started = time.time()

        async def kill(n: int) -> None:
            if n == kill_tick:
                gateways[0].send_signal(signal.SIGKILL)
                killed.append(time.time())
                print(f"killed the first gateway at publication {n}", flush=True)

        await publish_steadily(f"http://127.0.0.1:{ports[1]}/api", API_KEY, channels, count, args.rate, kill)
        summaries = await storm.finish({channel: count for channel in channels}, timeout=120)
        shed_count = await shed(ports[1]) - shed_before
    finally:
        if storm is not None:
            storm.kill()
        for gateway in gateways:
            if gateway.poll() is None:
                gateway.terminate()
                gateway.wait(10)

    moved = [s for s in summaries if s["home"] == urls[0]]
    stayed = [s for s in summaries if s["home"] == urls[1]]
    kill_at = killed[0]
    recovered_after = [
        s["subscribed"][-1][0] - kill_at
        for s in moved
        if s["disconnects"] and all(recovered for _, recovered, _ in s["subscribed"][1:])
    ]
    all_recovered = len(recovered_after) == len(moved)
    storm_end = kill_at + (max(recovered_after) if recovered_after else 0.0)
    before = latencies(samples, publish_started + 2, kill_at)
    during = latencies(samples, kill_at, storm_end)
    figures = {
        "subscribed": storm.subscribed if storm else 0,
        "initial_connect_seconds": round(connect_seconds, 2),
        "moved_clients": len(moved),
        "moved_clients_recovered": len(recovered_after),
        "all_recovered": all_recovered,
        "seconds_until_all_recovered": round(max(recovered_after), 3) if recovered_after else None,
        "recovered_after_p50_s": round(statistics.median(recovered_after), 3) if recovered_after else None,
        "recovered_after_p99_s": round(quantiles(recovered_after)["p99"], 3) if recovered_after else None,
        "reconnect_attempts_moved": sum(s["connects"] for s in moved) - len(moved),
        "connects_shed_by_survivor": shed_count,
        "lost": sum(s["lost"] for s in summaries),
        "duplicated": sum(s["duplicated"] for s in summaries),
        "out_of_order": sum(s["out_of_order"] for s in summaries),
        "clients_with_a_problem": sum(1 for s in summaries if s["lost"] or s["duplicated"] or s["out_of_order"]),
        "survivor_clients_disconnected": sum(1 for s in stayed if s["disconnects"]),
        "survivor_latency_before_ms": {k: round(v, 2) for k, v in quantiles(before).items()},
        "survivor_latency_during_storm_ms": {k: round(v, 2) for k, v in quantiles(during).items()},
        "publications_per_channel": count,
        "uptime_before": uptime_before,
        "uptime_after": uptime(),
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1.0, help="publications per second on each channel")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long publications flow")
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of publications before the kill")
    parser.add_argument("--per-worker", type=int, default=2_500, help="clients in one worker process")
    parser.add_argument("--connect-rate", type=float, default=2_000.0)
    parser.add_argument("--connect-burst", type=int, default=2_000)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    parameters = {key: value for key, value in vars(args).items()}
    path = record("storm", parameters, figures, packages=("websockets",))
    for key, value in figures.items():
        print(f"  {key:<36} {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
