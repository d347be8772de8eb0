"""`tsunagu stack up redis-cluster|redis-sentinel`: real sets of servers, found, probed, used and stopped."""

from __future__ import annotations

import asyncio
import os
import random
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from tsunagu_core.redis_pool import connect_redis
from tsunagu_core.testing import REAL_STACK

from tsunagu.stack import proc
from tsunagu.stack.cli import main
from tsunagu.stack.components import components
from tsunagu.stack.redis import redis_server
from tsunagu.stack.settings import StackSettings

pytestmark = pytest.mark.skipif(
    redis_server() is None and not REAL_STACK, reason="redis-server is not installed (`tsunagu stack up redis`)"
)


def _free_run(count: int, *, with_bus: bool = False) -> int:
    """The first of `count` consecutive free ports (and their +10000 cluster bus ports)."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        ports = [base + i for i in range(count)] + ([base + 10000 + i for i in range(count)] if with_bus else [])
        if not any(proc.port_in_use(port) for port in ports):
            return base
    raise AssertionError("no run of free ports")


@pytest.fixture
def stack_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("TSUNAGU_STACK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TSUNAGU_STACK_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TSUNAGU_STACK_REDIS_CLUSTER_PORT", str(_free_run(6, with_bus=True)))
    monkeypatch.setenv("TSUNAGU_STACK_REDIS_SENTINEL_PORT", str(_free_run(3)))
    monkeypatch.setenv("TSUNAGU_STACK_REDIS_SENTINEL_DATA_PORT", str(_free_run(3)))
    yield tmp_path / "state"
    main(["down", "redis-cluster", "redis-sentinel"])


def exported(text: str) -> dict[str, str]:
    pairs = (shlex.split(line.removeprefix("export "))[0].partition("=") for line in text.splitlines())
    return {key: value for key, _, value in pairs}


async def round_trip(url: str) -> object:
    client = await connect_redis(url)
    try:
        await client.set("{stack-test}:key", b"value")
        return await client.get("{stack-test}:key")
    finally:
        await client.aclose()


def test_stack_up_redis_cluster_and_sentinel_then_env_points_at_them(
    stack_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `stack up` alone does not start them: they are for those who name them.
    assert [c.name for c in components(StackSettings())] == ["redis", "kafka", "postgres", "mqtt", "prometheus"]

    assert main(["up", "redis-cluster", "redis-sentinel"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("redis-cluster") and "started" in line for line in lines), lines
    assert any(line.startswith("redis-sentinel") and "started" in line for line in lines), lines
    assert main(["up", "redis-cluster"]) == 0  # idempotent
    assert "already running" in capsys.readouterr().out
    assert main(["status", "redis-cluster", "redis-sentinel"]) == 0
    capsys.readouterr()

    for name, scheme in (("redis-cluster", "redis-cluster://"), ("redis-sentinel", "redis-sentinel://")):
        assert main(["env", name]) == 0
        env = exported(capsys.readouterr().out)
        assert env["TSUNAGU_REDIS_URL"].startswith(scheme)
        assert "TSUNAGU_KAFKA_BOOTSTRAP" in env  # the rest of the stack as `stack env` prints it
        assert asyncio.run(round_trip(env["TSUNAGU_REDIS_URL"])) == b"value"

    assert main(["down", "redis-cluster", "redis-sentinel"]) == 0
    capsys.readouterr()
    assert main(["status", "redis-cluster", "redis-sentinel"]) == 3
