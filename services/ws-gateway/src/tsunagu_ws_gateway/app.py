"""ws-gateway application factory: every client socket ends here.

The composition root of the gateway: the core (core/: admission, registry, sessions, the socket loop),
the transports (transports/) and the protocols (protocols/) wired to the routes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp
from tsunagu_core import topics
from tsunagu_core.bus import Subscription
from tsunagu_core.lifecycle import Runtime, create_service_app
from tsunagu_core.nonces import MemoryNonceRegistry, NonceRegistry, RedisNonceRegistry
from tsunagu_core.revocation_store import shared_revocation_store
from tsunagu_core.service_auth import service_headers

from tsunagu_ws_gateway import grpc_api
from tsunagu_ws_gateway.channels import ChannelPolicy
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.control import control_handler
from tsunagu_ws_gateway.core.emulation import EmulationRouter
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.deferred import DeferredApp
from tsunagu_ws_gateway.events import EventEmitter
from tsunagu_ws_gateway.forwarding import build_forwarders
from tsunagu_ws_gateway.hub import Node
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocols.collab import CollabHub, collab_endpoint
from tsunagu_ws_gateway.protocols.emulation import emulation_endpoint, http_stream_endpoint, sse_endpoint
from tsunagu_ws_gateway.protocols.fhir import build_fhir_router
from tsunagu_ws_gateway.protocols.hocuspocus import hocuspocus_endpoint
from tsunagu_ws_gateway.protocols.jsonrpc import jsonrpc_endpoint
from tsunagu_ws_gateway.protocols.native import native_endpoint
from tsunagu_ws_gateway.protocols.stomp import stomp_endpoint
from tsunagu_ws_gateway.protocols.uni import uni_http_stream_endpoint, uni_sse_endpoint, uni_websocket_endpoint
from tsunagu_ws_gateway.revocations import RevocationFeed, RevocationList
from tsunagu_ws_gateway.rpc import RpcRouter
from tsunagu_ws_gateway.server_api import build_router
from tsunagu_ws_gateway.signatures import SignatureVerifier
from tsunagu_ws_gateway.tokens import NO_TOKEN_KEY_HINT, TokenVerifier
from tsunagu_ws_gateway.transports.http import BodyLimit
from tsunagu_ws_gateway.transports.server import GatewayHttpProtocol, websocket_protocol
from tsunagu_ws_gateway.web import serve_web_app
from tsunagu_ws_gateway.webhooks import Relays

SERVICE = "ws-gateway"
NEEDS = ("bus", "broker", "nonces", "revocations")
WARM_DEFERRED_AFTER = 1.0
# Slack over the largest message a protocol takes, for the WebSocket framing around it.
WS_MAX_SIZE_SLACK = 1024
# How long a stopping gateway gives its clients to close after the `shutdown` disconnect, before
# uvicorn closes what is left.
DRAIN_WAIT = 1.0


def server_options(settings: GatewaySettings) -> dict[str, Any]:
    """uvicorn options the gateway needs: its WebSocket protocol class (prepared frames written straight
    to the socket, transports/server.py), its HTTP one (streams told when the server stops), and no
    WebSocket message buffered beyond what some protocol takes (uvicorn's default is 16 MiB, read whole
    before any endpoint sees it)."""
    return {
        "http": GatewayHttpProtocol,
        "ws": websocket_protocol(settings.ws_deflate_window_bits),
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "ws_max_size": max(settings.max_frame_bytes, settings.collab_max_message_bytes) + WS_MAX_SIZE_SLACK,
    }


class _TokensOutOfLogs(logging.Filter):
    """`?token=` (y-websocket, JSON-RPC) out of uvicorn's lines: a JWT in a log is a JWT anyone may use."""

    pattern = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(self.pattern.sub(r"\1…", a) if isinstance(a, str) else a for a in record.args)
        return True


def _keep_tokens_out_of_logs() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TokensOutOfLogs) for f in logger.filters):
            logger.addFilter(_TokensOutOfLogs())


