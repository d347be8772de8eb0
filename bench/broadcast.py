"""Broadcast benchmark: deliveries per second to 1,000 subscribers of one channel, ~200 B payloads.

Each server runs pinned to CPU 0 (`taskset -c 0`), the Go load generator (bench/loadgen) to CPU 1,
in the same run:
- reference: the load generator's own Go server (encode once, write the same bytes): the ceiling of
  the load tool and this machine, not a product;
- centrifugo: Centrifugo v6 built from the Go module proxy with `go install`, memory engine,
  history 100 and recovery on, like ours;
- tsunagu: `tsunagu serve ws-gateway`, memory engines, default namespace (history 100, recovery);
- plain: bench/plain_broadcast.py, python-websockets with a per-subscriber `await send()` loop;
then Centrifugo and tsunagu once more serving wss:// (a development certificate), the same load.
Prints a Markdown table. Needs Go (present on this machine) and `taskset` (util-linux).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jwt

from tsunagu.devpki import DevPki, ensure_dev_pki

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".cache" / "bin"
CENTRIFUGO_VERSION = "v6.9.1"
SECRET = "bench-secret-that-is-long-enough-for-hs256"
API_KEY = "bench-api-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_tools() -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(BIN)}
    print("building the load generator (go build) ...", flush=True)
    subprocess.run(["go", "build", "-o", str(BIN / "loadgen"), "."], cwd=REPO / "bench" / "loadgen", check=True)
    marker = BIN / f"centrifugo-{CENTRIFUGO_VERSION}"
    if not marker.exists():
        print(f"building Centrifugo {CENTRIFUGO_VERSION} (go install, several minutes the first time) ...", flush=True)
        subprocess.run(
            ["go", "install", f"github.com/centrifugal/centrifugo/v6@{CENTRIFUGO_VERSION}"], env=env, check=True
        )
        marker.touch()


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def centrifugo_config(port: int, directory: Path, pki: DevPki | None) -> Path:
    http_server: dict[str, object] = {"address": "127.0.0.1", "port": port}
    if pki is not None:
        http_server["tls"] = {
            "enabled": True,
            "cert_pem": str(pki.server_cert),
            "key_pem": str(pki.server_key),
        }
    config = {
        "http_server": http_server,
        "log": {"level": "error"},
        "usage_stats": {"disabled": True},
        "client": {"token": {"hmac_secret_key": SECRET}, "allowed_origins": ["*"]},
        "channel": {
            "without_namespace": {
                "allow_subscribe_for_client": True,
                "allow_publish_for_client": True,
                "history_size": 100,
                "history_ttl": "300s",
                "force_recovery": True,
            }
        },
    }
    path = directory / "centrifugo.json"
    path.write_text(json.dumps(config))
    return path


def server_command(name: str, port: int, directory: Path, pki: DevPki | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if name == "reference":
        return [str(BIN / "loadgen"), "-serve", f"127.0.0.1:{port}"], env
    if name == "centrifugo":
        return [str(BIN / "centrifugo"), "--config", str(centrifugo_config(port, directory, pki))], env
    if name == "tsunagu":
        if pki is not None:
            env |= {
                "TSUNAGU_SERVER_TLS_CERT_FILE": str(pki.server_cert),
                "TSUNAGU_SERVER_TLS_KEY_FILE": str(pki.server_key),
            }
        env |= {
            "TSUNAGU_BUS": "memory",
            "TSUNAGU_BROKER": "memory",
            "TSUNAGU_LOG_LEVEL": "warning",
            "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
            "TSUNAGU_GATEWAY_API_KEY": API_KEY,
            # The publisher sends as fast as acks come back; the per-connection limit would cut it off.
            "TSUNAGU_GATEWAY_COMMANDS_PER_SECOND": "1000000",
            # One user and one address hold every connection of the load generator.
            "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_USER": "0",
            "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
        }
        return [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)], env
    if name == "plain":
        return [sys.executable, str(REPO / "bench" / "plain_broadcast.py"), "--port", str(port)], env
    raise ValueError(name)


def bench_token() -> str:
    return jwt.encode({"sub": "bench", "channels": ["bench*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")


@contextlib.contextmanager
def pinned_server(name: str, pki: DevPki | None = None) -> Iterator[tuple[int, int]]:
    """One server under test on CPU 0, on a free port: yields (port, pid); stopped (killed if need be) after.
    With `pki`, it serves wss:// with that PKI's server certificate."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        command, env = server_command(name, port, Path(directory), pki)
        server = subprocess.Popen(
            ["taskset", "-c", "0", *command], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(port, server)
            yield port, server.pid
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()


def measure(name: str, clients: int, seconds: float, window: int, pki: DevPki | None = None) -> dict[str, float]:
    with pinned_server(name, pki) as (port, _):
        time.sleep(1.0)
        url = f"{'wss' if pki else 'ws'}://127.0.0.1:{port}/connection/websocket"
        trust = ["-ca", str(pki.ca_cert)] if pki else []
        load = subprocess.run(
            ["taskset", "-c", "1", str(BIN / "loadgen"), "-url", url, *trust,
             "-token", bench_token(), "-clients", str(clients), "-duration", f"{seconds}s", "-window", str(window)],
            capture_output=True, text=True, timeout=seconds + 120,
        )  # fmt: skip
        if load.returncode != 0:
            raise RuntimeError(f"{name}: load generator failed: {load.stderr.strip()[-500:]}")
        result: dict[str, float] = json.loads(load.stdout.strip().splitlines()[-1])
        return result


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the server may run under `uv run` or taskset)."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pids.extend(int(child) for child in children)
    return total


