"""Processes under test: `tsunagu` commands started as a user would, against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
JS = Path(__file__).parent / "js"
ARTIFACTS = Path(os.environ.get("TSUNAGU_ARTIFACTS", Path(__file__).parent / "artifacts"))
# `tsunagu run`'s development users (tsunagu.cli.DEVELOPMENT_USERS).
USERS = {"alice": "alice-development-password", "bob": "bob-development-password"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        port: int,
        tls: ssl.SSLContext | None = None,
        inherit_tsunagu: bool = True,
    ) -> None:
        """`tls`: the process serves https (TSUNAGU_SERVER_TLS_*); its health is asked with this context.
        `inherit_tsunagu=False`: none of this environment's TSUNAGU_* variables (the stack's addresses)
        reach the process, only `env`'s: it runs as on a machine with nothing configured."""
        self.port = port
        self.tls = tls
        self.base = f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}"
        # A file, not a pipe: nobody reads a pipe while the test runs, and a chatty process (`tsunagu run`
        # logs for eight services) blocks in its logging once the pipe's 64 KiB are full.
        self.log = tempfile.TemporaryFile(mode="w+", prefix="tsunagu-e2e-")  # noqa: SIM115 (closed by the fixture)
        inherited = {k: v for k, v in os.environ.items() if inherit_tsunagu or not k.startswith("TSUNAGU_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tsunagu", *args],
            cwd=REPO,
            env={**inherited, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1, verify=self.tls or True).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.base} never became healthy")

    def readiness(self) -> httpx.Response:
        return httpx.get(self.base + "/readyz", timeout=5, verify=self.tls or True)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}: {self.output()}")
            try:
                last = self.readiness()
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if last.status_code == 200:
                body: dict[str, object] = last.json()
                return body
            time.sleep(0.2)
        raise AssertionError(f"never ready: {last.text if last else 'no answer'}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def output(self) -> str:
        """What the process printed so far (the last 20,000 characters)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-20_000:]


@pytest.fixture
def start_service() -> Iterator[object]:
    yield from _service_starter()


@pytest.fixture(scope="module")
def start_module_service() -> Iterator[object]:
    """start_service for processes that every test of a module shares (e.g. a whole platform)."""
    yield from _service_starter()


def _service_starter() -> Iterator[object]:
    started: list[ServiceProcess] = []

    def start(
        args: list[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        tls: ssl.SSLContext | None = None,
        inherit_tsunagu: bool = True,
    ) -> ServiceProcess:
        chosen = port or free_port()
        service = ServiceProcess([*args, "--port", str(chosen)], env or {}, chosen, tls, inherit_tsunagu)
        started.append(service)
        return service

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        service.log.close()


@pytest.fixture(scope="session")
def pick_port() -> object:
    return free_port


@pytest.fixture
def real_env() -> dict[str, str]:
    """Engines and addresses of the real stack, as `tsunagu stack env` gives them."""
    from tsunagu_core.testing import KAFKA_BOOTSTRAP, POSTGRES_DSN, REDIS_URL, require_stack

    require_stack("services on the real stack")
    return {
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_DATABASE": "postgres",
        "TSUNAGU_REDIS_URL": REDIS_URL,
        "TSUNAGU_POSTGRES_DSN": POSTGRES_DSN,
        "TSUNAGU_KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP,
    }


def _size(path: str) -> int:
    return Path(path).stat().st_size


async def _run_scenario(name: str, platform: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One scenario of js/browser_demo.mjs in Chromium against `platform` ({base, chromium, room}); its
    result, after checking that the page raised no error and every screenshot shows something."""
    options = {
        "base": platform["base"],
        "chromium": platform["chromium"],
        "artifacts": str(ARTIFACTS),
        "room": platform["room"],
        "users": USERS,
        **extra,
    }
    node = await asyncio.create_subprocess_exec(
        "node", "browser_demo.mjs", name, json.dumps(options),
        cwd=JS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(node.communicate(), 150)
    except TimeoutError:
        node.kill()
        raise AssertionError(f"browser scenario {name} hung") from None
    assert node.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert result["errors"] == [], result["errors"]
    sizes = {shot: size for shot in result["screenshots"] if (size := await asyncio.to_thread(_size, shot)) < 10_000}
    assert not sizes, f"screenshots suspiciously small: {sizes}"
    return result


@pytest.fixture
def scenario() -> Callable[..., Awaitable[dict[str, Any]]]:
    """`await scenario(name, platform, **options)`: a browser scenario's result (see _run_scenario)."""
    return _run_scenario
