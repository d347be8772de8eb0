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
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
from record import Profile, Recorder, leaf_share

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


def build_loadgen() -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    print("building the load generator (go build) ...", flush=True)
    subprocess.run(["go", "build", "-o", str(BIN / "loadgen"), "."], cwd=REPO / "bench" / "loadgen", check=True)


def ensure_tools() -> None:
    build_loadgen()
    env = {**os.environ, "GOBIN": str(BIN)}
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
        "http_api": {"key": API_KEY},
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
    if name in ("tsunagu", "tsunagu-uvloop", "before"):
        if name == "tsunagu-uvloop":
            env["TSUNAGU_EVENT_LOOP"] = "uvloop"
        if name == "before":  # the gateway of `--before REV`, its sources ahead of ours on the path
            tree = BEFORE_TREE[0]
            paths = [tree / "src", tree / "libs" / "core" / "src", *sorted((tree / "services").glob("*/src"))]
            env["PYTHONPATH"] = os.pathsep.join(map(str, paths))
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


BEFORE_TREE: list[Path] = []


def export_before(revision: str, directory: Path) -> None:
    """`revision`'s tree in `directory`, served as the server `before` (what a change is measured against)."""
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    BEFORE_TREE[:] = [directory]


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, port: int, timeout: float = 60.0) -> None:
    """Wait until the server is idle. Our gateway builds its GraphQL and Socket.IO stacks in a worker
    thread a second after it listens (deferred.py): a request to each waits for them, then the CPU
    they took is over before the run's is counted."""
    for path in ("/graphql", "/socket.io/?EIO=4&transport=polling"):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.03:
            return


