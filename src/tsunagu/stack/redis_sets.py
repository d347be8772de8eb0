"""Several redis-servers as one: Redis Cluster (primaries with replicas) and a Sentinel-watched primary.

`PrivateRedisCluster` and `PrivateRedisSentinel` are a test's own, on free ports, built from `PrivateRedis`
servers: the tests that kill a primary (failover) never touch anything shared. `tsunagu stack up
redis-cluster` / `redis-sentinel` run the same sets on the stack's fixed ports, through one supervising
process (`python -m tsunagu.stack.redis_sets`) that the stack starts, probes and stops like any server.

    with PrivateRedisCluster(tmp_path) as cluster:   # 3 primaries, 1 replica each, ~2 s
        client = redis.RedisCluster.from_url(cluster.plain_url)
        cluster.kill_primary_of("{chat:room}")       # kill -9; its replica takes over
        cluster.wait_healthy()
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from tsunagu.devpki import DevPki
from tsunagu.stack import proc
from tsunagu.stack.base import Component
from tsunagu.stack.redis import PrivateRedis, redis_server
from tsunagu.stack.settings import (
    HOST,
    SENTINEL_SERVICE,
    StackError,
    StackSettings,
    redis_cluster_ports,
    redis_cluster_url,
    redis_sentinel_ports,
    redis_sentinel_url,
)

SLOTS = 16384
# A replica's first sync starts at once (Redis waits 5 s by default for more replicas to share it).
_REPLICATION = ["repl-diskless-sync-delay 0"]


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=5, socket_connect_timeout=2)


def _sentinel(port: int, timeout: float = 5) -> Any:
    """A client of one sentinel (redis-py's SENTINEL replies are untyped)."""
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=2)


def _primary_address(port: int, service: str, timeout: float = 5) -> tuple[str, int]:
    """The primary that the sentinel on `port` names for `service`."""
    host, primary = _sentinel(port, timeout).sentinel_get_master_addr_by_name(service)
    return host.decode() if isinstance(host, bytes) else str(host), int(primary)


def _tls_config(pki: DevPki | None, port: int) -> list[str]:
    """redis.conf lines of a server that also serves TLS clients on `port` with the development CA's server
    certificate, requiring client certificates, and speaks TLS to its peers (cluster bus, replication);
    its plain port stays for the harness's own probes."""
    if pki is None:
        return []
    return [
        f"tls-port {port}",
        f"tls-cert-file {pki.server_cert}",
        f"tls-key-file {pki.server_key}",
        f"tls-ca-cert-file {pki.ca_cert}",
        "tls-auth-clients yes",
        "tls-replication yes",
    ]


