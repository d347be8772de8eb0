"""Client RPCs routed by method prefix to backend services over HTTP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from tsunagu_core.tls import client_context

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ReplyError

log = logging.getLogger("tsunagu.gateway.rpc")


class RpcRouter:
    def __init__(self, routes: Mapping[str, str], timeout: float) -> None:
        # Longest prefix first, so `sim.admin.` wins over `sim.`.
        self.routes = sorted(routes.items(), key=lambda item: len(item[0]), reverse=True)
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def route(self, method: str) -> str | None:
        for prefix, base in self.routes:
            if method.startswith(prefix):
                return base.rstrip("/") + "/" + method
        return None

    async def call(self, method: str, data: Any, *, user: str, client: str) -> Any:
        if not self.routes:
            # As Centrifugo without an RPC proxy: nothing on this gateway answers RPCs at all.
            raise ReplyError(codes.NOT_AVAILABLE, "no RPC backend is configured (TSUNAGU_GATEWAY_RPC_ROUTES)")
        url = self.route(method)
        if url is None:
            raise ReplyError(codes.METHOD_NOT_FOUND, f"no backend serves {method!r}")
        if self._client is None:
            # TLS backends: the platform CA, and our client certificate when a backend asks (mTLS)
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=client_context())
        body = orjson.dumps({"method": method, "user": user, "client": client, "data": data})
        try:
            response = await self._client.post(url, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            log.warning("rpc %s to %s failed: %r", method, url, exc)
            raise ReplyError(codes.INTERNAL, f"backend unreachable: {exc!r}") from None
        if response.status_code == 404:
            raise ReplyError(codes.METHOD_NOT_FOUND, f"backend does not know {method!r}")
        if response.status_code == 403:
            raise ReplyError(codes.PERMISSION_DENIED)
        if response.status_code >= 400:
            raise ReplyError(codes.INTERNAL, f"backend answered {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise ReplyError(codes.INTERNAL, "backend answered with something that is not JSON") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
