"""`tsunagu serve ws-gateway --workers 2` on real Redis and Kafka: stock centrifuge-python clients, the
stack's Prometheus binary scraping the shared metrics port, SIGKILL and SIGTERM sent to real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    PublicationContext,
    SubscriptionEventHandler,
)
from prometheus_client.parser import text_string_to_metric_families
from tsunagu_core.testing_clients import subscribed

REPO = Path(__file__).resolve().parents[2]
SECRET = "e2e-secret-long-enough-for-hs256-tokens"
API_KEY = "e2e-workers"
CLIENTS = 16


def token(user: str) -> str:
    return jwt.encode({"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}, SECRET, "HS256")


class Watched(ClientEventHandler):
    """A client's state changes: (connecting) code and reason, and how often it connected."""

    def __init__(self) -> None:
        self.connecting: list[tuple[int, str]] = []
        self.connects = 0

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        if ctx.code != 0:  # 0: connect() called; the others: the connection was lost or closed
            self.connecting.append((ctx.code, ctx.reason))

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.connects += 1


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check() if asyncio.iscoroutinefunction(check) else check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}; last: {last!r}")


def workers_env(real_env: dict[str, str], metrics_port: int) -> dict[str, str]:
    return {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": API_KEY,
        "TSUNAGU_METRICS_PORT": str(metrics_port),
        "TSUNAGU_SHUTDOWN_GRACE": "5",
        "TSUNAGU_LOG_LEVEL": "warning",
    }


def worker_pids(supervisor: int) -> dict[int, int]:
    """{worker index: pid} of the supervisor's children, from their environment."""
    found: dict[int, int] = {}
    for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"_TSUNAGU_WORKER="):
                found[int(entry.split(b"=", 1)[1].split(b"/")[0])] = int(pid)
    return found


def samples(metrics_url: str, name: str) -> dict[str, float]:
    """{worker: value} of metric `name`, parsed as Prometheus parses the text format."""
    text = httpx.get(metrics_url, timeout=5).text
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def connect_all(port: int, channel: str) -> tuple[list[Client], list[Watched], list[Inbox], list[Any]]:
    clients, watched, inboxes, subscriptions = [], [], [], []
    for n in range(CLIENTS):
        events = Watched()
        client = Client(
            f"ws://127.0.0.1:{port}/connection/websocket", token=token(f"u{n}"), events=events, max_reconnect_delay=0.5
        )
        await client.connect()
        inbox = Inbox()
        subscriptions.append(await subscribed(client, channel, inbox))
        clients.append(client)
        watched.append(events)
        inboxes.append(inbox)
    return clients, watched, inboxes, subscriptions


async def publish(port: int, channel: str, data: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"http://127.0.0.1:{port}/api/publish",
            json={"channel": channel, "data": data},
            headers={"X-API-Key": API_KEY},
            timeout=5,
        )
    assert answer.status_code == 200, answer.text


