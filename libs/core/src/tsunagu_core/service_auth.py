"""Service-to-service authentication of the platform's internal HTTP APIs.

One credential for every internal API (collab, presence, stream-ingest, mqtt-bridge, sim-engine,
audit-log): `Authorization: Bearer <TSUNAGU_INTERNAL_TOKEN>`, or a verified client certificate whose
name matches one of `TSUNAGU_INTERNAL_PEERS` (mTLS, where the chart issues certificates). The callers
inside the platform (the gateway's collab and RPC clients) send the token with `service_headers`.
`/healthz` and `/readyz` stay open for the kubelet and load balancers, and `/metrics` while it is
served on the API port (`TSUNAGU_METRICS_PORT=0`).
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from collections.abc import Iterable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from tsunagu_core.config import CoreSettings
from tsunagu_core.tls import scope_peer

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
HINT = "send Authorization: Bearer <TSUNAGU_INTERNAL_TOKEN>, or a client certificate named in TSUNAGU_INTERNAL_PEERS"


def configured(settings: CoreSettings) -> bool:
    """Whether the internal APIs have a credential at all (neither: they are open, development only).
    Peers count only where client certificates are asked for."""
    return bool(settings.internal_token or (settings.internal_peers and settings.server_tls_client_ca_file))


def service_headers(settings: CoreSettings) -> dict[str, str]:
    """Headers a platform service sends with its calls to another one's internal API."""
    return {"authorization": f"Bearer {settings.internal_token}"} if settings.internal_token else {}


def _bearer(scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return credentials.strip()
    return b""


class ServiceAuth:
    """ASGI middleware: every HTTP request and WebSocket but the open paths needs the credential.

    Refused: HTTP 401 `{"error": "unauthorized", "message": ...}` with `WWW-Authenticate: Bearer`, a
    WebSocket is closed with 1008 before it is accepted. Nothing of the request reaches the service."""

    def __init__(
        self, app: ASGIApp, *, token: str, peers: Sequence[str], open_paths: Iterable[str] = PROBE_PATHS
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.peers = tuple(peers)
        self.open_paths = frozenset(open_paths)

    def admits(self, scope: Scope) -> bool:
        if self.token:
            given = _bearer(scope)
            if given and hmac.compare_digest(given, self.token):
                return True
        if self.peers:
            certificate = scope_peer(scope)
            if certificate is not None:
                return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.peers for name in certificate.names)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths or self.admits(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "internal API: credential required"})
            return
        body = json.dumps({"error": "unauthorized", "message": f"this is an internal API: {HINT}"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="tsunagu-internal"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