def idle_memory(name: str, clients: int) -> tuple[float, float]:
    """RSS per idle authenticated connection in KB, and seconds to connect them all."""
    with pinned_server(name) as (port, server_pid):
        time.sleep(2.0)
        before = rss_kb(server_pid)
        load = subprocess.Popen(
            ["taskset", "-c", "1", str(BIN / "loadgen"), "-url", f"ws://127.0.0.1:{port}/connection/websocket",
             "-token", bench_token(), "-clients", str(clients), "-idle", "8s"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert load.stdout is not None
        ready = json.loads(load.stdout.readline())
        time.sleep(2.0)
        after = rss_kb(server_pid)
        load.wait(60)
        return (after - before) / clients, float(ready["connect_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--window", type=int, default=32, help="publish commands in flight")
    parser.add_argument("--servers", nargs="*", default=["reference", "centrifugo", "tsunagu", "plain"])
    parser.add_argument("--idle-clients", type=int, default=10_000, help="0 skips the idle-memory scenario")
    parser.add_argument(
        "--tls-servers", nargs="*", default=["centrifugo", "tsunagu"], help="measured once more over wss://"
    )
    args = parser.parse_args()
    ensure_tools()
    print(f"\nbroadcast: {args.clients} subscribers, one channel, ~200 B, {args.seconds:.0f} s of publishing; "
          f"{os.cpu_count()} cores: server on CPU 0, load on CPU 1\n")  # fmt: skip
    print("| server | deliveries/s | publishes/s | delivered/expected | disconnects |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tls_dir:
        pki, _ = ensure_dev_pki(Path(tls_dir))
        runs = [(name, None) for name in args.servers] + [(name, pki) for name in args.tls_servers]
        for name, tls in runs:
            label = f"{name} (wss://, TLS 1.3)" if tls else name
            try:
                r = measure(name, args.clients, args.seconds, args.window, tls)
            except RuntimeError as exc:
                print(f"| {label} | failed: {exc} | | | |")
                continue
            print(
                f"| {label} | {r['deliveries_per_second']:,.0f} | {r['publishes_per_second']:,.0f} | "
                f"{int(r['delivered']):,}/{int(r['expected']):,} | {int(r['disconnected_during_run'])} |",
                flush=True,
            )
    if args.idle_clients:
        print(f"\nidle authenticated connections: {args.idle_clients}, server RSS growth per connection\n")
        print("| server | KB per connection | seconds to connect all |")
        print("|---|---:|---:|")
        for name in ("centrifugo", "tsunagu"):
            if name in args.servers:
                per_connection, seconds = idle_memory(name, args.idle_clients)
                print(f"| {name} | {per_connection:.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
