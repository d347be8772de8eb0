"""PrivateRedis: a redis-server of a test's own, killed with -9 and restarted on its data, never the shared one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from tsunagu_core.testing import REAL_STACK

from tsunagu.stack import proc
from tsunagu.stack.redis import PrivateRedis, redis_server
from tsunagu.stack.settings import StackError

# `make test` installs redis-server (`stack up`): there it must run; `make unit` elsewhere may lack it.
pytestmark = pytest.mark.skipif(
    redis_server() is None and not REAL_STACK, reason="redis-server is not installed (`tsunagu stack up redis`)"
)


def client_of(server: PrivateRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def test_with_the_append_only_file_a_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, appendonly=True) as server:
        client = client_of(server)
        for n in range(200):
            client.set(f"key:{n}", n)
        client.rpush("events", *range(1000))
        port, first = server.port, server.pid
        assert first is not None and proc.alive(first)

        server.kill()
        assert not server.running and not proc.alive(first)
        with pytest.raises(redis.ConnectionError):
            client_of(server).ping()

        server.restart()
        assert server.port == port and server.pid != first
        client = client_of(server)
        assert client.get("key:199") == b"199" and client.dbsize() == 201
        assert client.lrange("events", -2, -1) == [b"998", b"999"]
        assert (tmp_path / "data" / "appendonlydir").is_dir()
    assert not server.running and not proc.port_in_use(port), "the block's end stops it"


def test_without_it_the_restarted_server_is_empty(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path) as server:
        client_of(server).set("kept?", "no")
        server.kill()
        server.restart()
        assert client_of(server).dbsize() == 0


def test_a_clean_stop_keeps_the_data_and_frees_the_port(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, appendonly=True, config=["appendfsync always"]).start()
    try:
        pid = server.pid
        client_of(server).hset("doc", mapping={"a": "1", "b": "2"})
        server.stop()
        assert pid is not None and not proc.alive(pid) and not proc.port_in_use(server.port)
        server.stop()  # stopping a stopped server is nothing
        server.start()
        assert client_of(server).hgetall("doc") == {b"a": b"1", b"b": b"2"}
    finally:
        server.stop()


def test_two_private_servers_are_apart(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "a") as one, PrivateRedis(tmp_path / "b") as other:
        assert one.port != other.port
        client_of(one).set("where", "one")
        one.kill()
        assert client_of(other).get("where") is None
        assert client_of(other).ping()


def test_a_bad_directive_is_one_clear_error(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, config=["maxmemory-policy sometimes"])
    with pytest.raises(StackError) as failed:
        server.start()
    assert "exited with code 1 before answering" in failed.value.reason
    assert "maxmemory-policy" in failed.value.reason
    assert failed.value.log == tmp_path / "redis.log"
    assert not server.running and not proc.port_in_use(server.port)


def test_a_port_in_use_is_said(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "first") as first:
        second = PrivateRedis(tmp_path / "second", port=first.port, start_timeout=5)
        with pytest.raises(StackError, match=f"port 127.0.0.1:{first.port} is already in use by pid {first.pid} "):
            second.start()
        assert not second.running and client_of(first).ping()


def test_a_server_left_running_dies_with_the_interpreter(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from tsunagu.stack.redis import PrivateRedis; "
        "server = PrivateRedis(Path(sys.argv[1])).start(); print(server.pid, server.port)"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    pid, port = map(int, out.stdout.split())
    assert not proc.alive(pid) and not proc.port_in_use(port)