def _wait(what: str, condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(poll)
    raise StackError(f"{what} after {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


class _ServerSet:
    """Start, stop and context management shared by both sets."""

    servers: list[PrivateRedis]

    def start(self) -> _ServerSet:
        raise NotImplementedError

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop(grace=5.0)

    @property
    def running(self) -> bool:
        return any(server.running for server in self.servers)

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class SlotMove:
    """A slot being moved between two primaries (`PrivateRedisCluster.start_slot_move`)."""

    slot: int
    source: PrivateRedis
    target: PrivateRedis
    target_id: str
    owners: set[int]


class PrivateRedisCluster(_ServerSet):
    """`primaries` primaries with `replicas` replicas each, the slots split evenly; a node is judged
    failed after `node_timeout_ms` (a failover then takes ~2-3 s). `ports`: fixed client ports (the
    stack's); by default free ones, and every cluster bus port is chosen free too. `tls`: the nodes also
    serve TLS (mTLS) on ports of their own, announce those in the slot map and speak TLS on the bus;
    `url` is then `rediss-cluster://` over them."""

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        ports: Sequence[int] = (),
        bus_ports: Sequence[int] = (),
        start_timeout: float = 30.0,
        tls: DevPki | None = None,
    ) -> None:
        count = primaries * (1 + replicas)
        self.directory = Path(directory)
        self.primaries = primaries
        self.replicas = replicas
        self.start_timeout = start_timeout
        ports = list(ports) or _free_ports(count)
        bus_ports = list(bus_ports) or _free_ports(count, avoid=ports)
        self.tls_ports = _free_ports(count, avoid=[*ports, *bus_ports]) if tls is not None else []
        if len(ports) != count or len(bus_ports) != count:
            raise StackError(f"a cluster of {primaries} primaries with {replicas} replicas each needs {count} ports")
        self.servers = [
            PrivateRedis(
                self.directory / f"node-{port}",
                port=port,
                config=[
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-node-timeout {node_timeout_ms}",
                    f"cluster-port {bus}",
                    # a replica takes over at once, however long it was cut off (a test kills primaries)
                    "cluster-replica-validity-factor 0",
                    *_REPLICATION,
                    *_tls_config(tls, tls_port),
                    # the slot map and MOVED then name the TLS ports (Redis 7.0 announces one port)
                    *(["tls-cluster yes"] if tls is not None else []),
                ],
                start_timeout=start_timeout,
            )
            for port, bus, tls_port in zip(ports, bus_ports, self.tls_ports or ports, strict=True)
        ]
        self.bus_ports = bus_ports

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """What `TSUNAGU_REDIS_URL` is set to (every node a seed)."""
        if self.tls_ports:
            return "rediss-cluster://" + ",".join(f"{HOST}:{port}" for port in self.tls_ports)
        return "redis-cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self) -> PrivateRedisCluster:
        formed = all((server.data / "nodes.conf").exists() for server in self.servers)
        threads = [threading.Thread(target=server.start) for server in self.servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for server in self.servers:
            if not server.running:
                server.start()  # raises with the server's reason
        if not formed or not self._slots_assigned():
            self._form()
        self.wait_healthy()
        return self

    def _slots_assigned(self) -> bool:
        info = _client(self.ports[0]).cluster("info")
        return int(info.get("cluster_slots_assigned", 0)) == SLOTS

    def _form(self) -> None:
        clients = [_client(port) for port in self.ports]
        per = SLOTS // self.primaries
        for index in range(self.primaries):
            last = SLOTS - 1 if index == self.primaries - 1 else (index + 1) * per - 1
            clients[index].execute_command("CLUSTER", "ADDSLOTSRANGE", index * per, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", HOST, self.ports[0], self.bus_ports[0])
        everyone = len(clients)
        _wait(
            "the cluster's nodes did not all meet",
            lambda: all(len(_known_nodes(client)) == everyone for client in clients),
            self.start_timeout,
        )
        ids = [client.execute_command("CLUSTER", "MYID").decode() for client in clients]
        for index, client in enumerate(clients[self.primaries :]):
            client.execute_command("CLUSTER", "REPLICATE", ids[index % self.primaries])

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Until every live node reports the cluster `ok` with every slot served and each primary's
        replicas in sync."""

        def healthy() -> bool:
            live = [server for server in self.servers if server.running]
            for server in live:
                info = _client(server.port).cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != SLOTS:
                    return False
            for server in live:
                replication = _client(server.port).info("replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        _wait("the cluster is not healthy", healthy, timeout or self.start_timeout)

    def primary_of(self, key: str) -> PrivateRedis:
        """The server that holds `key`'s slot now."""
        client = _client(next(server.port for server in self.servers if server.running))
        slot = int(client.cluster("keyslot", key))
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self._server_at(int(primary[1]))
        raise StackError(f"no node serves slot {slot}")

    def move_slot_of(self, key: str) -> PrivateRedis:
        """Reshard: move `key`'s slot, with its keys, to another primary (as `redis-cli --cluster
        reshard` does); returns the new owner."""
        return self.finish_slot_move(self.start_slot_move(key))

    def start_slot_move(self, key: str) -> SlotMove:
        """The first half of a reshard: `key`'s slot MIGRATING on its owner and IMPORTING on another
        primary, its keys moved there; the owner still owns the slot, so commands on its keys now get
        ASK redirections to the target."""
        source = self.primary_of(key)
        src = _client(source.port)
        slot = int(src.cluster("keyslot", key))
        owners = {self._server_at(int(entry[2][1])).port for entry in src.execute_command("CLUSTER", "SLOTS")}
        target = next(s for s in self.servers if s.running and s.port in owners and s is not source)
        dst = _client(target.port)
        source_id, target_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
        return SlotMove(slot, source, target, target_id, owners)

    def finish_slot_move(self, move: SlotMove) -> PrivateRedis:
        """The slot's new owner is the target, told to every primary; returns the target."""
        # The target first, then the source, then the others, as the Redis Cluster specification orders it
        # (the source first would leave a moment in which each redirects to the other).
        for port in sorted(move.owners, key=lambda p: (p != move.target.port, p != move.source.port)):
            _client(port).execute_command("CLUSTER", "SETSLOT", move.slot, "NODE", move.target_id)
        self.wait_healthy()
        return move.target

    def _server_at(self, port: int) -> PrivateRedis:
        """The node the slot map names by `port` (its TLS one with `tls`)."""
        tls = dict(zip(self.ports, self.tls_ports, strict=False))
        return next(server for server in self.servers if port in (server.port, tls.get(server.port)))

    def kill_primary_of(self, key: str) -> PrivateRedis:
        """kill -9 the primary holding `key`; its replica is promoted after the node timeout."""
        primary = self.primary_of(key)
        primary.kill()
        return primary

    def wait_failover(self, killed: PrivateRedis, timeout: float = 20.0) -> None:
        """Until the slots `killed` held are served by a promoted replica."""

        def promoted() -> bool:
            client = _client(next(server.port for server in self.servers if server.running))
            owners = {self._server_at(int(entry[2][1])).port for entry in client.execute_command("CLUSTER", "SLOTS")}
            info = client.cluster("info")
            return killed.port not in owners and info.get("cluster_state") == "ok"

        _wait(f"no replica took over from {HOST}:{killed.port}", promoted, timeout)


def _known_nodes(client: redis.Redis) -> list[str]:
    raw = client.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [line for line in text.splitlines() if line.strip() and "handshake" not in line and "noaddr" not in line]


class PrivateRedisSentinel(_ServerSet):
    """A primary with `replicas` replicas watched by `sentinels` sentinels (quorum: a majority), which
    judge it down after `down_after_ms` and promote a replica (~2-4 s in all). `tls`: every server and
    sentinel also serves TLS (mTLS) on a port of its own, announced to the sentinels (and by them to
    clients) in place of the plain one, and they speak TLS to each other; `url` is `rediss-sentinel://`."""

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        service: str = SENTINEL_SERVICE,
        ports: Sequence[int] = (),
        sentinel_ports: Sequence[int] = (),
        start_timeout: float = 30.0,
        tls: DevPki | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.service = service
        self.start_timeout = start_timeout
        ports = list(ports) or _free_ports(1 + replicas)
        sentinel_ports = list(sentinel_ports) or _free_ports(sentinels, avoid=ports)
        if len(ports) != 1 + replicas or len(sentinel_ports) != sentinels:
            raise StackError(f"a primary with {replicas} replicas and {sentinels} sentinels needs as many ports")
        # plain port -> TLS port; what the servers announce and replicate on with `tls`
        self.tls_ports: dict[int, int] = {}
        if tls is not None:
            chosen = _free_ports(len(ports) + len(sentinel_ports), avoid=[*ports, *sentinel_ports])
            self.tls_ports = dict(zip([*ports, *sentinel_ports], chosen, strict=True))
        announced = self.tls_ports or {port: port for port in [*ports, *sentinel_ports]}
        primary = ports[0]

        def data_config(port: int) -> list[str]:
            lines = [*_REPLICATION, *([] if port == primary else [f"replicaof {HOST} {announced[primary]}"])]
            if tls is not None:
                # the primary lists a replica at the port it announces: its TLS one
                lines += [*_tls_config(tls, announced[port]), f"replica-announce-port {announced[port]}"]
            return lines

        self.data_servers = [
            PrivateRedis(
                self.directory / f"redis-{port}", port=port, config=data_config(port), start_timeout=start_timeout
            )
            for port in ports
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            PrivateRedis(
                self.directory / f"sentinel-{port}",
                port=port,
                sentinel=True,
                config=[
                    f"sentinel monitor {service} {HOST} {announced[primary]} {quorum}",
                    f"sentinel down-after-milliseconds {service} {down_after_ms}",
                    f"sentinel failover-timeout {service} 10000",
                    f"sentinel parallel-syncs {service} {replicas}",
                    # the other sentinels (over TLS with `tls`) reach it at the port it announces
                    *(
                        [*_tls_config(tls, announced[port]), f"sentinel announce-port {announced[port]}"]
                        if tls is not None
                        else []
                    ),
                ],
                start_timeout=start_timeout,
            )
            for port in sentinel_ports
        ]
        self.servers = [*self.data_servers, *self.sentinels]

    @property
    def url(self) -> str:
        """What `TSUNAGU_REDIS_URL` is set to."""
        if self.tls_ports:
            sentinels = ",".join(f"{HOST}:{self.tls_ports[s.port]}" for s in self.sentinels)
            return f"rediss-sentinel://{sentinels}#{self.service}"
        return "redis-sentinel://" + ",".join(f"{HOST}:{s.port}" for s in self.sentinels) + f"#{self.service}"

    def _server_at(self, port: int) -> PrivateRedis:
        """The data server a sentinel names by `port` (its TLS one with `tls`)."""
        return next(server for server in self.data_servers if port in (server.port, self.tls_ports.get(server.port)))

    def start(self) -> PrivateRedisSentinel:
        for server in self.data_servers:
            server.start()
        for sentinel in self.sentinels:
            # Sentinel rewrites its file with what it learnt: a fresh start begins from the generated one.
            sentinel.conf.unlink(missing_ok=True)
            sentinel.start()
        self.wait_healthy()
        return self

    def primary(self) -> PrivateRedis:
        """The data server the sentinels name as primary now."""
        _, port = _primary_address(self._live_sentinel().port, self.service)
        return self._server_at(int(port))

    def _live_sentinel(self) -> PrivateRedis:
        return next(sentinel for sentinel in self.sentinels if sentinel.running)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Until every sentinel knows the primary, its live replicas in sync, and the other sentinels."""
        live_replicas = sum(1 for server in self.data_servers if server.running) - 1

        def healthy() -> bool:
            for sentinel in self.sentinels:
                client = _sentinel(sentinel.port)
                master = client.sentinel_master(self.service)
                if "s_down" in str(master.get("flags", "")) or "o_down" in str(master.get("flags", "")):
                    return False
                replicas = [
                    r
                    for r in client.sentinel_slaves(self.service)
                    if "s_down" not in str(r.get("flags", "")) and r.get("master-link-status") == "ok"
                ]
                if len(replicas) < live_replicas:
                    return False
                if len(client.sentinel_sentinels(self.service)) < len(self.sentinels) - 1:
                    return False
            return True

        _wait("the sentinels do not agree on a healthy primary", healthy, timeout or self.start_timeout, poll=0.1)

    def kill_primary(self) -> PrivateRedis:
        primary = self.primary()
        primary.kill()
        return primary

    def wait_failover(self, killed: PrivateRedis, timeout: float = 30.0) -> PrivateRedis:
        """Until the sentinels name another primary, and that one accepts writes."""

        def promoted() -> bool:
            for sentinel in self.sentinels:
                _, port = _primary_address(sentinel.port, self.service)
                if self._server_at(int(port)) is killed:
                    return False
            return _client(self.primary().port).info("replication").get("role") == "master"

        _wait(f"no replica took over from {HOST}:{killed.port}", promoted, timeout, poll=0.1)
        return self.primary()


def _free_ports(count: int, avoid: Sequence[int] = ()) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = proc.free_port()
        if port not in ports and port not in avoid:
            ports.append(port)
    return ports


# --- the stack's components: one supervising process per set ----------------------------------------


class _RedisSetComponent(Component):
    """`stack up redis-cluster|redis-sentinel`: the set runs under `python -m tsunagu.stack.redis_sets`,
    which starts, forms and watches its servers, and stops them on SIGTERM."""

    kind = ""

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        self.exe_names = (Path(os.path.realpath(sys.executable)).name,)

    def ports(self) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self.ports()[0][0]

    def missing_packages(self) -> list[str]:
        return [] if redis_server() else ["redis-server"]

    def marker(self) -> str:
        return f"tsunagu.stack.redis_sets {self.kind} {self.home}"

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        ports, others = self.ports()
        return [
            sys.executable,
            "-m",
            "tsunagu.stack.redis_sets",
            self.kind,
            str(self.home),
            "--ports",
            *map(str, ports),
            "--other-ports",
            *map(str, others),
        ]

    def stop(self, pid: int) -> str:
        return proc.terminate(pid, 30.0)


class RedisClusterSet(_RedisSetComponent):
    name = "redis-cluster"
    kind = "cluster"
    port_fields = ("redis_cluster_port",)

    def ports(self) -> tuple[list[int], list[int]]:
        ports = redis_cluster_ports(self.settings)
        return ports, [port + 10000 for port in ports]

    def detail(self) -> str:
        return redis_cluster_url(self.settings)

    def probe(self, timeout: float) -> bool:
        try:
            for port in self.ports()[0]:
                info = redis.Redis(host=HOST, port=port, socket_timeout=timeout).cluster("info")
                if info.get("cluster_state") != "ok":
                    return False
            return True
        except (redis.RedisError, OSError):
            return False


class RedisSentinelSet(_RedisSetComponent):
    name = "redis-sentinel"
    kind = "sentinel"
    port_fields = ("redis_sentinel_port", "redis_sentinel_data_port")

    def ports(self) -> tuple[list[int], list[int]]:
        return redis_sentinel_ports(self.settings)

    def detail(self) -> str:
        return redis_sentinel_url(self.settings)

    def probe(self, timeout: float) -> bool:
        try:
            for port in self.ports()[1]:
                host, primary = _primary_address(port, SENTINEL_SERVICE, timeout)
                if not redis.Redis(host=host, port=primary, socket_timeout=timeout).ping():
                    return False
            return True
        except (redis.RedisError, OSError, TypeError):
            return False


# --- the supervising process ------------------------------------------------------------------------


def supervise(argv: Sequence[str] | None = None) -> int:
    """`python -m tsunagu.stack.redis_sets cluster|sentinel DIR PORT...`: run a set until SIGTERM.

    The stack starts this one process per set, so the set is found, probed and stopped like a server."""
    parser = argparse.ArgumentParser(prog="python -m tsunagu.stack.redis_sets")
    parser.add_argument("kind", choices=["cluster", "sentinel"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    parser.add_argument("--other-ports", type=int, nargs="+", required=True, help="bus ports, or sentinel ports")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    servers: _ServerSet
    if args.kind == "cluster":
        servers = PrivateRedisCluster(
            args.directory, ports=args.ports, bus_ports=args.other_ports, node_timeout_ms=5000, start_timeout=60
        )
    else:
        servers = PrivateRedisSentinel(
            args.directory, ports=args.ports, sentinel_ports=args.other_ports, down_after_ms=5000, start_timeout=60
        )
    try:
        servers.start()
    except StackError as error:
        print(f"redis {args.kind}: {error.reason}", file=sys.stderr, flush=True)
        servers.stop()
        return 1
    print(f"redis {args.kind}: ready on ports {' '.join(map(str, args.ports))}", flush=True)
    try:
        while not stopping.wait(1.0):
            for server in servers.servers:
                if not server.running:
                    # a server of the set died (killed by hand, out of memory): bring it back on its data
                    print(f"redis {args.kind}: {HOST}:{server.port} exited; restarting it", flush=True)
                    with contextlib.suppress(StackError):
                        server.start()
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(supervise())