def create_app(runtime: Runtime, settings: GatewaySettings) -> FastAPI:
    _keep_tokens_out_of_logs()
    node = Node(settings, runtime.broker, runtime.settings.node_name)
    policy = ChannelPolicy(settings.namespaces)
    rpc = RpcRouter(settings.rpc_routes, settings.rpc_timeout, policy, service_headers(runtime.settings))
    # Nonces of signed publications are shared by every replica when they share Redis.
    nonces: NonceRegistry = (
        RedisNonceRegistry(runtime.settings.redis_url) if runtime.settings.broker == "redis" else MemoryNonceRegistry()
    )
    runtime.add_dependency("nonces", nonces)
    gateway = Gateway(
        settings,
        node,
        TokenVerifier(settings),
        policy,
        EventEmitter(runtime.bus, runtime.settings.node_name),
        rpc,
        # Started and closed by the runtime (NEEDS): auth writes there before Kafka has it.
        RevocationList(store=shared_revocation_store(runtime)),
        SignatureVerifier(nonces, settings.signature_window),
        build_forwarders(runtime.bus, command_timeout=settings.command_timeout),
    )
    node.on_command = control_handler(gateway)
    emulation = EmulationRouter(node)
    collab = CollabHub(gateway, runtime.bus, runtime.settings.node_name, service_headers(runtime.settings))

    async def follow_revocations() -> Subscription:
        await runtime.wait_ready(["bus"])
        # A group of our own per process start, read from the earliest offset: this replica gets every
        # revocation, and a restarted one rebuilds the list from the topic.
        feed = RevocationFeed(gateway.revoked, gateway.close_revoked)
        return await runtime.bus.consume([topics.AUTH_REVOCATIONS], f"ws-gateway-revocations-{node.id}", feed)

    async def start_relays(relays: Relays) -> None:
        await runtime.wait_ready(["bus"])
        try:
            await relays.start()
        except Exception:
            logging.getLogger("tsunagu.gateway.webhooks").exception("the webhook relays could not start")

    def graphql_app() -> ASGIApp:
        from tsunagu_ws_gateway.protocols.graphql import build_graphql_app

        return BodyLimit(build_graphql_app(gateway, settings), settings.max_request_bytes)

    def socketio_app() -> ASGIApp:
        from tsunagu_ws_gateway.protocols.socketio import build_socketio_app

        app: ASGIApp = build_socketio_app(gateway)
        return app

    deferred = [DeferredApp("graphql", graphql_app), DeferredApp("socket.io", socketio_app)]

    @asynccontextmanager
    async def serve_clients() -> AsyncIterator[None]:
        await node.start()
        await gateway.registry.start()
        await emulation.start()
        await collab.start()
        # Built once the socket listens and the first reconnecting clients are in (deferred.py).
        warming = asyncio.get_running_loop().call_later(WARM_DEFERRED_AFTER, lambda: [d.warm() for d in deferred])
        revocations = asyncio.create_task(follow_revocations(), name="follow-revocations")
        relays = Relays(runtime.bus, settings.webhooks) if settings.webhooks else None
        relaying = asyncio.create_task(start_relays(relays), name="webhook-relays") if relays else None
        grpc_server = (
            await grpc_api.start(gateway, settings.host, settings.grpc_api_port) if settings.grpc_api_port else None
        )
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            if relaying is not None and relays is not None:
                relaying.cancel()
                await asyncio.gather(relaying, return_exceptions=True)
                await relays.stop()
            if revocations.done() and revocations.exception() is None:
                await revocations.result().stop()
            else:
                revocations.cancel()
            warming.cancel()
            gateway.registry.drain(codes.SHUTDOWN)
            await collab.stop()
            await gateway.registry.stop()
            await emulation.stop()
            await node.stop()
            await gateway.events.flush()
            await rpc.close()
            await gateway.hooks.close()
            if settings.web_enabled:
                await app.state.web_probe.close()

    def warnings() -> dict[str, str]:
        # Anonymous clients and client certificates need no key; everyone else does.
        if gateway.verifier.configured or settings.allow_anonymous or settings.client_cert_identities:
            return {}
        return {"tokens": NO_TOKEN_KEY_HINT}

    app = create_service_app(
        service=SERVICE,
        runtime=runtime,
        needs=NEEDS,
        hooks=[serve_clients],
        warnings=warnings,
        index=not settings.web_enabled,  # the demo web app is at / otherwise
    )

    async def drain() -> None:
        # Before uvicorn closes the sockets itself: clients get Centrifugo's `shutdown` (3001, reconnect).
        runtime.draining = True
        gateway.registry.drain(codes.SHUTDOWN)
        deadline = asyncio.get_running_loop().time() + DRAIN_WAIT
        while gateway.registry.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    app.state.drain = drain
    app.state.settings = settings
    app.state.server_options = server_options(settings)
    app.state.gateway = gateway
    app.state.emulation = emulation
    app.state.collab = collab
    app.add_api_websocket_route("/connection/websocket", native_endpoint)
    app.add_api_websocket_route("/collab", hocuspocus_endpoint)
    app.add_api_websocket_route("/connection/uni_websocket", uni_websocket_endpoint)
    app.router.routes += [
        Route("/connection/uni_sse", uni_sse_endpoint, methods=["GET", "POST", "OPTIONS"]),
        Route("/connection/uni_http_stream", uni_http_stream_endpoint, methods=["POST", "OPTIONS"]),
        # Bidirectional emulation (protocols/emulation.py): the stream, and the client's commands.
        Route("/connection/http_stream", http_stream_endpoint, methods=["POST", "OPTIONS"]),
        Route("/connection/sse", sse_endpoint, methods=["GET", "POST", "OPTIONS"]),
        Route("/emulation", emulation_endpoint, methods=["POST", "OPTIONS"]),
    ]
    app.add_api_websocket_route("/collab/{doc}", collab_endpoint)
    app.add_api_websocket_route("/rpc", jsonrpc_endpoint)
    app.add_api_websocket_route("/stomp", stomp_endpoint)
    graphql, socketio = deferred
    app.mount("/socket.io", socketio)
    app.router.routes += [Route("/graphql", graphql, methods=["GET", "POST"]), WebSocketRoute("/graphql", graphql)]
    app.include_router(build_router())
    app.include_router(build_fhir_router(gateway, settings))
    if settings.web_enabled:
        probe = serve_web_app(app, settings)
        app.state.web_probe = probe
    return app
