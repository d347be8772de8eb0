"""How one proxy call reaches the application's backend: Centrifugo's proxy request as JSON POSTed to an
HTTP endpoint, or a call of its `CentrifugoProxy` gRPC service. Both take and give the messages of
proto/centrifugal/centrifugo/proxy.proto; a backend that cannot be asked (down, slow, a status that is not
200, an answer that is not the message) is `BackendUnavailable`, whatever the transport."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import grpc
import httpx
import orjson
from google.protobuf.message import Message
from tsunagu_core.tls import client_context

from tsunagu_ws_gateway.centrifugo import json_map, proxy_pb2
from tsunagu_ws_gateway.centrifugo.grpc_services import client_calls, message_class, unary_methods

PROXY_SERVICE = proxy_pb2.DESCRIPTOR.services_by_name["CentrifugoProxy"]
_METHODS = unary_methods(PROXY_SERVICE)


class BackendUnavailable(Exception):
    """The backend gave no answer we can use; `timeout` when it did not answer in time."""

    def __init__(self, detail: str, *, timeout: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout


class Backend(Protocol):
    transport: str

    async def call(self, method: str, request: Message, headers: Mapping[str, str], timeout: float) -> Message:
        """The backend's response to `request` (method: Connect, Refresh, Subscribe, Publish, RPC, SubRefresh)."""
        ...

    async def close(self) -> None: ...


class HttpBackend:
    """POSTs the JSON of a request to one URL and reads the response message from the answer's body."""

    transport = "http"

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client

    async def call(self, method: str, request: Message, headers: Mapping[str, str], timeout: float) -> Message:
        response = message_class(_METHODS[method].output_type)()
        try:
            answer = await self.client.post(
                self.url,
                content=json_map.dumps(request),
                headers={**headers, "content-type": "application/json"},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            raise BackendUnavailable(f"no answer within {timeout:g} s", timeout=True) from None
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"unreachable ({type(exc).__name__})") from None
        if answer.status_code != 200:
            raise BackendUnavailable(f"answered HTTP {answer.status_code}")
        try:
            body = orjson.loads(answer.content)
            if not isinstance(body, dict):
                raise json_map.NotAnAnswer("the answer must be a JSON object")
            return json_map.from_json(body, response)
        except (orjson.JSONDecodeError, json_map.NotAnAnswer) as exc:
            raise BackendUnavailable(f"answered something that is not a {response.DESCRIPTOR.name}: {exc}") from None

    async def close(self) -> None:
        return


class GrpcBackend:
    """Calls the backend's `CentrifugoProxy` service over one channel (gRPC multiplexes the calls)."""

    transport = "grpc"

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, object] = {}

    def _call(self, method: str) -> object:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._calls = client_calls(self._channel, PROXY_SERVICE)
        return self._calls[method]

    async def call(self, method: str, request: Message, headers: Mapping[str, str], timeout: float) -> Message:
        call = self._call(method)
        metadata = tuple((key.lower(), value) for key, value in headers.items())
        try:
            response: Message = await call(request, timeout=timeout, metadata=metadata)  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BackendUnavailable(f"no answer within {timeout:g} s", timeout=True) from None
            raise BackendUnavailable(f"answered gRPC {code.name}") from None
        except asyncio.CancelledError:
            raise
        return response

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def http_client() -> httpx.AsyncClient:
    # TLS backends: the platform CA, and our client certificate when a backend asks (mTLS)
    return httpx.AsyncClient(verify=client_context(), limits=httpx.Limits(max_keepalive_connections=64))


def backend_for(endpoint: str, client: httpx.AsyncClient) -> Backend:
    if endpoint.startswith("grpc://"):
        return GrpcBackend(endpoint.removeprefix("grpc://").rstrip("/"))
    return HttpBackend(endpoint, client)
