"""A real gateway on a loopback port, in the test's own event loop, for stock clients to talk to."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import uvicorn
from tsunagu_core.broker import Broker, MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import free_port, serving
from tsunagu_core.tls import ServerTls, uvicorn_options
from tsunagu_ws_gateway.app import create_app
from tsunagu_ws_gateway.config import GatewaySettings

SECRET = "test-secret-that-is-long-enough-for-hs256"
API_KEY = "test-api-key"


def make_token(user: str, channels: list[str] | None = None, ttl: float = 3600, **claims: Any) -> str:
    body = {"sub": user, "exp": int(time.time() + ttl), "iat": int(time.time()), **claims}
    if channels is not None:
        body["channels"] = channels
    return jwt.encode(body, SECRET, algorithm="HS256")


@dataclass
class RunningGateway:
    port: int
    server: uvicorn.Server
    broker: Broker
    tls: bool = False

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/connection/websocket"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_gateway(
    broker: Broker | None = None, server_tls: ServerTls | None = None, bus: MemoryBus | None = None, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    """`server_tls`: serve https/wss with it, as `tsunagu serve` does with TSUNAGU_SERVER_TLS_*; `bus`: where
    its events go (to read them)."""
    options: dict[str, Any] = {"token_hmac_secret": SECRET, "api_key": API_KEY, **overrides}
    settings = GatewaySettings(**options)
    engine = broker or MemoryBroker()
    runtime = Runtime(CoreSettings(node_name="test-node"), bus=bus or MemoryBus(), broker=engine)
    port = free_port()
    tls_options = uvicorn_options(server_tls) if server_tls is not None else {}
    async with serving(create_app(runtime, settings), port, **tls_options) as server:
        yield RunningGateway(port, server, engine, tls=server_tls is not None)


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway() as running:
        yield running


@pytest.fixture
def token() -> Callable[..., str]:
    return make_token


@pytest.fixture
def start_gateway() -> Callable[..., contextlib.AbstractAsyncContextManager[RunningGateway]]:
    """`async with start_gateway(broker=..., **settings) as gw:` for tests that need their own settings."""
    return running_gateway


@pytest.fixture
def api_key() -> str:
    return API_KEY
