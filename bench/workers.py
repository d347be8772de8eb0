"""Gateway workers benchmark: broadcast deliveries per second with `tsunagu serve ws-gateway --workers N`.

The windowed broadcast of bench/broadcast.py (the Go load generator, bench/loadgen: 1,000 subscribers of
one channel, ~200 B, publishes over WebSocket with 32 and 128 in flight) against the gateway with 1 and
with 2 workers, both on the Redis broker of `tsunagu stack` (the workers meet there: a publication
crosses Redis once per worker). The server's CPU is summed over the supervisor and its workers (the
load generator's `-server-pid` reads one process). Placement: 1 worker on CPU 0; 2 workers on CPUs 0-1;
the load generator on CPU 1 in both (a 2-core machine has no core to spare for it).

    eval "$(tsunagu stack env)"; python bench/workers.py --workers 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broadcast import BIN, REPO, loadgen, server_command, settle, wait_port
from record import Recorder


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants still running (the supervisor and its workers)."""
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pids.extend(int(child) for child in children)
    return total


@contextlib.contextmanager
def gateway(workers: int, redis_url: str) -> Iterator[tuple[int, int]]:
    """The gateway with `workers` processes on a free port and the Redis broker: yields (port, pid)."""
    from broadcast import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        command, env = server_command("tsunagu", port, Path(directory), None)
        env |= {"TSUNAGU_BROKER": "redis", "TSUNAGU_REDIS_URL": redis_url, "TSUNAGU_GATEWAY_WORKERS": str(workers)}
        cpus = "0" if workers == 1 else "0-1"
        server = subprocess.Popen(
            ["taskset", "-c", cpus, *command], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(port, server)
            yield port, server.pid
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def measure(workers: int, clients: int, seconds: float, window: int, redis_url: str) -> dict[str, Any]:
    with gateway(workers, redis_url) as (port, pid):
        settle(pid, port)
        before: list[float] = []

        def publishing() -> None:
            before.append(tree_cpu_seconds(pid))

        result = loadgen(
            port, 0, None, "-clients", str(clients), "-duration", f"{seconds}s", "-window", str(window),
            timeout=seconds + 180, publishing=publishing,
        )  # fmt: skip
        cpu = tree_cpu_seconds(pid) - before[0]
    # The load generator's figures span its publishing time; the CPU is read around the same span
    # (from its "subscribers connected" line to its end, which also holds the last deliveries).
    result["server_cpu_seconds"] = cpu
    result["deliveries_per_server_cpu_second"] = result["delivered"] / cpu if cpu else 0.0
    # Cores the gateway kept busy: 1.0 for one worker is a saturated worker.
    result["server_cores_busy"] = cpu / result["seconds"] if result["seconds"] else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--windows", nargs="+", type=int, default=[32, 128], help="publishes in flight, a run each")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    redis_url = os.environ.get("TSUNAGU_REDIS_URL") or "redis://127.0.0.1:6379/0"
    print("building the load generator (go build) ...", flush=True)
    subprocess.run(["go", "build", "-o", str(BIN / "loadgen"), "."], cwd=REPO / "bench" / "loadgen", check=True)
    recorder = Recorder("workers", {**vars(args), "redis_url": redis_url})
    print(f"\n{os.cpu_count()} cores; {recorder.load_before}")
    for window in args.windows:
        print(f"\nbroadcast: {args.clients} subscribers, one channel, ~200 B, {args.seconds:.0f} s, {window} in flight,"
              " Redis broker\n")  # fmt: skip
        print("| workers | run | deliveries/s | publishes/s | delivered/expected | per server CPU-s | cores busy |"
              " disconnects |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for run in range(1, args.repeat + 1):
            for workers in args.workers:
                try:
                    r = measure(workers, args.clients, args.seconds, window, redis_url)
                except RuntimeError as exc:
                    print(f"| {workers} | {run} | failed: {exc} | | | | | |", flush=True)
                    continue
                note = f"{workers} worker(s), {window} in flight, run {run}"
                details = {"workers": workers, "window": window, "run": run}
                recorder.add("deliveries_per_second", r["deliveries_per_second"], "1/s", note=note, raw=r, **details)
                recorder.add("deliveries_per_server_cpu_second", r["deliveries_per_server_cpu_second"], "1/s",
                             note=note, **details)  # fmt: skip
                recorder.add("server_cores_busy", r["server_cores_busy"], "cores", note=note, **details)
                print(
                    f"| {workers} | {run} | {r['deliveries_per_second']:,.0f} | {r['publishes_per_second']:,.0f} | "
                    f"{int(r['delivered']):,}/{int(r['expected']):,} | {r['deliveries_per_server_cpu_second']:,.0f} | "
                    f"{r['server_cores_busy']:.2f} | {int(r['disconnected_during_run'])} |",
                    flush=True,
                )
    recorder.save()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