def loadgen(
    port: int,
    pid: int,
    pki: DevPki | None,
    *args: str,
    timeout: float = 300,
    publishing: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the load generator on CPU 1 against the server on `port` (pid `pid`, whose CPU it reads);
    `publishing` is called once its subscribers are connected and it starts publishing. `{port}` in an
    argument is the server's port (an -url of another endpoint)."""
    args = tuple(arg.replace("{port}", str(port)) for arg in args)
    scheme = "wss" if pki else "ws"
    trust = ["-ca", str(pki.ca_cert)] if pki else []
    api = f"{'https' if pki else 'http'}://127.0.0.1:{port}/api"
    load = subprocess.Popen(
        ["taskset", "-c", "1", str(BIN / "loadgen"), "-url", f"{scheme}://127.0.0.1:{port}/connection/websocket",
         *trust, "-token", bench_token(), "-api", api, "-apikey", API_KEY, "-server-pid", str(pid), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert load.stderr is not None
    log: list[str] = []
    for line in load.stderr:  # its log goes to stderr; the result is one line of stdout at the end
        log.append(line)
        if "subscribers connected" in line:
            if publishing is not None:
                publishing()
            break
    try:
        stdout, rest = load.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        load.kill()
        raise RuntimeError("load generator timed out") from None
    if load.returncode != 0:
        raise RuntimeError(f"load generator failed: {(''.join(log) + rest).strip()[-500:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def measure(
    name: str,
    clients: int,
    seconds: float,
    window: int,
    pki: DevPki | None = None,
    *extra: str,
    profile: str = "",
) -> tuple[dict[str, Any], Profile | None]:
    """Windowed broadcast (publishes over WebSocket, `window` in flight) or, with `-publish http` in
    `extra`, through the server API; with `profile`, py-spy records the server while it publishes."""
    with pinned_server(name, pki) as (port, pid):
        settle(pid, port)
        spy: list[Profile] = []

        def publishing() -> None:
            if profile:
                spy.append(Profile(profile, pid, seconds, rate=PROFILE_RATE))

        result = loadgen(
            port, pid, pki, "-clients", str(clients), "-duration", f"{seconds}s", "-window", str(window), *extra,
            timeout=seconds + 180, publishing=publishing,
        )  # fmt: skip
        if spy:
            spy[0].finish()
        return result, spy[0] if spy else None


def many_channels(name: str, clients: int, seconds: float, profile: str = "") -> tuple[dict[str, Any], Profile | None]:
    """`clients` connections, each on a channel of its own plus one shared channel, every channel
    published once a second through the server API (batches every 10 ms); with `profile`, py-spy records
    the server while it publishes."""
    with pinned_server(name) as (port, pid):
        settle(pid, port)
        spy: list[Profile] = []

        def publishing() -> None:
            if profile:
                spy.append(Profile(profile, pid, seconds, rate=PROFILE_RATE))

        result = loadgen(
            port, pid, None, "-mode", "channels", "-publish", "http", "-clients", str(clients),
            "-duration", f"{seconds}s", "-period", "1s", timeout=seconds + 300, publishing=publishing,
        )  # fmt: skip
        if spy:
            spy[0].finish()
        return result, spy[0] if spy else None


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


API_WINDOWS = (1, 4, 64)
PROFILE_RATE = 200  # py-spy samples per second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--window", type=int, default=32, help="publish commands in flight (windowed scenario)")
    parser.add_argument("--servers", nargs="*", default=["reference", "centrifugo", "tsunagu", "plain"])
    parser.add_argument(
        "--api-windows", nargs="*", type=int, default=list(API_WINDOWS),
        help="server API publishes in flight, one run per value (empty: skip)",
    )  # fmt: skip
    parser.add_argument("--channels-clients", type=int, default=10_000, help="0 skips the many-channels scenario")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each server API and many-channels comparison")
    parser.add_argument("--idle-clients", type=int, default=10_000, help="0 skips the idle-memory scenario")
    parser.add_argument(
        "--tls-servers", nargs="*", default=["centrifugo", "tsunagu"], help="measured once more over wss://"
    )
    parser.add_argument("--before", default="", help="a git revision: its gateway is the server `before`")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on our gateway in the last server API and many-channels runs"
    )
    parser.add_argument("--scenarios", nargs="*", default=["windowed", "api", "channels", "tls", "idle"])
    args = parser.parse_args()
    ensure_tools()
    before_dir = tempfile.TemporaryDirectory()
    if args.before:
        export_before(args.before, Path(before_dir.name))
    recorder = Recorder("broadcast", {k: v for k, v in vars(args).items()})
    compared = [name for name in ("centrifugo", "before", "tsunagu", "tsunagu-uvloop") if name in args.servers]
    print(f"\n{os.cpu_count()} cores: server on CPU 0, load on CPU 1; {recorder.load_before}")
    if "windowed" in args.scenarios:
        windowed(args, recorder)
    if "api" in args.scenarios and args.api_windows:
        server_api(args, compared, recorder)
    if "channels" in args.scenarios and args.channels_clients:
        channels(args, compared, recorder)
    if "tls" in args.scenarios and args.tls_servers:
        with tempfile.TemporaryDirectory() as tls_dir:
            pki, _ = ensure_dev_pki(Path(tls_dir))
            windowed(args, recorder, pki)
    if "idle" in args.scenarios and args.idle_clients:
        print(f"\nidle authenticated connections: {args.idle_clients}, server RSS growth per connection\n")
        print("| server | KB per connection | seconds to connect all |")
        print("|---|---:|---:|")
        for name in compared:
            per_connection, seconds = idle_memory(name, args.idle_clients)
            recorder.add("idle_kb_per_connection", per_connection, "KB", note=name, server=name,
                         clients=args.idle_clients)  # fmt: skip
            recorder.add("idle_connect_seconds", seconds, "s", note=name, server=name, clients=args.idle_clients)
            print(f"| {name} | {per_connection:.1f} | {seconds:.1f} |", flush=True)
    recorder.save()


def windowed(args: argparse.Namespace, recorder: Recorder, pki: DevPki | None = None) -> None:
    names = args.tls_servers if pki else args.servers
    print(f"\nbroadcast{' over wss://' if pki else ''}: {args.clients} subscribers, one channel, ~200 B, "
          f"{args.seconds:.0f} s of publishing over WebSocket, {args.window} in flight\n")  # fmt: skip
    print("| server | deliveries/s | publishes/s | delivered/expected | per server CPU-s | disconnects |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        label = f"{name} (wss://, TLS 1.3)" if pki else name
        try:
            r, _ = measure(name, args.clients, args.seconds, args.window, pki)
        except RuntimeError as exc:
            print(f"| {label} | failed: {exc} | | | | |")
            continue
        recorder.add("windowed_deliveries_per_second", r["deliveries_per_second"], "1/s",
                     note=f"{label}, {args.window} in flight", server=name,
                     tls=pki is not None, window=args.window, raw=r)  # fmt: skip
        print(
            f"| {label} | {r['deliveries_per_second']:,.0f} | {r['publishes_per_second']:,.0f} | "
            f"{int(r['delivered']):,}/{int(r['expected']):,} | {r['deliveries_per_server_cpu_second']:,.0f} | "
            f"{int(r['disconnected_during_run'])} |",
            flush=True,
        )


def server_api(args: argparse.Namespace, names: list[str], recorder: Recorder) -> None:
    """Publishes through the HTTP server API, 1/4/64 in flight: deliveries per server CPU-second; with
    --profile, py-spy on our gateway in the last run of each setting and where its CPU goes per delivery."""
    print(f"\nbroadcast through the server API: {args.clients} subscribers, one channel, ~200 B, "
          f"{args.seconds:.0f} s; deliveries per CPU-second of the server process\n")  # fmt: skip
    print("| in flight | run | " + " | ".join(names) + " | ÷ centrifugo | lost/dup/reordered | p99 ms |")
    print("|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|")
    profiles: list[tuple[str, int, dict[str, Any], Profile]] = []
    for window in args.api_windows:
        for run in range(1, args.repeat + 1):
            per: dict[str, dict[str, Any]] = {}
            for name in names:
                profiled = args.profile and name.startswith("tsunagu") and run == args.repeat
                profile = f"broadcast-api-{window}-{name}" if profiled else ""
                r, spy = measure(name, args.clients, args.seconds, window, None, "-publish", "http", profile=profile)
                per[name] = r
                if spy is not None:
                    profiles.append((name, window, r, spy))
                recorder.add("api_deliveries_per_server_cpu_second", r["deliveries_per_server_cpu_second"], "1/s",
                             note=f"{name}, {window} in flight, run {run}", server=name, window=window, run=run,
                             raw=r)  # fmt: skip
            rates = [per[n]["deliveries_per_server_cpu_second"] for n in names]
            ratios = {n: per[n]["deliveries_per_server_cpu_second"] / rates[0] for n in names[1:] if rates[0]}
            for n, ratio in ratios.items():
                recorder.add(f"api_ratio_{n}_to_centrifugo", ratio, "x", note=f"{window} in flight, run {run}",
                             window=window, run=run)  # fmt: skip
            problems = "; ".join(f"{per[n]['lost']}/{per[n]['duplicated']}/{per[n]['out_of_order']}" for n in names)
            p99 = "; ".join(f"{per[n]['latency_p99_ms']:.1f}" for n in names)
            print(f"| {window} | {run} | " + " | ".join(f"{x:,.0f}" for x in rates) +
                  f" | {' / '.join(f'{r:.2f}x' for r in ratios.values())} | {problems} | {p99} |",
                  flush=True)  # fmt: skip
    for name, window, r, spy in profiles:
        per_delivery = float(r["server_cpu_us_per_delivery"])
        print(f"\nwhere {name}'s CPU goes, {window} in flight ({per_delivery:.2f} µs of server CPU per delivery; "
              f"py-spy, {spy.raw.relative_to(REPO)}):\n")  # fmt: skip
        print("| part | share of samples | µs per delivery |")
        print("|---|---:|---:|")
        for share, part in cpu_by_part(spy.raw):
            recorder.add("api_profile_us_per_delivery", share * per_delivery, "us",
                         note=f"{name}, {window} in flight: {part} ({share:.0%})", server=name, window=window,
                         part=part, share=share,
                         profile=str(spy.raw.relative_to(REPO)))  # fmt: skip
            print(f"| {part} | {share:.1%} | {share * per_delivery:.2f} |", flush=True)


# Where a sample is counted: the first part (in this order) with a frame in its stack.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket writes (transport.write, the send syscall)", ("_SelectorSocketTransport.write",)),
    ("flush callbacks (with uvloop: its C transport.write and the syscall too)", ("_Flusher.run",)),
    ("encoding the publication (once per flavour)", ("publication_push",)),
    ("queueing per subscriber (WebSocketTransport.send)", ("WebSocketTransport.send",)),
    ("fan-out loop (Node.on_publication), the rest", ("Node.on_publication",)),
    ("the publish itself (broker, history)", ("MemoryBroker.publish", "Broker.publish")),
    ("server API: HTTP parsing, routing, JSON", ("HttpToolsProtocol", "H11Protocol", "RequestResponseCycle")),
    ("reading client frames (pings, commands)", ("WebSocketsSansIOProtocol.data_received", "serve (tsunagu_ws")),
    ("event loop: epoll and scheduling", ("_run_once",)),
)


def cpu_by_part(raw: Path) -> list[tuple[float, str]]:
    """The share of py-spy's samples per part of the gateway (PARTS), from its raw (collapsed) output."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        part = next((name for name, frames in PARTS if any(frame in stack for frame in frames)), "other")
        counts[part] = counts.get(part, 0) + int(number)
        total += int(number)
    order = [name for name, _ in PARTS] + ["other"]
    return [(counts[name] / total, name) for name in order if counts.get(name)]


def channels(args: argparse.Namespace, names: list[str], recorder: Recorder) -> None:
    seconds = max(args.seconds, 10)
    print(f"\nmany channels: {args.channels_clients} connections, each on its own channel and one shared "
          f"channel, every channel published once a second through the server API, {seconds:.0f} s\n")  # fmt: skip
    print("| server | run | deliveries | server CPU µs per delivery | p50 ms | p99 ms | lost/dup/reordered |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    profiles: list[tuple[str, dict[str, Any], Profile]] = []
    for run in range(1, args.repeat + 1):
        for name in names:
            profiled = args.profile and name.startswith("tsunagu") and run == args.repeat
            r, spy = many_channels(
                name, args.channels_clients, seconds, f"broadcast-channels-{name}" if profiled else ""
            )
            if spy is not None:
                profiles.append((name, r, spy))
            recorder.add("channels_server_cpu_us_per_delivery", r["server_cpu_us_per_delivery"], "us",
                         note=f"{name}, run {run}",
                         server=name, run=run, raw=r)  # fmt: skip
            recorder.add("channels_latency_p99_ms", r["latency_p99_ms"], "ms", note=f"{name}, run {run}",
                         server=name, run=run)  # fmt: skip
            print(f"| {name} | {run} | {int(r['delivered']):,}/{int(r['expected']):,} | "
                  f"{r['server_cpu_us_per_delivery']:.1f} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
                  f"{r['lost']}/{r['duplicated']}/{r['out_of_order']} |", flush=True)  # fmt: skip
    for name, r, spy in profiles:
        per_delivery = float(r["server_cpu_us_per_delivery"])
        print(f"\nwhere {name}'s CPU goes with many channels ({per_delivery:.1f} µs of server CPU per delivery; "
              f"py-spy, {spy.raw.relative_to(REPO)}):\n")  # fmt: skip
        print("| part | share of samples | µs per delivery |")
        print("|---|---:|---:|")
        for share, part in cpu_by_part(spy.raw):
            recorder.add("channels_profile_us_per_delivery", share * per_delivery, "us",
                         note=f"{name}: {part} ({share:.0%})", server=name, part=part, share=share,
                         profile=str(spy.raw.relative_to(REPO)))  # fmt: skip
            print(f"| {part} | {share:.1%} | {share * per_delivery:.2f} |", flush=True)
        print("\n| function (self time) | share of samples |\n|---|---:|")
        for share, function in leaf_share(spy.raw, 15):
            recorder.add("channels_profile_self_share", share, "", note=f"{name}: {function}", server=name)
            print(f"| `{function}` | {share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
