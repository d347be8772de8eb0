"""Client RPCs to backend services over HTTP, by an allow-list of methods.

Each method is configured with the URL it is POSTed to (as is: nothing the client sends is put in the
URL), who may call it (`allow`, checked like a channel permission on `rpc:<method>`), and optionally a
channel the call acts on (`publish_to`, e.g. `mqtt:{topic}` from the call's data), which the caller must
be allowed to publish to. A method not in the list is error 104; a caller without the permission 103.

A backend refuses a call by answering 4xx with a JSON body `{"error": "<machine code>", "message":
"<text>"}` (optionally `"code"`, 400-1999, and `"temporary"`): the caller gets an error reply whose code
is that `code`, else the HTTP status (400-499, the range Centrifugo leaves to applications), and whose
message is `<error>: <message>`, so a stock SDK's `rpc()` rejects with it. A 4xx without that body
keeps the older mapping: 404 is 104, 403 is 103, anything else 100.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol

import httpx
import orjson
from tsunagu_core.tls import client_context

from tsunagu_ws_gateway.channels import ChannelPolicy, Principal
from tsunagu_ws_gateway.config import RpcRoute
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ReplyError

log = logging.getLogger("tsunagu.gateway.rpc")

RPC_NAMESPACE = "rpc"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Error codes a backend may give: Centrifugo keeps 0-399 for itself and leaves 400-1999 to applications.
APP_CODES = (400, 1999)
MAX_MESSAGE = 512


class Caller(Protocol):
    id: str
    user: str
    principal: Principal

    def may(self, access: str, channel: str) -> bool: ...


class RpcRouter:
    def __init__(
        self,
        routes: Mapping[str, RpcRoute],
        timeout: float,
        policy: ChannelPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.timeout = timeout
        self.policy = policy or ChannelPolicy({})
        # The platform's service credential (tsunagu_core.service_auth): the backends' APIs are internal.
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._client: httpx.AsyncClient | None = None

    def authorize(self, method: str, data: Any, caller: Caller) -> RpcRoute:
        """The method's route if `caller` may call it with `data`; ReplyError 104 or 103 otherwise."""
        if not self.routes:
            # As Centrifugo without an RPC proxy: nothing on this gateway answers RPCs at all.
            raise ReplyError(codes.NOT_AVAILABLE, "no RPC backend is configured (TSUNAGU_GATEWAY_RPC_ROUTES)")
        route = self.routes.get(method)
        if route is None:
            raise ReplyError(codes.METHOD_NOT_FOUND, f"no backend serves {method[:64]!r}")
        self.policy.check(route.allow, f"{RPC_NAMESPACE}:{method}", caller.principal)
        if route.publish_to:
            channel = _fill(route.publish_to, data)
            if not caller.may("allow_publish", channel):
                raise ReplyError(
                    codes.PERMISSION_DENIED, f"{method} on {channel[:64]!r} needs publish permission there"
                )
        return route

    async def call(self, method: str, data: Any, *, user: str, client: str, session: Caller) -> Any:
        url = self.authorize(method, data, session).url
        if self._client is None:
            # TLS backends: the platform CA, and our client certificate when a backend asks (mTLS)
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=client_context())
        try:
            body = orjson.dumps({"method": method, "user": user, "client": client, "data": data})
        except TypeError as exc:
            raise ReplyError(codes.BAD_REQUEST, f"data cannot be sent: {exc}") from None
        try:
            response = await self._client.post(url, content=body, headers=self.headers)
        except httpx.HTTPError as exc:
            log.warning("rpc %s to %s failed: %r", method, url, exc)
            raise ReplyError(codes.INTERNAL, f"backend unreachable: {exc!r}") from None
        if 400 <= response.status_code < 500:
            refusal = _refusal(response)
            if refusal is not None:
                raise refusal
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


class BackendRefusal(ReplyError):
    """The backend refused the call with a reason of its own (code and message as it gave them)."""

    def __init__(self, code: int, message: str, temporary: bool) -> None:
        super().__init__(codes.ErrorCode(code, message))
        self.temporary = temporary


def _refusal(response: httpx.Response) -> BackendRefusal | None:
    """A 4xx with `{"error", "message"}` as an application error reply; None for any other 4xx body."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return None
    code = body.get("code", response.status_code)
    if isinstance(code, bool) or not isinstance(code, int) or not APP_CODES[0] <= code <= APP_CODES[1]:
        code = response.status_code
    message = body.get("message")
    text = f"{body['error']}: {message}" if isinstance(message, str) and message else body["error"]
    return BackendRefusal(code, text[:MAX_MESSAGE], body.get("temporary") is True)


def _fill(template: str, data: Any) -> str:
    """`mqtt:{topic}` with `data["topic"]`; 107 when the data lacks a string for a placeholder."""

    def value(match: re.Match[str]) -> str:
        found = data.get(match.group(1)) if isinstance(data, dict) else None
        if not isinstance(found, str) or not found:
            raise ReplyError(codes.BAD_REQUEST, f"data.{match.group(1)} must be a non-empty string")
        return found

    return _PLACEHOLDER.sub(value, template)