def start_prometheus(
    binary: str, directory: Path, port: int, metrics_port: int
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Prometheus scraping the workers' shared metrics port every second."""
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tsunagu-ws-gateway\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    log = (directory / "prometheus.log").open("wb")
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}"]
    process = subprocess.Popen(
        [*command, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
    )
    return process, log


async def test_two_workers_share_the_port_the_broker_and_one_scrape_target(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port, tmp_path: Path
) -> None:
    from tsunagu.stack.prometheus import Prometheus
    from tsunagu.stack.settings import StackSettings

    metrics_port = pick_port()
    group = start_service(["serve", "ws-gateway", "--workers", "2"], workers_env(real_env, metrics_port))
    body = await asyncio.to_thread(group.wait_ready)
    assert body["workers"] == {"0": "ready", "1": "ready"}, body
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    channel = f"chat:{uuid.uuid4().hex[:8]}"
    clients, _, inboxes, subscriptions = await connect_all(group.port, channel)
    # The kernel spread the connections over both workers, and any scrape counts them all.
    connections = samples(metrics, "tsunagu_gateway_connections")
    assert set(connections) == {"0", "1"} and all(connections.values()), connections
    assert sum(connections.values()) == CLIENTS
    for _ in range(5):  # each scrape may reach either worker: every one answers for both
        assert samples(metrics, "tsunagu_gateway_connections") == connections
        assert samples(metrics, "tsunagu_worker_up") == {"0": 1.0, "1": 1.0}

    # A publication from a client of one worker reaches the subscribers of the other (through Redis).
    before = samples(metrics, "tsunagu_gateway_deliveries_total")
    await subscriptions[0].publish({"n": 1})
    await until(lambda: all(inbox.data == [{"n": 1}] for inbox in inboxes), 10, "not every subscriber got it")
    after = samples(metrics, "tsunagu_gateway_deliveries_total")
    assert {w: after[w] - before.get(w, 0) for w in after} == connections, "each worker delivers to its own"

    # A real Prometheus, scraping the shared metrics port as the chart's pod annotation does, stores
    # one series per worker.
    binary = Prometheus(StackSettings()).binary()
    if binary is None:
        pytest.skip("no prometheus binary")
    prometheus_port = pick_port()
    prometheus, log = start_prometheus(binary, tmp_path, prometheus_port, metrics_port)
    try:
        api = f"http://127.0.0.1:{prometheus_port}/api/v1/query"

        async def stored() -> dict[str, float] | None:
            try:
                query = {"query": "tsunagu_gateway_connections"}
                result = (await asyncio.to_thread(httpx.get, api, params=query, timeout=2)).json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                return None
            series = {r["metric"]["worker"]: float(r["value"][1]) for r in result}
            return series if len(series) == 2 else None

        assert await until(stored, 30, "Prometheus did not store both workers' series") == connections
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        log.close()
    for client in clients:
        await client.disconnect()


async def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    metrics_port = pick_port()
    group = start_service(["serve", "ws-gateway", "--workers", "2"], workers_env(real_env, metrics_port))
    await asyncio.to_thread(group.wait_ready)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    clients, watched, inboxes, _ = await connect_all(group.port, channel)
    connections = samples(metrics, "tsunagu_gateway_connections")
    pids = worker_pids(group.process.pid)
    assert sorted(pids) == [0, 1], pids

    os.kill(pids[1], signal.SIGKILL)
    await until(lambda: sum(bool(w.connecting) for w in watched) == connections["1"], 10, "worker 1's clients")
    survivors = [inbox for inbox, w in zip(inboxes, watched, strict=True) if not w.connecting]
    assert len(survivors) == connections["0"]
    # Worker 0 serves on, its clients untouched, while worker 1 is down or coming back.
    await publish(group.port, channel, {"n": "during"})
    await until(lambda: all(inbox.data == [{"n": "during"}] for inbox in survivors), 10, "the survivor stopped")

    restarted = await until(lambda: worker_pids(group.process.pid).get(1, pids[1]) != pids[1], 15, "no restart")
    assert restarted and worker_pids(group.process.pid)[0] == pids[0]
    body = await asyncio.to_thread(group.wait_ready)
    assert body["workers"] == {"0": "ready", "1": "ready"}, body
    # Worker 1's clients reconnected (to either worker) and every client gets what is published now.
    await until(lambda: all(w.connects == 1 + bool(w.connecting) for w in watched), 15, "clients did not reconnect")
    await until(lambda: samples(metrics, "tsunagu_worker_up") == {"0": 1.0, "1": 1.0}, 10, "worker 1 not back")
    await publish(group.port, channel, {"n": "after"})
    await until(lambda: all(inbox.data[-1:] == [{"n": "after"}] for inbox in inboxes), 10, "not every client got it")
    for client in clients:
        await client.disconnect()


async def test_a_hung_worker_makes_the_group_unready_and_is_replaced(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    from tsunagu.workers import CHECK_EVERY, MISSED_CHECKS

    group = start_service(["serve", "ws-gateway", "--workers", "2"], workers_env(real_env, pick_port()))
    await asyncio.to_thread(group.wait_ready)
    pids = worker_pids(group.process.pid)
    os.kill(pids[1], signal.SIGSTOP)  # alive to the kernel, its loop answers nothing
    try:
        # No probe through the shared port passes: one reaching the hung worker times out (as a kubelet's
        # would), one reaching the other is told the group is not whole.
        told = []
        for _ in range(20):
            try:
                answer = await asyncio.to_thread(httpx.get, group.base + "/readyz", timeout=3)
            except httpx.TimeoutException:
                continue
            assert answer.status_code == 503, answer.text
            told.append(answer.json())
            if len(told) == 2:
                break
        assert told and all(body["workers"] == {"0": "ready", "1": "not answering"} for body in told), told
        replaced = await until(
            lambda: worker_pids(group.process.pid).get(1, pids[1]) != pids[1],
            CHECK_EVERY * (MISSED_CHECKS + 2),
            "the supervisor did not replace the hung worker",
        )
        assert replaced
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGKILL)
    body = await asyncio.to_thread(group.wait_ready)
    assert body["workers"] == {"0": "ready", "1": "ready"}, body


async def test_sigterm_drains_every_worker_with_reconnect_advice(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    metrics_port = pick_port()
    group = start_service(["serve", "ws-gateway", "--workers", "2"], workers_env(real_env, metrics_port))
    await asyncio.to_thread(group.wait_ready)
    clients, watched, _, _ = await connect_all(group.port, f"chat:{uuid.uuid4().hex[:8]}")
    connections = samples(f"http://127.0.0.1:{metrics_port}/metrics", "tsunagu_gateway_connections")
    assert all(connections.values()), connections

    started = time.monotonic()
    group.process.send_signal(signal.SIGTERM)
    # Centrifugo's `shutdown` disconnect (3001): the SDK reconnects (elsewhere) rather than giving up.
    await until(lambda: all(w.connecting for w in watched), 10, "not every client was told")
    assert {w.connecting[0] for w in watched} == {(3001, "shutdown")}
    assert await asyncio.to_thread(group.process.wait, 15) == 0
    assert time.monotonic() - started < 5 + 5, "the drain outlasted its grace"
    for client in clients:
        await client.disconnect()


async def test_workers_end_with_a_killed_supervisor(start_service, real_env, pick_port) -> None:  # type: ignore[no-untyped-def]
    group = start_service(["serve", "ws-gateway", "--workers", "2"], workers_env(real_env, pick_port()))
    await asyncio.to_thread(group.wait_ready)
    pids = worker_pids(group.process.pid)
    group.process.kill()
    group.process.wait()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "Z" not in state(pid) for pid in pids.values())

    await until(gone, 10, "workers outlived their supervisor")


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def tsunagu(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tsunagu", *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_workers_without_a_shared_broker_are_refused() -> None:
    result = tsunagu("serve", "ws-gateway", "--workers", "2", env={"TSUNAGU_BROKER": "memory"})
    assert result.returncode == 2
    assert "TSUNAGU_BROKER=redis" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["serve", "ws-gateway", "--workers", "many"], {}, "--workers='many'"),
        (["serve", "ws-gateway"], {"TSUNAGU_GATEWAY_WORKERS": "-3"}, "TSUNAGU_GATEWAY_WORKERS='-3'"),
        (["serve", "auth", "--workers", "2"], {}, "--workers is for ws-gateway"),
    ],
)
def test_a_bad_worker_count_stops_with_one_line(args: list[str], env: dict[str, str], says: str) -> None:
    result = tsunagu(*args, env=env)
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("taken", ["port", "port, held with SO_REUSEPORT", "metrics port"])
def test_a_taken_port_stops_the_group_at_once(taken: str, pick_port: Any) -> None:
    """Another process's listener, even one the workers' SO_REUSEPORT sockets could join, is refused."""
    import socket

    with socket.socket() as holder:
        if "SO_REUSEPORT" in taken:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = str(holder.getsockname()[1])
        metrics = taken == "metrics port"
        port = str(pick_port()) if metrics else busy
        env = {"TSUNAGU_BROKER": "redis", "TSUNAGU_METRICS_PORT": busy if metrics else "0"}
        result = tsunagu("serve", "ws-gateway", "--workers", "2", "--port", port, env=env)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{busy}" in result.stderr and "Traceback" not in result.stderr, result.stderr
